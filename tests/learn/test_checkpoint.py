"""`learn.checkpoint.Checkpoint` and its `InputSpec`: the train <-> inference contract, its
defaults spelled once, and checkpoints written by 0.2 (and older) still loading."""
import re
from pathlib import Path

import pytest
import torch
from conftest import REPO

from rsna_utils.core.errors import RsnaError
from rsna_utils.learn.checkpoint import (DEFAULT_NORM, DEFAULT_PRIOR, INPUT_RESIZE, Checkpoint,
                                         InputSpec, load_checkpoints)

PACKAGE = REPO / "rsna_utils"


def test_input_spec_normalised_on_creation():
    for size in ([96, 64], (96, 64), "96x64", [96.0, 64.0]):
        spec = InputSpec(size)
        assert spec.size == (96, 64) and all(type(v) is int for v in spec.size)
    assert InputSpec(128).size == (128, 128)
    spec = InputSpec([96, 64], 3, [[0.1, 0.2, 0.3], [1, 2, 3]], level="breast")
    assert spec.norm == ((0.1, 0.2, 0.3), (1.0, 2.0, 3.0))
    assert InputSpec().norm == DEFAULT_NORM and InputSpec().resize == INPUT_RESIZE
    with pytest.raises(Exception):
        spec.size = (1, 1)                                       # frozen
    assert InputSpec.from_checkpoint(spec.to_dict()) == spec
    assert spec.to_dict() == {"channels": 3, "size": [96, 64], "resize": INPUT_RESIZE,
                              "norm": [[0.1, 0.2, 0.3], [1.0, 2.0, 3.0]], "level": "breast"}
    with pytest.raises(RsnaError, match=r"input size \[1, 2, 3\]: expected \[height, width\]"):
        InputSpec([1, 2, 3])


def _net():
    from rsna_utils.learn.models import create_model
    torch.manual_seed(0)
    return create_model("resnet18", 3, global_pool="avg", legacy_pool=True).eval()


def _pre():
    from rsna_utils.image.preprocess import PreprocessConfig
    return PreprocessConfig(size=(64, 48)).to_dict()


def test_checkpoint_written_by_0_2_loads(tmp_path):
    """A hand-made dict in 0.2's shape (and an older one without the input keys, threshold or
    prior) saved by torch.save loads, each missing key at its one default, and scores."""
    net = _net()
    v02 = {"model": net.state_dict(), "model_name": "resnet18", "epoch": 4,
           "config": {"model": "resnet18", "size": [64, 48]}, "preprocess": _pre(),
           "channels": 3, "size": [64, 48], "global_pool": "avg",
           "norm": [[0.485, 0.456, 0.406], [0.229, 0.224, 0.225]], "resize": dict(INPUT_RESIZE),
           "aux": [], "level": "image", "threshold": 0.37, "metrics": {"auc": 0.6},
           "prior": 0.03, "history": [{"epoch": 4}], "best": {"epoch": 4},
           "legacy_note": "kept"}
    torch.save(v02, tmp_path / "v02.pt")
    ck = Checkpoint.load(tmp_path / "v02.pt")
    assert (ck.threshold, ck.prior, ck.epoch, ck.input.size) == (0.37, 0.03, 4, (64, 48))
    assert ck.extra == {"legacy_note": "kept"}
    again = ck.to_dict()
    assert set(again) == set(v02) and {k: again[k] for k in v02 if k != "model"} == \
        {k: v for k, v in v02.items() if k != "model"}

    old = {"model": net.state_dict(), "model_name": "resnet18", "preprocess": _pre()}
    torch.save(old, tmp_path / "old.pt")
    ck = Checkpoint.load(tmp_path / "old.pt")
    assert (ck.threshold, ck.prior, ck.global_pool, ck.aux) == (0.5, DEFAULT_PRIOR, "avg", [])
    assert ck.input == InputSpec((64, 48), 3, DEFAULT_NORM, INPUT_RESIZE, "image")
    assert (ck.epoch, ck.history, ck.optimizer) == (None, [], None)

    models, pre = load_checkpoints([tmp_path / "old.pt", tmp_path / "v02.pt"], "cpu")
    m_old, m_v02 = models
    assert (m_old.threshold, m_old.prior, m_old.size, m_old.norm, m_old.level) == \
        (0.5, DEFAULT_PRIOR, (64, 48), DEFAULT_NORM, "image")
    assert (m_v02.threshold, m_v02.prior, m_v02.norm[0]) == (0.37, 0.03, (0.485, 0.456, 0.406))
    assert m_old.input == InputSpec((64, 48)) and m_v02.input == Checkpoint.load(
        tmp_path / "v02.pt").input                      # LoadedModel reads its input from it
    x = torch.rand(2, 3, 64, 48)
    with torch.no_grad():
        assert torch.equal(m_old.model(x), net(x)) and torch.equal(m_v02.model(x), net(x))


