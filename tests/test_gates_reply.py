"""Reply-scope gates (steer.gates): decided on the first reply tokens, the reply started over
with the edit on where they fire. Tiny random models; each check compares with the ungated
intervention or with no intervention, which must come out exactly."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
import torch

from steer import Add, Condition, Gated, GateScope, InvalidArgumentError, SteeringVector
from steer.activations import forward
from steer.calibration import ContrastPrompts, read_prompts
from steer.directions.scores import token_kls
from steer.generation import Engine, GenerationEvent, GenerationRequest
from steer.interventions import Intervention
from steer.models import ModelHandle
from steer.sampling import SamplingConfig
from steer.text import encode_chat

HOOK = "blocks.1.hook_resid_post"
PROMPTS = (
    "The quick brown fox",
    "How do I bake bread at home?",
    "Name three rivers in Europe.",
    "Write a line about the sea.",
)
GREEDY = SamplingConfig.greedy_config()


def _vector(handle: ModelHandle, seed: int, scale: float = 1.0) -> SteeringVector:
    generator = torch.Generator().manual_seed(seed)
    return SteeringVector.from_shared(torch.randn(handle.d_model, generator=generator) * scale)


def _inner(handle: ModelHandle) -> Add:
    """A strong addition at a layer before the condition's hook and one after it."""
    last = handle.num_layers - 1
    hooks = ("blocks.0.hook_resid_post", f"blocks.{last}.hook_resid_post")
    return Add(_vector(handle, 3, 4.0), 1.0, hooks)


def _gate(
    handle: ModelHandle,
    threshold: float,
    tokens: int = 4,
    aggregate: str | None = None,
    *,
    below: bool = False,
) -> Gated:
    condition = Condition(HOOK, _vector(handle, 7), threshold, below)
    return Gated(condition, _inner(handle), GateScope.REPLY, tokens, aggregate)


def _ids(handle: ModelHandle) -> list[list[int]]:
    return [encode_chat(handle, prompt) for prompt in PROMPTS]


def _requests(
    handle: ModelHandle, interventions: tuple[Intervention, ...], **changes: object
) -> list[GenerationRequest]:
    base = GenerationRequest(sampling=GREEDY, max_new_tokens=10, top_logprobs=3)
    return [
        replace(base, prompt_ids=tuple(ids), interventions=interventions, **changes)
        for ids in _ids(handle)
    ]


def _alone(handle: ModelHandle, requests: list[GenerationRequest]) -> list[tuple[int, ...]]:
    return [Engine(handle).run([request])[0].token_ids for request in requests]


def _windows(
    handle: ModelHandle, tokens: int, aggregate: str = "any", *, below: bool = False
) -> list[float]:
    """Each prompt's largest projection over its window (or their mean), as calibration reads
    it (negated with ``below``)."""
    ids = _ids(handle)
    contrast = ContrastPrompts(fire=ids, quiet=ids)
    reads = read_prompts(
        handle,
        [HOOK],
        train=contrast,
        validation=contrast,
        reply_tokens=tokens,
        reply_aggregate=aggregate,
    )
    return reads.scores(_vector(handle, 7), below=below)[0].read["train.fire"]


def _split(scores: list[float]) -> float:
    """A threshold in the widest gap between the prompts' scores: some fire, some do not, and
    no score sits so near it that padding's rounding could flip a decision."""
    ordered = sorted(scores)
    low, high = max(itertools.pairwise(ordered), key=lambda pair: pair[1] - pair[0])
    assert high - low > 1e-3
    return (low + high) / 2


