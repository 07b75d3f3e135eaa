"""Fuzzing the reader and the preprocessor: thousands of mutated files (flipped bytes in the
header and the codestream, truncations, huge Rows/Columns, lying transfer syntaxes, fragment
lengths past the end). Each must end as a PNG or a clean failures.csv row; no hang, no crash of
the run, no unexpected exception, no good file lost. Count: $RSNA_FUZZ_N (default 2000); seed:
$RSNA_FUZZ_SEED (default 20261127; "random" for a new one, printed so it can be replayed)."""
import os
import random
import shutil

import pandas as pd
from conftest import REGRESSIONS, TESTDATA
from fuzz import mutate, write_mutants

from rsna_utils.image.preprocess import PreprocessConfig, Preprocessor

N = int(os.environ.get("RSNA_FUZZ_N", "2000"))
# A fixed default keeps CI reproducible; RSNA_FUZZ_SEED=random explores new inputs (the seed is
# printed, and any input that breaks the run is copied to tests/regressions/).
_seed = os.environ.get("RSNA_FUZZ_SEED", "20261127")
SEED = random.SystemRandom().randrange(2**31) if _seed == "random" else int(_seed)


def _seed_files(synth_small):
    import pydicom
    by_ts = {}
    for p in sorted((synth_small / "train_images").glob("*/*.dcm")):
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        by_ts.setdefault(str(ds.file_meta.TransferSyntaxUID), []).append(p)
    seeds = [v[i] for v in by_ts.values() for i in range(min(2, len(v)))]
    if TESTDATA is not None:
        seeds += [TESTDATA / "nema_wg04_cr" / f for f in ("RG2_J2KR.dcm", "RG2_JPLL.dcm", "RG3_RLE.dcm")]
    return seeds


def check_run(out, listed: pd.DataFrame) -> list[str]:
    """Problems found: files neither written nor failed, unexpected exceptions, lost good ones."""
    meta = pd.read_csv(out / "meta.csv", dtype=str)
    fails = pd.read_csv(out / "failures.csv", dtype=str)
    problems = []
    accounted = set(meta.image_id) | set(fails.image_id)
    lost = set(listed.image_id) - accounted
    if lost:
        problems.append(f"{len(lost)} files neither written nor failed, e.g. {sorted(lost)[:3]}")
    bad = fails[fails.reason.str.contains("unhandled exception")]
    for r in bad.itertuples():
        problems.append(f"unexpected exception on {r.image_id}: {r.reason[:200]}")
    good = listed[listed.note == "good"]
    missing_good = set(good.image_id) - set(meta.image_id)
    if missing_good:
        problems.append(f"good files lost: {sorted(missing_good)[:3]}")
    if len(meta) + len(fails) != len(set(meta.image_id) | set(fails.image_id)):
        problems.append("a file is both written and failed")
    return problems


def _build(tmp_path, synth_small, n, seed):
    images = tmp_path / "images"
    rows = write_mutants(_seed_files(synth_small), images, n, seed)
    for p in sorted((synth_small / "train_images").glob("*/*.dcm"))[:20]:   # untouched controls
        d = images / p.parent.name
        d.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, d / p.name)
        rows.append((p.parent.name, p.stem, "good"))
    listed = pd.DataFrame(rows, columns=["patient_id", "image_id", "note"])
    listed.to_csv(tmp_path / "list.csv", index=False)
    return images, listed


def test_fuzz_preprocessor(tmp_path, synth_small):
    print(f"fuzz: {N} mutants, RSNA_FUZZ_SEED={SEED}")
    images, listed = _build(tmp_path, synth_small, N, SEED)
    s = Preprocessor(PreprocessConfig(size=32), workers=2, progress=False, file_timeout=30).run(
        images, tmp_path / "list.csv", tmp_path / "out")
    problems = check_run(tmp_path / "out", listed)
    if problems:   # keep the inputs that broke it as regression cases
        os.makedirs(REGRESSIONS, exist_ok=True)
        fails = pd.read_csv(tmp_path / "out" / "failures.csv", dtype=str)
        for r in fails[fails.reason.str.contains("unhandled exception")].head(10).itertuples():
            shutil.copy(r.path, REGRESSIONS / f"fuzz_{SEED}_{r.image_id}.dcm")
    assert not problems, f"RSNA_FUZZ_SEED={SEED}: " + "; ".join(problems[:5])
    assert s.processed + s.failed == len(listed)


def test_regression_inputs_stay_handled(tmp_path):
    # the kept inputs are tracked: none found is a wrong path, never a pass over nothing
    files = sorted(p.name for p in REGRESSIONS.glob("*.dcm"))
    assert files, f"no regression inputs in {REGRESSIONS}"
    images = tmp_path / "images" / "1"
    images.mkdir(parents=True)
    rows = []
    for i, f in enumerate(files):
        shutil.copy(REGRESSIONS / f, images / f"{1000 + i}.dcm")
        rows.append(("1", str(1000 + i), "regression"))
    listed = pd.DataFrame(rows, columns=["patient_id", "image_id", "note"])
    listed.to_csv(tmp_path / "list.csv", index=False)
    Preprocessor(PreprocessConfig(size=32), workers=2, progress=False, file_timeout=30).run(
        tmp_path / "images", tmp_path / "list.csv", tmp_path / "out")
    assert not check_run(tmp_path / "out", listed)


def test_the_fuzz_check_catches_a_planted_bug(tmp_path, synth_small, monkeypatch):
    """A reader bug that raises IndexError on some inputs must make the check fail."""
    images, listed = _build(tmp_path, synth_small, 0, 1)     # the good controls only
    from rsna_utils.image import roi
    real = roi.find_breast

    calls = []

    def buggy(img8, *a, **k):
        calls.append(1)
        if len(calls) % 3 == 0:   # every third image
            raise IndexError("planted bug")
        return real(img8, *a, **k)
    monkeypatch.setattr(roi, "find_breast", buggy)
    Preprocessor(PreprocessConfig(size=32), workers=0, progress=False).run(   # in-process: patched
        images, tmp_path / "list.csv", tmp_path / "out")
    problems = check_run(tmp_path / "out", listed)
    assert any("unexpected exception" in p and "IndexError" in p for p in problems)


def test_mutations_replay_exactly(synth_small):
    src = next((synth_small / "train_images").glob("*/*.dcm")).read_bytes()
    assert mutate(src, 5, 17) == mutate(src, 5, 17)
    assert {mutate(src, 5, i)[1] for i in range(60)} >= {"truncate", "huge_size", "lying_syntax",
                                                         "fragment_overflow", "header_flip"}
