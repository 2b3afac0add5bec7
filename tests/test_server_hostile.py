"""Hostile artifacts and inputs (issue 14, defects 3, 6 and 9): each gets its specific status and
names the field, nothing half-made lands under the models root, no error detail shows where the
models root is, and the server then still serves a normal request."""

from __future__ import annotations

import json
import pickle
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from grpc import StatusCode as Code
from safetensors.torch import save
from test_sae import _random_sae
from test_server import direction_artifact, make_settings

from steer.models import ModelHandle
from steer.proto.v1 import (
    directions_pb2,
    directions_pb2_grpc,
    features_pb2,
    features_pb2_grpc,
    generation_pb2,
    generation_pb2_grpc,
    jobs_pb2,
    jobs_pb2_grpc,
)
from steer.server import SteerServer
from steer.vectors import SteeringVector

g = generation_pb2
d = directions_pb2
#: every error detail the tests below received (checked for the models root's path at the end)
DETAILS: list[str] = []
#: artifact directories put under the models root by hand, each corrupt in its own way
BROKEN_BY_HAND = ("broken-model", "broken-list", "broken-tensors", "broken-missing-tensors")


def _corrupt_artifacts(root: Path, handle: ModelHandle) -> None:
    for name in BROKEN_BY_HAND:
        direction_artifact(root, handle, name)
    artifacts = root / "artifacts"
    sidecar = json.loads((artifacts / "broken-model" / "steer.json").read_text())
    sidecar["model"] = "x"
    (artifacts / "broken-model" / "steer.json").write_text(json.dumps(sidecar))
    (artifacts / "broken-list" / "steer.json").write_text("[]")
    (artifacts / "broken-tensors" / "vectors.safetensors").write_bytes(b"\x00" * 64)
    (artifacts / "broken-missing-tensors" / "vectors.safetensors").unlink()


def _corrupt_saes(root: Path, handle: ModelHandle) -> None:
    saes = root / "saes"
    good = saes / "good"
    _random_sae("standard", handle.d_model).save_model(good)
    config = json.loads((good / "cfg.json").read_text())
    variants: dict[str, dict[str, bytes]] = {
        "pickled": {"sae_weights.safetensors": pickle.dumps({"W_enc": torch.zeros(2)})},
        "garbage-weights": {"sae_weights.safetensors": b"\xff" * 100},
        "config-list": {"cfg.json": b"[]"},
        "config-empty": {"cfg.json": b"{}"},
        "config-not-json": {"cfg.json": b"\xff{"},
        "config-architecture-list": {
            "cfg.json": json.dumps({**config, "architecture": ["topk"]}).encode()
        },
        "config-metadata-number": {"cfg.json": json.dumps({**config, "metadata": 5}).encode()},
        "config-negative": {"cfg.json": json.dumps({**config, "d_sae": -5}).encode()},
        "sidecar-list": {"steer_sae.json": b"[]"},
        "sidecar-model-string": {
            "steer_sae.json": json.dumps({"format": "steer.sae", "model": "x"}).encode()
        },
    }
    for name, files in variants.items():
        shutil.copytree(good, saes / name)
        for file_name, content in files.items():
            (saes / name / file_name).write_bytes(content)
    (saes / "a-file").write_bytes(b"not a directory")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hostile")


@pytest.fixture(scope="module")
def server(tiny_llama: ModelHandle, root: Path) -> Iterator[SteerServer]:
    direction_artifact(root, tiny_llama, "good")
    _corrupt_artifacts(root, tiny_llama)
    _corrupt_saes(root, tiny_llama)
    (root / "recipes" / "a-directory").mkdir(parents=True)
    (root / "recipes" / "binary.toml").write_bytes(b"\xff\xfe\x00name = 1\n\x80")
    with SteerServer(make_settings(root), models={"tiny": tiny_llama}) as running:
        yield running


@pytest.fixture(scope="module")
def channel(server: SteerServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target) as opened:
        yield opened


def _field(error: grpc.RpcError) -> str | None:
    for key, value in error.trailing_metadata() or ():  # type: ignore[attr-defined]
        if key == "steer-field":
            return str(value)
    return None


def expect_error(call: Callable[[], object], code: Code, field: str | None) -> grpc.RpcError:
    """Run ``call``; it must fail with ``code`` naming ``field`` (exactly)."""
    with pytest.raises(grpc.RpcError) as raised:
        result = call()
        if hasattr(result, "__iter__") and not hasattr(result, "ListFields"):
            list(result)  # type: ignore[call-overload]
    error: Any = raised.value
    DETAILS.append(error.details() or "")
    assert error.code() is code, error.details()
    assert _field(error) == field, (_field(error), error.details())
    return error  # type: ignore[no-any-return]


