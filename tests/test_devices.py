"""Device and dtype policy with injected memory figures (README, Devices)."""

from __future__ import annotations

import math
import os
from types import SimpleNamespace

import pytest
import torch

from lens.config import RunConfig
from lens.devices import (
    GiB,
    DeviceError,
    estimate_params,
    needed_bytes,
    plan_device,
    pick_dtype,
)
from lens.errors import LensError
from lens.testing import MODELS, TINY_MODELS, reproducible

LLAMA3_8B = SimpleNamespace(model_type="llama", hidden_size=4096, num_hidden_layers=32,
                            vocab_size=128256, num_attention_heads=32, num_key_value_heads=8,
                            intermediate_size=14336, tie_word_embeddings=False)
LLAMA3_70B = SimpleNamespace(model_type="llama", hidden_size=8192, num_hidden_layers=80,
                             vocab_size=128256, num_attention_heads=64, num_key_value_heads=8,
                             intermediate_size=28672, tie_word_embeddings=False)
GPT2 = SimpleNamespace(model_type="gpt2", n_embd=768, n_layer=12, vocab_size=50257, n_head=12,
                       n_inner=None, tie_word_embeddings=True)


def memory(cuda=None, mps=None, cpu=None):
    """A FreeMemory function: GiB per device kind, None for an absent device."""
    figures = {"cuda": cuda, "mps": mps, "cpu": cpu}
    return lambda kind: None if figures[kind] is None else figures[kind] * GiB


def test_parameter_estimates():
    assert estimate_params(LLAMA3_8B) == pytest.approx(8.03e9, rel=0.01)
    assert estimate_params(LLAMA3_70B) == pytest.approx(70.6e9, rel=0.01)
    assert estimate_params(GPT2) == pytest.approx(124e6, rel=0.01)
    assert estimate_params(SimpleNamespace(hidden_size=8)) is None


@pytest.mark.parametrize("name", TINY_MODELS)
def test_tiny_model_estimate_is_close(name):
    from safetensors import safe_open
    from transformers import AutoConfig

    with safe_open(MODELS / name / "model.safetensors", "pt") as f:
        actual = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    estimate = estimate_params(AutoConfig.from_pretrained(MODELS / name))
    assert estimate == pytest.approx(actual, rel=0.05)  # norms and biases are not counted


def test_fits_on_cuda():
    plan = plan_device("auto", model_id="meta-llama/Meta-Llama-3-8B", n_params=8_030_000_000,
                       free=memory(cuda=80, cpu=120))
    assert plan.device == torch.device("cuda") and plan.dtype == torch.float16
    assert plan.needed_bytes == needed_bytes(8_030_000_000, torch.float16, "cuda") < 80 * GiB
    gemma = plan_device("auto", model_id="google/gemma-2-9b", n_params=9_240_000_000,
                        free=memory(cuda=80, cpu=120))
    assert gemma.device.type == "cuda" and gemma.dtype == torch.bfloat16


def test_only_cpu():
    plan = plan_device("auto", model_id="m", n_params=8_030_000_000, free=memory(cpu=120))
    assert plan.device == torch.device("cpu") and plan.dtype == torch.float32
    too_small_gpu = plan_device("auto", model_id="m", n_params=8_030_000_000,
                                free=memory(cuda=12, cpu=120))
    assert too_small_gpu.device.type == "cpu"
    big = plan_device("auto", model_id="01-ai/Yi-34B", n_params=34_400_000_000,
                      free=memory(cuda=40, cpu=120))
    assert big.device.type == "cpu" and big.dtype == torch.bfloat16  # ≥ 30B on cpu: bf16
    assert plan_device("auto", model_id="m", n_params=10**9, free=memory(mps=30, cpu=8)
                       ).device.type == "mps"


def test_fits_nowhere():
    with pytest.raises(DeviceError) as info:
        plan_device("auto", model_id="meta-llama/Meta-Llama-3-70B", n_params=70_600_000_000,
                    free=memory(cuda=80, cpu=100))
    message = str(info.value)
    assert "fits on no device" in message and "--device-map" in message
    assert "cuda needs" in message and "cpu needs" in message and "\n" not in message


def test_explicit_and_unknown():
    plan = plan_device("cpu", model_id="m", n_params=70_600_000_000, free=memory(cuda=1, cpu=1))
    assert plan.device.type == "cpu"  # an explicit device is honoured without the fit check
    with pytest.raises(LensError, match="no CUDA device"):
        plan_device("cuda", model_id="m", n_params=10, free=memory(cpu=1))
    assert plan_device("auto", model_id="m", n_params=None, free=memory(cuda=1, cpu=1)
                       ).device.type == "cuda"
    assert plan_device("auto", model_id="m", n_params=10**9, free=memory(cpu=math.inf)
                       ).device.type == "cpu"


def test_multi_device():
    plan = plan_device("auto", model_id="google/gemma-2-27b", n_params=27 * 10**9,
                       multi_device=True, n_devices=2, free=memory(cuda=1, cpu=1))
    assert plan.device.type == "cuda" and plan.dtype == torch.bfloat16
    with pytest.raises(LensError, match="--n-devices 2"):
        plan_device("auto", model_id="m", n_params=None, multi_device=True, n_devices=2,
                    free=memory(cpu=1))


def test_dtype_override():
    assert pick_dtype("float64", torch.device("cuda"), "m", None) == torch.float64


@pytest.mark.parametrize("kwargs, expected", [
    ({"device_map": "auto", "device": "cpu"}, "mutually exclusive"),
    ({"n_devices": 2, "device": "cuda"}, "mutually exclusive"),
    ({"n_devices": 0}, "at least 1"),
    ({"device_map": "auto", "n_devices": 2}, "only one"),
    ({"device_map": "{not json"}, "not valid JSON"),
    ({"device_map": "[1, 2]"}, None),
])
def test_placement_options_are_validated(kwargs, expected):
    if expected is None:
        assert RunConfig(**kwargs).device_map_value() == "[1, 2]"  # a strategy name, not JSON
        return
    with pytest.raises(LensError, match=expected):
        RunConfig(**kwargs)


def test_device_map_json():
    config = RunConfig(device_map='{"": "cpu"}')
    assert config.multi_device and config.device_map_value() == {"": "cpu"}


def test_device_map_cpu_runs_like_a_plain_cpu_run(run_lens):
    status, mapped, err = run_lens("tests/models/tiny-llama", "--device-map", "cpu")
    assert status == 0, err
    plain = run_lens("tests/models/tiny-llama", "--device", "cpu")[1]
    assert reproducible(mapped) == reproducible(plain) and mapped.keys() == plain.keys()


@pytest.mark.parametrize("preset", [None, ":16:8"])
def test_cuda_environment_is_set_at_import_unless_the_user_set_it(preset):
    """The CUDA settings are in place before CUDA can initialise; a user's own value wins."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items()
           if k not in ("CUBLAS_WORKSPACE_CONFIG", "PYTORCH_CUDA_ALLOC_CONF")}
    if preset is not None:
        env["CUBLAS_WORKSPACE_CONFIG"] = preset
    code = ("import os, lens.model, torch; "
            "assert not torch.cuda.is_initialized(); "
            "print(os.environ['CUBLAS_WORKSPACE_CONFIG'], os.environ['PYTORCH_CUDA_ALLOC_CONF'])")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == [preset or ":4096:8", "expandable_segments:True"]
