"""The sampling settings of one request: a frozen, validated value object."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from steer.errors import InvalidArgumentError
from steer.limits import (
    MAX_BANNED_STRING_LENGTH,
    MAX_BANNED_STRINGS,
    MAX_LOGIT_BIAS,
    MAX_LOGIT_BIAS_ENTRIES,
    MAX_SEQUENCE_BREAKER_LENGTH,
    MAX_SEQUENCE_BREAKERS,
    MAX_TEMPERATURE,
    MIN_TEMPERATURE,
    finite,
)
from steer.sampling.processors import DEFAULT_ORDER, SAMPLERS

#: default DRY sequence breakers (SillyTavern's): newline, colon, quote, asterisk
DRY_SEQUENCE_BREAKERS = ("\n", ":", '"', "*")


def _number(value: Any, name: str) -> float:
    if not isinstance(value, (int, float)):
        raise InvalidArgumentError(f"must be a finite number, got {value!r}", field=name)
    return finite(value, name)


def _integer(value: Any, name: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidArgumentError(f"must be an integer >= {minimum}, got {value!r}", field=name)
    return value


def _in_range(value: float, low: float, high: float, name: str, note: str = "") -> None:
    if not low <= value <= high:
        raise InvalidArgumentError(f"must be in [{low}, {high}]{note}, got {value}", field=name)


@dataclass(frozen=True)
class SamplingConfig:
    """Every sampler setting of one request. Defaults are the neutral (off) values."""

    temperature: float = 1.0
    #: apply temperature after the truncation samplers instead of before them
    temperature_last: bool = False
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    typical_p: float = 1.0
    tfs: float = 1.0
    top_a: float = 0.0
    #: 0 = off, 1 or 2 = Mirostat v1 / v2 (replaces the truncation samplers)
    mirostat_mode: int = 0
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    repetition_penalty: float = 1.0
    #: how many of the latest tokens the penalties look at (0 = the whole context)
    repetition_penalty_range: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_sequence_breakers: tuple[str, ...] = DRY_SEQUENCE_BREAKERS
    #: how many of the latest tokens DRY looks at (0 = the whole context)
    dry_range: int = 0
    xtc_threshold: float = 0.1
    xtc_probability: float = 0.0
    #: (token id, bias) pairs; a mapping is accepted and stored sorted
    logit_bias: tuple[tuple[int, float], ...] = ()
    #: phrases that never appear in the output (the engine masks tokens that would complete one)
    banned_strings: tuple[str, ...] = ()
    #: never end on an end-of-sequence token (generation stops on length or stop strings)
    ban_eos: bool = False
    #: end-of-sequence tokens are masked until this many tokens were generated
    min_tokens: int = 0
    #: order of the processors; None = DEFAULT_ORDER
    sampler_order: tuple[str, ...] | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        self._coerce()
        numbers = {
            "temperature": (0.0, MAX_TEMPERATURE, " (0 = greedy)"),
            "top_p": (0.0, 1.0, ""),
            "min_p": (0.0, 1.0, ""),
            "typical_p": (0.0, 1.0, ""),
            "tfs": (0.0, 1.0, ""),
            "top_a": (0.0, 1.0, ""),
            "mirostat_tau": (0.0, 100.0, " bits"),
            "mirostat_eta": (0.0, 1.0, ""),
            "repetition_penalty": (0.01, 100.0, ""),
            "presence_penalty": (-2.0, 2.0, ""),
            "frequency_penalty": (-2.0, 2.0, ""),
            "dry_multiplier": (0.0, 100.0, ""),
            "dry_base": (1.0, 100.0, ""),
            "xtc_threshold": (0.0, 1.0, ""),
            "xtc_probability": (0.0, 1.0, ""),
        }
        for name, (low, high, note) in numbers.items():
            _in_range(_number(getattr(self, name), name), low, high, name, note)
        for name in ("top_p", "typical_p", "tfs"):
            if getattr(self, name) == 0:
                raise InvalidArgumentError("must be > 0", field=name)
        if 0 < self.temperature < MIN_TEMPERATURE:
            raise InvalidArgumentError(
                f"must be 0 (greedy) or at least {MIN_TEMPERATURE:g}, got {self.temperature!r}",
                field="temperature",
            )
        for name in ("top_k", "repetition_penalty_range", "dry_range", "min_tokens"):
            _integer(getattr(self, name), name)
        _integer(self.dry_allowed_length, "dry_allowed_length", 1)
        if self.mirostat_mode not in (0, 1, 2):
            raise InvalidArgumentError(
                f"must be 0 (off), 1 or 2, got {self.mirostat_mode!r}", field="mirostat_mode"
            )
        if not isinstance(self.temperature_last, bool) or not isinstance(self.ban_eos, bool):
            name = "temperature_last" if not isinstance(self.temperature_last, bool) else "ban_eos"
            raise InvalidArgumentError("must be true or false", field=name)
        for token, bias in self.logit_bias:
            _integer(token, "logit_bias")
            if bias != -math.inf:
                finite(bias, "logit_bias", magnitude=MAX_LOGIT_BIAS)
        self._check_lists()
        if self.sampler_order is not None:
            unknown = [n for n in self.sampler_order if n not in SAMPLERS]
            if unknown or len(set(self.sampler_order)) != len(self.sampler_order):
                raise InvalidArgumentError(
                    f"unknown or repeated names {unknown or list(self.sampler_order)}; "
                    f"choose from {list(SAMPLERS)}",
                    field="sampler_order",
                )
        if self.seed is not None:
            _integer(self.seed, "seed")
            if self.seed >= 2**63:
                raise InvalidArgumentError("must be in [0, 2**63)", field="seed")

    def _check_lists(self) -> None:
        """Lists are bounded: each banned string costs scans of the whole vocabulary."""
        bounds = {
            "dry_sequence_breakers": (MAX_SEQUENCE_BREAKERS, MAX_SEQUENCE_BREAKER_LENGTH),
            "banned_strings": (MAX_BANNED_STRINGS, MAX_BANNED_STRING_LENGTH),
        }
        for name, (most, longest) in bounds.items():
            values = getattr(self, name)
            if len(values) > most:
                raise InvalidArgumentError(f"{len(values)} given; at most {most}", field=name)
            if not all(isinstance(s, str) and 0 < len(s) <= longest for s in values):
                raise InvalidArgumentError(
                    f"must be non-empty strings of at most {longest} characters", field=name
                )
        if len(self.logit_bias) > MAX_LOGIT_BIAS_ENTRIES:
            raise InvalidArgumentError(
                f"{len(self.logit_bias)} entries; at most {MAX_LOGIT_BIAS_ENTRIES}",
                field="logit_bias",
            )

    def _coerce(self) -> None:
        """Accept lists and mappings from JSON/TOML; store hashable tuples."""
        bias: Any = self.logit_bias
        if isinstance(bias, Mapping):
            bias = bias.items()
        try:
            pairs = tuple(sorted((int(t), float(b)) for t, b in bias))
        except (TypeError, ValueError):
            raise InvalidArgumentError(
                "expected {token_id: bias} or (token_id, bias) pairs", field="logit_bias"
            ) from None
        object.__setattr__(self, "logit_bias", pairs)
        for name in ("dry_sequence_breakers", "banned_strings"):
            value = getattr(self, name)
            if isinstance(value, str) or not isinstance(value, Iterable):
                raise InvalidArgumentError("must be a list of strings", field=name)
            object.__setattr__(self, name, tuple(value))
        if self.sampler_order is not None:
            if isinstance(self.sampler_order, str):
                raise InvalidArgumentError("must be a list of sampler names", field="sampler_order")
            object.__setattr__(self, "sampler_order", tuple(self.sampler_order))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def greedy_config(cls) -> SamplingConfig:
        return cls(temperature=0.0)

    def changed_fields(self) -> tuple[str, ...]:
        """The fields set away from their defaults, in declaration order."""
        defaults = SamplingConfig()
        return tuple(
            item.name
            for item in fields(SamplingConfig)
            if getattr(self, item.name) != getattr(defaults, item.name)
        )

    def order(self) -> tuple[str, ...]:
        """The processors in the order they run (``temperature_last`` applied)."""
        order = self.sampler_order if self.sampler_order is not None else DEFAULT_ORDER
        if self.temperature_last:
            order = (*(n for n in order if n != "temperature"), "temperature")
        return order
