"""Sampling: a settings value object and a pipeline of registered logit processors.

Each processor maps one row's logits (``vocab``,) to new logits; the pipeline runs the active ones
in ``DEFAULT_ORDER`` and then draws a token with the row's own ``torch.Generator`` (seeded, so the
same seed and request give the same tokens whatever else shares the batch). ``temperature == 0``
means greedy. The formulas:

* temperature ``T``: ``z <- z / T``
* top-k ``k`` (0 = off): keep the ``k`` largest logits
* top-p ``p`` (1 = off): keep the smallest set of most likely tokens whose probability sum is >= p
* min-p ``m`` (0 = off): keep tokens with ``p_i >= m * max_j p_j``

A new sampler is one class with ``name``, ``is_active(config)`` and ``__call__`` added to
``SAMPLERS``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch

from steer.errors import InvalidArgumentError


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "min_p"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InvalidArgumentError(f"must be a finite number, got {value!r}", field=name)
        if self.temperature < 0:
            raise InvalidArgumentError("must be >= 0 (0 = greedy)", field="temperature")
        if not 0 < self.top_p <= 1:
            raise InvalidArgumentError("must be in (0, 1]", field="top_p")
        if not 0 <= self.min_p <= 1:
            raise InvalidArgumentError("must be in [0, 1]", field="min_p")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidArgumentError("must be an integer >= 0 (0 = off)", field="top_k")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise InvalidArgumentError("must be in [0, 2**63)", field="seed")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def greedy_config(cls) -> SamplingConfig:
        return cls(temperature=0.0)


class LogitsProcessor(Protocol):
    name: ClassVar[str]

    def is_active(self, config: SamplingConfig) -> bool: ...

    def __call__(
        self, logits: torch.Tensor, config: SamplingConfig, history: Sequence[int]
    ) -> torch.Tensor: ...


class Temperature:
    name = "temperature"

    def is_active(self, config: SamplingConfig) -> bool:
        return config.temperature != 1.0

    def __call__(self, logits, config, history):  # type: ignore[no-untyped-def]
        return logits / config.temperature


class TopK:
    name = "top_k"

    def is_active(self, config: SamplingConfig) -> bool:
        return 0 < config.top_k < 2**31

    def __call__(self, logits, config, history):  # type: ignore[no-untyped-def]
        k = min(config.top_k, logits.numel())
        threshold = torch.topk(logits, k).values[-1]
        return logits.masked_fill(logits < threshold, -math.inf)


class TopP:
    name = "top_p"

    def is_active(self, config: SamplingConfig) -> bool:
        return config.top_p < 1.0

    def __call__(self, logits, config, history):  # type: ignore[no-untyped-def]
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # mass strictly before each token; a token is kept while that mass is still < p
        before = torch.cumsum(probs, dim=-1) - probs
        remove_sorted = before >= config.top_p
        remove = torch.zeros_like(remove_sorted).scatter(0, order, remove_sorted)
        return logits.masked_fill(remove, -math.inf)


class MinP:
    name = "min_p"

    def is_active(self, config: SamplingConfig) -> bool:
        return config.min_p > 0.0

    def __call__(self, logits, config, history):  # type: ignore[no-untyped-def]
        probs = torch.softmax(logits, dim=-1)
        return logits.masked_fill(probs < config.min_p * probs.max(), -math.inf)


SAMPLERS: dict[str, LogitsProcessor] = {
    processor.name: processor for processor in (Temperature(), TopK(), TopP(), MinP())
}
DEFAULT_ORDER = ("top_k", "top_p", "min_p", "temperature")


def process(
    logits: torch.Tensor, config: SamplingConfig, history: Sequence[int] = ()
) -> torch.Tensor:
    """Run every active processor on one row's float32 logits (vocab,)."""
    for name in DEFAULT_ORDER:
        processor = SAMPLERS[name]
        if processor.is_active(config):
            logits = processor(logits, config, history)
    return logits


def choose(
    logits: torch.Tensor,
    config: SamplingConfig,
    generator: torch.Generator | None,
    history: Sequence[int] = (),
) -> int:
    """Pick the next token for one row."""
    if config.greedy:
        return int(torch.argmax(logits).item())
    probs = torch.softmax(process(logits, config, history), dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator).item())
