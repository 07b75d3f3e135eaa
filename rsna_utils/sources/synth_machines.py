"""The synthetic generator's acquisition devices: what each machine writes into every file
(sizes, photometric, windows, bits, rescale, padding, a missing Modality), the encodings' shares
and their transfer syntaxes."""
from __future__ import annotations

from dataclasses import dataclass

from rsna_utils.dicom.uids import EXPLICIT_VR_LE, JPEG2000_LOSSLESS, JPEG_LOSSLESS_SV1, RLE_LOSSLESS

MAMMO_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"


@dataclass(frozen=True)
class Machine:
    """One acquisition device: what it writes into every file it produces."""
    machine_id: int
    site_id: int
    weight: float                 # share of patients (train); test adds unseen machines
    full: tuple[int, int]         # Rows, Columns at --size full
    small: tuple[int, int]        # Rows, Columns at --size small
    manufacturer: str
    photometric: str = "MONOCHROME2"
    voi_function: str | None = None      # None: tag absent (LINEAR by default)
    n_windows: int = 1
    bits_stored: int = 12
    rescale: tuple[float, float] | None = None   # (slope, intercept) when written
    padding: bool = True                          # writes PixelPaddingValue
    modality_absent: float = 0.0                  # share of files without Modality


L_FULL, L_SMALL = (4096, 3328), (512, 416)
M_FULL, M_SMALL = (3328, 2560), (480, 368)
R_FULL, R_SMALL = (2776, 2082), (448, 336)
S_FULL, S_SMALL = (2294, 1914), (416, 348)

MACHINES = [
    Machine(49, 1, 0.43, L_FULL, L_SMALL, "HOLOGIC, Inc.", rescale=(1.0, 0.0)),
    Machine(48, 1, 0.10, L_FULL, L_SMALL, "HOLOGIC, Inc.", photometric="MONOCHROME1"),
    Machine(29, 1, 0.12, M_FULL, M_SMALL, "GE MEDICAL SYSTEMS", voi_function="SIGMOID",
            n_windows=3, padding=False),
    Machine(21, 2, 0.08, S_FULL, S_SMALL, "Philips", n_windows=2, modality_absent=0.5),
    Machine(93, 2, 0.07, R_FULL, R_SMALL, "FUJIFILM Corporation", photometric="MONOCHROME1",
            rescale=(1.0, 0.0)),
    Machine(210, 2, 0.10, S_FULL, S_SMALL, "GE HEALTHCARE", voi_function="SIGMOID"),
    Machine(216, 1, 0.04, R_FULL, R_SMALL, "SIEMENS", voi_function="LINEAR", padding=False),
    Machine(170, 2, 0.03, M_FULL, M_SMALL, "Planmed", modality_absent=1.0),
    Machine(190, 2, 0.02, S_FULL, S_SMALL, "IMS", padding=False),
    Machine(197, 1, 0.01, L_FULL, L_SMALL, "HOLOGIC, Inc.", bits_stored=16,
            rescale=(0.0625, 0.0)),
]
# Machines that appear only in the test set (the real test set has unseen machine_ids).
TEST_ONLY_MACHINES = [
    Machine(1070, 2, 0.08, M_FULL, M_SMALL, "FUJIFILM Corporation", padding=False),
]

ENCODING_SHARES = {"j2k": 0.47, "jpll": 0.47, "raw": 0.03, "rle": 0.03}
TRANSFER_SYNTAX = {"j2k": JPEG2000_LOSSLESS, "jpll": JPEG_LOSSLESS_SV1, "raw": EXPLICIT_VR_LE,
                   "rle": RLE_LOSSLESS}


def _machine(machine_id: int) -> Machine:
    for m in MACHINES + TEST_ONLY_MACHINES:
        if m.machine_id == machine_id:
            return m
    raise KeyError(machine_id)
