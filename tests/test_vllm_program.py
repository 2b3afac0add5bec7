"""The vllm backend's flattened-batch programs equal the hf engine's plan, op for op (no vLLM).

vLLM lays a batch's tokens end to end and mixes prompt and generated tokens in one pass;
:class:`~steer.backends.vllm.program.FlatProgram` must give every token what the hf engine's
:class:`~steer.plan.InterventionPlan` gives it in the (rows, tokens) layout of its own passes.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig

from steer.backends.capabilities import check_request
from steer.backends.vllm.engine import CAPABILITIES
from steer.backends.vllm.gates import PromptGates
from steer.backends.vllm.launch import export_for_vllm
from steer.backends.vllm.params import decode, encode, needs_pipeline
from steer.backends.vllm.program import (
    Selection,
    SteeringSpec,
    build_flat_programs,
    lower_request,
    saes_of,
)
from steer.backends.vllm.scoped import Group, ScopedPass, ScopedTable
from steer.errors import FailedPreconditionError, UnsupportedArchitectureError
from steer.gates import Condition, Gated, GateScope
from steer.generation import GenerationRequest
from steer.interventions import Ablate, Add, Intervention, Phase
from steer.models import ModelHandle
from steer.plan import build_plan
from steer.runtime import forward_order
from steer.sae.conditions import FeatureCondition
from steer.sae.loading import SparseAutoencoder
from steer.sae.sliders import Clamp, Scale
from steer.sae.training import Splice
from steer.sampling import SamplingConfig
from steer.sampling.processors import SamplerState
from steer.vectors import SteeringVector

D = 64
#: the speaker of each token of a flat pass's rows, in turn
SPEAKERS = ("Alice", "Bo", None)
HOOKS = ("blocks.1.hook_resid_post", "blocks.2.hook_attn_out")


def _vector(seed: int) -> torch.Tensor:
    return torch.randn(D, generator=torch.Generator().manual_seed(seed))


def _sae() -> SparseAutoencoder:
    """A SAELens standard SAE on the tiny model's residual, random weights (seeded)."""
    torch.manual_seed(4)
    return SparseAutoencoder(StandardSAE(StandardSAEConfig(d_in=D, d_sae=16)), HOOKS[0])


def _rows() -> list[tuple[Intervention, ...]]:
    shared = SteeringVector.from_shared
    return [
        (),
        (Add(shared(_vector(1)), 2.0, hooks=HOOKS),),
        (Add(shared(_vector(2)), -1.5, hooks=HOOKS, phase=Phase.GENERATED),),
        (Ablate(shared(_vector(3))),),
        (Ablate(shared(_vector(4)), weight=0.6), Add(shared(_vector(5)), 1.0, hooks=HOOKS[:1])),
        (Add(shared(_vector(6)), 0.7, hooks=HOOKS, phase=Phase.PROMPT),),
        (
            Ablate(shared(_vector(7)), weight=0.8),
            Add(shared(_vector(8)), 1.2, hooks=HOOKS, phase=Phase.GENERATED),
            Add(shared(_vector(9)), -0.9, hooks=HOOKS[:1], phase=Phase.PROMPT),
        ),
    ]


@pytest.mark.parametrize("layout", ["mixed", "uniform", "uniform-but-one"])
@pytest.mark.parametrize("phase", [Phase.PROMPT, Phase.GENERATED])
def test_flat_programs_equal_the_hf_plan(
    tiny_llama: ModelHandle, layout: str, phase: Phase
) -> None:
    rows = _rows()
    if layout == "uniform":  # every row steered alike: the in-place fast path
        rows = [rows[6]] * 5
    elif layout == "uniform-but-one":  # alike but for an unsteered row: gathered tokens
        rows = [rows[0], *[rows[6]] * 4]
    resolver, d_model = tiny_llama.resolver, tiny_llama.d_model
    plan = build_plan(rows, resolver, d_model, torch.float32, torch.device("cpu"))
    specs = [lower_request(row, resolver, d_model) for row in rows]
    keys = [spec.key() if not spec.is_empty else None for spec in specs]
    flat = build_flat_programs(
        [None if key is None else spec for spec, key in zip(specs, keys, strict=True)],
        keys,
        torch.float32,
        torch.device("cpu"),
    )
    assert set(flat) == set(plan.programs)
    tokens = 5
    x = torch.randn(len(rows), tokens, D, generator=torch.Generator().manual_seed(9))
    token_rows = torch.arange(len(rows)).repeat_interleave(tokens)
    is_prompt = torch.full((len(rows) * tokens,), phase is Phase.PROMPT)
    hooks = plan.hooks(phase)
    for point, program in flat.items():
        expected = hooks[point](x.clone())
        got = x.clone().reshape(-1, D)
        program.apply(got, got.clone(), Selection(program.lookup, token_rows, is_prompt))
        torch.testing.assert_close(got.reshape(x.shape), expected, rtol=1e-5, atol=1e-5)
        if not rows[0]:
            assert torch.equal(got.reshape(x.shape)[0], x[0])  # the unsteered row is untouched


