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

Modules: :mod:`~steer.sampling.config` (the settings), :mod:`~steer.sampling.processors` (the
processors and their registry), :mod:`~steer.sampling.pipeline` (``process``, ``choose``,
Mirostat), :mod:`~steer.sampling.banned` (banned strings).
"""

from steer.sampling.banned import BannedStrings, banned_strings, token_texts
from steer.sampling.config import DRY_SEQUENCE_BREAKERS, SamplingConfig
from steer.sampling.pipeline import choose, process
from steer.sampling.processors import (
    DEFAULT_ORDER,
    PENALTIES,
    SAMPLERS,
    LogitsProcessor,
    RowContext,
    SamplerState,
    dry_penalties,
)

__all__ = [
    "DEFAULT_ORDER",
    "DRY_SEQUENCE_BREAKERS",
    "PENALTIES",
    "SAMPLERS",
    "BannedStrings",
    "LogitsProcessor",
    "RowContext",
    "SamplerState",
    "SamplingConfig",
    "banned_strings",
    "choose",
    "dry_penalties",
    "process",
    "token_texts",
]
