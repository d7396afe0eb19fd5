"""Canonical bytes for results: the same data always gives the same bytes.

Floats are written with ``FLOAT_SIG_DIGITS`` (10) significant digits, as
``format(x, ".10g")`` gives them (shortest form of that rounding, Python's
exponent form such as ``1e-05``), ``-0`` written as ``0``, and values whose
rounding would overflow float64 rounded down to ``1.797693134e+308``. Non-finite
values become an empty CSV cell or JSON ``null``. Why: float64 results from
different CPU kernels (BLAS builds, SIMD widths, thread counts) differ in the
last bits but agree to 10 significant digits, so the text is stable across
machines while raw float bits are not.

CSV dialect: delimiter ``,``, quotechar ``"``, quotes doubled inside quoted
cells, escapechar ``\\``, line terminator ``\\n``, UTF-8. A cell is quoted iff
it contains ``,`` ``"`` ``\\`` ``\\r`` or ``\\n``, starts or ends with
whitespace, or is the only (empty) cell of its row; inside quotes a backslash is
written as ``\\\\``. The cells are quoted by this module rather than by
``csv.writer``, which (Python 3.11, lineterminator ``\\n``) leaves a lone
``\\r`` unquoted and so splits the row on reading. Files read back unchanged
with :func:`read_csv_rows` and with::

    pandas.read_csv(io.BytesIO(data), escapechar="\\\\", keep_default_na=False,
                    dtype=str, encoding="utf-8")

An empty-string cell and a ``None`` cell both read back as ``""``.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lens.records import NextTokenRecord, PositionRecord, Record, TokenRecord

FLOAT_SIG_DIGITS = 10

_FLOAT_FORMAT = f".{FLOAT_SIG_DIGITS}g"
_MAX_ROUNDED = 1.797693134e308
_QUOTE_CHARS = frozenset(',"\\\r\n')


_DIALECT = {
    "delimiter": ",", "quotechar": '"', "doublequote": True, "escapechar": "\\",
    "lineterminator": "\n", "quoting": csv.QUOTE_MINIMAL, "skipinitialspace": False,
}


def format_float(x: float) -> str | None:
    """Return ``format(x, ".10g")`` with ``-0`` as ``0``; None for nan and inf."""
    x = float(x)
    if not math.isfinite(x):
        return None
    if x == 0.0:
        return "0"
    text = format(x, _FLOAT_FORMAT)
    if not -_MAX_ROUNDED <= x <= _MAX_ROUNDED and math.isinf(float(text)):  # rounded up to inf
        return format(math.copysign(_MAX_ROUNDED, x), _FLOAT_FORMAT)
    return text


def _cell_text(value: object) -> str:
    if value is None or isinstance(value, str):
        return value or ""
    if isinstance(value, bool | np.bool_):
        return str(bool(value))
    text = _scalar_json(value)
    return "" if text == "null" else text


def _quote(text: str, alone: bool) -> str:
    if (
        not _QUOTE_CHARS.isdisjoint(text)
        or (text and (text[0].isspace() or text[-1].isspace()))
        or (alone and not text)
    ):
        return '"' + text.replace("\\", "\\\\").replace('"', '""') + '"'
    return text


def _csv_cell(value: object, alone: bool) -> str:
    """One cell's text; the common types first (a many-fact probe writes millions of cells)."""
    kind = type(value)
    if value is None or (kind is float and not math.isfinite(value)):  # type: ignore[arg-type]
        return '""' if alone else ""
    if kind is float:
        return format_float(value)  # type: ignore[arg-type,return-value]  # never quoted
    if kind is int:
        return str(value)
    return _quote(_cell_text(value), alone)


_TEXT_CELLS: dict[str, str] = {}
"""A string's cell text, in a row of several cells: token texts repeat across rows."""
_TEXT_CELLS_MAX = 1 << 16


def _text_cell(text: str) -> str:
    cell = _TEXT_CELLS.get(text)
    if cell is None:
        cell = _quote(text, False)
        if len(_TEXT_CELLS) < _TEXT_CELLS_MAX:
            _TEXT_CELLS[text] = cell
    return cell


def _csv_line(cells: Sequence[object]) -> str:
    if len(cells) == 1:
        return _csv_cell(cells[0], True) + "\n"
    return ",".join([
        "" if c is None
        else _text_cell(c) if type(c) is str  # type: ignore[arg-type]
        else format_float(c) if type(c) is float and math.isfinite(c)  # type: ignore[misc]
        else _csv_cell(c, False)
        for c in cells]) + "\n"


def csv_bytes(header: Sequence[str], rows: Iterable[Sequence[object]]) -> bytes:
    """Return one CSV file in the canonical dialect.

    Args:
        header: Column names.
        rows: Rows of cells: None, bool, int, float, numpy scalars or str.

    Raises:
        ValueError: A row's length differs from the header's.
        TypeError: A cell has an unsupported type.
    """
    lines = [_csv_line(header)]
    for i, row in enumerate(rows):
        if len(row) != len(header):
            raise ValueError(f"row {i} has {len(row)} cells, header has {len(header)}")
        lines.append(_csv_line(row))
    return "".join(lines).encode("utf-8")


