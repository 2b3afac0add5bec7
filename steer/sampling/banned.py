"""Banned strings: the tokens that would complete a banned phrase, masked before sampling."""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from functools import lru_cache
from typing import Any


@lru_cache(maxsize=4)
def token_texts(tokenizer: Any) -> tuple[str, ...]:
    """The text of every token id on its own (cached per tokenizer)."""
    vocab = len(tokenizer)
    return tuple(tokenizer.batch_decode([[i] for i in range(vocab)]))


class _PrefixIndex:
    """Token ids by their text, sorted, so "every token whose text starts with ``rest``" is two
    binary searches instead of a scan of the vocabulary (a banned phrase of n characters asks
    n - 1 such questions)."""

    def __init__(self, texts: Sequence[str]) -> None:
        pairs = sorted((text, token) for token, text in enumerate(texts))
        self._texts = [text for text, _ in pairs]
        self._tokens = [token for _, token in pairs]

    def starting_with(self, rest: str) -> list[int]:
        low = bisect.bisect_left(self._texts, rest)
        high = low
        while high < len(self._texts) and self._texts[high].startswith(rest):
            high += 1
        return self._tokens[low:high]


@lru_cache(maxsize=4)
def _prefix_index(tokenizer: Any) -> _PrefixIndex:
    return _PrefixIndex(token_texts(tokenizer))


class BannedStrings:
    """Which tokens would complete a banned phrase after a given text (the masking strategy).

    A token completes ``phrase`` after ``text`` when its text contains the phrase, or when
    ``text`` ends with ``phrase[:k]`` and the token's text starts with ``phrase[k:]``. Those
    tokens are masked before sampling, so the phrase can never be finished; the engine also
    re-checks the decoded text of the chosen token (tokenizers whose per-token text differs from
    the joined text) and masks again if needed. Matching is case-sensitive and exact.
    """

    def __init__(self, phrases: Sequence[str], tokenizer: Any) -> None:
        self.phrases = tuple(phrases)
        texts = token_texts(tokenizer)
        index = _prefix_index(tokenizer)
        self.longest = max((len(p) for p in self.phrases), default=0)
        self._containing = {
            phrase: [i for i, t in enumerate(texts) if phrase in t] for phrase in self.phrases
        }
        self._starting: dict[str, list[int]] = {}
        for phrase in self.phrases:
            for k in range(1, len(phrase)):
                rest = phrase[k:]
                if rest not in self._starting:
                    self._starting[rest] = index.starting_with(rest)

    def tokens_to_ban(self, text: str) -> set[int]:
        banned: set[int] = set()
        for phrase in self.phrases:
            banned.update(self._containing[phrase])
            for k in range(1, len(phrase)):
                if text.endswith(phrase[:k]):
                    banned.update(self._starting[phrase[k:]])
        return banned

    def completed(self, text: str) -> bool:
        return any(phrase in text for phrase in self.phrases)


@lru_cache(maxsize=16)
def banned_strings(phrases: tuple[str, ...], tokenizer: Any) -> BannedStrings:
    return BannedStrings(phrases, tokenizer)
