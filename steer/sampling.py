"""Sampling: a settings value object and one pipeline of registered logit processors.

Each processor maps one row's float32 logits ``z`` (vocab,) to new logits, with ``p = softmax(z)``.
The pipeline runs the active ones in ``config.order()`` and then draws a token with the row's own
``torch.Generator`` (seeded, so the same seed and request give the same tokens whatever else
shares the batch). ``temperature == 0`` means greedy: every processor except temperature runs, then
argmax. A processor whose setting is at its neutral value is not run at all, so it is an exact
no-op. Removed tokens get ``z = -inf``; every truncation keeps at least the most likely token.

Penalties (on raw logits, over the last ``repetition_penalty_range`` tokens of the history, the
prompt included; 0 = all of it):

* logit_bias ``b``: ``z_i <- z_i + b_i``
* repetition_penalty ``r`` (1 = off, CTRL): for each token seen, ``z_i <- z_i / r`` if ``z_i > 0``
  else ``z_i * r``
* presence_penalty ``a`` / frequency_penalty ``f`` (0 = off, OpenAI): with ``c_i`` the count of
  token ``i`` in the window, ``z_i <- z_i - a [c_i > 0] - f c_i``
* dry (multiplier ``m``, base ``b``, allowed_length ``A``, 0 = off): for each earlier place where
  the context's last ``n`` tokens occurred before (matched backwards, never across a sequence
  breaker token), the token that followed it gets ``z_i <- z_i - m b^(n - A)`` when ``n >= A``
  (the largest ``n`` per token counts), so extending a verbatim repeat costs more the longer it is

Truncation and shape:

* temperature ``T`` (1 = off): ``z <- z / T``; placed first, or last with ``temperature_last``
* top_k ``k`` (0 = off): keep the ``k`` largest logits
* top_a ``a`` (0 = off): keep ``p_i >= a * (max_j p_j)^2``
* top_p ``p`` (1 = off): keep the smallest set of most likely tokens whose mass is ``>= p``
* typical_p ``t`` (1 = off): with entropy ``H = -sum p log p``, sort tokens by
  ``|-log p_i - H|`` ascending and keep the smallest prefix whose mass is ``>= t``
* tfs ``z`` (1 = off, tail-free): sort ``p`` descending, ``d_i = |p_i - 2 p_{i+1} + p_{i+2}|``
  normalised to sum 1; keep token ``0`` and token ``i >= 1`` while ``sum_{j < i} d_j <= z``
* min_p ``m`` (0 = off): keep tokens with ``p_i >= m * max_j p_j``
* xtc (threshold ``t``, probability ``q``; q = 0 off): with probability ``q`` (drawn from the row's
  generator), if two or more tokens have ``p_i >= t``, remove all of them but the least likely

Mirostat (replaces the truncation samplers; penalties and temperature still run), per-row state
``mu`` starting at ``2 tau``:

* mode 2: drop tokens with surprise ``-log2 p_i > mu``, sample from the rest renormalised, then
  ``mu <- mu - eta (s - tau)`` with ``s`` the sampled token's surprise in the renormalised set
* mode 1: estimate the Zipf exponent ``s_hat`` from the top 100 tokens, keep the top
  ``k = ((e 2^mu) / (1 - N^-e))^(1/s_hat)`` (``e = s_hat - 1``, ``N`` = vocab), sample, update
  ``mu`` the same way

A new sampler is one class with ``name``, ``is_active(config)`` and ``__call__(logits, config,
row)`` registered in ``SAMPLERS``; it sees logits and the row's context, never the engine.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Protocol

import torch

from steer.errors import InvalidArgumentError
from steer.limits import (
    MAX_BANNED_STRING_LENGTH,
    MAX_BANNED_STRINGS,
    MAX_LOGIT_BIAS,
    MAX_LOGIT_BIAS_ENTRIES,
    MAX_PENALTY,
    MAX_SEQUENCE_BREAKER_LENGTH,
    MAX_SEQUENCE_BREAKERS,
    MAX_TEMPERATURE,
    MIN_TEMPERATURE,
    finite,
)

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

    def order(self) -> tuple[str, ...]:
        """The processors in the order they run (``temperature_last`` applied)."""
        order = self.sampler_order if self.sampler_order is not None else DEFAULT_ORDER
        if self.temperature_last:
            order = (*(n for n in order if n != "temperature"), "temperature")
        return order


@dataclass
class SamplerState:
    """What one row carries between steps: Mirostat's ``mu`` and tokenizer-derived settings."""

    #: Mirostat target surprise budget; None until the first Mirostat step
    mirostat_mu: float | None = None
    #: token ids that DRY never matches across
    dry_breakers: frozenset[int] = frozenset()

    @classmethod
    def for_request(
        cls, config: SamplingConfig, tokenizer: Any = None, vocab_size: int | None = None
    ) -> SamplerState:
        """Resolve a config against a model's tokenizer; raises on out-of-vocabulary biases."""
        if vocab_size is not None:
            bad = [t for t, _ in config.logit_bias if t >= vocab_size]
            if bad:
                raise InvalidArgumentError(
                    f"token ids outside [0, {vocab_size}): {bad[:5]}", field="logit_bias"
                )
        breakers: set[int] = set()
        if tokenizer is not None and config.dry_multiplier > 0:
            for text in config.dry_sequence_breakers:
                # a breaker is matched as the token(s) it encodes to, on its own or after a letter
                for variant in (text, "a" + text):
                    ids = tokenizer(variant, add_special_tokens=False)["input_ids"]
                    breakers.update(ids[-1:])
        return cls(dry_breakers=frozenset(breakers))


