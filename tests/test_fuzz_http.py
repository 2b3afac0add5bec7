"""Property-based fuzzing of the OpenAI-compatible HTTP API (issue #15: issue #14's fuzzer over
the JSON bodies), on an in-process server over the tiny llama.

``POST /v1/completions`` and ``/v1/chat/completions`` get bodies built from every key
``steer.http.fields`` knows (each sampler under each alias, the unsupported samplers and their
parameters, ``steer.NAME`` sliders known and unknown, ``steering`` lists of Intervention JSON,
messages with odd roles, content parts and names, prompt lists, ``n``, ``logprobs``,
``stream``, ``stream_options``, models), with one or two hostile values: wrong JSON types,
NaN, +-inf, 1e308, 5e-324, integers past 64 bits, huge and deeply nested values, lone
surrogates, duplicated keys. Beside them: bodies that are no JSON object (random and mutated
bytes, other encodings, over the body limit), wrong content types, and every route, method and
odd path. The harness is tests/fuzzing.py's (:class:`HttpFuzzer`); a fixed seed and a bounded
count (about 280 requests, a minute or so on 2 cores); ``python scripts/fuzz_service.py``
runs the long version.

Properties, after every request: never a 5xx; every error is OpenAI's
``{"error": {"message", "type", "param", "code"}}`` (in a stream: an error chunk followed by
``data: [DONE]``, never a cut connection), with no traceback and no absolute path of the models
root; every body and chunk is strict JSON; health (HTTP and gRPC) answers and the model is still
served; a normal greedy stream over HTTP sent with each generation body gets exactly the text
it gets alone.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fuzzing import (
    HTTP_GENERATION,
    HttpCase,
    HttpFuzzer,
    fuzz_server,
    http_vocabulary,
    run_http_fuzz,
)
from test_server import make_settings

from steer.http import fields
from steer.models import ModelHandle
from steer.server import SteerServer

SEED = 15
#: requests per group (http_cases' keyword arguments, count): about 280 in all
GROUPS: dict[str, tuple[dict[str, Any], int]] = {
    "completions": ({"generation": ("/v1/completions",), "parts": ("json",)}, 110),
    "chat": ({"generation": ("/v1/chat/completions",), "parts": ("json",)}, 110),
    "raw-and-routes": ({"parts": ("raw", "other")}, 60),
}


@pytest.fixture(scope="module")
def fuzzer(
    tiny_llama: ModelHandle, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[HttpFuzzer]:
    root = tmp_path_factory.mktemp("fuzz-http") / "models"
    with fuzz_server(tiny_llama, root, http_port=0) as grpc_fuzzer:
        running = HttpFuzzer(grpc_fuzzer)
        try:
            running.start()
            yield running
        finally:
            running.close()


def test_the_vocabulary_is_every_field_the_parser_knows(fuzzer: HttpFuzzer) -> None:
    """Every alias of every sampler, every unsupported sampler and parameter: read from
    steer.http.fields' tables, so a new field is fuzzed without a change to the fuzzer."""
    vocabulary = set(http_vocabulary(fuzzer.world))
    aliases = {alias for names, _ in fields.SAMPLER_FIELDS.values() for alias in names}
    known = aliases | set(fields.UNSUPPORTED) | set(fields.PARAMETERS)
    assert known <= vocabulary, known - vocabulary
    assert {"logit_bias", "custom_token_bans", "sampler_order", "sampler_priority"} <= vocabulary
    assert {"n", "stream", "stream_options", "logprobs", "top_logprobs", "stop"} <= vocabulary
    assert set(HTTP_GENERATION) <= set(fuzzer.routes)


@pytest.mark.parametrize("group", list(GROUPS))
def test_fuzzed_http_requests_keep_the_properties(fuzzer: HttpFuzzer, group: str) -> None:
    kinds, count = GROUPS[group]
    result = run_http_fuzz(fuzzer, count, SEED, strategy=fuzzer.cases(**kinds), strict=True)
    labels = {outcome.label for outcome in result.outcomes}
    if group == "raw-and-routes":
        assert {f"raw POST {path}" for path in HTTP_GENERATION} <= labels, labels
        assert "other routes and methods" in labels, labels
        assert {"400", "404", "405"} <= set(result.statuses), result.statuses
        return
    # the bodies must reach the engine, not only the parser, and run beside the normal stream
    assert result.statuses["200"] >= count // 10, result.statuses
    assert result.innocent_streams == len(result.outcomes)
    assert result.statuses["400"] >= count // 5, result.statuses


def test_every_route_answers_in_shape(fuzzer: HttpFuzzer) -> None:
    """Each served route with its own method, and the same route with every other method."""
    for path, methods in sorted(fuzzer.routes.items()):
        for method in ("GET", "POST", "PUT", "DELETE"):
            kind = "route" if method in methods else "other"
            case = HttpCase(method, path, None, "application/json", kind)
            outcome = fuzzer.run(case)
            assert not outcome.violations, (method, path, outcome.summary())
            if method not in methods:
                assert outcome.code == "405", (method, path, outcome.code)


