"""GPU backends. Their decoders also run on the CPU (nvImageCodec's CPU-only backend and DALI's
CPU decoder, JPEG 2000 only), so the backend code, frame extraction and the fallback are tested
here when the packages are installed (`pip install -r requirements-gpu.txt`); the CUDA tests run
on a GPU machine (benchmarks/gpu_check.sh)."""
import numpy as np
import pandas as pd
import pydicom
import pytest
from conftest import TESTDATA, needs_testdata
from fakes import FakeGpuDecoder

from rsna_utils.core import errors as errors_mod
from rsna_utils.core.errors import DecodeError
from rsna_utils.dicom.decoders import gpu_batch
from rsna_utils.dicom.frames import first_frame, parse_codestream
from rsna_utils.image import gpu
from rsna_utils.image.preprocess import PreprocessConfig, Preprocessor
from rsna_utils.sources import synth

cuda = pytest.mark.skipif(not gpu_batch.cuda_available(), reason="needs a CUDA GPU")


def test_frame_extraction_and_codestream_headers(synth_small):
    kinds = set()
    for p in sorted((synth_small / "train_images").glob("*/*.dcm")):
        ds = pydicom.dcmread(p)
        if not ds.file_meta.TransferSyntaxUID.is_encapsulated or ds.file_meta.TransferSyntaxUID == synth.RLE_LOSSLESS:
            continue
        cs = parse_codestream(first_frame(str(p)))
        assert (cs.rows, cs.columns) == (ds.Rows, ds.Columns)
        assert cs.precision == ds.BitsStored and cs.components == 1
        kinds.add(cs.kind)
        if cs.kind == "jpeg":
            assert cs.sof == 0xC3   # lossless Huffman, SV1
    assert kinds == {"jp2", "j2k", "jpeg"} or kinds >= {"jp2", "jpeg"}


@needs_testdata
def test_frame_extraction_on_real_files():
    d = TESTDATA / "nema_wg04_cr"
    for name, kind in (("RG2_J2KR", ("j2k", "jp2")), ("RG2_JPLL", ("jpeg",)), ("RG1_J2KR", ("j2k", "jp2"))):
        ds = pydicom.dcmread(d / f"{name}.dcm")
        cs = parse_codestream(first_frame(str(d / f"{name}.dcm")))
        assert cs.kind in kind and (cs.rows, cs.columns) == (ds.Rows, ds.Columns)


def test_bad_codestreams_are_refused():
    with pytest.raises(DecodeError, match="unknown codestream"):
        parse_codestream(b"\x00\x01\x02garbage")
    with pytest.raises(DecodeError, match="SOF"):
        parse_codestream(b"\xff\xd8\xff\xda\x00\x02")
    with pytest.raises(DecodeError):
        parse_codestream(synth_jp2_without_codestream())


def synth_jp2_without_codestream() -> bytes:
    from rsna_utils.dicom.frames import JP2_SIGNATURE
    return JP2_SIGNATURE + (8).to_bytes(4, "big") + b"ftyp"


def test_dali_precision_rescale_recovers_stored_values():
    stored = np.array([0, 1, 2047, 4095], np.uint16)
    scaled = np.rint(stored.astype(np.float64) * 65535 / 4095).astype(np.uint16)   # DALI GPU output
    assert np.array_equal(gpu_batch.rescale_to_precision(scaled, 12), stored)
    big = np.array([40000, 65535], np.uint16)
    assert np.array_equal(gpu_batch.rescale_to_precision(big, 16), big)   # above 32767 survives


def test_auto_backend_is_cpu_without_cuda():
    if gpu_batch.cuda_available():
        pytest.skip("CUDA present")
    assert gpu_batch.resolve_backend("auto") == "cpu"


def needs_package(backend: str) -> None:
    """Skip where the GPU library is not installed; CI installs both (requirements-gpu.txt) and
    sets RSNA_REQUIRE_GPU_LIBS=1, which turns that skip into a failure."""
    import os
    if not gpu_batch.package_available(backend):
        why = f"{backend} not installed ({gpu_batch.INSTALL_HINT})"
        if os.environ.get("RSNA_REQUIRE_GPU_LIBS") == "1":
            pytest.fail(why + " but RSNA_REQUIRE_GPU_LIBS=1")
        pytest.skip(why)


