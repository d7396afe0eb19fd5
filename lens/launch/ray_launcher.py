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
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from lens import outputs
from lens.config import Probe, RunConfig
from lens.errors import LensError
from lens.launch import SweepEvents
from lens.launch.ray_resources import GiB, local_param_estimate, task_request, unplaceable
from lens.results import ModelResult, interrupted
from lens.rundir import RunDir
from lens.runmodel import Produced, first_line

CANCEL_GRACE = 10.0
"""Seconds running tasks get after Ctrl-C to stop and report before they are killed."""
FALLBACK_GPU_BYTES = 80 * GiB
"""Memory assumed per GPU when the cluster's GPUs cannot be measured."""
GPU_PROBE_TIMEOUT = 120.0
INSTALL = "pip install 'lens[ray]'"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
"""Ray colours parts of its messages for terminals; a failure record holds plain text."""
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
        raise LensError(f"cannot connect to {where}: {first_line(exc)}; start the cluster "
                        "(ray start --head) or check --ray-address / RAY_ADDRESS") from exc
    try:
        yield ray
    finally:
        ray.shutdown()


def prepare(out: RunDir, model: str, probe: Probe) -> ModelResult | None:
    """Before a model is submitted, as ``run_one`` does: finish or remove what a killed run
    left (one stderr line each), and refuse a model whose files are in ``out`` already."""
    from lens.commit import OutputExists, exists_message, recover
    from lens.runmodel import clash

    name = outputs.output_name(model)
    for note in recover(out, name):
        print(f"lens: {name}: {note}", file=sys.stderr, flush=True)
    existing = clash(out, name, probe)
    if existing is None:
        return None
    return ModelResult(model=model, status="failed", stage="write",
                       error_class=OutputExists.__name__, message=exists_message(out, existing))


# ---------------------------------------------------------------- the task (runs on a Ray worker)


