"""The RSNA table has one home, `core.table`: the breast key `prediction_id`, an image's DICOM
path `{patient_id}/{image_id}.dcm` and its PNG path `{patient_id}_{image_id}.png` are each built
in that module only. The package is read as code (every f-string and every `+` of strings), so a
second spelling anywhere fails here and names its module and line."""
import ast

import pandas as pd
import pytest
from conftest import REPO

from rsna_utils.core import table

PKG = REPO / "rsna_utils"
HOME = "core/table.py"


def _pieces(node) -> list:
    """The parts of a string built by an f-string or a chain of `+`: str for a constant piece,
    the source text (in braces) of any other."""
    if isinstance(node, ast.JoinedStr):
        out = []
        for v in node.values:
            if isinstance(v, ast.Constant):
                out.append(str(v.value))
            else:
                out.append("{" + ast.unparse(v.value) + "}")
        return out
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _pieces(node.left) + _pieces(node.right)
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    return ["{" + ast.unparse(node) + "}"]


def _value_then(pieces: list, text: str, start: bool = True) -> bool:
    """A value piece followed by a constant piece that starts with (or is) `text`."""
    return any(p.startswith("{") and (q.startswith(text) if start else q == text)
               for p, q in zip(pieces, pieces[1:]))


def spellings(code: str) -> dict[str, list[int]]:
    """Lines (per kind) where `code` builds a prediction_id, a DICOM path or a PNG path."""
    out = {"prediction_id": [], "dicom": [], "png": []}
    tree = ast.parse(code)
    inner = set()          # the parts of a `+` chain already read with the whole chain
    for n in ast.walk(tree):
        if isinstance(n, ast.BinOp) and isinstance(n.op, ast.Add):
            for c in (n.left, n.right):
                if isinstance(c, ast.BinOp):
                    inner.add(id(c))
    for n in ast.walk(tree):
        if not (isinstance(n, ast.JoinedStr) or isinstance(n, ast.BinOp)
                and isinstance(n.op, ast.Add) and id(n) not in inner):
            continue
        pieces = _pieces(n)
        if not any(p.startswith("{") for p in pieces):
            continue
        values = " ".join(p for p in pieces if p.startswith("{"))
        # {patient}_{laterality}: the breast key
        if "lat" in values and any(
                a.startswith("{") and b == "_" and c.startswith("{")
                for a, b, c in zip(pieces, pieces[1:], pieces[2:])):
            out["prediction_id"].append(n.lineno)
        # {image_id}.dcm (after {images}/{patient_id}/ or a Path's /)
        if _value_then(pieces, ".dcm"):
            out["dicom"].append(n.lineno)
        # {patient_id}_{image_id}.png
        if any(a.startswith("{") and b == "_" and c.startswith("{") and d.startswith(".png")
               for a, b, c, d in zip(pieces, pieces[1:], pieces[2:], pieces[3:])):
            out["png"].append(n.lineno)
    return out


def where_spelled() -> dict[str, dict[str, list[int]]]:
    """kind -> {module: lines} over the package."""
    found: dict[str, dict[str, list[int]]] = {"prediction_id": {}, "dicom": {}, "png": {}}
    for p in sorted(PKG.rglob("*.py")):
        for kind, lines in spellings(p.read_text()).items():
            if lines:
                found[kind][str(p.relative_to(PKG))] = lines
    return found


@pytest.mark.parametrize("kind", ["prediction_id", "dicom", "png"])
def test_each_is_spelled_in_core_table_only(kind):
    where = where_spelled()[kind]
    assert list(where) == [HOME], (
        f"{kind} is built outside {HOME} (call rsna_utils.core.table instead): "
        + ", ".join(f"{m} line(s) {lines}" for m, lines in where.items() if m != HOME))


@pytest.mark.parametrize("code, kind", [
    ('df["prediction_id"] = df["patient_id"].astype(str) + "_" + df["laterality"]', "prediction_id"),
    ('d.assign(prediction_id=d.patient_id.astype(str) + "_"\n + d.laterality.astype(str))',
     "prediction_id"),
    ('key = f"{r.patient_id}_{r.laterality}"', "prediction_id"),
    ('p = images / str(pid) / f"{iid}.dcm"', "dicom"),
    ('h = read_header(f"{images}/{r.patient_id}/{r.image_id}.dcm")', "dicom"),
    ('p = str(images) + "/" + pid + "/" + iid + ".dcm"', "dicom"),
    ('png = str(out / f"{pid}_{iid}.png")', "png"),
    ('png = out / (str(pid) + "_" + str(iid) + ".png")', "png"),
])
def test_the_check_catches_a_second_spelling(code, kind):
    """What the package spelled before `core.table` (and other ways to write it) is caught."""
    got = spellings(code)
    assert got[kind], (code, got)


@pytest.mark.parametrize("code", [
    'help = "folder of {patient_id}/{image_id}.dcm"',        # words, not a path being built
    'files = sorted(images.glob("*/*.dcm"))',
    'name = f"{exam}.png"',
    'out = run_dir / "figures" / f"{s[\'step\']}.png"',
    'suffix = "" if n == 1 else f".{k}-of-{n}"',
])
def test_the_check_leaves_other_strings_alone(code):
    assert spellings(code) == {"prediction_id": [], "dicom": [], "png": []}


def test_the_table_builds_what_the_package_wrote_before():
    df = pd.DataFrame({"patient_id": [10006, 10006], "laterality": ["L", "R"],
                       "image_id": [462822612, 1459541791]})
    assert list(table.prediction_id(df.patient_id, df.laterality)) == ["10006_L", "10006_R"]
    assert table.prediction_id(10006, "L") == "10006_L"
    assert list(table.with_prediction_id(df).prediction_id) == ["10006_L", "10006_R"]
    assert "prediction_id" not in df                                 # a copy, not in place
    assert list(table.patient_of(pd.Series(["10006_L", "7_R"]))) == ["10006", "7"]
    assert str(table.dicom_path("data/test_images", 10006, 462822612)) == \
        "data/test_images/10006/462822612.dcm"
    assert str(table.png_path("pngs", 10006, 462822612)) == "pngs/10006_462822612.png"
    empty = pd.DataFrame({"patient_id": pd.Series([], dtype=object),
                          "laterality": pd.Series([], dtype=object)})
    assert len(table.prediction_id(empty.patient_id, empty.laterality)) == 0   # pandas 3.0


def test_the_columns_and_sites_have_one_home():
    """The train.csv columns and the site ids live in core.table; the old names read them."""
    from rsna_utils.learn import mix
    from rsna_utils.sources import ingest, realdata, synth
    assert synth.TRAIN_COLUMNS is table.TRAIN_COLUMNS
    assert not hasattr(realdata, "META_COLUMNS")
    assert mix.SOURCE_SITES is table.SOURCE_SITES and mix.RSNA_SITES is table.RSNA_SITES
    assert {n: (f.site_id,) for n, f in ingest.FORMATS.items()} == \
        {n: s for n, s in table.SOURCE_SITES.items() if n != "rsna"}
