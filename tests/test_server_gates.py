"""Gated interventions over the wire: a gated request through the loopback gRPC server equals the
same gate in process, the HTTP steering list takes the JSON form, bad gates name their field."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import replace

import pytest
import torch
from google.protobuf import json_format
from test_server import direction_artifact, make_settings

from steer import Add, Condition, Gated, GateScope, InvalidArgumentError, SteeringVector
from steer.artifacts import load_vector
from steer.client import NotFound, SteerClient, add, gated
from steer.generation import Engine, GenerationRequest
from steer.models import ModelHandle
from steer.proto.v1 import generation_pb2
from steer.sampling import SamplingConfig
from steer.server import SteerServer

HOOK = "blocks.1.hook_resid_post"
LATER = "blocks.3.hook_resid_post"
PROMPTS = ("The quick brown fox", "How do I bake bread at home?", "I'm sorry, but")


@pytest.fixture(scope="module")
def served(
    tiny_llama: ModelHandle, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SteerServer]:
    root = tmp_path_factory.mktemp("gates")
    direction_artifact(root, tiny_llama, "refusal")
    with SteerServer(make_settings(root), models={"tiny": tiny_llama}) as server:
        yield server


@pytest.fixture
def client(served: SteerServer) -> Iterator[SteerClient]:
    with SteerClient(served.target, timeout=60) as connected:
        yield connected


def _vector(seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(64, generator=torch.Generator().manual_seed(seed)) * scale


def _local(handle: ModelHandle, prompt: str, gate: Gated) -> tuple[int, ...]:
    request = GenerationRequest(
        prompt=prompt,
        sampling=SamplingConfig.greedy_config(),
        max_new_tokens=10,
        interventions=(gate,),
    )
    return Engine(handle).run([request])[0].token_ids


@pytest.mark.parametrize(
    ("scope", "aggregate"), [*((scope, None) for scope in GateScope), (GateScope.REPLY, "mean")]
)
def test_a_gated_request_equals_the_same_gate_in_process(
    client: SteerClient,
    served: SteerServer,
    tiny_llama: ModelHandle,
    scope: GateScope,
    aggregate: str | None,
) -> None:
    direction = load_vector(served.settings.artifacts_dir / "refusal").vector
    vector = _vector(3, 4.0)
    inner = Add(SteeringVector.from_shared(vector), 1.0, (HOOK, LATER))
    replies: dict[float, list[tuple[int, ...]]] = {}
    for threshold in (-1e6, 0.0, 1e6):
        remote_gate = gated(
            add(vector.tolist(), 1.0, hooks=[HOOK, LATER]),
            HOOK,
            "refusal",
            threshold,
            scope=scope.value,
            reply_aggregate=aggregate or "",
        )
        local_gate = Gated(Condition(HOOK, direction, threshold), inner, scope, None, aggregate)
        for prompt in PROMPTS:
            remote = client.complete(
                prompt, temperature=0, max_new_tokens=10, interventions=[remote_gate]
            )[None]
            assert tuple(remote.token_ids) == _local(tiny_llama, prompt, local_gate)
            replies.setdefault(threshold, []).append(tuple(remote.token_ids))
    assert replies[-1e6] != replies[1e6]  # the gate is what tells them apart
    # an inline direction, below the threshold, is the same gate as its artifact
    inline_gate = gated(
        add(vector.tolist(), 1.0, hooks=[HOOK]), HOOK, direction, 0.5, scope="prompt", below=True
    )
    remote = client.complete(
        PROMPTS[1], temperature=0, max_new_tokens=10, interventions=[inline_gate]
    )[None]
    local_gate = Gated(
        Condition(HOOK, direction, 0.5, below=True),
        replace(inner, hooks=(HOOK,)),
        GateScope.PROMPT,
    )
    assert tuple(remote.token_ids) == _local(tiny_llama, PROMPTS[1], local_gate)


def test_a_gate_over_several_hooks_equals_the_same_gate_in_process(
    client: SteerClient, served: SteerServer, tiny_llama: ModelHandle
) -> None:
    direction = load_vector(served.settings.artifacts_dir / "refusal").vector
    vector = _vector(3, 4.0)
    inner = Add(SteeringVector.from_shared(vector), 1.0, (LATER,))
    replies = set()
    for threshold in (-1e6, 0.0, 1e6):
        remote_gate = gated(
            add(vector.tolist(), 1.0, hooks=[LATER]),
            [HOOK, LATER],
            "refusal",
            threshold,
            weights=[0.5, -2.0],
        )
        condition = Condition((HOOK, LATER), direction, threshold, weights=(0.5, -2.0))
        for prompt in PROMPTS:
            remote = client.complete(
                prompt, temperature=0, max_new_tokens=10, interventions=[remote_gate]
            )[None]
            assert tuple(remote.token_ids) == _local(tiny_llama, prompt, Gated(condition, inner))
            replies.add(tuple(remote.token_ids))
    assert len(replies) > len(PROMPTS)  # the thresholds change the replies


def test_the_http_steering_list_takes_the_json_form_of_a_gate() -> None:
    from steer.http.app import _steering_entry

    entry = {
        "gated": {
            "condition": {"hook": HOOK, "artifactId": "refusal", "threshold": 0.25},
            "inner": {"add": {"inline": {"shared": [1.0] * 64}, "strength": 2.0, "hooks": [HOOK]}},
            "scope": "GATE_SCOPE_PROMPT",
        }
    }
    message = _steering_entry(entry, "steering[0]")
    assert message.gated.condition.threshold == 0.25
    assert message.gated.scope == generation_pb2.GATE_SCOPE_PROMPT
    assert message.gated.inner.add.strength == 2.0
    assert json_format.MessageToDict(message) == entry
    window = {"scope": "GATE_SCOPE_REPLY", "replyTokens": 6, "replyAggregate": "mean"}
    reply = {"gated": entry["gated"] | window}
    message = _steering_entry(reply, "steering[0]")
    assert message.gated.scope == generation_pb2.GATE_SCOPE_REPLY
    assert message.gated.reply_tokens == 6 and message.gated.reply_aggregate == "mean"
    entry["gated"]["condition"] = {
        "hooks": [HOOK, LATER],
        "weights": [1.0, 0.5],
        "artifactId": "refusal",
        "threshold": 0.25,
    }
    message = _steering_entry(entry, "steering[0]")
    assert list(message.gated.condition.hooks) == [HOOK, LATER]
    assert list(message.gated.condition.weights) == [1.0, 0.5]


def _gate(**changes: object) -> generation_pb2.Intervention:
    """A valid token gate with ``changes`` made to its condition, inner or scope."""
    message = gated(add(_vector(3).tolist(), 1.0, hooks=[LATER]), HOOK, _vector(7).tolist(), 0.0)
    for name, value in changes.items():
        if name == "speaker":
            message.speaker = str(value)
        elif name == "reply_tokens":
            message.gated.reply_tokens = int(str(value))
        elif name == "reply_aggregate":
            message.gated.reply_aggregate = str(value)
        elif name in ("scope", "inner"):
            if value is None:
                message.gated.ClearField(name)
            elif isinstance(value, generation_pb2.Intervention):
                message.gated.inner.CopyFrom(value)
            else:
                setattr(message.gated, name, value)
        elif name == "inline":
            message.gated.condition.inline.CopyFrom(generation_pb2.InlineVector(shared=value))
        elif name in ("hooks", "weights"):
            getattr(message.gated.condition, name).extend(value)
        else:
            setattr(message.gated.condition, name, value)
    return message


BAD_GATES: dict[str, Callable[[], generation_pb2.Intervention]] = {
    "interventions[0].gated.condition.threshold": lambda: _gate(threshold=math.nan),
    "interventions[0].gated.condition.direction": lambda: _gate(inline=[0.0] * 64),
    "interventions[0].gated.condition.hook": lambda: _gate(hook="blocks.9.hook_resid_post"),
    "interventions[0].gated.scope": lambda: _gate(scope=0),
    "interventions[0].gated.inner": lambda: _gate(inner=None),
    "interventions[0].gated.inner.add.hooks": lambda: _gate(
        inner=add(_vector(3).tolist(), 1.0, hooks=["blocks.0.hook_resid_post"])
    ),
    "interventions[0].gated.inner.add.strength": lambda: _gate(
        inner=add(_vector(3).tolist(), math.inf, hooks=[LATER])
    ),
    "interventions[0].speaker": lambda: _gate(speaker="Lysa"),
    "interventions[0].gated.reply_tokens": lambda: _gate(reply_tokens=8),
    "interventions[0].gated.reply_tokens ": lambda: _gate(
        scope=generation_pb2.GATE_SCOPE_REPLY, reply_tokens=65
    ),
    "interventions[0].gated.reply_aggregate": lambda: _gate(reply_aggregate="mean"),
    "interventions[0].gated.reply_aggregate ": lambda: _gate(
        scope=generation_pb2.GATE_SCOPE_REPLY, reply_aggregate="median"
    ),
    "interventions[0].gated.condition.hooks": lambda: _gate(hooks=[HOOK, LATER]),
    "interventions[0].gated.condition.hooks[1]": lambda: _gate(
        hook="", hooks=[HOOK, "blocks.9.hook_resid_post"]
    ),
    "interventions[0].gated.condition.weights": lambda: _gate(weights=[1.0]),
    "interventions[0].gated.condition.weights[0]": lambda: _gate(
        hook="", hooks=[HOOK, LATER], weights=[math.inf, 1.0]
    ),
}


@pytest.mark.parametrize("field", list(BAD_GATES))
def test_bad_gates_are_invalid_argument_naming_the_field(client: SteerClient, field: str) -> None:
    with pytest.raises(InvalidArgumentError) as raised:
        client.complete(PROMPTS[0], max_new_tokens=2, interventions=[BAD_GATES[field]()])
    assert raised.value.field == field.strip()  # a trailing space keeps two cases of one field


def test_bad_gates_name_their_field_beyond_the_table(client: SteerClient) -> None:
    wrong_size = _gate(inline=[1.0] * 10)
    nested = _gate(inner=_gate())
    for message, field in (
        (wrong_size, "interventions[0].gated.condition.direction"),
        (nested, "interventions[0].gated.inner"),
    ):
        with pytest.raises(InvalidArgumentError) as raised:
            client.complete(PROMPTS[0], max_new_tokens=2, interventions=[message])
        assert raised.value.field == field
    missing = _gate()
    missing.gated.condition.artifact_id = "no-such-direction"
    with pytest.raises(NotFound) as not_found:
        client.complete(PROMPTS[0], max_new_tokens=2, interventions=[missing])
    assert not_found.value.field == "interventions[0].gated.condition.artifact_id"
    # the server still serves
    assert client.complete(PROMPTS[0], temperature=0, max_new_tokens=2, interventions=[_gate()])
