import numpy as np
import pytest

from rsna_utils.image import roi
from rsna_utils.image.preprocess import PreprocessConfig, preprocess_image
from rsna_utils.sources import synth


def _intersects(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _contains(outer, inner) -> bool:
    return outer[0] <= inner[0] and outer[1] <= inner[1] and outer[2] >= inner[2] and outer[3] >= inner[3]


@pytest.mark.heavy
def test_crop_keeps_lesions_and_excludes_corner_markers(tmp_path):
    """Positive synthetic images: every planted lesion inside the crop; every burned-in marker
    that does not overlap the breast outside it; the crop close to the true breast box."""
    rows, _ = synth.plan_dataset(40, seed=5, positive_rate=0.6, test_patients=0)
    cfg = PreprocessConfig(size=256)
    checked_lesions = checked_markers = 0
    for index, r in enumerate(rows):
        if not r["cancer"] and index % 3:
            continue
        stored, objects, ds = synth.make_image(r, "small", 5, index)
        path = tmp_path / f"{index}.dcm"
        ds.save_as(path, enforce_file_format=True)
        _, meta = preprocess_image(path, cfg)
        crop = (meta["crop_y0"], meta["crop_x0"], meta["crop_y1"], meta["crop_x1"])
        for kind, *box in objects["lesions"]:
            if kind in ("mass", "calc"):
                assert _contains(crop, box), (index, kind, box, crop)
                checked_lesions += 1
        breast = objects["breast_box"]
        for kind, *box in objects["markers"]:
            if kind == "text" and not _intersects(box, breast):
                assert not _intersects(box, crop), (index, box, crop)
                checked_markers += 1
        inter = [max(crop[0], breast[0]), max(crop[1], breast[1]), min(crop[2], breast[2]),
                 min(crop[3], breast[3])]
        area = lambda b: max(0, b[2] - b[0]) * max(0, b[3] - b[1])
        iou = area(inter) / (area(crop) + area(breast) - area(inter))
        assert iou > 0.85, (index, crop, breast)
    assert checked_lesions >= 20 and checked_markers >= 30


def _phantom(chest_left=True, marker_touching=True):
    img = np.zeros((400, 320), np.uint8)
    yy, xx = np.mgrid[0:400, 0:320]
    xw = xx if chest_left else 319 - xx
    img[((yy - 200) / 150.0) ** 2 + (xw / 220.0) ** 2 <= 1] = 150
    if marker_touching:  # a label block touching the border, far from the breast
        x0 = 280 if chest_left else 0
        img[0:30, x0:x0 + 40] = 255
        img[370:400, x0:x0 + 40] = 255
    return img


@pytest.mark.parametrize("chest_left", [True, False])
def test_border_touching_labels_are_not_the_breast(chest_left):
    img = _phantom(chest_left)
    mask, box = roi.find_breast(img)
    assert box is not None
    assert 45 <= box.y0 <= 55 and 345 <= box.y1 <= 355
    if chest_left:
        assert box.x0 == 0 and 215 <= box.x1 <= 225
    else:
        assert box.x1 == 320 and 95 <= box.x0 <= 105
    assert roi.needs_flip("mass", mask, None) is (not chest_left)


def test_flip_modes():
    mask = roi.breast_mask(_phantom(chest_left=False))
    assert roi.needs_flip("none", mask, "R") is False
    assert roi.needs_flip("laterality", mask, "R") is True
    assert roi.needs_flip("laterality", mask, "L") is False
    assert roi.needs_flip("laterality", mask, None) is True   # no tag: pixel mass
    with pytest.raises(ValueError, match="choose none, mass or laterality"):
        roi.needs_flip("sideways", mask, None)


def test_empty_image_has_no_box():
    mask, box = roi.find_breast(np.zeros((100, 80), np.uint8))
    assert box is None and not mask.any()


def test_resize_stretch_and_pad():
    img = np.full((300, 100), 200, np.uint8)
    assert roi.resize(img, (64, 32)).shape == (64, 32)
    p = roi.resize(img, (60, 60), "pad")
    assert p.shape == (60, 60)
    assert (p[:, :20] == 200).all() and (p[:, 21:] == 0).all()   # aspect 3:1 kept, left aligned
    wide = roi.resize(np.full((100, 300), 7, np.uint16), (30, 60), "pad")
    assert wide.dtype == np.uint16 and (wide[:20] == 7).all() and (wide[21:] == 0).all()


def test_rectangular_and_16_bit_output(synth_small):
    p = next((synth_small / "train_images").glob("*/*.dcm"))
    img8, _ = preprocess_image(p, PreprocessConfig(size=(128, 64)))
    img16, _ = preprocess_image(p, PreprocessConfig(size=(128, 64), bits=16))
    assert img8.shape == (128, 64) and img8.dtype == np.uint8
    assert img16.dtype == np.uint16 and img16.max() > 255
    assert np.abs(np.rint(img16 / 257.0) - img8).max() <= 1
