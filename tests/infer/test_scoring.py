"""The loaded ensemble (`infer.scoring.LoadedEnsemble`): built once from checkpoints or from an
exported ensemble.json, it scores as `rsna predict` does and carries the settings of the cut."""
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from rsna_utils.core.errors import RsnaError
from rsna_utils.infer.predict import predict
from rsna_utils.infer.scoring import LoadedEnsemble
from rsna_utils.learn.data import load_table

CPU = torch.device("cpu")


def test_a_loaded_ensemble_scores_each_image_as_predict_does(tmp_path, synth_small, tiny_ckpt):
    ens = LoadedEnsemble.from_checkpoints([tiny_ckpt, tiny_ckpt], CPU)
    assert len(ens.models) == 2 and np.allclose(ens.weights.sum(), 1.0)
    df = load_table(synth_small / "test.csv")
    preds, reasons, inverted, attention = ens.score_images(
        df, synth_small / "test_images", workers=0, progress=False)
    assert len(preds) == len(df) and not any(reasons) and np.isfinite(preds).all()
    assert np.isnan(attention).all()                   # no breast-level member
    res = predict(synth_small / "test_images", synth_small / "test.csv", [tiny_ckpt], None,
                  workers=0, progress=False)
    # two copies of one checkpoint average to that checkpoint
    np.testing.assert_allclose(preds, res.images["prediction"].to_numpy(), rtol=1e-5, atol=1e-6)
    breasts = ens.score_breasts(res.images)
    assert list(breasts["prediction_id"]) == sorted(res.submission["prediction_id"]) or \
        set(breasts["prediction_id"]) == set(res.submission["prediction_id"])
    by_id = dict(zip(breasts["prediction_id"], breasts["prediction"]))
    np.testing.assert_allclose([by_id[p] for p in res.submission["prediction_id"]],
                               res.submission["cancer"], rtol=1e-6)


def test_its_threshold_prior_and_cut_come_from_the_members_unless_given(tiny_ckpt):
    ck = torch.load(tiny_ckpt, weights_only=True)
    ens = LoadedEnsemble.from_checkpoints(tiny_ckpt, CPU)
    assert ens.threshold == pytest.approx(ck["threshold"])
    assert ens.prior == pytest.approx(ck["prior"])
    ens = LoadedEnsemble.from_checkpoints(tiny_ckpt, CPU, threshold_given=0.25, oof_rate=0.1)
    values = np.linspace(0, 1, 200, endpoint=False)
    column, cut = ens.cut(values, "binary")
    assert cut["threshold"] == 0.25 and cut["judged"] and cut["fell_back"]   # 75% flagged
    assert column.sum() == 20                             # the top 10% instead
    column, cut = ens.cut(values, "probability")
    assert cut == {} and column is values


def test_from_json_takes_the_settings_the_ensemble_decides(tmp_path, tiny_ckpt):
    out = tmp_path / "rsna-models"
    out.mkdir()
    shutil.copyfile(tiny_ckpt, out / "m.pt")
    (out / "ensemble.json").write_text(json.dumps({
        "checkpoints": ["m.pt"], "threshold": 0.3, "binarize": "threshold", "agg": "max",
        "tta": True, "quantile": 0.05}))
    ens = LoadedEnsemble.from_json(out, CPU)
    assert (ens.threshold, ens.agg, ens.tta, ens.binarize_how, ens.oof_rate) == \
        (0.3, "max", True, "threshold", 0.05)
    assert ens.models[0].path.endswith("m.pt")
    with pytest.raises(RsnaError, match="tuned on max-aggregated breasts but --agg is mean"):
        LoadedEnsemble.from_json(out, CPU, agg="mean")
    with pytest.raises(RsnaError, match="no ensemble file"):
        LoadedEnsemble.from_json(tmp_path / "nowhere", CPU)


def test_a_table_without_a_readable_view_gets_the_prior(tiny_ckpt):
    ens = LoadedEnsemble.from_checkpoints(tiny_ckpt, CPU, agg="mean")
    imgs = pd.DataFrame({"prediction_id": ["1_L", "1_L", "1_R"],
                         "prediction": [0.2, 0.4, np.nan]})
    b = ens.score_breasts(imgs).set_index("prediction_id")["prediction"]
    assert b["1_L"] == pytest.approx(0.3) and b["1_R"] == pytest.approx(ens.prior)
    assert ens.score_breasts(imgs, "max").set_index("prediction_id")["prediction"]["1_L"] == \
        pytest.approx(0.4)
