"""Real mammograms exported as 8-bit JPEG / PNG (e.g. the public RSNA export in
`../shared/realdata/rsna_dev`, `{patient_id}_{image_id}_*.jpg` under `benign/` and
`malignant/`) wrapped as an RSNA-shaped dataset: 12-bit DICOMs (JPEG 2000 in JP2 and JPEG
Lossless SV1, the generator's encoders), `train.csv` / `test.csv` / `test_labels.csv` with a
patient-grouped held-out test part. Then every step runs through the same commands a user runs.

The export has no laterality or view: the side is read from the image (where the breast's
mass lies), and the view is left unknown ("UNK"). About 16% of the RSNA export's images are
inverted (bright background, dense tissue dark): their originals were MONOCHROME1 and the export
wrote the stored values without applying it. Those are wrapped as MONOCHROME1 again, so the
pipeline's photometric handling shows every image black-background, as it does for the
competition's DICOMs."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from rsna_utils.core.errors import RsnaError

NAME = re.compile(r"^(\d+)_(\d+)")
# 2: inverted exports wrapped as MONOCHROME1 (1 wrapped them as they were, bright background)
WRAP_VERSION = 2
WRAP_FILE = "wrap.json"


def list_images(src: str | Path) -> pd.DataFrame:
    """One row per image file under src/benign and src/malignant: path, patient_id, image_id,
    cancer. A name without the `{patient_id}_{image_id}` prefix is an error naming it."""
    src = Path(src)
    rows = []
    for label, folder in ((0, "benign"), (1, "malignant")):
        d = src / folder
        if not d.is_dir():
            raise RsnaError(f"{d}: folder not found; expected {src}/benign and {src}/malignant")
        for p in sorted(d.iterdir()):
            if p.suffix.lower() not in (".jpg", ".jpeg", ".png"):
                continue
            m = NAME.match(p.name)
            if not m:
                raise RsnaError(f"{p}: name does not start with {{patient_id}}_{{image_id}}; rename it")
            rows.append(dict(path=str(p), patient_id=int(m.group(1)), image_id=int(m.group(2)), cancer=label))
    if not rows:
        raise RsnaError(f"{src}: no .jpg/.png images under benign/ and malignant/")
    df = pd.DataFrame(rows)
    dup = df[df.image_id.duplicated(keep=False)]
    if len(dup):   # an image listed twice keeps its malignant label (labels are per breast)
        df = df.sort_values("cancer").drop_duplicates("image_id", keep="last")
    return df.sort_values(["patient_id", "image_id"]).reset_index(drop=True)


def side_of_breast(gray: np.ndarray) -> str:
    """"L" when the breast's mass lies in the left half of the image, else "R" (the export
    has no ImageLaterality; what matters is that the views of one breast agree)."""
    g = gray.astype(np.float32)
    border = np.median(np.concatenate([g[:, :4].ravel(), g[:, -4:].ravel()]))
    mass = np.abs(g - border)
    cols = mass.sum(0)
    half = len(cols) // 2
    return "L" if cols[:half].sum() >= cols[half:].sum() else "R"


def is_inverted(gray: np.ndarray) -> bool:
    """True for a MONOCHROME1 mammogram exported with its stored values shown as is (background
    white, dense tissue dark): `roi.looks_inverted`, the check preprocessing also makes after
    windowing. On the RSNA export it splits the images with a wide margin, also where the
    breast reaches both sides of the stretched frame."""
    from rsna_utils.image.roi import looks_inverted
    return looks_inverted(gray)


def _wrap_one(args) -> dict:
    path, out_path, row = args
    import cv2

    from rsna_utils.sources.synth import encode_dicom
    gray = cv2.imread(path, cv2.IMREAD_GRAYSCALE)
    if gray is None:
        raise RsnaError(f"{path}: unreadable image")
    stored = gray.astype(np.uint16) * 16 + 8           # 8-bit export -> 12-bit stored values
    lat = side_of_breast(gray)
    inverted = is_inverted(gray)
    # machine 48 writes MONOCHROME1 (its PixelPaddingValue 4095 lies above every wrapped value)
    r = dict(row, laterality=lat, view="UNK", machine_id=48 if inverted else 216, modality_absent=0,
             encoding="j2k" if row["image_id"] % 2 else "jpll", jp2=bool(row["image_id"] % 4 == 1))
    ds = encode_dicom(stored, r, ([2048.0], [4096.0]), seed=0)
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out_path, enforce_file_format=True)
    return dict(image_id=row["image_id"], laterality=lat, machine_id=r["machine_id"])


def wrap(src: str | Path, out: str | Path, test_frac: float = 0.25, seed: int = 0,
         workers: int | None = None, limit: int | None = None, progress: bool = True) -> dict:
    """Write out/train_images, out/test_images (DICOM), train.csv, test.csv, test_labels.csv,
    sample_submission.csv. Patients are split train/test (stratified by whether the patient
    has a cancer). Returns counts."""
    from concurrent.futures import ProcessPoolExecutor

    from tqdm.auto import tqdm

    from rsna_utils.learn.data import holdout_split
    df = list_images(src)
    if limit:
        keep = df.drop_duplicates("patient_id").sample(frac=1, random_state=seed).patient_id
        chosen, n = [], 0
        for p in keep:
            chosen.append(p)
            n += int((df.patient_id == p).sum())
            if n >= limit:
                break
        df = df[df.patient_id.isin(chosen)].reset_index(drop=True)
    out = Path(out)
    df["laterality"] = "L"      # provisional, for the split helper
    df["fold"] = holdout_split(df, test_frac, seed)
    df["part"] = np.where(df.fold == 1, "test", "train")
    jobs = [(r.path, str(out / f"{r.part}_images" / str(r.patient_id) / f"{r.image_id}.dcm"),
             dict(patient_id=int(r.patient_id), image_id=int(r.image_id))) for r in df.itertuples()]
    res = []
    workers = workers or min(os.cpu_count() or 1, 8)
    with ProcessPoolExecutor(workers) as ex:
        for r in tqdm(ex.map(_wrap_one, jobs, chunksize=8), total=len(jobs), desc="wrap",
                      disable=not progress):
            res.append(r)
    df = df.drop(columns="laterality").merge(pd.DataFrame(res), on="image_id")
    df["site_id"], df["view"], df["age"], df["implant"] = 1, "UNK", np.nan, 0
    for c in ("biopsy", "invasive", "BIRADS", "density", "difficult_negative_case"):
        df[c] = np.nan
    df["prediction_id"] = df.patient_id.astype(str) + "_" + df.laterality
    from rsna_utils.sources.synth import SUBMISSION_COLUMNS, TEST_COLUMNS, TRAIN_COLUMNS
    out.mkdir(parents=True, exist_ok=True)
    train, test = df[df.part == "train"], df[df.part == "test"]
    train[TRAIN_COLUMNS].to_csv(out / "train.csv", index=False)
    test[TEST_COLUMNS].to_csv(out / "test.csv", index=False)
    test[["prediction_id", "patient_id", "image_id", "cancer"]].to_csv(out / "test_labels.csv", index=False)
    pd.DataFrame({"prediction_id": test.prediction_id.drop_duplicates(), "cancer": 0.0})[
        SUBMISSION_COLUMNS].to_csv(out / "sample_submission.csv", index=False)
    counts = dict(out=str(out), train_images=len(train), test_images=len(test),
                  train_patients=int(train.patient_id.nunique()),
                  test_patients=int(test.patient_id.nunique()),
                  train_positive=int(train.cancer.sum()), test_positive=int(test.cancer.sum()),
                  monochrome1=int((df.machine_id == 48).sum()))
    (out / WRAP_FILE).write_text(json.dumps({"version": WRAP_VERSION, **counts}, indent=2))
    return counts


def check_wrapped(out: str | Path) -> bool:
    """True when `out` holds a wrap made by this version; False when nothing is wrapped there
    yet; an older wrap is an error naming it (its PNGs would keep the old pixels)."""
    out = Path(out)
    if not (out / "train.csv").exists():
        return False
    try:
        version = json.loads((out / WRAP_FILE).read_text()).get("version")
    except (OSError, ValueError, AttributeError):
        version = 1
    if version != WRAP_VERSION:
        raise RsnaError(f"{out}: wrapped by an older version ({version}; now {WRAP_VERSION}: "
                        "inverted exports become MONOCHROME1); delete it and the PNG folders "
                        "made from it, or wrap into another folder")
    return True
