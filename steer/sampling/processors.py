"""The logit processors (penalties, temperature, truncation samplers), registered by name."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

from steer.errors import InvalidArgumentError
from steer.limits import MAX_PENALTY

if TYPE_CHECKING:
    from steer.sampling.config import SamplingConfig


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
    """Mask tokens not kept; ``keep_sorted`` is over ``order`` (descending probability: the
    whole vocabulary, or its head, the tokens past it then masked); the first is always kept."""
    keep_sorted = keep_sorted.clone()
    keep_sorted[0] = True
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter(0, order, keep_sorted)
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
        # the kept tokens are the most likely ones: sort the top 1024 first (a 128k vocabulary's
        # full sort costs ~10 ms a row on CPU), the whole vocabulary only where they hold < p
        total = torch.logsumexp(logits, dim=-1)
        head = min(1024, logits.numel())
        sorted_logits, order = torch.topk(logits, head)
        probs = torch.exp(sorted_logits - total)
        if head < logits.numel() and float(probs.sum()) < config.top_p:
            sorted_logits, order = torch.sort(logits, descending=True)
            probs = torch.exp(sorted_logits - total)
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
