"""A run's forwards: a prompt that recurs in the plan goes through the model once."""

from __future__ import annotations

import pytest
import torch

from lens.forwards import Forwards
from lens.model import capture, tokenize

PROMPTS = ("The capital of Germany is called simply", "The capital of France is called simply",
           "In Germany the capital city is known as")


@pytest.mark.parametrize("padded", [False, True])
def test_each_distinct_prompt_is_forwarded_once_and_kept_until_its_last_use(tiny_models, padded):
    model = tiny_models["tiny-llama"]
    a, b, c = (tokenize(model, p) for p in PROMPTS)
    # batches of two; b recurs in the next batch, a in the last one, c within one batch
    plan = [a, b, b, c, c, a]
    forwards = Forwards(model, plan, padded=padded)
    first = forwards.take(plan[0:2])
    assert forwards.forwarded == 2 and set(forwards._kept) == {tuple(a), tuple(b)}
    second = forwards.take(plan[2:4])
    assert second[0] is first[1]  # b: the capture made for the first batch
    assert forwards.forwarded == 3 and set(forwards._kept) == {tuple(a), tuple(c)}
    third = forwards.take(plan[4:6])
    assert third[0] is second[1] and third[1] is first[0]
    assert forwards.forwarded == 3 and not forwards._kept  # nothing left to reuse
    for ids, cap in zip(plan, [*first, *second, *third], strict=True):
        alone = capture(model, ids)
        assert cap.resids.shape == alone.resids.shape
        torch.testing.assert_close(cap.resids, alone.resids, rtol=1e-9, atol=1e-9)
        # padded: the model's head at the last position only, the one a pass reads
        want = alone.head_logits[-1:] if padded else alone.head_logits
        torch.testing.assert_close(cap.head_logits, want, rtol=1e-9, atol=1e-9)


def test_the_one_fact_path_forwards_each_prompt_alone(tiny_models):
    """Unpadded: each new prompt gets ``capture`` itself, bit for bit the reference."""
    model = tiny_models["tiny-llama"]
    a, b = (tokenize(model, p) for p in PROMPTS[:2])
    caps = Forwards(model, [a, b, a], padded=False).take([a, b, a])
    assert caps[0] is caps[2]
    for ids, cap in zip([a, b], caps, strict=False):
        alone = capture(model, ids)
        assert torch.equal(cap.resids, alone.resids)
        assert torch.equal(cap.head_logits, alone.head_logits)
