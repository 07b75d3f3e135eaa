"""Errors a user can act on. The CLI prints them as one line and exits non-zero."""


class RsnaError(Exception):
    """Base class: the message names the file or value, what is wrong, and the fix."""


class DecodeError(RsnaError):
    """No backend could decode a DICOM file's pixel data."""
