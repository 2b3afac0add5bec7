"""Gated interventions (steer.gates) on tiny random models: exactness, scopes, per-row state."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from steer import (
    Ablate,
    Add,
    Condition,
    Gated,
    GateScope,
    InvalidArgumentError,
    Phase,
    SteeringVector,
)
from steer.activations import forward
from steer.generation import Engine, GenerationEvent, GenerationRequest, GenerationResult
from steer.interventions import Intervention
from steer.models import ModelHandle
from steer.sampling import SamplingConfig

GREEDY = SamplingConfig.greedy_config()
BASE = GenerationRequest(sampling=GREEDY, max_new_tokens=8, top_logprobs=5)
PROMPTS = ("The quick brown fox", "How do I bake bread at home?")
CONDITION_HOOK = "blocks.1.hook_resid_post"


def _vector(handle: ModelHandle, seed: int, scale: float = 1.0) -> SteeringVector:
    generator = torch.Generator().manual_seed(seed)
    return SteeringVector.from_shared(torch.randn(handle.d_model, generator=generator) * scale)


def _condition(handle: ModelHandle, threshold: float, below: bool = False) -> Condition:
    return Condition(CONDITION_HOOK, _vector(handle, 7), threshold, below)


def _inner(handle: ModelHandle) -> Add:
    """A strong addition at the condition's hook and the last layer's output."""
    last = handle.num_layers - 1
    return Add(_vector(handle, 3, 4.0), 1.0, (CONDITION_HOOK, f"blocks.{last}.hook_resid_post"))


def _run(
    handle: ModelHandle, interventions: tuple[Intervention, ...]
) -> list[list[GenerationEvent]]:
    """Each prompt alone: its events."""
    return [
        list(Engine(handle).generate([replace(BASE, prompt=p, interventions=interventions)]))
        for p in PROMPTS
    ]


def _tokens(events: list[GenerationEvent]) -> list[int]:
    return [token for event in events for token in event.token_ids]


def _logprobs(events: list[GenerationEvent]) -> list[tuple[tuple[int, float], ...]]:
    return [event.top_logprobs for event in events]


@pytest.mark.parametrize("scope", list(GateScope))
def test_a_gate_that_never_fires_is_bit_identical_to_no_intervention(
    tiny: ModelHandle, scope: GateScope
) -> None:
    gated = Gated(_condition(tiny, 1e6), _inner(tiny), scope)
    for plain, steered in zip(_run(tiny, ()), _run(tiny, (gated,)), strict=True):
        assert _tokens(steered) == _tokens(plain)
        assert _logprobs(steered) == _logprobs(plain)
    if scope is GateScope.REPLY:
        return  # forward() refuses reply gates: they need the engine's drawn reply
    ids = [list(tiny.tokenizer(p)["input_ids"]) for p in PROMPTS]
    plain_logits = forward(tiny, ids, logits="all").logits
    gated_logits = forward(tiny, ids, interventions=(gated,), logits="all").logits
    assert plain_logits is not None and gated_logits is not None
    for a, b in zip(plain_logits, gated_logits, strict=True):
        assert torch.equal(a, b)


def _assert_close(ours: list[GenerationEvent], theirs: list[GenerationEvent]) -> None:
    assert _tokens(ours) == _tokens(theirs)
    for a, b in zip(_logprobs(ours), _logprobs(theirs), strict=True):
        assert [i for i, _ in a] == [i for i, _ in b]
        for (_, x), (_, y) in zip(a, b, strict=True):
            assert abs(x - y) <= 1e-5 * max(1.0, abs(y))


@pytest.mark.parametrize("scope", list(GateScope))
def test_a_gate_that_always_fires_equals_the_ungated_intervention(
    tiny: ModelHandle, scope: GateScope
) -> None:
    last = tiny.num_layers - 1
    inners: list[Intervention] = [
        _inner(tiny),
        Ablate(_vector(tiny, 4), layers=(2, last)),
    ]
    for inner in inners:
        gated = Gated(_condition(tiny, -1e6), inner, scope)
        for ungated, steered in zip(_run(tiny, (inner,)), _run(tiny, (gated,)), strict=True):
            _assert_close(steered, ungated)
    # the inner addition is strong enough to show: a gate that dropped it would fail above
    assert _logprobs(_run(tiny, (_inner(tiny),))[1]) != _logprobs(_run(tiny, ())[1])


def test_below_flips_the_comparison(tiny_llama: ModelHandle) -> None:
    never = Gated(_condition(tiny_llama, -1e6, below=True), _inner(tiny_llama))
    always = Gated(_condition(tiny_llama, 1e6, below=True), _inner(tiny_llama))
    plain, ungated = _run(tiny_llama, ()), _run(tiny_llama, (_inner(tiny_llama),))
    for events, steered in zip(plain, _run(tiny_llama, (never,)), strict=True):
        assert _logprobs(steered) == _logprobs(events)
    for events, steered in zip(ungated, _run(tiny_llama, (always,)), strict=True):
        _assert_close(steered, events)


def test_token_gate_edits_exactly_the_tokens_whose_projection_passes(
    tiny_llama: ModelHandle,
) -> None:
    handle = tiny_llama
    ids = [list(handle.tokenizer(PROMPTS[1])["input_ids"])]
    plain = forward(handle, ids, hooks=[CONDITION_HOOK], positions="all")
    residual = plain.activations[CONDITION_HOOK][0]  # (T, D)
    assert isinstance(residual, torch.Tensor)
    unit = _vector(handle, 7).at(1)
    unit = unit / unit.norm()
    projection = residual @ unit
    threshold = float(projection.median())
    fires = projection > threshold
    assert 0 < int(fires.sum()) < len(fires)
    vector = _vector(handle, 3, 4.0)
    gated = Gated(
        Condition(CONDITION_HOOK, _vector(handle, 7), threshold),
        Add(vector, 1.0, (CONDITION_HOOK,)),
    )
    steered = forward(handle, ids, interventions=(gated,), hooks=[CONDITION_HOOK], positions="all")
    edited = steered.activations[CONDITION_HOOK][0]
    assert isinstance(edited, torch.Tensor)
    expected = residual + fires[:, None].float() * vector.at(1)
    torch.testing.assert_close(edited, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(edited[~fires], residual[~fires])


def test_token_gate_while_decoding_equals_the_gate_over_the_whole_text(
    tiny_llama: ModelHandle,
) -> None:
    """The KV-cached decode steps gate each new token as one pass over prompt + reply does."""
    handle = tiny_llama
    ids = list(handle.tokenizer(PROMPTS[0])["input_ids"])
    plain = forward(handle, [ids], hooks=[CONDITION_HOOK], positions="all")
    residual = plain.activations[CONDITION_HOOK][0]
    assert isinstance(residual, torch.Tensor)
    unit = _vector(handle, 7).at(1)
    threshold = float((residual @ (unit / unit.norm())).median())
    gated = Gated(Condition(CONDITION_HOOK, _vector(handle, 7), threshold), _inner(handle))
    request = replace(BASE, prompt_ids=tuple(ids), interventions=(gated,), max_new_tokens=12)
    reply = list(Engine(handle).run([request])[0].token_ids)
    logits = forward(handle, [ids + reply], interventions=(gated,), logits="all").logits
    assert logits is not None
    predicted = logits[0][len(ids) - 1 : -1].argmax(-1).tolist()
    assert predicted == reply


def _last_projections(handle: ModelHandle, direction: SteeringVector) -> list[float]:
    ids = [list(handle.tokenizer(p)["input_ids"]) for p in PROMPTS]
    last = forward(handle, ids, hooks=[CONDITION_HOOK]).activations[CONDITION_HOOK]
    assert isinstance(last, torch.Tensor)
    unit = direction.at(1) / direction.at(1).norm()
    return (last @ unit).tolist()


def _prompt_gate(handle: ModelHandle, inner: Intervention) -> Gated:
    """A prompt gate between the two prompts' last-token projections: fires for exactly one."""
    direction = _vector(handle, 7)
    first, second = _last_projections(handle, direction)
    assert first != second
    return Gated(
        Condition(CONDITION_HOOK, direction, (first + second) / 2), inner, GateScope.PROMPT
    )


