"""Data sources in the RSNA shape: the synthetic generator, the real-image wrapper and the
adapters of public datasets (`rsna ingest`)."""