@pytest.mark.parametrize("backend", ["nvimgcodec", "dali"])
@pytest.mark.parametrize("precision", [10, 12, 16])
def test_gpu_plugins_cpu_backends_are_bit_exact_and_survive_a_corrupt_frame(backend, precision):
    """The project's own plug-ins on their libraries' CPU backends (no GPU, no driver): 10-16 bit
    JPEG 2000 decoded bit-exact against imagecodecs; a corrupt frame in the batch comes back as
    None while the good frames of the same batch survive; the decoder still decodes afterwards
    (DALI's pipeline rebuilt)."""
    import imagecodecs
    needs_package(backend)
    from rsna_utils.dicom.decoders import registry
    rng = np.random.default_rng(precision)
    imgs = [rng.integers(0, 2**precision, (96, 80), dtype=np.uint16) for _ in range(4)]
    frames = [bytes(imagecodecs.jpeg2k_encode(x, level=0, reversible=True, codecformat=fmt,
                                              bitspersample=precision))
              for x, fmt in zip(imgs, ("j2k", "jp2", "j2k", "jp2"))]
    for f, x in zip(frames, imgs):         # the reference: imagecodecs agrees with itself
        assert np.array_equal(imagecodecs.jpeg2k_decode(f), x)
    dec = registry.get(backend).BatchDecoder(device="cpu", batch_size=8)
    out = dec.decode(frames)
    assert all(np.array_equal(np.asarray(o), x) for o, x in zip(out, imgs))
    assert all(np.asarray(o).dtype == np.uint16 for o in out)
    broken = [frames[0], b"\xff\x4f\xff\x51" + b"\x00" * 60, frames[2], frames[3]]
    out = dec.decode(broken)
    assert out[1] is None
    assert [np.array_equal(np.asarray(out[k]), imgs[k]) for k in (0, 2, 3)] == [True] * 3
    again = dec.decode(frames[:2])
    assert all(np.array_equal(np.asarray(o), x) for o, x in zip(again, imgs[:2]))
    if backend == "dali":
        assert dec.rebuilds >= 1        # the failed batch's pipeline was not reused


