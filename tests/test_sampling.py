"""Sampler pipeline: each sampler on hand-built logits, property tests, config validation."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from steer.errors import InvalidArgumentError
from steer.sampling import (
    DEFAULT_ORDER,
    SAMPLERS,
    RowContext,
    SamplerState,
    SamplingConfig,
    choose,
    dry_penalties,
    process,
)
from steer.sampling.pipeline import draw


def logits_of(probs: list[float]) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float32).log()


def kept(logits: torch.Tensor) -> list[int]:
    return [i for i, v in enumerate(logits.tolist()) if v != -math.inf]


def run(name: str, logits: torch.Tensor, config: SamplingConfig, **row: object) -> torch.Tensor:
    return SAMPLERS[name](logits, config, RowContext(**row))  # type: ignore[arg-type]


# -- hand-built logits -------------------------------------------------------------------------


def test_min_p_keeps_exactly_tokens_at_or_above_min_p_times_p_max() -> None:
    probs = [0.4, 0.21, 0.19, 0.1, 0.1]
    config = SamplingConfig(min_p=0.5)
    assert kept(run("min_p", logits_of(probs), config)) == [0, 1]
    # a token exactly on the threshold is kept: min_p = 1 keeps every tie of the maximum
    ties = torch.tensor([1.0, 1.0, 0.999, 1.0])
    assert kept(run("min_p", ties, SamplingConfig(min_p=1.0))) == [0, 1, 3]


def test_dry_penalty_is_multiplier_times_base_to_the_excess_length() -> None:
    # history: A B C D ... A B C -> the token after the earlier "A B C" (D) extends a repeat of n=3
    history = [1, 2, 3, 4, 9, 9, 7, 1, 2, 3]
    penalties = dry_penalties(history, multiplier=0.8, base=1.75, allowed_length=2)
    assert penalties == {4: pytest.approx(0.8 * 1.75 ** (3 - 2))}
    # below the allowed length: no penalty
    assert dry_penalties([5, 6, 8, 5], 0.8, 1.75, allowed_length=2) == {}
    # n = allowed length: penalty = multiplier * base^0
    assert dry_penalties([5, 6, 8, 5, 6], 0.8, 1.75, 2) == {8: pytest.approx(0.8)}
    # a sequence breaker stops the match: "A : B" ... "A : B" matches only n=1 after the breaker
    assert dry_penalties([1, 0, 2, 3, 1, 0, 2], 0.8, 1.75, 2, frozenset({0})) == {}


def test_dry_processor_subtracts_penalty_from_the_logit() -> None:
    config = SamplingConfig(dry_multiplier=0.8, dry_base=2.0, dry_allowed_length=2)
    logits = torch.zeros(10)
    out = run("dry", logits, config, history=[1, 2, 3, 4, 9, 1, 2, 3])
    expected = torch.zeros(10)
    expected[4] = -0.8 * 2.0 ** (3 - 2)
    assert torch.equal(out, expected)


def test_xtc_removes_all_but_the_least_likely_above_threshold() -> None:
    probs = [0.35, 0.3, 0.15, 0.12, 0.08]
    config = SamplingConfig(xtc_threshold=0.11, xtc_probability=1.0)
    generator = torch.Generator().manual_seed(0)
    out = run("xtc", logits_of(probs), config, generator=generator)
    assert kept(out) == [3, 4]
    # a single token above the threshold: nothing removed
    one = SamplingConfig(xtc_threshold=0.32, xtc_probability=1.0)
    assert kept(run("xtc", logits_of(probs), one, generator=generator)) == [0, 1, 2, 3, 4]


def test_top_k_top_p_top_a_typical_tfs_on_hand_built_logits() -> None:
    probs = [0.5, 0.25, 0.15, 0.07, 0.03]
    logits = logits_of(probs)
    assert kept(run("top_k", logits, SamplingConfig(top_k=2))) == [0, 1]
    # top-p 0.8: 0.5 + 0.25 = 0.75 < 0.8, so 0.15 is still needed
    assert kept(run("top_p", logits, SamplingConfig(top_p=0.8))) == [0, 1, 2]
    # top-a 0.5: keep p >= 0.5 * 0.25 = 0.125
    assert kept(run("top_a", logits, SamplingConfig(top_a=0.5))) == [0, 1, 2]
    # typical: H = 1.269 nats; |-log p - H| = [0.576, 0.117, 0.628, 1.390, 2.238], so the order
    # is tokens 1, 0, 2, ...; mass before token 0 is 0.25 < 0.3, before token 2 it is 0.75
    assert kept(run("typical_p", logits, SamplingConfig(typical_p=0.3))) == [0, 1]
    assert kept(run("typical_p", logits, SamplingConfig(typical_p=0.2))) == [1]
    # tfs: curvature of sorted p = |p_i - 2p_{i+1} + p_{i+2}| = [0.15, 0.02, 0.04], normalised
    # [0.714, 0.095, 0.190]; z = 0.5 keeps token 0 and token 1 (mass before it 0 <= 0.5)
    assert kept(run("tfs", logits, SamplingConfig(tfs=0.5))) == [0, 1]
    assert kept(run("tfs", logits, SamplingConfig(tfs=0.75))) == [0, 1, 2]


@pytest.mark.parametrize("scale", [1.0, 3.0, 8.0])
@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.9, 0.99])
def test_top_p_on_a_large_vocabulary_keeps_what_a_full_sort_keeps(
    scale: float, top_p: float
) -> None:
    """Top-p sorts a head of 1024 tokens first; the kept set is the full sort's, peaked or flat."""
    generator = torch.Generator().manual_seed(int(scale * 100 + top_p * 10))
    logits = torch.randn(50_000, generator=generator) * scale
    logits[:5] += 6.0  # scale 1: the head holds < p (the full sort); scale 8: it holds more
    sorted_logits, order = torch.sort(logits.double(), descending=True)
    probs = torch.softmax(sorted_logits, -1)
    before = torch.cumsum(probs, -1) - probs
    keep_sorted = before < top_p
    keep_sorted[0] = True
    expected = set(order[keep_sorted].tolist())
    ours = set(kept(SAMPLERS["top_p"](logits, SamplingConfig(top_p=top_p), RowContext())))
    # float32 rounding may decide a token whose preceding mass is p to within 1e-5
    rank = {int(token): i for i, token in enumerate(order)}
    assert all(abs(before[rank[t]] - top_p) < 1e-5 for t in ours ^ expected)
    assert len(ours ^ expected) <= 1


