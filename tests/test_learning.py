"""Learning for real (slow; `make test-slow`, run by CI): a small model trained on this CPU
from scratch reaches breast-level ROC AUC >= 0.9 on held-out patients of a synthetic set with
planted lesions."""
import pytest

from rsna_utils.preprocess import PreprocessConfig, Preprocessor
from rsna_utils.synth import synthesize
from rsna_utils.train import TrainConfig, train


@pytest.mark.slow
def test_resnet18_learns_planted_lesions(tmp_path):
    synthesize(tmp_path / "data", patients=200, seed=5, positive_rate=0.3, size="small",
               progress=False)
    Preprocessor(PreprocessConfig(size=128), workers=2, progress=False).run(
        tmp_path / "data" / "train_images", tmp_path / "data" / "train.csv", tmp_path / "png")
    best = train(TrainConfig(data=str(tmp_path / "png"), csv=str(tmp_path / "data" / "train.csv"),
                             out=str(tmp_path / "run"), model="resnet18", size=128, epochs=6,
                             batch_size=16, lr=3e-4, upsample=1.0, pos_weight=1.0, augment=False,
                             global_pool="max", workers=1, device="cpu", progress=False, seed=42))
    m = best["metrics"]
    assert m["breast_mean_positives"] >= 5
    assert m["breast_mean_auc"] >= 0.9, m
