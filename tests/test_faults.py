"""Every bad input gets one clear line, and nothing is ever lost (the fault suite).

Tables of cases, one parametrised test per class of fault: each case sets up
its fault, runs the CLI in-process (or, where a process must die or be
signalled, in a process of its own), and asserts the exit status, the single
line that names the problem and the fix, and that no partial or overwritten
output or staging directory is left behind (``faultkit.check_case``). Every
case runs both with and without ``--quiet``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import faults_lifecycle as life
import faults_models as models
from faultkit import (
    PROMPT,
    TINY,
    Case,
    check_both_runs_kept,
    check_case,
    check_interrupted,
    check_poisoned,
    check_unresolved,
    corrupt_gguf,
    fact,
    interrupted_sweep,
    killed_mid_write,
    model_copy,
    no_space,
    poisoned,
    prism_artifacts,
    probe,
    run_main,
    same_minute,
    tokenises_to_nothing,
    truncated_safetensors,
)
from lens.testing import REPO

QUIET = pytest.mark.parametrize("quiet", [True, False], ids=["quiet", "verbose"])


CASES = [
    # 1. models that cannot be loaded
    Case("unreachable-hub", lambda t: ["some-org/some-model"], "hub is unreachable"),
    Case("missing-directory", lambda t: ["./no/such/model"], "does not exist"),
    Case("directory-without-weights",
         lambda t: [str(model_copy(t, ("model.safetensors",)))], "no weights in"),
    Case("directory-without-tokenizer",
         lambda t: [str(model_copy(t, ("tokenizer.json",)))], "no tokenizer in"),
    Case("truncated-safetensors", truncated_safetensors, "cannot load weights"),
    Case("corrupt-gguf", lambda t: [], "corrupt GGUF file", setup=corrupt_gguf),
    # 2. prompts
    Case("prompt-longer-than-context",
         lambda t: [TINY, "--probe", probe(t, [fact(prompt=" ".join(["capital"] * 80))])],
         "takes at most 64"),
    Case("empty-prompt", lambda t: [TINY, "--probe", probe(t, [fact(prompt="")])],
         "'prompt'", allow_error_record=False),
    Case("prompt-tokenises-to-nothing", message="tokenises to nothing", run=tokenises_to_nothing),
    # 3. a gold answer the tokenizer cannot align: recorded, and the run goes on
    Case("unresolved-gold-answer",
         lambda t: [TINY, "--probe", probe(t, [fact(answer="Zorblax")])], None, status=0,
         check=check_unresolved),
    # 4. output problems
    Case("out-dir-not-writable", lambda t: [TINY, "--out_dir", str(t / "ro")], "is not writable",
         setup=lambda t, mp: mp.setattr(os, "access", lambda *a, **k: False),
         allow_error_record=False),
    Case("out-dir-under-a-file", lambda t: [TINY, "--out_dir", str(t / "file.txt" / "x")],
         "cannot create --out_dir", setup=lambda t, mp: (t / "file.txt").write_text("x"),
         allow_error_record=False),
    Case("out-path-is-a-file", lambda t: [TINY, "--out_dir", str(t / "file.txt")],
         "is an existing file", setup=lambda t, mp: (t / "file.txt").write_text("x"),
         allow_error_record=False),
    Case("disk-full", lambda t: [TINY], "No space left on device",
         setup=lambda t, mp: no_space(mp), allow_error_record=False),
    Case("killed-mid-write", status=0, run=killed_mid_write),
    Case("earlier-run-never-overwritten", lambda t: [TINY], "never overwrites",
         setup=lambda t, mp: ((t / "out").mkdir(),
                              (t / "out" / "output-tiny-gpt2.json").write_text("earlier")),
         check=lambda r: r.files["output-tiny-gpt2.json"] == b"earlier",
         allow_error_record=False),
    # 5. two runs in the same minute without --out_dir
    Case("two-runs-same-minute", status=0, run=same_minute, check=check_both_runs_kept),
    # 6. NaN in the weights: reported, null metrics, flagged
    Case("poisoned-weight", poisoned, None, status=0, check=check_poisoned),
    # 7. command line
    Case("copy-threshold-above-1", lambda t: ["--copy-threshold", "1.5"], "--copy-threshold"),
    Case("copy-window-zero", lambda t: ["--copy-window-k", "0"], "--copy-window-k"),
    Case("batch-size-zero", lambda t: ["--batch-size", "0"], "--batch-size"),
    Case("unknown-device", lambda t: ["--device", "tpu"], "invalid choice", status=2),
    Case("unknown-flag", lambda t: ["--frobnicate"], "unrecognized arguments", status=2),
    # 8. Prism artifacts and probe files
    Case("prism-missing", lambda t: [TINY, "--prism", "on", "--prism-dir", str(t / "none")],
         "--prism on"),
    Case("prism-incompatible",
         lambda t: [TINY, "--prism", "on", "--prism-dir", str(prism_artifacts(t, d=16))],
         "d_model 16 vs 32"),
    Case("prism-truncated",
         lambda t: [TINY, "--prism", "on", "--prism-dir",
                    str(prism_artifacts(t, damage="truncated"))], "whiten.pt"),
    Case("prism-invalid-provenance",
         lambda t: [TINY, "--prism", "on", "--prism-dir",
                    str(prism_artifacts(t, damage="provenance"))], "provenance.json"),
    Case("probe-missing-field",
         lambda t: [TINY, "--probe", probe(t, [{"id": "f", "prompt": PROMPT}])],
         "missing field 'answer'", allow_error_record=False),
    Case("probe-wrong-type",
         lambda t: [TINY, "--probe", probe(t, [fact(answer=7)])], "'answer'",
         allow_error_record=False),
    Case("probe-duplicate-ids",
         lambda t: [TINY, "--probe", probe(t, [fact(), fact()])], "duplicate",
         allow_error_record=False),
    # 9. Ctrl-C during a sweep
    Case("interrupted-sweep", status=130, run=interrupted_sweep, check=check_interrupted),
]


# ---------------------------------------------------------------- issue 13: the classes of defects

RERUN_CASES = [  # 1. a re-run into a directory holding an earlier run
    Case("single-run", lambda t: [TINY], "exists from an earlier run", setup=life.earlier_run,
         check=life.check_earlier_kept, allow_error_record=False),
    Case("sweep", lambda t: life.models_file(t, TINY), "exists from an earlier run",
         setup=life.earlier_run, check=life.check_earlier_kept, allow_error_record=False),
]
SUMMARY_CASES = [  # 2. a sweep whose summary cannot be written
    Case("disk-full-throughout", lambda t: life.models_file(t, TINY, "./no/such/model"),
         setup=life.summary_fails(after=1, times=99), check=life.check_summary_never_written),
    Case("disk-full-once", lambda t: life.models_file(t, TINY, "./no/such/model"),
         setup=life.summary_fails(after=3, times=1), check=life.check_summary_recovered),
]
LONG_NAME_CASES = [  # 3. long but legal names
    Case("long-directory-name", models.long_model, status=0, check=models.check_long_name),
    Case("long-name-failure-record", lambda t: ["./" + "y" * 240], "does not exist",
         check=models.check_long_record),
    Case("long-name-in-a-sweep", lambda t: life.models_file(t, "./" + "y" * 240),
         "does not exist", check=models.check_long_record),
    Case("long-names-stay-unique", status=0, run=models.long_names_unique,
         check=models.check_two_records),
]
SIGTERM_CASES = [  # 4. SIGTERM, as batch schedulers and timeout send it
    Case("single-run-analysing", status=143, run=life.sigterm("analyse"),
         check=life.check_terminated),
    Case("single-run-writing", status=143, run=life.sigterm("commit"),
         check=life.check_terminated),
    Case("single-run-inside-a-move", status=143, run=life.sigterm("link"),
         check=life.check_terminated),
    Case("sweep-parent", status=143, run=life.sigterm("analyse", sweep=True),
         check=life.check_sweep_terminated),
]
INVALID_MODEL_CASES = [  # 8. models lens cannot analyse are named as such
    Case(name, lambda t, make=make: [str(make(t))], message)
    for (name, make), message in zip(models.INVALID_MODELS.items(), (
        "at least one layer", "does not belong to these weights", "entirely NaN/Inf",
        "normalisation weight", "expected int, got str"), strict=True)
]
CACHE_CASES = [  # 9. the embedded model's cache
    Case("second-install-shares-it", status=0, setup=models.second_install,
         check=models.check_builds(1)),
    Case("damaged-rebuilt-once", status=0, setup=models.damaged_cache,
         check=models.check_builds(2, named=True)),
    Case("unwritable", message="set LENS_CACHE_DIR", setup=models.unwritable_cache),
]
KILLED_CASES = [  # 10. a single run killed outright; the next run recovers
    Case("killed-while-moving-in", status=1, run=life.killed_then_rerun("commit"),
         check=life.check_completed),
    Case("killed-while-staging", status=0, run=life.killed_then_rerun("stage"),
         check=life.check_cleaned),
]
PATH_CASES = [  # 11. model paths named after their directory
    Case("trailing-dot", lambda t: [TINY + "/."], status=0,
         check=models.check_named_after_directory),
    Case("dot", status=0, run=models.model_at_dot, check=models.check_named_after_directory),
]
QUIET_CASES = [  # 12. --quiet prints errors only
    Case("library-warnings", status=0, run=life.chatty_libraries, check=life.check_quiet),
]


def _run(case: Case, quiet: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lens.sources

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # processes of their own cannot be patched
    monkeypatch.setattr(lens.sources, "_hub_reachable", lambda timeout=3.0: False)
    monkeypatch.chdir(REPO)
    if case.setup is not None:
        case.setup(tmp_path, monkeypatch)
    if case.run is not None:
        run = case.run(tmp_path, monkeypatch, quiet)
    else:
        run = run_main(tmp_path, case.args(tmp_path), quiet=quiet)
    check_case(case, run)


def _table(cases: list[Case]) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("case", cases, ids=[c.id for c in cases])


@QUIET
@_table(CASES)
def test_fault(case: Case, quiet: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _run(case, quiet, tmp_path, monkeypatch)


@QUIET
@_table(RERUN_CASES)
def test_rerun_into_an_earlier_run(case, quiet, tmp_path, monkeypatch) -> None:
    _run(case, quiet, tmp_path, monkeypatch)


@QUIET
@_table(SUMMARY_CASES)
def test_unwritable_summary_never_stops_a_sweep(case, quiet, tmp_path, monkeypatch) -> None:
    _run(case, quiet, tmp_path, monkeypatch)


@QUIET
@_table(LONG_NAME_CASES)
def test_long_names_fit(case, quiet, tmp_path, monkeypatch) -> None:
    _run(case, quiet, tmp_path, monkeypatch)


@QUIET
@_table(SIGTERM_CASES)
def test_sigterm_is_handled_like_ctrl_c(case, quiet, tmp_path, monkeypatch) -> None:
    _run(case, quiet, tmp_path, monkeypatch)


@QUIET
@_table(INVALID_MODEL_CASES)
def test_invalid_models_are_named(case, quiet, tmp_path, monkeypatch) -> None:
    _run(case, quiet, tmp_path, monkeypatch)


@QUIET
@_table(CACHE_CASES)
def test_embedded_cache(case, quiet, tmp_path, monkeypatch) -> None:
    _run(case, quiet, tmp_path, monkeypatch)


@QUIET
@_table(KILLED_CASES)
def test_killed_single_run_is_recovered(case, quiet, tmp_path, monkeypatch) -> None:
    _run(case, quiet, tmp_path, monkeypatch)


@QUIET
@_table(PATH_CASES)
def test_model_paths_are_normalised(case, quiet, tmp_path, monkeypatch) -> None:
    _run(case, quiet, tmp_path, monkeypatch)


@QUIET
@_table(QUIET_CASES)
def test_quiet_means_errors_only(case, quiet, tmp_path, monkeypatch) -> None:
    _run(case, quiet, tmp_path, monkeypatch)
