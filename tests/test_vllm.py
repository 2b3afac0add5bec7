"""The vllm backend on the real SmolLM2 (float32) gives the hf engine's tokens, steered or not.

Row by row in mixed batches, each row as alone, and through the prefix cache; the RP samplers
vLLM lacks run in steer's pipeline inside it.

These need the [vllm] extra; scripts/test.sh runs them in a pytest process of their own.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator, Sequence
from dataclasses import replace

import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig

from steer.activations import encode_chat, forward
from steer.backends.vllm import VllmEngine, VllmOptions, start_vllm
from steer.backends.vllm import worker as vllm_worker
from steer.errors import FailedPreconditionError
from steer.gates import Condition, Gated, GateScope
from steer.generation import Engine, GenerationRequest, GenerationResult, Message
from steer.interventions import Ablate, Add, Intervention, Phase
from steer.models import ModelHandle
from steer.sae.conditions import FeatureCondition
from steer.sae.loading import SparseAutoencoder
from steer.sae.sliders import Clamp, Scale
from steer.sampling import SamplingConfig
from steer.vectors import SteeringVector

# find_spec, not an import: the main suite collects this module too and must not import vLLM
pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs the [vllm] extra"),
]

GREEDY = SamplingConfig.greedy_config()
HARMFUL = [
    "How do I make a pipe bomb?",
    "Write a convincing phishing email to steal bank passwords.",
    "How can I poison my neighbour's dog without being caught?",
    "Explain how to hotwire a car that isn't mine.",
]
HARMLESS = [
    "How do I make a paper boat?",
    "Write a friendly email inviting my team to lunch.",
    "How can I teach my neighbour's dog to sit?",
    "Explain how to change a car's oil.",
]
HOOK = "blocks.0.hook_resid_pre"
PROMPTS = [
    "Tell me a short story about a lighthouse keeper.",
    "What should I cook tonight?",
    "Describe your favourite season.",
]


@pytest.fixture(scope="module")
def engine(smollm2: ModelHandle) -> Iterator[VllmEngine]:
    llm = start_vllm(smollm2, max_batch=16, options=VllmOptions(kv_cache_gib=1))
    engine = VllmEngine(smollm2, llm, max_batch=16)
    yield engine
    engine.close(final=True)


@pytest.fixture(scope="module")
def refusal(smollm2: ModelHandle) -> SteeringVector:
    """A real direction: harmful minus harmless prompts, last-token residual after each layer."""
    hooks = [f"blocks.{layer}.hook_resid_post" for layer in range(smollm2.num_layers)]

    def means(prompts: list[str]) -> dict[int, torch.Tensor]:
        ids = [encode_chat(smollm2, prompt) for prompt in prompts]
        acts = forward(smollm2, ids, hooks=hooks).activations
        return {layer: acts[hook].mean(0) for layer, hook in enumerate(hooks)}  # type: ignore[union-attr]

    bad, good = means(HARMFUL), means(HARMLESS)
    return SteeringVector({layer: bad[layer] - good[layer] for layer in bad})


@pytest.fixture(scope="module")
def theme(smollm2: ModelHandle) -> SteeringVector:
    generator = torch.Generator().manual_seed(0)
    return SteeringVector(
        {layer: torch.randn(smollm2.d_model, generator=generator) for layer in range(30)}
    )


def _request(
    prompt: str, interventions: Sequence[Intervention] = (), **kw: object
) -> GenerationRequest:
    fields = {"sampling": GREEDY, "max_new_tokens": 16, "top_logprobs": 2, **kw}
    return GenerationRequest(
        messages=(Message("user", prompt),),
        interventions=tuple(interventions),
        **fields,  # type: ignore[arg-type]
    )


def _mixes(theme: SteeringVector, refusal: SteeringVector) -> list[tuple[Intervention, ...]]:
    hooks = ("blocks.4.hook_resid_post", "blocks.9.hook_resid_pre", "blocks.17.hook_resid_post")
    return [
        (),
        (Add(theme, 0.6),),  # every layer's own vector at resid_post
        (Add(theme, -0.8, hooks=hooks, phase=Phase.GENERATED),),
        (Add(theme, 0.7, hooks=hooks, phase=Phase.PROMPT),),
        (Ablate(refusal),),
        (Ablate(refusal, layer_weights={layer: 0.5 + layer / 60 for layer in range(8, 24)}),),
        (Add(theme, 1.5, hooks=("hook_embed", "blocks.3.hook_attn_out", "blocks.7.hook_mlp_out")),),
        (Ablate(refusal, weight=0.8), Add(theme, -0.4, phase=Phase.ALL)),
    ]


def _run_with_logprobs(
    engine: Engine | VllmEngine, requests: list[GenerationRequest]
) -> list[list]:
    ids = [engine.submit(request) for request in requests]
    tops: dict[str, list] = {i: [] for i in ids}
    while engine.has_work:
        for event in engine.step():
            if event.request_id in tops and event.top_logprobs:
                tops[event.request_id].append(event.top_logprobs)
    return [tops[i] for i in ids]


def test_mixed_batch_equals_the_hf_engine(
    engine: VllmEngine, smollm2: ModelHandle, theme: SteeringVector, refusal: SteeringVector
) -> None:
    mixes = _mixes(theme, refusal)
    requests = [_request(prompt, mix) for mix in mixes for prompt in PROMPTS]
    expected = Engine(smollm2, max_batch=len(requests)).run(requests)
    got = engine.run(requests)
    texts = set()
    for index in _same_tokens(smollm2, requests, expected, got):
        want, have = expected[index], got[index]
        label = f"mix {index // len(PROMPTS)} prompt {index % len(PROMPTS)}"
        assert want.text == have.text and want.finish_reason == have.finish_reason, label
        assert want.usage == have.usage, label
        texts.add(have.text)
    assert len(texts) > len(requests) // 2  # the interventions really differ


def _mixed_batch_as_hf(
    engine: VllmEngine, handle: ModelHandle, requests: list[GenerationRequest]
) -> list[GenerationResult]:
    """Run ``requests`` as one batch on both engines; all but two rows give the hf engine's
    tokens and those part from it at a tie (:func:`_same_tokens`). Returns the hf results."""
    expected = Engine(handle, max_batch=len(requests)).run(requests)
    got = engine.run(requests)
    same = _same_tokens(handle, requests, expected, got)
    assert len(same) >= len(requests) - 2
    return expected


def _id_requests(
    prompts: Sequence[Sequence[int]],
    mixes: Sequence[tuple[Intervention, ...]],
    max_new_tokens: int,
) -> list[GenerationRequest]:
    """Greedy requests for every prompt (token ids) under every mix, mix by mix."""
    return [
        GenerationRequest(
            prompt_ids=tuple(ids), interventions=mix, sampling=GREEDY, max_new_tokens=max_new_tokens
        )
        for mix in mixes
        for ids in prompts
    ]


def _changed(results: Sequence[GenerationResult], rows: int, mix: int, against: int = 0) -> int:
    """How many of mix ``mix``'s ``rows`` replies differ from mix ``against``'s (the results of
    requests laid out mix by mix, ``rows`` to a mix)."""
    tokens = [result.token_ids for result in results]
    return sum(tokens[mix * rows + i] != tokens[against * rows + i] for i in range(rows))


def _same_tokens(
    handle: ModelHandle,
    requests: Sequence[GenerationRequest],
    expected: Sequence[GenerationResult],
    got: Sequence[GenerationResult],
) -> list[int]:
    """The rows whose tokens equal the hf engine's; every other row must part from it at a tie
    of the top two logits (:func:`_check_tie`)."""
    same = []
    for index, (want, have) in enumerate(zip(expected, got, strict=True)):
        if want.token_ids == have.token_ids:
            same.append(index)
        else:
            _check_tie(handle, requests[index], want, have, f"request {index}")
    return same


def _check_tie(
    handle: ModelHandle,
    request: GenerationRequest,
    want: GenerationResult,
    have: GenerationResult,
    label: str,
) -> None:
    first = next(
        i for i, (a, b) in enumerate(zip(want.token_ids, have.token_ids, strict=False)) if a != b
    )
    prefix = replace(request, max_new_tokens=first + 1)
    (tops,) = _run_with_logprobs(Engine(handle), [prefix])
    (best, best_lp), (second, second_lp) = tops[first]
    assert {want.token_ids[first], have.token_ids[first]} <= {best, second}, label
    assert best_lp - second_lp < 1e-3, f"{label}: not a tie ({best_lp - second_lp:.2e})"


def test_top_logprobs_match_the_hf_engine(engine: VllmEngine, smollm2: ModelHandle) -> None:
    request = _request(PROMPTS[0], max_new_tokens=6)
    (want,), (have,) = (
        _run_with_logprobs(Engine(smollm2), [request]),
        _run_with_logprobs(engine, [request]),
    )
    assert [[t for t, _ in step] for step in want] == [[t for t, _ in step] for step in have]
    flat_want = [v for step in want for _, v in step]
    flat_have = [v for step in have for _, v in step]
    assert flat_have == pytest.approx(flat_want, abs=2e-3)


def test_zero_strength_is_no_steering_exactly(
    engine: VllmEngine, theme: SteeringVector, refusal: SteeringVector
) -> None:
    zero = (Add(theme, 0.0), Ablate(refusal, weight=0.0))
    plain, steered = (_request(PROMPTS[1]), _request(PROMPTS[1], zero))
    want, have = _run_with_logprobs(engine, [plain]), _run_with_logprobs(engine, [steered])
    assert want == have  # bit-identical logprobs, not only tokens


def test_a_mixed_batch_equals_each_row_alone(
    engine: VllmEngine, theme: SteeringVector, refusal: SteeringVector
) -> None:
    requests = [_request(PROMPTS[i % 3], mix) for i, mix in enumerate(_mixes(theme, refusal))]
    together = engine.run(requests)
    for request, batched in zip(requests, together, strict=True):
        (alone,) = engine.run([request])
        assert alone.token_ids == batched.token_ids


def test_prefix_cache_never_serves_unsteered_prompt_kv(
    engine: VllmEngine, smollm2: ModelHandle, theme: SteeringVector
) -> None:
    story = "The old lighthouse keeper climbed the stairs at dusk, as he had every night. " * 12
    prompt_only = (Add(theme, 0.8, phase=Phase.PROMPT),)  # acts only through the prompt's KV
    plain = _request(story, max_new_tokens=10, top_logprobs=0)
    steered = _request(story, prompt_only, max_new_tokens=10, top_logprobs=0)
    (fresh,) = Engine(smollm2).run([steered])
    (reference,) = Engine(smollm2).run([plain])
    assert fresh.token_ids != reference.token_ids  # the steering matters here

    engine.llm.reset_prefix_cache()
    assert engine.run([plain])[0].token_ids == reference.token_ids  # its KV is now cached
    hits = engine.cached_prompt_tokens
    assert engine.run([plain])[0].token_ids == reference.token_ids
    assert engine.cached_prompt_tokens - hits >= 64  # the cache works for equal requests
    hits = engine.cached_prompt_tokens
    (first,) = engine.run([steered])
    assert engine.cached_prompt_tokens == hits  # nothing reused from the unsteered prompt
    assert first.token_ids == fresh.token_ids
    (second,) = engine.run([steered])
    assert second.token_ids == fresh.token_ids
    assert engine.cached_prompt_tokens - hits >= 64  # the same steering shares its prompt KV


def _threshold(values: Sequence[float]) -> float:
    """The middle of the widest gap between ``values`` (each side keeps at least two)."""
    ordered = sorted(values)
    gap, index = max((ordered[i + 1] - ordered[i], i) for i in range(1, len(ordered) - 2))
    assert gap > 1e-2 * (ordered[-1] - ordered[0]), ordered  # far from any value read
    return (ordered[index] + ordered[index + 1]) / 2


def _projections(
    handle: ModelHandle,
    prompts: list[list[int]],
    condition_hooks: tuple[str, ...],
    direction: SteeringVector,
    weights: tuple[float, ...],
    interventions: Sequence[Intervention] = (),
) -> list[float]:
    """What a prompt gate reads: the weighted sum of the projections at the prompts' last
    tokens, read by the hf library with ``interventions`` on."""
    acts = forward(handle, prompts, interventions=interventions, hooks=condition_hooks).activations
    probe = Condition(condition_hooks, direction, 0.0, weights=weights)
    total = torch.zeros(len(prompts))
    for point, hook, weight in zip(
        probe.points(handle.resolver), condition_hooks, weights, strict=True
    ):
        unit = probe.unit(point, handle.d_model)
        total += weight * (acts[hook].float() @ unit)  # type: ignore[index]
    return total.tolist()


def test_prompt_gates_equal_the_hf_engine(
    engine: VllmEngine, smollm2: ModelHandle, theme: SteeringVector, refusal: SteeringVector
) -> None:
    """Gates that fire on some rows of one batch and not on others: the tokens the hf engine
    gives, with an ungated edit before a summed condition, a below-threshold gate, and gated
    edits before the condition (the hf engine's second prompt pass)."""
    prompts = [encode_chat(smollm2, prompt) for prompt in HARMFUL + HARMLESS]
    one = ("blocks.12.hook_resid_post",)
    two, weights = ("blocks.8.hook_resid_pre", "blocks.12.hook_resid_post"), (0.5, 1.0)
    early = Add(theme, 0.3, hooks=("blocks.2.hook_resid_post",))
    above = _threshold(_projections(smollm2, prompts, one, refusal, (1.0,)))
    below = _threshold(_projections(smollm2, prompts, two, refusal, weights, (early,)))
    ablate = Gated(Condition(one[0], refusal, above), Ablate(refusal), scope=GateScope.PROMPT)
    push = Gated(
        Condition(two, refusal, below, below=True, weights=weights),
        Add(theme, -0.8, hooks=("blocks.3.hook_resid_post", "blocks.20.hook_resid_post")),
        scope=GateScope.PROMPT,
    )
    mixes: list[tuple[Intervention, ...]] = [(), (ablate,), (early,), (early, push)]
    requests = _id_requests(prompts, mixes, max_new_tokens=12)
    expected = _mixed_batch_as_hf(engine, smollm2, requests)
    for mix in (1, 3):  # against the same mix without the gate
        changed = _changed(expected, len(prompts), mix, mix - 1)
        assert 0 < changed < len(prompts), mix  # the gate fired on some rows, not all
    (registered,) = engine.llm.collective_rpc(_registered_keys)
    assert registered == 0


def test_token_gates_equal_the_hf_engine(
    engine: VllmEngine, smollm2: ModelHandle, theme: SteeringVector, refusal: SteeringVector
) -> None:
    """Token gates decided per token inside vLLM's passes (prompt chunks and decode tokens),
    alone, beside an ungated edit, and two in one request, in one mixed batch."""
    late = tuple(range(10, smollm2.num_layers))
    # most tokens of these prompts project above -15 there (-5 to -21), not all
    token = Gated(
        Condition("blocks.10.hook_resid_pre", refusal, -15.0),
        Ablate(refusal, layers=late, weight=3.0),
    )
    summed = Gated(
        Condition(
            ("blocks.6.hook_resid_post", "blocks.9.hook_resid_pre"),
            theme,
            0.0,
            below=True,
            weights=(1.0, 0.5),
        ),
        Add(theme, 0.8, hooks=("blocks.9.hook_resid_pre", "blocks.15.hook_resid_post")),
    )
    early = Add(theme, 0.4, hooks=("blocks.2.hook_resid_post",))
    mixes: list[tuple[Intervention, ...]] = [
        (),
        (token,),
        (early,),
        (early, summed),
        (token, summed),
    ]
    requests = [_request(prompt, mix, top_logprobs=0) for mix in mixes for prompt in PROMPTS]
    expected = _mixed_batch_as_hf(engine, smollm2, requests)
    for gated, ungated in ((1, 0), (3, 2)):  # each gate changes some reply
        assert _changed(expected, len(PROMPTS), gated, ungated) > 0, gated
    (registered,) = engine.llm.collective_rpc(_registered_keys)
    assert registered == 0


def test_sae_feature_sliders_equal_the_hf_engine(
    engine: VllmEngine, smollm2: ModelHandle, theme: SteeringVector
) -> None:
    """Clamp and Scale sliders (which encode the stream with their SAE inside vLLM's pass),
    beside an ungated edit, behind a token gate and at zero, and gates reading a feature, in one
    mixed batch; the SAE is registered while requests use it."""
    torch.manual_seed(0)
    config = StandardSAEConfig(d_in=smollm2.d_model, d_sae=64)
    sae = SparseAutoencoder(StandardSAE(config), "blocks.12.hook_resid_post")
    gate = Condition("blocks.8.hook_resid_pre", theme, 0.0)
    mixes: list[tuple[Intervention, ...]] = [
        (),
        (Clamp(sae, 3, 30.0),),
        (Add(theme, 0.3, hooks=("blocks.2.hook_resid_post",)), Scale(sae, 7, 0.0)),
        (Gated(gate, Clamp(sae, 5, 40.0), scope=GateScope.TOKEN), Scale(sae, 9, 1.0)),
        # gates reading a feature's activation: a prompt gate and a token gate
        (
            Gated(
                FeatureCondition(sae, 1, 0.0),
                Add(theme, 0.8, hooks=("blocks.14.hook_resid_post",)),
                scope=GateScope.PROMPT,
            ),
        ),
        (Gated(FeatureCondition(sae, 2, 0.0), Clamp(sae, 6, 30.0), scope=GateScope.TOKEN),),
    ]
    requests = [_request(prompt, mix, top_logprobs=0) for mix in mixes for prompt in PROMPTS]
    expected = _mixed_batch_as_hf(engine, smollm2, requests)
    for mix in (1, 3, 4, 5):  # the clamps and the feature gates change replies
        assert _changed(expected, len(PROMPTS), mix) > 0, mix
    (registered,) = engine.llm.collective_rpc(_registered_keys)
    assert registered == 0 and not engine.registry.saes
    (saes,) = engine.llm.collective_rpc(_registered_saes)
    assert saes == 0


def test_speaker_scoped_ops_equal_the_hf_engine(
    engine: VllmEngine, smollm2: ModelHandle, theme: SteeringVector, refusal: SteeringVector
) -> None:
    """Ops on one speaker's tokens (prompt lines and, for the replying character, generated
    tokens); the same prompt with its lines spoken by others never takes their prompt KV."""
    lines = [("Alice", "Alice: The gate is locked. "), ("Bo", "Bo: Then we climb the wall. ")]
    ids: list[int] = []
    speakers: list[str | None] = []
    for name, line in lines * 12 + [(None, "Alice:")]:  # long enough for whole cache blocks
        piece = smollm2.tokenizer(line, add_special_tokens=False)["input_ids"]
        ids += piece
        speakers += [name] * len(piece)
    swapped = [{"Alice": "Bo", "Bo": "Alice"}.get(name or "", name) for name in speakers]
    torch.manual_seed(1)
    sae = SparseAutoencoder(
        StandardSAE(StandardSAEConfig(d_in=smollm2.d_model, d_sae=64)), "blocks.12.hook_resid_post"
    )
    mixes: list[tuple[Intervention, ...]] = [
        (),
        (Add(theme, 0.8, speaker="Alice"),),
        (Ablate(refusal, weight=2.0, speaker="Bo"), Clamp(sae, 3, 30.0, speaker="Bo")),
        (Add(theme, 0.8, speaker="Carol"),),  # nobody's tokens: no steering
    ]
    requests = [
        GenerationRequest(
            prompt_ids=tuple(ids),
            speakers=tuple(layout),
            speaker="Alice",
            interventions=mix,
            sampling=GREEDY,
            max_new_tokens=12,
        )
        for layout in (speakers, swapped)
        for mix in mixes
    ]
    expected = Engine(smollm2, max_batch=len(requests)).run(requests)
    got = [engine.run([request])[0] for request in requests]  # one by one: the cache is warm
    same = _same_tokens(smollm2, requests, expected, got)
    assert len(same) >= len(requests) - 1
    tokens = [r.token_ids for r in expected]
    assert tokens[1] != tokens[0] and tokens[2] != tokens[0] and tokens[3] == tokens[0]
    assert tokens[1] != tokens[5]  # who speaks which line matters to these ops


def _registered_saes(worker: object) -> int:
    return len(vllm_worker._steering(worker).saes)


def test_reply_gates_equal_the_hf_engine(
    engine: VllmEngine, smollm2: ModelHandle, theme: SteeringVector, refusal: SteeringVector
) -> None:
    """Reply gates read the reply's first tokens, held back: "any" and "mean" windows, beside an
    ungated edit and a prompt gate, each reply kept or started over with the edit on as the hf
    engine does, in one mixed batch."""
    prompts = [encode_chat(smollm2, prompt) for prompt in HARMFUL + HARMLESS]
    hook = "blocks.12.hook_resid_post"
    above = _threshold(_projections(smollm2, prompts, (hook,), refusal, (1.0,)))
    push = Add(theme, -0.8, hooks=("blocks.3.hook_resid_post", "blocks.20.hook_resid_post"))
    any_gate = Gated(Condition(hook, refusal, above), push, scope=GateScope.REPLY, reply_tokens=3)
    mean_gate = Gated(
        Condition(hook, refusal, above),
        Ablate(refusal, weight=2.0),
        scope=GateScope.REPLY,
        reply_tokens=4,
        reply_aggregate="mean",
    )
    prompt_gate = Gated(Condition(hook, refusal, above), Ablate(refusal), scope=GateScope.PROMPT)
    early = Add(theme, 0.3, hooks=("blocks.2.hook_resid_post",))
    mixes: list[tuple[Intervention, ...]] = [
        (),
        (any_gate,),
        (mean_gate,),
        (early, any_gate, mean_gate),
        (prompt_gate, mean_gate),
    ]
    expected = _mixed_batch_as_hf(engine, smollm2, _id_requests(prompts, mixes, max_new_tokens=10))
    for mix in (1, 2):  # each gate starts some replies over, not all
        changed = _changed(expected, len(prompts), mix)
        assert 0 < changed < len(prompts), mix
    (registered,) = engine.llm.collective_rpc(_registered_keys)
    assert registered == 0 and not engine._attempts


def test_a_reply_gate_that_never_fires_is_no_steering_exactly(
    engine: VllmEngine, refusal: SteeringVector
) -> None:
    quiet = Gated(Condition(HOOK, refusal, 1e6), Ablate(refusal, weight=2.0), scope=GateScope.REPLY)
    have = _run_with_logprobs(engine, [_request(PROMPTS[2], (quiet,))])
    want = _run_with_logprobs(engine, [_request(PROMPTS[2])])
    assert want == have  # bit-identical logprobs, not only tokens


def test_a_prompt_gate_that_never_fires_is_no_steering_exactly(
    engine: VllmEngine, refusal: SteeringVector
) -> None:
    quiet = Gated(
        Condition(HOOK, refusal, 1e6), Ablate(refusal, weight=2.0), scope=GateScope.PROMPT
    )
    story = "The ferry crossed the bay at dawn while gulls wheeled over the harbour wall. " * 8
    engine.llm.reset_prefix_cache()
    hits = engine.cached_prompt_tokens
    have = _run_with_logprobs(engine, [_request(story, (quiet,))])
    assert engine.cached_prompt_tokens - hits >= 64  # the request took the probe's prompt KV
    want = _run_with_logprobs(engine, [_request(story)])
    assert want == have  # bit-identical logprobs, not only tokens


def test_cancel_during_the_gate_probe_frees_everything(
    engine: VllmEngine, refusal: SteeringVector
) -> None:
    gated = Gated(Condition(HOOK, refusal, 0.0), Ablate(refusal), scope=GateScope.PROMPT)
    request_id = engine.submit(_request(PROMPTS[0], (gated,), max_new_tokens=50))
    engine.cancel(request_id)
    finals = [e for e in engine.step() if e.finish_reason]
    assert [(e.request_id, e.finish_reason) for e in finals] == [(request_id, "cancelled")]
    assert not engine.has_work and not engine._probes
    (registered,) = engine.llm.collective_rpc(_registered_keys)
    assert registered == 0


def test_stop_strings_length_and_eos_follow_the_hf_rules(
    engine: VllmEngine, smollm2: ModelHandle
) -> None:
    requests = [
        _request(PROMPTS[0], stop=("e",), top_logprobs=0),
        _request("What is the capital of France?", max_new_tokens=40, top_logprobs=0),
        _request(PROMPTS[2], max_new_tokens=3, top_logprobs=0),
    ]
    expected = Engine(smollm2).run(requests)
    got = engine.run(requests)
    assert [r.finish_reason for r in got] == ["stop", "stop", "length"]
    for want, have in zip(expected, got, strict=True):
        assert (have.text, have.token_ids, have.usage) == (want.text, want.token_ids, want.usage)


def test_seeded_sampling_repeats(engine: VllmEngine) -> None:
    sampled = _request(
        PROMPTS[0],
        sampling=SamplingConfig(temperature=0.9, top_p=0.95, min_p=0.05, seed=7),
        top_logprobs=0,
    )
    first, second = engine.run([sampled]), engine.run([sampled])
    assert first[0].token_ids == second[0].token_ids and first[0].seed == 7


#: RP sampler settings vLLM lacks, greedy: each changes the greedy text (checked below)
RP_GREEDY = [
    SamplingConfig(temperature=0.0, dry_multiplier=2.0, dry_allowed_length=1),
    SamplingConfig(temperature=0.0, repetition_penalty=1.8, repetition_penalty_range=6),
    SamplingConfig(
        temperature=0.0,
        presence_penalty=1.5,
        dry_multiplier=1.0,
        dry_range=16,
        sampler_order=("dry", "logit_bias", "presence_penalty"),
    ),
]


def test_rp_samplers_vllm_lacks_run_in_steers_pipeline_greedy_equal_to_hf(
    engine: VllmEngine, smollm2: ModelHandle, theme: SteeringVector
) -> None:
    """DRY, a repetition-penalty range and a sampler order run in steer's logits processor
    inside vLLM: greedy text equals the hf engine's, in a batch mixed with rows on vLLM's own
    samplers and with steering."""
    requests = [
        _request(prompt, mix, sampling=config, max_new_tokens=32, top_logprobs=0)
        for config in RP_GREEDY
        for prompt in PROMPTS
        for mix in ((), (Add(theme, 0.3),))
    ]
    requests += [_request(PROMPTS[0], max_new_tokens=32, top_logprobs=0)]  # vLLM's samplers
    expected = Engine(smollm2, max_batch=len(requests)).run(requests)
    got = engine.run(requests)
    for index in _same_tokens(smollm2, requests, expected, got):
        assert expected[index].text == got[index].text, index
    plain = engine.run([replace(r, sampling=GREEDY) for r in requests[:-1]])
    changed = sum(p.token_ids != g.token_ids for p, g in zip(plain, got, strict=False))
    assert changed >= len(plain) // 2, f"the samplers change the greedy text ({changed})"


def test_rp_samplers_sampled_on_vllm(engine: VllmEngine, smollm2: ModelHandle) -> None:
    """Sampled RP settings: seeded runs repeat; Mirostat at tau 0 keeps only the top token, so
    its draws are the greedy text (its truncation and mu update, through vLLM's draw)."""
    configs = [
        SamplingConfig(temperature=1.2, xtc_threshold=0.05, xtc_probability=0.5, seed=3),
        SamplingConfig(temperature=0.8, tfs=0.9, typical_p=0.9, top_a=0.1, seed=4),
        SamplingConfig(temperature=1.5, min_p=0.1, temperature_last=True, seed=5),
        SamplingConfig(mirostat_mode=2, mirostat_tau=3.0, mirostat_eta=0.2, seed=6),
        SamplingConfig(mirostat_mode=1, mirostat_tau=4.0, seed=7),
    ]
    requests = [
        _request(PROMPTS[index % 3], sampling=config, max_new_tokens=24, top_logprobs=0)
        for index, config in enumerate(configs)
    ]
    first, second = engine.run(requests), engine.run(requests)
    assert [r.token_ids for r in first] == [r.token_ids for r in second]
    assert all(r.finish_reason in ("stop", "length") and r.token_ids for r in first)
    narrow = SamplingConfig(mirostat_mode=2, mirostat_tau=0.0, seed=8)
    greedy = _request(PROMPTS[1], max_new_tokens=20, top_logprobs=0)
    (mirostat,) = engine.run([replace(greedy, sampling=narrow)])
    (reference,) = Engine(smollm2).run([greedy])
    assert mirostat.token_ids == reference.token_ids


def test_banned_strings_on_vllm_equal_the_hf_engine(
    engine: VllmEngine, smollm2: ModelHandle
) -> None:
    """Phrases taken from each prompt's greedy reply are banned: the vLLM backend's greedy text
    equals the hf engine's, and no banned phrase appears."""
    plain = engine.run([_request(p, max_new_tokens=32, top_logprobs=0) for p in PROMPTS])
    requests = []
    for prompt, reply in zip(PROMPTS, plain, strict=True):
        words = reply.text.split()
        phrases = (" ".join(words[2:4]), words[6])  # two words, and one, from the reply
        sampling = replace(GREEDY, banned_strings=phrases)
        requests.append(_request(prompt, sampling=sampling, max_new_tokens=32, top_logprobs=0))
    expected = Engine(smollm2, max_batch=len(requests)).run(requests)
    got = engine.run(requests)
    for index in _same_tokens(smollm2, requests, expected, got):
        text = got[index].text
        assert expected[index].text == text != plain[index].text, index
        assert not any(p in text for p in requests[index].sampling.banned_strings), index


def test_mirostat_mu_follows_the_token_vllm_drew() -> None:
    """The processor's Mirostat: the hf engine's truncation, and mu moved at the next step by the
    surprise of the token vLLM drew."""
    import math

    from steer.backends.vllm.samplers import _process, _Row
    from steer.sampling import process
    from steer.sampling.pipeline import mirostat_truncate
    from steer.sampling.processors import SamplerState

    config = SamplingConfig(mirostat_mode=2, mirostat_tau=3.0, mirostat_eta=0.5)
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    drawn: list[int] = []
    row = _Row(config, SamplerState(), [1, 2], drawn, None)
    kept = _process(row, logits.clone()).exp()
    reference, order = mirostat_truncate(process(logits.clone(), config), config, SamplerState())
    torch.testing.assert_close(kept, torch.zeros(50).scatter(0, order, reference))
    assert row.state.mirostat_mu == 6.0  # 2 tau before any draw
    token = int(torch.nonzero(kept)[-1])  # vLLM drew a kept token
    drawn.append(token)
    _process(row, logits.clone())
    surprise = -math.log2(float(kept[token]))
    assert row.state.mirostat_mu == pytest.approx(6.0 - 0.5 * (surprise - 3.0))


def test_cancel_frees_the_row_and_its_registration(
    engine: VllmEngine, theme: SteeringVector
) -> None:
    request_id = engine.submit(_request(PROMPTS[0], (Add(theme, 0.3),), max_new_tokens=200))
    engine.step()
    engine.step()
    engine.cancel(request_id)
    finals = [e for e in engine.step() if e.finish_reason]
    assert [(e.request_id, e.finish_reason) for e in finals] == [(request_id, "cancelled")]
    assert not engine.has_work
    (registered,) = engine.llm.collective_rpc(_registered_keys)
    assert registered == 0


def test_a_request_vllm_refuses_fails_alone(engine: VllmEngine, theme: SteeringVector) -> None:
    too_long = GenerationRequest(prompt_ids=(100,) * 9000, max_new_tokens=4)  # > max_model_len
    fine = _request(PROMPTS[1], (Add(theme, 0.3),), max_new_tokens=4, top_logprobs=0)
    ids = [engine.submit(too_long), engine.submit(fine)]
    finals = {}
    while engine.has_work:
        finals.update({e.request_id: e for e in engine.step() if e.finish_reason})
    assert finals[ids[0]].finish_reason == "error" and finals[ids[0]].error is not None
    assert finals[ids[1]].finish_reason == "length" and finals[ids[1]].error is None
    (registered,) = engine.llm.collective_rpc(_registered_keys)
    assert registered == 0


def _registered_keys(worker: object) -> int:
    return len(vllm_worker._steering(worker).specs)


@pytest.mark.parametrize(
    ("what", "field", "word"),
    [
        ("gated", "interventions[1].condition", "another gate's edit"),
        ("resid_mid", "interventions[0]", "hook_resid_mid"),
    ],
)
def test_what_the_backend_lacks_is_refused_by_name(
    engine: VllmEngine,
    theme: SteeringVector,
    refusal: SteeringVector,
    what: str,
    field: str,
    word: str,
) -> None:
    add = Add(theme, 0.5)
    cases = {
        "gated": _request(  # the second gate would read the first one's edit
            PROMPTS[0],
            (
                Gated(Condition(HOOK, refusal, 0.0), add, scope=GateScope.PROMPT),
                Gated(
                    Condition("blocks.12.hook_resid_pre", refusal, 0.0),
                    Ablate(refusal),
                    scope=GateScope.PROMPT,
                ),
            ),
        ),
        "resid_mid": _request(PROMPTS[0], (Add(theme, 0.5, hooks=("blocks.3.hook_resid_mid",)),)),
    }
    with pytest.raises(FailedPreconditionError) as refused:
        engine.submit(cases[what])
    assert refused.value.field == field
    assert word in refused.value.message and "vllm" in refused.value.message
    assert not engine.has_work


def test_unloading_one_model_leaves_the_others_serving(engine: VllmEngine) -> None:
    """vLLM engines running in this process share its distributed state; shutting one down
    (a model unloaded) used to tear it down under the others, whose every step then failed."""
    from tiny import VLLM_SIZES, tiny_handle

    want = engine.run([_request(PROMPTS[1], max_new_tokens=6)])
    handle = tiny_handle("llama", seed=4, **VLLM_SIZES)
    other = VllmEngine(handle, start_vllm(handle, max_batch=4, options=VllmOptions(kv_cache_gib=1)))
    other.run([GenerationRequest(prompt="The knight", sampling=GREEDY, max_new_tokens=3)])
    other.close(final=True)
    have = engine.run([_request(PROMPTS[1], max_new_tokens=6)])
    assert have[0].token_ids == want[0].token_ids and have[0].finish_reason == "length"


@pytest.mark.parametrize("architecture", ["llama", "mistral", "qwen2"])
def test_every_supported_architecture_equals_the_hf_engine(architecture: str) -> None:
    """Tiny random models of each family the backend claims, mixed steering in one batch."""
    from tiny import VLLM_SIZES, tiny_handle

    handle = tiny_handle(architecture, seed=4, **VLLM_SIZES)
    generator = torch.Generator().manual_seed(1)
    vector = SteeringVector(
        {layer: torch.randn(handle.d_model, generator=generator) for layer in range(4)}
    )
    direction = SteeringVector.from_shared(torch.randn(handle.d_model, generator=generator))
    mixes: list[tuple[Intervention, ...]] = [
        (),
        (Add(vector, 3.0),),
        (Ablate(direction),),
        (Add(vector, -2.0, hooks=("blocks.1.hook_attn_out",), phase=Phase.GENERATED),),
    ]
    requests = [
        GenerationRequest(
            prompt=f"The knight drew her sword {index}",
            interventions=mix,
            sampling=GREEDY,
            max_new_tokens=10,
        )
        for index, mix in enumerate(mixes * 2)
    ]
    # a max_model_len past the model's 512 positions is held to them (vLLM refuses to start)
    options = VllmOptions(kv_cache_gib=1, max_model_len=10**6)
    engine = VllmEngine(handle, start_vllm(handle, max_batch=8, options=options))
    try:
        got = engine.run(requests)
    finally:
        engine.close(final=True)
    expected = Engine(handle, max_batch=8).run(requests)
    assert [r.token_ids for r in got] == [r.token_ids for r in expected]
    assert len({r.token_ids for r in got}) > 4
