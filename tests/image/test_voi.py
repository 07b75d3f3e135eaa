"""The lookup-table windowing against pydicom's apply_modality_lut + apply_voi_lut."""
import numpy as np
import pydicom
import pytest
from conftest import TESTDATA, needs_testdata
from pydicom.pixels import apply_modality_lut
from pydicom.pixels import apply_voi_lut as pd_apply_voi_lut

from rsna_utils.dicom.header import read_header
from rsna_utils.dicom.reader import read_dicom
from rsna_utils.image.voi import apply_voi_lut, build_lut, select_window


def pydicom_reference(arr, ds, index=0):
    """8-bit display per pydicom: round(255 * (v - y_min) / (y_max - y_min)), MONOCHROME1
    inverted. y range as pydicom computes it (BitsStored, rescaled) or the LUT's bit depth."""
    mod = apply_modality_lut(arr, ds)
    v = pd_apply_voi_lut(mod, ds, index=index).astype(np.float64)
    if ds.get("VOILUTSequence"):
        top = 2 ** int(ds.VOILUTSequence[index].LUTDescriptor[2]) - 1
        y = v / top
    else:
        bits = int(ds.BitsStored)
        lo, hi = (0, 2 ** bits - 1) if ds.PixelRepresentation == 0 else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        slope, icpt = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
        lo, hi = lo * slope + icpt, hi * slope + icpt
        y = (v - lo) / (hi - lo)
    out = np.rint(np.clip(y, 0, 1) * 255)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        out = 255 - out
    return out


def _ours(path, index=0, arr=None):
    h = read_header(path)
    pixels = read_dicom(path).pixels if arr is None else arr
    img, w = apply_voi_lut(pixels, h, index=index)
    return img, w


REAL = ["RG1_UNC", "RG2_UNC", "RG3_UNC", "RG2_J2KR", "RG3_JPLL", "RG3_RLE"]


@needs_testdata
@pytest.mark.parametrize("name", REAL)
def test_real_files_within_one_gray_level(name):
    path = TESTDATA / "nema_wg04_cr" / f"{name}.dcm"
    ds = pydicom.dcmread(path)
    ref = pydicom_reference(ds.pixel_array, ds)
    ours, w = _ours(path)
    assert w.kind == "LINEAR"
    assert np.abs(ours.astype(int) - ref).max() <= 1


# GE Senographe: three windows, SIGMOID, and a VOI LUT Sequence of three LUTs
VENDOR = ["MG-Im-GE_Seno_1_ForPresentation", "MG-Im-GE_Seno_2_ForPresentation"]
NO_WINDOW = ["MG-Im-GE_Seno_1_ForProcessing", "MG-Im-GE-SenDS-scaled", "DX-Im-GE_XR220-1",
             "DX-Im-GE_XR220-2", "DX-Im-GE_XR220-3"]


@needs_testdata
@pytest.mark.parametrize("name", VENDOR)
@pytest.mark.parametrize("index", [0, 1, 2])
@pytest.mark.parametrize("prefer_lut", [True, False])
def test_real_vendor_headers_over_the_whole_stored_range(name, index, prefer_lut):
    """The vendor files carry real windows / LUTs but almost no pixels: window a ramp over
    every stored value with their headers, ours against pydicom."""
    path = TESTDATA / "vendor_headers" / f"{name}.dcm"
    if not path.exists():
        pytest.skip(f"{path.name} not in testdata")
    ds = pydicom.dcmread(path)
    h = read_header(path)
    assert len(h.voi_luts) == 3 and len(h.window_widths) == 3
    if not prefer_lut and "VOILUTSequence" in ds:
        del ds.VOILUTSequence
        h.voi_luts = []
    ramp = np.arange(0, 2 ** h.bits_stored, dtype=np.uint16)[None, :]
    ref = pydicom_reference(ramp, ds, index)
    ours, w = apply_voi_lut(ramp, h, index=index)
    assert np.abs(ours.astype(int) - ref).max() <= 1, (w, name)
    assert w.index == index and w.kind == ("LUT" if prefer_lut else "SIGMOID")