@dataclass
class RowContext:
    """One row as the processors see it."""

    history: Sequence[int] = ()
    generator: torch.Generator | None = None
    state: SamplerState = field(default_factory=SamplerState)

    def window(self, size: int) -> Sequence[int]:
        return self.history[-size:] if size > 0 else self.history

    def seen(self, size: int) -> torch.Tensor:
        """The distinct token ids of the last ``size`` tokens (0 = all), sorted."""
        return torch.tensor(sorted(set(self.window(size))), dtype=torch.long)


class LogitsProcessor(Protocol):
    name: str

    def is_active(self, config: SamplingConfig) -> bool: ...

    def __call__(
        self, logits: torch.Tensor, config: SamplingConfig, row: RowContext
    ) -> torch.Tensor: ...


def _keep_sorted(
    logits: torch.Tensor, order: torch.Tensor, keep_sorted: torch.Tensor
) -> torch.Tensor:
    """Mask tokens not kept; ``keep_sorted`` is over ``order`` (descending probability)."""
    keep_sorted = keep_sorted.clone()
    keep_sorted[0] = True
    keep = torch.zeros_like(keep_sorted).scatter(0, order, keep_sorted)
    return logits.masked_fill(~keep, -math.inf)


class LogitBias:
    name = "logit_bias"

    def is_active(self, config: SamplingConfig) -> bool:
        return bool(config.logit_bias)

    def __call__(
        self, logits: torch.Tensor, config: SamplingConfig, row: RowContext
    ) -> torch.Tensor:
        tokens = torch.tensor([t for t, _ in config.logit_bias])
        biases = torch.tensor([b for _, b in config.logit_bias], dtype=logits.dtype)
        return logits.index_add(0, tokens, biases)


class RepetitionPenalty:
    name = "repetition_penalty"

    def is_active(self, config: SamplingConfig) -> bool:
        return config.repetition_penalty != 1.0

    def __call__(
        self, logits: torch.Tensor, config: SamplingConfig, row: RowContext
    ) -> torch.Tensor:
        seen = row.seen(config.repetition_penalty_range)
        if seen.numel() == 0:
            return logits
        values = logits[seen]
        penalty = config.repetition_penalty
        logits = logits.clone()
        logits[seen] = torch.where(values > 0, values / penalty, values * penalty)
        return logits


