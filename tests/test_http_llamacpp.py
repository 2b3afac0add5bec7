"""llama.cpp's ``POST /completion`` on a real server, read the way SillyTavern reads it.

SillyTavern's llama.cpp type reads ``content`` of each SSE line and
``completion_probabilities[0].top_logprobs``; each reply is checked against ``/v1/completions``
and the in-process engine: the same text, ids and counts; stop types; token-id prompts;
llama.cpp's logit-bias pairs; steering; bad bodies answered 400 naming the field while the server
keeps serving."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from st_bodies import LLAMACPP
from test_server import GREEDY, PROMPTS, alone, make_settings, random_vector

from steer.generation import GenerationRequest
from steer.models import ModelHandle
from steer.sampling import SamplingConfig
from steer.server import SteerServer


@pytest.fixture(scope="module")
def server(
    tiny_llama: ModelHandle, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SteerServer]:
    settings = make_settings(tmp_path_factory.mktemp("llamacpp"), http_port=0, max_batch=8)
    with SteerServer(settings, models={"tiny": tiny_llama}) as running:
        yield running


def _post(server: SteerServer, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{server.http_url}{path}", json=body, timeout=60)


def _lines(response: httpx.Response) -> list[dict[str, Any]]:
    """The SSE ``data:`` lines as JSON, as SillyTavern's event stream reader yields them."""
    assert response.headers["content-type"].startswith("text/event-stream")
    lines = [line for line in response.text.split("\n\n") if line]
    assert all(line.startswith("data: ") for line in lines)
    return [json.loads(line.removeprefix("data: ")) for line in lines]


def _greedy(prompt: str, tokens: int, **extra: Any) -> dict[str, Any]:
    return {"prompt": prompt, "n_predict": tokens, "temperature": 0, **extra}


def test_reply_equals_v1_completions_and_the_engine(
    server: SteerServer, tiny_llama: ModelHandle
) -> None:
    reply = _post(server, "/completion", _greedy(PROMPTS[0], 10, return_tokens=True))
    assert reply.status_code == 200, reply.text
    body = reply.json()
    openai = _post(
        server, "/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 10, "temperature": 0}
    ).json()
    expected = alone(
        tiny_llama, GenerationRequest(prompt=PROMPTS[0], sampling=GREEDY, max_new_tokens=10)
    )
    assert body["content"] == openai["choices"][0]["text"]
    assert tuple(body["tokens"]) == expected
    assert body["tokens_predicted"] == openai["usage"]["completion_tokens"] == 10
    assert body["tokens_evaluated"] == openai["usage"]["prompt_tokens"]
    assert body["stop"] is True and body["stop_type"] == "limit" and body["stopping_word"] == ""
    assert body["model"] == "tiny" and body["prompt"] == PROMPTS[0]
    assert body["generation_settings"]["n_predict"] == 10
    assert body["timings"]["predicted_n"] == 10 and body["timings"]["predicted_ms"] >= 0
    assert "completion_probabilities" not in body
    # without return_tokens, llama.cpp leaves ``tokens`` empty
    plain = _post(server, "/completion", _greedy(PROMPTS[0], 10)).json()
    assert plain["tokens"] == [] and plain["content"] == body["content"]


def test_stream_pieces_add_up_to_the_reply(server: SteerServer) -> None:
    whole = _post(server, "/completion", _greedy(PROMPTS[1], 12, return_tokens=True)).json()
    lines = _lines(_post(server, "/completion", _greedy(PROMPTS[1], 12, stream=True)))
    *pieces, last = lines
    assert pieces and all(piece["stop"] is False for piece in pieces)
    assert "".join(piece["content"] for piece in pieces) == whole["content"]
    assert [t for piece in pieces for t in piece["tokens"]] == whole["tokens"]
    assert [piece["tokens_predicted"] for piece in pieces][-1] == 12
    assert last["stop"] is True and last["content"] == "" and last["stop_type"] == "limit"
    assert last["tokens_predicted"] == 12 and last["tokens_evaluated"] == whole["tokens_evaluated"]