# -- regressions the fuzzer found ------------------------------------------------------------------


def _post(fuzzer: HttpFuzzer, body: dict[str, object]) -> httpx.Response:
    return fuzzer.client.post("/v1/completions", json={"prompt": "Hi", **body})


@pytest.mark.parametrize(
    "key",
    [
        "min_length",
        "min_tokens",
        "top_k",
        "rep_pen_range",
        "repeat_last_n",
        "dry_allowed_length",
        "dry_penalty_last_n",
        "mirostat",
        "max_tokens",
        "n_predict",
    ],
)
@pytest.mark.parametrize("value", [2**32, 2**63 - 1])
def test_counts_past_uint32_are_400_naming_the_field(
    fuzzer: HttpFuzzer, key: str, value: int
) -> None:
    """Was a 500 (ValueError "Value out of range" setting a uint32 proto field): an integer
    field accepted anything up to 2**63 - 1."""
    response = _post(fuzzer, {key: value})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == key
    assert _post(fuzzer, {key: 2**32 - 1, "max_tokens": 1}).status_code != 500


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "\ud800"}, "prompt"),
        ({"prompt": "Hi", "model": "a\udfffb"}, "model"),
        ({"prompt": "Hi", "steer.\ud800": 1.0}, "steer.\\ud800"),
        ({"prompt": "Hi", "stop": ["ok", "\udbff"]}, "stop[1]"),
        ({"prompt": "Hi", "banned_strings": ["\ud800"]}, "banned_strings[0]"),
        ({"prompt": "Hi", "dry_sequence_breakers": '["\\ud800"]'}, "dry_sequence_breakers[0]"),
        ({"prompt": "Hi", "stream": True, "stop": ["\ud800"]}, "stop[0]"),
        ({"messages": [{"role": "user", "content": "\ud800"}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": "Hi", "name": "\udfff"}]}, "messages[0].name"),
    ],
)
def test_unpaired_surrogates_are_400_naming_the_field(
    fuzzer: HttpFuzzer, body: dict[str, object], param: str
) -> None:
    """Were 500s: JSON's \\ud800 escape parses to a str that no tokenizer, protobuf field or
    UTF-8 encoder takes (UnicodeEncodeError in the request conversion, TypeError in the
    tokenizer for a role-play scene)."""
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    response = _send_json(fuzzer, path, {"max_tokens": 2, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and "unpaired surrogate" in error["message"], error


def test_an_escaped_surrogate_pair_is_a_character(fuzzer: HttpFuzzer) -> None:
    body = {"prompt": "Hi \ud83d\udc09", "max_tokens": 2, "stop": ["\ud83d\udc09"]}
    assert _send_json(fuzzer, "/v1/completions", body).status_code == 200


def _send_json(fuzzer: HttpFuzzer, path: str, body: dict[str, object]) -> httpx.Response:
    """``body`` as ASCII JSON (json.dumps escapes surrogates; httpx's json= would refuse)."""
    content = json.dumps(body).encode()
    return fuzzer.client.post(path, content=content, headers={"content-type": "application/json"})


def test_no_such_route_and_wrong_method_are_openai_errors(fuzzer: HttpFuzzer) -> None:
    """Were Starlette's ``{"detail": "Not Found"}`` and ``{"detail": "Method Not Allowed"}``."""
    missing = fuzzer.client.get("/v1/nope")
    assert missing.status_code == 404
    assert missing.json() == {
        "error": {"message": "Not Found", "type": "not_found", "param": None, "code": "NOT_FOUND"}
    }
    wrong = fuzzer.client.get("/v1/completions")
    assert wrong.status_code == 405
    assert wrong.json()["error"]["code"] == "METHOD_NOT_ALLOWED"
    assert wrong.headers["allow"] == "POST"


def test_http_connections_have_tcp_nodelay(tiny_llama: ModelHandle, tmp_path: Path) -> None:
    """Without TCP_NODELAY each answer on a kept-alive connection and each SSE chunk waits for
    the client's delayed ACK (about 40 ms): checked on the server's own connection sockets."""
    settings = make_settings(tmp_path, http_port=0)
    with (
        SteerServer(settings, models={"tiny": tiny_llama}) as running,
        socket.create_connection(("127.0.0.1", running.http_port)) as connection,
    ):
        connection.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        while not answer.endswith(b'{"status":"ok"}'):
            answer += connection.recv(4096)
        connections = list(running._http.server_state.connections)
        assert connections, "the server holds the kept-alive connection"
        for protocol in connections:
            server_side = protocol.transport.get_extra_info("socket")
            assert server_side.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
