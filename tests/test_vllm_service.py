"""gRPC and HTTP over ``backend="vllm"`` on the real SmolLM2: isolation and bad input.

Concurrent streams with their own steering equal the hf engine running each alone; what the
backend lacks is a FAILED_PRECONDITION / 400 naming the field; the server keeps serving."""

from __future__ import annotations

import concurrent.futures
import copy
import importlib.util
from collections.abc import Iterator

import httpx
import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig
from st_bodies import TEXT_COMPLETION_BODIES

from steer.activations import forward
from steer.artifacts import save_vector
from steer.client import FailedPrecondition, SteerClient, ablate, add, gated, slider
from steer.client.results import Completion
from steer.gates import GateScope
from steer.generation import Engine, GenerationRequest, Message
from steer.interventions import Ablate, Add, Intervention, Phase
from steer.models import ModelHandle
from steer.recipes import AddEdit, EditGate, EditRecipe, load_edit_recipe, recipe_to_toml
from steer.sae import Clamp, Scale, load_sae
from steer.sampling import SamplingConfig
from steer.server import ServerSettings, SteerServer
from steer.service.sliders import SliderCatalogue
from steer.vectors import SteeringVector

# find_spec, not an import: the main suite collects this module too and must not import vLLM
pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs the [vllm] extra"),
]

HOOK = "blocks.12.hook_resid_post"
QUESTION = "Describe a place you would like to visit."
GREEDY = SamplingConfig.greedy_config()


def _vector(seed: int, size: int = 576) -> torch.Tensor:
    return torch.randn(size, generator=torch.Generator().manual_seed(seed))


#: two prompts a prompt gate at HOOK tells apart (the recipe slider's threshold lies between)
TWO = ("The harbour town woke to the sound of", "My favourite recipe for soup starts with")


def _threshold(handle: ModelHandle, direction: torch.Tensor) -> float:
    ids = [list(handle.tokenizer(prompt)["input_ids"]) for prompt in TWO]
    last = forward(handle, ids, hooks=[HOOK]).activations[HOOK]
    assert isinstance(last, torch.Tensor)
    first, second = (last @ (direction / direction.norm())).tolist()
    assert abs(first - second) > 0.5
    return (first + second) / 2


@pytest.fixture(scope="module")
def served(smollm2: ModelHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SteerServer]:
    root = tmp_path_factory.mktemp("vllm-service")
    direction = SteeringVector.from_shared(_vector(2))
    artifact = root / "artifacts" / "noise"
    save_vector(artifact, direction, handle=smollm2, kind="direction")
    gate = EditGate(HOOK, str(artifact), _threshold(smollm2, _vector(2)), scope=GateScope.PROMPT)
    edits = (AddEdit(vector=str(artifact), strength=6.0, hooks=(HOOK,), gate=gate),)
    (root / "gated.toml").write_text(recipe_to_toml(EditRecipe(edits=edits)))
    sae = StandardSAE(StandardSAEConfig(d_in=576, d_sae=32))
    sae.cfg.metadata.hook_name = HOOK
    with torch.no_grad():
        for parameter in sae.parameters():
            parameter.copy_(
                torch.randn(parameter.shape, generator=torch.Generator().manual_seed(5))
            )
            parameter.mul_(0.05 if parameter.ndim == 1 else 0.3)
    sae.save_model(root / "saes" / "resid")
    (root / "sliders.toml").write_text(
        '[sliders.lectures]\nkind = "recipe"\nrecipe = "gated.toml"\nmin = 0.0\nmax = 1.0\n'
    )
    settings = ServerSettings(
        port=0,
        http_port=0,
        models_root=root,
        max_batch=8,
        max_prompt_tokens=1024,
        max_new_tokens_cap=256,
        backend="vllm",
        kv_cache_gib=1,
    )
    sliders = SliderCatalogue.load(root / "sliders.toml")
    with SteerServer(settings, models={"smollm2": smollm2}, sliders=sliders) as server:
        yield server


def _alone(handle: ModelHandle, index: int) -> tuple[int, ...]:
    interventions = {
        0: (),
        1: (Add(SteeringVector.from_shared(_vector(1)), 4.0, hooks=(HOOK,)),),
        2: (Ablate(SteeringVector.from_shared(_vector(2))),),
        3: (
            Add(SteeringVector.from_shared(_vector(3)), -3.0, hooks=(HOOK,), phase=Phase.GENERATED),
        ),
    }[index % 4]
    request = GenerationRequest(
        messages=(Message("user", f"{QUESTION} ({index})"),),
        sampling=GREEDY,
        max_new_tokens=12,
        interventions=interventions,
    )
    return Engine(handle).run([request])[0].token_ids