def test_sillytavern_llamacpp_body_streams_with_token_probabilities(
    server: SteerServer, tiny_llama: ModelHandle
) -> None:
    body = copy.deepcopy(LLAMACPP)
    body.update(model="tiny", n_predict=6, max_tokens=6, max_new_tokens=6, temperature=0)
    vocab = tiny_llama.model.config.vocab_size
    body["logit_bias"] = [[bias[0] % vocab, bias[1]] for bias in body["logit_bias"]]
    body["custom_token_bans"] = str(int(body["custom_token_bans"]) % vocab)
    response = _post(server, "/completion", body)
    assert response.status_code == 200, response.text
    assert "X-Steer-Ignored-Fields" not in response.headers
    *pieces, last = _lines(response)
    assert last["stop"] is True and last["tokens_predicted"] <= 6
    banned = int(body["custom_token_bans"])
    text = ""
    for piece in pieces:  # what SillyTavern's parseTextgenLogprobs reads for llama.cpp
        text += piece.get("content") or ""
        (probabilities,) = piece["completion_probabilities"]
        top = probabilities["top_logprobs"]
        assert len(top) == body["n_probs"]
        logprobs = [candidate["logprob"] for candidate in top]
        assert logprobs == sorted(logprobs, reverse=True) and all(lp <= 0 for lp in logprobs)
        assert probabilities["id"] == top[0]["id"] != banned  # greedy: the top candidate
        assert probabilities["logprob"] == top[0]["logprob"]
        assert all(candidate["id"] != banned for candidate in top)
        assert bytes(top[0]["bytes"]).decode() == top[0]["token"]
    assert text == "".join(piece["content"] for piece in pieces)


