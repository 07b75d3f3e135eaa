"""Below everything: the package's errors (one clear line each, atomic writes, full-disk
handling), settings as dataclass fields with their CLI flags, the one size parser, and the RSNA
table (`table`: its columns, `prediction_id`, the DICOM and PNG paths, the site ids)."""
