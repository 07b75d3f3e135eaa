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
        assert meta["crop_reason"].startswith("background rule"), meta["crop_reason"]
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


def test_empty_image_has_no_box_by_the_old_rule_and_the_whole_image_by_the_new():
    blank = np.zeros((100, 80), np.uint8)
    mask, box = roi.find_breast(blank, rule="otsu")
    assert box is None and not mask.any()
    mask, box = roi.find_breast(blank)
    assert (box.y0, box.x0, box.y1, box.x1) == (0, 0, 100, 80) and mask.all()
    assert box.reason.startswith("whole image") and "otsu rule found nothing" in box.reason
    noisy = np.random.default_rng(0).integers(0, 6, (400, 320)).astype(np.uint8)  # noise only
    _, box = roi.find_breast(noisy)
    assert (box.height, box.width) == (400, 320) and box.reason.startswith("whole image")


def test_unknown_rule_is_refused():
    with pytest.raises(ValueError, match="choose background or otsu"):
        roi.find_breast(_phantom(), rule="yolo")


# ----------------------------------------------------------------------------------------
# issue 38: the background rule on the ways the old rule failed, and on bad input
# ----------------------------------------------------------------------------------------

YY, XX = np.mgrid[0:400, 0:320]
BREAST = ((YY - 200) / 150.0) ** 2 + (XX / 220.0) ** 2 <= 1          # chest wall on the left
BREAST_BOX = (50, 0, 351, 220)                                          # y0, x0, y1, x1
RADIUS = np.sqrt(((YY - 200) / 150.0) ** 2 + (XX / 220.0) ** 2)         # 0 centre, 1 skin


def _b(box):
    return (box.y0, box.x0, box.y1, box.x1)


def _keeps(box, inner=BREAST_BOX, tol=3) -> bool:
    return (box.y0 <= inner[0] + tol and box.x0 <= inner[1] + tol and box.y1 >= inner[2] - tol
            and box.x1 >= inner[3] - tol)


def _not_sliver(box, shape=(400, 320)) -> bool:
    return box.height >= 0.1 * shape[0] and box.width >= 0.1 * shape[1]


def test_dense_breast_keeps_its_dim_fatty_edge():
    """A bright dense core in a fatty breast that dims towards the skin: Otsu splits core from
    fat and half of it still drops the dim edge; the background rule keeps all of it."""
    img = np.where(BREAST, 6 + 60 * (1 - RADIUS), 0)
    img[RADIUS <= 0.6] = 200
    img = img.astype(np.uint8)
    _, old = roi.find_breast(img, rule="otsu")
    assert old.y0 > 65 and old.x1 < 200                        # the old failure, kept visible
    _, new = roi.find_breast(img)
    assert _keeps(new) and new.height <= 310 and new.width <= 230
    assert new.reason.startswith("background rule")


def test_second_body_part_joined_by_a_neck_is_cut_off():
    """An arm-like blob at the top corner joined to the breast by a narrow bridge: the old
    rule's largest component takes it in; the background rule cuts it and says so."""
    img = np.zeros((400, 320), np.uint8)
    img[BREAST] = 120
    arm = ((YY - 20) / 40.0) ** 2 + ((XX - 240) / 70.0) ** 2 <= 1
    img[arm] = 110
    img[25:120, 165:185] = 110          # the neck: 20 px wide
    _, old = roi.find_breast(img, rule="otsu")
    assert old.y0 == 0 and old.x1 > 300
    mask, new = roi.find_breast(img)
    assert _keeps(new) and new.y0 >= 40 and new.x1 <= 235, _b(new)
    assert "second body part cut off" in new.reason
    assert not mask[arm].any()


def test_belly_below_the_fold_is_cut_at_the_waist():
    """Below the breast, along the chest wall, a narrow body part joined at a pinch (the
    inframammary fold of an MLO): the crop ends at the fold."""
    img = np.zeros((400, 320), np.uint8)
    img[BREAST] = 120
    img[340:360, 0:16] = 100            # a thin link along the chest wall (the fold)
    img[356:400, 0:60] = 100            # the belly
    _, new = roi.find_breast(img)
    assert _keeps(new) and new.y1 <= 365, _b(new)
    assert "second body part cut off" in new.reason


def test_breast_touching_every_edge_keeps_the_whole_image():
    rng = np.random.default_rng(1)
    img = np.clip(rng.normal(120, 25, (400, 320)), 30, 255).astype(np.uint8)
    mask, box = roi.find_breast(img)
    assert _b(box) == (0, 0, 400, 320) and box.reason


def test_bright_frame_is_not_the_breast():
    """A film's bright frame (a scanner's edge, wider than the ignored border band) joined to
    the breast at the chest wall: the crop keeps the breast, and never less."""
    img = np.zeros((400, 320), np.uint8)
    img[BREAST] = 120
    f = 10
    img[:f], img[-f:], img[:, :f], img[:, -f:] = 250, 250, 250, 250
    _, box = roi.find_breast(img)
    assert _keeps(box) and _not_sliver(box) and box.reason
    assert box.x1 <= 235 and box.y0 >= 40 and box.y1 <= 360, _b(box)


def test_marker_touching_the_breast_is_kept_with_the_breast():
    img = np.zeros((400, 320), np.uint8)
    img[BREAST] = 120
    img[180:220, 210:250] = 255         # a lead marker overlapping the breast's edge
    _, box = roi.find_breast(img)
    assert _keeps(box) and box.x1 <= 255 and box.reason.startswith("background rule"), _b(box)


def test_implant_does_not_leave_only_the_implant():
    """A breast implant, far brighter than the tissue around it: Otsu's split lands between
    tissue and implant (the old rule loses the dim edge around it); the background rule keeps
    the breast."""
    img = np.where(BREAST, 6 + 40 * (1 - RADIUS), 0)
    img[((YY - 200) / 110.0) ** 2 + ((XX - 20) / 140.0) ** 2 <= 1] = 250
    img = img.astype(np.uint8)
    _, old = roi.find_breast(img, rule="otsu")
    assert not _keeps(old), roi.find_breast(img, rule="otsu")[1]
    _, new = roi.find_breast(img)
    assert _keeps(new) and new.reason.startswith("background rule")


@pytest.mark.parametrize("case", ["blank", "flat", "speck", "strip", "frame_only", "noise"])
def test_never_an_empty_or_sliver_crop(case):
    img = np.zeros((400, 320), np.uint8)
    if case == "flat":
        img[:] = 77
    elif case == "speck":
        img[200:204, 100:104] = 200         # a speck: no breast, not a 4-pixel crop
    elif case == "strip":
        img[:, 0:12] = 150                  # a thin strip along the edge
    elif case == "frame_only":
        img[:12], img[-12:], img[:, :12], img[:, -12:] = 250, 250, 250, 250
    elif case == "noise":
        img = np.random.default_rng(2).integers(0, 256, (400, 320)).astype(np.uint8)
    mask, box = roi.find_breast(img)
    assert box is not None and _not_sliver(box) and mask.any() and box.reason, (case, box)


def test_reason_survives_scaling_and_margin():
    _, box = roi.find_breast(_phantom())
    big = roi.add_margin(box.scaled(4.0, 4.0, 1600, 1280), 0.05, 1600, 1280)
    assert big.reason == box.reason and big.reason.startswith("background rule")
    assert roi.Box(1, 2, 3, 4, "a") == roi.Box(1, 2, 3, 4, "b")   # the reason is not the box


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
