"""GPU decoding (nvImageCodec, DALI) and the whole preprocessing step on the GPU.

The compressed frame is cut out of PixelData on the CPU (`rsna_utils.frames`), decoded in
batches by nvImageCodec or DALI into uint16 tensors, then windowed (the same lookup table as the
CPU path), cropped and area-resized in torch. The breast box is found on a small subsample copied
to the CPU (the same `roi.find_breast` as the CPU path). PNGs are written by a thread pool so the
GPU does not wait. Any file a GPU decoder rejects goes through the CPU path and is counted.

Nothing here imports CUDA packages at module import: `import rsna_utils.gpu` works anywhere.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from rsna_utils.errors import DecodeError, RsnaError

GPU_BACKENDS = ("nvimgcodec", "dali")
GPU_SYNTAXES = {"1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.90",
                "1.2.840.10008.1.2.4.91"}
_LOG_LOCK = threading.Lock()
INSTALL_HINT = "pip install -r requirements-gpu.txt (nvidia-nvimgcodec-cu13, nvidia-dali-cuda130)"


def cuda_available() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


def package_available(name: str) -> bool:
    try:
        if name == "nvimgcodec":
            from nvidia import nvimgcodec  # noqa: F401
        elif name == "dali":
            import nvidia.dali  # noqa: F401
        else:
            return False
        return True
    except ImportError:
        return False


def resolve_backend(name: str) -> str:
    """`auto` -> nvimgcodec (then dali) when CUDA and the package are present, else the CPU."""
    if name == "auto":
        if cuda_available():
            for b in GPU_BACKENDS:
                if package_available(b):
                    return b
        return "cpu"
    if name in GPU_BACKENDS:
        if not package_available(name):
            raise RsnaError(f"backend {name!r} is not installed; {INSTALL_HINT}")
        return name
    return "cpu"


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
            img, level=0 if syntax != "1.2.840.10008.1.2.4.91" else 30,
            reversible=syntax != "1.2.840.10008.1.2.4.91", codecformat=kind,
            bitspersample=precision, numthreads=1))
    predictor = 1 if syntax == "1.2.840.10008.1.2.4.70" else 6
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
        flat = x.reshape(-1)
        mx = int(flat.max())
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
        from rsna_utils.dicom_io import transfer_syntax_name
        if h.transfer_syntax not in GPU_SYNTAXES:
            return f"{transfer_syntax_name(h.transfer_syntax)} is not decoded on the GPU"
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


class NvImageCodecDecoder:
    """Batched decode with nvImageCodec: device "cuda" (GPU, torch tensors) or "cpu"
    (its CPU-only backend: JPEG 2000 only; numpy arrays). Returns None where it failed."""

    def __init__(self, device: str = "cuda", device_id: int = 0):
        from nvidia import nvimgcodec as nv
        self.nv, self.device = nv, device
        if device == "cpu":
            self.decoder = nv.Decoder(device_id=nv.NVIMGCODEC_DEVICE_CPU_ONLY,
                                      backends=[nv.Backend(nv.BackendKind.CPU_ONLY)])
        else:
            self.decoder = nv.Decoder(device_id=device_id)
        # allow_any_depth keeps 12/16-bit values as uint16 instead of scaling to uint8
        self.params = nv.DecodeParams(allow_any_depth=True, color_spec=nv.ColorSpec.UNCHANGED,
                                      sample_format=nv.SampleFormat.I_UNCHANGED)

    def decode(self, frames: list[bytes]) -> list:
        try:
            images = self.decoder.decode([self.nv.CodeStream(f) for f in frames], params=self.params)
        except Exception:
            if len(frames) == 1:
                return [None]
            return [x for f in frames for x in self.decode([f])]   # isolate the bad frame
        out = []
        for img in images:
            if img is None:
                out.append(None)
            elif self.device == "cpu":
                out.append(np.asarray(img.cpu())[..., 0])
            else:
                import torch
                out.append(torch.as_tensor(img, device="cuda")[..., 0])
        return out


class DaliDecoder:
    """Batched decode with DALI `fn.decoders.image(dtype=UINT16)` fed by an external source;
    device "cuda" uses the mixed (GPU) decoder, "cpu" the CPU one. Outputs go to torch through
    DLPack as uint16 tensors (never through int16, which would wrap values above 32767)."""

    def __init__(self, device: str = "cuda", batch_size: int = 32, device_id: int = 0,
                 num_threads: int = 4):
        from nvidia.dali import fn, pipeline_def, types
        self.device, self.batch_size = device, batch_size
        dec_device = "mixed" if device == "cuda" else "cpu"

        @pipeline_def(batch_size=batch_size, num_threads=num_threads,
                      device_id=device_id if device == "cuda" else None, prefetch_queue_depth=1,
                      exec_dynamic=True)
        def pipe():
            data = fn.external_source(name="frames", dtype=types.UINT8, no_copy=False)
            return fn.decoders.image(data, device=dec_device, output_type=types.ANY_DATA,
                                     dtype=types.UINT16)
        self.pipe = pipe()
        self.pipe.build()

    def decode(self, frames: list[bytes]) -> list:
        out = []
        for i in range(0, len(frames), self.batch_size):
            chunk = [np.frombuffer(f, np.uint8) for f in frames[i:i + self.batch_size]]
            try:
                out += self._run(chunk)
            except RuntimeError:
                for one in chunk:    # a bad frame fails the whole batch: retry one by one
                    try:
                        out += self._run([one])
                    except RuntimeError:
                        out.append(None)
        return out

    def _run(self, chunk: list[np.ndarray]) -> list:
        self.pipe.feed_input("frames", chunk)
        (res,) = self.pipe.run()
        res = res.as_cpu() if self.device == "cpu" else res
        outs = []
        for k in range(len(chunk)):
            t = res[k]
            if self.device == "cpu":
                outs.append(np.array(t)[..., 0])
            else:
                import torch
                outs.append(torch.from_dlpack(t)[..., 0])
        return outs


def make_decoder(name: str, device: str = "cuda", batch_size: int = 32):
    """A batched GPU decoder with its `rules` (the self-tested routing of `DecodeRules`)."""
    if name == "nvimgcodec":
        dec = NvImageCodecDecoder(device)
    elif name == "dali":
        dec = DaliDecoder(device, batch_size)
    else:
        raise RsnaError(f"unknown GPU backend {name!r}; choose {', '.join(GPU_BACKENDS)}")
    dec.rules = DecodeRules(dec, name)
    return dec


def decode_batch(headers, backend: str, device: str = "cuda", decoder=None) -> list:
    """Stored values (numpy) for each header's file (first frame); DecodeError for a file the
    GPU decoder does not take or fails on (use the CPU path for it)."""
    from rsna_utils.dicom_io import check_header
    from rsna_utils.frames import check_codestream, first_frame
    dec = decoder or make_decoder(backend, device)
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


# ----------------------------------------------------------------------------------------
# The whole preprocessing step on the GPU
# ----------------------------------------------------------------------------------------

@dataclass
class _Pending:
    item: object
    header: object
    precision: int = 16


def gpu_preprocess_tensor(x, h, cfg, device):
    """Stored-value tensor (H, W) on the GPU -> output image (numpy) and meta; same rules and
    order as `preprocess.preprocess_image`: LUT windowing, ROI on a subsample, crop, area
    resize, LUT, flip."""
    import torch
    import torch.nn.functional as F

    from rsna_utils import roi
    from rsna_utils.preprocess import PreprocessError
    from rsna_utils.voi import build_lut, select_window
    rows, cols = x.shape
    k = int(np.ceil(max(rows, cols) / cfg.roi_max_side))
    small = x[::k, ::k].contiguous().cpu().numpy()
    if small.dtype != np.uint16 and not h.signed:
        small = small.astype(np.uint16)
    if small.min() == small.max() and int(x.min()) == int(x.max()):
        raise PreprocessError(f"{h.path}: every pixel is {int(x.flatten()[0])}; an empty image has no breast")
    window = select_window(h, cfg.window_index, cfg.prefer_lut, small)
    lut, off = build_lut(h, window, cfg.bits)
    lut8 = lut if cfg.bits == 8 else (lut >> 8).astype(np.uint8)
    small8 = np.take(lut8, small.astype(np.int32) + off)
    mask = None
    if cfg.crop:
        mask, box_small = roi.find_breast(small8)
        if box_small is None:
            raise PreprocessError(f"{h.path}: no breast region found after windowing ({window.describe()})")
        box = roi.add_margin(box_small.scaled(rows / small.shape[0], cols / small.shape[1], rows, cols),
                             cfg.margin, rows, cols)
    else:
        box = roi.Box(0, 0, rows, cols)
    lut_t = torch.as_tensor(lut.astype(np.int32), device=device)
    crop = x[box.y0:box.y1, box.x0:box.x1]
    if cfg.window_first:   # as the CPU path: window at full resolution, then resize
        crop = lut_t[(crop.to(torch.int64) + off).clamp_(0, len(lut) - 1)]
    crop = crop.to(torch.float32)[None, None]
    nh, nw = roi.fit_shape(crop.shape[2], crop.shape[3], cfg.size, cfg.resize_mode)
    r = F.interpolate(crop, size=(nh, nw), mode="area")[0, 0]
    if cfg.window_first:
        out = torch.round(r).to(torch.int32)
    else:
        out = lut_t[(torch.round(r).to(torch.int64) + off).clamp_(0, len(lut) - 1)]
    flipped = roi.needs_flip(cfg.flip, mask if mask is not None else small8 > 0, h.laterality)
    if flipped:
        out = torch.flip(out, dims=[1])
    if (nh, nw) != tuple(cfg.size):   # background after windowing and flipping (as the CPU)
        out = torch.nn.functional.pad(out, (0, cfg.size[1] - nw, 0, cfg.size[0] - nh))
    img = out.cpu().numpy().astype(np.uint8 if cfg.bits == 8 else np.uint16)
    meta = dict(rows=rows, columns=cols, transfer_syntax=h.transfer_syntax, photometric=h.photometric,
                crop_y0=box.y0, crop_x0=box.x0, crop_y1=box.y1, crop_x1=box.x1,
                flipped=bool(flipped), window=window.describe(), window_note=window.note)
    return img, meta


def load_frame(path: str, max_pixels: int | None = None):
    """CPU side of a GPU decode (run in threads): (header, frame or None, codestream, error).
    The same header checks as the CPU path run first. frame None without an error: a transfer
    syntax the GPU decoders do not take (CPU path)."""
    from rsna_utils.dicom_io import DEFAULT_MAX_PIXELS, check_header, read_header
    from rsna_utils.frames import check_codestream, first_frame
    if not os.path.exists(path):
        return None, None, None, f"{path}: file not found (listed in the CSV)"
    try:
        h = read_header(path)
        check_header(h, max_pixels or DEFAULT_MAX_PIXELS)
        if h.transfer_syntax not in GPU_SYNTAXES:
            return h, None, None, None
        cs = check_codestream(path, h.rows, h.columns, ds=h.dataset, transfer_syntax=h.transfer_syntax)
        return h, first_frame(path, h.dataset), cs, None
    except RsnaError as e:
        return None, None, None, str(e)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # damaged files raise many types in pydicom
        return None, None, None, f"{path}: unhandled exception {type(e).__name__}: {e}"


def _load_frame_light(path: str, max_pixels: int | None = None):
    """`load_frame` in a worker process: the header travels back without its pydicom dataset."""
    h, frame, cs, err = load_frame(path, max_pixels)
    if h is not None:
        h.dataset = None
    return h, frame, cs, err


def load_frames(paths: list[str], cfg, pool):
    """Start reading a batch's frames in `pool`; the results are waited for by
    `preprocess_paths`, so the next batch is read while the GPU decodes this one. With a
    process pool the header parse and frame cut run outside the GIL: on an H200 with 16 cores,
    reading in 14 threads was the bottleneck of the whole GPU pipeline (BENCHMARKS.md)."""
    from concurrent.futures import ProcessPoolExecutor
    fn = _load_frame_light if isinstance(pool, ProcessPoolExecutor) else load_frame
    return [pool.submit(fn, p, cfg.max_pixels) for p in paths]


def frame_loader(workers: int):
    """The pool that reads frames: `workers` processes (forkserver: the parent holds CUDA
    and threads), or threads when workers is 0."""
    if workers <= 0:
        return ThreadPoolExecutor(8)
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from rsna_utils.preprocess import _start_method
    return ProcessPoolExecutor(workers, mp_context=mp.get_context(_start_method()))


def default_load_workers(device: str) -> int:
    """Processes for reading frames: all cores but two on a GPU run, none (threads) on the CPU."""
    return max(2, min(14, (os.cpu_count() or 2) - 2)) if device == "cuda" else 0


def preprocess_paths(paths: list[str], cfg, decoder, backend: str, device, pool: ThreadPoolExecutor,
                     loading=None):
    """One batch through the GPU pipeline, in order: (image, meta, error) per path. Files the
    GPU decoder does not take, fails its self-test for, or rejects go through the CPU pipeline
    (meta["backend"] says "cpu-fallback:...", meta["gpu_route"] why); errors are clean
    RsnaError messages. `loading`: futures from `load_frames` started earlier."""
    import torch

    from rsna_utils.preprocess import preprocess_image
    from concurrent.futures.process import BrokenProcessPool
    try:
        loaded = [f.result() for f in (loading or load_frames(paths, cfg, pool))]
    except BrokenProcessPool:
        raise RsnaError("the frame-reading worker processes could not start or died. From a Python "
                        "script, put the call under `if __name__ == \"__main__\":` (workers start "
                        "with forkserver), or pass load_workers=0 (threads)") from None
    results: list = [None] * len(paths)
    why = {}
    for i, (h, f, cs, e) in enumerate(loaded):
        if e:
            results[i] = (None, None, e)
        elif f is None:
            why[i] = decoder.rules.route(h, None)
        else:
            r = decoder.rules.route(h, cs)
            if r:
                why[i] = r
    on_gpu = [i for i, (h, f, cs, e) in enumerate(loaded) if f is not None and i not in why]
    t0 = time.perf_counter()
    decoded = decoder.decode([loaded[i][1] for i in on_gpu]) if on_gpu else []
    per = (time.perf_counter() - t0) * 1e3 / max(1, len(on_gpu))
    for i, x in zip(on_gpu, decoded):
        h, _, cs, _ = loaded[i]
        if x is None:
            why[i] = f"{backend} could not decode the frame"
            continue
        t1 = time.perf_counter()
        try:
            if not isinstance(x, torch.Tensor):
                x = torch.from_numpy(np.ascontiguousarray(x).astype(np.int32))
            x = decoder.rules.fix(x, h, cs)
            if tuple(x.shape) != (h.rows, h.columns):
                raise DecodeError(f"{h.path}: decoded shape {tuple(x.shape)} differs from "
                                  f"Rows x Columns {h.rows} x {h.columns}")
            img, meta = gpu_preprocess_tensor(x.to(device), h, cfg, device)
            meta.update(backend=backend, gpu_route="gpu", decode_ms=round(per, 2),
                        total_ms=round(per + (time.perf_counter() - t1) * 1e3, 2))
            results[i] = (img, meta, None)
        except DecodeError as e:
            why[i] = str(e)
        except RsnaError as e:
            results[i] = (None, None, str(e))
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:   # a torch / CUDA error (e.g. out of memory) costs this file's GPU pass only
            why[i] = f"GPU step failed ({type(e).__name__}: {str(e)[:120]})"

    def cpu_one(i):
        try:
            img, meta = preprocess_image(paths[i], cfg, "auto")
            meta["backend"] = f"cpu-fallback:{meta['backend']}"
            meta["gpu_route"] = why[i]
            return i, (img, meta, None)
        except RsnaError as e:
            return i, (None, None, str(e))
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:
            return i, (None, None, f"{paths[i]}: unhandled exception {type(e).__name__}: {e}")
    for i, r in pool.map(cpu_one, sorted(why)):
        results[i] = r
    return results, len(why)


class GpuPreprocessor:
    """The GPU version of `Preprocessor.run`: same inputs, outputs (PNGs, meta.csv,
    failures.csv), resume and shards. `device="cpu"` runs the same code with the decoder's CPU
    backend and torch on the CPU (for tests on machines without a GPU)."""

    def __init__(self, cfg=None, backend: str = "nvimgcodec", batch_size: int = 32,
                 png_threads: int = 8, device: str = "cuda", progress: bool = True, decoder=None,
                 load_workers: int | None = None):
        from rsna_utils.preprocess import PreprocessConfig
        self.cfg = cfg or PreprocessConfig()
        self.backend, self.batch_size, self.device = backend, batch_size, device
        self.png_threads, self.progress = png_threads, progress
        self.load_workers = default_load_workers(device) if load_workers is None else load_workers
        # any object with decode(frames) -> list of arrays / tensors / None (tests inject one)
        self.decoder = decoder

    def run(self, images, csv_path, out, shard=None):
        import torch
        from tqdm.auto import tqdm

        from rsna_utils.preprocess import open_run, write_png
        t0 = time.perf_counter()
        todo, s, meta_log, fail_log = open_run(out, self.cfg, images, csv_path, shard)
        dev = torch.device("cuda" if self.device == "cuda" else "cpu")
        decoder = self.decoder or make_decoder(self.backend, self.device, self.batch_size)
        if not hasattr(decoder, "rules"):
            decoder.rules = DecodeRules(decoder, self.backend)
        writer, pool = ThreadPoolExecutor(self.png_threads), ThreadPoolExecutor(self.png_threads)
        loader = frame_loader(self.load_workers) if todo else None
        bar = tqdm(total=len(todo), desc=f"preprocess ({self.backend})", unit="img",
                   disable=not self.progress, file=sys.stderr, dynamic_ncols=True)
        writes, s.fallbacks = [], 0
        try:
            batches = [todo[b:b + self.batch_size] for b in range(0, len(todo), self.batch_size)]
            ready = [[it for it in batch if not it.problem] for batch in batches]
            loading = load_frames([it.path for it in ready[0]], self.cfg, loader) if batches else []
            for k, batch in enumerate(batches):
                for it in batch:
                    if it.problem:
                        self._fail(s, fail_log, it, it.problem)
                this = loading
                if k + 1 < len(batches):   # read the next batch while this one is on the GPU
                    loading = load_frames([it.path for it in ready[k + 1]], self.cfg, loader)
                results, n_fb = preprocess_paths([it.path for it in ready[k]], self.cfg, decoder,
                                                 self.backend, dev, pool, this)
                s.fallbacks += n_fb
                for it, (img, meta, err) in zip(ready[k], results):
                    if err:
                        self._fail(s, fail_log, it, err)
                    else:   # PNG encoding in threads: the GPU goes on with the next batch
                        writes.append(writer.submit(_write_then_log, it, img, meta, meta_log, write_png))
                        s.processed += 1
                bar.update(len(batch))
            for w in writes:
                w.result()
        finally:
            writer.shutdown(wait=True)
            pool.shutdown(wait=True)
            if loader is not None:
                loader.shutdown(wait=True, cancel_futures=True)
            bar.close()
            meta_log.close()
            fail_log.close()
        s.seconds = time.perf_counter() - t0
        return s

    @staticmethod
    def _fail(s, fail_log, item, reason) -> None:
        row = dict(image_id=item.image_id, patient_id=item.patient_id, path=item.path,
                   reason=str(reason).replace("\n", " "))
        fail_log.write(row)
        s.failures.append(row)
        s.failed += 1


def _write_then_log(item, img, meta, meta_log, write_png):
    write_png(item.png, img)
    with _LOG_LOCK:
        meta_log.write(dict(meta, image_id=item.image_id, patient_id=item.patient_id,
                            png=os.path.basename(item.png)))