def _remote(client: SteerClient, index: int) -> Completion:
    interventions = {
        0: [],
        1: [add(_vector(1).tolist(), 4.0, hooks=[HOOK])],
        2: [ablate("noise")],
        3: [add(_vector(3).tolist(), -3.0, hooks=[HOOK], phase="generated")],
    }[index % 4]
    return client.complete(
        messages=[{"role": "user", "content": f"{QUESTION} ({index})"}],
        interventions=interventions,
        temperature=0,
        max_new_tokens=12,
    )[None]


def test_concurrent_grpc_streams_each_equal_the_hf_engine_alone(
    served: SteerServer, smollm2: ModelHandle
) -> None:
    with (
        SteerClient(served.target, timeout=300) as client,
        concurrent.futures.ThreadPoolExecutor(8) as pool,
    ):
        remote = list(pool.map(lambda i: _remote(client, i), range(8)))
    for index, completion in enumerate(remote):
        assert tuple(completion.token_ids) == _alone(smollm2, index), index
    assert len({tuple(c.token_ids) for c in remote}) > 4


def test_http_chat_with_steering_equals_the_hf_engine(
    served: SteerServer, smollm2: ModelHandle
) -> None:
    body = {
        "model": "smollm2",
        "messages": [{"role": "user", "content": f"{QUESTION} (1)"}],
        "max_tokens": 12,
        "temperature": 0,
        "steering": [
            {"add": {"inline": {"shared": _vector(1).tolist()}, "strength": 4.0, "hooks": [HOOK]}}
        ],
    }
    response = httpx.post(f"{served.http_url}/v1/chat/completions", json=body, timeout=300)
    assert response.status_code == 200, response.text
    text = response.json()["choices"][0]["message"]["content"]
    expected = smollm2.tokenizer.decode(_alone(smollm2, 1), skip_special_tokens=True)
    assert text == expected
    # SillyTavern's token count (TabbyAPI's route) is the prompt the vLLM engine was given
    counted = httpx.post(
        f"{served.http_url}/v1/token/encode", json={"model": "smollm2", "text": QUESTION}
    )
    plain = {"model": "smollm2", "prompt": QUESTION, "max_tokens": 1, "temperature": 0}
    usage = httpx.post(f"{served.http_url}/v1/completions", json=plain, timeout=300).json()["usage"]
    assert counted.json()["length"] == usage["prompt_tokens"] > 1
    # llama.cpp's route (SillyTavern's llama.cpp type) runs the same rows on the vLLM engine
    story = "Once upon a time, in a small harbour town,"
    six = {"model": "smollm2", "prompt": story, "max_tokens": 6, "temperature": 0}
    text = httpx.post(f"{served.http_url}/v1/completions", json=six, timeout=300).json()
    llama = {"model": "smollm2", "prompt": story, "n_predict": 6, "temperature": 0}
    reply = httpx.post(f"{served.http_url}/completion", json=llama, timeout=300).json()
    assert reply["content"] == text["choices"][0]["text"] != ""
    assert reply["tokens_predicted"] == text["usage"]["completion_tokens"] == 6
    assert reply["tokens_evaluated"] == text["usage"]["prompt_tokens"]


def test_a_gated_recipe_slider_on_vllm_equals_the_hf_engine(
    served: SteerServer, smollm2: ModelHandle
) -> None:
    """The shape of the recommended moralizing edit (a prompt gate around an edit, served as a
    named recipe slider): its gate fires on one prompt and not the other, as in process."""
    recipe = load_edit_recipe(served.settings.models_root / "gated.toml")
    replies = []
    for prompt in TWO:
        body = {"model": "smollm2", "prompt": prompt, "max_tokens": 10, "temperature": 0}
        body["steer.lectures"] = 1.0
        response = httpx.post(f"{served.http_url}/v1/completions", json=body, timeout=300)
        assert response.status_code == 200, response.text
        slid = response.json()["choices"][0]["text"]

        def local(interventions: tuple[Intervention, ...], prompt: str = prompt) -> str:
            request = GenerationRequest(
                prompt=prompt, sampling=GREEDY, max_new_tokens=10, interventions=interventions
            )
            return Engine(smollm2).run([request])[0].text

        assert slid == local(tuple(recipe.for_model(smollm2)))
        plain, always = local(()), local(tuple(recipe.ungated().for_model(smollm2)))
        assert plain != always  # the edit changes this reply where it acts
        replies.append((slid == always, slid == plain))
    assert sorted(replies) == [(False, True), (True, False)]  # fired on exactly one