class PresencePenalty:
    name = "presence_penalty"

    def is_active(self, config: SamplingConfig) -> bool:
        return config.presence_penalty != 0.0

    def __call__(
        self, logits: torch.Tensor, config: SamplingConfig, row: RowContext
    ) -> torch.Tensor:
        seen = row.seen(config.repetition_penalty_range)
        if seen.numel() == 0:
            return logits
        return logits.index_add(0, seen, torch.full((seen.numel(),), -config.presence_penalty))


class FrequencyPenalty:
    name = "frequency_penalty"

    def is_active(self, config: SamplingConfig) -> bool:
        return config.frequency_penalty != 0.0

    def __call__(
        self, logits: torch.Tensor, config: SamplingConfig, row: RowContext
    ) -> torch.Tensor:
        window = list(row.window(config.repetition_penalty_range))
        if not window:
            return logits
        counts = torch.bincount(torch.tensor(window), minlength=logits.numel())[: logits.numel()]
        return logits - config.frequency_penalty * counts.to(logits.dtype)


def dry_penalties(
    history: Sequence[int],
    multiplier: float,
    base: float,
    allowed_length: int,
    breakers: frozenset[int] = frozenset(),
) -> dict[int, float]:
    """DRY: token id -> penalty ``multiplier * base^(n - allowed_length)`` (see module docs)."""
    count = len(history)
    if count < 2 or history[-1] in breakers:
        return {}
    penalties: dict[int, float] = {}
    last = history[-1]
    for end in range(count - 1):
        if history[end] != last:
            continue
        following = history[end + 1]
        if following in breakers:
            continue
        length = 0
        while (
            length <= end
            and history[end - length] == history[count - 1 - length]
            and history[end - length] not in breakers
        ):
            length += 1
        if length >= allowed_length:
            penalty = _dry_penalty(multiplier, base, length - allowed_length)
            penalties[following] = max(penalties.get(following, 0.0), penalty)
    return penalties


def _dry_penalty(multiplier: float, base: float, excess: int) -> float:
    """``multiplier * base^excess``, capped at MAX_PENALTY (computed in log space: no overflow)."""
    if multiplier <= 0:
        return 0.0
    log_penalty = math.log(multiplier) + excess * math.log(base)
    return math.exp(min(log_penalty, math.log(MAX_PENALTY)))


class Dry:
    name = "dry"

    def is_active(self, config: SamplingConfig) -> bool:
        return config.dry_multiplier > 0.0

    def __call__(
        self, logits: torch.Tensor, config: SamplingConfig, row: RowContext
    ) -> torch.Tensor:
        penalties = dry_penalties(
            row.window(config.dry_range),
            config.dry_multiplier,
            config.dry_base,
            config.dry_allowed_length,
            row.state.dry_breakers,
        )
        if not penalties:
            return logits
        tokens = torch.tensor(list(penalties))
        values = torch.tensor(list(penalties.values()), dtype=logits.dtype)
        return logits.index_add(0, tokens, -values)


class Temperature:
    name = "temperature"

    def is_active(self, config: SamplingConfig) -> bool:
        # greedy decoding keeps every other processor but skips the division by zero
        return config.temperature not in (0.0, 1.0)

    def __call__(
        self, logits: torch.Tensor, config: SamplingConfig, row: RowContext
    ) -> torch.Tensor:
        return logits / config.temperature


class TopK:
    name = "top_k"

    def is_active(self, config: SamplingConfig) -> bool:
        return config.top_k > 0

    def __call__(
        self, logits: torch.Tensor, config: SamplingConfig, row: RowContext
    ) -> torch.Tensor:
        if config.top_k >= logits.numel():
            return logits
        threshold = torch.topk(logits, config.top_k).values[-1]
        return logits.masked_fill(logits < threshold, -math.inf)


