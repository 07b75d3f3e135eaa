"""Data sources in the RSNA shape: the synthetic generator and the real-image wrapper."""
