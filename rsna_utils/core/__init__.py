"""Below everything: the package's errors (one clear line each, atomic writes, full-disk
handling), settings as dataclass fields with their CLI flags, and the one size parser."""