def test_sae_feature_sliders_over_grpc_on_vllm_equal_the_hf_engine(
    served: SteerServer, smollm2: ModelHandle
) -> None:
    """A loaded SAE's Clamp and Scale sliders, moved by a gRPC client, served by vLLM."""
    sae = load_sae(served.settings.models_root / "saes" / "resid", smollm2)
    chat = [{"role": "user", "content": QUESTION}]
    with SteerClient(served.target, timeout=300) as client:
        client.load_sae("saes/resid", "resid")
        for mode, slid in (("clamp", Clamp(sae, 4, 25.0)), ("scale", Scale(sae, 11, 0.0))):
            intervention = slider("resid", slid.feature, mode, slid.value)
            remote = client.complete(
                messages=chat, temperature=0, max_new_tokens=10, interventions=[intervention]
            )[None]
            request = GenerationRequest(
                messages=(Message("user", QUESTION),),
                sampling=GREEDY,
                max_new_tokens=10,
                interventions=(slid,),
            )
            assert tuple(remote.token_ids) == Engine(smollm2).run([request])[0].token_ids, mode
        plain = client.complete(messages=chat, temperature=0, max_new_tokens=10)[None]
        assert tuple(plain.token_ids) != tuple(remote.token_ids)  # the slider did something


def test_sillytavern_presets_run_on_vllm(served: SteerServer) -> None:
    """SillyTavern's bodies with their RP samplers (DRY, XTC, Mirostat, temperature last, sampler
    orders, banned strings) run on the vLLM backend, in steer's pipeline inside it."""
    for kind, body in sorted(TEXT_COMPLETION_BODIES.items()):
        sized = dict(copy.deepcopy(body), model="smollm2", stream=False)
        for key in ("logit_bias", "custom_token_bans"):
            sized.pop(key, None)  # token ids of the fixture's model
        for key in ("max_tokens", "max_new_tokens", "n_predict", "num_predict"):
            if key in sized:
                sized[key] = 4
        path = "/completion" if kind == "llamacpp" else "/v1/completions"
        response = httpx.post(f"{served.http_url}{path}", json=sized, timeout=300)
        assert response.status_code == 200, (kind, response.text)


def test_what_vllm_lacks_is_refused_by_name_and_the_server_keeps_serving(
    served: SteerServer,
) -> None:
    gate = gated(
        add(_vector(1).tolist(), 2.0, hooks=[HOOK]),
        "blocks.4.hook_resid_mid",
        [1.0] * 576,
        0.0,
        scope="reply",
    )
    with SteerClient(served.target, timeout=300) as client:
        with pytest.raises(FailedPrecondition) as refused:
            client.complete(QUESTION, interventions=[gate], max_new_tokens=4)
        assert refused.value.field.startswith("interventions[0]"), refused.value.field
        assert "vllm" in refused.value.message and "hook_resid_mid" in refused.value.message
        mid = add(_vector(1).tolist(), 2.0, hooks=["blocks.3.hook_resid_mid"])
        with pytest.raises(FailedPrecondition) as refused:
            client.complete(QUESTION, interventions=[mid], max_new_tokens=4)
        assert (
            refused.value.field == "interventions[0]" and "hook_resid_mid" in refused.value.message
        )
        assert client.health() == "SERVING"
        chat = [{"role": "user", "content": QUESTION}]
        after = client.complete(messages=chat, temperature=0, max_new_tokens=5)[None]
        assert after.completion_tokens == 5
    body = {
        "model": "smollm2",
        "prompt": QUESTION,
        "max_tokens": 4,
        "steering": [
            {
                "add": {
                    "inline": {"shared": _vector(1).tolist()},
                    "strength": 1.0,
                    "hooks": ["blocks.3.hook_resid_mid"],
                }
            }
        ],
    }
    response = httpx.post(f"{served.http_url}/v1/completions", json=body, timeout=300)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "steering[0]" and "vllm" in error["message"]
    worker = served.registry.get("smollm2").worker
    assert worker.stats.failed_total == 0  # refused before the engine, no batch failed
