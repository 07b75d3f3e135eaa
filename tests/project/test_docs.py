"""The README fits on a screen and sends a newcomer on; every link resolves; the figures the docs
quote are the ones BENCHMARKS.md measured (a changed estimate fails here, not in a reader's hands)."""
import re
from pathlib import Path

from conftest import REPO

DOCS = sorted((REPO / "docs").glob("*.md"))


def _links(path: Path) -> list[str]:
    return [m for m in re.findall(r"\]\(([^)#\s]+)", path.read_text())
            if not m.startswith(("http://", "https://", "mailto:"))]


def test_the_readme_is_short_and_links_every_doc():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 60
    linked = {Path(x).name for x in _links(REPO / "README.md")}
    assert {d.name for d in DOCS} <= linked, {d.name for d in DOCS} - linked
    assert "make demo" in readme and "make test" in readme
    assert "6.7 GB" in readme and "CPU-only" in readme        # the install size, up front


def test_every_relative_link_resolves():
    for page in [REPO / "README.md", *DOCS]:
        for link in _links(page):
            assert (page.parent / link).exists(), f"{page.name}: {link}"


def _benchmark_total(heading_start: str, table_index: int) -> str:
    text = (REPO / "BENCHMARKS.md").read_text()
    section = text[text.index(heading_start):]
    section = section[:section.index("\n## ", 10)]
    totals = re.findall(r"\| \*\*all\*\* \| \| \| \| \| \*\*([\d.]+)\*\* \|", section)
    return totals[table_index]


def test_the_plans_hours_in_the_docs_are_the_measured_estimate():
    head = "## The kaggle plan in the winner's shape: its time on one GPU"
    plan, short, submit = (_benchmark_total(head, i) for i in range(3))
    notebooks = (REPO / "docs" / "notebooks.md").read_text()
    assert f"{plan} h for the plan (budget 24 h), {short} h for `--variant 12h`" in notebooks
    assert f"about {submit} h for the hidden test set" in (REPO / "docs" / "recipe.md").read_text()
    assert float(plan) <= 24 and float(short) <= 12 and float(submit) < 9


def test_the_install_size_is_the_sizes_table():
    sizes = (REPO / "docs" / "guarantees.md").read_text()
    venv = re.search(r"\| `\.venv` after `make install` \| ([\d.]+ GB) \|", sizes).group(1)
    assert venv in (REPO / "README.md").read_text()
