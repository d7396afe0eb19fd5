"""The Python API's own functions: run a probe, write a run's files.

Everything else public (``load_model``, the lenses, the emitter protocol, the
record types) is re-exported from its home module by ``lens/__init__.py``; the
functions here only give the CLI's steps names a notebook can call.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from lens.config import Probe, RunConfig, default_probe

if TYPE_CHECKING:
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
    from lens import outputs
    from lens.commit import commit_files
    from lens.rundir import prepare_out_dir
    from lens.runmodel import evaluation_stub

    config = config or RunConfig()
    name = run.model.name
    files = outputs.run_files(run, config, evaluation=evaluation_stub(name, run.report),
                              plots=plots)
    path = Path(out_dir)
    with prepare_out_dir(path) as out:
        commit_files(out, name, files, outputs.staging_name(name))
    return [path / file for file in sorted(files)]