def _token_gated_rows() -> list[tuple[Intervention, ...]]:
    shared = SteeringVector.from_shared
    summed = Condition(
        ("blocks.0.hook_resid_post", "blocks.1.hook_resid_pre"),
        shared(_vector(12)),
        0.3,
        below=True,
        weights=(0.5, 1.5),
    )
    both = (
        Ablate(shared(_vector(13)), weight=0.7),
        Gated(summed, Ablate(shared(_vector(14)), layers=(1, 2))),
        Gated(
            Condition(HOOKS[0], shared(_vector(15)), 0.0),
            Add(shared(_vector(16)), 1.3, hooks=HOOKS, phase=Phase.GENERATED),
        ),
    )
    sae = _sae()
    return [
        (),
        (
            Gated(
                Condition("blocks.1.hook_resid_pre", shared(_vector(11)), 0.0),
                Add(shared(_vector(10)), 2.0, hooks=HOOKS),
            ),
        ),
        both,
        both,  # two rows naming one key
        (Add(shared(_vector(17)), 0.5, hooks=HOOKS[:1], phase=Phase.PROMPT),),
        # SAE sliders, ungated (one on generated tokens only) and behind a token gate; a gate
        # on an SAE feature
        (Clamp(sae, 3, 4.0), Scale(sae, 5, 0.0, phase=Phase.GENERATED)),
        (Gated(FeatureCondition(sae, 6, 0.05), Add(shared(_vector(20)), 1.5, hooks=HOOKS)),),
        # speaker-scoped: an ablation, a slider, and an addition behind a gate
        (
            Ablate(shared(_vector(21)), speaker="Alice"),
            Clamp(sae, 7, 3.0, speaker="Bo"),
            Gated(
                Condition(HOOKS[0], shared(_vector(22)), 0.0),
                Add(shared(_vector(23)), 1.0, hooks=HOOKS, speaker="Alice"),
            ),
        ),
        (
            Add(shared(_vector(18)), 0.5, hooks=HOOKS[:1]),
            Gated(
                Condition("blocks.0.hook_resid_post", shared(_vector(19)), 0.0), Scale(sae, 2, 3.0)
            ),
        ),
    ]


@pytest.mark.parametrize("phase", [Phase.PROMPT, Phase.GENERATED, Phase.ALL])
def test_token_gates_and_sae_sliders_in_a_flat_pass_equal_the_hf_plan(
    tiny_llama: ModelHandle, phase: Phase
) -> None:
    """Token gates read and act per token, and SAE sliders edit the tokens they cover, after the
    ungated ops at each point, one op after another, as the hf plan does; Phase.ALL: prompt and
    decode tokens mixed in one pass."""
    rows = _token_gated_rows()
    resolver, d_model = tiny_llama.resolver, tiny_llama.d_model
    plan = build_plan(rows, resolver, d_model, torch.float32, torch.device("cpu"))
    specs = [lower_request(row, resolver, d_model) for row in rows]
    keys = [None if spec.is_empty else spec.key() for spec in specs]
    flat = build_flat_programs(
        [None if key is None else spec for spec, key in zip(specs, keys, strict=True)],
        keys,
        torch.float32,
        torch.device("cpu"),
    )
    tokens = 6
    x = torch.randn(len(rows), tokens, D, generator=torch.Generator().manual_seed(5)) * 2
    token_rows = torch.arange(len(rows)).repeat_interleave(tokens)
    if phase is Phase.ALL:  # rows 1 and 3 decoding, the rest in their prompts
        is_prompt = (token_rows != 1) & (token_rows != 3)
    else:
        is_prompt = torch.full((len(rows) * tokens,), phase is Phase.PROMPT)
    groups = []
    saes = {key: sae for row in rows for key, sae in saes_of(row).items()}
    tables = {
        key: ScopedTable(spec.token_gates, spec.scoped, saes, torch.float32, torch.device("cpu"))
        for spec, key in zip(specs, keys, strict=True)
        if key is not None and spec.scoped
    }
    assert len(tables) == 6
    names = [SPEAKERS[t % len(SPEAKERS)] for t in range(tokens)] * len(rows)
    for key, table in tables.items():
        members = torch.tensor([row for row, named in enumerate(keys) if named == key])
        chosen = torch.nonzero(torch.isin(token_rows, members)).squeeze(1)
        speakers = {
            speaker: torch.tensor([names[t] == speaker for t in chosen.tolist()])
            for speaker in table.speakers
        }
        groups.append(Group(key, table, chosen, is_prompt[chosen], speakers))
    gates = ScopedPass(groups)
    got = x.clone().reshape(-1, D)
    points = sorted(set(plan.programs), key=forward_order)
    expected = {}
    by_row = [[SPEAKERS[t % len(SPEAKERS)] for t in range(tokens)]] * len(rows)
    for each in (Phase.PROMPT, Phase.GENERATED):
        hooks, value = plan.hooks(each, token_speakers=by_row), x.clone()
        for point in points:
            value = hooks[point](value)
        expected[each] = value
    for point in points:
        if point in gates.read_points:
            gates.read(point, got)
        if point in flat:
            program = flat[point]
            program.apply(got, got, Selection(program.lookup, token_rows, is_prompt))
        gates.apply(point, got, lambda: got)
    want = torch.where(
        is_prompt.reshape(len(rows), tokens)[:, :, None],
        expected[Phase.PROMPT],
        expected[Phase.GENERATED],
    )
    torch.testing.assert_close(got.reshape(x.shape), want, rtol=1e-5, atol=1e-5)
    assert len(gates.fired) == 6
    for mask in gates.fired.values():
        assert 0 < int(mask.sum()) < mask.numel()  # each gate fired on some tokens, not all


