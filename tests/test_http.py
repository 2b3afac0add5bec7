"""The OpenAI-compatible HTTP API against a real server on loopback, with the official `openai`
client (sync, async, streaming) and raw HTTP: equivalence with gRPC and the in-process engine,
named sliders, isolation of concurrent streams, disconnects and bad bodies."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import openai
import pytest
import torch
from st_bodies import CHAT_CUSTOM, TEXT_COMPLETION_BODIES
from test_server import GREEDY, PROMPTS, alone, direction_artifact, make_settings, random_vector

from steer.generation import GenerationRequest
from steer.interventions import Add
from steer.models import ModelHandle
from steer.proto.v1 import generation_pb2, generation_pb2_grpc
from steer.sampling import SamplingConfig
from steer.server import SteerServer
from steer.service.sliders import SliderCatalogue
from steer.vectors import SteeringVector

g = generation_pb2
HOOK = "blocks.2.hook_resid_post"
SLIDERS = {
    "sliders": {
        "cheerful": {
            "kind": "add",
            "artifact": "cheer",
            "hooks": [HOOK],
            "min": -8.0,
            "max": 8.0,
            "description": "more cheerful",
        },
        "refusal": {"kind": "ablate", "artifact": "refusal", "min": 0.0, "max": 1.5},
    }
}


@pytest.fixture(scope="module")
def server(
    tiny_llama: ModelHandle, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SteerServer]:
    root = tmp_path_factory.mktemp("http")
    direction_artifact(root, tiny_llama, "refusal")
    direction_artifact(root, tiny_llama, "cheer", seed=7)
    settings = make_settings(root, http_port=0, max_batch=32, max_prompt_tokens=2048)
    sliders = SliderCatalogue.from_dict(SLIDERS)
    with SteerServer(settings, models={"tiny": tiny_llama}, sliders=sliders) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: SteerServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="unused", max_retries=0) as made:
        yield made


def _text(handle: ModelHandle, request: GenerationRequest) -> str:
    return handle.tokenizer.decode(alone(handle, request), skip_special_tokens=True)


def _cheer_vector(server: SteerServer) -> SteeringVector:
    return server.store.load("cheer").vector


# -- endpoints and equivalence ------------------------------------------------------------------


def test_models_health_and_sliders(server: SteerServer) -> None:
    base = server.http_url
    assert httpx.get(f"{base}/health").json() == {"status": "ok"}
    for path in ("/v1/models", "/v1/model/list"):
        models = httpx.get(f"{base}{path}").json()
        assert [m["id"] for m in models["data"]] == ["tiny"]
    sliders = httpx.get(f"{base}/v1/steer/sliders").json()["data"]
    assert [s["name"] for s in sliders] == ["cheerful", "refusal"]
    assert sliders[0]["field"] == "steer.cheerful" and sliders[0]["min"] == -8.0
    assert httpx.get(f"{base}/openapi.json").status_code == 200


def test_completion_equals_in_process_engine(
    client: openai.OpenAI, tiny_llama: ModelHandle
) -> None:
    completion = client.completions.create(
        model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=0
    )
    expected = GenerationRequest(prompt=PROMPTS[0], sampling=GREEDY, max_new_tokens=12)
    assert completion.choices[0].text == _text(tiny_llama, expected)
    assert completion.usage is not None and completion.usage.completion_tokens == 12
    assert completion.choices[0].finish_reason == "length"


def test_http_grpc_and_in_process_give_the_same_seeded_sample(
    server: SteerServer, client: openai.OpenAI, tiny_llama: ModelHandle
) -> None:
    completion = client.completions.create(
        model="tiny", prompt=PROMPTS[1], max_tokens=16, temperature=0.9, top_p=0.95, seed=1234
    )
    sampling = SamplingConfig(temperature=0.9, top_p=0.95, seed=1234)
    request = GenerationRequest(prompt=PROMPTS[1], sampling=sampling, max_new_tokens=16)
    assert completion.choices[0].text == _text(tiny_llama, request)
    with grpc.insecure_channel(server.target) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        message = g.GenerateRequest(
            text=PROMPTS[1],
            max_new_tokens=16,
            seed=1234,
            sampling=g.SamplingParams(temperature=0.9, top_p=0.95),
        )
        remote = "".join(response.text for response in stub.Generate(message))
    assert remote == completion.choices[0].text


def test_streaming_completion_and_usage(client: openai.OpenAI, tiny_llama: ModelHandle) -> None:
    stream = client.completions.create(
        model="tiny",
        prompt=PROMPTS[2],
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(chunk.choices[0].text for chunk in chunks if chunk.choices)
    expected = GenerationRequest(prompt=PROMPTS[2], sampling=GREEDY, max_new_tokens=10)
    assert text == _text(tiny_llama, expected)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 10
    finals = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finals == ["length"]


def test_chat_completion_uses_the_chat_template(
    client: openai.OpenAI, tiny_llama: ModelHandle
) -> None:
    messages = [{"role": "user", "content": "Tell me about the moon"}]
    chat = client.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=8,
        temperature=0,  # type: ignore[arg-type]
    )
    from steer.generation import Message

    expected = GenerationRequest(
        messages=(Message("user", messages[0]["content"]),), sampling=GREEDY, max_new_tokens=8
    )
    assert chat.choices[0].message.content == _text(tiny_llama, expected)
    assert chat.choices[0].message.role == "assistant"


def test_async_streaming_chat(server: SteerServer, tiny_llama: ModelHandle) -> None:
    async def run() -> str:
        async with openai.AsyncOpenAI(
            base_url=f"{server.http_url}/v1", api_key="unused", max_retries=0
        ) as client:
            stream = await client.chat.completions.create(
                model="tiny",
                messages=[{"role": "user", "content": "Hello"}],
                max_tokens=6,
                temperature=0,
                stream=True,
            )
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    from steer.generation import Message

    expected = GenerationRequest(
        messages=(Message("user", "Hello"),), sampling=GREEDY, max_new_tokens=6
    )
    assert asyncio.run(run()) == _text(tiny_llama, expected)


def test_n_choices_are_rows_of_one_batch(client: openai.OpenAI, tiny_llama: ModelHandle) -> None:
    completion = client.completions.create(
        model="tiny", prompt=PROMPTS[3], max_tokens=8, temperature=1.0, n=3, seed=42
    )
    texts = [choice.text for choice in sorted(completion.choices, key=lambda c: c.index)]
    expected = [
        _text(
            tiny_llama,
            GenerationRequest(
                prompt=PROMPTS[3], sampling=SamplingConfig(seed=42 + i), max_new_tokens=8
            ),
        )
        for i in range(3)
    ]
    assert texts == expected
    assert len(set(texts)) > 1


# -- sliders --------------------------------------------------------------------------------------


def _logprobs(client: openai.OpenAI, **extra: object) -> list[dict[str, float]]:
    completion = client.completions.create(
        model="tiny",
        prompt=PROMPTS[4],
        max_tokens=6,
        temperature=0,
        logprobs=5,
        extra_body=extra or None,
    )
    logprobs = completion.choices[0].logprobs
    assert logprobs is not None and logprobs.top_logprobs is not None
    return logprobs.top_logprobs


def test_slider_at_neutral_is_bit_identical_to_no_slider(client: openai.OpenAI) -> None:
    plain = _logprobs(client)
    assert _logprobs(client, **{"steer.cheerful": 0.0, "steer.refusal": 0.0}) == plain
    assert _logprobs(client, **{"steer.cheerful": 4.0}) != plain


def test_slider_equals_the_same_addition_in_process(
    server: SteerServer, client: openai.OpenAI, tiny_llama: ModelHandle
) -> None:
    completion = client.completions.create(
        model="tiny",
        prompt=PROMPTS[0],
        max_tokens=10,
        temperature=0,
        extra_body={"steer.cheerful": 3.0},
    )
    addition = Add(_cheer_vector(server), 3.0, hooks=(HOOK,))
    request = GenerationRequest(
        prompt=PROMPTS[0], sampling=GREEDY, max_new_tokens=10, interventions=(addition,)
    )
    assert completion.choices[0].text == _text(tiny_llama, request)
    with grpc.insecure_channel(server.target) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        named = g.Intervention(named=g.NamedSlider(name="cheerful", value=3.0))
        message = g.GenerateRequest(
            text=PROMPTS[0],
            max_new_tokens=10,
            sampling=g.SamplingParams(temperature=0.0),
            interventions=[named],
        )
        remote = "".join(response.text for response in stub.Generate(message))
    assert remote == completion.choices[0].text


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"steer.nope": 1.0}, "steer.nope"),
        ({"steer.cheerful": 99.0}, "steer.cheerful"),
        ({"steer.refusal": -1.0}, "steer.refusal"),
        ({"steering": [{"add": {"artifactId": "missing", "strength": 1}}]}, "steering[0]"),
        ({"steering": [{"bogus": 1}]}, "steering[0]"),
    ],
)
def test_bad_sliders_are_400_naming_them(
    client: openai.OpenAI, extra: dict[str, object], param: str
) -> None:
    with pytest.raises(openai.APIStatusError) as raised:
        client.completions.create(
            model="tiny", prompt="Hi", max_tokens=2, temperature=0, extra_body=extra
        )
    assert raised.value.status_code in (400, 404), raised.value.body
    body = raised.value.body
    assert isinstance(body, dict)
    assert str(body.get("param", "")).startswith(param), body


# -- isolation and disconnects ---------------------------------------------------------------------


def test_32_concurrent_http_streams_with_distinct_steering_equal_each_alone(
    server: SteerServer, tiny_llama: ModelHandle
) -> None:
    def body(index: int) -> dict[str, object]:
        vector = random_vector(300 + index)
        steering = [
            {
                "add": {
                    "inline": {"shared": vector.tolist()},
                    "strength": 0.5 + 0.25 * index,
                    "hooks": [f"blocks.{index % 4}.hook_resid_post"],
                }
            }
        ]
        return {
            "model": "tiny",
            "prompt": PROMPTS[index % len(PROMPTS)],
            "max_tokens": 8,
            "temperature": 0,
            "stream": True,
            "steering": steering if index % 4 != 3 else [],
        }

    def expected(index: int) -> str:
        interventions = ()
        if index % 4 != 3:
            vector = SteeringVector.from_shared(random_vector(300 + index))
            hook = f"blocks.{index % 4}.hook_resid_post"
            interventions = (Add(vector, 0.5 + 0.25 * index, hooks=(hook,)),)
        request = GenerationRequest(
            prompt=PROMPTS[index % len(PROMPTS)],
            sampling=GREEDY,
            max_new_tokens=8,
            interventions=interventions,
        )
        return _text(tiny_llama, request)

    results: dict[int, str] = {}

    def run(index: int) -> None:
        text = []
        with httpx.stream(
            "POST", f"{server.http_url}/v1/completions", json=body(index), timeout=60
        ) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line.removeprefix("data: "))
                    text.extend(choice["text"] for choice in chunk["choices"])
        results[index] = "".join(text)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {i: expected(i) for i in range(32)}
    assert len(set(results.values())) > 8


def test_a_client_that_disconnects_frees_its_row(server: SteerServer) -> None:
    worker = server.registry.get("tiny").worker
    body = {
        "model": "tiny",
        "prompt": PROMPTS[1],
        "max_tokens": 390,
        "temperature": 0,
        "ban_eos_token": True,
        "stream": True,
    }
    with httpx.stream("POST", f"{server.http_url}/v1/completions", json=body) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                break  # one chunk, then hang up
    for _ in range(200):
        if worker.open_requests == 0:
            break
        threading.Event().wait(0.05)
    assert worker.open_requests == 0


# -- bad bodies ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"[1, 2]",
        b"null",
        b"{" * 100_000,
        b'{"prompt": "hi", "max_tokens": "many"}',
        b'{"prompt": "hi", "temperature": NaN}',
        b'{"prompt": "hi", "temperature": 1e308}',
        b'{"prompt": "hi", "n": 1000}',
        b'{"prompt": ["a", "b"]}',
        b'{"prompt": "hi", "logit_bias": {"x": 1}}',
        b"\xff\xfe",
        b'{"prompt": "hi", "steer.cheerful": "loud"}',
    ],
)
def test_bad_bodies_are_4xx_in_openai_error_shape(server: SteerServer, raw: bytes) -> None:
    response = httpx.post(
        f"{server.http_url}/v1/completions",
        content=raw,
        headers={"content-type": "application/json"},
    )
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    error = response.json()["error"]
    assert error["message"] and "Traceback" not in error["message"]
    assert httpx.get(f"{server.http_url}/health").status_code == 200


def test_unknown_sampler_fields_are_named_in_a_header(server: SteerServer) -> None:
    body = {"prompt": "hi", "max_tokens": 2, "temperature": 0, "smoothing_factor": 0.3}
    response = httpx.post(f"{server.http_url}/v1/completions", json=body)
    assert response.status_code == 200
    assert "smoothing_factor" in response.headers["x-steer-ignored-fields"]
    neutral = {"prompt": "hi", "max_tokens": 2, "temperature": 0, "smoothing_factor": 0}
    response = httpx.post(f"{server.http_url}/v1/completions", json=neutral)
    assert "x-steer-ignored-fields" not in response.headers


def test_bearer_token(tiny_llama: ModelHandle, tmp_path: Path) -> None:
    settings = make_settings(tmp_path, http_port=0, token="sesame")
    with SteerServer(settings, models={"tiny": tiny_llama}) as running:
        url = f"{running.http_url}/v1/completions"
        body = {"prompt": "hi", "max_tokens": 2}
        refused = httpx.post(url, json=body)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "UNAUTHENTICATED"
        assert httpx.get(f"{running.http_url}/health").status_code == 200
        with openai.OpenAI(base_url=f"{running.http_url}/v1", api_key="sesame") as client:
            assert client.completions.create(model="tiny", prompt="hi", max_tokens=2).choices
        # llama.cpp's and Ollama's routes are guarded by the same token
        raw = {"prompt": "hi", "n_predict": 2, "raw": True, "stream": False}
        for method, path in [
            ("POST", "/completion"),
            ("POST", "/api/generate"),
            ("POST", "/api/chat"),
            ("GET", "/api/tags"),
        ]:
            body = raw if method == "POST" else None
            denied = httpx.request(method, f"{running.http_url}{path}", json=body)
            assert denied.status_code == 401, path
            headers = {"Authorization": "Bearer sesame"}
            allowed = httpx.request(method, f"{running.http_url}{path}", json=body, headers=headers)
            assert allowed.status_code == 200, (path, allowed.text)


def test_zero_strength_steering_entry_is_no_steering(client: openai.OpenAI) -> None:
    vector = torch.ones(64).tolist()
    entry = {"add": {"inline": {"shared": vector}, "strength": 0.0, "hooks": [HOOK]}}
    assert _logprobs(client, steering=[entry]) == _logprobs(client)


# -- SillyTavern's own request bodies --------------------------------------------------------------


def _small(body: dict[str, object]) -> dict[str, object]:
    """An ST body as ST builds it, pointed at the tiny model with a short reply."""
    sized = dict(body, model="tiny", stream=False)
    for key in ("logit_bias", "custom_token_bans"):  # token ids of the fixture's own model
        sized.pop(key, None)
    for key in ("max_tokens", "max_new_tokens", "n_predict", "max_length"):
        if key in sized:
            sized[key] = 4
    return sized


@pytest.mark.parametrize("kind", sorted(TEXT_COMPLETION_BODIES))
def test_sillytavern_text_completion_bodies_generate(server: SteerServer, kind: str) -> None:
    body = _small(TEXT_COMPLETION_BODIES[kind])
    response = httpx.post(f"{server.http_url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    choices = response.json()["choices"]
    assert len(choices) == body.get("n", 1)
    assert all(choice["finish_reason"] in ("stop", "length") for choice in choices)
    assert response.json()["usage"]["completion_tokens"] <= 4 * len(choices)


def test_sillytavern_chat_with_custom_sliders_and_group_names(
    server: SteerServer, tiny_llama: ModelHandle
) -> None:
    body = _small(CHAT_CUSTOM)
    sliders = [key for key in body if key.startswith("steer.")]
    assert sliders, "the fixture carries Custom Sliders fields"
    for key in sliders:
        del body[key]
    plain = httpx.post(f"{server.http_url}/v1/chat/completions", json=body, timeout=60)
    assert plain.status_code == 200, plain.text
    steered = httpx.post(
        f"{server.http_url}/v1/chat/completions",
        json=dict(body, **{"steer.cheerful": 6.0, "temperature": 0}),
        timeout=60,
    )
    assert steered.status_code == 200, steered.text
    neutral = httpx.post(
        f"{server.http_url}/v1/chat/completions",
        json=dict(body, **{"steer.cheerful": 0.0, "temperature": 0}),
        timeout=60,
    )
    greedy = httpx.post(
        f"{server.http_url}/v1/chat/completions",
        json=dict(body, temperature=0),
        timeout=60,
    )
    assert neutral.json()["choices"] == greedy.json()["choices"]


CARD = {
    "spec": "chara_card_v2",
    "spec_version": "2.0",
    "data": {
        "name": "Mira",
        "description": "{{char}} is a lighthouse keeper who talks to gulls.",
        "personality": "dry, kind",
        "scenario": "A storm is coming in over the harbour.",
        "first_mes": "*Mira wipes the lamp glass.* You're late, {{user}}.",
        "mes_example": "",
    },
}


def test_chat_with_a_character_card_renders_the_cards_scene(
    server: SteerServer, tiny_llama: ModelHandle
) -> None:
    """``steer_card``: the card's character, scenario and first message join the prompt exactly
    as steer.rp renders them in process, and the reply is the card's character speaking."""
    from steer.rp.cards import card_from_json, scene_with_card
    from steer.rp.formats import get_format, tokenize

    messages = [{"role": "user", "content": "Sorry, the ferry was slow.", "name": "Ada"}]
    body = {"model": "tiny", "messages": messages, "max_tokens": 6, "temperature": 0}
    reply = httpx.post(
        f"{server.http_url}/v1/chat/completions", json=dict(body, steer_card=CARD), timeout=60
    )
    assert reply.status_code == 200, reply.text
    scene = scene_with_card(
        card_from_json(CARD),
        {
            "user": {"name": "Ada"},
            "characters": [],
            "turns": [{"speaker": "Ada", "content": messages[0]["content"]}],
            "system": "",
        },
    )
    rendered = get_format("chat_template").render(scene, "Mira", tokenizer=tiny_llama.tokenizer)
    assert "lighthouse keeper" in rendered.text and "You're late, Ada." in rendered.text
    tokens = tokenize(tiny_llama.tokenizer, rendered)
    request = GenerationRequest(
        prompt_ids=tokens.ids,
        speakers=tokens.speakers,
        speaker="Mira",
        sampling=GREEDY,
        max_new_tokens=6,
        stop=rendered.stop,
    )
    assert reply.json()["usage"]["prompt_tokens"] == len(tokens.ids)
    assert reply.json()["choices"][0]["message"]["content"] == _text(tiny_llama, request)
    plain = httpx.post(f"{server.http_url}/v1/chat/completions", json=body, timeout=60)
    assert plain.json()["usage"]["prompt_tokens"] < len(tokens.ids)


@pytest.mark.parametrize(
    ("card", "field"),
    [
        ("Mira", "steer_card"),
        ({"spec": "chara_card_v2", "data": {"name": ""}}, "steer_card.name"),
        ({"name": "Mira", "first_mes": 3}, "steer_card.first_mes"),
    ],
)
def test_a_bad_card_is_a_400_naming_the_field(
    server: SteerServer, card: object, field: str
) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "steer_card": card}
    reply = httpx.post(f"{server.http_url}/v1/chat/completions", json=body, timeout=60)
    assert reply.status_code == 400, reply.text
    assert field in reply.json()["error"]["message"] or reply.json()["error"]["param"] == field


def test_a_card_on_a_text_completion_is_a_400(server: SteerServer) -> None:
    body = {"model": "tiny", "prompt": "hi", "steer_card": CARD}
    reply = httpx.post(f"{server.http_url}/v1/completions", json=body, timeout=60)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "steer_card"
