"""What the GPU plug-ins (nvImageCodec, DALI) share, naming none of them: the self-test that
decides which codestreams a GPU decoder returns exactly, a plug-in's batch decoder built and
self-tested once per process, and the batch decode of the first frames of many files into
stored values. The plug-ins import this; `gpu_batch`, which finds the plug-ins by name through
the registry (which loads them), builds on it and re-exports it.

Nothing here imports CUDA packages at module import.
"""
from __future__ import annotations

import functools
import importlib

import numpy as np

from rsna_utils.core.errors import DecodeError
from rsna_utils.dicom import uids

GPU_SYNTAXES = uids.FRAME_DECODABLE


def cuda_available() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


def import_error(module: str) -> str | None:
    """None when a GPU plug-in's package imports, else the error in words (a CUDA wheel may
    import on a machine where it cannot run: the decoder's self-test then sends every file to
    the CPU path)."""
    try:
        importlib.import_module(module)
    except ImportError as e:
        return str(e).splitlines()[0][:160] if str(e) else type(e).__name__
    return None


def imports(module: str) -> bool:
    """Whether a GPU plug-in's package imports (`import_error` is None)."""
    return import_error(module) is None


def decode_one(name: str, h, batch_decoder) -> np.ndarray:
    """A GPU plug-in's single-file `decode`: through this process's shared batch decoder
    (`shared_decoder`, built from the plug-in's `BatchDecoder` and self-tested once), on the GPU
    when CUDA is there."""
    device = "cuda" if cuda_available() else "cpu"
    return decode_frames([h], name, shared_decoder(name, device, batch_decoder))[0]


def rescale_to_precision(x, precision: int):
    """DALI's GPU decoder returns a codestream of precision P < 16 scaled to the full 16-bit
    range (ANCHORS.md); round(x * (2**P - 1) / 65535) gives the stored values back."""
    if precision >= 16:
        return x
    top = float(2 ** precision - 1)
    if hasattr(x, "to"):   # torch
        import torch
        return torch.round(x.to(torch.float32) * (top / 65535.0)).to(torch.int32)
    return np.rint(x.astype(np.float64) * (top / 65535.0)).astype(np.uint16)


# ----------------------------------------------------------------------------------------
# Which codestreams a GPU decoder returns exactly: decided by a self-test, not by trust
# ----------------------------------------------------------------------------------------
# Public trackers report GPU decoders that mis-decode some precisions (nvImageCodec and 9-15-bit
# lossless JPEG) and DALI returning codestreams of P < 16 bits scaled to 16 bits (but a real RSNA
# JP2 file unscaled). So before a decoder sees a file of a new (transfer syntax, container,
# precision), it decodes a probe image of that kind, encoded here by imagecodecs, and compares it
# with imagecodecs' own CPU decode: "exact" goes on the GPU, "scaled" goes on the GPU and is
# rescaled, anything else goes to the CPU path with the reason in meta.csv (`gpu_route`).

PROBE_SHAPE = (512, 512)   # nvImageCodec 0.9 mis-decoded 96x80 lossless JPEG (10-16 bits) on an H200, 512x512 exactly


