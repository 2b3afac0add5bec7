"""Malformed requests: each gets its specific status code and names the field; the server then
still serves a normal request."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from grpc import StatusCode as Code
from test_server import direction_artifact, make_settings
from tiny import tiny_handle

from steer.artifacts import save_vector
from steer.models import ModelHandle
from steer.proto.v1 import (
    directions_pb2,
    directions_pb2_grpc,
    generation_pb2,
    generation_pb2_grpc,
    jobs_pb2,
    jobs_pb2_grpc,
    models_pb2,
    models_pb2_grpc,
)
from steer.server import SteerServer
from steer.vectors import SteeringVector

g = generation_pb2
D_MODEL = 64


@pytest.fixture(scope="module")
def server(
    tiny_llama: ModelHandle, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SteerServer]:
    root = tmp_path_factory.mktemp("bad-input")
    direction_artifact(root, tiny_llama, "good")
    direction_artifact(root, tiny_handle("llama", seed=4), "other-weights")
    small = SteeringVector.from_shared(torch.ones(32))
    save_vector(root / "artifacts" / "narrow", small, kind="vector")
    with SteerServer(make_settings(root), models={"tiny": tiny_llama}) as running:
        yield running


def text(**fields: object) -> g.GenerateRequest:
    return g.GenerateRequest(text="Hello there", max_new_tokens=2, **fields)  # type: ignore[arg-type]


def sampling(**fields: Any) -> g.GenerateRequest:
    return text(sampling=g.SamplingParams(**fields))


def adding(**fields: object) -> g.GenerateRequest:
    return text(interventions=[g.Intervention(add=g.AddVector(**fields))])  # type: ignore[arg-type]


def inline(values: list[float], **fields: object) -> g.GenerateRequest:
    fields.setdefault("hooks", ["blocks.1.hook_resid_post"])
    return adding(inline=g.InlineVector(shared=values), strength=1.0, **fields)


def per_layer(*layers: tuple[int, list[float]]) -> g.GenerateRequest:
    vector = g.InlineVector(
        layers=[g.LayerVector(layer=layer, values=values) for layer, values in layers]
    )
    return adding(inline=vector, strength=1.0)


def ablating(**fields: object) -> g.GenerateRequest:
    return text(interventions=[g.Intervention(ablate=g.AblateDirection(**fields))])  # type: ignore[arg-type]


ONES = [1.0] * D_MODEL
NAN = float("nan")
INF = float("inf")

#: (name, request, expected status, expected field prefix or None)
GENERATE_CASES: list[tuple[str, g.GenerateRequest, Code, str | None]] = [
    ("empty request", g.GenerateRequest(), Code.INVALID_ARGUMENT, "prompt"),
    ("empty text", g.GenerateRequest(text=""), Code.INVALID_ARGUMENT, "text"),
    ("no token ids", g.GenerateRequest(token_ids=g.TokenIds()), Code.INVALID_ARGUMENT, "token_ids"),
    (
        "token id outside vocab",
        g.GenerateRequest(token_ids=g.TokenIds(ids=[5, 100000])),
        Code.INVALID_ARGUMENT,
        "prompt_ids",
    ),
    (
        "chat without messages",
        g.GenerateRequest(chat=g.ChatPrompt()),
        Code.INVALID_ARGUMENT,
        "chat.messages",
    ),
    (
        "unknown role",
        g.GenerateRequest(chat=g.ChatPrompt(messages=[g.ChatMessage(role="wizard", content="x")])),
        Code.INVALID_ARGUMENT,
        "chat.messages[0].role",
    ),
    (
        "unknown prompt format",
        g.GenerateRequest(
            chat=g.ChatPrompt(
                messages=[g.ChatMessage(role="user", content="x")], prompt_format="klingon"
            )
        ),
        Code.INVALID_ARGUMENT,
        "chat.prompt_format",
    ),
    (
        "negative temperature",
        sampling(temperature=-1.0),
        Code.INVALID_ARGUMENT,
        "sampling.temperature",
    ),
    ("NaN temperature", sampling(temperature=NAN), Code.INVALID_ARGUMENT, "sampling.temperature"),
    (
        "infinite temperature",
        sampling(temperature=INF),
        Code.INVALID_ARGUMENT,
        "sampling.temperature",
    ),
    ("top_p zero", sampling(top_p=0.0), Code.INVALID_ARGUMENT, "sampling.top_p"),
    ("top_p above one", sampling(top_p=1.5), Code.INVALID_ARGUMENT, "sampling.top_p"),
    ("NaN top_p", sampling(top_p=NAN), Code.INVALID_ARGUMENT, "sampling.top_p"),
    ("negative min_p", sampling(min_p=-0.1), Code.INVALID_ARGUMENT, "sampling.min_p"),
    ("min_p above one", sampling(min_p=2.0), Code.INVALID_ARGUMENT, "sampling.min_p"),
    ("seed out of range", text(seed=2**63), Code.INVALID_ARGUMENT, "seed"),
    (
        "max_new_tokens over cap",
        text(max_new_tokens=100000)
        if False
        else g.GenerateRequest(text="x", max_new_tokens=100000),
        Code.INVALID_ARGUMENT,
        "max_new_tokens",
    ),
    ("top_logprobs over 20", text(top_logprobs=21), Code.INVALID_ARGUMENT, "top_logprobs"),
    ("empty stop string", text(stop=[""]), Code.INVALID_ARGUMENT, "stop[0]"),
    ("oversized stop string", text(stop=["x" * 300]), Code.INVALID_ARGUMENT, "stop[0]"),
    (
        "too many stop strings",
        text(stop=[f"s{i}" for i in range(17)]),
        Code.INVALID_ARGUMENT,
        "stop",
    ),
    (
        "too many interventions",
        text(interventions=[g.Intervention(ablate=g.AblateDirection(artifact_id="good"))] * 65),
        Code.INVALID_ARGUMENT,
        "interventions",
    ),
    (
        "intervention without kind",
        text(interventions=[g.Intervention()]),
        Code.INVALID_ARGUMENT,
        "interventions[0]",
    ),
    (
        "add without vector",
        adding(strength=1.0),
        Code.INVALID_ARGUMENT,
        "interventions[0].add.vector",
    ),
    (
        "add empty inline vector",
        adding(inline=g.InlineVector(), strength=1.0),
        Code.INVALID_ARGUMENT,
        "interventions[0].add",
    ),
    ("inline vector too short", inline([1.0] * 63), Code.INVALID_ARGUMENT, "interventions[0].add"),
    ("inline vector too long", inline([1.0] * 65), Code.INVALID_ARGUMENT, "interventions[0].add"),
    (
        "inline vector with NaN",
        inline([NAN, *ONES[1:]]),
        Code.INVALID_ARGUMENT,
        "interventions[0].add",
    ),
    (
        "inline vector with inf",
        inline([INF, *ONES[1:]]),
        Code.INVALID_ARGUMENT,
        "interventions[0].add",
    ),
    (
        "NaN strength",
        adding(inline=g.InlineVector(shared=ONES), strength=NAN, hooks=["blocks.0.hook_resid_pre"]),
        Code.INVALID_ARGUMENT,
        "interventions[0].add.strength",
    ),
    (
        "infinite strength",
        adding(
            inline=g.InlineVector(shared=ONES), strength=-INF, hooks=["blocks.0.hook_resid_pre"]
        ),
        Code.INVALID_ARGUMENT,
        "interventions[0].add.strength",
    ),
    (
        "malformed hook name",
        inline(ONES, hooks=["blocks.x.hook_resid_post"]),
        Code.INVALID_ARGUMENT,
        "interventions[0].add.hooks",
    ),
    (
        "hook layer out of range",
        inline(ONES, hooks=["blocks.99.hook_resid_post"]),
        Code.INVALID_ARGUMENT,
        "interventions[0].add",
    ),
    (
        "unknown hook kind",
        inline(ONES, hooks=["blocks.0.hook_foo"]),
        Code.INVALID_ARGUMENT,
        "interventions[0].add",
    ),
    (
        "shared vector without hooks",
        inline(ONES, hooks=[]),
        Code.INVALID_ARGUMENT,
        "interventions[0].add.hooks",
    ),
    (
        "per-layer vector past last layer",
        per_layer((99, ONES)),
        Code.INVALID_ARGUMENT,
        "interventions[0].add",
    ),
    (
        "layer given twice",
        per_layer((1, ONES), (1, ONES)),
        Code.INVALID_ARGUMENT,
        "interventions[0].add.inline.layers[1].layer",
    ),
    (
        "per-layer vector wrong size",
        per_layer((1, [1.0] * 10)),
        Code.INVALID_ARGUMENT,
        "interventions[0].add",
    ),
    ("unknown phase", inline(ONES, phase=7), Code.INVALID_ARGUMENT, "interventions[0].add.phase"),
    (
        "ablate without artifact",
        ablating(),
        Code.INVALID_ARGUMENT,
        "interventions[0].ablate.artifact_id",
    ),
    (
        "ablate path traversal id",
        ablating(artifact_id="../good"),
        Code.INVALID_ARGUMENT,
        "interventions[0].ablate.artifact_id",
    ),
    (
        "ablate layer out of range",
        ablating(artifact_id="good", layers=[99]),
        Code.INVALID_ARGUMENT,
        "interventions[0].ablate.layers",
    ),
    (
        "ablate NaN weight",
        ablating(artifact_id="good", weight=NAN),
        Code.INVALID_ARGUMENT,
        "interventions[0].ablate.weight",
    ),
    (
        "ablate NaN layer weight",
        ablating(artifact_id="good", layer_weights={1: NAN}),
        Code.INVALID_ARGUMENT,
        "interventions[0].ablate.layer_weights[1]",
    ),
    (
        "add artifact id with slash",
        adding(artifact_id="a/b", strength=1.0),
        Code.INVALID_ARGUMENT,
        "interventions[0].add.artifact_id",
    ),
    (
        "artifact of another width",
        adding(artifact_id="narrow", strength=1.0, hooks=["blocks.0.hook_resid_pre"]),
        Code.INVALID_ARGUMENT,
        "interventions[0].add.artifact_id",
    ),
    ("unknown model", text(model="nope"), Code.NOT_FOUND, "model"),
    (
        "unknown ablate artifact",
        ablating(artifact_id="missing"),
        Code.NOT_FOUND,
        "interventions[0].ablate.artifact_id",
    ),
    (
        "unknown add artifact",
        adding(artifact_id="missing", strength=1.0),
        Code.NOT_FOUND,
        "interventions[0].add.artifact_id",
    ),
    (
        "artifact made for other weights",
        ablating(artifact_id="other-weights"),
        Code.FAILED_PRECONDITION,
        "interventions[0].ablate.artifact_id",
    ),
    (
        "prompt over the token limit",
        g.GenerateRequest(text="fox " * 400, max_new_tokens=1),
        Code.RESOURCE_EXHAUSTED,
        "prompt",
    ),
    (
        "message over the size limit",
        g.GenerateRequest(text="x" * (3 * 1024 * 1024)),
        Code.RESOURCE_EXHAUSTED,
        None,
    ),
]


def _collect(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        result = call()
        if hasattr(result, "__iter__") and not hasattr(result, "ListFields"):
            list(result)  # type: ignore[call-overload]
    return raised.value  # type: ignore[return-value]


def _field(error: grpc.RpcError) -> str | None:
    for key, value in error.trailing_metadata() or ():  # type: ignore[attr-defined]
        if key == "steer-field":
            return str(value)
    return None


@pytest.fixture(scope="module")
def channel(server: SteerServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(
        server.target, options=[("grpc.max_send_message_length", 8 * 1024 * 1024)]
    ) as opened:
        yield opened


@pytest.mark.parametrize(
    ("request_message", "code", "field"),
    [case[1:] for case in GENERATE_CASES],
    ids=[case[0] for case in GENERATE_CASES],
)
def test_malformed_generate(
    channel: grpc.Channel, request_message: g.GenerateRequest, code: Code, field: str | None
) -> None:
    stub = generation_pb2_grpc.GenerationStub(channel)
    error = _collect(lambda: stub.Generate(request_message, timeout=30))
    assert error.code() is code, error.details()  # type: ignore[attr-defined]
    assert "Traceback" not in (error.details() or "")  # type: ignore[attr-defined]
    if field is not None:
        assert (_field(error) or "").startswith(field), (_field(error), error.details())  # type: ignore[attr-defined]


RAW_GENERATE = "/steer.v1.Generation/Generate"


@pytest.mark.parametrize(
    "payload",
    [
        b"\x12\x02\xff\xfe",  # field 2 (text) holding invalid UTF-8
        b"\x1a\x04\x0a\x02\xc3\x28",  # chat.messages[0] truncated with invalid UTF-8
        b"\xff\xff\xff\xff\xff",  # not a protobuf message at all
        b"\x12\x50ab",  # length prefix longer than the data
    ],
    ids=["bad utf-8 text", "bad utf-8 in chat", "garbage bytes", "truncated message"],
)
def test_unparseable_bytes(channel: grpc.Channel, payload: bytes) -> None:
    call = channel.unary_stream(RAW_GENERATE)  # no serializers: raw bytes on the wire
    error = _collect(lambda: call(payload, timeout=30))
    assert error.code() is Code.INVALID_ARGUMENT, error.details()  # type: ignore[attr-defined]


def _artifact_files(tmp_path: Path, handle: ModelHandle) -> directions_pb2.ArtifactFiles:
    local = direction_artifact(tmp_path, handle, "upload")
    return directions_pb2.ArtifactFiles(
        artifact_id="fresh",
        vectors_safetensors=(local / "vectors.safetensors").read_bytes(),
        steer_json=(local / "steer.json").read_bytes(),
    )


def test_malformed_other_rpcs(
    channel: grpc.Channel, server: SteerServer, tiny_llama: ModelHandle, tmp_path: Path
) -> None:
    models = models_pb2_grpc.ModelsStub(channel)
    directions = directions_pb2_grpc.DirectionsStub(channel)
    jobs = jobs_pb2_grpc.JobsStub(channel)
    good = _artifact_files(tmp_path, tiny_llama)

    def files(**changes: object) -> directions_pb2.UploadArtifactRequest:
        message = directions_pb2.ArtifactFiles()
        message.CopyFrom(good)
        for key, value in changes.items():
            setattr(message, key, value)
        return directions_pb2.UploadArtifactRequest(files=message)

    cases: list[tuple[str, Callable[[], object], Code]] = [
        (
            "info of unknown model",
            lambda: models.Info(models_pb2.ModelInfoRequest(model_id="nope")),
            Code.NOT_FOUND,
        ),
        (
            "unload unknown model",
            lambda: models.Unload(models_pb2.UnloadModelRequest(model_id="nope")),
            Code.NOT_FOUND,
        ),
        (
            "load without source",
            lambda: models.Load(models_pb2.LoadModelRequest()),
            Code.INVALID_ARGUMENT,
        ),
        (
            "load missing path",
            lambda: models.Load(models_pb2.LoadModelRequest(source="absent")),
            Code.NOT_FOUND,
        ),
        (
            "load escaping path",
            lambda: models.Load(models_pb2.LoadModelRequest(source="../..")),
            Code.INVALID_ARGUMENT,
        ),
        (
            "load absolute path",
            lambda: models.Load(models_pb2.LoadModelRequest(source="/etc")),
            Code.INVALID_ARGUMENT,
        ),
        (
            "load under a bad id",
            lambda: models.Load(models_pb2.LoadModelRequest(source="absent", model_id="a/b")),
            Code.INVALID_ARGUMENT,
        ),
        (
            "load an already used id",
            lambda: models.Load(
                models_pb2.LoadModelRequest(source="smollm2-135m-instruct", model_id="tiny")
            ),
            Code.ALREADY_EXISTS,
        ),
        (
            "load with unknown dtype",
            lambda: models.Load(
                models_pb2.LoadModelRequest(source="artifacts/good", model_id="d", dtype="int3")
            ),
            Code.INVALID_ARGUMENT,
        ),
        (
            "get unknown artifact",
            lambda: directions.Get(directions_pb2.GetArtifactRequest(artifact_id="missing")),
            Code.NOT_FOUND,
        ),
        (
            "get artifact with bad id",
            lambda: directions.Get(directions_pb2.GetArtifactRequest(artifact_id="..")),
            Code.INVALID_ARGUMENT,
        ),
        (
            "download unknown artifact",
            lambda: directions.Download(directions_pb2.GetArtifactRequest(artifact_id="missing")),
            Code.NOT_FOUND,
        ),
        (
            "upload corrupt tensors",
            lambda: directions.Upload(files(vectors_safetensors=b"not safetensors")),
            Code.INVALID_ARGUMENT,
        ),
        (
            "upload corrupt sidecar",
            lambda: directions.Upload(files(steer_json=b"{not json")),
            Code.INVALID_ARGUMENT,
        ),
        (
            "upload wrong format",
            lambda: directions.Upload(files(steer_json=json.dumps({"format": "x"}).encode())),
            Code.INVALID_ARGUMENT,
        ),
        (
            "upload traversal id",
            lambda: directions.Upload(files(artifact_id="../escape")),
            Code.INVALID_ARGUMENT,
        ),
        (
            "upload over existing",
            lambda: directions.Upload(files(artifact_id="good")),
            Code.ALREADY_EXISTS,
        ),
        (
            "compute without recipe",
            lambda: directions.Compute(directions_pb2.ComputeDirectionRequest(artifact_id="x")),
            None,
        ),
        ("unknown job", lambda: jobs.Get(jobs_pb2.JobRequest(job_id="nope")), Code.NOT_FOUND),
        (
            "cancel unknown job",
            lambda: jobs.Cancel(jobs_pb2.JobRequest(job_id="nope")),
            Code.NOT_FOUND,
        ),
        (
            "watch unknown job",
            lambda: jobs.Watch(jobs_pb2.JobRequest(job_id="nope")),
            Code.NOT_FOUND,
        ),
    ]
    for name, call, code in cases:
        error = _collect(call)
        if code is None:  # UNIMPLEMENTED without the directions library, else INVALID_ARGUMENT
            code = (
                Code.UNIMPLEMENTED if error.code() is Code.UNIMPLEMENTED else Code.INVALID_ARGUMENT
            )  # type: ignore[attr-defined]
        assert error.code() is code, (name, error.details())  # type: ignore[attr-defined]
    # Nothing half-written: failed uploads left no directory behind.
    artifacts = server.settings.artifacts_dir
    assert sorted(p.name for p in artifacts.iterdir()) == ["good", "narrow", "other-weights"]


def test_cases_cover_at_least_fifty_requests() -> None:
    assert len(GENERATE_CASES) + 4 + 21 >= 50


def test_server_still_serves_after_bad_requests(channel: grpc.Channel, server: SteerServer) -> None:
    stub = generation_pb2_grpc.GenerationStub(channel)
    for _name, request_message, _code, _field in GENERATE_CASES:
        _collect(partial(stub.Generate, request_message, timeout=30))
    responses = list(stub.Generate(g.GenerateRequest(text="Hello", max_new_tokens=3), timeout=30))
    assert responses[-1].finish_reason == g.FINISH_REASON_LENGTH
    assert sum(len(r.token_ids) for r in responses) == 3
    info = models_pb2_grpc.ModelsStub(channel).Info(models_pb2.ModelInfoRequest())
    assert info.stats.running == 0 and info.stats.failed_total == 0