@needs_testdata
@pytest.mark.parametrize("name", NO_WINDOW)
def test_real_files_without_window_fall_back_and_invert(name):
    """"For processing" MONOCHROME1 files carry no window: min-max fallback, inverted."""
    path = TESTDATA / "vendor_headers" / f"{name}.dcm"
    h = read_header(path)
    assert not h.window_widths and h.monochrome1
    ramp = np.arange(0, 2 ** h.bits_stored, dtype=np.uint16)[None, :]
    img, w = apply_voi_lut(ramp, h)
    assert w.kind == "FALLBACK" and "no window" in w.note
    assert img[0, 0] == 255 and img[0, -1] == 0


def test_synthetic_files_within_one_gray_level(synth200):
    """Every kind the generator writes: SIGMOID, MONOCHROME1, rescale slope, 16-bit."""
    seen = set()
    for p in sorted((synth200 / "train_images").glob("*/*.dcm")):
        ds = pydicom.dcmread(p)
        key = (ds.get("VOILUTFunction"), ds.PhotometricInterpretation, ds.BitsStored,
               "RescaleSlope" in ds, ds.file_meta.TransferSyntaxUID)
        if key in seen:
            continue
        seen.add(key)
        n = len(ds.WindowCenter) if isinstance(ds.WindowCenter, pydicom.multival.MultiValue) else 1
        for index in range(n):
            ref = pydicom_reference(ds.pixel_array, ds, index)
            ours, w = _ours(p, index)
            assert np.abs(ours.astype(int) - ref).max() <= 1, (p, key, w)
    kinds = {k[0] for k in seen} | {k[1] for k in seen}
    assert {"SIGMOID", "MONOCHROME1", "MONOCHROME2"} <= kinds
    assert {k[2] for k in seen} == {12, 16}


def _header(**kw):
    from rsna_utils.dicom.header import DicomHeader
    d = dict(path="mem", rows=1, columns=4096, bits_stored=12)
    d.update(kw)
    return DicomHeader(**d)


def test_monochrome1_is_the_inverse():
    ramp = np.arange(4096, dtype=np.uint16)[None]
    a, _ = apply_voi_lut(ramp, _header(window_centers=[2000], window_widths=[1000]))
    b, _ = apply_voi_lut(ramp, _header(window_centers=[2000], window_widths=[1000],
                                       photometric="MONOCHROME1"))
    assert np.array_equal(a.astype(int), 255 - b.astype(int))
    assert a[0, 0] == 0 and a[0, -1] == 255 and a[0, 2000] in (127, 128)


def test_no_window_falls_back_to_image_range_and_says_so():
    arr = np.array([[0, 100, 200, 300]], dtype=np.uint16)
    img, w = apply_voi_lut(arr, _header(pixel_padding_value=0))
    assert w.kind == "FALLBACK" and "no window" in w.note
    assert img[0, 1] == 0 and img[0, 3] == 255   # padding 0 ignored: range is 100..300


def test_zero_width_window_uses_next_valid_one_or_fallback():
    h = _header(window_centers=[2000, 1500], window_widths=[0, 800])
    w = select_window(h, 0)
    assert w.index == 1 and "invalid" in w.note
    h = _header(window_centers=[2000], window_widths=[0])
    w = select_window(h, 0, pixels=np.array([[10, 20]], np.uint16))
    assert w.kind == "FALLBACK" and "invalid window width 0" in w.note


def test_signed_pixels():
    h = _header(pixel_representation=1, bits_stored=16, window_centers=[0], window_widths=[200])
    arr = np.array([[-1000, -100, 0, 100, 1000]], dtype=np.int16)
    img, _ = apply_voi_lut(arr, h)
    assert list(img[0]) == [0, 0, 128, 255, 255] or list(img[0]) == [0, 0, 127, 255, 255]


def test_lut_16_bit_output_matches_8_bit():
    h = _header(window_centers=[2000], window_widths=[1000], voi_function="SIGMOID")
    w = select_window(h)
    l8, _ = build_lut(h, w, 8)
    l16, _ = build_lut(h, w, 16)
    assert np.abs(np.rint(l16 / 257.0) - l8).max() <= 1