def assert_serves(channel: grpc.Channel) -> None:
    """A normal stream and a normal List still answer."""
    stub = generation_pb2_grpc.GenerationStub(channel)
    greedy = g.GenerateRequest(
        text="Hello", max_new_tokens=2, sampling=g.SamplingParams(temperature=0.0)
    )
    responses = list(stub.Generate(greedy, timeout=30))
    assert responses[-1].finish_reason == g.FINISH_REASON_LENGTH, responses
    assert sum(len(r.token_ids) for r in responses) == 2
    listed = directions_pb2_grpc.DirectionsStub(channel).List(d.ListArtifactsRequest(), timeout=30)
    assert [a.artifact_id for a in listed.artifacts] == ["good"]


def _good_files(root: Path) -> tuple[dict[str, Any], bytes]:
    directory = root / "artifacts" / "good"
    return json.loads((directory / "steer.json").read_text()), (
        directory / "vectors.safetensors"
    ).read_bytes()


def _upload(
    channel: grpc.Channel, steer_json: bytes, tensors: bytes, artifact_id: str = "fresh"
) -> object:
    files = d.ArtifactFiles(
        artifact_id=artifact_id, vectors_safetensors=tensors, steer_json=steer_json
    )
    stub = directions_pb2_grpc.DirectionsStub(channel)
    return stub.Upload(d.UploadArtifactRequest(files=files), timeout=30)


# -- defect 3: one bad upload broke Directions.List and Get for everyone ------------------------


def test_incomplete_sidecar_upload_is_refused_and_nothing_lands(
    channel: grpc.Channel, root: Path
) -> None:
    before = sorted(p.name for p in (root / "artifacts").iterdir())
    _sidecar, tensors = _good_files(root)
    steer_json = json.dumps({"format": "steer.vector", "model": "x"}).encode()
    expect_error(
        lambda: _upload(channel, steer_json, tensors),
        Code.INVALID_ARGUMENT,
        "files.steer_json.model",
    )
    assert sorted(p.name for p in (root / "artifacts").iterdir()) == before
    stub = directions_pb2_grpc.DirectionsStub(channel)
    expect_error(
        lambda: stub.Get(d.GetArtifactRequest(artifact_id="fresh"), timeout=30),
        Code.NOT_FOUND,
        "artifact_id",
    )
    assert_serves(channel)


def _sidecar_with(root: Path, **changes: Any) -> bytes:
    sidecar, _tensors = _good_files(root)
    return json.dumps({**sidecar, **changes}).encode()


def _tensors(**tensors: torch.Tensor) -> bytes:
    return save({name: value.contiguous() for name, value in tensors.items()})


SIDECAR_CASES: list[tuple[str, Callable[[Path], bytes], str]] = [
    ("a list", lambda root: b"[]", "files.steer_json"),
    ("null", lambda root: b"null", "files.steer_json"),
    ("invalid UTF-8", lambda root: b'{"format": "steer.vector\xff"}', "files.steer_json"),
    ("deeply nested", lambda root: b"[" * 100_000 + b"]" * 100_000, "files.steer_json"),
    (
        "nested deeper than the limit",
        lambda root: _sidecar_with(root, notes=json.loads("[" * 200 + "]" * 200)),
        "files.steer_json",
    ),
    ("an integer of 5000 digits", lambda root: b"1" * 5000, "files.steer_json"),
    ("no format", lambda root: _sidecar_with(root, format=None), "files.steer_json.format"),
    ("hooks a number", lambda root: _sidecar_with(root, hooks=5), "files.steer_json.hooks"),
    ("a hook not a string", lambda root: _sidecar_with(root, hooks=[5]), "files.steer_json.hooks"),
    (
        "d_model a string",
        lambda root: _sidecar_with(root, d_model="64"),
        "files.steer_json.d_model",
    ),
    (
        "d_model not the tensors'",
        lambda root: _sidecar_with(root, d_model=7),
        "files.steer_json.d_model",
    ),
    ("name a list", lambda root: _sidecar_with(root, name=[]), "files.steer_json.name"),
    (
        "weight hash a number",
        lambda root: _sidecar_with(root, model={"name": "m", "weight_hash": 5}),
        "files.steer_json.model.weight_hash",
    ),
]