def test_stop_word_and_eos_are_named(server: SteerServer, tiny_llama: ModelHandle) -> None:
    free = _post(server, "/completion", _greedy(PROMPTS[2], 16)).json()["content"]
    stop = free[len(free) // 2 : len(free) // 2 + 3]
    assert stop.strip(), f"the tiny model's greedy text has a stop candidate: {free!r}"
    cut = _post(server, "/completion", _greedy(PROMPTS[2], 16, stop=["\u2603", stop])).json()
    assert cut["stop_type"] == "word" and cut["stopping_word"] == stop
    assert cut["content"] == free[: free.index(stop)]
    eos = tiny_llama.tokenizer.eos_token_id
    ended = _post(server, "/completion", _greedy(PROMPTS[2], 16, logit_bias=[[eos, 1000]]))
    assert ended.json()["stop_type"] == "eos" and ended.json()["stopping_word"] == ""
    assert ended.json()["tokens_predicted"] == 1 and ended.json()["content"] == ""


def test_token_id_prompt_equals_text_prompt(server: SteerServer, tiny_llama: ModelHandle) -> None:
    ids = tiny_llama.tokenizer(PROMPTS[3], add_special_tokens=False)["input_ids"]
    text = _post(server, "/completion", _greedy(PROMPTS[3], 8)).json()
    for prompt in (ids, [ids]):
        tokens = _post(server, "/completion", _greedy(prompt, 8)).json()  # type: ignore[arg-type]
        assert tokens["content"] == text["content"]
        assert tokens["tokens_evaluated"] == len(ids)
    openai = _post(
        server, "/v1/completions", {"prompt": ids, "max_tokens": 8, "temperature": 0}
    ).json()
    assert openai["choices"][0]["text"] == text["content"]


def test_logit_bias_pairs_act_like_the_object_form(server: SteerServer) -> None:
    plain = _post(server, "/completion", _greedy(PROMPTS[0], 6, return_tokens=True)).json()
    first = plain["tokens"][0]
    banned = _post(
        server,
        "/completion",
        _greedy(PROMPTS[0], 6, return_tokens=True, logit_bias=[[first, False]]),
    ).json()
    assert banned["tokens"][0] != first
    as_object = _post(
        server,
        "/v1/completions",
        {"prompt": PROMPTS[0], "max_tokens": 6, "temperature": 0, "custom_token_bans": str(first)},
    ).json()
    assert as_object["choices"][0]["text"] == banned["content"]


def test_steering_reaches_the_route(server: SteerServer, tiny_llama: ModelHandle) -> None:
    steering = [
        {
            "add": {
                "inline": {"shared": random_vector(11).tolist()},
                "strength": 6.0,
                "hooks": ["blocks.1.hook_resid_post"],
            }
        }
    ]
    plain = _post(server, "/completion", _greedy(PROMPTS[0], 8)).json()["content"]
    steered = _post(server, "/completion", _greedy(PROMPTS[0], 8, steering=steering)).json()
    same = _post(
        server,
        "/v1/completions",
        {"prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0, "steering": steering},
    ).json()
    assert steered["content"] == same["choices"][0]["text"] != plain
    zero = copy.deepcopy(steering)
    zero[0]["add"]["strength"] = 0.0
    assert (
        _post(server, "/completion", _greedy(PROMPTS[0], 8, steering=zero)).json()["content"]
        == plain
    )


def test_n_is_one_reply_and_named_ignored(server: SteerServer) -> None:
    sampled = {"prompt": PROMPTS[1], "n_predict": 4, "seed": 5, "n": 3}
    response = _post(server, "/completion", sampled)
    assert response.status_code == 200
    assert response.headers["X-Steer-Ignored-Fields"] == "n"
    alone_reply = _post(server, "/completion", dict(sampled, n=1)).json()
    assert response.json()["content"] == alone_reply["content"]
    assert response.json()["generation_settings"]["seed"] == 5


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"logit_bias": [["Hello", -1]]}, "logit_bias[0][0]"),
        ({"logit_bias": [[5]]}, "logit_bias[0]"),
        ({"logit_bias": [[5, True]]}, "logit_bias[0][1]"),
        ({"logit_bias": [[5, 1e9]]}, "logit_bias[0][1]"),
        ({"logit_bias": [[-1, 1.0]]}, "logit_bias[0][0]"),
        ({"logit_bias": 3}, "logit_bias"),
        ({"prompt": [1, "two"]}, "prompt"),
        ({"prompt": [1, -2]}, "prompt[1]"),
        ({"prompt": [10**6]}, "prompt"),
        ({"prompt": ["one", "two"]}, "prompt"),
        ({"samplers": "top_k,top_k"}, "samplers"),
        ({"n_predict": 0}, "n_predict"),
        ({"return_tokens": "yes"}, "return_tokens"),
    ],
)
def test_bad_bodies_are_400_naming_the_field(
    server: SteerServer, extra: dict[str, Any], param: str
) -> None:
    body = dict(_greedy(PROMPTS[0], 2), **extra)
    response = httpx.post(
        f"{server.http_url}/completion",
        content=json.dumps(body, allow_nan=True),
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    still = _post(server, "/completion", _greedy(PROMPTS[0], 2))
    assert still.status_code == 200 and still.json()["tokens_predicted"] == 2


def test_sampled_reply_is_the_seeded_engine_reply(
    server: SteerServer, tiny_llama: ModelHandle
) -> None:
    body = {"prompt": PROMPTS[4], "n_predict": 10, "temperature": 0.9, "top_k": 40, "seed": 77}
    reply = _post(server, "/completion", dict(body, return_tokens=True)).json()
    sampling = SamplingConfig(temperature=0.9, top_k=40, seed=77)
    request = GenerationRequest(prompt=PROMPTS[4], sampling=sampling, max_new_tokens=10)
    assert tuple(reply["tokens"]) == alone(tiny_llama, request)