def test_draw_follows_the_distribution_and_never_picks_a_zero() -> None:
    probs = torch.tensor([0.0, 0.2, 0.0, 0.5, 0.3, 0.0])
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(6)
    for _ in range(20_000):
        counts[draw(probs, generator)] += 1
    assert counts[[0, 2, 5]].sum() == 0
    frequencies = counts / counts.sum()
    # binomial standard error at n = 20000 is <= 0.0036; 5 of them
    assert torch.allclose(frequencies, probs, atol=0.018)
    assert draw(torch.tensor([0.0, 0.0, 1.0]), generator) == 2


def test_draw_over_many_blocks_is_the_one_level_search() -> None:
    """The two-level search (blocks of 1024) picks what one float64 running sum over the whole
    vocabulary picks, for the same uniform number; empty blocks and zeros are never drawn."""
    generator = torch.Generator().manual_seed(3)
    probs = torch.softmax(torch.randn(5000, generator=generator) * 4, -1)
    probs[1024:2048] = 0.0  # a whole empty block
    probs[::7] = 0.0
    ours, theirs = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    cumulative = torch.cumsum(probs.double(), 0)
    for _ in range(3000):
        point = torch.rand((), generator=theirs, dtype=torch.float64) * cumulative[-1]
        expected = int(torch.searchsorted(cumulative, point, right=True))
        index = draw(probs, ours)
        assert index == expected and probs[index] > 0