@pytest.mark.parametrize(
    ("make_sidecar", "field"),
    [case[1:] for case in SIDECAR_CASES],
    ids=[case[0] for case in SIDECAR_CASES],
)
def test_bad_sidecar_upload_names_the_field(
    channel: grpc.Channel, root: Path, make_sidecar: Callable[[Path], bytes], field: str
) -> None:
    _sidecar, tensors = _good_files(root)
    expect_error(
        lambda: _upload(channel, make_sidecar(root), tensors), Code.INVALID_ARGUMENT, field
    )
    assert not (root / "artifacts" / "fresh").exists()
    assert not list((root / "artifacts").glob(".upload-*"))
    assert_serves(channel)


TENSOR_CASES: list[tuple[str, bytes]] = [
    ("layer.abc", _tensors(**{"layer.abc": torch.ones(64)})),
    ("negative layer", _tensors(**{"layer.-1": torch.ones(64)})),
    ("layer with underscore", _tensors(**{"layer.1_0": torch.ones(64)})),
    ("integer tensor", _tensors(**{"layer.1": torch.ones(64, dtype=torch.int32)})),
    ("matrix", _tensors(**{"layer.1": torch.ones(8, 8)})),
    ("no tensors", save({})),
    ("not safetensors", pickle.dumps({"layer.1": torch.ones(64)})),
]


@pytest.mark.parametrize(
    "tensors", [case[1] for case in TENSOR_CASES], ids=[case[0] for case in TENSOR_CASES]
)
def test_bad_tensor_upload_names_the_field(
    channel: grpc.Channel, root: Path, tensors: bytes
) -> None:
    sidecar, _tensors = _good_files(root)
    steer_json = json.dumps({**sidecar, "d_model": None}).encode()
    expect_error(
        lambda: _upload(channel, steer_json, tensors),
        Code.INVALID_ARGUMENT,
        "files.vectors_safetensors",
    )
    assert not (root / "artifacts" / "fresh").exists()
    assert_serves(channel)


def test_list_reports_hand_made_corrupt_artifacts_as_broken(channel: grpc.Channel) -> None:
    listed = directions_pb2_grpc.DirectionsStub(channel).List(d.ListArtifactsRequest(), timeout=30)
    assert [a.artifact_id for a in listed.artifacts] == ["good"]
    reasons = {b.artifact_id: b.reason for b in listed.broken}
    assert sorted(reasons) == sorted(BROKEN_BY_HAND)
    assert "model" in reasons["broken-model"]
    assert "JSON object" in reasons["broken-list"]
    assert "vectors.safetensors" in reasons["broken-tensors"]
    DETAILS.extend(reasons.values())
    assert_serves(channel)


@pytest.mark.parametrize("artifact_id", BROKEN_BY_HAND)
def test_get_download_or_use_of_a_broken_artifact_is_failed_precondition(
    channel: grpc.Channel, artifact_id: str
) -> None:
    stub = directions_pb2_grpc.DirectionsStub(channel)
    error = expect_error(
        lambda: stub.Get(d.GetArtifactRequest(artifact_id=artifact_id), timeout=30),
        Code.FAILED_PRECONDITION,
        "artifact_id",
    )
    assert artifact_id in (error.details() or "")  # type: ignore[attr-defined]
    expect_error(
        lambda: stub.Download(d.GetArtifactRequest(artifact_id=artifact_id), timeout=30),
        Code.FAILED_PRECONDITION,
        "artifact_id",
    )
    ablate = g.Intervention(ablate=g.AblateDirection(artifact_id=artifact_id))
    generate = generation_pb2_grpc.GenerationStub(channel).Generate
    expect_error(
        lambda: generate(g.GenerateRequest(text="Hi", interventions=[ablate]), timeout=30),
        Code.FAILED_PRECONDITION,
        "interventions[0].ablate.artifact_id",
    )
    assert_serves(channel)


def test_upload_can_replace_a_broken_artifact(channel: grpc.Channel, root: Path) -> None:
    """The way out for an operator: overwrite the broken one with good files."""
    sidecar, tensors = _good_files(root)
    files = d.ArtifactFiles(
        artifact_id="repaired", vectors_safetensors=tensors, steer_json=json.dumps(sidecar).encode()
    )
    stub = directions_pb2_grpc.DirectionsStub(channel)
    shutil.copytree(root / "artifacts" / "broken-list", root / "artifacts" / "repaired")
    info = stub.Upload(d.UploadArtifactRequest(files=files, overwrite=True), timeout=30)
    assert info.artifact_id == "repaired" and info.d_model == 64
    listed = stub.List(d.ListArtifactsRequest(), timeout=30)
    assert [a.artifact_id for a in listed.artifacts] == ["good", "repaired"]
    shutil.rmtree(root / "artifacts" / "repaired")


