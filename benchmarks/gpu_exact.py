"""GPU decode correctness before speed (issue 13), on a GPU machine:

1. every file under the given folders is decoded on the CPU (imagecodecs / dicomsdl / pydicom,
   all cores) and on the GPU by nvImageCodec and DALI, first raw (what the decoder returns),
   then through the routing rule of `rsna_utils.image.gpu_batch.DecodeRules` (self-test probes); the rule
   must leave no mismatch: a file either decodes bit-exactly on the GPU or goes to the CPU;
2. a corrupt codestream in each of 10 batches: the batch's other files still decode, and the
   GPU memory in use stays flat across the batches.

    python benchmarks/gpu_exact.py DIR [DIR ...] [--json OUT.json]

Prints a table per (backend, transfer syntax, container, bits, photometric) and the totals.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))     # the fuzzer (test helpers) lives with the tests


def cpu_reference(path: str):
    from rsna_utils.dicom.reader import read_dicom
    try:
        return path, read_dicom(path).pixels, None
    except Exception as e:
        return path, None, f"{type(e).__name__}: {e}"


def describe(path: str):
    from rsna_utils.dicom.frames import check_codestream
    from rsna_utils.dicom.header import read_header, transfer_syntax_name
    from rsna_utils.image.gpu import GPU_SYNTAXES
    h = read_header(path)
    cs = None
    if h.transfer_syntax in GPU_SYNTAXES:
        try:
            cs = check_codestream(path, h.rows, h.columns, ds=h.dataset, transfer_syntax=h.transfer_syntax)
        except Exception:
            cs = None
    kind = cs.kind if cs else "-"
    prec = cs.precision if cs else h.bits_stored
    size = "L" if h.rows * h.columns > 8e6 else "M" if h.rows * h.columns > 3e6 else "S"
    group = (transfer_syntax_name(h.transfer_syntax)[:28], kind, prec, h.photometric[-1], size)
    return h, cs, group


def exactness(files: list[str], backends: list[str], batch: int = 16) -> tuple[list, dict]:
    import torch

    from rsna_utils.dicom.decoders import gpu_batch
    from rsna_utils.dicom.frames import first_frame
    with ProcessPoolExecutor(os.cpu_count()) as ex:
        refs = {p: (a, e) for p, a, e in ex.map(cpu_reference, files, chunksize=2)}
    info = {p: describe(p) for p in files}
    rows, totals = [], {}
    for backend in backends:
        if not gpu_batch.package_available(backend):
            print(f"{backend}: not installed, skipped", flush=True)
            continue
        dec = gpu_batch.make_decoder(backend, "cuda", batch)
        stats = defaultdict(lambda: defaultdict(int))
        t0 = time.perf_counter()
        todo = [p for p in files if info[p][1] is not None and refs[p][0] is not None]
        for p in files:
            if p not in todo:
                stats[info[p][2]]["cpu only (syntax or CPU error)"] += 1
        for i in range(0, len(todo), batch):
            chunk = todo[i:i + batch]
            frames = [first_frame(p) for p in chunk]
            raw = dec.decode(frames)
            for p, x in zip(chunk, raw):
                h, cs, g = info[p]
                ref = refs[p][0]
                st = stats[g]
                st["files"] += 1
                rawmode = gpu_batch.compare_decodes(x, ref, cs.precision)
                st[f"raw {rawmode.split(':')[0]}"] += 1
                route = dec.rules.route(h, cs)
                if route:
                    st["routed to CPU"] += 1
                    continue
                y = dec.rules.fix(x, h, cs)
                ok = gpu_batch.compare_decodes(y, ref, cs.precision) == "exact"
                st["GPU exact" if ok else "GPU MISMATCH"] += 1
                if not ok:
                    print(f"  MISMATCH {backend} {p}: {gpu_batch.compare_decodes(y, ref, cs.precision)}", flush=True)
            del raw
        torch.cuda.synchronize()
        print(f"{backend}: {len(todo)} files in {time.perf_counter() - t0:.1f} s; "
              f"self-test modes: {dict(dec.rules.modes)}", flush=True)
        for g, st in sorted(stats.items()):
            rows.append((backend, *g, dict(st)))
        totals[backend] = {k: sum(st.get(k, 0) for st in stats.values())
                           for k in ("files", "GPU exact", "GPU MISMATCH", "routed to CPU", "raw exact",
                                     "raw scaled", "raw wrong")}
        totals[backend]["modes"] = {f"{k[0][-4:]} {k[1]} {k[2]}": v for k, v in dec.rules.modes.items()}
    return rows, totals


def corrupt_batches(files: list[str], backend: str, batches: int = 10, batch: int = 16) -> dict:
    """`batches` batches of `batch` frames, each with one corrupt codestream: count what
    decodes, and the GPU memory in use (device-wide, so nvImageCodec's own pools count) after
    each batch."""
    import gc

    import torch
    from fuzz import corrupt_codestream

    from rsna_utils.dicom.decoders import gpu_batch
    from rsna_utils.dicom.frames import first_frame
    from rsna_utils.dicom.header import read_header
    from rsna_utils.image.gpu import GPU_SYNTAXES
    good = [p for p in files if read_header(p).transfer_syntax in GPU_SYNTAXES]
    dec = gpu_batch.make_decoder(backend, "cuda", batch)
    used, decoded, bad_ok = [], 0, 0
    with tempfile.TemporaryDirectory() as d:
        for b in range(batches):
            chunk = [good[(b * batch + k) % len(good)] for k in range(batch - 1)]
            src = good[b % len(good)]
            bad = Path(d) / f"bad{b}.dcm"
            bad.write_bytes(corrupt_codestream(Path(src).read_bytes(), seed=b))
            frames = [first_frame(p) for p in chunk]
            frames.insert(b % batch, first_frame(str(bad)))
            out = dec.decode(frames)
            decoded += sum(x is not None for k, x in enumerate(out) if k != b % batch)
            bad_ok += out[b % batch] is None
            del out
            gc.collect()
            torch.cuda.synchronize()
            free, total = torch.cuda.mem_get_info()
            used.append((total - free) / 2**20)
    return dict(backend=backend, batches=batches, good_decoded=decoded,
                good_expected=batches * (batch - 1), corrupt_rejected=bad_ok,
                used_mib=[round(u) for u in used],
                growth_after_first_mib=round(max(used[1:]) - used[1], 1) if len(used) > 1 else 0.0)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--backends", default="nvimgcodec,dali")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    files = sorted(str(p) for d in args.dirs for p in Path(d).rglob("*.dcm"))
    print(f"{len(files)} DICOM files under {', '.join(args.dirs)}", flush=True)
    backends = args.backends.split(",")
    rows, totals = exactness(files, backends)
    out = dict(totals=totals, groups=[list(r[:-1]) + [r[-1]] for r in rows], corrupt=[])
    from rsna_utils.dicom.decoders import gpu_batch
    for b in backends:
        if gpu_batch.package_available(b):
            try:
                out["corrupt"].append(corrupt_batches(files, b))
            except Exception as e:
                out["corrupt"].append(dict(backend=b, error=f"{type(e).__name__}: {e}"))
    print("\n| backend | syntax | container | bits | MONO | size | files | raw decode | routed to CPU | GPU exact | GPU mismatch |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        st = r[-1]
        raw = ", ".join(f"{k[4:]} {v}" for k, v in st.items() if k.startswith("raw"))
        print(f"| {' | '.join(str(x) for x in r[:-1])} | {st.get('files', 0)} | {raw or '-'} | "
              f"{st.get('routed to CPU', 0) + st.get('cpu only (syntax or CPU error)', 0)} | "
              f"{st.get('GPU exact', 0)} | {st.get('GPU MISMATCH', 0)} |")
    print("\ntotals:", json.dumps(totals))
    for c in out["corrupt"]:
        print("corrupt frame in each batch:", json.dumps(c))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    return 1 if any(t.get("GPU MISMATCH") for t in totals.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
