"""The synthetic generator's tables: patients and their images drawn from one seed (the
train and test plans that `synth.synthesize` renders and writes)."""
from __future__ import annotations

import numpy as np

from rsna_utils.sources.synth_machines import (ENCODING_SHARES, MACHINES, TEST_ONLY_MACHINES,
                                               Machine)


# ----------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------

def _draw_patients(rng: np.random.Generator, n: int, machines: list[Machine],
                   positive_rate: float, used_ids: set[int]) -> list[dict]:
    weights = np.array([m.weight for m in machines], dtype=float)
    weights /= weights.sum()
    patients = []
    for _ in range(n):
        pid = int(rng.integers(5, 65535))
        while pid in used_ids:
            pid = int(rng.integers(5, 65535))
        used_ids.add(pid)
        machine = machines[int(rng.choice(len(machines), p=weights))]
        age = float(np.clip(np.round(rng.normal(58, 10)), 26, 89))
        if rng.random() < 0.004:
            age = float("nan")
        density = rng.choice(list("ABCD"), p=[0.11, 0.44, 0.40, 0.05])
        patients.append(dict(
            patient_id=pid, machine=machine, site_id=machine.site_id, age=age,
            implant=int(rng.random() < 0.014),
            density=None if machine.site_id == 2 else str(density),
            # A positive patient has cancer in one breast (the real data: both views positive).
            cancer_side=(("L", "R")[int(rng.integers(2))] if rng.random() < positive_rate
                         else None),
            lesion_kind=("mass" if rng.random() < 0.7 else "calc"),
            lesion_strength=float(rng.uniform(0.35, 1.0)),
            lesion_size=float(rng.uniform(0.6, 1.4)),
        ))
    return patients


def _draw_images(rng: np.random.Generator, patients: list[dict], used_ids: set[int]) -> list[dict]:
    rows = []
    for p in patients:
        views = [(lat, v) for lat in ("L", "R") for v in ("CC", "MLO")]
        if rng.random() < 0.06:  # a few patients with an extra view
            views.append((("L", "R")[int(rng.integers(2))],
                          str(rng.choice(["MLO", "CC", "AT", "LM", "ML", "LMO"],
                                         p=[0.4, 0.35, 0.1, 0.07, 0.05, 0.03]))))
        breast_birads = {}
        for lat in ("L", "R"):
            positive = p["cancer_side"] == lat
            if p["site_id"] == 2:
                birads = float("nan")
            elif positive:
                birads = 0.0
            else:
                birads = float(rng.choice([0, 1, 2], p=[0.12, 0.6, 0.28]))
            biopsy = int(positive or (birads == 0 and rng.random() < 0.25))
            breast_birads[lat] = dict(
                cancer=int(positive), BIRADS=birads, biopsy=biopsy,
                invasive=int(positive and rng.random() < 0.7),
                difficult_negative_case=bool(biopsy and not positive))
        for lat, view in views:
            iid = int(rng.integers(10_000, 2**31 - 1))
            while iid in used_ids:
                iid = int(rng.integers(10_000, 2**31 - 1))
            used_ids.add(iid)
            enc = str(rng.choice(list(ENCODING_SHARES), p=list(ENCODING_SHARES.values())))
            m: Machine = p["machine"]
            rows.append(dict(
                site_id=p["site_id"], patient_id=p["patient_id"], image_id=iid,
                laterality=lat, view=view, age=p["age"], implant=p["implant"],
                density=p["density"], machine_id=m.machine_id, **breast_birads[lat],
                encoding=enc, jp2=bool(rng.random() < 0.9),
                modality_absent=bool(rng.random() < m.modality_absent),
                # chest wall on the left for L, right for R; a few stored the other way
                chest_left=(lat == "L") ^ bool(rng.random() < 0.08),
                lesion_kind=p["lesion_kind"], lesion_strength=p["lesion_strength"],
                lesion_size=p["lesion_size"],
            ))
    return rows


def plan_dataset(patients: int, seed: int, positive_rate: float,
                 test_patients: int) -> tuple[list[dict], list[dict]]:
    """Draw the train and test tables (one dict per image) from the seed."""
    rng = np.random.default_rng(seed)
    used: set[int] = set()
    train_p = _draw_patients(rng, patients, MACHINES, positive_rate, used)
    test_p = _draw_patients(rng, test_patients, MACHINES + TEST_ONLY_MACHINES, positive_rate, used)
    used_img: set[int] = set()
    return _draw_images(rng, train_p, used_img), _draw_images(rng, test_p, used_img)
