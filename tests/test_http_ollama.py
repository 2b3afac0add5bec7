"""Ollama's routes (generate, chat, tags) on a real server, read as their clients read them.

SillyTavern's Ollama type lists ``models[].name`` and reads ``response`` of each JSON line; each
reply is checked against ``/v1/completions`` (raw prompts) and ``/v1/chat/completions`` (templated
ones) for the same samplers: the same text and counts; Ollama's defaults (streaming, the chat
template unless ``raw``); the load call; steering; bad bodies answered 400 naming the field."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from st_bodies import OLLAMA, STOP
from test_server import PROMPTS, make_settings, random_vector

from steer.http.ollama import read_request
from steer.models import ModelHandle
from steer.server import SteerServer


@pytest.fixture(scope="module")
def server(
    tiny_llama: ModelHandle, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SteerServer]:
    settings = make_settings(tmp_path_factory.mktemp("ollama"), http_port=0, max_batch=8)
    with SteerServer(settings, models={"tiny": tiny_llama}) as running:
        yield running


def _post(server: SteerServer, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{server.http_url}{path}", json=body, timeout=60)


def _lines(response: httpx.Response) -> list[dict[str, Any]]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/x-ndjson")
    assert response.text.endswith("\n")
    return [json.loads(line) for line in response.text.splitlines()]


def _st_body(tokens: int = 8, **options: Any) -> dict[str, Any]:
    """SillyTavern's Ollama body pointed at the tiny model, greedy, ``tokens`` long."""
    body = copy.deepcopy(OLLAMA)
    body["model"] = "tiny"
    body["options"].update(num_predict=tokens, temperature=0, **options)
    return body


def _openai(server: SteerServer, body: dict[str, Any]) -> dict[str, Any]:
    """The same request on /v1/completions: the options as top-level fields."""
    flat = {"model": "tiny", "prompt": body["prompt"], **body["options"], "stream": False}
    response = _post(server, "/v1/completions", flat)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def test_tags_list_the_models_by_name(server: SteerServer) -> None:
    tags = httpx.get(f"{server.http_url}/api/tags").json()
    assert [model["name"] for model in tags["models"]] == ["tiny"]  # what SillyTavern reads


def test_sillytavern_body_streams_the_v1_completion(server: SteerServer) -> None:
    body = _st_body(10)
    *pieces, last = _lines(_post(server, "/api/generate", body))
    expected = _openai(server, body)
    assert pieces and all(piece["done"] is False for piece in pieces)
    assert "".join(piece["response"] for piece in pieces) == expected["choices"][0]["text"]
    assert last["done"] is True and last["response"] == "" and last["model"] == "tiny"
    assert last["eval_count"] == expected["usage"]["completion_tokens"]
    assert last["prompt_eval_count"] == expected["usage"]["prompt_tokens"]
    reason = expected["choices"][0]["finish_reason"]
    assert last["done_reason"] == reason
    assert last["total_duration"] >= last["eval_duration"] >= 0
    whole = _post(server, "/api/generate", dict(body, stream=False))
    assert whole.headers["content-type"].startswith("application/json")
    assert whole.json()["response"] == expected["choices"][0]["text"]
    assert whole.json()["done"] is True and whole.json()["done_reason"] == reason


def test_without_raw_the_prompt_is_a_user_message_in_the_chat_template(
    server: SteerServer,
) -> None:
    body = {
        "model": "tiny",
        "prompt": PROMPTS[1],
        "system": "You are a pirate.",
        "stream": False,
        "options": {"num_predict": 8, "temperature": 0},
    }
    templated = _post(server, "/api/generate", body).json()["response"]
    chat = {
        "model": "tiny",
        "messages": [
            {"role": "system", "content": "You are a pirate."},
            {"role": "user", "content": PROMPTS[1]},
        ],
        "max_tokens": 8,
        "temperature": 0,
    }
    expected = _post(server, "/v1/chat/completions", chat).json()["choices"][0]["message"]
    assert templated == expected["content"]
    raw = _post(server, "/api/generate", dict(body, raw=True)).json()["response"]
    plain = {"model": "tiny", "prompt": PROMPTS[1], "max_tokens": 8, "temperature": 0}
    assert raw == _post(server, "/v1/completions", plain).json()["choices"][0]["text"]
    assert raw != templated  # the template changed the prompt


