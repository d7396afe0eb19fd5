"""Gold-answer alignment (docs/outputs.md): which token ids spell the answer after the prompt."""

from __future__ import annotations

from dataclasses import dataclass

from lens.tokens import TokenTable


@dataclass(frozen=True, kw_only=True)
class GoldAnswer:
    """The answer as token ids following the prompt.

    ``variant`` is ``with_space`` or ``no_space``; ``None`` when unresolved.
    """

    string: str
    pieces: tuple[str, ...] = ()
    first_id: int | None = None
    answer_ids: tuple[int, ...] = ()
    variant: str | None = None

    @property
    def status(self) -> str:
        return "ok" if self.first_id is not None else "unresolved"

    def as_json(self) -> dict[str, object]:
        return {
            "string": self.string,
            "pieces": list(self.pieces),
            "first_id": self.first_id,
            "answer_ids": list(self.answer_ids),
            "variant": self.variant,
        }


def encode(tokenizer: object, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])  # type: ignore[operator]


def align(tokenizer: object, table: TokenTable, prompt: str, answer: str) -> GoldAnswer:
    """Align ``answer`` after ``prompt``: ``ctx`` must be a strict prefix of the joint encoding.

    An answer the tokenizer can only spell with its unknown token is unresolved:
    the probability of ``<unk>`` says nothing about the answer.
    """
    if not answer.strip():
        return GoldAnswer(string=answer)
    unk = getattr(tokenizer, "unk_token_id", None)
    ctx = encode(tokenizer, prompt)
    for variant, joined in (("with_space", f"{prompt} {answer}"), ("no_space", prompt + answer)):
        ids = encode(tokenizer, joined)
        if len(ids) > len(ctx) and ids[: len(ctx)] == ctx:
            answer_ids = tuple(ids[len(ctx):])
            if unk is not None and unk in answer_ids:
                break
            return GoldAnswer(
                string=answer,
                pieces=tuple(table.texts(answer_ids[:4])),
                first_id=answer_ids[0],
                answer_ids=answer_ids,
                variant=variant,
            )
    return GoldAnswer(string=answer)
