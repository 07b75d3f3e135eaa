"""Inference: prediction from checkpoints, the ensemble (`ensemble.json`), out-of-fold
thresholds, calibration and the Kaggle export."""