def test_a_reply_gate_runs_each_row_unedited_or_as_always_on_as_its_window_decides(
    tiny: ModelHandle,
) -> None:
    """The calibration's window scores predict the engine's decisions; in one batch, each row
    comes out token for token as the unedited model's reply (gate quiet) or the ungated
    intervention's (gate fired), as each row alone does."""
    handle = tiny
    scores = _windows(handle, 4)
    threshold = _split(scores)
    gate = _gate(handle, threshold)
    plain = _alone(handle, _requests(handle, ()))
    always = _alone(handle, _requests(handle, (gate.inner,)))
    expected = [a if s > threshold else p for s, p, a in zip(scores, plain, always, strict=True)]
    assert plain != always  # the edit shows in the replies
    batched = [r.token_ids for r in Engine(handle).run(_requests(handle, (gate,)))]
    assert batched == expected
    assert _alone(handle, _requests(handle, (gate,))) == expected


def test_a_fired_reply_gate_with_sampling_equals_the_edit_always_on_with_the_same_seed(
    tiny_llama: ModelHandle,
) -> None:
    handle = tiny_llama
    sampled = SamplingConfig(temperature=1.0, seed=11)
    fired = _requests(handle, (_gate(handle, -1e6),), sampling=sampled)
    always = _requests(handle, (_inner(handle),), sampling=sampled)
    quiet = _requests(handle, (_gate(handle, 1e6),), sampling=sampled)
    plain = _requests(handle, (), sampling=sampled)
    assert _alone(handle, fired) == _alone(handle, always)
    assert _alone(handle, quiet) == _alone(handle, plain)
    assert _alone(handle, fired) != _alone(handle, plain)


def test_the_window_is_the_first_reply_tokens_and_no_more(tiny_llama: ModelHandle) -> None:
    """A threshold between a prompt's largest projection over its first 2 positions and over
    its first 8 fires a gate reading 8 tokens and not one reading 2."""
    handle = tiny_llama
    short, long = _windows(handle, 2), _windows(handle, 8)
    row = max(range(len(PROMPTS)), key=lambda i: long[i] - short[i])
    assert long[row] > short[row]
    threshold = (long[row] + short[row]) / 2
    request = _requests(handle, ())[row]
    plain = _alone(handle, [request])
    always = _alone(handle, [replace(request, interventions=(_inner(handle),))])
    for tokens, expected in ((2, plain), (8, always)):
        gated = replace(request, interventions=(_gate(handle, threshold, tokens),))
        assert _alone(handle, [gated]) == expected


def test_a_row_holds_its_tokens_back_until_its_gate_decides(tiny_llama: ModelHandle) -> None:
    """No event of a reply-gated row comes before its window is read; a fired row never sends
    the tokens it dropped; a quiet one sends them all, each with its own log-probabilities."""
    handle = tiny_llama
    plain_request = _requests(handle, ())[1]
    engine = Engine(handle)
    quiet_id = engine.submit(replace(plain_request, interventions=(_gate(handle, 1e6, 5),)))
    fired_id = engine.submit(replace(plain_request, interventions=(_gate(handle, -1e6, 5),)))
    steps: list[list[GenerationEvent]] = []
    while engine.has_work:
        steps.append(engine.step())
    first = {
        rid: next(i for i, events in enumerate(steps) if any(e.request_id == rid for e in events))
        for rid in (quiet_id, fired_id)
    }
    assert first[quiet_id] == 4  # the prompt pass and 4 decode steps: 5 tokens drawn
    # fired in its prompt pass (before drawing), queued again, started over a step later with
    # its gate decided: nothing left to hold back
    assert first[fired_id] == 1
    by_id: dict[str, list[GenerationEvent]] = {quiet_id: [], fired_id: []}
    for events in steps:
        for event in events:
            by_id[event.request_id].append(event)
    reference = list(Engine(handle).generate([plain_request]))
    assert [e.token_ids for e in by_id[quiet_id]] == [e.token_ids for e in reference]
    for ours, theirs in zip(by_id[quiet_id], reference, strict=True):  # in a batch of two
        assert [i for i, _ in ours.top_logprobs] == [i for i, _ in theirs.top_logprobs]
        assert [p for _, p in ours.top_logprobs] == pytest.approx(
            [p for _, p in theirs.top_logprobs], abs=1e-5
        )
    always = _alone(handle, [replace(plain_request, interventions=(_inner(handle),))])[0]
    assert tuple(t for e in by_id[fired_id] for t in e.token_ids) == always


