
import numpy as np
import pydicom
import pytest
from conftest import TESTDATA, needs_testdata

from rsna_utils.core.errors import DecodeError, RsnaError
from rsna_utils.dicom.header import read_header
from rsna_utils.dicom.reader import read_dicom

LOSSLESS = [("RG1", "J2KR"), ("RG2", "J2KR"), ("RG2", "JPLL"), ("RG2", "RLE"), ("RG2", "JLSL"),
            ("RG3", "J2KR"), ("RG3", "JPLL"), ("RG3", "RLE"), ("RG3", "JLSL")]


def _pydicom_can(path) -> bool:
    try:
        pydicom.dcmread(path).pixel_array
        return True
    except Exception:
        return False


@needs_testdata
@pytest.mark.parametrize("backend", ["imagecodecs", "dicomsdl", "pydicom", "auto"])
@pytest.mark.parametrize("case, enc", LOSSLESS)
def test_real_lossless_files_decode_bit_exactly(case, enc, backend):
    d = TESTDATA / "nema_wg04_cr"
    path = d / f"{case}_{enc}.dcm"
    if backend == "imagecodecs" and enc not in ("J2KR", "JPLL"):
        with pytest.raises(DecodeError, match="imagecodecs: does not take"):
            read_dicom(path, backend=backend)
        return
    if backend == "pydicom" and enc == "JLSL" and not _pydicom_can(path):
        pytest.skip("no JPEG-LS plugin for pydicom installed")
    ref = pydicom.dcmread(d / f"{case}_UNC.dcm").pixel_array
    img = read_dicom(path, backend=backend)
    assert img.pixels.dtype == np.uint16
    assert np.array_equal(img.pixels, ref)
    assert img.backend == backend or backend == "auto"
    assert (img.header.rows, img.header.columns) == ref.shape


@needs_testdata
def test_undecodable_file_names_file_syntax_and_package():
    path = TESTDATA / "nema_wg04_cr" / "RG2_JPLY.dcm"
    with pytest.raises(DecodeError) as e:
        read_dicom(path, backend="pydicom")
    msg = str(e.value)
    assert "RG2_JPLY.dcm" in msg and "JPEG Extended" in msg and "1.2.840.10008.1.2.4.51" in msg
    assert "pylibjpeg-libjpeg" in msg


@needs_testdata
def test_header_fields_from_real_vendor_files():
    h = read_header(TESTDATA / "vendor_headers" / "MG-Im-GE_Seno_1_ForPresentation.dcm")
    assert h.voi_function == "SIGMOID"
    assert len(h.window_centers) == 3 and len(h.window_widths) == 3
    assert len(h.voi_luts) == 3 and h.voi_luts[0].bits == 12
    assert h.photometric == "MONOCHROME2"
    h = read_header(TESTDATA / "vendor_headers" / "MG-Im-Hologic-PropProj.dcm")
    assert h.monochrome1 and not h.has_pixel_data
    with pytest.raises(DecodeError, match="no PixelData"):
        read_dicom(h.path)


def test_not_a_dicom_and_truncated_and_missing(tmp_path, synth_small):
    bad = tmp_path / "x.dcm"
    bad.write_bytes(b"this is not a dicom file" * 10)
    with pytest.raises(RsnaError, match="x.dcm"):
        read_dicom(bad)
    src = next((synth_small / "train_images").glob("*/*.dcm"))
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    with pytest.raises(RsnaError, match="cut.dcm"):
        read_dicom(cut)
    with pytest.raises(RsnaError, match="file not found"):
        read_dicom(tmp_path / "nope.dcm")


def test_memory_bomb_refused_before_decoding(tmp_path, synth_small):
    src = next((synth_small / "train_images").glob("*/*.dcm"))
    ds = pydicom.dcmread(src)
    ds.Rows, ds.Columns = 60000, 60000
    ds.save_as(tmp_path / "bomb.dcm")
    with pytest.raises(DecodeError, match="over the limit") as e:
        read_dicom(tmp_path / "bomb.dcm")
    assert "max_pixels" in str(e.value)
    # the user can raise the limit: then the decoder runs (and finds the size is wrong)
    with pytest.raises(DecodeError) as e:
        read_dicom(tmp_path / "bomb.dcm", max_pixels=4_000_000_000)
    assert "over the limit" not in str(e.value)


def test_rows_columns_disagreeing_with_data(tmp_path, synth_small):
    src = next((synth_small / "train_images").glob("*/*.dcm"))
    ds = pydicom.dcmread(src)
    ds.decompress()
    ds.Rows = ds.Rows - 7
    ds.save_as(tmp_path / "lying.dcm")
    with pytest.raises(DecodeError):
        read_dicom(tmp_path / "lying.dcm")


def test_unknown_backend_lists_choices(synth_small):
    src = next((synth_small / "train_images").glob("*/*.dcm"))
    with pytest.raises(RsnaError, match="choose one of auto, imagecodecs, dicomsdl, pydicom"):
        read_dicom(src, backend="turbo")


def test_backends_agree_on_synthetic(synth_small):
    for p in sorted((synth_small / "train_images").glob("*/*.dcm"))[:12]:
        a = read_dicom(p, backend="dicomsdl").pixels
        b = read_dicom(p, backend="pydicom").pixels
        c = read_dicom(p, backend="auto")
        assert np.array_equal(a, b) and np.array_equal(a, c.pixels)
        if c.header.transfer_syntax in ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.70"):
            assert c.backend == "imagecodecs"
