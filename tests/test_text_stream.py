"""Incremental detokenisation: the streamed text equals decoding every id at once.

The reference is the plain rule the stream must keep: after each token, the text so far is
``decode(ids)`` cut at the first stop string, and nothing that could still become a stop string
or an unfinished character has been sent. Checked on a byte-level BPE (tiny) and on the real
SmolLM2 tokenizer, with accents, CJK, emoji (multi-token characters) and stop strings.
"""

from __future__ import annotations

import random

import pytest
from tiny import tiny_tokenizer

from steer.text import TextStream

TEXTS = [
    "Hello there, traveller. The tavern is warm tonight.",
    "Café crème, naïve façade — «quoted» … done.",
    "日本語のテキストと中文字符，混合 text.",
    "Emoji: 🐉🔥 and 👩‍👩‍👧 family, then plain words again 🙂",
    '*She leans closer.* "You shouldn\'t be here," she whispers.\n\nUser:',
    "  leading spaces,\ttabs,\n\nnewlines and trailing spaces  ",
]
STOPS = [(), ("User:",), ("\n\n",), ("🔥",), ("whispers", "never-there")]


def _reference(tokenizer, ids: list[int], stop: tuple[str, ...]) -> tuple[str, int | None]:  # type: ignore[no-untyped-def]
    """(final text, index of the token that completed a stop string or None)."""
    for i in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:i], skip_special_tokens=True)
        hits = [text.find(s) for s in stop if s in text]
        if hits:
            return text[: min(hits)], i - 1
    return tokenizer.decode(ids, skip_special_tokens=True), None


def _stream(tokenizer, ids: list[int], stop: tuple[str, ...]) -> tuple[str, int | None]:  # type: ignore[no-untyped-def]
    stream = TextStream(tokenizer, stop)
    text = ""
    for i, token in enumerate(ids):
        delta, stopped = stream.push(token)
        text += delta
        # never sends a broken character
        assert "\ufffd" not in delta or "\ufffd" in tokenizer.decode(ids, skip_special_tokens=True)
        if stopped:
            return text, i
    return text + stream.flush(), None


@pytest.fixture(scope="module")
def tiny_tok():  # type: ignore[no-untyped-def]
    return tiny_tokenizer()


@pytest.mark.parametrize("stop", STOPS)
@pytest.mark.parametrize("text", TEXTS)
def test_stream_equals_full_decode_tiny(tiny_tok, text: str, stop: tuple[str, ...]) -> None:  # type: ignore[no-untyped-def]
    ids = tiny_tok(text, add_special_tokens=False)["input_ids"]
    assert _stream(tiny_tok, ids, stop) == _reference(tiny_tok, ids, stop)


@pytest.mark.slow
@pytest.mark.parametrize("stop", STOPS)
def test_stream_equals_full_decode_smollm2(smollm2, stop: tuple[str, ...]) -> None:  # type: ignore[no-untyped-def]
    tokenizer = smollm2.tokenizer
    for text in TEXTS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert _stream(tokenizer, ids, stop) == _reference(tokenizer, ids, stop), text


def test_special_tokens_and_random_valid_sequences(tiny_tok) -> None:  # type: ignore[no-untyped-def]
    """Special tokens in the middle are skipped; random splices of real token sequences agree."""
    rng = random.Random(0)
    pieces = [tiny_tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    special = tiny_tok.convert_tokens_to_ids("<|im_start|>")
    for _ in range(50):
        ids: list[int] = []
        for _ in range(rng.randint(1, 4)):
            ids += rng.choice(pieces)
            if rng.random() < 0.3:
                ids.append(special)
        stop = rng.choice(STOPS)
        assert _stream(tiny_tok, ids, stop) == _reference(tiny_tok, ids, stop)
