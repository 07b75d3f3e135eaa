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
    """Those plug-ins say their package is missing; the process's set is found again."""
    for n in names:
        monkeypatch.setattr(decoders.get(n), "why_unavailable", lambda n=n: f"No module named '{n}'")
    monkeypatch.setattr(decoders, "_DEFAULTS", {})


def test_every_decoder_module_declares_the_plugin_interface():
    for name in decoders.ALL:
        mod = decoders.get(name)
        assert mod.NAME == name and mod.DEVICE in ("cpu", "gpu") and mod.PACKAGES
        assert callable(mod.is_available) and callable(mod.decode) and callable(mod.why_unavailable)
        assert isinstance(mod.ORDER, int) and set(mod.SYNTAXES) <= set(uids.NAMES)
    assert decoders.CPU_ORDER == ("imagecodecs", "dicomsdl", "pydicom")       # by ORDER
    assert decoders.GPU_NAMES == ("nvimgcodec", "dali") and set(decoders.ALL) == set(
        decoders.plugin_names())
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
                       r"dicomsdl .*\(not available here: dicomsdl: No module named 'dicomsdl', "
                       r"pydicom: No module named 'pydicom'\)"):
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


# ---- the set of a run: found once, reasons kept, plug-ins found in their folder, picklable ----

def _count_probes(monkeypatch) -> dict:
    """Count each plug-in's probe (`why_unavailable`); the process's set is found again."""
    counts = dict.fromkeys(decoders.ALL, 0)
    for name in decoders.ALL:
        mod = decoders.get(name)

        def probe(real=mod.why_unavailable, name=name):
            counts[name] += 1
            return real()
        monkeypatch.setattr(mod, "why_unavailable", probe)
    monkeypatch.setattr(decoders, "_DEFAULTS", {})
    return counts


def _folder(tmp_path, n: int = 4):
    """n copies of the RLE and plain test files as {patient_id}/{image_id}.dcm."""
    import shutil
    for i in range(n):
        (tmp_path / "img" / "1").mkdir(parents=True, exist_ok=True)
        shutil.copy(RLE if i % 2 else PLAIN, tmp_path / "img" / "1" / f"{10 + i}.dcm")
    return tmp_path / "img"


def test_a_run_probes_each_plugin_once(monkeypatch, tmp_path):
    from rsna_utils.image.preprocess import PreprocessConfig, Preprocessor
    counts = _count_probes(monkeypatch)
    s = Preprocessor(PreprocessConfig(size=64), workers=0, progress=False).run(
        _folder(tmp_path), None, tmp_path / "png")
    assert s.processed == 4 and counts == dict.fromkeys(decoders.ALL, 1)
    for _ in range(3):                           # single files share the process's set
        read_dicom(RLE)
        read_dicom(PLAIN)
    assert counts == dict.fromkeys(decoders.ALL, 2)
    ds = decoders.DecoderSet.find()
    for _ in range(3):
        read_dicom(RLE, decoders=ds)
    assert counts == dict.fromkeys(decoders.ALL, 3)


def _check_worker_state(path):
    """A test hook run in the worker process: the parent's set arrived, none was found here."""
    from rsna_utils.image import workers
    assert isinstance(workers._DECODERS, decoders.DecoderSet), workers._DECODERS
    assert decoders._DEFAULTS == {}, "the worker found a set of its own"
    assert workers._DECODERS.unavailable.get("dicomsdl") == "from the parent"


def test_worker_processes_get_the_runs_set_by_value(tmp_path):
    from rsna_utils.image.preprocess import PreprocessConfig, Preprocessor
    found = decoders.DecoderSet.find()
    ds = decoders.DecoderSet([p if p.name != "dicomsdl" else decoders.Plugin(
        p.name, p.device, p.order, p.syntaxes, p.packages, "from the parent")
        for p in found.plugins])
    s = Preprocessor(PreprocessConfig(size=64), workers=1, progress=False, decoders=ds,
                     test_hook=_check_worker_state).run(_folder(tmp_path, 2), None, tmp_path / "png")
    assert (s.processed, s.failed) == (2, 0)
    import pandas as pd
    # dicomsdl is installed here but the parent's set says no: the workers used pydicom
    assert set(pd.read_csv(tmp_path / "png" / "meta.csv")["backend"]) == {"pydicom"}


def test_unavailable_plugins_carry_their_reasons(monkeypatch):
    _missing(monkeypatch, "dicomsdl")
    ds = decoders.DecoderSet.find()
    assert "dicomsdl" not in ds.names() and ds.unavailable["dicomsdl"] == "No module named 'dicomsdl'"
    assert "dicomsdl: No module named 'dicomsdl'" in ds.describe() and "imagecodecs" in str(ds)
    assert ds.candidates(uids.RLE_LOSSLESS) == ["pydicom"]
    with pytest.raises(RsnaError, match=r"backend 'dicomsdl' is not installed; pip install dicomsdl "
                       r"\(dicomsdl: No module named 'dicomsdl'\)"):
        decoders.DecoderSet.find("dicomsdl")
    # on "cuda", a GPU plug-in whose package imports still needs a device
    from rsna_utils.dicom.decoders import gpu_shared
    for name in decoders.GPU_NAMES:
        monkeypatch.setattr(decoders.get(name), "why_unavailable", lambda: None)
    monkeypatch.setattr(gpu_shared, "cuda_available", lambda: False)
    cuda = decoders.DecoderSet.find(device="cuda")
    assert cuda.unavailable == {"dicomsdl": "No module named 'dicomsdl'", "nvimgcodec": "no CUDA device",
                                "dali": "no CUDA device"}
    assert decoders.DecoderSet.find(device="cpu").names("gpu") == ["nvimgcodec", "dali"]
    with pytest.raises(RsnaError, match=r"backend 'dali' decodes on a GPU and there is no CUDA "
                       r"device here; use --backend auto"):
        decoders.DecoderSet.find("dali", device="cuda")
    with pytest.raises(RsnaError, match=r"decoder device 'gpu' is unknown; choose cpu or cuda"):
        decoders.DecoderSet.find(device="gpu")