def test_mixed_phases_in_one_pass_equal_two_hf_passes(tiny_llama: ModelHandle) -> None:
    """A pass with one row's prompt chunk and another row's decode token, as vLLM schedules."""
    rows = [*_rows(), *[_rows()[6]] * 2]  # the last three alike
    resolver, d_model = tiny_llama.resolver, tiny_llama.d_model
    specs: list[SteeringSpec | None] = [lower_request(row, resolver, d_model) for row in rows]
    keys = [spec.key() for spec in specs if spec is not None]
    flat = build_flat_programs(specs, keys, torch.float32, torch.device("cpu"))
    plan = build_plan(rows, resolver, d_model, torch.float32, torch.device("cpu"))
    x = torch.randn(len(rows), 1, D, generator=torch.Generator().manual_seed(3))
    token_rows = torch.arange(len(rows))
    is_prompt = token_rows % 2 == 0  # even rows in their prompt, odd rows decoding
    for point, program in flat.items():
        prompt_pass = plan.hooks(Phase.PROMPT)[point](x.clone())
        decode_pass = plan.hooks(Phase.GENERATED)[point](x.clone())
        expected = torch.where(is_prompt[:, None, None], prompt_pass, decode_pass)
        got = x.clone().reshape(-1, D)
        program.apply(got, got.clone(), Selection(program.lookup, token_rows, is_prompt))
        torch.testing.assert_close(got.reshape(x.shape), expected, rtol=1e-5, atol=1e-5)


def test_equal_steering_has_equal_keys_and_different_steering_does_not(
    tiny_llama: ModelHandle,
) -> None:
    resolver, d_model = tiny_llama.resolver, tiny_llama.d_model
    vector = SteeringVector.from_shared(_vector(1))

    def key(*interventions: Intervention) -> str:
        return lower_request(interventions, resolver, d_model).key()

    assert key(Add(vector, 2.0, hooks=HOOKS)) == key(Add(vector, 2.0, hooks=HOOKS))
    assert key(Add(vector, 2.0, hooks=HOOKS)) != key(Add(vector, 2.5, hooks=HOOKS))
    assert key(Add(vector, 2.0, hooks=HOOKS)) != key(
        Add(vector, 2.0, hooks=HOOKS, phase=Phase.PROMPT)
    )
    assert key(Ablate(vector)) != key(Ablate(vector, weight=0.5))
    assert lower_request((Add(vector, 0.0, hooks=HOOKS),), resolver, d_model).is_empty


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (
            GenerationRequest(
                prompt="Hi",
                interventions=(
                    Add(
                        SteeringVector.from_shared(_vector(1)),
                        1.0,
                        hooks=("blocks.1.hook_resid_mid",),
                        speaker="Bo",
                    ),
                ),
            ),
            "interventions[0]",
        ),
    ],
)
def test_capabilities_refuse_by_field(
    tiny_llama: ModelHandle, request_: GenerationRequest, field: str
) -> None:
    with pytest.raises(FailedPreconditionError) as refused:
        check_request(request_, tiny_llama, CAPABILITIES)
    assert refused.value.field == field and "vllm" in refused.value.message


