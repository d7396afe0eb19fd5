"""What one model's Ray task asks for: GPUs, CPUs and memory from the device policy.

The driver never loads weights. It reads the model's ``config.json`` (a local
directory, or the Hugging Face cache without touching the network) to estimate
the parameters, then applies the memory rule of ``lens.devices``
(``params · bytes/param · (1 + OVERHEAD)`` plus a fixed reserve) to the GPUs of
the cluster: as many GPUs as the weights need, each holding at most its memory
less ``RESERVE["cuda"]``. A model that needs more than one GPU gets
``n_devices`` set so that the bridge splits it over the GPUs Ray assigned (Ray
restricts ``CUDA_VISIBLE_DEVICES`` to them). Without GPUs in the cluster, or with
``--device cpu``, the task asks for the CPU estimate as Ray ``memory``.

A request that no node of the cluster can hold would wait forever in Ray's
queue; ``unplaceable`` finds those first so that the sweep records them as
*skipped* (stage ``device``), the way the local launcher skips a model that
fits no device.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lens.config import RunConfig
from lens.devices import BYTES_PER_PARAM, OVERHEAD, RESERVE, estimate_params, needed_bytes, pick_dtype

GiB = 1 << 30
TASK_CPUS = 1.0
"""CPUs a task asks for. Ray sets ``OMP_NUM_THREADS`` to it, so torch computes on one
thread in a task; the outputs are the same bytes as with more threads (the goldens
pin this), and CPU-only cluster runs are for small models."""


@dataclass(frozen=True, kw_only=True)
class TaskRequest:
    """The resources of one model's Ray task, and the config it runs with."""

    num_gpus: int
    num_cpus: float
    memory: int | None
    """Bytes of host memory (Ray's ``memory`` resource); None when the size is unknown."""
    config: RunConfig
    """``RunConfig`` for the task: ``n_devices`` set when the model spans several GPUs."""
    n_params: int | None

    def options(self) -> dict[str, Any]:
        """Keyword arguments for ``remote_function.options``."""
        opts: dict[str, Any] = {"num_gpus": self.num_gpus, "num_cpus": self.num_cpus}
        if self.memory:
            opts["memory"] = self.memory
        return opts

    def describe(self) -> str:
        mem = f", {self.memory / GiB:.1f} GiB memory" if self.memory else ""
        return f"{self.num_gpus} GPU(s), {self.num_cpus:g} CPU(s){mem}"


def local_param_estimate(model_id: str) -> int | None:
    """Parameters from the model's config, read without the network; None when not at hand."""
    from transformers import AutoConfig

    from lens.sources import quiet, resolve_source

    try:
        with quiet():
            source = resolve_source(model_id) if _is_local(model_id) else model_id
            return estimate_params(AutoConfig.from_pretrained(source, local_files_only=True))
    except Exception:  # noqa: BLE001 - unknown size: the task asks for the default request
        return None


def _is_local(model_id: str) -> bool:
    from pathlib import Path

    from lens import embedded

    return embedded.is_embedded(model_id) or Path(model_id).expanduser().exists()


def task_request(model_id: str, config: RunConfig, *, n_params: int | None,
                 gpu_bytes: float | None) -> TaskRequest:
    """The request of one model on a cluster whose GPUs hold ``gpu_bytes`` each (None: no GPUs).

    ``--device cpu`` (or no GPU in the cluster) asks for no GPU and the CPU
    memory estimate; ``--n-devices N`` asks for N GPUs; otherwise the weights
    decide the number of GPUs (at least one).
    """
    on_gpu = gpu_bytes is not None and config.device in ("auto", "cuda")
    if not on_gpu:
        dtype = pick_dtype(config.dtype, torch.device("cpu"), model_id, n_params)
        memory = None if n_params is None else math.ceil(needed_bytes(n_params, dtype, "cpu"))
        return TaskRequest(num_gpus=0, num_cpus=TASK_CPUS, memory=memory, config=config,
                           n_params=n_params)
    assert gpu_bytes is not None
    dtype = pick_dtype(config.dtype, torch.device("cuda"), model_id, n_params)
    if config.n_devices is not None:
        n_gpus = config.n_devices
    elif n_params is None:
        n_gpus = 1
    else:
        weights = n_params * BYTES_PER_PARAM[dtype] * (1 + OVERHEAD)
        n_gpus = max(1, math.ceil(weights / max(gpu_bytes - RESERVE["cuda"], 1)))
    task_config = config
    if n_gpus > 1 and not config.multi_device:
        task_config = dataclasses.replace(config, n_devices=n_gpus)
    # the weights pass through host memory while they load
    memory = None if n_params is None else math.ceil(n_params * BYTES_PER_PARAM[dtype])
    return TaskRequest(num_gpus=n_gpus, num_cpus=TASK_CPUS, memory=memory, config=task_config,
                       n_params=n_params)


def unplaceable(request: TaskRequest, nodes: Sequence[Mapping[str, Any]]) -> str | None:
    """Why no alive node can ever run ``request`` (one line), or None if one can."""
    alive = [n.get("Resources", {}) for n in nodes if n.get("Alive", True)]
    needs = {"GPU": request.num_gpus, "CPU": request.num_cpus, "memory": request.memory or 0}
    for res in alive:
        if all(res.get(key, 0) >= amount for key, amount in needs.items() if amount):
            return None
    most = {key: max((res.get(key, 0) for res in alive), default=0) for key in needs}
    return (f"its Ray task needs {request.describe()} on one node, and the cluster's largest "
            f"nodes have {most['GPU']:g} GPU(s), {most['CPU']:g} CPU(s), "
            f"{most['memory'] / GiB:.1f} GiB memory; skipped: add a larger node, or run it "
            "with --device cpu or --dtype to change its size")
