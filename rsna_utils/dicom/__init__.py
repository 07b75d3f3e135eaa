"""The DICOM file: header, frames, transfer syntaxes and the decoder plug-ins that turn a file's
pixel data into stored values (`reader.read_dicom`)."""
