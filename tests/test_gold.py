"""Tests for lens.gold: aligning the gold answer after the prompt (docs/outputs.md, Gold answer)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from lens.gold import GoldAnswer, align, encode
from lens.tokens import TokenTable

TINY_GPT2 = Path(__file__).parent / "models" / "tiny-gpt2"
POS = "Give the city name only, plain text. The capital of Germany is called simply"
CTL = "Give the city name only, plain text. The capital of France is called simply"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TINY_GPT2))


@pytest.fixture(scope="module")
def table(tokenizer):
    return TokenTable(tokenizer)


# --------------------------------------------------------------------------- real tokenizer


def test_berlin_aligns_with_a_space(tokenizer, table):
    gold = align(tokenizer, table, POS, "Berlin")
    berlin = tokenizer.convert_tokens_to_ids("ĠBerlin")
    assert berlin != tokenizer.unk_token_id
    assert gold.variant == "with_space"
    assert gold.first_id == berlin
    assert gold.answer_ids == (berlin,)
    assert gold.pieces == (" Berlin",)
    assert gold.string == "Berlin"
    assert gold.status == "ok"
    # the ids really are what follows the prompt
    assert encode(tokenizer, POS + " Berlin") == encode(tokenizer, POS) + [berlin]


def test_control_answer_and_multi_token_answer(tokenizer, table):
    paris = tokenizer.convert_tokens_to_ids("ĠParis")
    gold = align(tokenizer, table, CTL, "Paris")
    assert (gold.variant, gold.first_id, gold.pieces) == ("with_space", paris, (" Paris",))
    two = align(tokenizer, table, POS, "Berlin Paris")
    assert two.answer_ids == (tokenizer.convert_tokens_to_ids("ĠBerlin"), paris)
    assert two.first_id == two.answer_ids[0]
    assert two.pieces == (" Berlin", " Paris")


@pytest.mark.parametrize("answer", ["Zorblax", "", "   "])
def test_answer_spelled_with_unk_or_empty_is_unresolved(tokenizer, table, answer):
    # The word-level tiny vocabulary maps unknown words to <unk>: p(<unk>) says
    # nothing about the answer, so alignment is unresolved rather than "ok".
    assert tokenizer.unk_token_id is not None
    gold = align(tokenizer, table, POS, answer)
    assert gold.status == "unresolved"
    assert (gold.first_id, gold.variant, gold.answer_ids) == (None, None, ())


def test_pieces_are_capped_at_four(tokenizer, table):
    answer = "Berlin Paris Berlin Paris Berlin Paris"
    gold = align(tokenizer, table, POS, answer)
    assert len(gold.answer_ids) == 6
    assert gold.pieces == (" Berlin", " Paris", " Berlin", " Paris")


def test_as_json_keys_and_values(tokenizer, table):
    gold = align(tokenizer, table, POS, "Berlin")
    data = gold.as_json()
    assert list(data) == ["string", "pieces", "first_id", "answer_ids", "variant"]
    assert data == {"string": "Berlin", "pieces": [" Berlin"], "first_id": gold.first_id,
                    "answer_ids": [gold.first_id], "variant": "with_space"}
    assert json.loads(json.dumps(data)) == data
    empty = GoldAnswer(string="x").as_json()
    assert list(empty) == ["string", "pieces", "first_id", "answer_ids", "variant"]
    assert empty == {"string": "x", "pieces": [], "first_id": None, "answer_ids": [],
                     "variant": None}


# --------------------------------------------------------------------------- fake tokenizers


class FakeTokenizer:
    """A lookup-table tokenizer: ``encode(text)`` is whatever the table says."""

    def __init__(self, table: dict[str, list[int]]) -> None:
        self.table = table
        self.calls: list[tuple[str, bool]] = []

    def __call__(self, text: str, add_special_tokens: bool = True):
        self.calls.append((text, add_special_tokens))
        return {"input_ids": list(self.table[text])}

    def batch_decode(self, batch, **_):
        return [f"<{ids[0]}>" for ids in batch]


def _align(mapping: dict[str, list[int]], prompt: str, answer: str) -> GoldAnswer:
    tok = FakeTokenizer(mapping)
    gold = align(tok, TokenTable(tok), prompt, answer)
    assert tok.calls and all(special is False for _, special in tok.calls)
    return gold


def test_longer_encoding_that_merges_across_the_boundary_is_unresolved():
    # "ab c" is longer than "ab" but starts with a merged token, and so does "abc":
    # the old "is longer" rule would have accepted both.
    gold = _align({"ab": [1, 2], "ab c": [1, 9, 3], "abc": [1, 10, 11]}, "ab", "c")
    assert gold.status == "unresolved"
    assert gold.first_id is None
    assert gold.variant is None
    assert gold.answer_ids == ()
    assert gold.pieces == ()
    assert gold.string == "c"


def test_falls_back_to_no_space():
    gold = _align({"ab": [1, 2], "ab c": [1, 9, 3], "abc": [1, 2, 3, 4]}, "ab", "c")
    assert gold.status == "ok"
    assert gold.variant == "no_space"
    assert gold.answer_ids == (3, 4)
    assert gold.first_id == 3
    assert gold.pieces == ("<3>", "<4>")


def test_prefers_with_space_when_both_work():
    gold = _align({"ab": [1, 2], "ab c": [1, 2, 5], "abc": [1, 2, 3]}, "ab", "c")
    assert (gold.variant, gold.first_id) == ("with_space", 5)


def test_equal_length_is_not_an_extension():
    # with_space adds nothing after the context: not a strict prefix, use no_space.
    gold = _align({"ab": [1, 2], "ab c": [1, 2], "abc": [1, 2, 7]}, "ab", "c")
    assert (gold.variant, gold.answer_ids) == ("no_space", (7,))
    none = _align({"ab": [1, 2], "ab c": [1, 2], "abc": [1, 2]}, "ab", "c")
    assert none.status == "unresolved"


ids = st.lists(st.integers(0, 6), max_size=6)


@settings(max_examples=200, deadline=None)
@given(ctx=ids, ws=ids, ns=ids)
@example(ctx=[1, 2], ws=[1, 2, 3], ns=[])
@example(ctx=[1, 2], ws=[1, 3, 3], ns=[1, 2, 4])
@example(ctx=[], ws=[], ns=[5])
@example(ctx=[1, 2], ws=[1], ns=[1, 2])
def test_align_follows_the_strict_prefix_rule(ctx, ws, ns):
    gold = _align({"p": ctx, "p a": ws, "pa": ns}, "p", "a")

    def extends(full):
        return len(full) > len(ctx) and full[: len(ctx)] == ctx

    if extends(ws):
        expected, variant = ws[len(ctx):], "with_space"
    elif extends(ns):
        expected, variant = ns[len(ctx):], "no_space"
    else:
        expected, variant = None, None
    if expected is None:
        assert (gold.status, gold.first_id, gold.variant, gold.answer_ids) == (
            "unresolved", None, None, ())
    else:
        assert gold.status == "ok"
        assert gold.variant == variant
        assert list(gold.answer_ids) == expected
        assert gold.first_id == expected[0]
        assert gold.pieces == tuple(f"<{i}>" for i in expected[:4])


def test_token_table_decodes_each_id_once_whatever_its_int_type():
    import numpy as np
    import torch

    class Tok:
        calls: list[list[list[int]]] = []

        def batch_decode(self, batch, **_):  # type: ignore[no-untyped-def]
            self.calls.append(batch)
            return [f"<{ids[0]}>" for ids in batch]

    tok = Tok()
    table = TokenTable(tok)
    assert table.texts([3, 1, 3]) == ["<3>", "<1>", "<3>"]
    assert table.text(np.int64(1)) == table.text(torch.tensor(1)) == table.text(1) == "<1>"
    assert table.text(7) == "<7>" and table.texts([7, 3]) == ["<7>", "<3>"]
    assert tok.calls == [[[1], [3]], [[7]]]