def test_reply_gates_score_continuations_as_the_engine_decides(tiny_llama: ModelHandle) -> None:
    """Teacher-forced KL (what eval_unseen.py reports): the rows whose gate fires on the base
    continuations score as the edit always on, the others 0."""
    handle = tiny_llama
    ids = _ids(handle)
    continuations = list(_alone(handle, _requests(handle, ())))
    scores = _windows(handle, 4)
    threshold = _split(scores)
    gated = token_kls(handle, ids, continuations, (_gate(handle, threshold),))
    always = token_kls(handle, ids, continuations, (_inner(handle),))
    for score, ours, theirs in zip(scores, gated, always, strict=True):
        if score > threshold:
            assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-7) and max(theirs) > 0
        else:
            assert ours == [0.0] * len(ours)


def test_one_pass_over_prompts_refuses_a_reply_gate(tiny_llama: ModelHandle) -> None:
    with pytest.raises(InvalidArgumentError) as error:
        forward(tiny_llama, _ids(tiny_llama), interventions=(_gate(tiny_llama, 0.0),))
    assert error.value.field == "interventions" and "reply" in error.value.message


@pytest.mark.parametrize(
    ("scope", "tokens", "message"),
    [
        (GateScope.REPLY, 0, "from 1 to 64"),
        (GateScope.REPLY, 65, "from 1 to 64"),
        (GateScope.REPLY, True, "whole number"),
        (GateScope.REPLY, 2.0, "whole number"),
        (GateScope.PROMPT, 4, "only a reply-scope gate"),
        (GateScope.TOKEN, 1, "only a reply-scope gate"),
    ],
)
def test_bad_reply_tokens_are_refused(
    tiny_llama: ModelHandle, scope: GateScope, tokens: object, message: str
) -> None:
    condition = Condition(HOOK, _vector(tiny_llama, 7), 0.0)
    with pytest.raises(InvalidArgumentError) as error:
        Gated(condition, _inner(tiny_llama), scope, tokens)  # type: ignore[arg-type]
    assert error.value.field == "reply_tokens" and message in error.value.message


def test_a_reply_gate_reads_four_tokens_by_default(tiny_llama: ModelHandle) -> None:
    condition = Condition(HOOK, _vector(tiny_llama, 7), 0.0)
    assert Gated(condition, _inner(tiny_llama), GateScope.REPLY).reply_tokens == 4
    assert Gated(condition, _inner(tiny_llama), GateScope.PROMPT).reply_tokens is None


@pytest.mark.parametrize("below", [False, True])
def test_a_mean_reply_gate_runs_each_row_as_its_window_mean_decides(
    tiny_llama: ModelHandle, below: bool
) -> None:
    """``reply_aggregate="mean"``: the calibration's window means predict the engine's
    decisions (above, or below, the threshold), each row in one batch as alone."""
    handle = tiny_llama
    scores = _windows(handle, 6, "mean", below=below)
    split = _split(scores)
    gate = _gate(handle, -split if below else split, 6, "mean", below=below)
    plain = _alone(handle, _requests(handle, ()))
    always = _alone(handle, _requests(handle, (gate.inner,)))
    expected = [a if s > split else p for s, p, a in zip(scores, plain, always, strict=True)]
    assert plain != always and expected not in (plain, always)  # some rows fire, some do not
    batched = [r.token_ids for r in Engine(handle).run(_requests(handle, (gate,)))]
    assert batched == expected
    assert _alone(handle, _requests(handle, (gate,))) == expected


