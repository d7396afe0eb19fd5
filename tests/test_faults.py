"""Every bad input gets one clear line, and nothing is ever lost (issue: fault suite).

One table of cases, one parametrised test: each case sets up its fault, runs
the CLI in-process (or, where a process must die, in a subprocess), and
asserts the exit status, the single line that names the problem and the fix,
and that no partial or overwritten output is left behind.
"""

from __future__ import annotations

import errno
import json
import os
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


@dataclass
class Run:
    """What a case produced: exit status, stderr, and the files left in the output dir."""

    status: int
    err: str
    out: Path
    tmp: Path

    @property
    def files(self) -> dict[str, bytes]:
        if not self.out.is_dir():
            return {}
        return {p.name: p.read_bytes() for p in self.out.iterdir() if not p.name.startswith(".")}

    @property
    def lines(self) -> list[str]:
        """stderr lines, less the one-time notice that the embedded model is being cached."""
        return [line for line in self.err.strip().splitlines()
                if line and not line.startswith("lens: dequantizing")]


@dataclass
class Case:
    """A fault: how to provoke it (``args``/``setup`` or a custom ``run``) and what must hold."""

    id: str
    args: Callable[[Path], list[str]] = lambda tmp: []
    message: str | None = None
    """A substring of the one error line (None: the run must succeed)."""
    status: int = 1
    setup: Callable[[Path, pytest.MonkeyPatch], None] | None = None
    check: Callable[[Run], None] | None = None
    run: Callable[[Path, pytest.MonkeyPatch], Run] | None = None
    allow_error_record: bool = True
    extra: dict = field(default_factory=dict)


def _main(tmp: Path, args: list[str], *, out_dir: bool = True) -> Run:
    import contextlib
    import io

    from lens.run import main

    out = tmp / "out"
    argv = [*args, "--quiet", "--no-plots"]
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


def _model_copy(tmp: Path, drop: tuple[str, ...] = ()) -> Path:
    target = tmp / "model"
    if not target.exists():
        shutil.copytree(MODELS / "tiny-gpt2", target)
    for name in drop:
        (target / name).unlink()
    return target


def _truncated_safetensors(tmp: Path) -> list[str]:
    target = _model_copy(tmp)
    weights = target / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return [str(target)]


def _poisoned(tmp: Path) -> list[str]:
    """tiny-gpt2 with one NaN in block 2's MLP: layers from 3 on are non-finite."""
    target = _model_copy(tmp)
    weights = load_file(target / "model.safetensors")
    name = next(k for k in sorted(weights) if ".h.2.mlp.c_fc.weight" in k)
    weights[name][0, 0] = float("nan")
    save_file(weights, str(target / "model.safetensors"), metadata={"format": "pt"})
    return [str(target)]