@pytest.mark.parametrize("backend", ["nvimgcodec", "dali"])
def test_gpu_backend_on_cpu_matches_cpu_path_and_falls_back(tmp_path, synth_small, backend):
    needs_package(backend)
    cfg = PreprocessConfig(size=64)
    images, csv = synth_small / "train_images", synth_small / "train.csv"
    s = gpu.GpuPreprocessor(cfg, backend=backend, device="cpu", batch_size=8, progress=False).run(
        images, csv, tmp_path / "gpu")
    Preprocessor(cfg, workers=1, progress=False).run(images, csv, tmp_path / "cpu")
    g = pd.read_csv(tmp_path / "gpu" / "meta.csv").set_index("image_id")
    c = pd.read_csv(tmp_path / "cpu" / "meta.csv").set_index("image_id")
    assert s.failed == 0 and set(g.index) == set(c.index)
    # JPEG Lossless has no CPU decoder in these packages: the fallback took it, and said so
    jpll = g.transfer_syntax == synth.JPEG_LOSSLESS_SV1
    assert g.loc[jpll, "backend"].str.startswith("cpu-fallback").all() and s.fallbacks >= jpll.sum()
    assert (g.loc[g.transfer_syntax == synth.JPEG2000_LOSSLESS, "backend"] == backend).all()
    import cv2
    for iid in g.index:
        for k in ("crop_y0", "crop_x0", "crop_y1", "crop_x1"):
            assert abs(g.loc[iid, k] - c.loc[iid, k]) <= 8
        a = cv2.imread(str(tmp_path / "gpu" / g.loc[iid, "png"]), cv2.IMREAD_UNCHANGED).astype(int)
        b = cv2.imread(str(tmp_path / "cpu" / c.loc[iid, "png"]), cv2.IMREAD_UNCHANGED).astype(int)
        assert np.abs(a - b).mean() <= 1.0, iid


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["nvimgcodec", "dali"])
def test_cuda_decode_is_bit_exact(synth_small, backend):
    if not gpu_batch.package_available(backend):
        pytest.skip(f"{backend} not installed")
    from rsna_utils.dicom.header import read_header
    from rsna_utils.dicom.reader import read_dicom
    paths = [p for p in sorted((synth_small / "train_images").glob("*/*.dcm"))
             if read_header(p).transfer_syntax in gpu.GPU_SYNTAXES]
    hs = [read_header(p) for p in paths]
    got = gpu_batch.decode_batch(hs, backend, "cuda")
    for p, a in zip(paths, got):
        assert np.array_equal(a, read_dicom(p, backend="pydicom").pixels), p


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["nvimgcodec", "dali"])
def test_cuda_pipeline_agrees_with_cpu(tmp_path, synth_small, backend):
    if not gpu_batch.package_available(backend):
        pytest.skip(f"{backend} not installed")
    import cv2
    cfg = PreprocessConfig(size=128)
    images, csv = synth_small / "train_images", synth_small / "train.csv"
    gpu.GpuPreprocessor(cfg, backend=backend, progress=False).run(images, csv, tmp_path / "g")
    Preprocessor(cfg, workers=2, progress=False).run(images, csv, tmp_path / "c")
    g = pd.read_csv(tmp_path / "g" / "meta.csv").set_index("image_id")
    c = pd.read_csv(tmp_path / "c" / "meta.csv").set_index("image_id")
    assert set(g.index) == set(c.index)
    for iid in g.index:
        a = cv2.imread(str(tmp_path / "g" / g.loc[iid, "png"]), cv2.IMREAD_UNCHANGED).astype(int)
        b = cv2.imread(str(tmp_path / "c" / c.loc[iid, "png"]), cv2.IMREAD_UNCHANGED).astype(int)
        assert np.abs(a - b).mean() <= 1.0


@cuda
@pytest.mark.cuda
def test_cuda_predict_uses_the_gpu_path(tmp_path, synth_small):
    if not gpu_batch.package_available("nvimgcodec"):
        pytest.skip("nvimgcodec not installed")
    from rsna_utils.infer.predict import predict
    from rsna_utils.learn.train import TrainConfig, train
    Preprocessor(PreprocessConfig(size=64), workers=2, progress=False).run(
        synth_small / "train_images", synth_small / "train.csv", tmp_path / "png")
    train(TrainConfig(data=str(tmp_path / "png"), csv=str(synth_small / "train.csv"),
                      out=str(tmp_path / "run"), size=64, epochs=1, max_steps=2, workers=0,
                      device="cuda", progress=False, val_frac=0.3))
    gpu_res = predict(synth_small / "test_images", synth_small / "test.csv",
                      [tmp_path / "run" / "best.pt"], tmp_path / "g.csv", device="cuda",
                      backend="auto", progress=False)
    cpu_res = predict(synth_small / "test_images", synth_small / "test.csv",
                      [tmp_path / "run" / "best.pt"], tmp_path / "c.csv", device="cuda",
                      backend="imagecodecs", workers=2, progress=False)
    assert not gpu_res.warnings
    diff = (gpu_res.submission.cancer - cpu_res.submission.cancer).abs().max()
    assert diff < 0.05


# ---- the routing rule: self-test probes decide what a GPU decoder may decode ----------------

@pytest.mark.parametrize("how, mode", [("exact", "exact"), ("scaled", "scaled"), ("wrong", "wrong"),
                                       ("none", "wrong")])
def test_self_test_probe_classifies_a_decoder(how, mode):
    rules = gpu_batch.DecodeRules(FakeGpuDecoder(how), "fake")
    for syntax, kind in ((synth.JPEG2000_LOSSLESS, "jp2"), (synth.JPEG2000_LOSSLESS, "j2k"),
                         (synth.JPEG_LOSSLESS_SV1, "jpeg")):
        for p in (12, 14):
            assert rules.mode(syntax, kind, p).startswith(mode), (syntax, kind, p, rules.mode(syntax, kind, p))
    # a 16-bit codestream cannot be "scaled": such a decoder is exact there
    assert rules.mode(synth.JPEG2000_LOSSLESS, "j2k", 16).startswith("exact" if mode != "wrong" else "wrong")
    n = rules.decoder.calls
    rules.mode(synth.JPEG2000_LOSSLESS, "jp2", 12)
    assert rules.decoder.calls == n      # learnt once per kind, then cached


