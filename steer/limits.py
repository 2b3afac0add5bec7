"""Numeric bounds on what a request may ask for, so that everything accepted stays computable.

A value a user sends (a strength, a temperature, a penalty) is checked here once, with the field
named, before it reaches a tensor. The bounds are wide enough for any setting that steers or
samples meaningfully and narrow enough that float32 (and float16/bfloat16 plans) cannot overflow
on the way: a strength of 1e308 is not a steering setting, it is a NaN generator.
"""

from __future__ import annotations

import math
from typing import Any

from steer.errors import InvalidArgumentError, ResourceExhaustedError

#: largest |strength|, |weight|, |value| or |factor| of an intervention; well inside float16
MAX_INTERVENTION_MAGNITUDE = 1e4
#: smallest non-zero temperature: below it z / T overflows float32 for ordinary logits
MIN_TEMPERATURE = 1e-4
#: largest temperature (the distribution is uniform long before this)
MAX_TEMPERATURE = 1e4
#: largest |logit bias| (OpenAI allows 100); -inf is accepted as "never"
MAX_LOGIT_BIAS = 1e3
#: largest penalty any one penalising sampler subtracts from a logit (DRY's grows geometrically)
MAX_PENALTY = 1e6
#: a text longer than this many characters per allowed token is refused before tokenising
#: (tokenisers average 3-5 characters a token; the longest merged runs are about 16)
MAX_CHARS_PER_TOKEN = 32
#: most banned strings / DRY sequence breakers in one request, and the longest of each
MAX_BANNED_STRINGS = 64
MAX_BANNED_STRING_LENGTH = 128
MAX_SEQUENCE_BREAKERS = 64
MAX_SEQUENCE_BREAKER_LENGTH = 32
#: most logit-bias entries in one request
MAX_LOGIT_BIAS_ENTRIES = 4096
#: most alternatives per generated token a request may ask for (OpenAI's limit too)
MAX_TOP_LOGPROBS = 20


def finite(
    value: Any, field: str, *, magnitude: float | None = None, numbers_only: bool = False
) -> float:
    """``value`` as a float, refused unless it is a finite number (and ``|value| <= magnitude``).

    The one finiteness check of steer. ``numbers_only`` refuses what ``float()`` would convert
    but a typed file does not call a number (a string such as ``"1.5"``): what a recipe reads.
    """
    if isinstance(value, bool) or (numbers_only and not isinstance(value, int | float)):
        raise InvalidArgumentError(f"expected a number, got {_shown(value)}", field=field)
    try:
        number = float(value)
    except OverflowError:
        raise InvalidArgumentError("is too large for a number", field=field) from None
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"expected a number, got {_shown(value)}", field=field) from None
    if not math.isfinite(number):
        raise InvalidArgumentError(f"must be finite, got {value!r}", field=field)
    if magnitude is not None and abs(number) > magnitude:
        raise InvalidArgumentError(
            f"must be within [-{magnitude:g}, {magnitude:g}], got {_shown(value)}", field=field
        )
    return number


def _shown(value: Any) -> str:
    """``repr(value)``, cut short: a message must not echo a megabyte a client sent."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


def check_text_size(characters: int, max_tokens: int, field: str) -> None:
    """Refuse a text by its length before tokenising it: tokenising 32 MiB takes a minute and
    gigabytes, only to be refused for its token count afterwards."""
    limit = max_tokens * MAX_CHARS_PER_TOKEN
    if characters > limit:
        raise ResourceExhaustedError(
            f"{characters} characters; this server accepts at most {limit} ({max_tokens} tokens)",
            field=field,
        )