def _gated(
    scope: GateScope, hook: str | tuple[str, ...] = HOOKS[0], inner: Intervention | None = None
) -> Gated:
    vector = SteeringVector.from_shared(_vector(1))
    inner = Add(vector, 1.0, hooks=HOOKS) if inner is None else inner
    return Gated(Condition(hook, vector, 0.5), inner, scope=scope)


@pytest.mark.parametrize(
    ("gated", "field", "words"),
    [
        (
            lambda: _gated(
                GateScope.PROMPT, hook=("blocks.0.hook_resid_pre", "blocks.1.hook_resid_mid")
            ),
            "interventions[1].condition",
            "hook_resid_mid",
        ),
        (
            lambda: _gated(
                GateScope.REPLY,
                inner=Add(
                    SteeringVector.from_shared(_vector(2)), 1.0, hooks=("blocks.1.hook_resid_mid",)
                ),
            ),
            "interventions[1].inner",
            "hook_resid_mid",
        ),
        (lambda: Splice(_sae()), "interventions[1]", "Splice"),
    ],
)
def test_vllm_runs_every_gate_scope_and_refuses_a_hook_it_lacks_by_field(
    tiny_llama: ModelHandle, gated: object, field: str, words: str
) -> None:
    plain = Add(SteeringVector.from_shared(_vector(3)), 1.0, hooks=HOOKS)
    sae = _sae()
    runs = (
        _gated(GateScope.PROMPT),
        _gated(GateScope.TOKEN),
        _gated(GateScope.REPLY),
        _gated(GateScope.TOKEN, hook="blocks.0.hook_resid_pre", inner=Clamp(sae, 1, 2.0)),
        Scale(sae, 4, 0.5),
        Clamp(sae, 1, 2.0, speaker="Bo"),
        _gated(
            GateScope.PROMPT,
            inner=Add(SteeringVector.from_shared(_vector(2)), 1.0, hooks=HOOKS, speaker="Bo"),
        ),
    )
    check_request(
        GenerationRequest(prompt="Hi", interventions=(plain, *runs)), tiny_llama, CAPABILITIES
    )
    request = GenerationRequest(prompt="Hi", interventions=(plain, gated()))  # type: ignore[operator]
    with pytest.raises(FailedPreconditionError) as refused:
        check_request(request, tiny_llama, CAPABILITIES)
    assert refused.value.field == field, refused.value
    assert words in refused.value.message and "vllm" in refused.value.message


def test_a_gate_probe_reads_with_the_ungated_ops_and_decides_as_the_condition_says(
    tiny_llama: ModelHandle,
) -> None:
    resolver, d_model = tiny_llama.resolver, tiny_llama.d_model
    vector = SteeringVector.from_shared(_vector(1))
    plain = Add(SteeringVector.from_shared(_vector(3)), 1.0, hooks=HOOKS)
    hooks = ("blocks.1.hook_resid_pre", "blocks.0.hook_resid_post")
    above = Gated(Condition(HOOKS[0], vector, 0.5), Ablate(vector), scope=GateScope.PROMPT)
    below = Gated(
        Condition(hooks, vector, -1.0, below=True, weights=(2.0, 0.5)),
        Add(vector, 2.0, hooks=HOOKS),
        scope=GateScope.PROMPT,
    )
    gates = PromptGates.of((above, plain, below, _gated(GateScope.PROMPT, inner=Add(vector, 0.0))))
    assert gates is not None and gates.gates == (0, 2)  # a gate around nothing is no gate
    spec = gates.probe_spec(resolver, d_model)
    ungated = lower_request((plain,), resolver, d_model)
    assert [point for point, _ in spec.ops] == [point for point, _ in ungated.ops]
    # the reads in forward order, each hook's weight folded into its unit
    reads = [(read.point.name, read.gate, float(read.unit.norm())) for read in spec.reads]
    assert reads == [
        (HOOKS[0], 0, pytest.approx(1.0)),
        ("blocks.0.hook_resid_post", 1, pytest.approx(0.5)),
        ("blocks.1.hook_resid_pre", 1, pytest.approx(2.0)),
    ]
    # the probe shares its ops' prompt KV (salt), never their registration (key)
    assert spec.salt() == ungated.key() and spec.key() != ungated.key()
    assert gates.decide({0: 0.6, 1: -1.5}) == (True, True)
    assert gates.decide({0: 0.5, 1: -1.0}) == (False, False)
    assert gates.chosen((False, True))[:2] == (plain, below)
    assert gates.chosen((True, False))[:2] == (above, plain)
    # a fired gate's edit runs on every token, after the ungated ops (the hf engine's order)
    fired = lower_request(gates.chosen((True, False))[:2], resolver, d_model)
    assert [point for point, _ in fired.ops] == [point for point, _ in ungated.ops]
    lowered = [point for point, _ in above.inner.lowered(resolver, d_model)]
    assert [(e.point, e.gate) for e in fired.scoped] == [(point, None) for point in lowered]


