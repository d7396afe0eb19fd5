"""Sweeps on a Ray cluster (``--launcher ray``): each model one Ray task.

The task runs the model into memory and sends the BYTES of its files back
through Ray; the driver writes them into its run directory all at once (staging
and commit, ``output-<name>.json`` last) or writes the failure record. So the
outputs reach the driver's directory wherever the task ran, without a shared
file system. Size limit: one model's files travel as one Ray object, which must
fit in the object store of the task's node and of the driver's node (by default
30 % of each node's memory); a run's files are a few MB, and
``--keep-residuals`` adds layers · positions · d_model · 4 bytes (≈ 50 MB for a
70B model on the default probe).

Each task is a Ray generator: it first yields where it runs (pid, node), so
that the driver knows which models are running, then its result. Tasks run
concurrently as the cluster's resources allow (``lens.launch.ray_resources``),
each in a fresh worker process (``max_calls=1``: GPU memory is returned and no
state leaks from one model into the next, as with the local launcher).

Retries: none (``max_retries=0``, no ``retry_exceptions``). A model that dies
(killed, out of memory, its node lost) gets ``output-<name>.error.json`` with
stage ``crash`` and the Ray error class, and the sweep goes on. Retrying an OOM
with the same request fails the same way; retrying with a larger one changes
where and in how many pieces the model runs, and may cost hours of a large
GPU node, a decision for the researcher: ``--resume DIR`` re-runs exactly the
failed and missing models, with whatever options they choose.

Ctrl-C cancels every task: queued ones are dropped (``not_run``), running ones
get KeyboardInterrupt (``interrupted``, with a failure record) and, if they do
not stop within ``CANCEL_GRACE`` seconds, are killed. Models already finished
keep their complete outputs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from lens.config import Probe, RunConfig
from lens.errors import LensError
from lens.launch import SweepEvents
from lens.launch.ray_resources import GiB, local_param_estimate, task_request, unplaceable
from lens.rundir import RunDir
from lens.worker import ModelResult

CANCEL_GRACE = 10.0
"""Seconds running tasks get after Ctrl-C to stop and report before they are killed."""
FALLBACK_GPU_BYTES = 80 * GiB
"""Memory assumed per GPU when the cluster's GPUs cannot be measured."""
GPU_PROBE_TIMEOUT = 120.0
INSTALL = "pip install 'lens[ray]'"
_SYSTEM_FAILURES = {
    "WorkerCrashedError": "its Ray worker process died (killed, or out of memory: the kernel's "
                          "OOM killer sends SIGKILL)",
    "OutOfMemoryError": "Ray's memory monitor killed it: its node ran out of memory",
    "NodeDiedError": "the node running it was lost",
    "ObjectLostError": "its result was lost with the node that held it",
    "OwnerDiedError": "its result was lost with the node that held it",
    "TaskCancelledError": "its Ray task was cancelled",
}


def require_ray() -> Any:
    """``import ray``, or one line saying how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise LensError(f"--launcher ray needs Ray, which is not installed; install it with: "
                        f"{INSTALL}") from exc
    return ray


@contextlib.contextmanager
def connected(address: str | None) -> Iterator[Any]:
    """Ray, connected: the running instance, ``address``, ``RAY_ADDRESS``, or a new local one.

    A connection made here is closed at the end (a local instance started here stops).
    """
    ray = require_ray()
    if ray.is_initialized():
        yield ray
        return
    joining = address or os.environ.get("RAY_ADDRESS")
    options: dict[str, Any] = {"address": address, "logging_level": "WARNING"}
    if not joining:
        import lens

        root = str(Path(lens.__file__).resolve().parents[1])  # this very lens in the workers
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
        options.update(include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": path}})
    try:
        ray.init(**options)
    except Exception as exc:  # noqa: BLE001 - Ray raises many kinds; one line for the user
        where = f"the Ray cluster at {joining}" if joining else "a local Ray instance"
        raise LensError(f"cannot connect to {where}: {_first_line(exc)}; start the cluster "
                        "(ray start --head) or check --ray-address / RAY_ADDRESS") from exc
    try:
        yield ray
    finally:
        ray.shutdown()


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


# ---------------------------------------------------------------- the task (runs on a Ray worker)


def produce_files(model: str, config: RunConfig, probe: Probe, *,
                  plots: bool) -> tuple[ModelResult, dict[str, bytes]]:
    """Run one model without touching the driver's directory: its result and its files' bytes."""
    import tempfile

    from lens.worker import run_one

    with tempfile.TemporaryDirectory(prefix="lens-task-") as tmp, RunDir.open(Path(tmp)) as scratch:
        result = run_one(model, config, scratch, probe, quiet=True, plots=plots)
        files = {n: scratch.read(n) for n in scratch.names()} if result.ok else {}
    return result, files


def deliver_files(out: RunDir, model: str, result: ModelResult,
                  files: Mapping[str, bytes]) -> ModelResult:
    """On the driver: commit a finished model's files all at once, or write its failure record."""
    from lens.model import output_name
    from lens.worker import _commit, write_error_record

    name = output_name(model)
    if result.ok:
        try:
            _commit(out, files, f".lens-staging-{name}-{os.urandom(6).hex()}")
            return result
        except LensError as exc:
            result = ModelResult(model=model, status="failed", stage="write",
                                 error_class=type(exc).__name__, message=str(exc))
    if result.error_class != "OutputExists":
        write_error_record(out, name, result)
    return result


