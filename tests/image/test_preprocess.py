import shutil
import subprocess
import sys

import cv2
import numpy as np
import pandas as pd
import pydicom
import pytest
from conftest import AbortOn, HangOn
from pydicom.encaps import encapsulate, generate_frames

from rsna_utils.core.errors import RsnaError
from rsna_utils.image.preprocess import PreprocessConfig, Preprocessor, parse_shard, preprocess_image
from rsna_utils.sources import synth


def _files_by_syntax(root):
    out = {}
    for p in sorted(root.glob("train_images/*/*.dcm")):
        ts = str(pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        out.setdefault(ts, []).append(p)
    return out


@pytest.fixture()
def bad_dataset(tmp_path, synth_small):
    """Good synthetic files plus one file per kind of bad input, and a CSV listing them all."""
    images = tmp_path / "images"
    shutil.copytree(synth_small / "train_images", images)
    train = pd.read_csv(synth_small / "train.csv", dtype=str)
    rows = [dict(patient_id=r.patient_id, image_id=r.image_id) for r in train.itertuples()]
    by_ts = _files_by_syntax(synth_small)
    j2k = by_ts[synth.JPEG2000_LOSSLESS][0]
    jpll = by_ts[synth.JPEG_LOSSLESS_SV1][0]
    bad = {}

    def add(name, writer):
        iid = str(900000 + len(bad))
        d = images / "99999"
        d.mkdir(exist_ok=True)
        writer(d / f"{iid}.dcm")
        rows.append(dict(patient_id="99999", image_id=iid))
        bad[name] = iid

    add("truncated", lambda p: p.write_bytes(j2k.read_bytes()[:3000]))
    add("not_dicom", lambda p: p.write_bytes(b"GIF89a" + bytes(range(256)) * 20))

    def no_pixels(p):
        ds = pydicom.dcmread(j2k)
        del ds.PixelData
        ds.save_as(p)
    add("no_pixel_data", no_pixels)

    def lying_syntax(p):
        ds = pydicom.dcmread(jpll)
        ds.file_meta.TransferSyntaxUID = synth.JPEG2000_LOSSLESS
        ds.save_as(p)
    add("lying_syntax", lying_syntax)

    def corrupt_codestream(p):
        ds = pydicom.dcmread(j2k)
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
        ds.PixelData = encapsulate([frame[:len(frame) // 3]])
        ds.save_as(p)
    add("corrupt_codestream", corrupt_codestream)

    def wrong_size(p):
        ds = pydicom.dcmread(jpll)
        ds.Rows = ds.Rows + 64
        ds.save_as(p)
    add("rows_disagree", wrong_size)

    def all_zero(p):
        ds = pydicom.dcmread(jpll)
        ds.decompress()
        ds.PixelData = np.zeros((ds.Rows, ds.Columns), np.uint16).tobytes()
        ds.save_as(p)
    add("all_zero", all_zero)

    def zero_width(p):
        ds = pydicom.dcmread(jpll)
        ds.WindowWidth = 0
        ds.WindowCenter = 2000
        ds.save_as(p)
    add("window_width_0", zero_width)

    rows.append(dict(patient_id="99999", image_id="123456789"))        # file missing
    bad["missing_file"] = "123456789"
    rows.append(dict(patient_id="99999", image_id=""))                 # NaN field
    rows.append(dict(patient_id="abc", image_id="77"))                 # not a number
    csv = tmp_path / "list.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    return images, csv, bad, len(train)


def test_bad_input_each_one_row_and_everything_else_written(tmp_path, bad_dataset):
    images, csv, bad, n_good = bad_dataset
    out = tmp_path / "out"
    s = Preprocessor(PreprocessConfig(size=64), workers=2, progress=False).run(images, csv, out)
    fails = pd.read_csv(out / "failures.csv", dtype=str)
    meta = pd.read_csv(out / "meta.csv", dtype=str)
    reasons = dict(zip(fails.image_id, fails.reason))
    expect = {
        "truncated": "the file is truncated", "not_dicom": "not a readable DICOM",
        "no_pixel_data": "no PixelData", "lying_syntax": "says JPEG 2000 but the frame is a JPEG",
        "corrupt_codestream": "likely corrupt", "rows_disagree": "codestream is",
        "all_zero": "every pixel is 0", "missing_file": "file not found",
    }
    for name, text in expect.items():
        assert bad[name] in reasons, name
        assert text in reasons[bad[name]], (name, reasons[bad[name]])
    assert any("line" in r and "not a number" in r for r in reasons.values())
    assert len(fails) == len(expect) + 2            # + the two bad CSV rows
    # every good image and the zero-width-window one were written, with a note on the latter
    assert len(meta) == n_good + 1 and s.processed == n_good + 1
    note = meta.loc[meta.image_id == bad["window_width_0"], "window_note"].iloc[0]
    assert "invalid window width 0" in note
    for png in meta.png:
        img = cv2.imread(str(out / png), cv2.IMREAD_UNCHANGED)
        assert img.shape == (64, 64) and img.dtype == np.uint8


def test_cli_exit_codes_and_summary(tmp_path, bad_dataset):
    images, csv, _, _ = bad_dataset
    r = subprocess.run([sys.executable, "-m", "rsna_utils", "preprocess", "--images", str(images),
                        "--csv", str(csv), "--out", str(tmp_path / "o"), "--size", "48",
                        "--workers", "2", "--quiet"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "failed (see failures.csv)" in r.stdout
    only_bad = tmp_path / "bad.csv"
    pd.read_csv(csv, dtype=str).query("patient_id == '99999' and image_id < '9000009'").head(3).to_csv(only_bad, index=False)
    r = subprocess.run([sys.executable, "-m", "rsna_utils", "preprocess", "--images", str(images),
                        "--csv", str(only_bad), "--out", str(tmp_path / "o2"), "--quiet"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "preprocessed 0 images" in r.stdout


def test_resume_skips_done_and_repairs_cut_meta(tmp_path, synth_small):
    images, csv = synth_small / "train_images", synth_small / "train.csv"
    out = tmp_path / "out"
    cfg = PreprocessConfig(size=64)
    first = Preprocessor(cfg, workers=2, progress=False).run(images, csv, out)
    before = {p.name: p.read_bytes() for p in out.glob("*.png")}
    # simulate a kill: three PNGs never written, the last meta line cut in half
    lost = set()
    for p in sorted(out.glob("*.png"))[:3]:
        p.unlink()
        lost.add(p.name)
    data = (out / "meta.csv").read_bytes()
    (out / "meta.csv").write_bytes(data[:-20])
    lost.add(pd.read_csv(out / "meta.csv", dtype=str).png.iloc[-1])
    again = Preprocessor(cfg, workers=2, progress=False).run(images, csv, out)
    assert again.processed == len(lost) and again.skipped == first.processed - len(lost)
    after = {p.name: p.read_bytes() for p in out.glob("*.png")}
    assert after == before
    assert not list(out.glob("*.tmp*"))
    meta = pd.read_csv(out / "meta.csv", dtype=str)
    assert set(meta.png) == set(before)


def test_parallel_equals_serial_and_shards_split(tmp_path, synth_small):
    images, csv = synth_small / "train_images", synth_small / "train.csv"
    cfg = PreprocessConfig(size=64)
    Preprocessor(cfg, workers=0, progress=False).run(images, csv, tmp_path / "a")
    Preprocessor(cfg, workers=2, progress=False).run(images, csv, tmp_path / "b")
    a = {p.name: p.read_bytes() for p in (tmp_path / "a").glob("*.png")}
    b = {p.name: p.read_bytes() for p in (tmp_path / "b").glob("*.png")}
    assert a == b and len(a) == len(pd.read_csv(csv))
    s0 = Preprocessor(cfg, workers=1, progress=False).run(images, csv, tmp_path / "s", "0/2")
    s1 = Preprocessor(cfg, workers=1, progress=False).run(images, csv, tmp_path / "s", "1/2")
    assert s0.processed and s1.processed and s0.processed + s1.processed == len(a)
    assert {p.name for p in (tmp_path / "s").glob("*.png")} == set(a)
    assert (tmp_path / "s" / "meta.0-of-2.csv").exists() and (tmp_path / "s" / "meta.1-of-2.csv").exists()
    for bad in ("2/2", "x", "1/0"):
        with pytest.raises(RsnaError, match="--shard"):
            parse_shard(bad)


def test_worker_crash_costs_one_file(tmp_path, synth_small):
    images, csv = synth_small / "train_images", synth_small / "train.csv"
    victim = sorted(images.glob("*/*.dcm"))[5]
    s = Preprocessor(PreprocessConfig(size=48), workers=2, progress=False,
                     test_hook=AbortOn(victim.name)).run(images, csv, tmp_path / "o")
    fails = pd.read_csv(tmp_path / "o" / "failures.csv", dtype=str)
    assert list(fails.image_id) == [victim.stem]
    assert "crashed the worker" in fails.reason.iloc[0]
    assert s.processed == len(pd.read_csv(csv)) - 1


def test_window_after_resize_close_to_window_first(synth_small):
    diffs = []
    for p in sorted((synth_small / "train_images").glob("*/*.dcm"))[:16]:
        a, _ = preprocess_image(p, PreprocessConfig(size=128))
        b, _ = preprocess_image(p, PreprocessConfig(size=128, window_first=True))
        diffs.append(np.abs(a.astype(int) - b).mean())
    assert max(diffs) < 1.0


def test_hanging_decoder_costs_one_file(tmp_path, synth_small):
    images, csv = synth_small / "train_images", synth_small / "train.csv"
    victim = sorted(images.glob("*/*.dcm"))[3]
    # 10 s: generous for a 48-px file on a loaded machine (at 3 s a busy CI box timed out an
    # innocent file too), short enough for the hang to cost little
    s = Preprocessor(PreprocessConfig(size=48), workers=2, progress=False, file_timeout=10,
                     test_hook=HangOn(victim.name)).run(images, csv, tmp_path / "o")
    fails = pd.read_csv(tmp_path / "o" / "failures.csv", dtype=str)
    assert list(fails.image_id) == [victim.stem]
    assert "took over 10 s" in fails.reason.iloc[0]
    assert s.processed == len(pd.read_csv(csv)) - 1


def test_script_without_main_guard_gets_a_clear_error(tmp_path, synth_small):
    script = tmp_path / "s.py"
    script.write_text(
        "from rsna_utils.image.preprocess import PreprocessConfig, Preprocessor\n"
        f"Preprocessor(PreprocessConfig(size=32), workers=2, progress=False).run("
        f"'{synth_small / 'train_images'}', '{synth_small / 'train.csv'}', '{tmp_path / 'o'}')\n")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "__main__" in r.stderr and "worker processes could not start" in r.stderr


def test_a_second_csv_into_the_same_folder_keeps_the_first_runs_failures(tmp_path, synth_small):
    """train.csv then test.csv into one PNG folder: the failures of the first run stay listed."""
    import shutil
    images = tmp_path / "images"
    shutil.copytree(synth_small / "train_images", images)
    df = pd.read_csv(synth_small / "train.csv")
    a, b = df.iloc[:6], df.iloc[6:12]
    a.to_csv(tmp_path / "a.csv", index=False)
    b.to_csv(tmp_path / "b.csv", index=False)
    bad = images / str(a.patient_id.iloc[0]) / f"{a.image_id.iloc[0]}.dcm"
    bad.write_bytes(bad.read_bytes()[:300])
    out = tmp_path / "png"
    Preprocessor(PreprocessConfig(size=32), workers=1, progress=False).run(images, tmp_path / "a.csv", out)
    Preprocessor(PreprocessConfig(size=32), workers=1, progress=False).run(images, tmp_path / "b.csv", out)
    f = pd.read_csv(out / "failures.csv")
    assert f.image_id.astype(str).tolist() == [str(a.image_id.iloc[0])]


def test_a_missing_images_folder_stops_before_anything_is_written(tmp_path, synth_small):
    """A valid CSV and a mistyped images folder used to run through every row, then report each
    image as failed; now one line names the folder and nothing is written."""
    from rsna_utils.app.cli import main
    out = tmp_path / "png"
    with pytest.raises(RsnaError, match=r"train_imgs: images folder not found"):
        Preprocessor(PreprocessConfig(size=32), workers=0, progress=False).run(
            tmp_path / "train_imgs", synth_small / "train.csv", out)
    assert not out.exists()
    assert main(["preprocess", "--images", str(tmp_path / "train_imgs"), "--csv",
                 str(synth_small / "train.csv"), "--out", str(out), "--quiet"]) == 2
    assert not out.exists()


def test_summary_points_at_failures_csv_only_when_something_failed():
    from rsna_utils.image.preprocess import RunSummary
    assert "failures.csv" not in RunSummary(processed=3, seconds=1.0, out="o").line()
    assert "2 failed (see failures.csv)" in RunSummary(processed=3, failed=2, seconds=1.0).line()