def test_prompt_gate_is_decided_per_row_and_held_through_decoding(
    tiny_llama: ModelHandle,
) -> None:
    handle = tiny_llama
    # before the condition's hook: acts from the first generated token on, on every one of them
    inner = Add(_vector(handle, 3, 4.0), 1.0, ("blocks.0.hook_resid_post",), Phase.GENERATED)
    gated = _prompt_gate(handle, inner)
    first, second = _last_projections(handle, _vector(handle, 7))
    fired_index = 0 if first > second else 1
    requests = [replace(BASE, prompt=p, interventions=(gated,)) for p in PROMPTS]
    together = Engine(handle, max_batch=4).run(requests)
    alone = [Engine(handle).run([r])[0] for r in requests]
    plain = [
        r.token_ids for r in Engine(handle).run([replace(r, interventions=()) for r in requests])
    ]
    ungated = Engine(handle).run([replace(requests[fired_index], interventions=(inner,))])[0]
    for index in range(2):
        assert together[index].token_ids == alone[index].token_ids
    assert alone[1 - fired_index].token_ids == plain[1 - fired_index]
    assert alone[fired_index].token_ids == ungated.token_ids
    assert ungated.token_ids != plain[fired_index]


@pytest.mark.parametrize("phase", [Phase.ALL, Phase.PROMPT])
def test_a_fired_prompt_gate_runs_as_its_edit_always_on_prompt_included(
    tiny_llama: ModelHandle, phase: Phase
) -> None:
    """An edit before the condition's hook cannot act in the pass that decides the gate, so the
    engine runs the prompt pass again for rows whose gate fired: such a row equals the edit
    always on (its prompt included), the other row equals no edit, batched or alone; the
    teacher-forced KL path does the same."""
    from steer.directions.scores import _continuation_logits

    handle = tiny_llama
    inner = Add(_vector(handle, 3, 4.0), 1.0, ("blocks.0.hook_resid_post",), phase)
    gated = _prompt_gate(handle, inner)
    first, second = _last_projections(handle, _vector(handle, 7))
    fired = 0 if first > second else 1
    requests = [replace(BASE, prompt=p, interventions=(gated,)) for p in PROMPTS]
    together = Engine(handle, max_batch=4).run(requests)
    always = Engine(handle).run([replace(requests[fired], interventions=(inner,))])[0]
    plain = Engine(handle).run([replace(requests[1 - fired], interventions=())])[0]
    assert together[fired].token_ids == always.token_ids
    assert together[1 - fired].token_ids == plain.token_ids
    alone = list(Engine(handle).generate([requests[fired]]))
    ungated = list(Engine(handle).generate([replace(requests[fired], interventions=(inner,))]))
    for steered, reference in zip(_logprobs(alone), _logprobs(ungated), strict=True):
        assert [t for t, _ in steered] == [t for t, _ in reference]
        assert [v for _, v in steered] == pytest.approx([v for _, v in reference], abs=1e-5)
    ids = [list(handle.tokenizer(p)["input_ids"]) for p in PROMPTS]
    continuation = [list(always.token_ids)]
    teacher_gated = _continuation_logits(handle, [ids[fired]], continuation, (gated,))[0]
    teacher_always = _continuation_logits(handle, [ids[fired]], continuation, (inner,))[0]
    torch.testing.assert_close(teacher_gated, teacher_always, rtol=1e-5, atol=1e-5)