def _corrupt_gguf(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lens.embedded

    real = lens.embedded.gguf_path()
    bad = tmp / real.name
    with real.open("rb") as src:
        bad.write_bytes(src.read(1 << 20))
    monkeypatch.setattr(lens.embedded, "gguf_path", lambda: bad)
    monkeypatch.setenv("LENS_CACHE_DIR", str(tmp / "cache"))


def _probe(tmp: Path, facts: list[dict]) -> str:
    path = tmp / "probe.json"
    path.write_text(json.dumps({"facts": facts}), encoding="utf-8")
    return str(path)


def _fact(**over: object) -> dict:
    return {"id": "f", "prompt": PROMPT, "answer": "Berlin", **over}


def _prism_artifacts(tmp: Path, *, d: int = 32, damage: str | None = None) -> Path:
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


def _no_space(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every file write in the run directory fails as on a full disk."""
    from lens import rundir

    def full(*_: object, **__: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    for name in ("write", "create"):
        if hasattr(rundir.RunDir, name):
            monkeypatch.setattr(rundir.RunDir, name, full)


def _tokenises_to_nothing(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Run:
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


def _killed_mid_write(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Run:
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


def _same_minute(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Run:
    """Two runs without --out_dir started together: both kept, neither overwritten."""
    cmd = [sys.executable, "-m", "lens.run", str(REPO / TINY), "--quiet", "--no-plots",
           "--output-root", str(tmp)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE) for _ in range(2)]
    errs = [p.communicate()[1].decode() for p in procs]
    status = max(p.returncode for p in procs)
    return Run(status, "".join(errs), tmp, tmp)


def _interrupted_sweep(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Run:
    """Ctrl-C while the second model of a sweep runs: the first keeps its outputs, exit 130."""
    from lens.config import RunConfig
    from lens.rundir import prepare_out_dir
    from lens.sweep import run_sweep, worker_argv

    def ctrl_c(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    def argv(job: dict) -> list[str]:
        if job["model"] == "org/slow":
            signal.setitimer(signal.ITIMER_REAL, 1.0)
            return [sys.executable, "-c", "import time; time.sleep(60)"]
        return worker_argv(job)

    monkeypatch.chdir(REPO)
    previous = signal.signal(signal.SIGALRM, ctrl_c)
    import contextlib
    import io

    err = io.StringIO()
    try:
        with prepare_out_dir(tmp / "out") as out, contextlib.redirect_stderr(err):
            status = run_sweep([TINY, "org/slow"], RunConfig(device="cpu"), out, quiet=True,
                               plots=False, argv=argv)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    return Run(status, err.getvalue(), tmp / "out", tmp)


# ---------------------------------------------------------------- checks


def _pure_rows(run: Run, name: str = "tiny-gpt2") -> list[dict[str, str]]:
    from lens.writers import read_csv_dicts

    return read_csv_dicts(run.files[f"output-{name}-pure-next-token.csv"])


def _check_unresolved(run: Run) -> None:
    report = json.loads(run.files["output-tiny-gpt2.json"])
    assert report["diagnostics"]["gold_alignment"] == "unresolved"
    assert report["gold_answer"]["first_id"] is None
    rows = _pure_rows(run)
    assert rows and all(r["p_answer"] == "" and r["answer_rank"] == "" for r in rows)
    assert all(r["is_answer"] in ("True", "False") for r in rows)  # string fallback, SPEC §3.2
    assert report["diagnostics"]["first_rank_le_1"] is None


def _check_poisoned(run: Run) -> None:
    report = json.loads(run.files["output-model.json"])
    flag = report["diagnostics"]["non_finite"]
    assert flag["first_pass"] == "pos/orig" and flag["first_layer"] == 3
    assert flag["passes"] == {"pos/orig": 3, "pos/no_filler": 3, "ctl/orig": 3}
    rows = _pure_rows(run, "model")
    early = [r for r in rows if r["prompt_variant"] == "orig" and int(r["layer"]) < 3]
    late = [r for r in rows if int(r["layer"]) >= 3]
    assert early and late
    assert all(r["entropy"] != "" and r["p_top1"] != "" for r in early)
    for r in late:
        assert r["entropy"] == r["p_top1"] == r["kl_to_final_bits"] == r["answer_rank"] == ""
        assert r["is_answer"] == r["copy_collapse"] == ""
    assert "non-finite" in run.err and "layer 3" in run.err


def _check_both_runs_kept(run: Run) -> None:
    dirs = sorted(p for p in run.tmp.iterdir() if p.is_dir() and p.name.startswith("run-"))
    assert len(dirs) == 2 and dirs[-1].name == "run-latest"
    for d in dirs:
        names = {p.name for p in d.iterdir()}
        assert {"output-tiny-gpt2.json", "output-tiny-gpt2-records.csv",
                "output-tiny-gpt2-pure-next-token.csv"} <= names
    a, b = ((d / "output-tiny-gpt2.json").read_bytes() for d in dirs)
    assert a == b


def _check_interrupted(run: Run) -> None:
    from lens.writers import read_csv_rows

    assert "output-tiny-gpt2.json" in run.files
    header, *rows = read_csv_rows(run.files["summary.csv"])
    status = {r[0]: r[header.index("status")] for r in rows}
    assert status == {TINY: "ok", "org/slow": "interrupted"}


CASES = [
    # 1. models that cannot be loaded
    Case("unreachable-hub", lambda t: ["some-org/some-model"], "hub is unreachable"),
    Case("missing-directory", lambda t: ["./no/such/model"], "does not exist"),
    Case("directory-without-weights",
         lambda t: [str(_model_copy(t, ("model.safetensors",)))], "no weights in"),
    Case("directory-without-tokenizer",
         lambda t: [str(_model_copy(t, ("tokenizer.json",)))], "no tokenizer in"),
    Case("truncated-safetensors", _truncated_safetensors, "cannot load weights"),
    Case("corrupt-gguf", lambda t: [], "corrupt GGUF file", setup=_corrupt_gguf),
    # 2. prompts
    Case("prompt-longer-than-context",
         lambda t: [TINY, "--probe", _probe(t, [_fact(prompt=" ".join(["capital"] * 80))])],
         "takes at most 64"),
    Case("empty-prompt", lambda t: [TINY, "--probe", _probe(t, [_fact(prompt="")])],
         "'prompt'", allow_error_record=False),
    Case("prompt-tokenises-to-nothing", message="tokenises to nothing", run=_tokenises_to_nothing),
    # 3. a gold answer the tokenizer cannot align: recorded, and the run goes on
    Case("unresolved-gold-answer",
         lambda t: [TINY, "--probe", _probe(t, [_fact(answer="Zorblax")])], None, status=0,
         check=_check_unresolved),
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
         setup=lambda t, mp: _no_space(mp), allow_error_record=False),
    Case("killed-mid-write", status=0, run=_killed_mid_write),
    Case("earlier-run-never-overwritten", lambda t: [TINY], "never overwrites",
         setup=lambda t, mp: ((t / "out").mkdir(),
                              (t / "out" / "output-tiny-gpt2.json").write_text("earlier")),
         check=lambda r: r.files["output-tiny-gpt2.json"] == b"earlier",
         allow_error_record=False),
    # 5. two runs in the same minute without --out_dir
    Case("two-runs-same-minute", status=0, run=_same_minute, check=_check_both_runs_kept),
    # 6. NaN in the weights: reported, null metrics, flagged
    Case("poisoned-weight", _poisoned, None, status=0, check=_check_poisoned),
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
         lambda t: [TINY, "--prism", "on", "--prism-dir", str(_prism_artifacts(t, d=16))],
         "d_model 16 vs 32"),
    Case("prism-truncated",
         lambda t: [TINY, "--prism", "on", "--prism-dir",
                    str(_prism_artifacts(t, damage="truncated"))], "whiten.pt"),
    Case("prism-invalid-provenance",
         lambda t: [TINY, "--prism", "on", "--prism-dir",
                    str(_prism_artifacts(t, damage="provenance"))], "provenance.json"),
    Case("probe-missing-field",
         lambda t: [TINY, "--probe", _probe(t, [{"id": "f", "prompt": PROMPT}])],
         "missing field 'answer'", allow_error_record=False),
    Case("probe-wrong-type",
         lambda t: [TINY, "--probe", _probe(t, [_fact(answer=7)])], "'answer'",
         allow_error_record=False),
    Case("probe-duplicate-ids",
         lambda t: [TINY, "--probe", _probe(t, [_fact(), _fact()])], "duplicate",
         allow_error_record=False),
    # 9. Ctrl-C during a sweep
    Case("interrupted-sweep", status=130, run=_interrupted_sweep, check=_check_interrupted),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_fault(case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lens.model

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(lens.model, "_hub_reachable", lambda timeout=3.0: False)
    monkeypatch.chdir(REPO)
    if case.setup is not None:
        case.setup(tmp_path, monkeypatch)
    run = case.run(tmp_path, monkeypatch) if case.run else _main(tmp_path, case.args(tmp_path))
    assert run.status == case.status, run.err
    assert "Traceback" not in run.err
    if case.message is not None:
        assert len(run.lines) == 1, run.err
        assert case.message in run.lines[0], run.lines[0]
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