def test_penalties_on_hand_built_logits() -> None:
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5])
    history = [0, 1, 1]
    rep = run("repetition_penalty", logits, SamplingConfig(repetition_penalty=2.0), history=history)
    assert rep.tolist() == [1.0, -4.0, 1.0, 0.5]
    config = SamplingConfig(presence_penalty=0.5, frequency_penalty=0.25)
    out = run(
        "frequency_penalty",
        run("presence_penalty", logits, config, history=history),
        config,
        history=history,
    )
    assert out.tolist() == pytest.approx([2.0 - 0.5 - 0.25, -2.0 - 0.5 - 0.5, 1.0, 0.5])
    # the range limits the window: only the last token (1) counts
    ranged = SamplingConfig(repetition_penalty=2.0, repetition_penalty_range=1)
    assert run("repetition_penalty", logits, ranged, history=history).tolist() == [
        2.0,
        -4.0,
        1.0,
        0.5,
    ]
    bias = SamplingConfig(logit_bias=((3, 10.0), (0, -math.inf)))
    assert run("logit_bias", logits, bias).tolist() == [-math.inf, -2.0, 1.0, 10.5]


def test_temperature_last_changes_what_min_p_sees() -> None:
    logits = logits_of([0.6, 0.3, 0.1])
    first = SamplingConfig(temperature=0.5, min_p=0.3)
    last = SamplingConfig(temperature=0.5, min_p=0.3, temperature_last=True)
    # temperature 0.5 first sharpens to p ~ [0.78, 0.20, 0.02]: 0.2 < 0.3 * 0.78 is dropped
    assert kept(process(logits, first)) == [0]
    assert kept(process(logits, last)) == [0, 1]
    assert last.order()[-1] == "temperature"
    custom = SamplingConfig(sampler_order=("min_p", "temperature"), temperature=0.5, min_p=0.3)
    assert kept(process(logits, custom)) == [0, 1]


def test_mirostat_v2_truncates_by_surprise_and_updates_mu() -> None:
    config = SamplingConfig(mirostat_mode=2, mirostat_tau=1.0, mirostat_eta=0.5)
    state = SamplerState()
    probs = [0.5, 0.3, 0.2]
    generator = torch.Generator().manual_seed(3)
    # mu starts at 2 tau = 2 bits: only tokens with -log2 p <= 2 (p >= 0.25) survive: 0 and 1
    token = choose(logits_of(probs), config, generator, (), state)
    assert token in (0, 1)
    kept_probs = {0: 0.5 / 0.8, 1: 0.3 / 0.8}
    surprise = -math.log2(kept_probs[token])
    assert state.mirostat_mu == pytest.approx(2.0 - 0.5 * (surprise - 1.0))


def test_greedy_ignores_randomness_but_keeps_penalties() -> None:
    logits = torch.tensor([3.0, 2.9, 0.0])
    assert choose(logits, SamplingConfig.greedy_config(), None) == 0
    penalised = SamplingConfig(temperature=0.0, repetition_penalty=2.0)
    assert choose(logits, penalised, None, history=[0]) == 1
    assert choose(logits, SamplingConfig.greedy_config(), None, banned_tokens=[0]) == 1


# -- properties ---------------------------------------------------------------------------------

NEUTRAL = SamplingConfig()

logit_rows = st.lists(
    st.floats(min_value=-20, max_value=20, allow_nan=False), min_size=3, max_size=40
).map(lambda values: torch.tensor(values, dtype=torch.float32))
histories = st.lists(st.integers(min_value=0, max_value=2), max_size=12)


@settings(max_examples=30, deadline=None)
@given(logits=logit_rows, history=histories)
def test_disabled_values_are_exact_no_ops(logits: torch.Tensor, history: list[int]) -> None:
    out = process(logits, NEUTRAL, history)
    assert torch.equal(out, logits)
    explicit = SamplingConfig(
        top_k=0,
        top_p=1.0,
        min_p=0.0,
        typical_p=1.0,
        tfs=1.0,
        top_a=0.0,
        repetition_penalty=1.0,
        presence_penalty=0.0,
        frequency_penalty=0.0,
        dry_multiplier=0.0,
        xtc_probability=0.0,
        temperature_last=True,
    )
    assert torch.equal(process(logits, explicit, history), logits)