def model_task(job: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """The Ray task of one model: yields where it runs, then its result and files.

    It runs in the driver's working directory when that exists on its node, so
    that relative model paths and ``--prism-dir`` mean what they mean locally.
    """
    import ray

    from lens.chatter import libraries_quiet
    from lens.runmodel import produce

    yield {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id()}
    start = time.monotonic()
    here = job["cwd"] if os.path.isdir(job["cwd"]) else os.getcwd()
    with contextlib.chdir(here), libraries_quiet(job["quiet"]):
        produced = produce(job["model"], RunConfig.from_json(job["config"]), job["probe"],
                           quiet=True, plots=job["plots"])
    yield {"produced": produced, "seconds": round(time.monotonic() - start, 2)}


def gpu_memory() -> float:
    """Total memory of the GPU this task was given (run as a one-GPU Ray task)."""
    import torch

    return float(torch.cuda.get_device_properties(0).total_memory)


# ---------------------------------------------------------------- the driver


def failure(model: str, exc: BaseException, *, cancelled: bool) -> ModelResult:
    """The result of a task that Ray reports as failed: stage ``crash`` and Ray's error class
    (for an exception raised inside the task, ``RayTaskError``, the class it wraps)."""
    exc = getattr(exc, "cause", None) or exc
    cls = type(exc).__name__
    why = _SYSTEM_FAILURES.get(cls, "its Ray task failed")
    detail = _ANSI.sub("", first_line(exc))
    message = why if detail == cls else f"{why}: {detail}"
    if cancelled:
        return interrupted(model, f"interrupted; {message}", error_class=cls)
    return ModelResult(model=model, status="failed", stage="crash", error_class=cls,
                       message=message)


@dataclasses.dataclass
class _Task:
    model: str
    started: bool = False


class RaySweep:
    """Submits every model, delivers each result as it arrives, cancels on Ctrl-C."""

    def __init__(self, ray: Any, out: RunDir, events: SweepEvents, *, quiet: bool,
                 on_started: Callable[[str, Mapping[str, Any]], None] | None) -> None:
        self.ray = ray
        self.out = out
        self.events = events
        self.quiet = quiet
        self.on_started = on_started
        self.tasks: dict[Any, _Task] = {}

    def deliver(self, produced: Produced) -> ModelResult:
        """Write a model's files or its failure record into the run directory (``runmodel``)."""
        from lens.runmodel import deliver

        return deliver(self.out, produced, quiet=self.quiet)

    def fail(self, result: ModelResult) -> None:
        produced = Produced(name=outputs.output_name(result.model), result=result)
        self.events.finished(result.model, self.deliver(produced))

    def submit(self, models: Sequence[str], config: RunConfig, probe: Probe, *, plots: bool) -> None:
        ray = self.ray
        remote = ray.remote(max_retries=0, retry_exceptions=False, max_calls=1)(model_task)
        gpu_bytes = self._gpu_bytes()
        nodes = ray.nodes()
        for model in models:
            refused = prepare(self.out, model, probe)
            if refused:
                self.events.finished(model, refused)
                continue
            request = task_request(model, config, n_params=local_param_estimate(model),
                                   gpu_bytes=gpu_bytes)
            why = unplaceable(request, nodes)
            if why:
                self.fail(ModelResult(model=model, status="skipped", stage="device",
                                      error_class="DeviceError", message=why))
                continue
            job = {"model": model, "config": request.config.to_json(), "probe": probe,
                   "plots": plots, "quiet": self.quiet, "cwd": os.getcwd()}
            self.tasks[remote.options(**request.options()).remote(job)] = _Task(model)

    def _gpu_bytes(self) -> float | None:
        ray = self.ray
        if not ray.cluster_resources().get("GPU"):
            return None
        measure = ray.remote(num_gpus=1, num_cpus=0, max_retries=0)(gpu_memory)
        try:
            return float(ray.get(measure.remote(), timeout=GPU_PROBE_TIMEOUT))
        except Exception as exc:  # noqa: BLE001 - a guess is better than no sweep
            print(f"lens: warning: cannot measure the cluster's GPU memory ({type(exc).__name__}); "
                  f"assuming {FALLBACK_GPU_BYTES / GiB:.0f} GiB per GPU", file=sys.stderr)
            return FALLBACK_GPU_BYTES

    def step(self, gen: Any, *, cancelled: bool) -> bool:
        """Take the next item of one task; True when the task is over."""
        task = self.tasks[gen]
        try:
            item = self.ray.get(next(gen))
        except StopIteration:  # over without a result: Ray drops what a cancelled task yields
            error: BaseException = self.ray.exceptions.TaskCancelledError() if cancelled else \
                RuntimeError("its Ray task ended without a result")
            if task.started or not cancelled:
                self.fail(failure(task.model, error, cancelled=cancelled))
            return True
        except Exception as exc:  # noqa: BLE001 - Ray's errors: crash, OOM, node lost, cancel
            if task.started or not cancelled:  # a cancelled task that never ran: not_run
                self.fail(failure(task.model, exc, cancelled=cancelled))
            return True
        if not task.started:
            task.started = True
            self.events.started(task.model)
            if self.on_started is not None:
                self.on_started(task.model, item)
            return False
        result = self.deliver(item["produced"])
        self.events.finished(task.model, dataclasses.replace(result, seconds=item["seconds"]))
        return True

    def collect(self) -> KeyboardInterrupt | None:
        """Deliver results as they come; the Ctrl-C or SIGTERM that ended the sweep, if any."""
        pending = list(self.tasks)
        try:
            while pending:
                ready, pending = self.ray.wait(pending, num_returns=1)
                pending += [gen for gen in ready if not self.step(gen, cancelled=False)]
        except KeyboardInterrupt as exc:
            self.cancel(pending)
            return exc
        return None

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
                self.fail(interrupted(task.model, f"interrupted; its Ray task did not stop "
                                                  f"within {CANCEL_GRACE:g}s and was killed",
                                      error_class="TaskCancelledError"))


def run_on_ray(models: Sequence[str], config: RunConfig, out: RunDir, probe: Probe, *,
               plots: bool, quiet: bool, address: str | None, events: SweepEvents,
               on_started: Callable[[str, Mapping[str, Any]], None] | None = None,
               ) -> KeyboardInterrupt | None:
    """Run ``models`` as Ray tasks; the Ctrl-C or SIGTERM that ended the sweep, if any.

    ``on_started`` is told
    the model and ``{pid, node}`` of its task when it starts.
    """
    with connected(address) as ray:
        sweep = RaySweep(ray, out, events, quiet=quiet, on_started=on_started)
        try:
            sweep.submit(models, config, probe, plots=plots)
        except KeyboardInterrupt as exc:
            sweep.cancel(list(sweep.tasks))
            return exc
        return sweep.collect()
