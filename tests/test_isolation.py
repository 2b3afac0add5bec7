"""One request cannot hurt another (issue #14, defects 2, 4 and 5).

* Values the engine cannot compute are refused at request time, naming the field.
* A failure that belongs to one row (its interventions, its sampler) fails that row alone: the
  other rows of the batch keep exactly the tokens they get without it.
* Open streams cost no thread: hundreds of them leave health and Models.Info answering, and the
  per-model queue limit is what refuses, with RESOURCE_EXHAUSTED naming it.
* An oversized prompt is refused by its size, before it is tokenised.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from grpc import StatusCode as Code
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_server import GREEDY, PROMPTS, alone, make_settings

from steer.errors import InvalidArgumentError
from steer.generation import Engine, GenerationRequest
from steer.hooks import HookPoint, HookResolver
from steer.interventions import Add, Intervention, Op, Phase, RowFunction
from steer.models import ModelHandle
from steer.proto.v1 import generation_pb2, generation_pb2_grpc, models_pb2, models_pb2_grpc
from steer.sampling import SamplingConfig
from steer.server import SteerServer
from steer.vectors import SteeringVector

g = generation_pb2
D_MODEL = 64
HOOK = "blocks.1.hook_resid_post"


def _field(error: grpc.RpcError) -> str | None:
    for key, value in error.trailing_metadata() or ():  # type: ignore[attr-defined]
        if key == "steer-field":
            return str(value)
    return None


@pytest.fixture(scope="module")
def server(
    tiny_llama: ModelHandle, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SteerServer]:
    root = tmp_path_factory.mktemp("isolation")
    settings = make_settings(root, max_batch=16, max_new_tokens_cap=4096)
    with SteerServer(settings, models={"tiny": tiny_llama}) as running:
        yield running


@pytest.fixture(scope="module")
def channel(server: SteerServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target) as opened:
        yield opened


def _tokens(stream: Iterator[g.GenerateResponse]) -> tuple[int, ...]:
    return tuple(token for response in stream for token in response.token_ids)


NORMAL = g.GenerateRequest(
    text=PROMPTS[0], max_new_tokens=12, sampling=g.SamplingParams(temperature=0.0)
)


# -- refused at request time --------------------------------------------------------------------

TINY = 5e-324
EXTREME_SAMPLING = [
    ({"temperature": TINY}, "sampling.temperature"),
    ({"temperature": 1e-300}, "sampling.temperature"),
    ({"temperature": 1e308}, "sampling.temperature"),
    ({"repetition_penalty": TINY}, "sampling.repetition_penalty"),
    ({"logit_bias": {5: 1e308}}, "sampling.logit_bias"),
    ({"dry_base": 1e308, "dry_multiplier": 0.8}, "sampling.dry_base"),
    ({"dry_multiplier": 1e308}, "sampling.dry_multiplier"),
    ({"mirostat_mode": 1, "mirostat_tau": 1e308}, "sampling.mirostat_tau"),
    ({"banned_strings": ["x" * 10_000]}, "sampling.banned_strings"),
    ({"banned_strings": [f"phrase {i}" for i in range(1000)]}, "sampling.banned_strings"),
]


@pytest.mark.parametrize(("params", "field"), EXTREME_SAMPLING)
def test_sampler_values_that_cannot_be_computed_are_refused(
    channel: grpc.Channel, params: dict[str, object], field: str
) -> None:
    stub = generation_pb2_grpc.GenerationStub(channel)
    request = g.GenerateRequest(text=PROMPTS[0], max_new_tokens=2)
    request.sampling.CopyFrom(g.SamplingParams(**params))  # type: ignore[arg-type]
    with pytest.raises(grpc.RpcError) as raised:
        list(stub.Generate(request))
    assert raised.value.code() is Code.INVALID_ARGUMENT, raised.value.details()
    assert _field(raised.value) == field


def _inline_add(strength: float) -> g.Intervention:
    vector = g.InlineVector(shared=[1.0] * D_MODEL)
    return g.Intervention(add=g.AddVector(inline=vector, strength=strength, hooks=[HOOK]))


@pytest.mark.parametrize(
    ("intervention", "field"),
    [
        (_inline_add(1e308), "interventions[0].add.strength"),
        (_inline_add(3.4e38), "interventions[0].add.strength"),
        (_inline_add(1e4 * 1.0001), "interventions[0].add.strength"),
    ],
)
def test_intervention_values_that_cannot_be_computed_are_refused(
    channel: grpc.Channel, intervention: g.Intervention, field: str
) -> None:
    stub = generation_pb2_grpc.GenerationStub(channel)
    request = g.GenerateRequest(text=PROMPTS[0], max_new_tokens=2, interventions=[intervention])
    with pytest.raises(grpc.RpcError) as raised:
        list(stub.Generate(request))
    assert raised.value.code() is Code.INVALID_ARGUMENT, raised.value.details()
    assert _field(raised.value) == field


def test_ablation_weights_are_bounded() -> None:
    from steer.interventions import Ablate

    direction = SteeringVector.from_shared(torch.ones(D_MODEL))
    for fields, name in [
        ({"weight": 1e308}, "weight"),
        ({"weight": 3.4e38}, "weight"),
        ({"layer_weights": {3: 1e308}}, "layer_weights[3]"),
    ]:
        with pytest.raises(InvalidArgumentError) as raised:
            Ablate(direction, **fields)  # type: ignore[arg-type]
        assert raised.value.field == name


# -- a row's failure is its own -------------------------------------------------------------------


BLOW_UP_HOOKS = ("blocks.0.hook_resid_pre", "blocks.0.hook_resid_post")


def _exploding_add() -> Add:
    """Accepted by validation (every value finite and in range) but drives the residual stream
    to inf: 3e38 added twice to the same tokens overflows float32."""
    vector = SteeringVector.from_shared(torch.full((D_MODEL,), 3e38))
    return Add(vector, 1.0, hooks=BLOW_UP_HOOKS)


class _FailsInPrefill(Intervention):
    """An extension op that raises while the prompt is prefilled (a bug in one row's op)."""

    def lower(self, resolver: HookResolver, d_model: int) -> list[tuple[HookPoint, Op]]:
        def explode(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("this row's op is broken")

        return [(resolver.parse("blocks.0.hook_resid_pre"), RowFunction(explode, Phase.PROMPT))]


@pytest.mark.parametrize("failing", [_exploding_add(), _FailsInPrefill()], ids=["nan", "raises"])
def test_a_failing_row_leaves_its_batch_as_if_it_was_never_there(
    tiny_llama: ModelHandle, failing: Intervention
) -> None:
    requests = [
        GenerationRequest(prompt=prompt, sampling=GREEDY, max_new_tokens=10) for prompt in PROMPTS
    ][:4]
    expected = [alone(tiny_llama, request) for request in requests]
    bad = GenerationRequest(
        prompt=PROMPTS[5], sampling=GREEDY, max_new_tokens=10, interventions=(failing,)
    )
    engine = Engine(tiny_llama)
    ids = [engine.submit(r) for r in [requests[0], requests[1], bad, requests[2], requests[3]]]
    tokens: dict[str, list[int]] = {request_id: [] for request_id in ids}
    finals = {}
    while engine.has_work:
        for event in engine.step():
            tokens[event.request_id].extend(event.token_ids)
            if event.finish_reason is not None:
                finals[event.request_id] = event
    assert finals[ids[2]].finish_reason == "error"
    assert finals[ids[2]].error is not None
    good = [ids[0], ids[1], ids[3], ids[4]]
    assert [tuple(tokens[i]) for i in good] == expected
    assert all(finals[i].finish_reason == "length" for i in good)


def test_nan_row_fails_with_invalid_argument_naming_interventions(tiny_llama: ModelHandle) -> None:
    bad = GenerationRequest(
        prompt=PROMPTS[0], sampling=GREEDY, max_new_tokens=4, interventions=(_exploding_add(),)
    )
    with pytest.raises(InvalidArgumentError) as raised:
        Engine(tiny_llama).run([bad])
    assert raised.value.field == "interventions"


def test_a_failing_stream_does_not_touch_a_concurrent_one(
    server: SteerServer, channel: grpc.Channel
) -> None:
    stub = generation_pb2_grpc.GenerationStub(channel)
    reference = _tokens(stub.Generate(NORMAL))
    vector = g.InlineVector(shared=[3e38] * D_MODEL)
    add = g.AddVector(inline=vector, strength=1.0, hooks=BLOW_UP_HOOKS)
    bad = g.GenerateRequest(
        text=PROMPTS[3], max_new_tokens=12, interventions=[g.Intervention(add=add)]
    )
    worker = server.registry.get("tiny").worker
    # both announced together, so they share one prefill and one batch
    with worker.arrival():
        normal = stub.Generate(NORMAL)
        failing = stub.Generate(bad)
    with pytest.raises(grpc.RpcError) as raised:
        list(failing)
    assert raised.value.code() is Code.INVALID_ARGUMENT
    assert _field(raised.value) == "interventions"
    assert _tokens(normal) == reference


def test_sampler_maths_is_overflow_safe_inside_the_bounds(tiny_llama: ModelHandle) -> None:
    """The largest accepted settings still give finite logits and a token every step."""
    extreme = SamplingConfig(
        temperature=1e-4,
        repetition_penalty=0.01,
        dry_multiplier=100.0,
        dry_base=100.0,
        dry_allowed_length=1,
        mirostat_mode=1,
        mirostat_tau=100.0,
        logit_bias=((5, 1000.0), (6, -math.inf)),
        seed=1,
    )
    request = GenerationRequest(prompt=PROMPTS[0], sampling=extreme, max_new_tokens=24)
    (result,) = Engine(tiny_llama).run([request])
    assert len(result.token_ids) == 24


# -- open streams hold no thread ------------------------------------------------------------------


def _long_stream(stub: generation_pb2_grpc.GenerationStub) -> grpc.Future:
    request = g.GenerateRequest(
        text=PROMPTS[1],
        max_new_tokens=4000,
        sampling=g.SamplingParams(temperature=0.0, ban_eos=True),
    )
    return stub.Generate(request)  # type: ignore[no-any-return]


def test_200_open_streams_leave_health_and_info_answering(
    server: SteerServer, channel: grpc.Channel
) -> None:
    stub = generation_pb2_grpc.GenerationStub(channel)
    streams = [_long_stream(stub) for _ in range(200)]
    try:
        worker = server.registry.get("tiny").worker
        deadline = threading.Event()
        while worker.open_requests < 200 and not deadline.wait(0.05):
            pass
        assert worker.open_requests == 200  # all admitted: running or waiting, none refused
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        info = models_pb2_grpc.ModelsStub(channel).Info(
            models_pb2.ModelInfoRequest(model_id="tiny"), timeout=10
        )
        assert info.stats.running + info.stats.waiting == 200
    finally:
        for stream in streams:
            stream.cancel()


def test_the_queue_limit_is_what_refuses(tiny_llama: ModelHandle, tmp_path: Path) -> None:
    # more streams than the old thread-per-stream server had slots (124), more than the queue
    settings = make_settings(tmp_path, max_batch=2, max_waiting=120, max_new_tokens_cap=4096)
    with (
        SteerServer(settings, models={"tiny": tiny_llama}) as small,
        grpc.insecure_channel(small.target) as connected,
    ):
        stub = generation_pb2_grpc.GenerationStub(connected)
        streams = [_long_stream(stub) for _ in range(140)]
        worker = small.registry.get("tiny").worker
        try:
            for _ in range(400):  # until every stream is either queued or answered
                refused = [stream for stream in streams if stream.done()]
                if worker.open_requests + len(refused) == len(streams):
                    break
                threading.Event().wait(0.05)
            health = health_pb2_grpc.HealthStub(connected).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
        finally:
            for stream in streams:
                stream.cancel()
        assert refused, "140 streams against 2 running + 120 waiting places: some are refused"
        assert {stream.code() for stream in refused} == {Code.RESOURCE_EXHAUSTED}
        assert {_field(stream) for stream in refused} == {"queue"}
        assert health.status == health_pb2.HealthCheckResponse.SERVING


# -- oversized prompts ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"text": "word " * 200_000}, "prompt"),
        ({"chat": g.ChatPrompt(messages=[g.ChatMessage(role="user", content="a" * 10**6)])}, None),
        ({"roleplay": g.RolePlayPrompt(scene_json="[" * 10**6)}, "roleplay.scene_json"),
        ({"token_ids": g.TokenIds(ids=[1] * 100_000)}, "token_ids.ids"),
    ],
    ids=["text", "chat", "roleplay", "token_ids"],
)
def test_oversized_prompts_are_refused_by_size(
    channel: grpc.Channel, request_fields: dict[str, object], field: str | None
) -> None:
    stub = generation_pb2_grpc.GenerationStub(channel)
    with pytest.raises(grpc.RpcError) as raised:
        list(stub.Generate(g.GenerateRequest(max_new_tokens=2, **request_fields)))  # type: ignore[arg-type]
    assert raised.value.code() is Code.RESOURCE_EXHAUSTED, raised.value.details()
    if field is not None:
        assert _field(raised.value) == field
    if "token_ids" not in request_fields:
        assert "characters" in (raised.value.details() or "")  # refused before tokenising
