"""Directions.Compute and Bake through the server: jobs with progress, results, confinement."""

from __future__ import annotations

import importlib.util
import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from test_server import direction_artifact, make_settings
from tiny import tiny_handle

from steer.artifacts import load_vector
from steer.client import AlreadyExists, InvalidArgument, SteerClient, ablate
from steer.errors import NotFoundError
from steer.models import ModelHandle, load_model
from steer.proto.v1 import jobs_pb2
from steer.server import SteerServer
from steer.service.jobs import JobRunner, JobState


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SteerServer]:
    root = tmp_path_factory.mktemp("jobs")
    handle = tiny_handle("llama", seed=21)
    handle.model.save_pretrained(root / "tiny-llama")
    handle.tokenizer.save_pretrained(root / "tiny-llama")
    direction_artifact(root, handle, "made-here", seed=3)
    data = root / "data"
    data.mkdir()
    (data / "fire.txt").write_text("\n".join(f"The dragon breathed fire on {i}" for i in range(8)))
    (data / "bread.txt").write_text("\n".join(f"How do I bake bread {i}" for i in range(8)))
    with SteerServer(make_settings(root), models={"tiny": handle}) as server:
        yield server


@pytest.fixture
def client(served: SteerServer) -> Iterator[SteerClient]:
    with SteerClient(served.target, timeout=120) as connected:
        yield connected


CONTRAST = """
name = "fire"
kind = "contrast"
[data]
positive = "data/fire.txt"
negative = "data/bread.txt"
train = 0.5
validation = 0.25
filter = false
[search]
layers = [1, 2]
positions = [-1]
top_k = 1
[evaluate]
max_new_tokens = 2
kl_tokens = 2
"""


@pytest.mark.skipif(not _has("steer.directions.api"), reason="directions library not present")
def test_compute_direction_job_then_use_it(client: SteerClient, served: SteerServer) -> None:
    job = client.compute_direction(CONTRAST, "fire")
    states = list(client.watch_job(job.job_id))
    final = states[-1]
    assert final.state == jobs_pb2.JOB_STATE_SUCCEEDED, final.error
    assert len(states) > 2 and any(0 < s.progress < 1 for s in states)
    assert final.result == "fire"
    assert json.loads(final.result_metadata)["kind"] == "direction"
    root = str(served.settings.models_root.resolve())
    saved = (served.settings.artifacts_dir / "fire" / "steer.json").read_text()
    assert root not in saved and "data" in json.loads(saved)["recipe"]  # paths relative to it
    info = client.artifact("fire")
    assert info.d_model == 64
    handle = served.registry.get("tiny").handle
    vector = load_vector(served.settings.artifacts_dir / "fire", handle=handle).vector
    assert torch.isfinite(vector.at(info.layers[0] if info.layers else 1)).all()
    completion = client.complete(
        "The dragon", temperature=0, max_new_tokens=3, interventions=[ablate("fire")]
    )
    assert completion[None].completion_tokens == 3


@pytest.mark.skipif(not _has("steer.directions.api"), reason="directions library not present")
def test_compute_refuses_data_outside_the_root(client: SteerClient, tmp_path: Path) -> None:
    (tmp_path / "secret.txt").write_text("x\n")
    for path in ("../secret.txt", str(tmp_path / "secret.txt"), "recipes:../../secret"):
        recipe = CONTRAST.replace('"data/fire.txt"', json.dumps(path))
        with pytest.raises(InvalidArgument) as refused:
            client.compute_direction(recipe, "nope")
        assert refused.value.field is not None and refused.value.field.startswith("recipe")
    # every data field that names a file is confined, the extra and gate sets too
    for key in (
        "positive_extra", "negative_extra", "gate_fire", "gate_quiet", "gate_harmless",
        "gate_scenarios",
    ):  # fmt: skip
        recipe = CONTRAST.replace("filter = false", f'filter = false\n{key} = "../secret.txt"')
        with pytest.raises(InvalidArgument) as refused:
            client.compute_direction(recipe, "nope")
        assert refused.value.field == f"recipe.data.{key}", key
    # and each set of a list of them
    listed = '["data/fire.txt", "../secret.txt"]'
    recipe = CONTRAST.replace("filter = false", f"filter = false\npositive_extra = {listed}")
    with pytest.raises(InvalidArgument) as refused:
        client.compute_direction(recipe, "nope")
    assert refused.value.field == "recipe.data.positive_extra[1]"
    with pytest.raises(InvalidArgument) as bad:
        client.compute_direction("this is = = not toml", "nope")
    assert bad.value.field == "recipe_toml"


