"""RP over gRPC: the full sampler set, role-play prompts and speaker-scoped sliders."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from test_server import ROOT, alone, make_settings

from steer import Add, SteeringVector
from steer.client import SteerClient, add
from steer.errors import InvalidArgumentError
from steer.generation import GenerationRequest
from steer.models import ModelHandle
from steer.sampling import SamplingConfig
from steer.server import SteerServer

RP_SAMPLING = {
    "temperature_last": True,
    "typical_p": 0.95,
    "tfs": 0.95,
    "repetition_penalty": 1.15,
    "repetition_penalty_range": 64,
    "presence_penalty": 0.2,
    "frequency_penalty": 0.1,
    "dry_multiplier": 0.8,
    "dry_allowed_length": 2,
    "dry_sequence_breakers": ["\n", ":"],
    "xtc_threshold": 0.1,
    "xtc_probability": 0.5,
    "logit_bias": {5: -2.0, 7: 1.5},
    "banned_strings": ["the"],
    "ban_eos": True,
    "min_tokens": 4,
    "sampler_order": ["repetition_penalty", "dry", "top_k", "min_p", "xtc", "temperature"],
}


@pytest.fixture(scope="module")
def client(
    tiny_llama: ModelHandle, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SteerClient]:
    root: Path = tmp_path_factory.mktemp("models")
    with (
        SteerServer(
            make_settings(root, max_prompt_tokens=2048), models={"tiny": tiny_llama}
        ) as server,
        SteerClient(server.target, timeout=60) as connected,
    ):
        yield connected


def test_every_sampler_field_reaches_the_engine(
    client: SteerClient, tiny_llama: ModelHandle
) -> None:
    prompt = "The knight drew her sword"
    remote = client.complete(
        prompt, temperature=0.9, min_p=0.05, seed=11, max_new_tokens=24, sampling=RP_SAMPLING
    )[None]
    config = SamplingConfig(
        temperature=0.9,
        min_p=0.05,
        seed=11,
        **{
            key: (
                tuple(sorted(value.items()))
                if isinstance(value, dict)
                else tuple(value)
                if isinstance(value, list)
                else value
            )
            for key, value in RP_SAMPLING.items()
        },
    )
    expected = alone(
        tiny_llama, GenerationRequest(prompt=prompt, sampling=config, max_new_tokens=24)
    )
    assert tuple(remote.token_ids) == expected
    assert "the" not in remote.text
    plain = client.complete(prompt, temperature=0.9, min_p=0.05, seed=11, max_new_tokens=24)
    assert plain[None].token_ids != remote.token_ids  # the extra samplers changed something


def test_bad_sampler_fields_are_invalid_argument(client: SteerClient) -> None:
    for sampling, field in (
        ({"repetition_penalty": -1.0}, "repetition_penalty"),
        ({"mirostat_mode": 7}, "mirostat_mode"),
        ({"sampler_order": ["no_such_sampler"]}, "sampler_order"),
        ({"xtc_probability": 2.0}, "xtc_probability"),
    ):
        with pytest.raises(InvalidArgumentError) as error:
            client.complete("hi", max_new_tokens=2, sampling=sampling)
        assert field in str(error.value)


def _tavern() -> dict:
    for line in (ROOT / "recipes" / "data" / "rp_scenarios.jsonl").read_text().splitlines():
        scene = json.loads(line)
        if scene["id"] == "tavern":
            return scene
    raise AssertionError("the tavern scenario is missing")


def test_roleplay_prompt_with_a_speaker_scoped_slider(
    client: SteerClient, tiny_llama: ModelHandle
) -> None:
    """A speaker-scoped slider over gRPC == the same request in process; scope matters."""
    from steer.rp.formats import get_format, tokenize
    from steer.rp.scene import Scene

    scene = _tavern()
    vector = torch.randn(tiny_llama.d_model, generator=torch.Generator().manual_seed(3)) * 4
    hooks = ("blocks.1.hook_resid_post",)

    def remote(speaker: str) -> tuple[int, ...]:
        slider = add(vector.tolist(), 1.0, hooks=hooks, speaker=speaker)
        roleplay = {"scene": scene, "prompt_format": "chatml", "speaker": "Garrick"}
        done = client.complete(
            roleplay=roleplay, temperature=0, max_new_tokens=12, interventions=[slider]
        )
        return tuple(done[None].token_ids)

    rendered = get_format("chatml").render(Scene.from_dict(scene), "Garrick")
    tokens = tokenize(tiny_llama.tokenizer, rendered)
    local = GenerationRequest(
        prompt_ids=tokens.ids,
        speakers=tokens.speakers,
        speaker="Garrick",
        stop=rendered.stop,
        sampling=SamplingConfig(temperature=0.0),
        max_new_tokens=12,
        interventions=(Add(SteeringVector.from_shared(vector), 1.0, hooks, speaker="Garrick"),),
    )
    assert remote("Garrick") == alone(tiny_llama, local)
    assert remote("Garrick") != remote("Nobody")  # a slider on an absent speaker does nothing
    plain = client.complete(
        roleplay={"scene": scene, "prompt_format": "chatml", "speaker": "Garrick"},
        temperature=0,
        max_new_tokens=12,
    )
    assert tuple(plain[None].token_ids) == remote("Nobody")


def test_bad_roleplay_prompts_are_invalid_argument(client: SteerClient) -> None:
    scene = _tavern()
    for roleplay, field in (
        ({"scene": {"characters": "nope"}}, "roleplay"),
        ({"scene": scene, "prompt_format": "no-such-format"}, "roleplay"),
        ({"scene": scene, "speaker": "Nobody"}, "roleplay"),
    ):
        with pytest.raises(InvalidArgumentError) as error:
            client.complete(roleplay=roleplay, max_new_tokens=2)
        assert field in str(error.value)