class TopA:
    name = "top_a"

    def is_active(self, config: SamplingConfig) -> bool:
        return config.top_a > 0.0

    def __call__(
        self, logits: torch.Tensor, config: SamplingConfig, row: RowContext
    ) -> torch.Tensor:
        probs = torch.softmax(logits, dim=-1)
        return logits.masked_fill(probs < config.top_a * probs.max() ** 2, -math.inf)


class TopP:
    name = "top_p"

    def is_active(self, config: SamplingConfig) -> bool:
        return config.top_p < 1.0

    def __call__(
        self, logits: torch.Tensor, config: SamplingConfig, row: RowContext
    ) -> torch.Tensor:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # mass strictly before each token; a token is kept while that mass is still < p
        before = torch.cumsum(probs, dim=-1) - probs
        return _keep_sorted(logits, order, before < config.top_p)


class TypicalP:
    name = "typical_p"

    def is_active(self, config: SamplingConfig) -> bool:
        return config.typical_p < 1.0

    def __call__(
        self, logits: torch.Tensor, config: SamplingConfig, row: RowContext
    ) -> torch.Tensor:
        log_probs = torch.log_softmax(logits, dim=-1)
        probs = log_probs.exp()
        entropy = -(probs * log_probs.nan_to_num(neginf=0.0)).sum()
        shift = (-log_probs - entropy).abs()
        order = torch.argsort(shift, stable=True)
        sorted_probs = probs[order]
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        keep_sorted = (before < config.typical_p) & (sorted_probs > 0)
        keep_sorted[0] = True
        keep = torch.zeros_like(keep_sorted).scatter(0, order, keep_sorted)
        return logits.masked_fill(~keep, -math.inf)


class TailFree:
    name = "tfs"

    def is_active(self, config: SamplingConfig) -> bool:
        return config.tfs < 1.0

    def __call__(
        self, logits: torch.Tensor, config: SamplingConfig, row: RowContext
    ) -> torch.Tensor:
        if logits.numel() < 3:
            return logits
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        curvature = probs.diff().diff().abs()
        total = curvature.sum()
        if total <= 0:
            return logits
        before = torch.cumsum(curvature / total, dim=-1) - curvature / total
        # token 0 always kept; token i (1..V-2) kept while the curvature mass before it <= z
        keep_sorted = torch.zeros_like(probs, dtype=torch.bool)
        keep_sorted[1:-1] = before <= config.tfs
        return _keep_sorted(logits, order, keep_sorted & (probs > 0))


class MinP:
    name = "min_p"

    def is_active(self, config: SamplingConfig) -> bool:
        return config.min_p > 0.0

    def __call__(
        self, logits: torch.Tensor, config: SamplingConfig, row: RowContext
    ) -> torch.Tensor:
        probs = torch.softmax(logits, dim=-1)
        return logits.masked_fill(probs < config.min_p * probs.max(), -math.inf)


class Xtc:
    name = "xtc"

    def is_active(self, config: SamplingConfig) -> bool:
        return config.xtc_probability > 0.0

    def __call__(
        self, logits: torch.Tensor, config: SamplingConfig, row: RowContext
    ) -> torch.Tensor:
        # always draw, so a row's random stream does not depend on its logits
        roll = float(torch.rand((), generator=row.generator))
        if roll >= config.xtc_probability:
            return logits
        probs = torch.softmax(logits, dim=-1)
        above = (probs >= config.xtc_threshold) & (probs > 0)
        if int(above.sum()) < 2:
            return logits
        least = torch.where(above, probs, torch.full_like(probs, math.inf)).argmin()
        remove = above.clone()
        remove[least] = False
        return logits.masked_fill(remove, -math.inf)