def test_probe_image_spans_the_precision():
    for p in (8, 12, 16):
        img = gpu_batch.probe_image(p)
        assert img.min() == 0 and img.max() == 2 ** p - 1 and len(np.unique(img)) >= min(500, 2 ** p)


def test_route_sends_signed_and_unknown_kinds_to_the_cpu():
    from rsna_utils.dicom.frames import Codestream
    from rsna_utils.dicom.header import DicomHeader
    rules = gpu_batch.DecodeRules(FakeGpuDecoder("exact"), "fake")
    h = DicomHeader(path="x.dcm", transfer_syntax=synth.JPEG2000_LOSSLESS, rows=8, columns=8)
    assert rules.route(h, Codestream("j2k", 8, 8, 12, 1)) is None
    assert "signed" in rules.route(h, Codestream("j2k", 8, 8, 12, 1, signed=True))
    assert "components" in rules.route(h, Codestream("j2k", 8, 8, 12, 3))
    h.transfer_syntax = "1.2.840.10008.1.2.5"
    assert "not decoded on the GPU" in rules.route(h, None)


@pytest.mark.parametrize("how", ["scaled", "wrong"])
def test_gpu_pipeline_with_a_misbehaving_decoder_still_matches_the_cpu(tmp_path, synth_small, how):
    """A decoder that scales is rescaled; one that is wrong for JPEG loses JPEG to the CPU path,
    with the reason in meta.csv; either way every output equals the CPU pipeline's."""
    import cv2
    cfg = PreprocessConfig(size=64)
    images, csv = synth_small / "train_images", synth_small / "train.csv"
    s = gpu.GpuPreprocessor(cfg, backend="fake", device="cpu", batch_size=8, progress=False,
                            decoder=FakeGpuDecoder(how, kinds=("jpeg",))).run(images, csv, tmp_path / "g")
    Preprocessor(cfg, workers=1, progress=False).run(images, csv, tmp_path / "c")
    g = pd.read_csv(tmp_path / "g" / "meta.csv").set_index("image_id")
    c = pd.read_csv(tmp_path / "c" / "meta.csv").set_index("image_id")
    assert s.failed == 0 and set(g.index) == set(c.index)
    jpeg = g.transfer_syntax == synth.JPEG_LOSSLESS_SV1
    j2k = g.transfer_syntax == synth.JPEG2000_LOSSLESS
    assert jpeg.any() and j2k.any()
    assert (g.loc[j2k, "gpu_route"] == "gpu").all()
    if how == "wrong":
        assert g.loc[jpeg, "gpu_route"].str.contains("self-test failed for jpeg").all()
        assert g.loc[jpeg, "backend"].str.startswith("cpu-fallback").all()
    else:
        assert (g.loc[jpeg, "gpu_route"] == "gpu").all()
    other = ~(jpeg | j2k)
    assert g.loc[other, "gpu_route"].str.contains("not decoded on the GPU").all()
    for iid in g.index:
        a = cv2.imread(str(tmp_path / "g" / g.loc[iid, "png"]), cv2.IMREAD_UNCHANGED).astype(int)
        b = cv2.imread(str(tmp_path / "c" / c.loc[iid, "png"]), cv2.IMREAD_UNCHANGED).astype(int)
        assert np.abs(a - b).mean() <= 1.0, iid


