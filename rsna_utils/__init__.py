"""rsna_utils: RSNA screening-mammography pipeline (DICOM -> images -> model -> submission.csv).

The subpackages follow the data, bottom up: `core` (errors, settings, sizes), `dicom` (the file
and its decoder plug-ins), `image` (windowing, ROI, the per-image plan, the folder runner, GPU
preprocessing), `learn` (datasets, models, weights, the checkpoint contract, training, metrics),
`infer` (prediction, the ensemble, thresholds, calibration, Kaggle export), `reports`
(evaluation, heatmaps, exam figures, plots, the HTML report, EDA) and `app` (the CLI, notebook
plans, the Kaggle bundle); `sources` holds the synthetic generator and the real-image wrapper.
A module imports only its own subpackage and those below it (tests/project/test_layers.py).

Heavy and optional dependencies (torch, timm, DALI, nvImageCodec) are imported inside the
functions that need them, so `import rsna_utils` works on a bare CPU box. The flat module names
of earlier releases (`rsna_utils.preprocess`, ...) still import, with a DeprecationWarning
naming the new home (`rsna_utils._moved`).
"""
from rsna_utils import _moved

__version__ = "0.2.0"

_moved.install()