def clash(out: RunDir, model: str) -> ModelResult | None:
    """A model whose files are in ``out`` already is refused before it runs (never overwritten)."""
    from lens.model import output_name
    from lens.worker import OutputExists, _exists, error_file_name, output_file_names

    name = output_name(model)
    found = next((n for n in (*output_file_names(name), error_file_name(name)) if out.exists(n)),
                 None)
    if found is None:
        return None
    return ModelResult(model=model, status="failed", stage="resolve",
                       error_class=OutputExists.__name__, message=_exists(out, found))


def model_task(job: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """The Ray task of one model: yields where it runs, then its result and files.

    It runs in the driver's working directory when that exists on its node, so
    that relative model paths and ``--prism-dir`` mean what they mean locally.
    """
    import ray

    yield {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id()}
    start = time.monotonic()
    here = job["cwd"] if os.path.isdir(job["cwd"]) else os.getcwd()
    with contextlib.chdir(here):
        result, files = produce_files(job["model"], job["config"], job["probe"], plots=job["plots"])
    yield {"result": result.to_json(), "files": files,
           "seconds": round(time.monotonic() - start, 2)}


def gpu_memory() -> float:
    """Total memory of the GPU this task was given (run as a one-GPU Ray task)."""
    import torch

    return float(torch.cuda.get_device_properties(0).total_memory)


# ---------------------------------------------------------------- the driver


def failure(model: str, exc: BaseException, *, interrupted: bool) -> ModelResult:
    """The result of a task that Ray reports as failed: stage ``crash`` and Ray's error class."""
    cls = type(exc).__name__
    why = next((text for name, text in _SYSTEM_FAILURES.items() if name == cls),
               "its Ray task failed")
    message = f"{why}: {_first_line(exc)}"
    if interrupted:
        return ModelResult(model=model, status="interrupted", stage="interrupted",
                           error_class=cls, message=f"interrupted (Ctrl-C); {message}")
    return ModelResult(model=model, status="failed", stage="crash", error_class=cls,
                       message=message)


@dataclasses.dataclass
class _Task:
    model: str
    started: bool = False


class RaySweep:
    """Submits every model, delivers each result as it arrives, cancels on Ctrl-C."""

    def __init__(self, ray: Any, out: RunDir, events: SweepEvents,
                 on_started: Callable[[str, Mapping[str, Any]], None] | None) -> None:
        self.ray = ray
        self.out = out
        self.events = events
        self.on_started = on_started
        self.tasks: dict[Any, _Task] = {}

    def deliver(self, model: str, result: ModelResult, files: Mapping[str, bytes]) -> ModelResult:
        return deliver_files(self.out, model, result, files)

    def submit(self, models: Sequence[str], config: RunConfig, probe: Probe, *, plots: bool) -> None:
        ray = self.ray
        remote = ray.remote(max_retries=0, retry_exceptions=False, max_calls=1)(model_task)
        gpu_bytes = self._gpu_bytes()
        nodes = ray.nodes()
        for model in models:
            refused = clash(self.out, model)
            if refused:
                self.events.finished(model, refused)
                continue
            request = task_request(model, config, n_params=local_param_estimate(model),
                                   gpu_bytes=gpu_bytes)
            why = unplaceable(request, nodes)
            if why:
                skipped = ModelResult(model=model, status="skipped", stage="device",
                                      error_class="DeviceError", message=f"{model}: {why}")
                self.events.finished(model, self.deliver(model, skipped, {}))
                continue
            job = {"model": model, "config": request.config, "probe": probe, "plots": plots,
                   "cwd": os.getcwd()}
            self.tasks[remote.options(**request.options()).remote(job)] = _Task(model)

    def _gpu_bytes(self) -> float | None:
        ray = self.ray
        if not ray.cluster_resources().get("GPU"):
            return None
        probe = ray.remote(num_gpus=1, num_cpus=0, max_retries=0)(gpu_memory)
        try:
            return float(ray.get(probe.remote(), timeout=GPU_PROBE_TIMEOUT))
        except Exception as exc:  # noqa: BLE001 - a guess is better than no sweep
            print(f"lens: warning: cannot measure the cluster's GPU memory ({type(exc).__name__}); "
                  f"assuming {FALLBACK_GPU_BYTES / GiB:.0f} GiB per GPU", file=sys.stderr)
            return FALLBACK_GPU_BYTES

    def step(self, gen: Any, *, cancelled: bool) -> bool:
        """Take the next item of one task; True when the task is over."""
        task = self.tasks[gen]
        try:
            item = self.ray.get(next(gen))
        except StopIteration:
            return True
        except Exception as exc:  # noqa: BLE001 - Ray's errors: crash, OOM, node lost, cancel
            if cancelled and not task.started:
                return True  # never ran: not_run, no record
            result = failure(task.model, exc, interrupted=cancelled)
            self.events.finished(task.model, self.deliver(task.model, result, {}))
            return True
        if not task.started:
            task.started = True
            self.events.started(task.model)
            if self.on_started is not None:
                self.on_started(task.model, item)
            return False
        result = ModelResult.from_json(item["result"])
        result = self.deliver(task.model, result, item["files"])
        self.events.finished(task.model, dataclasses.replace(result, seconds=item["seconds"]))
        return True

    def collect(self) -> bool:
        """Deliver results as they come; returns whether Ctrl-C ended the sweep."""
        pending = list(self.tasks)
        try:
            while pending:
                ready, pending = self.ray.wait(pending, num_returns=1)
                pending += [gen for gen in ready if not self.step(gen, cancelled=False)]
        except KeyboardInterrupt:
            self.cancel(pending)
            return True
        return False

    def cancel(self, pending: list[Any]) -> None:
        """Ctrl-C: cancel every task, keep what finishes within the grace, kill the rest."""
        for gen in pending:
            with contextlib.suppress(Exception):
                self.ray.cancel(gen)
        deadline = time.monotonic() + CANCEL_GRACE
        with contextlib.suppress(KeyboardInterrupt):  # a second Ctrl-C: stop waiting
            while pending and (left := deadline - time.monotonic()) > 0:
                ready, pending = self.ray.wait(pending, num_returns=1, timeout=left)
                pending += [gen for gen in ready if not self.step(gen, cancelled=True)]
        for gen in pending:
            task = self.tasks[gen]
            with contextlib.suppress(Exception):
                self.ray.cancel(gen, force=True)
            if task.started:
                result = ModelResult(
                    model=task.model, status="interrupted", stage="interrupted",
                    error_class="TaskCancelledError",
                    message=f"interrupted (Ctrl-C); its Ray task did not stop within "
                            f"{CANCEL_GRACE:g}s and was killed")
                self.events.finished(task.model, self.deliver(task.model, result, {}))


def run_on_ray(models: Sequence[str], config: RunConfig, out: RunDir, probe: Probe, *,
               plots: bool, address: str | None, events: SweepEvents,
               on_started: Callable[[str, Mapping[str, Any]], None] | None = None) -> bool:
    """Run ``models`` as Ray tasks; returns whether Ctrl-C ended the sweep.

    ``on_started`` is told
    the model and ``{pid, node}`` of its task when it starts.
    """
    with connected(address) as ray:
        sweep = RaySweep(ray, out, events, on_started)
        try:
            sweep.submit(models, config, probe, plots=plots)
        except KeyboardInterrupt:
            sweep.cancel(list(sweep.tasks))
            return True
        return sweep.collect()