def test_a_mean_gate_misses_a_window_any_position_of_which_fires(
    tiny_llama: ModelHandle,
) -> None:
    """A threshold between a window's mean and its largest projection fires the "any" gate
    and not the "mean" one."""
    handle = tiny_llama
    largest, mean = _windows(handle, 6), _windows(handle, 6, "mean")
    row = max(range(len(PROMPTS)), key=lambda i: largest[i] - mean[i])
    assert largest[row] - mean[row] > 1e-3
    threshold = (largest[row] + mean[row]) / 2
    request = _requests(handle, ())[row]
    plain = _alone(handle, [request])
    always = _alone(handle, [replace(request, interventions=(_inner(handle),))])
    for aggregate, expected in (("any", always), ("mean", plain)):
        gated = replace(request, interventions=(_gate(handle, threshold, 6, aggregate),))
        assert _alone(handle, [gated]) == expected


def test_a_mean_gate_decides_on_a_reply_shorter_than_its_window(
    tiny_llama: ModelHandle,
) -> None:
    """A reply that ends before the window does (here at ``max_new_tokens``) is decided on the
    positions it has; a fired row starts over and ends as the edit always on does, with no
    event of the dropped reply."""
    handle = tiny_llama
    scores = _windows(handle, 3, "mean")
    split = _split(scores)
    short = _requests(handle, (), max_new_tokens=3)
    gated = [replace(r, interventions=(_gate(handle, split, 8, "mean"),)) for r in short]
    always = [replace(r, interventions=(_inner(handle),)) for r in short]
    results = Engine(handle).run(gated)
    for score, ours, plain, edited in zip(scores, results, short, always, strict=True):
        reference = Engine(handle).run([edited if score > split else plain])[0]
        assert ours.token_ids == reference.token_ids
        assert ours.finish_reason == reference.finish_reason == "length"
    engine = Engine(handle)
    ids = [engine.submit(request) for request in gated]
    events = [event for _ in iter(lambda: engine.has_work, False) for event in engine.step()]
    for request_id, result in zip(ids, results, strict=True):
        mine = [e for e in events if e.request_id == request_id]
        assert tuple(t for e in mine for t in e.token_ids) == result.token_ids
        assert [e.finish_reason for e in mine if e.finish_reason] == ["length"]


def test_mean_reply_gates_score_continuations_as_the_engine_decides(
    tiny_llama: ModelHandle,
) -> None:
    handle = tiny_llama
    ids = _ids(handle)
    continuations = list(_alone(handle, _requests(handle, ())))
    scores = _windows(handle, 6, "mean")
    threshold = _split(scores)
    gated = token_kls(handle, ids, continuations, (_gate(handle, threshold, 6, "mean"),))
    always = token_kls(handle, ids, continuations, (_inner(handle),))
    assert any(s > threshold for s in scores) and any(s <= threshold for s in scores)
    for score, ours, theirs in zip(scores, gated, always, strict=True):
        if score > threshold:
            assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-7) and max(theirs) > 0
        else:
            assert ours == [0.0] * len(ours)


@pytest.mark.parametrize(
    ("scope", "aggregate", "message"),
    [
        (GateScope.REPLY, "median", "unknown aggregate"),
        (GateScope.REPLY, 1, "unknown aggregate"),
        (GateScope.PROMPT, "mean", "only a reply-scope gate"),
        (GateScope.TOKEN, "any", "only a reply-scope gate"),
    ],
)
def test_bad_reply_aggregates_are_refused(
    tiny_llama: ModelHandle, scope: GateScope, aggregate: object, message: str
) -> None:
    condition = Condition(HOOK, _vector(tiny_llama, 7), 0.0)
    with pytest.raises(InvalidArgumentError) as error:
        Gated(condition, _inner(tiny_llama), scope, None, aggregate)  # type: ignore[arg-type]
    assert error.value.field == "reply_aggregate" and message in error.value.message
    assert Gated(condition, _inner(tiny_llama), GateScope.REPLY).reply_aggregate == "any"