def test_chat_equals_v1_chat_completions(server: SteerServer) -> None:
    messages = [
        {"role": "system", "content": "You are a pirate."},
        {"role": "user", "content": PROMPTS[3]},
    ]
    body = {"model": "tiny", "messages": messages, "options": {"num_predict": 8, "temperature": 0}}
    *pieces, last = _lines(_post(server, "/api/chat", body))
    chat = {"model": "tiny", "messages": messages, "max_tokens": 8, "temperature": 0}
    expected = _post(server, "/v1/chat/completions", chat).json()
    text = expected["choices"][0]["message"]["content"]
    assert all(piece["message"]["role"] == "assistant" for piece in pieces)
    assert "".join(piece["message"]["content"] for piece in pieces) == text
    assert last["done"] is True and last["message"] == {"role": "assistant", "content": ""}
    assert last["eval_count"] == expected["usage"]["completion_tokens"]
    assert last["prompt_eval_count"] == expected["usage"]["prompt_tokens"]
    whole = _post(server, "/api/chat", dict(body, stream=False)).json()
    assert whole["message"]["content"] == text and "response" not in whole
    loaded = _post(server, "/api/chat", {"model": "tiny", "messages": []}).json()
    assert loaded["done_reason"] == "load" and loaded["message"]["content"] == ""
    tools = _post(server, "/api/chat", dict(body, stream=False, tools=[{"type": "function"}]))
    assert tools.headers["X-Steer-Ignored-Fields"] == "tools"
    pictured = [dict(messages[1], images=["aGk="])]
    images = _post(server, "/api/chat", dict(body, stream=False, messages=pictured))
    assert images.headers["X-Steer-Ignored-Fields"] == "images"
    refused = _post(server, "/api/chat", dict(body, messages=[{"role": "tool", "content": "x"}]))
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "messages[0].role"


def test_ollama_streams_unless_told_not_to(server: SteerServer) -> None:
    body = {"model": "tiny", "prompt": PROMPTS[0], "raw": True, "options": {"num_predict": 3}}
    lines = _lines(_post(server, "/api/generate", body))
    assert lines[-1]["done"] is True and lines[-1]["eval_count"] <= 3


def test_a_body_without_prompt_loads_the_model(server: SteerServer) -> None:
    loaded = _post(server, "/api/generate", {"model": "tiny"})
    assert loaded.status_code == 200
    assert loaded.json()["done"] is True and loaded.json()["done_reason"] == "load"
    missing = _post(server, "/api/generate", {"model": "zzz"})
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "model"


def test_steering_and_sliders_reach_the_route(server: SteerServer) -> None:
    steering = [
        {
            "add": {
                "inline": {"shared": random_vector(21).tolist()},
                "strength": 6.0,
                "hooks": ["blocks.1.hook_resid_post"],
            }
        }
    ]
    base = {"model": "tiny", "prompt": PROMPTS[0], "raw": True, "stream": False}
    options = {"num_predict": 8, "temperature": 0}
    plain = _post(server, "/api/generate", dict(base, options=options)).json()["response"]
    top = _post(server, "/api/generate", dict(base, options=options, steering=steering)).json()
    inside = dict(base, options=dict(options, steering=steering))
    assert _post(server, "/api/generate", inside).json()["response"] == top["response"] != plain
    flat = {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0}
    same = _post(server, "/v1/completions", dict(flat, steering=steering)).json()
    assert top["response"] == same["choices"][0]["text"]


def test_features_steer_lacks_are_named(server: SteerServer) -> None:
    body = {
        "model": "tiny",
        "prompt": PROMPTS[0],
        "raw": True,
        "stream": False,
        "format": "json",
        "images": [],
        "options": {"num_predict": 2},
    }
    response = _post(server, "/api/generate", body)
    assert response.status_code == 200
    assert response.headers["X-Steer-Ignored-Fields"] == "format"


def test_options_use_llama_cpp_names() -> None:
    parsed, reply = read_request(copy.deepcopy(OLLAMA))
    assert parsed is not None and reply.model == OLLAMA["model"]
    assert parsed.prompt == OLLAMA["prompt"] and parsed.stream and parsed.stop == tuple(STOP)
    assert parsed.max_new_tokens == 300 and parsed.ignored == ()
    sampling = parsed.sampling
    assert (sampling.temperature, sampling.top_k, sampling.top_p, sampling.min_p) == (
        0.9,
        40,
        0.9,
        0.05,
    )
    assert sampling.repetition_penalty == 1.1 and sampling.repetition_penalty_range == 64
    body = dict(copy.deepcopy(OLLAMA), options={"num_predict": -2})
    until_full, _ = read_request(body)
    assert until_full is not None and until_full.max_new_tokens is None


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"options": [1]}, "options"),
        ({"raw": "yes"}, "raw"),
        ({"raw": False, "system": 5}, "system"),
        ({"model": 3}, "model"),
        ({"options": {"temperature": "hot"}}, "temperature"),
        ({"options": {"num_predict": 0}}, "num_predict"),
        ({"stream": "no"}, "stream"),
    ],
)
def test_bad_bodies_are_400_naming_the_field(
    server: SteerServer, extra: dict[str, Any], param: str
) -> None:
    body = dict({"model": "tiny", "prompt": PROMPTS[0], "raw": True}, **extra)
    response = _post(server, "/api/generate", body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    good = {"model": "tiny", "prompt": PROMPTS[0], "raw": True, "stream": False}
    still = _post(server, "/api/generate", dict(good, options={"num_predict": 2}))
    assert still.status_code == 200 and still.json()["done"] is True