def test_the_gpu_choice_comes_from_the_set(monkeypatch, capsys):
    from rsna_utils.core import errors as errors_mod
    from rsna_utils.dicom.decoders import gpu_batch
    monkeypatch.setattr(errors_mod, "_SAID", set())
    P = decoders.Plugin
    ds = decoders.DecoderSet([P("nvimgcodec", "gpu", 10, frozenset(), "x", "No module named 'nv'"),
                              P("dali", "gpu", 20, frozenset(), "y")], device="cuda")
    seen = []
    monkeypatch.setattr(gpu_batch, "unusable", lambda b, dev, decoders=None: seen.append(b))
    monkeypatch.setattr(gpu_batch, "cuda_available", lambda: pytest.fail("probed CUDA again"))
    assert gpu_batch.resolve_backend("auto", decoders=ds) == "dali" and seen == ["dali"]
    ds = decoders.DecoderSet([P("nvimgcodec", "gpu", 10, frozenset(), "x", "No module named 'nv'"),
                              P("dali", "gpu", 20, frozenset(), "y", "No module named 'dali'")],
                             device="cuda")
    assert gpu_batch.resolve_backend("auto", decoders=ds) == "cpu"
    assert ("decoding on the CPU: nvimgcodec: No module named 'nv'; dali: No module named 'dali'"
            in capsys.readouterr().err)
    with pytest.raises(RsnaError, match=r"backend 'dali' is not installed; pip install y"):
        gpu_batch.resolve_backend("dali", decoders=ds)
    assert gpu_batch.resolve_backend("auto", decoders=decoders.DecoderSet(ds.plugins)) == "cpu"


FAKE = '''"""A decoder plug-in of one file: it declares the interface and nothing else changes."""
import numpy as np

from rsna_utils.dicom import uids

NAME = "fakecodec"
DEVICE = "cpu"
ORDER = 0
SYNTAXES = frozenset(uids.NAMES)
PACKAGES = "fakecodec"


def why_unavailable():
    return None


def is_available():
    return why_unavailable() is None


def decode(path, h):
    return np.full((h.rows, h.columns), 7, np.uint16)
'''


def test_a_new_plugin_is_one_module_in_the_plugins_folder(monkeypatch, tmp_path):
    """Dropped into the plug-ins' folder (here: a second folder of that package), a module is
    found, ordered by its ORDER and used; no list of names is edited."""
    import sys

    from rsna_utils.dicom.decoders import plugins
    (tmp_path / "fakecodec.py").write_text(FAKE)
    monkeypatch.setattr(plugins, "__path__", [*plugins.__path__, str(tmp_path)])
    decoders.forget()
    try:
        ds = decoders.DecoderSet.find()
        assert ds.names("cpu") == ["fakecodec", "imagecodecs", "dicomsdl", "pydicom"]
        img = read_dicom(PLAIN, decoders=ds)
        assert img.backend == "fakecodec" and (img.pixels == 7).all()
        assert read_dicom(PLAIN, backend="fakecodec").backend == "fakecodec"   # by name too
    finally:
        monkeypatch.undo()
        decoders.forget()
        sys.modules.pop("rsna_utils.dicom.decoders.plugins.fakecodec", None)
    with pytest.raises(RsnaError, match=r"unknown backend 'fakecodec'"):
        read_dicom(PLAIN, backend="fakecodec")


def test_a_module_without_the_interface_is_named_with_the_fix(monkeypatch, tmp_path):
    from rsna_utils.dicom.decoders import plugins
    (tmp_path / "halfdone.py").write_text('NAME = "halfdone"\nDEVICE = "cpu"\n')
    monkeypatch.setattr(plugins, "__path__", [*plugins.__path__, str(tmp_path)])
    decoders.forget()
    try:
        with pytest.raises(RsnaError, match=r"decoder plug-in .*halfdone.py: missing SYNTAXES, "
                           r"PACKAGES, ORDER, why_unavailable, decode.*; declare NAME"):
            decoders.DecoderSet.find()
    finally:
        monkeypatch.undo()
        decoders.forget()
        import sys
        sys.modules.pop("rsna_utils.dicom.decoders.plugins.halfdone", None)


def test_the_set_pickles_as_names_and_reasons(monkeypatch):
    import pickle
    _missing(monkeypatch, "dicomsdl")
    ds = decoders.DecoderSet.find()
    blob = pickle.dumps(ds)
    back = pickle.loads(blob)
    assert b"rsna_utils.dicom.decoders.plugins" not in blob        # no module inside
    assert back.names() == ds.names() and back.unavailable == ds.unavailable
    assert str(back) == str(ds) and back.backend == "auto" and back.device == "cpu"
    assert read_dicom(RLE, decoders=back).backend == "pydicom"
