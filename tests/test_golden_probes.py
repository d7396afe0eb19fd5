"""Goldens for a multi-fact probe (tests/probes/tiny-multi.yaml) on both tiny models (float64).

Pins the ``fact_id`` column of the records CSVs, the per-model JSON with its
``probe``/``facts`` keys and the aggregate JSON, all through batched forwards
(default ``--batch-size 8``). Regenerate on purpose with
``pytest --snapshot-update`` and say why in the commit.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lens.testing import TINY_MODELS

PROBE = Path(__file__).resolve().parent / "probes" / "tiny-multi.yaml"


@pytest.mark.parametrize("name", TINY_MODELS)
def test_multi_fact_run_matches_golden(name, run_lens, golden_json, golden_csv):
    status, files, err = run_lens(f"tests/models/{name}", "--dtype", "float64", "--device", "cpu",
                                  "--probe", str(PROBE), "--no-plots")
    assert status == 0, err
    assert files[f"output-{name}.json"] == golden_json(name="json")
    assert files[f"output-{name}-aggregate.json"] == golden_json(name="aggregate")
    assert files[f"output-{name}-records.csv"] == golden_csv(name="records")
    assert files[f"output-{name}-pure-next-token.csv"] == golden_csv(name="pure-next-token")