def test_corrupt_codestream_in_a_batch_costs_that_file_only(tmp_path, synth_small):
    """The corrupt file keeps a valid header, so it reaches the decoder; the decoder rejects it
    (None), the CPU path then fails it too, it lands in failures.csv, and the batch's other
    files are made."""
    import shutil

    from fuzz import corrupt_codestream
    images = tmp_path / "images"
    shutil.copytree(synth_small / "train_images", images)
    df = pd.read_csv(synth_small / "train.csv")
    j2k = [r for r in df.itertuples() if pydicom.dcmread(images / str(r.patient_id) / f"{r.image_id}.dcm",
                                                         stop_before_pixels=True).file_meta.TransferSyntaxUID
           == synth.JPEG2000_LOSSLESS]
    bad = j2k[0]
    p = images / str(bad.patient_id) / f"{bad.image_id}.dcm"
    p.write_bytes(corrupt_codestream(p.read_bytes(), seed=1))
    parse_codestream(first_frame(str(p)))          # the header still parses
    s = gpu.GpuPreprocessor(PreprocessConfig(size=64), backend="fake", device="cpu", batch_size=8,
                            progress=False, decoder=FakeGpuDecoder("exact")).run(
        images, synth_small / "train.csv", tmp_path / "g")
    assert s.failed + s.processed == len(df)
    if s.failed:     # OpenJPEG refused the stream on both paths
        assert s.failed == 1 and str(bad.image_id) in str(s.failures[0]["image_id"])
    assert s.processed >= len(df) - 1


def test_corrupt_codestream_keeps_the_dicom_structure(synth_small):
    from fuzz import corrupt_codestream
    p = next(q for q in sorted((synth_small / "train_images").glob("*/*.dcm"))
             if pydicom.dcmread(q, stop_before_pixels=True).file_meta.TransferSyntaxUID == synth.JPEG2000_LOSSLESS)
    data = p.read_bytes()
    bad = corrupt_codestream(data, seed=3)
    assert len(bad) == len(data) and bad != data and bad[:len(data) // 4] == data[:len(data) // 4]


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["nvimgcodec", "dali"])
def test_cuda_corrupt_frames_cost_one_file_and_memory_stays_flat(tmp_path, synth_small, backend):
    if not gpu_batch.package_available(backend):
        pytest.skip(f"{backend} not installed")
    import gc

    import torch
    from fuzz import corrupt_codestream
    paths = [str(p) for p in sorted((synth_small / "train_images").glob("*/*.dcm"))
             if pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID in gpu.GPU_SYNTAXES]
    dec = gpu_batch.make_decoder(backend, "cuda", 8)
    used = []
    for b in range(10):
        bad = tmp_path / f"bad{b}.dcm"
        bad.write_bytes(corrupt_codestream(open(paths[b % len(paths)], "rb").read(), seed=b))
        frames = [first_frame(p) for p in paths[:7]]
        frames.insert(b % 8, first_frame(str(bad)))
        out = dec.decode(frames)
        assert len(out) == 8
        assert all(x is not None for k, x in enumerate(out) if k != b % 8), b
        del out
        gc.collect()
        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info()
        used.append((total - free) / 2**20)
    assert max(used[2:]) - used[1] < 64, used      # MiB: flat after the first batches