def probe_image(precision: int) -> np.ndarray:
    """A small image that uses the whole range of `precision` bits (0 and the top value too):
    a ramp plus fine noise, so that both smooth and busy code paths of a decoder run."""
    top = 2 ** precision - 1
    h, w = PROBE_SHAPE
    ramp = np.linspace(0, top, h * w).reshape(h, w)
    noise = np.random.default_rng(precision).integers(-(top // 16) - 1, top // 16 + 2, (h, w))
    img = np.clip(ramp + noise, 0, top)
    img[0, 0], img[-1, -1] = 0, top
    return img.astype(np.uint16 if precision > 8 else np.uint8)


def encode_probe(syntax: str, kind: str, precision: int) -> bytes:
    """The probe encoded as a file of this kind would be (imagecodecs; lossy J2K stays lossy)."""
    import imagecodecs
    img = probe_image(precision)
    if kind in ("jp2", "j2k"):
        return bytes(imagecodecs.jpeg2k_encode(
            img, level=0 if syntax != uids.JPEG2000 else 30,
            reversible=syntax != uids.JPEG2000, codecformat=kind,
            bitspersample=precision, numthreads=1))
    predictor = 1 if syntax == uids.JPEG_LOSSLESS_SV1 else 6
    return bytes(imagecodecs.jpeg8_encode(img, lossless=True, predictor=predictor,
                                          bitspersample=precision))


def cpu_decode_frame(frame: bytes, kind: str) -> np.ndarray:
    import imagecodecs
    if kind in ("jp2", "j2k"):
        return imagecodecs.jpeg2k_decode(frame, numthreads=1)
    return imagecodecs.jpeg8_decode(frame)


def compare_decodes(gpu_out, cpu_out: np.ndarray, precision: int) -> str:
    """"exact", "scaled" (the GPU value is the stored value scaled to 16 bits) or "wrong: ..."."""
    if gpu_out is None:
        return "wrong: the decoder returned nothing"
    g = gpu_out.cpu().numpy() if hasattr(gpu_out, "cpu") else np.asarray(gpu_out)
    g = g.reshape(g.shape[:2]).astype(np.int64)
    c = np.asarray(cpu_out).astype(np.int64)
    if g.shape != c.shape:
        return f"wrong: shape {g.shape}, expected {c.shape}"
    if np.array_equal(g, c):
        return "exact"
    if precision < 16 and np.array_equal(rescale_to_precision(g.astype(np.uint16), precision)
                                         .astype(np.int64), c):
        return "scaled"
    bad = g != c
    return f"wrong: {int(bad.sum())} of {bad.size} probe pixels differ (max {int(np.abs(g - c).max())})"


def looks_scaled(x, precision: int, n: int = 4096) -> bool:
    """True when the values exceed 2**P - 1 and a sample of them survives the round trip
    stored -> 16-bit -> stored (the mark of a P-bit image scaled to 16 bits)."""
    top = 2 ** precision - 1
    if hasattr(x, "cpu"):
        import torch
        flat = x.reshape(-1)
        # torch has no max() for uint16, the GPU decoders' dtype: widen first
        mx = int(flat.to(torch.int32).max())
        idx = np.linspace(0, flat.numel() - 1, min(n, flat.numel())).astype(np.int64)
        v = flat[idx].cpu().numpy().astype(np.float64)
    else:
        flat = np.asarray(x).reshape(-1)
        mx = int(flat.max())
        v = flat[np.linspace(0, flat.size - 1, min(n, flat.size)).astype(np.int64)].astype(np.float64)
    if mx <= top:
        return False
    back = np.rint(np.rint(v * top / 65535.0) * 65535.0 / top)
    return bool(np.all(back == v))


class DecodeRules:
    """Per (transfer syntax, container, precision): how a GPU decoder's output relates to the
    stored values, learnt once per decoder from a probe (see above)."""

    def __init__(self, decoder, backend: str):
        self.decoder, self.backend, self.modes = decoder, backend, {}

    def mode(self, syntax: str, kind: str, precision: int) -> str:
        key = (syntax, kind, precision)
        if key not in self.modes:
            try:
                frame = encode_probe(syntax, kind, precision)
                ref = cpu_decode_frame(frame, kind)
            except ImportError:
                self.modes[key] = "unverified"     # no imagecodecs: trust the decoder
                return self.modes[key]
            except Exception as e:                 # imagecodecs cannot write this precision
                self.modes[key] = f"wrong: no probe ({type(e).__name__}: {str(e)[:80]})"
                return self.modes[key]
            try:
                out = self.decoder.decode([frame])[0]
            except Exception as e:
                out, self.modes[key] = None, f"wrong: {type(e).__name__}: {str(e)[:80]}"
            if key not in self.modes:
                self.modes[key] = compare_decodes(out, ref, precision)
        return self.modes[key]

    def route(self, h, cs) -> str | None:
        """None when this file goes to the GPU decoder; else why it goes to the CPU path."""
        if h.transfer_syntax not in GPU_SYNTAXES:
            return f"{uids.name(h.transfer_syntax)} is not decoded on the GPU"
        if h.signed or cs.signed:
            return "signed pixel values (the GPU decoders return unsigned)"
        if cs.components != 1 or not 2 <= cs.precision <= 16:
            return f"{cs.components} components of {cs.precision} bits"
        m = self.mode(h.transfer_syntax, cs.kind, cs.precision)
        if m.startswith("wrong"):
            return f"{self.backend} self-test failed for {cs.kind} at {cs.precision} bits ({m})"
        return None

    def fix(self, x, h, cs):
        """The decoder's output as stored values. Where the probe said "scaled" (or could not be
        run), each file is checked too: a real RSNA JP2 file came back from DALI unscaled while
        probes were scaled, so the rescale applies only when this file's values sit on the
        16-bit grid of its precision and go above 2**P - 1."""
        mode = self.modes.get((h.transfer_syntax, cs.kind, cs.precision))
        if mode in ("scaled", "unverified") and cs.precision < 16 and looks_scaled(x, cs.precision):
            return rescale_to_precision(x, cs.precision)
        return x


def build_decoder(name: str, batch_decoder, device: str = "cuda", batch_size: int = 32):
    """A plug-in's batched decoder (its `BatchDecoder` class) with its `rules` (the self-tested
    routing of `DecodeRules`). Builds and self-tests a new one: a run keeps the one it made."""
    dec = batch_decoder(device=device, batch_size=batch_size)
    dec.rules = DecodeRules(dec, name)
    return dec


@functools.lru_cache(maxsize=None)
def shared_decoder(name: str, device: str, batch_decoder):
    """The one decoder of this process for (name, device), built on first use: single files
    (`read_dicom(path, "dali")`) reuse it and its self-test results instead of rebuilding both."""
    return build_decoder(name, batch_decoder, device)


def decode_frames(headers, backend: str, dec) -> list:
    """Stored values (numpy) for each header's file (first frame) from the batch decoder `dec`
    (of `build_decoder`); DecodeError for a file the GPU decoder does not take or fails on (use
    the CPU path for it)."""
    from rsna_utils.dicom.frames import check_codestream, first_frame
    from rsna_utils.dicom.header import check_header
    frames, css = [], []
    for h in headers:
        check_header(h)
        if h.transfer_syntax not in GPU_SYNTAXES:
            raise DecodeError(f"{h.path}: {backend} does not decode {h.transfer_syntax}")
        cs = check_codestream(h.path, h.rows, h.columns, ds=h.dataset, transfer_syntax=h.transfer_syntax)
        why = dec.rules.route(h, cs)
        if why:
            raise DecodeError(f"{h.path}: {why}")
        frames.append(first_frame(h.path, h.dataset))
        css.append(cs)
    out = []
    for h, cs, img in zip(headers, css, dec.decode(frames)):
        if img is None:
            raise DecodeError(f"{h.path}: {backend} could not decode the frame")
        img = dec.rules.fix(img, h, cs)
        out.append(img if isinstance(img, np.ndarray) else img.cpu().numpy().astype(np.uint16))
    return out