def test_a_gate_whose_edit_another_gate_would_read_is_refused(tiny_llama: ModelHandle) -> None:
    resolver, d_model = tiny_llama.resolver, tiny_llama.d_model
    vector = SteeringVector.from_shared(_vector(1))
    early = Gated(
        Condition("blocks.0.hook_resid_pre", vector, 0.5),
        Add(vector, 1.0, hooks=("blocks.0.hook_resid_post",)),
        scope=GateScope.PROMPT,
    )
    late = _gated(GateScope.PROMPT, hook="blocks.1.hook_resid_post")
    gates = PromptGates.of((early, late))
    assert gates is not None
    with pytest.raises(FailedPreconditionError) as refused:
        gates.check(resolver, d_model)
    assert refused.value.field == "interventions[1].condition"
    assert "blocks.0.hook_resid_post" in refused.value.message
    # an edit before its own condition acts only after the hf engine's decision: no conflict
    before = Gated(
        Condition("blocks.1.hook_resid_post", vector, 0.5), Ablate(vector), scope=GateScope.PROMPT
    )
    ok = PromptGates.of((before, late))
    assert ok is not None
    ok.check(resolver, d_model)


def test_what_vllm_has_passes_the_check(tiny_llama: ModelHandle) -> None:
    vector = SteeringVector.from_shared(_vector(1))
    sampling = SamplingConfig(temperature=0.8, top_k=40, top_p=0.9, min_p=0.05, seed=3)
    request = GenerationRequest(
        prompt="Hi",
        sampling=sampling,
        interventions=(Add(vector, 1.0, hooks=HOOKS), Ablate(vector)),
    )
    check_request(request, tiny_llama, CAPABILITIES)


def test_rp_samplers_pass_the_check_and_travel_whole(tiny_llama: ModelHandle) -> None:
    """The samplers vLLM lacks go to steer's pipeline inside vLLM: they pass the check, only they
    need it, and their settings (DRY breakers resolved by the tokenizer) survive the trip."""
    rp = SamplingConfig(
        temperature=1.1,
        temperature_last=True,
        xtc_threshold=0.1,
        xtc_probability=0.5,
        dry_multiplier=0.8,
        typical_p=0.9,
        mirostat_mode=2,
        logit_bias={5: -math.inf, 7: 2.5},
        sampler_order=("xtc", "dry"),
        banned_strings=("shivers down",),
        seed=3,
    )
    check_request(GenerationRequest(prompt="Hi", sampling=rp), tiny_llama, CAPABILITIES)
    assert needs_pipeline(rp)
    assert not needs_pipeline(SamplingConfig(temperature=0.7, top_k=40, min_p=0.1, seed=1))
    state = SamplerState.for_request(rp, tiny_llama.tokenizer, 100)
    assert state.dry_breakers  # the newline, colon, quote and asterisk tokens
    config, travelled = decode(encode(rp, state))
    assert config == rp and travelled == state


def test_an_architecture_the_backend_does_not_know_is_refused_before_vllm_starts(
    tmp_path: Path,
) -> None:
    from tiny import tiny_handle

    with pytest.raises(UnsupportedArchitectureError) as refused:
        export_for_vllm(tiny_handle("gemma2"), root=tmp_path)
    assert "gemma2" in refused.value.message and "--backend hf" in refused.value.message
    assert not any(tmp_path.iterdir())  # nothing written


def test_export_writes_once_and_is_found_by_weight_hash(
    tiny_llama: ModelHandle, tmp_path: Path
) -> None:
    first = export_for_vllm(tiny_llama, root=tmp_path)
    assert (first / "model.safetensors").exists() and (first / "config.json").exists()
    assert tiny_llama.weight_hash[:32] in first.name
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert export_for_vllm(tiny_llama, root=tmp_path) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no staging left behind
