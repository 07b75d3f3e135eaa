"""The synthetic generator's files: one image rendered, quantised and encoded into a pydicom
Dataset with its machine's tags and the row's transfer syntax."""
from __future__ import annotations

import numpy as np

from rsna_utils.sources.synth_machines import MAMMO_FOR_PRESENTATION, TRANSFER_SYNTAX, _machine
from rsna_utils.sources.synth_pixels import _window, render_image, to_stored


def _uid(seed: int, *parts) -> str:
    from pydicom.uid import generate_uid
    return generate_uid(prefix="1.2.826.0.1.3680043.10.1337.", entropy_srcs=[str(seed)] + [str(p) for p in parts])


def encode_dicom(stored: np.ndarray, row: dict, window: tuple[list, list], seed: int):
    """Build the pydicom Dataset of one image (pixels encoded per the row's encoding)."""
    import imagecodecs
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate

    m = _machine(row["machine_id"])
    ts = TRANSFER_SYNTAX[row["encoding"]]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MAMMO_FOR_PRESENTATION
    meta.MediaStorageSOPInstanceUID = _uid(seed, "sop", row["image_id"])
    meta.TransferSyntaxUID = ts
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = MAMMO_FOR_PRESENTATION
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = _uid(seed, "study", row["patient_id"])
    ds.SeriesInstanceUID = _uid(seed, "series", row["image_id"])
    ds.PatientID = str(row["patient_id"])
    ds.InstanceNumber = 1
    if not row["modality_absent"]:
        ds.Modality = "MG"
    ds.Manufacturer = m.manufacturer
    ds.BodyPartExamined = "BREAST"
    ds.ImageLaterality = row["laterality"]
    ds.ViewPosition = row["view"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = m.photometric
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated = 16
    ds.BitsStored = m.bits_stored
    ds.HighBit = m.bits_stored - 1
    ds.PixelRepresentation = 0
    centers, widths = window
    ds.WindowCenter = centers if len(centers) > 1 else centers[0]
    ds.WindowWidth = widths if len(widths) > 1 else widths[0]
    if len(centers) > 1:
        ds.WindowCenterWidthExplanation = ["NORMAL", "HARDER", "SOFTER"][: len(centers)]
    if m.voi_function:
        ds.VOILUTFunction = m.voi_function
    if m.rescale:
        ds.RescaleSlope, ds.RescaleIntercept = m.rescale
        ds.RescaleType = "US"
    if m.padding:
        ds.PixelPaddingValue = (2 ** m.bits_stored - 1) if m.photometric == "MONOCHROME1" else 0
    ds.PixelSpacing = [0.07, 0.07]

    enc = row["encoding"]
    if enc == "raw":
        ds.PixelData = stored.astype("<u2").tobytes()
    elif enc == "rle":
        from pydicom.uid import RLELossless
        ds.compress(RLELossless, stored, encoding_plugin="pydicom", generate_instance_uid=False)
    else:
        if enc == "j2k":
            frame = imagecodecs.jpeg2k_encode(stored, level=0, reversible=True,
                                              codecformat="jp2" if row["jp2"] else "j2k",
                                              bitspersample=m.bits_stored, numthreads=1)
        else:
            frame = imagecodecs.jpeg8_encode(stored, lossless=True, predictor=1,
                                             bitspersample=m.bits_stored)
        ds.PixelData = encapsulate([bytes(frame)])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    return ds


def make_image(row: dict, size: str, seed: int, index: int):
    """Render, quantise and encode image number `index` of a plan: (stored, objects, dataset).

    `stored` is exactly what the DICOM file holds; tests decode the file and compare.
    """
    ss = np.random.SeedSequence([seed, index])
    img_seed, val_seed = ss.spawn(2)
    img, objects = render_image(row, size, img_seed)
    m = _machine(row["machine_id"])
    rng = np.random.default_rng(val_seed)
    stored = to_stored(img, m, rng)
    if m.padding:  # padded machines write the exact padding value outside the breast
        stored[img <= 0.02] = (2 ** m.bits_stored - 1) if m.photometric == "MONOCHROME1" else 0
    # the window from the tissue alone, as a vendor's window follows the breast: with the planted
    # lesions in, a bright mass stretched the window and darkened the whole image, so a cancer
    # could be read off the median brightness (image AUC 0.80-0.84 on seed 7) without finding
    # it. The lesions' own pixels are left out (not their boxes: a box also drops the tissue
    # around a mass, more of it on cancer images), and the burned-in markers.
    tissue = (img > 0.2) & ~objects.pop("lesion_pixels")
    for _, y0, x0, y1, x1 in objects["markers"]:
        tissue[y0:y1, x0:x1] = False
    ds = encode_dicom(stored, row, _window(stored, tissue, m, rng), seed)
    return stored, objects, ds
