"""Engine exactness on tiny random models of every supported architecture."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from steer import Ablate, Add, InvalidArgumentError, Phase, ResourceExhaustedError, SteeringVector
from steer.activations import forward
from steer.generation import Engine, GenerationRequest, Message, run_to_end
from steer.hooks import HookKind
from steer.models import ModelHandle
from steer.sampling import SamplingConfig

GREEDY = SamplingConfig.greedy_config()


def _vector(handle: ModelHandle, seed: int = 1, scale: float = 1.0) -> SteeringVector:
    generator = torch.Generator().manual_seed(seed)
    return SteeringVector.from_shared(torch.randn(handle.d_model, generator=generator) * scale)


def _requests(handle: ModelHandle) -> list[GenerationRequest]:
    """Rows with different interventions, including none, and different prompt lengths."""
    v1, v2 = _vector(handle, 1, 3.0), _vector(handle, 2)
    last = handle.num_layers - 1
    base = GenerationRequest(sampling=GREEDY, max_new_tokens=10, top_logprobs=5)
    return [
        replace(base, prompt="The quick brown fox"),
        replace(
            base,
            messages=(Message("user", "Write a short poem about the sea."),),
            interventions=(Add(v1, 2.0, ("blocks.1.hook_resid_post",)),),
        ),
        replace(base, prompt="The knight drew", interventions=(Ablate(v2),)),
        replace(
            base,
            prompt="How do I bake bread at home?",
            interventions=(
                Ablate(v1, layers=(0, last)),
                Add(v2, -1.5, (f"blocks.{last}.hook_resid_mid",), phase=Phase.GENERATED),
            ),
        ),
        replace(
            base,
            prompt="Sure! Here is a story",
            interventions=(Add(v2, 4.0, ("hook_embed", "blocks.0.hook_mlp_out")),),
        ),
    ]


def _assert_same_generation(a, b) -> None:  # type: ignore[no-untyped-def]
    assert a.token_ids == b.token_ids
    assert a.text == b.text
    assert a.finish_reason == b.finish_reason


def test_batch_of_mixed_rows_equals_each_row_alone(tiny: ModelHandle) -> None:
    requests = _requests(tiny)
    batched_events = list(Engine(tiny, max_batch=8).generate(requests))
    batched = Engine(tiny, max_batch=8).run(requests)
    for request, together in zip(requests, batched, strict=True):
        alone = Engine(tiny).run([request])[0]
        _assert_same_generation(together, alone)
    # logits agree to 1e-5 (relative) step by step, compared through the top log-probabilities
    solo_events = [list(Engine(tiny).generate([r])) for r in requests]
    by_row: dict[str, list] = {}
    for event in batched_events:
        by_row.setdefault(event.request_id, []).append(event)
    for row_events, alone_events in zip(by_row.values(), solo_events, strict=True):
        for ours, theirs in zip(row_events, alone_events, strict=True):
            assert [i for i, _ in ours.top_logprobs] == [i for i, _ in theirs.top_logprobs]
            for (_, x), (_, y) in zip(ours.top_logprobs, theirs.top_logprobs, strict=True):
                assert abs(x - y) <= 1e-5 * max(1.0, abs(y))


def test_a_run_longer_than_the_queue_is_fed_as_rows_finish(tiny: ModelHandle) -> None:
    """Engine.run with more requests than max_waiting (an evaluation over hundreds of prompts)
    submits them as room frees: the same results, in order, as with a queue that holds them
    all; a submit past the limit is still refused."""
    requests = _requests(tiny) * 2
    ended: list[int] = []
    fed = run_to_end(
        Engine(tiny, max_batch=2, max_waiting=3), requests, finished=lambda: ended.append(1)
    )
    assert len(ended) == len(requests)  # the progress callback, once per request
    for ours, theirs in zip(fed, Engine(tiny, max_batch=2).run(requests), strict=True):
        _assert_same_generation(ours, theirs)
    engine = Engine(tiny, max_batch=2, max_waiting=3)
    for request in requests[:3]:
        engine.submit(request)
    with pytest.raises(ResourceExhaustedError):
        engine.submit(requests[3])


def test_steering_changes_the_output(tiny: ModelHandle) -> None:
    """Guards the tests above: the interventions used there really do something."""
    requests = _requests(tiny)
    steered = Engine(tiny, max_batch=8).run(requests)
    unsteered = Engine(tiny, max_batch=8).run([replace(r, interventions=()) for r in requests])
    assert sum(a.token_ids != b.token_ids for a, b in zip(steered, unsteered, strict=True)) >= 3


def test_zero_strength_and_empty_interventions_are_bit_identical(tiny: ModelHandle) -> None:
    prompts = [[5, 9, 30, 31, 32, 40], [7, 8, 9]]
    vector = _vector(tiny)
    plain = forward(tiny, prompts, logits="all").logits
    for interventions in (
        (),
        (Add(vector, 0.0, ("blocks.0.hook_resid_pre", "blocks.1.hook_resid_mid")),),
        (Ablate(vector, weight=0.0),),
        (Ablate(vector, layer_weights={0: 0.0, 2: 0.0}),),
    ):
        steered = forward(tiny, prompts, logits="all", interventions=interventions).logits
        assert isinstance(plain, list) and isinstance(steered, list)
        for a, b in zip(plain, steered, strict=True):
            assert torch.equal(a, b)
    # and in the engine: a zero-strength row shares a batch with a steered one
    request = GenerationRequest(prompt="The knight drew", sampling=GREEDY, max_new_tokens=8)
    zero = replace(request, interventions=(Add(vector, 0.0, ("blocks.1.hook_resid_post",)),))
    strong = replace(request, interventions=(Add(vector, 5.0, ("blocks.1.hook_resid_post",)),))

    def row_z(first: GenerationRequest) -> list:
        batch = [replace(first, top_logprobs=3, request_id="z"), strong]
        return [e.top_logprobs for e in Engine(tiny).generate(batch) if e.request_id == "z"]

    assert row_z(request) == row_z(zero)


def test_ablation_removes_the_direction_at_every_hooked_point(tiny: ModelHandle) -> None:
    direction = _vector(tiny, 3)
    unit = direction.shared / direction.shared.norm()  # type: ignore[operator]
    points = [
        f"blocks.{layer}.{kind.value}"
        for layer in range(tiny.num_layers)
        for kind in (
            *(HookKind(k) for k in ("hook_resid_pre", "hook_attn_out", "hook_mlp_out")),
            HookKind.RESID_MID,
            HookKind.RESID_POST,
        )
    ]
    prompts = [[5, 9, 30, 31, 32, 40], [7, 8, 9]]
    before = forward(tiny, prompts, hooks=points, positions="all").activations
    after = forward(tiny, prompts, hooks=points, positions="all", interventions=[Ablate(direction)])
    for name in points:
        for x in after.activations[name]:  # type: ignore[union-attr]
            ratio = (x @ unit).abs() / x.norm(dim=-1)
            assert ratio.max() <= 1e-4, name
    # the direction was there to begin with
    assert (
        max(
            float(((x @ unit).abs() / x.norm(dim=-1)).max())
            for name in points
            for x in before[name]  # type: ignore[union-attr]
        )
        > 1e-2
    )


def test_cached_decode_equals_full_recompute(tiny: ModelHandle) -> None:
    """Token by token logits from the KV-cached engine == one teacher-forced pass (phase=all).

    20 new tokens run past the Gemma tiny models' sliding window of 8.
    """
    vector = _vector(tiny, 4, 2.0)
    interventions = (Add(vector, 1.0, ("blocks.1.hook_resid_post",)), Ablate(_vector(tiny, 5)))
    request = GenerationRequest(
        prompt="The quick brown fox jumps",
        interventions=interventions,
        sampling=GREEDY,
        max_new_tokens=20,
        top_logprobs=1,
    )
    # a second row of another length makes the batch left-padded
    other = GenerationRequest(prompt="Hi", sampling=GREEDY, max_new_tokens=20)
    events = [e for e in Engine(tiny).generate([request, other]) if e.request_id == "req-0"]
    prompt_ids = tiny.tokenizer("The quick brown fox jumps")["input_ids"]
    generated = [e.token_ids[0] for e in events]
    full = forward(
        tiny, [prompt_ids + generated[:-1]], logits="all", interventions=interventions
    ).logits
    assert isinstance(full, list)
    logprobs = torch.log_softmax(full[0][len(prompt_ids) - 1 :], dim=-1)
    for step, event in enumerate(events):
        token, value = event.top_logprobs[0]
        assert token == generated[step]
        assert math.isclose(value, float(logprobs[step, token]), abs_tol=1e-4)


def test_stop_strings_end_the_text_before_the_stop(tiny_llama: ModelHandle) -> None:
    request = GenerationRequest(prompt="The knight drew", sampling=GREEDY, max_new_tokens=24)
    full = Engine(tiny_llama).run([request])[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert len(stop) == 3
    events = list(Engine(tiny_llama).generate([replace(request, stop=("@@never@@", stop))]))
    text = "".join(e.text for e in events)
    assert text == full[: full.index(stop)]
    assert events[-1].finish_reason == "stop"
    assert all(stop not in e.text for e in events)


def test_same_seed_same_output_and_the_seed_is_reported(tiny_llama: ModelHandle) -> None:
    sampled = GenerationRequest(
        prompt="The quick", sampling=SamplingConfig(temperature=1.0, seed=7), max_new_tokens=16
    )
    a = Engine(tiny_llama).run([sampled])[0]
    crowd = [replace(sampled, sampling=SamplingConfig(seed=s)) for s in (1, 2, 3)]
    b = Engine(tiny_llama).run([*crowd, sampled])[-1]
    assert a.token_ids == b.token_ids and a.seed == b.seed == 7
    others = {Engine(tiny_llama).run([r])[0].token_ids for r in crowd}
    assert len(others | {a.token_ids}) > 1
    unseeded = replace(sampled, sampling=SamplingConfig(temperature=1.0))
    first = Engine(tiny_llama).run([unseeded])[0]
    again = Engine(tiny_llama).run(
        [replace(unseeded, sampling=SamplingConfig(temperature=1.0, seed=first.seed))]
    )[0]
    assert first.token_ids == again.token_ids


def test_rows_join_and_leave_a_running_batch(tiny: ModelHandle) -> None:
    requests = _requests(tiny)
    lengths = [3, 12, 7, 9, 5]
    requests = [replace(r, max_new_tokens=n) for r, n in zip(requests, lengths, strict=True)]
    engine = Engine(tiny, max_batch=3)
    tokens: dict[str, list[int]] = {}
    finished: dict[str, str] = {}
    ids = [engine.submit(requests[0]), engine.submit(requests[1])]
    for step in range(200):
        if step == 2:
            ids.append(engine.submit(requests[2]))
        if step == 4:
            ids += [engine.submit(requests[3]), engine.submit(requests[4])]
        for event in engine.step():
            tokens.setdefault(event.request_id, []).extend(event.token_ids)
            if event.finish_reason:
                finished[event.request_id] = event.finish_reason
        assert engine.num_running <= 3
        if step > 4 and not engine.has_work:
            break
    assert len(finished) == 5
    for request_id, request in zip(ids, requests, strict=True):
        assert tuple(tokens[request_id]) == Engine(tiny).run([request])[0].token_ids


def test_cancel_frees_the_row(tiny_llama: ModelHandle) -> None:
    engine = Engine(tiny_llama)
    keep = engine.submit(GenerationRequest(prompt="a", sampling=GREEDY, max_new_tokens=30))
    drop = engine.submit(GenerationRequest(prompt="b", sampling=GREEDY, max_new_tokens=30))
    engine.step()
    assert engine.num_running == 2
    engine.cancel(drop)
    events = engine.step()
    cancelled = [e for e in events if e.request_id == drop]
    assert cancelled and cancelled[-1].finish_reason == "cancelled"
    assert engine.num_running == 1
    assert all(e.request_id == keep for e in engine.step())


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (
            lambda h: Add(
                SteeringVector.from_shared(torch.ones(7)), 1.0, ("blocks.0.hook_resid_post",)
            ),
            "vector",
        ),
        (lambda h: Add(_vector(h), 1.0, ("blocks.0.hook_nowhere",)), "hooks"),
        (lambda h: Add(_vector(h), 1.0, (f"blocks.{h.num_layers}.hook_resid_post",)), "hooks"),
        (lambda h: Add(_vector(h), float("nan"), ("blocks.0.hook_resid_post",)), "strength"),
        (lambda h: Add(_vector(h), float("inf"), ("blocks.0.hook_resid_post",)), "strength"),
        (lambda h: Ablate(_vector(h), layers=(h.num_layers,)), "layers"),
        (lambda h: Ablate(_vector(h), weight=float("nan")), "weight"),
        (lambda h: Ablate(SteeringVector.from_shared(torch.zeros(h.d_model))), "vector"),
        (lambda h: Add(SteeringVector.from_shared(torch.ones(h.d_model)), 1.0), "hooks"),
    ],
)
def test_bad_interventions_are_typed_errors_naming_the_field(tiny_llama, make, field) -> None:  # type: ignore[no-untyped-def]
    engine = Engine(tiny_llama)
    with pytest.raises(InvalidArgumentError) as error:
        engine.submit(GenerationRequest(prompt="hi", interventions=(make(tiny_llama),)))
    assert error.value.field == field
    assert engine.num_waiting == 0


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (GenerationRequest(prompt=""), "prompt"),
        (GenerationRequest(), "prompt"),
        (GenerationRequest(prompt="a", messages=(Message("user", "b"),)), "prompt"),
        (GenerationRequest(messages=()), "messages"),
        (GenerationRequest(prompt_ids=(1, 10**9)), "prompt_ids"),
        (GenerationRequest(prompt="a", max_new_tokens=0), "max_new_tokens"),
        (GenerationRequest(prompt="a", speakers=("x",) * 50), "speakers"),
    ],
)
def test_bad_requests_are_typed_errors(tiny_llama, request_, field) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidArgumentError) as error:
        Engine(tiny_llama).submit(request_)
    assert error.value.field == field


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"min_p": 1.5}, "min_p"),
        ({"top_k": -3}, "top_k"),
    ],
)
def test_bad_sampling_settings_are_typed_errors(kwargs, field) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidArgumentError) as error:
        SamplingConfig(**kwargs)
    assert error.value.field == field


def test_speaker_scoped_add_touches_only_that_speakers_tokens(tiny_llama: ModelHandle) -> None:
    prompt_ids = tuple(
        tiny_llama.tokenizer("The knight drew her sword and the dragon")["input_ids"]
    )
    speakers = tuple("Alice" if i % 2 else "Bob" for i in range(len(prompt_ids)))
    vector = _vector(tiny_llama, 9, 3.0)
    scoped = Add(vector, 1.0, ("blocks.0.hook_resid_post",), speaker="Alice")
    base = GenerationRequest(
        prompt_ids=prompt_ids, speakers=speakers, sampling=GREEDY, max_new_tokens=6, top_logprobs=2
    )
    plain = Engine(tiny_llama).run([base])[0]
    as_bob = Engine(tiny_llama).run([replace(base, interventions=(scoped,), speaker="Bob")])[0]
    nobody = replace(base, interventions=(scoped,), speakers=None, speaker="Bob")
    assert Engine(tiny_llama).run([nobody])[0].token_ids == plain.token_ids
    assert as_bob.token_ids != plain.token_ids  # Alice's prompt tokens were steered