def test_gpu_pipeline_reads_frames_in_worker_processes(tmp_path, synth_small):
    """load_workers > 0: headers and frames come from worker processes (the H200 bottleneck was
    reading in threads); the outputs are those of the threaded reader."""
    import cv2
    cfg = PreprocessConfig(size=64)
    images, csv = synth_small / "train_images", synth_small / "train.csv"
    runs = {}
    for n in (0, 2):
        s = gpu.GpuPreprocessor(cfg, backend="fake", device="cpu", batch_size=8, progress=False,
                                decoder=FakeGpuDecoder("exact"), load_workers=n).run(images, csv, tmp_path / str(n))
        assert s.failed == 0
        runs[n] = pd.read_csv(tmp_path / str(n) / "meta.csv").set_index("image_id").sort_index()
    assert (runs[0].gpu_route == runs[2].gpu_route).all()
    for iid in runs[0].index:
        a = cv2.imread(str(tmp_path / "0" / runs[0].loc[iid, "png"]), cv2.IMREAD_UNCHANGED)
        b = cv2.imread(str(tmp_path / "2" / runs[2].loc[iid, "png"]), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(a, b), iid


def test_the_scaled_rule_is_checked_per_file():
    """A probe said "scaled", but a file that comes back unscaled (as a real RSNA JP2 did from
    DALI) must not be divided by 16; a scaled one is brought back exactly."""
    import torch

    from rsna_utils.dicom.frames import Codestream
    from rsna_utils.dicom.header import DicomHeader
    stored = np.random.default_rng(0).integers(0, 4096, (64, 48)).astype(np.int64)
    stored[0, 0] = 4095
    scaled = np.rint(stored * 65535 / 4095)
    assert gpu_batch.looks_scaled(scaled, 12) and not gpu_batch.looks_scaled(stored, 12)
    assert gpu_batch.looks_scaled(torch.from_numpy(scaled.astype(np.int32)), 12)
    rules = gpu_batch.DecodeRules(FakeGpuDecoder("scaled"), "fake")
    h = DicomHeader(path="x.dcm", transfer_syntax=synth.JPEG2000_LOSSLESS, rows=64, columns=48)
    cs = Codestream("jp2", 64, 48, 12, 1)
    rules.modes[(h.transfer_syntax, "jp2", 12)] = "scaled"
    assert np.array_equal(rules.fix(scaled, h, cs), stored)
    assert np.array_equal(rules.fix(stored, h, cs), stored)


def test_auto_picks_a_gpu_decoder_only_once_it_built_and_passed_its_probe(monkeypatch, capsys):
    """`auto` builds each GPU plug-in and decodes its probe before choosing it: one that imports
    but fails to build (a CUDA 13 wheel on a CUDA 12 host) is passed over, the reason said once.
    Driven on the CPU device, where both libraries run their CPU backends."""
    from rsna_utils.dicom.decoders import registry
    needs_package("nvimgcodec")
    monkeypatch.setattr(gpu_batch, "_UNUSABLE", {})
    monkeypatch.setattr(errors_mod, "_SAID", set())
    gpu_batch.shared_decoder.cache_clear()
    assert gpu_batch.resolve_backend("auto", "cpu") == "nvimgcodec"     # built, probe exact
    assert gpu_batch.unusable("nvimgcodec", "cpu") is None

    class Broken:
        def __init__(self, **kw):
            raise RuntimeError("CUDA driver version is insufficient for CUDA runtime version")
    real_get = registry.get

    def get(name):
        mod = real_get(name)
        if name in gpu_batch.GPU_BACKENDS:
            return type("Plugin", (), {"BatchDecoder": Broken, "is_available": staticmethod(lambda: True)})
        return mod
    monkeypatch.setattr(registry, "get", get)
    monkeypatch.setattr(gpu_batch, "_UNUSABLE", {})
    gpu_batch.shared_decoder.cache_clear()
    assert gpu_batch.resolve_backend("auto", "cpu") == "cpu"
    assert gpu_batch.resolve_backend("auto", "cpu") == "cpu"
    err = capsys.readouterr().err
    assert err.count("decoding on the CPU:") == 1                       # said once
    assert "nvimgcodec did not build (RuntimeError: CUDA driver version is insufficient" in err
    assert "dali did not build" in err
    gpu_batch.shared_decoder.cache_clear()


def test_auto_passes_over_a_decoder_that_fails_its_probe(monkeypatch, capsys):
    class Wrong:
        def __init__(self, **kw):
            pass

        def decode(self, frames):
            return [np.zeros((4, 4), np.uint16) for _ in frames]
    from rsna_utils.dicom.decoders import registry
    monkeypatch.setattr(registry, "get", lambda name: type(
        "Plugin", (), {"BatchDecoder": Wrong, "is_available": staticmethod(lambda: True)}))
    monkeypatch.setattr(gpu_batch, "_UNUSABLE", {})
    monkeypatch.setattr(errors_mod, "_SAID", set())
    gpu_batch.shared_decoder.cache_clear()
    assert gpu_batch.resolve_backend("auto", "cpu") == "cpu"
    assert "failed its probe (wrong: shape (4, 4), expected (512, 512))" in capsys.readouterr().err
    gpu_batch.shared_decoder.cache_clear()