def test_prompt_gate_decisions_follow_their_requests_through_replans(
    tiny_llama: ModelHandle,
) -> None:
    """Rows join and leave while decisions are held: each row still equals itself alone."""
    handle = tiny_llama
    inner = Add(_vector(handle, 3, 4.0), 1.0, ("blocks.0.hook_resid_post",), Phase.GENERATED)
    gated = _prompt_gate(handle, inner)
    requests = [
        replace(BASE, prompt=PROMPTS[1], interventions=(gated,), max_new_tokens=2),
        replace(BASE, prompt=PROMPTS[0], interventions=(gated,), max_new_tokens=12),
        replace(BASE, prompt=PROMPTS[1], interventions=(gated,), max_new_tokens=10),
        replace(BASE, prompt=PROMPTS[0], interventions=(gated,), max_new_tokens=6),
    ]
    engine = Engine(handle, max_batch=3)
    events: dict[str, list[GenerationEvent]] = {}
    ids = [engine.submit(requests[0]), engine.submit(requests[1])]
    for _ in range(3):
        for event in engine.step():
            events.setdefault(event.request_id, []).append(event)
    ids += [engine.submit(requests[2]), engine.submit(requests[3])]
    while engine.has_work:
        for event in engine.step():
            events.setdefault(event.request_id, []).append(event)
    for request_id, request in zip(ids, requests, strict=True):
        alone: GenerationResult = Engine(handle).run([request])[0]
        assert _tokens(events[request_id]) == list(alone.token_ids)


