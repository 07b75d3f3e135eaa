"""GPU decoding (nvImageCodec, DALI) and the whole preprocessing step on the GPU.

The compressed frame is cut out of PixelData on the CPU (`rsna_utils.dicom.frames`), decoded in
batches by nvImageCodec or DALI into uint16 tensors, then windowed (the same lookup table as the
CPU path), cropped and area-resized in torch. The breast box is found on a small subsample copied
to the CPU (the same `roi.find_breast` as the CPU path). PNGs are written by a thread pool so the
GPU does not wait. Any file a GPU decoder rejects goes through the CPU path and is counted.

Nothing here imports CUDA packages at module import: `import rsna_utils.image.gpu` works anywhere.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from rsna_utils.core.errors import DecodeError, DiskFullError, RsnaError
from rsna_utils.dicom.decoders.gpu_batch import GPU_SYNTAXES, DecodeRules, make_decoder
from rsna_utils.dicom.decoders.registry import DecoderSet

# ----------------------------------------------------------------------------------------
# The whole preprocessing step on the GPU
# ----------------------------------------------------------------------------------------

def gpu_preprocess_tensor(x, h, cfg, device):
    """Stored-value tensor (H, W) on the GPU -> output image (numpy) and meta: the plan of
    `rsna_utils.image.plan` (made on the CPU from the header and a subsample copied back, as
    the CPU path makes it) applied by its torch kernel."""
    from rsna_utils.image.plan import apply_torch, make_plan, subsample_step
    k = subsample_step(tuple(x.shape), cfg.roi_max_side)
    small = x[::k, ::k].contiguous().cpu().numpy()
    if small.dtype != np.uint16 and not h.signed:
        small = small.astype(np.uint16)
    plan = make_plan(h, small, cfg, tuple(x.shape), lambda: _is_flat(x))
    return apply_torch(x, plan), plan.meta(h)


def _is_flat(x) -> bool:
    """Every value equal (torch has no min/max for uint16, the GPU decoders' dtype)."""
    import torch
    lo, hi = torch.aminmax(x.to(torch.int32))
    return int(lo) == int(hi)


def load_frame(path: str, max_pixels: int | None = None):
    """CPU side of a GPU decode (run in threads): (header, frame or None, codestream, error).
    The same header checks as the CPU path run first. frame None without an error: a transfer
    syntax the GPU decoders do not take (CPU path)."""
    from rsna_utils.dicom.frames import check_codestream, first_frame
    from rsna_utils.dicom.header import DEFAULT_MAX_PIXELS, check_header, read_header
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

    from rsna_utils.core.warn import worker_warnings
    from rsna_utils.image.workers import _start_method
    return ProcessPoolExecutor(workers, mp_context=mp.get_context(_start_method()),
                               initializer=worker_warnings, initargs=("preprocess",))


def gpu_batches(path_batches: list[list[str]], cfg, decoder, backend: str, device,
                load_workers: int, threads: int = 8, decoders=None):
    """Each batch of paths through the GPU pipeline, in order: yields (results, fallbacks) of
    `preprocess_paths`, while the frames of the next batch are read by `load_workers` processes
    (`frame_loader`). The one prefetch loop: the GPU preprocessor and GPU inference use it.
    `decoders`: the run's `DecoderSet`, for the CPU fallback."""
    loader = frame_loader(load_workers) if path_batches else None
    pool = ThreadPoolExecutor(threads)
    try:
        loading = load_frames(path_batches[0], cfg, loader) if path_batches else []
        for k, paths in enumerate(path_batches):
            this = loading
            if k + 1 < len(path_batches):    # read the next batch while this one is on the GPU
                loading = load_frames(path_batches[k + 1], cfg, loader)
            yield preprocess_paths(paths, cfg, decoder, backend, device, pool, this, decoders)
    finally:
        pool.shutdown(wait=True)
        if loader is not None:
            loader.shutdown(wait=True, cancel_futures=True)


def default_load_workers(device: str) -> int:
    """Processes for reading frames: all cores but two on a GPU run, none (threads) on the CPU."""
    return max(2, min(14, (os.cpu_count() or 2) - 2)) if device == "cuda" else 0


def preprocess_paths(paths: list[str], cfg, decoder, backend: str, device, pool: ThreadPoolExecutor,
                     loading=None, decoders=None):
    """One batch through the GPU pipeline, in order: (image, meta, error) per path. Files the
    GPU decoder does not take, fails its self-test for, or rejects go through the CPU pipeline
    (meta["backend"] says "cpu-fallback:...", meta["gpu_route"] why); errors are clean
    RsnaError messages. `loading`: futures from `load_frames` started earlier. Phases: wait
    for the frames, route each file, decode and preprocess on the GPU, the CPU for the rest."""
    loaded = _frames(loading or load_frames(paths, cfg, pool))
    results: list = [None] * len(paths)
    why: dict[int, str] = {}
    for i, (h, f, cs, e) in enumerate(loaded):
        if e:
            results[i] = (None, None, e)
        else:
            r = decoder.rules.route(h, cs if f is not None else None)
            if r or f is None:
                why[i] = r
    on_gpu = [i for i, (h, f, cs, e) in enumerate(loaded) if f is not None and i not in why]
    _on_the_gpu(on_gpu, loaded, cfg, decoder, backend, device, results, why)
    for i, r in pool.map(lambda i: (i, _on_the_cpu(paths[i], cfg, why[i], decoders)), sorted(why)):
        results[i] = r
    return results, len(why)


def _frames(futures) -> list:
    from concurrent.futures.process import BrokenProcessPool
    try:
        return [f.result() for f in futures]
    except BrokenProcessPool:
        raise RsnaError("the frame-reading worker processes could not start or died. From a Python "
                        "script, put the call under `if __name__ == \"__main__\":` (workers start "
                        "with forkserver), or pass load_workers=0 (threads)") from None


def _on_the_gpu(on_gpu: list[int], loaded: list, cfg, decoder, backend: str, device,
                results: list, why: dict) -> None:
    """Decode the frames `on_gpu` in one batch and preprocess each with the torch kernel; a file
    that fails here gets its reason in `why` (the CPU path takes it), or its error in `results`."""
    import torch
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


def _on_the_cpu(path: str, cfg, reason: str, decoders=None) -> tuple:
    """(image, meta, error) of one file through the CPU pipeline, with why it left the GPU."""
    from rsna_utils.image.convert import preprocess_image
    try:
        img, meta = preprocess_image(path, cfg, "auto", decoders=decoders)
        meta["backend"] = f"cpu-fallback:{meta['backend']}"
        meta["gpu_route"] = reason
        return img, meta, None
    except RsnaError as e:
        return None, None, str(e)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:
        return None, None, f"{path}: unhandled exception {type(e).__name__}: {e}"


class GpuPreprocessor:
    """The GPU version of `Preprocessor.run`: same inputs, outputs (PNGs, meta.csv,
    failures.csv), resume and shards. `device="cpu"` runs the same code with the decoder's CPU
    backend and torch on the CPU (for tests on machines without a GPU). `decoders`: the run's
    `DecoderSet` (default: found once per run), whose CPU decoders take the fallback files."""

    def __init__(self, cfg=None, backend: str = "nvimgcodec", batch_size: int = 32,
                 png_threads: int = 8, device: str = "cuda", progress: bool = True, decoder=None,
                 load_workers: int | None = None, decoders=None):
        from rsna_utils.image.convert import PreprocessConfig
        self.cfg = cfg or PreprocessConfig()
        self.backend, self.batch_size, self.device = backend, batch_size, device
        self.png_threads, self.progress = png_threads, progress
        self.load_workers = default_load_workers(device) if load_workers is None else load_workers
        # any object with decode(frames) -> list of arrays / tensors / None (tests inject one)
        self.decoder = decoder
        self.decoders = decoders

    def run(self, images, csv_path, out, shard=None):
        import torch

        from rsna_utils.image.convert import write_png
        from rsna_utils.image.folder_run import FolderRun
        with FolderRun(out, self.cfg, images, csv_path, shard, f"preprocess ({self.backend})",
                       self.progress) as run:
            todo, s = run.todo, run.summary
            decoders = self.decoders or DecoderSet.find()   # the CPU fallback's, found once
            dev = torch.device("cuda" if self.device == "cuda" else "cpu")
            decoder = self.decoder or make_decoder(self.backend, self.device, self.batch_size)
            if not hasattr(decoder, "rules"):
                decoder.rules = DecodeRules(decoder, self.backend)
            writer = ThreadPoolExecutor(self.png_threads)
            writes, s.fallbacks = [], 0
            batches = [todo[b:b + self.batch_size] for b in range(0, len(todo), self.batch_size)]
            ready = [[it for it in batch if not it.problem] for batch in batches]
            stream = gpu_batches([[it.path for it in r] for r in ready], self.cfg, decoder,
                                 self.backend, dev, self.load_workers, self.png_threads,
                                 decoders)
            try:
                for k, batch in enumerate(batches):
                    if run.stopped:         # the disk is full: every later PNG would fail too
                        raise run.stopped
                    for it in batch:
                        if it.problem:
                            run.fail(it, it.problem)
                    results, n_fb = next(stream)
                    s.fallbacks += n_fb
                    for it, (img, meta, err) in zip(ready[k], results):
                        if err:
                            run.fail(it, err)
                        else:   # PNG encoding in threads: the GPU goes on with the next batch
                            writes.append(writer.submit(_write_then_log, it, img, meta, run,
                                                        write_png))
                    run.advance(len(batch))
                for w in writes:
                    w.result()
                if run.stopped:
                    raise run.stopped
            finally:
                writer.shutdown(wait=True, cancel_futures=True)   # all waited for unless raising
                stream.close()
        return run.summary


def _write_then_log(item, img, meta, run, write_png):
    if run.stopped:                        # the disk is full: the queued writes are skipped
        return
    try:
        try:
            write_png(item.png, img)
        except DiskFullError:
            raise
        except (OSError, RsnaError) as e:  # as the CPU path: this file fails, the run goes on
            run.fail(item, f"{item.path}: PNG not written ({type(e).__name__}: {e})")
            return
        run.ok(item, meta)
    except DiskFullError as e:             # not this file's fault: the run stops (as on the CPU)
        run.stopped = run.stopped or e
