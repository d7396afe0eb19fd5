"""Goldens: the exact bytes of a full three-pass run on each tiny model (float64).

Regenerate on purpose with ``pytest --snapshot-update`` and say why in the commit.
"""

from __future__ import annotations

import pytest

from lens.testing import TINY_MODELS


@pytest.mark.parametrize("name", TINY_MODELS)
def test_full_run_matches_golden(name, run_lens, golden_json, golden_csv):
    status, files, err = run_lens(f"tests/models/{name}", "--dtype", "float64", "--device", "cpu")
    assert status == 0, err
    assert files[f"output-{name}.json"] == golden_json(name="json")
    assert files[f"output-{name}-records.csv"] == golden_csv(name="records")
    assert files[f"output-{name}-pure-next-token.csv"] == golden_csv(name="pure-next-token")
