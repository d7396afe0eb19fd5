"""The Python API's own functions: run a probe, write a run's files, records as a DataFrame.

Everything else public (``load_model``, the lenses, the emitter protocol, the
record types) is re-exported from its home module by ``lens/__init__.py``; the
functions here only give the CLI's steps names a notebook can call.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lens.config import Probe, RunConfig, default_probe

if TYPE_CHECKING:
    import pandas

    from lens.emitters import Record
    from lens.model import LoadedModel
    from lens.report import ModelRun


def run_probe(model: LoadedModel, probe: Probe | str | Path | None = None,
              config: RunConfig | None = None) -> ModelRun:
    """Run every pass of ``probe`` on a loaded model; records and reports as plain values.

    Args:
        model: From ``lens.load_model`` (its device and dtype are settled there).
        probe: A ``Probe``, a built-in probe's name (``"capitals"``) or a probe file;
            default: the one-fact default probe (Germany → Berlin).
        config: Thresholds, raw-lens check, Prism…; default ``RunConfig()``.

    Returns:
        The run (``records``: every record, fact by fact, in pass order;
        ``report``: what ``output-<name>.json`` holds; ``aggregate``).
    """
    from lens.probe import resolve_probe
    from lens.report import analyse

    if probe is None:
        probe = default_probe()
    elif not isinstance(probe, Probe):
        probe = resolve_probe(str(probe))
    return analyse(model, probe, config or RunConfig())


def write_outputs(run: ModelRun, out_dir: str | Path, *, config: RunConfig | None = None,
                  plots: bool = True) -> list[Path]:
    """Write the files ``python -m lens.run`` writes for ``run`` into ``out_dir``.

    The same bytes (all but the wall-clock ``-timings.json``, which only the
    CLI measures), written the same way: all at once through a staging
    directory, ``output-<name>.json`` last, and never over an earlier run's
    files (``LensError``). ``config`` is the one the run used (it decides
    whether residuals are saved). Returns the written paths.
    """
    from lens.report import output_files
    from lens.rundir import prepare_out_dir
    from lens.worker import _commit, evaluation_stub

    config = config or RunConfig()
    name = run.model.name
    files = output_files(run, config)
    files[f"evaluation-{name}.md"] = evaluation_stub(name, run.report)
    if plots:
        from lens.plots import plot_files

        files.update(plot_files(run))
    path = Path(out_dir)
    with prepare_out_dir(path) as out:
        _commit(out, files, f".lens-staging-{name}-{uuid.uuid4().hex[:12]}")
    return [path / file for file in sorted(files)]


def to_pandas(records: Iterable[Record], kind: type | None = None) -> pandas.DataFrame:
    """One row per record, one column per field (``topk`` stays a tuple of (token, p)).

    Args:
        records: E.g. ``run.records``.
        kind: Keep only records of this type (``lens.NextTokenRecord``…); needed
            when ``records`` mixes types, since each type has its own columns.
    """
    import pandas as pd

    rows = [r for r in records if kind is None or isinstance(r, kind)]
    kinds = sorted({type(r).__name__ for r in rows})
    if len(kinds) > 1:
        raise ValueError(f"records of {len(kinds)} types ({', '.join(kinds)}) have different "
                         f"columns; pick one, e.g. to_pandas(records, lens.{kinds[0]})")
    record_type = kind or (type(rows[0]) if rows else None)
    columns = [f.name for f in fields(record_type)] if record_type is not None else []
    values: list[dict[str, Any]] = [{c: getattr(r, c) for c in columns} for r in rows]
    return pd.DataFrame(values, columns=columns)
