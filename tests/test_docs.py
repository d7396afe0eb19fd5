"""The documentation lives in the repository and covers what the code writes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lens.writers import FACT_COLUMN, PURE_HEADER, RECORDS_HEADER
from lens.sweep import SUMMARY_COLUMNS
from lens.testing import REPO

OUTPUTS_DOC = REPO / "docs" / "outputs.md"
TEXT_SUFFIXES = {".py", ".md", ".toml", ".sh", ".txt", ".json", ".yaml", ".yml", ".cfg", ".ini"}
SKIP_DIRS = {".venv", ".git", "golden", "models", "lens.egg-info", "__pycache__", ".hypothesis"}
OUTSIDE = re.compile("|".join([  # spelled apart: these lines must not match themselves
    r"\.\./shared", r"shared/(SPEC|DESIGN)", r"DEVELOPERS\.md", "/wo" + "rk/",
    "SP" + "EC §",  # sections of a document that is not in the repository
]))


def _repo_text_files() -> list[Path]:
    return [p for p in REPO.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES
            and not SKIP_DIRS & set(p.relative_to(REPO).parts)]


def test_no_file_points_outside_the_repository():
    offenders = [f"{p.relative_to(REPO)}:{n}" for p in _repo_text_files()
                 for n, line in enumerate(p.read_text(encoding="utf-8", errors="replace")
                                          .splitlines(), 1) if OUTSIDE.search(line)]
    assert offenders == []


@pytest.mark.parametrize("doc", ["README.md", "docs/outputs.md", "docs/lenses.md"])
def test_markdown_links_resolve_inside_the_repository(doc):
    text = (REPO / doc).read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if target.startswith(("http://", "https://")):
            continue
        path = ((REPO / doc).parent / target).resolve()
        assert path.is_relative_to(REPO) and path.exists(), f"{doc}: broken link {target}"


def _documented(name: str, text: str) -> bool:
    return re.search(rf"(?<![\w.]){re.escape(name)}(?![\w])", text) is not None


def test_every_csv_column_is_documented():
    text = OUTPUTS_DOC.read_text(encoding="utf-8")
    slots = {c for c in RECORDS_HEADER if re.fullmatch(r"(top|prob)\d+", c)}
    columns = {FACT_COLUMN, *RECORDS_HEADER, *PURE_HEADER, *SUMMARY_COLUMNS} - slots
    assert {c for c in columns if not _documented(c, text)} == set()
    assert "`top1`, `prob1` … `top20`, `prob20`" in text


def _keys(value: object, *, under_ids: bool = False) -> set[str]:
    """Every dict key in ``value``, except those that are data (fact ids, pass labels)."""
    keys: set[str] = set()
    if isinstance(value, dict):
        for key, child in value.items():
            if not under_ids:
                keys.add(key)
            keys |= _keys(child, under_ids=key in ("facts", "passes"))
    elif isinstance(value, list):
        for child in value:
            keys |= _keys(child)
    return keys


def test_every_json_key_the_goldens_hold_is_documented():
    text = OUTPUTS_DOC.read_text(encoding="utf-8")
    keys: set[str] = set()
    for golden in (REPO / "golden").rglob("*.json"):
        keys |= _keys(json.loads(golden.read_text(encoding="utf-8")))
    assert len(keys) > 100
    assert {k for k in keys if not _documented(k, text)} == set()