def test_checkpoint_save_load_round_trip(tmp_path):
    """Checkpoint.save writes the keys 0.2 wrote: last.pt with the resume state (ema even when
    None), best.pt without it; torch.load of the file is the plain dict the old readers take."""
    net = _net()
    last = Checkpoint(net.state_dict(), "resnet18", InputSpec("64x48"), preprocess=_pre(),
                      threshold=0.4, config={"model": "resnet18"}, epoch=0, metrics={"auc": 0.5},
                      history=[{"epoch": 0}], best={"epoch": 0}, optimizer={"state": {}},
                      scheduler={"last_epoch": 1})
    last.save(tmp_path / "last.pt")
    last.without_resume_state().save(tmp_path / "best.pt")
    raw = torch.load(tmp_path / "last.pt", weights_only=False)
    assert set(raw) == {"model", "optimizer", "scheduler", "ema", "epoch", "config", "preprocess",
                        "model_name", "channels", "size", "global_pool", "norm", "resize", "aux",
                        "level", "threshold", "metrics", "prior", "history", "best"}
    assert raw["ema"] is None and raw["size"] == [64, 48] and raw["threshold"] == 0.4
    best = torch.load(tmp_path / "best.pt", weights_only=False)
    assert set(raw) - set(best) == {"optimizer", "scheduler", "ema"}
    back = Checkpoint.load(tmp_path / "last.pt")
    assert back.input == last.input and back.threshold == 0.4 and back.optimizer == {"state": {}}
    assert not list(tmp_path.glob(".*tmp*"))


def test_checkpoint_not_one(tmp_path):
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "w.pt")
    with pytest.raises(RsnaError, match=r"w.pt: not a checkpoint of `rsna train`"):
        Checkpoint.load(tmp_path / "w.pt")
    with pytest.raises(RsnaError, match=r"x.pt: not a checkpoint of `rsna train` \(no 'model'"):
        Checkpoint.from_dict({"model": {}}, "x.pt")


# a checkpoint key read with its own default (`ck.get("threshold", 0.5)`), or a default of
# the contract spelled out: each belongs in learn/checkpoint.py only
KEYS = ("threshold", "prior", "channels", "size", "norm", "resize", "level", "global_pool", "aux",
        "preprocess", "history", "model_name")
SECOND_DEFAULT = [
    re.compile(r"\b(ck|ckpt|checkpoint|state|last)\.get\(\s*[\"'](%s)[\"']\s*," % "|".join(KEYS)),
    re.compile(r"[\"']threshold[\"']\s*[,:]\s*0?\.5\b"),
    re.compile(r"[\"']prior[\"']\s*[,:]\s*0?\.0\d"),
    re.compile(r"[\"']resize[\"']\)?\s*or\s*\{"),
]
# the mean / std of checkpoints without one: `learn.data.DEFAULT_NORM` (the data layer's tensor
# functions take it as their default; checkpoint.py imports it), spelled there only
NORM_LITERAL = re.compile(r"0\.25,\s*0\.25,\s*0\.25")


def second_defaults(root: Path = PACKAGE) -> list[str]:
    home = root / "learn" / "checkpoint.py"
    hits = []
    for f in sorted(root.rglob("*.py")):
        if f == home:
            continue
        for n, line in enumerate(f.read_text().splitlines(), 1):
            if any(p.search(line) for p in SECOND_DEFAULT) or (
                    NORM_LITERAL.search(line) and f != root / "learn" / "data.py"):
                hits.append(f"{f.relative_to(root.parent)}:{n}: {line.strip()}")
    return hits


def test_checkpoint_defaults_spelled_once(tmp_path):
    hits = second_defaults()
    assert not hits, ("checkpoint defaults spelled outside learn/checkpoint.py (read them from "
                      "Checkpoint / InputSpec instead):\n" + "\n".join(hits))
    # the grep sees a second spelling where one appears
    pkg = tmp_path / "rsna_utils"
    (pkg / "learn").mkdir(parents=True)
    (pkg / "learn" / "checkpoint.py").write_text('t = ck.get("threshold", 0.5)\n')
    (pkg / "other.py").write_text('t = float(ckpt.get("threshold", 0.5))\nn = (0.25, 0.25, 0.25)\n')
    assert [h.split(":")[1] for h in second_defaults(pkg)] == ["1", "2"]