# -- defect 6: INTERNAL paths -------------------------------------------------------------------

SCENE_CASES: list[tuple[str, str, str]] = [
    ("no characters", json.dumps({"characters": []}), "roleplay.characters"),
    # under the server's size limit for prompts (8192 characters here), over the recursion limit
    ("deeply nested", "[" * 4000 + "]" * 4000, "roleplay.scene_json"),
    ("nested object", '{"a":' * 1200 + "1" + "}" * 1200, "roleplay.scene_json"),
    ("nested past the depth limit", '{"a":' * 100 + "1" + "}" * 100, "roleplay.scene_json"),
    ("huge integer", '{"characters": ' + "1" * 5000 + "}", "roleplay.scene_json"),
    (
        "description a number",
        json.dumps({"characters": [{"name": "Ada", "description": 5}]}),
        "roleplay.characters[0].description",
    ),
    (
        "turn content a list",
        json.dumps({"characters": [{"name": "Ada"}], "turns": [{"speaker": "Ada", "content": []}]}),
        "roleplay.turns[0].content",
    ),
    (
        "tags a number",
        json.dumps({"characters": [{"name": "Ada"}], "tags": 5}),
        "roleplay.tags",
    ),
    (
        "tags of lists",
        json.dumps({"characters": [{"name": "Ada"}], "tags": [[1]]}),
        "roleplay.tags",
    ),
    (
        "turn length a number",
        json.dumps(
            {
                "characters": [{"name": "Ada"}],
                "turns": [{"speaker": "Ada", "content": "x", "length": 3}],
            }
        ),
        "roleplay.turns[0].length",
    ),
]


@pytest.mark.parametrize(
    ("scene_json", "field"),
    [case[1:] for case in SCENE_CASES],
    ids=[case[0] for case in SCENE_CASES],
)
def test_bad_roleplay_scene_names_the_field(
    channel: grpc.Channel, scene_json: str, field: str
) -> None:
    request = g.GenerateRequest(roleplay=g.RolePlayPrompt(scene_json=scene_json), max_new_tokens=2)
    generate = generation_pb2_grpc.GenerationStub(channel).Generate
    expect_error(lambda: generate(request, timeout=30), Code.INVALID_ARGUMENT, field)
    assert_serves(channel)


@pytest.mark.parametrize("recipe_path", ["recipes/a-directory", "recipes/binary.toml", "."])
def test_recipe_path_that_is_no_text_file_is_invalid_argument(
    channel: grpc.Channel, recipe_path: str
) -> None:
    stub = directions_pb2_grpc.DirectionsStub(channel)
    request = d.ComputeDirectionRequest(recipe_path=recipe_path, artifact_id="computed")
    expect_error(lambda: stub.Compute(request, timeout=30), Code.INVALID_ARGUMENT, "recipe_path")
    assert_serves(channel)


SAE_CASES: list[tuple[str, Code, str]] = [
    ("saes/pickled", Code.INVALID_ARGUMENT, "path"),
    ("saes/garbage-weights", Code.INVALID_ARGUMENT, "path"),
    ("saes/config-list", Code.INVALID_ARGUMENT, "path"),
    ("saes/config-empty", Code.INVALID_ARGUMENT, "sae.d_in"),
    ("saes/config-not-json", Code.INVALID_ARGUMENT, "path"),
    ("saes/config-architecture-list", Code.INVALID_ARGUMENT, "sae.architecture"),
    ("saes/config-metadata-number", Code.INVALID_ARGUMENT, "sae.metadata"),
    ("saes/config-negative", Code.INVALID_ARGUMENT, "sae.d_sae"),
    ("saes/sidecar-list", Code.INVALID_ARGUMENT, "path"),
    ("saes/sidecar-model-string", Code.INVALID_ARGUMENT, "sae.model"),
    ("saes/a-file", Code.INVALID_ARGUMENT, "path"),
    ("recipes/a-directory", Code.NOT_FOUND, "path"),
]


