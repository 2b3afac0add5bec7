"""Named sliders of kind ``recipe``: an edit recipe (gates included) moved by name over HTTP and
gRPC, equal to the recipe the evaluations apply (``EditRecipe.for_model``), scaled by the
slider's value, bit-identical to no slider at 0; and the mistakes an operator's file or a request
can make, each named."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import openai
import pytest
import torch
from test_server import GREEDY, PROMPTS, alone, direction_artifact, make_settings

from steer.activations import forward
from steer.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from steer.gates import GateScope
from steer.generation import GenerationRequest
from steer.interventions import Intervention
from steer.models import ModelHandle
from steer.proto.v1 import generation_pb2, generation_pb2_grpc
from steer.recipes import (
    AblateEdit,
    AddEdit,
    EditGate,
    EditRecipe,
    FeatureEdit,
    Kernel,
    load_edit_recipe,
    recipe_to_toml,
)
from steer.server import SteerServer
from steer.service.sliders import SliderCatalogue

g = generation_pb2
HOOK = "blocks.1.hook_resid_pre"
TWO = PROMPTS[:2]


def _threshold(handle: ModelHandle, artifact: Path) -> float:
    """Halfway between the two prompts' last-token projections at HOOK: a prompt gate there
    fires for exactly one of them."""
    from steer.artifacts import load_vector

    direction = load_vector(artifact).vector.at(1)
    ids = [list(handle.tokenizer(p)["input_ids"]) for p in TWO]
    last = forward(handle, ids, hooks=[HOOK]).activations[HOOK]
    assert isinstance(last, torch.Tensor)
    first, second = (last @ (direction / direction.norm())).tolist()
    assert first != second
    return (first + second) / 2


@pytest.fixture(scope="module")
def setup(
    tiny_llama: ModelHandle, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[SteerServer, EditRecipe]]:
    root = tmp_path_factory.mktemp("recipe-sliders")
    direction = direction_artifact(root, tiny_llama, "lecture")
    gate = EditGate(HOOK, str(direction), _threshold(tiny_llama, direction), scope=GateScope.PROMPT)
    edits = (
        AblateEdit(direction=str(direction), weight=1.0, gate=gate),
        AddEdit(vector=str(direction), strength=-2.0, gate=gate),
    )
    recipe_dir = root / "gates"
    recipe_dir.mkdir()
    (recipe_dir / "gated.toml").write_text(recipe_to_toml(EditRecipe(edits=edits)))
    sliders_file = root / "sliders.toml"
    sliders_file.write_text(
        '[sliders.lectures]\nkind = "recipe"\nrecipe = "gates/gated.toml"\nmin = 0.0\nmax = 1.5\n'
    )
    settings = make_settings(root, http_port=0)
    catalogue = SliderCatalogue.load(sliders_file)
    recipe = load_edit_recipe(recipe_dir / "gated.toml")
    with SteerServer(settings, models={"tiny": tiny_llama}, sliders=catalogue) as server:
        yield server, recipe


def _http(server: SteerServer, prompt: str, **extra: object) -> str:
    with openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="x", max_retries=0) as client:
        completion = client.completions.create(
            model="tiny", prompt=prompt, max_tokens=10, temperature=0, extra_body=extra or None
        )
    return completion.choices[0].text


def _local(handle: ModelHandle, prompt: str, recipe: EditRecipe | None) -> str:
    interventions = () if recipe is None else tuple(recipe.for_model(handle))
    request = GenerationRequest(
        prompt=prompt, sampling=GREEDY, max_new_tokens=10, interventions=interventions
    )
    return handle.tokenizer.decode(alone(handle, request), skip_special_tokens=True)


def test_recipe_slider_equals_the_recipe_in_process_gate_included(
    setup: tuple[SteerServer, EditRecipe], tiny_llama: ModelHandle
) -> None:
    server, recipe = setup
    ungated = recipe.ungated()
    fired = 0
    for prompt in TWO:
        slid = _http(server, prompt, **{"steer.lectures": 1.0})
        assert slid == _local(tiny_llama, prompt, recipe)
        plain, always = _local(tiny_llama, prompt, None), _local(tiny_llama, prompt, ungated)
        assert plain != always  # the edit changes this prompt's reply when it acts
        assert slid in (plain, always)
        fired += slid == always
    assert fired == 1  # the gate fires on exactly one of the two prompts


def test_recipe_slider_over_grpc_equals_http(setup: tuple[SteerServer, EditRecipe]) -> None:
    server, _recipe = setup
    with grpc.insecure_channel(server.target) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        for prompt in TWO:
            named = g.Intervention(named=g.NamedSlider(name="lectures", value=0.7))
            message = g.GenerateRequest(
                text=prompt,
                max_new_tokens=10,
                sampling=g.SamplingParams(temperature=0.0),
                interventions=[named],
            )
            remote = "".join(response.text for response in stub.Generate(message))
            assert remote == _http(server, prompt, **{"steer.lectures": 0.7})


def test_recipe_slider_value_scales_every_edit(
    setup: tuple[SteerServer, EditRecipe], tiny_llama: ModelHandle
) -> None:
    server, recipe = setup
    ungated = recipe.ungated()
    prompt = next(
        p
        for p in TWO
        if _local(tiny_llama, p, ungated) == _http(server, p, **{"steer.lectures": 1.0})
    )
    half = _http(server, prompt, **{"steer.lectures": 0.5})
    assert half == _local(tiny_llama, prompt, recipe.scaled(0.5))
    assert half != _local(tiny_llama, prompt, recipe)


def test_recipe_slider_at_zero_is_bit_identical_to_no_slider(
    setup: tuple[SteerServer, EditRecipe],
) -> None:
    server, _recipe = setup
    with openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="x", max_retries=0) as client:

        def top(**extra: object) -> object:
            completion = client.completions.create(
                model="tiny",
                prompt=TWO[0],
                max_tokens=4,
                temperature=0,
                logprobs=5,
                extra_body=extra or None,
            )
            return completion.choices[0].logprobs

        assert top(**{"steer.lectures": 0.0}) == top()


def test_recipe_slider_is_listed(setup: tuple[SteerServer, EditRecipe]) -> None:
    server, _recipe = setup
    sliders = httpx.get(f"{server.http_url}/v1/steer/sliders").json()["data"]
    assert [(s["name"], s["kind"], s["neutral"]) for s in sliders] == [("lectures", "recipe", 0.0)]


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"steer.lectures": 2.0}, "steer.lectures"),
        ({"steer.lectures": -0.5}, "steer.lectures"),
        (
            {
                "steering": [
                    {
                        "gated": {
                            "condition": {"hook": HOOK, "inline": {"shared": [1.0] * 64}},
                            "inner": {"named": {"name": "lectures", "value": 1.0}},
                            "scope": "GATE_SCOPE_PROMPT",
                        }
                    }
                ]
            },
            "steering[0].gated.inner.named.name",
        ),
        (
            {"steering": [{"named": {"name": "lectures", "value": 1.0}, "speaker": "Vex"}]},
            "steering[0].speaker",
        ),
    ],
)
def test_bad_recipe_slider_requests_are_400_naming_the_field(
    setup: tuple[SteerServer, EditRecipe], extra: dict[str, object], param: str
) -> None:
    server, _recipe = setup
    body = {"model": "tiny", "prompt": "Hi", "max_tokens": 2, "temperature": 0, **extra}
    content = httpx.post(f"{server.http_url}/v1/completions", json=body)
    assert content.status_code == 400, content.text
    error = content.json()
    assert str(error.get("param") or error.get("error", {}).get("param")).startswith(param), error
    assert httpx.get(f"{server.http_url}/health").json() == {"status": "ok"}


def test_recipe_made_for_other_weights_is_a_failed_precondition(
    tiny_llama: ModelHandle, tmp_path: Path
) -> None:
    """A recipe slider's artifacts are checked against the request's model (allow_other_model
    lets them through, as for an artifact id)."""
    artifact = direction_artifact(tmp_path, tiny_llama, "other")
    sidecar = artifact / "steer.json"
    record = json.loads(sidecar.read_text())
    record["model"]["weight_hash"] = "0" * 64
    sidecar.write_text(json.dumps(record))
    recipe = EditRecipe(edits=(AddEdit(vector=str(artifact), strength=1.0, layers=(1,)),))
    with pytest.raises(FailedPreconditionError):
        recipe.for_model(tiny_llama)
    assert len(recipe.for_model(tiny_llama, allow_other_model=True)) == 1


def test_recipe_slider_interventions_are_built_once_per_model_and_value(
    tiny_llama: ModelHandle, tmp_path: Path
) -> None:
    """The artifacts are read on first use and kept: the same value gives the same
    interventions without reading the disk again (the artifact removed in between); a new value
    is built anew; a build that fails keeps nothing; the oldest value goes past the cache size."""
    import shutil

    from steer.service import sliders as sliders_module

    artifact = direction_artifact(tmp_path, tiny_llama, "kept")
    recipe_file = tmp_path / "r.toml"
    recipe_file.write_text(recipe_to_toml(EditRecipe(edits=(AblateEdit(direction=str(artifact)),))))
    catalogue = _catalogue(tmp_path, {"kind": "recipe", "recipe": "r.toml", "max": 200.0})
    slider = catalogue.get("s", "s")
    builds: list[float] = []

    def build(recipe: EditRecipe) -> list[Intervention]:
        builds.append(recipe.edits[0].weight)
        return recipe.for_model(tiny_llama)

    first = catalogue.recipe_interventions(slider, 0.5, tiny_llama, build, field="v")
    copy = tmp_path / "copy"
    shutil.copytree(artifact, copy)
    shutil.rmtree(artifact)
    again = catalogue.recipe_interventions(slider, 0.5, tiny_llama, build, field="v")
    assert builds == [0.5] and len(first) == len(again) > 0
    assert all(a is b for a, b in zip(first, again, strict=True))
    assert catalogue.recipe_interventions(slider, 0.0, tiny_llama, build, field="v") == []
    with pytest.raises(NotFoundError):  # the artifact is gone: a new value cannot be built
        catalogue.recipe_interventions(slider, 0.7, tiny_llama, build, field="v")
    shutil.copytree(copy, artifact)
    catalogue.recipe_interventions(slider, 0.7, tiny_llama, build, field="v")
    assert builds == [0.5, 0.7, 0.7]
    for value in range(1, sliders_module.RECIPE_CACHE_SIZE + 1):
        catalogue.recipe_interventions(slider, float(value), tiny_llama, build, field="v")
    catalogue.recipe_interventions(slider, 0.7, tiny_llama, build, field="v")
    assert builds[-1] == 0.7 and len(builds) == 3 + sliders_module.RECIPE_CACHE_SIZE + 1
    with pytest.raises(InvalidArgumentError) as raised:
        catalogue.recipe_interventions(slider, 201.0, tiny_llama, build, field="v")
    assert raised.value.field == "v"


def _catalogue(tmp_path: Path, table: dict[str, object]) -> SliderCatalogue:
    return SliderCatalogue.from_dict({"sliders": {"s": table}}, base=tmp_path)


@pytest.mark.parametrize(
    ("table", "field"),
    [
        ({"kind": "recipe"}, "sliders.s.recipe"),
        ({"kind": "recipe", "recipe": "missing.toml"}, "sliders.s.recipe"),
        ({"kind": "recipe", "recipe": "bad.toml"}, "sliders.s.recipe.edits[0].weight"),
        ({"kind": "recipe", "recipe": "ok.toml", "artifact": "x"}, "sliders.s"),
        (
            {"kind": "recipe", "recipe": "ok.toml", "allow_other_model": 1},
            "sliders.s.allow_other_model",
        ),
    ],
)
def test_bad_recipe_sliders_in_the_operators_file_are_named(
    tmp_path: Path, table: dict[str, object], field: str
) -> None:
    (tmp_path / "bad.toml").write_text(
        '[[edits]]\nkind = "ablate"\ndirection = "d"\nweight = "x"\n'
    )
    (tmp_path / "ok.toml").write_text('[[edits]]\nkind = "ablate"\ndirection = "d"\n')
    with pytest.raises(InvalidArgumentError) as raised:
        _catalogue(tmp_path, table)
    assert raised.value.field == field, raised.value


def test_scaled_multiplies_every_amount_and_keeps_the_gate() -> None:
    gate = EditGate(HOOK, "c", 1.5, scope=GateScope.PROMPT)
    kernel = Kernel(max_weight=1.0, min_weight=0.5, peak_layer=2.0, width=3.0)
    recipe = EditRecipe(
        edits=(
            AblateEdit(direction="d", weight=1.2, kernel=kernel, mlp_kernel=kernel, gate=gate),
            AblateEdit(direction="d", embedding_weight=0.4),
            AddEdit(vector="v", strength=-2.0, gate=gate),
            FeatureEdit(sae="s", feature=3, value=4.0),
        )
    )
    assert recipe.scaled(1.0) is recipe
    half = recipe.scaled(0.5)
    first, second, add, feature = half.edits
    assert isinstance(first, AblateEdit) and isinstance(second, AblateEdit)
    assert first.weight == 0.6 and first.gate == gate and add.gate == gate
    assert first.kernel == Kernel(0.5, 0.25, 2.0, 3.0) == first.mlp_kernel
    assert first.layer_weight(2) == 0.5 and first.layer_weight(2, mlp=True) == 0.5
    assert second.weight == 0.5 and second.embedding_weight == 0.2
    assert isinstance(add, AddEdit) and add.strength == -1.0
    assert isinstance(feature, FeatureEdit) and feature.value == 2.0