active_configs = st.builds(
    SamplingConfig,
    temperature=st.floats(min_value=0.05, max_value=4.0),
    temperature_last=st.booleans(),
    top_k=st.integers(min_value=0, max_value=10),
    top_p=st.floats(min_value=0.01, max_value=1.0),
    min_p=st.floats(min_value=0.0, max_value=1.0),
    typical_p=st.floats(min_value=0.01, max_value=1.0),
    tfs=st.floats(min_value=0.01, max_value=1.0),
    top_a=st.floats(min_value=0.0, max_value=1.0),
    repetition_penalty=st.floats(min_value=0.5, max_value=2.0),
    presence_penalty=st.floats(min_value=-2.0, max_value=2.0),
    frequency_penalty=st.floats(min_value=-2.0, max_value=2.0),
    dry_multiplier=st.floats(min_value=0.0, max_value=3.0),
    xtc_threshold=st.floats(min_value=0.0, max_value=0.5),
    xtc_probability=st.floats(min_value=0.0, max_value=1.0),
)


@settings(max_examples=40, deadline=None)
@given(logits=logit_rows, history=histories, config=active_configs, seed=st.integers(0, 100))
def test_pipeline_keeps_a_normalised_distribution(
    logits: torch.Tensor, history: list[int], config: SamplingConfig, seed: int
) -> None:
    generator = torch.Generator().manual_seed(seed)
    out = process(logits, config, row=RowContext(history, generator))
    assert torch.isfinite(out).any(), "every truncation keeps at least one token"
    probs = torch.softmax(out, dim=-1)
    assert float(probs.sum()) == pytest.approx(1.0, abs=1e-5)
    assert not torch.isnan(probs).any()
    # the most likely token after the penalties survives every truncation except XTC
    if config.xtc_probability == 0 and config.typical_p == 1.0:
        penalties = SamplingConfig(
            repetition_penalty=config.repetition_penalty,
            presence_penalty=config.presence_penalty,
            frequency_penalty=config.frequency_penalty,
            dry_multiplier=config.dry_multiplier,
        )
        best = int(process(logits, penalties, history).argmax())
        assert out[best] != -math.inf


@settings(max_examples=20, deadline=None)
@given(logits=logit_rows, seed=st.integers(0, 2**31))
def test_same_seed_same_token(logits: torch.Tensor, seed: int) -> None:
    config = SamplingConfig(min_p=0.05, xtc_probability=0.5, xtc_threshold=0.05)
    picks = [choose(logits, config, torch.Generator().manual_seed(seed), [1, 2]) for _ in range(2)]
    assert picks[0] == picks[1]


# -- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"min_p": 1.5}, "min_p"),
        ({"typical_p": float("nan")}, "typical_p"),
        ({"tfs": 2.0}, "tfs"),
        ({"top_k": -1}, "top_k"),
        ({"mirostat_mode": 3}, "mirostat_mode"),
        ({"mirostat_eta": -0.1}, "mirostat_eta"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty_range": -5}, "repetition_penalty_range"),
        ({"presence_penalty": 3.0}, "presence_penalty"),
        ({"dry_base": 0.5}, "dry_base"),
        ({"dry_allowed_length": 0}, "dry_allowed_length"),
        ({"dry_sequence_breakers": ("",)}, "dry_sequence_breakers"),
        ({"xtc_probability": 1.5}, "xtc_probability"),
        ({"logit_bias": {"x": 1.0}}, "logit_bias"),
        ({"logit_bias": {1: float("nan")}}, "logit_bias"),
        ({"banned_strings": "Elara"}, "banned_strings"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"ban_eos": "yes"}, "ban_eos"),
        ({"sampler_order": ("top_k", "bogus")}, "sampler_order"),
        ({"sampler_order": ("top_k", "top_k")}, "sampler_order"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_settings_name_their_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidArgumentError) as error:
        SamplingConfig(**kwargs)  # type: ignore[arg-type]
    assert error.value.field == field


def test_config_is_hashable_and_accepts_json_shapes() -> None:
    config = SamplingConfig(
        logit_bias={"5": 1.5, 2: -1},  # type: ignore[arg-type]
        banned_strings=["Elara"],  # type: ignore[arg-type]
        sampler_order=list(DEFAULT_ORDER),  # type: ignore[arg-type]
    )
    assert config.logit_bias == ((2, -1.0), (5, 1.5))
    assert config.banned_strings == ("Elara",)
    hash(config)
    with pytest.raises(InvalidArgumentError) as error:
        SamplerState.for_request(SamplingConfig(logit_bias=((10, 1.0),)), None, vocab_size=10)
    assert error.value.field == "logit_bias"