@pytest.mark.parametrize(("path", "code", "field"), SAE_CASES, ids=[case[0] for case in SAE_CASES])
def test_load_sae_of_a_corrupt_directory_names_the_path(
    channel: grpc.Channel, path: str, code: Code, field: str
) -> None:
    """The field is the request's ``path``, or the cfg.json/steer_sae.json key at fault."""
    stub = features_pb2_grpc.FeaturesStub(channel)
    error = expect_error(
        lambda: stub.LoadSae(features_pb2.LoadSaeRequest(path=path), timeout=60), code, field
    )
    assert path in (error.details() or "")  # type: ignore[attr-defined]
    assert not stub.ListSaes(features_pb2.ListSaesRequest(), timeout=30).saes
    assert_serves(channel)


# -- defect 9: no absolute server paths in errors -----------------------------------------------


DATA_CASES: list[tuple[str, bytes]] = [
    ("not json", b"not json\n"),
    ("binary", b"\xff\xfe\x00\n"),
    ("deeply nested", b"[" * 5000 + b"]" * 5000 + b"\n"),
    ("huge integer", b'{"prompt": ' + b"1" * 5000 + b"}\n"),
]


@pytest.mark.parametrize(
    "content", [case[1] for case in DATA_CASES], ids=[c[0] for c in DATA_CASES]
)
def test_a_bad_data_file_fails_its_job_naming_it_relative_to_the_root(
    channel: grpc.Channel, root: Path, content: bytes
) -> None:
    """The job fails with INVALID_ARGUMENT (not INTERNAL) and names the file as the recipe did."""
    (root / "data").mkdir(exist_ok=True)
    (root / "data" / "garbage.jsonl").write_bytes(content)
    recipe = '[data]\npositive = "data/garbage.jsonl"\nnegative = "data/garbage.jsonl"\n'
    stub = directions_pb2_grpc.DirectionsStub(channel)
    job = stub.Compute(d.ComputeDirectionRequest(recipe_toml=recipe, artifact_id="job-out"))
    jobs = jobs_pb2_grpc.JobsStub(channel)
    final = list(jobs.Watch(jobs_pb2.JobRequest(job_id=job.job_id), timeout=120))[-1]
    assert final.state == jobs_pb2.JOB_STATE_FAILED, final
    assert final.error_code == "INVALID_ARGUMENT", final.error
    assert final.error.startswith("data.positive: data/garbage.jsonl"), final.error
    DETAILS.append(final.error)
    assert_serves(channel)


def test_no_error_detail_shows_the_models_root(root: Path) -> None:
    """Runs last: every detail collected above is free of the root's absolute path."""
    assert len(DETAILS) > 40
    for absolute in {str(root), str(root.resolve())}:
        leaked = [detail for detail in DETAILS if absolute in detail]
        assert not leaked, leaked
    assert not [detail for detail in DETAILS if ".upload-" in detail]


# -- found by the fuzzer (scripts/fuzz_service.py) ------------------------------------------------


def test_health_bytes_that_do_not_parse_are_invalid_argument(channel: grpc.Channel) -> None:
    check = channel.unary_unary("/grpc.health.v1.Health/Check")
    expect_error(lambda: check(b"\x00", timeout=10), Code.INVALID_ARGUMENT, None)
    assert_serves(channel)


def test_a_control_vector_gguf_is_not_a_model(
    channel: grpc.Channel, root: Path, tiny_llama: ModelHandle
) -> None:
    from steer.bake.control_vector import write_control_vector
    from steer.proto.v1 import bake_pb2, bake_pb2_grpc, models_pb2, models_pb2_grpc

    vector = SteeringVector(per_layer={1: torch.ones(tiny_llama.d_model)})
    write_control_vector(root / "cv.gguf", vector, model_hint="tiny")
    models = models_pb2_grpc.ModelsStub(channel)
    request = models_pb2.LoadModelRequest(source="cv.gguf", model_id="second")
    error = expect_error(lambda: models.Load(request, timeout=60), Code.INVALID_ARGUMENT, "source")
    assert "control vector" in (error.details() or "")
    recipe = 'name = "x"\n[[edits]]\nkind = "add"\nvector = "good"\nlayers = [1]\n'
    job = bake_pb2_grpc.BakeStub(channel).Bake(
        bake_pb2.BakeRequest(model_source="cv.gguf", recipe_toml=recipe, output="from-cv"),
        timeout=60,
    )
    jobs = jobs_pb2_grpc.JobsStub(channel)
    final = list(jobs.Watch(jobs_pb2.JobRequest(job_id=job.job_id), timeout=120))[-1]
    assert final.state == jobs_pb2.JOB_STATE_FAILED
    assert final.error_code == "INVALID_ARGUMENT", final.error
    assert_serves(channel)