@pytest.mark.skipif(not _has("steer.bake.api"), reason="bake library not present")
def test_bake_job_writes_model_under_the_root(client: SteerClient, served: SteerServer) -> None:
    recipe = 'name = "b"\n[[edits]]\nkind = "ablate"\ndirection = "made-here"\n'
    job = client.bake("tiny-llama", recipe, "baked/tiny-ablated")
    final = list(client.watch_job(job.job_id))[-1]
    assert final.state == jobs_pb2.JOB_STATE_SUCCEEDED, final.error
    assert final.result == "baked/tiny-ablated"
    assert final.result_metadata  # provenance JSON
    json.loads(final.result_metadata)
    baked = load_model(served.settings.models_root / final.result)
    assert isinstance(baked, ModelHandle) and baked.d_model == 64
    with pytest.raises(AlreadyExists) as exists:  # refused at once, not a job that fails later
        client.bake("tiny-llama", recipe, "baked/tiny-ablated")
    assert exists.value.field == "output"


@pytest.mark.skipif(not _has("steer.bake.api"), reason="bake library not present")
def test_bake_paths_are_confined(client: SteerClient) -> None:
    recipe = 'name = "b"\n[[edits]]\nkind = "ablate"\ndirection = "made-here"\n'
    with pytest.raises(InvalidArgument) as outside:
        client.bake("tiny-llama", recipe, "../escaped")
    assert outside.value.field == "output"
    with pytest.raises(InvalidArgument) as source:
        client.bake("/etc", recipe, "baked/x")
    assert source.value.field == "model_source"
    sneaky = 'name = "b"\n[[edits]]\nkind = "ablate"\ndirection = "../../elsewhere"\n'
    with pytest.raises(InvalidArgument) as edit:
        client.bake("tiny-llama", sneaky, "baked/y")
    assert edit.value.field == "recipe.edits[0].direction"


@pytest.mark.skipif(not _has("steer.bake.api"), reason="bake library not present")
def test_a_gated_recipe_is_refused_at_once_and_its_gate_direction_confined(
    client: SteerClient,
) -> None:
    edit = 'name = "b"\n[[edits]]\nkind = "ablate"\ndirection = "made-here"\n'
    gate = '[edits.gate]\nhook = "blocks.1.hook_resid_post"\nthreshold = 0.5\n'
    with pytest.raises(InvalidArgument) as gated:
        client.bake("tiny-llama", f'{edit}{gate}direction = "made-here"\n', "baked/g")
    assert gated.value.field == "recipe.edits[0].gate"
    assert "weights cannot hold a gate" in str(gated.value)
    with pytest.raises(InvalidArgument) as sneaky:
        client.bake("tiny-llama", f'{edit}{gate}direction = "../../elsewhere"\n', "baked/g")
    assert sneaky.value.field == "recipe.edits[0].gate.direction"


def test_finished_jobs_are_kept_up_to_a_count_running_ones_always() -> None:
    runner = JobRunner(workers=2, keep_finished=3)
    release = threading.Event()

    def blocked(
        progress: Callable[[str, float], None], cancelled: threading.Event
    ) -> tuple[str, str]:
        release.wait(30)
        return "slow", "{}"

    try:
        slow = runner.start("slow", blocked)
        quick = []
        for _ in range(6):  # one at a time: a finished job may be dropped before it is watched
            job = runner.start("quick", lambda _progress, _cancelled: ("ok", "{}"))
            assert list(runner.watch(job.job_id))[-1].state is JobState.SUCCEEDED
            quick.append(job)
        kept = {snapshot.job_id for snapshot in runner.list()}
        assert kept == {slow.job_id, *(job.job_id for job in quick[-3:])}  # the latest finished
        with pytest.raises(NotFoundError, match="latest 3 finished"):
            runner.get(quick[0].job_id)
        assert runner.get(slow.job_id).state is JobState.RUNNING
        release.set()
        assert list(runner.watch(slow.job_id))[-1].state is JobState.SUCCEEDED
        assert len(runner.list()) == 3 and runner.get(slow.job_id).result == "slow"
    finally:
        release.set()
        runner.close()