def _submit_error(handle: ModelHandle, gated_factory) -> InvalidArgumentError:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidArgumentError) as raised:
        Engine(handle).submit(replace(BASE, prompt="hi", interventions=(gated_factory(),)))
    return raised.value


@pytest.mark.parametrize("threshold", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_threshold_is_refused(tiny_llama: ModelHandle, threshold: float) -> None:
    with pytest.raises(InvalidArgumentError) as raised:
        Condition(CONDITION_HOOK, _vector(tiny_llama, 7), threshold)
    assert raised.value.field == "condition.threshold"


def test_bad_gates_name_their_field(tiny_llama: ModelHandle) -> None:
    handle = tiny_llama
    inner = _inner(handle)
    zero = torch.zeros(handle.d_model)
    cases = {
        "condition.direction": [
            lambda: Gated(Condition(CONDITION_HOOK, zero, 0.0), inner),
            lambda: Gated(Condition(CONDITION_HOOK, torch.ones(handle.d_model + 1), 0.0), inner),
            lambda: Gated(Condition(CONDITION_HOOK, torch.ones(2, handle.d_model), 0.0), inner),
            lambda: Gated(
                Condition(CONDITION_HOOK, torch.full((handle.d_model,), math.nan), 0), inner
            ),
            lambda: Gated(
                Condition(CONDITION_HOOK, SteeringVector(per_layer={0: zero + 1}), 0.0), inner
            ),
        ],
        "condition.hook": [
            lambda: Gated(Condition("blocks.99.hook_resid_post", zero + 1, 0.0), inner),
            lambda: Gated(Condition("resid", zero + 1, 0.0), inner),
        ],
        "inner.hooks": [
            lambda: Gated(
                Condition(CONDITION_HOOK, zero + 1, 0.0),
                Add(_vector(handle, 3), 1.0, ("blocks.0.hook_resid_post",)),
            ),
            lambda: Gated(
                Condition(CONDITION_HOOK, zero + 1, 0.0),
                Add(_vector(handle, 3), 1.0, ("blocks.1.hook_resid_pre",)),
            ),
        ],
        "inner.layers": [
            lambda: Gated(Condition(CONDITION_HOOK, zero + 1, 0.0), Ablate(_vector(handle, 3))),
        ],
        "inner.strength": [
            lambda: Gated(
                Condition(CONDITION_HOOK, zero + 1, 0.0),
                Add(_vector(handle, 3, 1e37), 1000.0, (CONDITION_HOOK,)),
            ),
        ],
    }
    for field, factories in cases.items():
        for factory in factories:
            assert _submit_error(handle, factory).field == field
    with pytest.raises(InvalidArgumentError) as raised:
        Gated(_condition(handle, 0.0), inner, "sometimes")  # type: ignore[arg-type]
    assert raised.value.field == "scope"
    with pytest.raises(InvalidArgumentError) as raised:
        Gated(_condition(handle, 0.0), Gated(_condition(handle, 0.0), inner))
    assert raised.value.field == "inner"


def test_a_prompt_gate_may_act_on_the_reply_before_its_condition(tiny_llama: ModelHandle) -> None:
    handle = tiny_llama
    inner = Ablate(_vector(handle, 3))  # every layer, some before the condition's hook
    gated = Gated(_condition(handle, -1e6), inner, GateScope.PROMPT)
    result = Engine(handle).run([replace(BASE, prompt=PROMPTS[0], interventions=(gated,))])[0]
    assert len(result.token_ids) == BASE.max_new_tokens


def test_an_sae_slider_is_gated_like_the_others(tiny_llama: ModelHandle) -> None:
    from sae_lens import StandardSAE, StandardSAEConfig

    from steer.sae import SparseAutoencoder, feature_slider

    torch.manual_seed(0)
    config = StandardSAEConfig(d_in=tiny_llama.d_model, d_sae=16)
    sae = SparseAutoencoder(StandardSAE(config), CONDITION_HOOK)
    with torch.no_grad():
        for parameter in sae.sae.parameters():
            parameter.normal_(0.0, 0.5)
    slider = feature_slider("clamp", sae, 3, 20.0, Phase.ALL)
    plain, ungated = _run(tiny_llama, ()), _run(tiny_llama, (slider,))
    assert _logprobs(ungated[0]) != _logprobs(plain[0])
    for scope in GateScope:
        never = Gated(_condition(tiny_llama, 1e6), slider, scope)
        always = Gated(_condition(tiny_llama, -1e6), slider, scope)
        for events, steered in zip(plain, _run(tiny_llama, (never,)), strict=True):
            assert _logprobs(steered) == _logprobs(events)
        for events, steered in zip(ungated, _run(tiny_llama, (always,)), strict=True):
            _assert_close(steered, events)


def test_teacher_forced_logits_of_a_prompt_gate_equal_the_engines(tiny: ModelHandle) -> None:
    """The KL of steer eval runs a prompt gate as generation does: decided in the prompt pass,
    then held over the continuation as generated tokens. The addition sits before the
    condition's hook, so it acts on generated tokens only; one pass over prompt + continuation
    (the old measurement) would never apply it."""
    from steer.directions.scores import _continuation_logits, multi_token_kl

    early = Add(_vector(tiny, 3, 4.0), 1.0, ("blocks.0.hook_resid_post",))
    gated = Gated(_condition(tiny, -1e6), early, GateScope.PROMPT)
    ids = [list(tiny.tokenizer(p)["input_ids"]) for p in PROMPTS]
    tokens = []
    for prompt in ids:
        request = replace(BASE, prompt_ids=tuple(prompt), interventions=(gated,))
        events = list(Engine(tiny).generate([request]))
        tokens.append(_tokens(events))
        logits = _continuation_logits(tiny, [prompt], [tokens[-1]], (gated,))[0]
        logprobs = torch.log_softmax(logits, -1)
        assert logits.argmax(-1).tolist() == tokens[-1]  # the engine's greedy choices
        for position, top in enumerate(_logprobs(events)):
            for token, value in top:
                assert float(logprobs[position, token]) == pytest.approx(value, abs=1e-4)
    plain = _continuation_logits(tiny, ids, tokens, ())
    assert any(
        not torch.allclose(a, b)
        for a, b in zip(plain, _continuation_logits(tiny, ids, tokens, (gated,)), strict=True)
    )
    never = Gated(_condition(tiny, 1e6), early, GateScope.PROMPT)
    assert multi_token_kl(tiny, ids, tokens, (never,)) == (0.0, 0.0)