_PROCESSORS: tuple[LogitsProcessor, ...] = (
    LogitBias(),
    RepetitionPenalty(),
    PresencePenalty(),
    FrequencyPenalty(),
    Dry(),
    Temperature(),
    TopK(),
    TopA(),
    TopP(),
    TypicalP(),
    TailFree(),
    MinP(),
    Xtc(),
)
SAMPLERS: dict[str, LogitsProcessor] = {processor.name: processor for processor in _PROCESSORS}
#: penalties on raw logits, then temperature, then the truncation samplers (text-generation-webui)
DEFAULT_ORDER = (
    "logit_bias",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "dry",
    "temperature",
    "top_k",
    "top_a",
    "top_p",
    "typical_p",
    "tfs",
    "min_p",
    "xtc",
)
#: what still runs under Mirostat
PENALTIES = ("logit_bias", "repetition_penalty", "presence_penalty", "frequency_penalty", "dry")


def process(
    logits: torch.Tensor,
    config: SamplingConfig,
    history: Sequence[int] = (),
    row: RowContext | None = None,
) -> torch.Tensor:
    """Run every active processor on one row's float32 logits (vocab,)."""
    row = row if row is not None else RowContext(history=history)
    order = config.order()
    if config.mirostat_mode:
        order = tuple(n for n in order if n in PENALTIES or n == "temperature")
    for name in order:
        processor = SAMPLERS[name]
        if processor.is_active(config):
            logits = processor(logits, config, row)
    return logits


def _mirostat_k(epsilon: float, s_hat: float, mu: float, vocab: int) -> int:
    """Mirostat 1's ``k = ((e 2^mu) / (1 - N^-e))^(1/s_hat)`` in [1, vocab], overflow-safe."""
    if abs(epsilon) < 1e-9 or s_hat <= 0:
        return vocab
    try:
        k_float = ((epsilon * 2**mu) / (1 - vocab**-epsilon)) ** (1 / s_hat)
    except (OverflowError, ZeroDivisionError):
        return vocab
    if isinstance(k_float, complex) or not math.isfinite(k_float):
        return vocab
    return int(min(max(k_float, 1), vocab))


def _mirostat(logits: torch.Tensor, config: SamplingConfig, row: RowContext) -> int:
    state = row.state
    tau, eta = config.mirostat_tau, config.mirostat_eta
    mu = state.mirostat_mu if state.mirostat_mu is not None else 2 * tau
    sorted_logits, order = torch.sort(logits, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    if config.mirostat_mode == 1:
        top = probs[:100].clamp_min(1e-30)
        steps = torch.arange(len(top) - 1, dtype=torch.float64)
        t = torch.log((steps + 2) / (steps + 1))
        b = torch.log(top[:-1].double() / top[1:].double())
        s_hat = float((t * b).sum() / (t * t).sum()) if len(top) > 1 else 1.0
        epsilon = s_hat - 1
        vocab = probs.numel()
        k = _mirostat_k(epsilon, s_hat, mu, vocab)
        keep = torch.arange(vocab) < k
    else:
        keep = -torch.log2(probs) <= mu
        keep[0] = True
    kept = torch.where(keep, probs, torch.zeros_like(probs))
    kept = kept / kept.sum()
    index = int(torch.multinomial(kept, 1, generator=row.generator).item())
    surprise = -math.log2(float(kept[index]))
    state.mirostat_mu = mu - eta * (surprise - tau)
    return int(order[index].item())


def choose(
    logits: torch.Tensor,
    config: SamplingConfig,
    generator: torch.Generator | None,
    history: Sequence[int] = (),
    state: SamplerState | None = None,
    banned_tokens: Iterable[int] = (),
) -> int:
    """Pick the next token for one row; ``banned_tokens`` are masked before anything runs."""
    row = RowContext(history, generator, state if state is not None else SamplerState())
    banned = list(banned_tokens)
    if banned:
        logits = logits.index_fill(0, torch.tensor(banned), -math.inf)
    if config.greedy:
        if config.mirostat_mode or any(SAMPLERS[n].is_active(config) for n in config.order()):
            logits = process(logits, config, row=row)
        return int(torch.argmax(logits).item())
    logits = process(logits, config, row=row)
    if config.mirostat_mode:
        return _mirostat(logits, config, row)
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator).item())


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
