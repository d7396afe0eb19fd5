"""The fault suite's harness: cases, how a case runs the CLI, and the faults it provokes.

``tests/test_faults.py`` holds the tables of cases; every case runs both with
and without ``--quiet`` (``quiet`` below), since a fixture that always adds
``--quiet`` once hid a crash.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lens.testing import MODELS, REPO

TINY = "tests/models/tiny-gpt2"
PROMPT = "Give the city name only, plain text. The capital of Germany is called simply"


SWEEP_PROGRESS = re.compile(r"lens: \[\d+/\d+\] running: ")


@dataclass
class Run:
    """What a case produced: exit status, stderr, and the files left in the output dir."""

    status: int
    err: str
    out: Path
    tmp: Path
    extra: dict = field(default_factory=dict)

    @property
    def files(self) -> dict[str, bytes]:
        if not self.out.is_dir():
            return {}
        return {p.name: p.read_bytes() for p in self.out.iterdir() if not p.name.startswith(".")}

    @property
    def lines(self) -> list[str]:
        """stderr lines, less the one-time notice that the embedded model is being cached and
        a sweep's progress lines (``lens: [1/2] running: …``, one per change when stderr is
        a log): the problem itself must still be said in exactly one line."""
        return [line for line in self.err.strip().splitlines()
                if line and not line.startswith("lens: dequantizing")
                and not SWEEP_PROGRESS.match(line)]


@dataclass
class Case:
    """A fault: how to provoke it (``args``/``setup`` or a custom ``run``) and what must hold."""

    id: str
    args: Callable[[Path], list[str]] = lambda tmp: []
    """The CLI's arguments (``--no-plots`` and ``--out_dir`` are added, ``--quiet`` per run)."""
    message: str | None = None
    """A substring of the one error line (None: the run must succeed)."""
    status: int = 1
    setup: Callable[[Path, pytest.MonkeyPatch], None] | None = None
    check: Callable[[Run], None] | None = None
    run: Callable[[Path, pytest.MonkeyPatch, bool], Run] | None = None
    """A custom run ``(tmp, monkeypatch, quiet)``."""
    allow_error_record: bool = True
    extra: dict = field(default_factory=dict)


def run_main(tmp: Path, args: list[str], *, quiet: bool, out_dir: bool = True) -> Run:
    """The CLI in this process; stderr caught."""
    import contextlib
    import io

    from lens.run import main

    out = tmp / "out"
    argv = [*args, *(["--quiet"] if quiet else []), "--no-plots"]
    if out_dir and "--out_dir" not in argv:
        argv += ["--out_dir", str(out)]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            status = main(argv)
        except SystemExit as exc:  # argparse
            status = int(exc.code or 0)
    return Run(status, err.getvalue(), out, tmp)


# ---------------------------------------------------------------- fixtures of faults


def model_copy(tmp: Path, drop: tuple[str, ...] = ()) -> Path:
    target = tmp / "model"
    if not target.exists():
        shutil.copytree(MODELS / "tiny-gpt2", target)
    for name in drop:
        (target / name).unlink()
    return target


def truncated_safetensors(tmp: Path) -> list[str]:
    target = model_copy(tmp)
    weights = target / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return [str(target)]


def poisoned(tmp: Path) -> list[str]:
    """tiny-gpt2 with one NaN in block 2's MLP: layers from 3 on are non-finite."""
    target = model_copy(tmp)
    weights = load_file(target / "model.safetensors")
    name = next(k for k in sorted(weights) if ".h.2.mlp.c_fc.weight" in k)
    weights[name][0, 0] = float("nan")
    save_file(weights, str(target / "model.safetensors"), metadata={"format": "pt"})
    return [str(target)]


