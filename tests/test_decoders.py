"""Decoders as plug-ins: a missing package is skipped, the registry tries the rest in order,
and the final error lists what was tried, what is installed and what would decode the file."""
import numpy as np
import pytest
from pydicom.data import get_testdata_file

from rsna_utils.core.errors import DecodeError, RsnaError
from rsna_utils.dicom import uids
from rsna_utils.dicom.decoders import registry as decoders
from rsna_utils.dicom.reader import read_dicom

RLE = get_testdata_file("MR_small_RLE.dcm")          # RLE Lossless: dicomsdl, then pydicom
PLAIN = get_testdata_file("MR_small.dcm")


def _missing(monkeypatch, *names):
    for n in names:
        monkeypatch.setattr(decoders.get(n), "is_available", lambda: False)


def test_every_decoder_module_declares_the_plugin_interface():
    for name in decoders.ALL:
        mod = decoders.get(name)
        assert mod.NAME == name and mod.DEVICE in ("cpu", "gpu") and mod.PACKAGES
        assert callable(mod.is_available) and callable(mod.decode)
        assert set(mod.SYNTAXES) <= set(uids.NAMES)
    assert decoders.candidates(uids.JPEG2000_LOSSLESS)[0] == "imagecodecs"
    assert "imagecodecs" not in decoders.candidates(uids.RLE_LOSSLESS)


def test_a_missing_package_is_skipped_and_the_next_decoder_reads_the_file(monkeypatch):
    ref = read_dicom(RLE, backend="dicomsdl").pixels
    _missing(monkeypatch, "dicomsdl")
    img = read_dicom(RLE)
    assert img.backend == "pydicom" and np.array_equal(img.pixels, ref)


def test_nothing_installed_names_what_was_tried_installed_and_needed(monkeypatch):
    _missing(monkeypatch, "dicomsdl", "pydicom")
    with pytest.raises(DecodeError, match=r"MR_small_RLE.dcm: cannot decode RLE Lossless .*tried "
                       r"nothing .*installed: imagecodecs; it decodes with pylibjpeg-rle or "
                       r"dicomsdl"):
        read_dicom(RLE)


def test_an_uninstalled_backend_asked_by_name_says_what_to_install(monkeypatch):
    _missing(monkeypatch, "dicomsdl")
    with pytest.raises(RsnaError, match=r"backend 'dicomsdl' is not installed; pip install dicomsdl"):
        read_dicom(PLAIN, backend="dicomsdl")
    with pytest.raises(RsnaError, match=r"unknown backend 'gdcm'; choose one of auto, imagecodecs"):
        read_dicom(PLAIN, backend="gdcm")


def test_a_decoder_that_fails_is_listed_with_its_reason(monkeypatch):
    def broken(path, h):
        raise DecodeError("dicomsdl: boom")
    monkeypatch.setattr(decoders.get("dicomsdl"), "decode", broken)
    _missing(monkeypatch, "pydicom")
    with pytest.raises(DecodeError, match=r"tried dicomsdl; installed: imagecodecs, dicomsdl; .*"
                       r"\[dicomsdl: boom\]"):
        read_dicom(RLE)


def test_a_decoder_with_a_wrong_shape_hands_the_file_to_the_next(monkeypatch):
    def wrong_shape(path, h):
        return np.zeros((3, 3), np.uint16)
    monkeypatch.setattr(decoders.get("dicomsdl"), "decode", wrong_shape)
    img = read_dicom(RLE)
    assert img.backend == "pydicom" and img.pixels.shape == (64, 64)


def test_the_gpu_scaled_check_takes_uint16_tensors():
    import torch

    from rsna_utils.dicom.decoders.gpu_batch import looks_scaled
    stored = np.arange(0, 4096, dtype=np.uint16).reshape(64, 64)
    scaled = np.rint(stored * (65535 / 4095)).astype(np.uint16)
    assert looks_scaled(torch.as_tensor(scaled), 12) and not looks_scaled(torch.as_tensor(stored), 12)
