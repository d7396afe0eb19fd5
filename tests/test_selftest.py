"""``--self-test``: a verdict per check, nothing written, non-zero exit on a mis-normalised model."""

from __future__ import annotations

import dataclasses

import pytest

import lens.model
from lens.config import RunConfig
from lens.norms import NormSpec
from lens.run import main
from lens.selftest import self_test
from lens.testing import MODELS, TINY_MODELS

CHECKS = ["last-layer lens reproduces the head", "norm maths matches the model's norm modules",
          "learned norm scale is consistent", "layer 0 is block 0's input"]


@pytest.mark.parametrize("name", TINY_MODELS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_self_test_passes_and_writes_nothing(name, dtype, in_tmp_cwd, capsys):
    assert main([str(MODELS / name), "--self-test", "--dtype", dtype]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(": ")[1] for line in lines] == CHECKS
    assert all(line.startswith(f"PASS {MODELS / name}: ") for line in lines)
    assert list(in_tmp_cwd.iterdir()) == []


def _wrong_kind(spec: NormSpec) -> NormSpec:
    return dataclasses.replace(spec, kind="RMSNorm" if spec.kind == "LayerNorm" else "LayerNorm")


def _scaled(spec: NormSpec) -> NormSpec:
    return dataclasses.replace(spec, weight=spec.weight * 1.5)


def _eps(spec: NormSpec) -> NormSpec:
    return dataclasses.replace(spec, eps=0.5)


@pytest.mark.parametrize("name", TINY_MODELS)
@pytest.mark.parametrize("break_norm", [_wrong_kind, _scaled, _eps])
def test_mis_normalised_model_fails(name, break_norm, tiny_models):
    model = tiny_models[name]
    broken = dataclasses.replace(model, norms=tuple(break_norm(s) for s in model.norms))
    verdicts = {c.name: c.ok for c in self_test(broken, RunConfig())}
    assert list(verdicts) == CHECKS
    assert not verdicts["norm maths matches the model's norm modules"]
    assert not verdicts["learned norm scale is consistent"]
    assert verdicts["layer 0 is block 0's input"]


@pytest.mark.parametrize("name", TINY_MODELS)
def test_wrong_layer0_fails(name, tiny_models):
    """Layer 0 read at the wrong place (block 1's input) is caught, and nothing else is."""
    model = tiny_models[name]
    blocks = model.wiring.blocks
    wiring = dataclasses.replace(model.wiring, blocks=(blocks[1], *blocks[1:]))
    broken = dataclasses.replace(model, wiring=wiring)
    verdicts = {c.name: c.ok for c in self_test(broken, RunConfig())}
    assert verdicts == {**dict.fromkeys(CHECKS, True), "layer 0 is block 0's input": False}


def test_cli_exits_non_zero_on_a_mis_normalised_model(monkeypatch, in_tmp_cwd, capsys):
    real_load = lens.model.load_model

    def mis_normalised(model_id, **kwargs):
        model = real_load(model_id, **kwargs)
        return dataclasses.replace(model, norms=tuple(_scaled(s) for s in model.norms))

    monkeypatch.setattr(lens.model, "load_model", mis_normalised)
    status = main([str(MODELS / "tiny-llama"), "--self-test", "--quiet"])
    out = capsys.readouterr().out
    assert status == 1
    assert "PASS" not in out  # --quiet shows only the failures
    assert out.count("FAIL") == 3 and "learned norm scale is consistent" in out
    assert list(in_tmp_cwd.iterdir()) == []


def test_self_test_reports_a_model_it_cannot_load(in_tmp_cwd, capsys):
    status = main(["./missing", str(MODELS / "tiny-gpt2"), "--self-test"])
    out = capsys.readouterr().out
    assert status == 1
    assert "FAIL ./missing: could not run the checks: model directory ./missing does not exist" in out
    assert out.count("PASS") == 4