def corrupt_gguf(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lens.embedded

    real = lens.embedded.gguf_path()
    bad = tmp / real.name
    with real.open("rb") as src:
        bad.write_bytes(src.read(1 << 20))
    monkeypatch.setattr(lens.embedded, "gguf_path", lambda: bad)
    monkeypatch.setenv("LENS_CACHE_DIR", str(tmp / "cache"))


def probe(tmp: Path, facts: list[dict]) -> str:
    path = tmp / "probe.json"
    path.write_text(json.dumps({"facts": facts}), encoding="utf-8")
    return str(path)


def fact(**over: object) -> dict:
    return {"id": "f", "prompt": PROMPT, "answer": "Berlin", **over}


def prism_artifacts(tmp: Path, *, d: int = 32, damage: str | None = None) -> Path:
    from lens.prism import PROVENANCE_FILE, WHITEN_FILE, PrismArtifacts

    root = tmp / "prisms"
    art = PrismArtifacts(mean=torch.zeros(d), var=torch.ones(d), eps=1e-8, Q=torch.eye(d),
                         provenance={"k": d, "layers": [2, 3, 4]})
    art.save(root / "tiny-gpt2")
    if damage == "truncated":
        file = root / "tiny-gpt2" / WHITEN_FILE
        file.write_bytes(file.read_bytes()[:20])
    elif damage == "provenance":
        (root / "tiny-gpt2" / PROVENANCE_FILE).write_text("{not json", encoding="utf-8")
    return root


def no_space(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every file write in the run directory fails as on a full disk."""
    from lens import rundir

    def full(*_: object, **__: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    for name in ("write", "create"):
        if hasattr(rundir.RunDir, name):
            monkeypatch.setattr(rundir.RunDir, name, full)


def tokenises_to_nothing(tmp: Path, monkeypatch: pytest.MonkeyPatch, quiet: bool) -> Run:
    from lens.errors import LensError
    from lens.model import load_model, tokenize

    class Silent:
        bos_token_id = None

        def __call__(self, text: str, **_: object) -> dict:
            return {"input_ids": []}

    import dataclasses

    monkeypatch.chdir(REPO)
    model = dataclasses.replace(load_model(TINY, device="cpu"), tokenizer=Silent())
    try:
        tokenize(model, "\u200b")
    except LensError as exc:
        return Run(1, f"lens: error: {exc}\n", tmp / "out", tmp)
    return Run(0, "", tmp / "out", tmp)


def killed_mid_write(tmp: Path, monkeypatch: pytest.MonkeyPatch, quiet: bool) -> Run:
    """SIGKILL a process while it rewrites a 8 MiB file again and again with write_atomic."""
    target = tmp / "out" / "output-x.json"
    target.parent.mkdir()
    old, new = b"o" * (8 << 20), b"n" * (8 << 20)
    target.write_bytes(old)
    script = ("import sys; from pathlib import Path; from lens.writers import write_atomic\n"
              "p = Path(sys.argv[1]); data = [b'n' * (8 << 20), b'o' * (8 << 20)]\n"
              "print('ready', flush=True)\n"
              "i = 0\n"
              "while True:\n    write_atomic(p, data[i % 2]); i += 1\n")
    seen = set()
    for delay in (0.05, 0.13, 0.29, 0.41):
        proc = subprocess.Popen([sys.executable, "-c", script, str(target)], cwd=REPO,
                                stdout=subprocess.PIPE)
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        seen.add(target.read_bytes() in (old, new))
    return Run(0 if seen == {True} else 1, "", tmp / "out", tmp)


def same_minute(tmp: Path, monkeypatch: pytest.MonkeyPatch, quiet: bool) -> Run:
    """Two runs without --out_dir started together: both kept, neither overwritten."""
    cmd = [sys.executable, "-m", "lens.run", str(REPO / TINY), *(["--quiet"] if quiet else []),
           "--no-plots", "--output-root", str(tmp)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE) for _ in range(2)]
    errs = [p.communicate()[1].decode() for p in procs]
    status = max(p.returncode for p in procs)
    return Run(status, "".join(errs), tmp, tmp)


def interrupted_sweep(tmp: Path, monkeypatch: pytest.MonkeyPatch, quiet: bool) -> Run:
    """Ctrl-C while the second model of a sweep runs: the first keeps its outputs, exit 130."""
    from lens.config import RunConfig
    from lens.rundir import prepare_out_dir
    from lens.launch.local import child_argv
    from lens.sweep import run_sweep

    def ctrl_c(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    def argv(job: dict) -> list[str]:
        if job["model"] == "org/slow":
            signal.setitimer(signal.ITIMER_REAL, 1.0)
            return [sys.executable, "-c", "import time; time.sleep(60)"]
        return child_argv(job)

    monkeypatch.chdir(REPO)
    previous = signal.signal(signal.SIGALRM, ctrl_c)
    import contextlib
    import io

    err = io.StringIO()
    try:
        with prepare_out_dir(tmp / "out") as out, contextlib.redirect_stderr(err):
            status = run_sweep([TINY, "org/slow"], RunConfig(device="cpu"), out, quiet=quiet,
                               plots=False, argv=argv)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    return Run(status, err.getvalue(), tmp / "out", tmp)


# ---------------------------------------------------------------- checks


def pure_rows(run: Run, name: str = "tiny-gpt2") -> list[dict[str, str]]:
    from lens.writers import read_csv_dicts

    return read_csv_dicts(run.files[f"output-{name}-pure-next-token.csv"])


def check_unresolved(run: Run) -> None:
    report = json.loads(run.files["output-tiny-gpt2.json"])
    assert report["diagnostics"]["gold_alignment"] == "unresolved"
    assert report["gold_answer"]["first_id"] is None
    rows = pure_rows(run)
    assert rows and all(r["p_answer"] == "" and r["answer_rank"] == "" for r in rows)
    assert all(r["is_answer"] in ("True", "False") for r in rows)  # string fallback
    assert report["diagnostics"]["first_rank_le_1"] is None


def check_poisoned(run: Run) -> None:
    report = json.loads(run.files["output-model.json"])
    flag = report["diagnostics"]["non_finite"]
    assert flag["first_pass"] == "pos/orig" and flag["first_layer"] == 3
    assert flag["passes"] == {"pos/orig": 3, "pos/no_filler": 3, "ctl/orig": 3}
    rows = pure_rows(run, "model")
    early = [r for r in rows if r["prompt_variant"] == "orig" and int(r["layer"]) < 3]
    late = [r for r in rows if int(r["layer"]) >= 3]
    assert early and late
    assert all(r["entropy"] != "" and r["p_top1"] != "" for r in early)
    for r in late:
        assert r["entropy"] == r["p_top1"] == r["kl_to_final_bits"] == r["answer_rank"] == ""
        assert r["is_answer"] == r["copy_collapse"] == ""
    assert "non-finite" in run.err and "layer 3" in run.err


def check_both_runs_kept(run: Run) -> None:
    dirs = sorted(p for p in run.tmp.iterdir() if p.is_dir() and p.name.startswith("run-"))
    assert len(dirs) == 2 and dirs[-1].name == "run-latest"
    for d in dirs:
        names = {p.name for p in d.iterdir()}
        assert {"output-tiny-gpt2.json", "output-tiny-gpt2-records.csv",
                "output-tiny-gpt2-pure-next-token.csv"} <= names
    a, b = ((d / "output-tiny-gpt2.json").read_bytes() for d in dirs)
    assert a == b


def check_interrupted(run: Run) -> None:
    from lens.writers import read_csv_dicts

    assert "output-tiny-gpt2.json" in run.files
    status = {r["model"]: r["status"] for r in read_csv_dicts(run.files["summary.csv"])}
    assert status == {TINY: "ok", "org/slow": "interrupted"}




# ---------------------------------------------------------------- what every case must hold


def staging_left(out: Path) -> list[str]:
    """Staging directories left in a run directory."""
    if not out.is_dir():
        return []
    return sorted(p.name for p in out.iterdir() if p.name.startswith(".lens-staging-"))


def check_case(case: Case, run: Run) -> None:
    """The exit status, no traceback, the one line naming the problem, nothing left behind."""
    assert run.status == case.status, run.err
    assert "Traceback" not in run.err
    assert staging_left(run.out) == []
    if case.message is not None:
        assert len(run.lines) == 1, run.err
        assert case.message in run.lines[0], run.lines[0]
        assert "(a bug" not in run.lines[0], run.lines[0]
        leftovers = [n for n in run.files if n.startswith("output-")
                     and not (case.allow_error_record and n.endswith(".error.json"))]
        if case.check is None:
            assert leftovers == [], leftovers
        for name, data in run.files.items():
            if name.endswith(".error.json"):
                record = json.loads(data)
                assert list(record)[:4] == ["model", "stage", "error_class", "message"]
                assert record["message"] in run.lines[0]
    if case.check is not None:
        case.check(run)
