"""rsna_utils: RSNA screening-mammography pipeline (DICOM -> images -> model -> submission.csv).

Heavy and optional dependencies (torch, timm, DALI, nvImageCodec) are imported inside the
functions that need them, so `import rsna_utils` works on a bare CPU box.
"""
__version__ = "0.1.0"
