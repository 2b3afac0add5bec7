"""steer's sampler pipeline inside vLLM: a logits processor for the samplers vLLM lacks.

vLLM samples with temperature, top-k, top-p, min-p, its penalties and logit bias. A request that
sets any other sampler (DRY, XTC, Mirostat, TFS, typical, top-a, a repetition-penalty range,
temperature last, a sampler order, banned strings) is sent with vLLM's own samplers neutral and its
whole :class:`~steer.sampling.SamplingConfig` in ``extra_args``; :class:`SteerSamplers`, registered
in every vLLM engine steer starts, runs :func:`steer.sampling.process` on that row's logits with
the row's prompt and generated tokens, exactly as the hf engine does, and vLLM then draws from the
result (greedy rows: its argmax). Mirostat's truncation is applied here and its ``mu`` is updated
at the next step from the token vLLM drew. Banned strings mask the tokens that would complete a
phrase after the reply's tail, as the hf engine does first; the hf engine also re-checks the drawn
token's text joined to the reply and draws again, which a logits processor cannot (it matters only
where a token's own text differs from its text in context). The draw itself is vLLM's (its
generator), so sampled text differs from the hf engine's for the same seed, as for vLLM's own
samplers; greedy text is the same.

Rows are processed on the CPU, one at a time (docs/backends.md measures the cost); rows that use
only vLLM's samplers never reach this code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from steer.backends.vllm.params import PIPELINE_KEY, decode
from steer.sampling import BannedStrings, SamplingConfig, banned_strings, process
from steer.sampling.pipeline import mirostat_truncate, mirostat_update
from steer.sampling.processors import RowContext, SamplerState


@dataclass
class _Row:
    config: SamplingConfig
    state: SamplerState
    prompt: list[int]
    #: vLLM's own list of the row's generated tokens (it appends to it)
    output: list[int]
    generator: torch.Generator | None
    #: Mirostat: the distribution vLLM last drew from, and how many tokens there were then
    kept: torch.Tensor | None = None
    drawn_at: int = 0
    #: banned strings, and the tokenizer that decodes the reply's tail for them
    banned: BannedStrings | None = None
    tokenizer: Any = None


class SteerSamplers(LogitsProcessor):
    """Runs steer's sampler pipeline on the rows whose ``extra_args`` carry settings."""

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        self.rows: dict[int, _Row] = {}
        #: the model's tokenizer (steer's export of it), loaded at the first banned string
        self.tokenizer_path = str(vllm_config.model_config.tokenizer)
        self._tokenizer: Any = None

    def is_argmax_invariant(self) -> bool:
        return False  # penalties, DRY and the sampler order change greedy picks too

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self.rows, batch_update, self._new_row)

    def _new_row(self, params: Any, prompt: list[int] | None, output: list[int]) -> _Row | None:
        extra = params.extra_args or {}
        if PIPELINE_KEY not in extra:
            return None
        config, state = decode(extra[PIPELINE_KEY])
        seed = params.seed
        generator = None if seed is None else torch.Generator().manual_seed(int(seed))
        row = _Row(config, state, list(prompt or ()), output, generator)
        if config.banned_strings:
            if self._tokenizer is None:
                from transformers import AutoTokenizer

                self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path)
            row.banned = banned_strings(config.banned_strings, self._tokenizer)
            row.tokenizer = self._tokenizer
        return row

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for index, row in self.rows.items():
            if index >= logits.shape[0]:
                continue
            processed = _process(row, logits[index].float().cpu())
            logits[index] = processed.to(logits.device, logits.dtype)
        return logits


def _process(row: _Row, logits: torch.Tensor) -> torch.Tensor:
    """The row's logits as steer's pipeline leaves them (Mirostat: the log of its kept
    distribution, so that vLLM's draw at temperature 1 is Mirostat's draw)."""
    config = row.config
    if row.kept is not None and len(row.output) > row.drawn_at:
        probability = float(row.kept[row.output[row.drawn_at]])  # the token vLLM drew
        if probability > 0:  # a masked token (probability 0) is never drawn
            mirostat_update(row.state, config, probability)
        row.kept = None
    if row.banned is not None:  # as the hf engine: tokens completing a phrase, masked first
        tail = row.tokenizer.decode(
            row.output[-(row.banned.longest + 8) :], skip_special_tokens=True
        )
        masked = sorted(row.banned.tokens_to_ban(tail))
        if masked:
            logits = logits.index_fill(0, torch.tensor(masked), -math.inf)
    context = RowContext(row.prompt + row.output, row.generator, row.state)
    logits = process(logits, config, row=context)
    if not config.mirostat_mode or config.greedy:
        return logits
    kept_sorted, order = mirostat_truncate(logits, config, row.state)
    kept = torch.zeros_like(kept_sorted).scatter_(0, order, kept_sorted)
    row.kept, row.drawn_at = kept, len(row.output)
    return torch.log(kept)
