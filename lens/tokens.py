"""Token ids → display strings, decoded once per model and memoised."""

from __future__ import annotations

from collections.abc import Iterable


class TokenTable:
    """Decode token ids to the text they stand for (``" Berlin"``, not ``"ĠBerlin"``).

    Decoding is batched and memoised: top-k lists over every layer and
    position repeat the same few thousand ids, so each is decoded once.
    """

    def __init__(self, tokenizer: object) -> None:
        self._tokenizer = tokenizer
        self._text: dict[int, str] = {}

    def _fill(self, ids: Iterable[int]) -> None:
        # not ``set - self._text.keys()``: that walks every key of the table, each call
        missing = sorted({i for i in map(int, ids) if i not in self._text})
        if missing:
            texts = self._tokenizer.batch_decode(  # type: ignore[attr-defined]
                [[i] for i in missing], skip_special_tokens=False,
                clean_up_tokenization_spaces=False,
            )
            self._text.update(zip(missing, texts, strict=True))

    def text(self, token_id: int) -> str:
        token_id = int(token_id)
        if token_id not in self._text:
            self._fill((token_id,))
        return self._text[token_id]

    def texts(self, ids: Iterable[int]) -> list[str]:
        ids = list(ids)
        try:  # the common case: every id decoded before
            return [self._text[i] for i in ids]
        except KeyError:
            ids = [int(i) for i in ids]
            self._fill(ids)
            return [self._text[i] for i in ids]