def read_csv_rows(data: bytes) -> list[list[str]]:
    """Read CSV bytes in the canonical dialect; the header row is included."""
    return list(csv.reader(io.StringIO(data.decode("utf-8"), newline=""), **_DIALECT))


def read_csv_dicts(data: bytes) -> list[dict[str, str]]:
    """Read CSV bytes in the canonical dialect as one ``{column: cell}`` dict per row."""
    header, *rows = read_csv_rows(data)
    return [dict(zip(header, row, strict=True)) for row in rows]


# --- the records CSVs' column layout -----------------------------------------------

TOPK_SLOTS = 20
PURE_EXTRA = ("copy_collapse", "entropy_collapse", "is_answer", "p_top1", "p_top5", "p_answer",
              "kl_to_final_bits", "answer_rank", "cos_to_final", "control_margin")
"""The pure next-token CSV's columns after the shared prefix (``NextTokenRecord`` fields)."""
RECORDS_HEADER = (
    "prompt_id", "prompt_variant", "layer", "pos", "token", "entropy",
    *(f"{kind}{i}" for i in range(1, TOPK_SLOTS + 1) for kind in ("top", "prob")),
    "rest_mass",
)
PURE_HEADER = (*RECORDS_HEADER, *PURE_EXTRA)
FACT_COLUMN = "fact_id"
"""Leading column of the records CSVs when a probe has more than one fact."""


def _prefix(r: TokenRecord) -> list[Any]:
    cells: list[Any] = [r.prompt_id, r.variant, r.layer, r.pos, r.token, r.entropy]
    for pair in r.topk[:TOPK_SLOTS]:
        cells.extend(pair)
    cells.extend((None, None) * (TOPK_SLOTS - min(TOPK_SLOTS, len(r.topk))))
    cells.append(r.rest_mass)
    return cells


def records_csv(records: Iterable[Record], lens: str, *, fact_column: bool = False) -> bytes:
    """The per-position CSV of ``lens``; ``fact_column`` adds a leading ``fact_id``."""
    lead = (FACT_COLUMN,) if fact_column else ()
    rows = [[*((r.fact_id,) if fact_column else ()), *_prefix(r)]
            for r in records if isinstance(r, PositionRecord) and r.lens == lens]
    return csv_bytes((*lead, *RECORDS_HEADER), rows)


def pure_csv(records: Iterable[Record], lens: str, *, fact_column: bool = False) -> bytes:
    """The pure next-token CSV of ``lens``; ``fact_column`` adds a leading ``fact_id``."""
    lead = (FACT_COLUMN,) if fact_column else ()
    rows = [[*((r.fact_id,) if fact_column else ()), *_prefix(r),
             *(getattr(r, f) for f in PURE_EXTRA)]
            for r in records if isinstance(r, NextTokenRecord) and r.lens == lens]
    return csv_bytes((*lead, *PURE_HEADER), rows)


# --- JSON --------------------------------------------------------------------------


def _scalar_json(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool | np.bool_):
        return "true" if value else "false"
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        return format_float(value) or "null"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    raise TypeError(f"cannot write {type(value).__name__}: not a str, number, bool or None")


def _is_scalar(value: object) -> bool:
    return value is None or isinstance(value, str | bool | int | float | np.generic)


def _is_flat(items: list | tuple) -> bool:
    return all(
        _is_scalar(v) or (isinstance(v, list | tuple) and all(_is_scalar(w) for w in v))
        for v in items
    )


def _block(parts: list[str], level: int, opening: str, closing: str) -> str:
    pad = "  " * level
    return f"{opening}\n" + ",\n".join(f"{pad}  {p}" for p in parts) + f"\n{pad}{closing}"


def _json(value: object, level: int) -> str:
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, str):
                raise TypeError(f"JSON keys must be str, got {type(key).__name__}")
        parts = [
            f"{json.dumps(k, ensure_ascii=False)}: {_json(v, level + 1)}" for k, v in value.items()
        ]
        return _block(parts, level, "{", "}") if parts else "{}"
    if isinstance(value, list | tuple):
        if _is_flat(value):
            return "[" + ", ".join(_json(v, level) for v in value) + "]"
        return _block([_json(v, level + 1) for v in value], level, "[", "]")
    return _scalar_json(value)


def json_bytes(obj: object) -> bytes:
    """Return canonical JSON: indent 2, keys in insertion order, UTF-8, final newline.

    Lists of scalars, or of lists of scalars, go on one line (``[["a", 0.5]]``).

    Raises:
        TypeError: A dict key is not str, or a value has an unsupported type.
    """
    return (_json(obj, 0) + "\n").encode("utf-8")


def write_atomic(path: Path, data: bytes, *, dir_fd: int | None = None) -> None:
    """Replace ``path`` with ``data`` so that readers never see a torn file.

    Writes a hidden temp file in the same directory, fsyncs it, then
    ``os.replace``-s it onto ``path``; on failure the temp file is removed.
    With ``dir_fd`` (an open directory), ``path`` is a file name inside that
    directory, which keeps working when the directory is renamed meanwhile.
    """
    path = Path(path)
    if dir_fd is not None and path.name != str(path):
        raise ValueError(f"with dir_fd, give a bare file name, not {path}")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")
    at = {} if dir_fd is None else {"dir_fd": dir_fd}
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666, **at)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, **at)
        raise
