"""The tokenizer and current-model routes SillyTavern calls, on a real server on loopback.

Each reply is read the way SillyTavern reads it (src/endpoints/tokenizers.js): counts equal to a
completion's ``usage.prompt_tokens``, each server's special-token flag, model choice, decoding,
and bad bodies answered 400 naming the field while the server keeps serving."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_server import PROMPTS, make_settings
from tiny import tiny_handle, tiny_tokenizer
from tokenizers import processors
from transformers import PreTrainedTokenizerFast

from steer.http.tokens import _raw_bytes
from steer.models import ModelHandle, from_pretrained_model
from steer.server import SteerServer

#: what SillyTavern posts for each API type (its remote encode endpoint), besides the text
ST_ENCODE = {
    "tabby": ("/v1/token/encode", "text", {}),
    "koboldcpp": ("/api/extra/tokencount", "prompt", {}),
    "llamacpp": ("/tokenize", "content", {}),
    "vllm": ("/tokenize", "prompt", {"model": "tiny"}),
    "aphrodite": ("/v1/tokenize", "prompt", {"model": "tiny"}),
    "ooba": ("/v1/internal/encode", "text", {}),
}
#: the routes whose default adds no special tokens (llama.cpp's ``add_special`` is false)
PLAIN_BY_DEFAULT = {"llamacpp"}
DECODE = {
    "/v1/token/decode": ("tokens", "text"),
    "/v1/internal/decode": ("tokens", "text"),
    "/api/extra/detokenize": ("ids", "result"),
    "/detokenize": ("tokens", "content"),
}


@pytest.fixture(scope="module")
def tiny_bos(tiny_llama: ModelHandle) -> ModelHandle:
    """The tiny llama with a tokenizer that starts every text with BOS (as Llama's and Gemma's
    do; the tiny tokenizer adds nothing), so the special-token flags change the ids."""
    base = tiny_tokenizer()
    backend = copy.deepcopy(base.backend_tokenizer)
    bos = str(base.bos_token)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, int(base.bos_token_id))]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=base.pad_token,
        eos_token=base.eos_token,
        bos_token=bos,
        unk_token=base.unk_token,
    )
    tokenizer.chat_template = base.chat_template
    return from_pretrained_model(tiny_llama.model, tokenizer, name="tiny-llama-bos")


@pytest.fixture(scope="module")
def qwen() -> ModelHandle:
    return tiny_handle("qwen2", seed=3)


@pytest.fixture(scope="module")
def server(
    tiny_bos: ModelHandle, qwen: ModelHandle, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SteerServer]:
    settings = make_settings(tmp_path_factory.mktemp("tokens"), http_port=0, max_prompt_tokens=64)
    with SteerServer(settings, models={"tiny": tiny_bos, "qwen": qwen}) as running:
        yield running


def _post(server: SteerServer, path: str, body: Any) -> httpx.Response:
    """``body`` as JSON, or as it is when bytes (JSON that Python's encoder will not write)."""
    if isinstance(body, bytes):
        return httpx.post(f"{server.http_url}{path}", content=body, timeout=60)
    return httpx.post(f"{server.http_url}{path}", json=body, timeout=60)


def _as_sillytavern_reads(data: dict[str, Any]) -> tuple[int, list[int]]:
    """SillyTavern's reading of a reply: ``length ?? count ?? value ?? tokens.length`` and
    ``tokens ?? ids ?? []``."""
    for key in ("length", "count", "value"):
        if data.get(key) is not None:
            count = data[key]
            break
    else:
        count = len(data["tokens"])
    ids = data.get("tokens")
    return count, ids if ids is not None else data.get("ids", [])


def _prompt_tokens(server: SteerServer, prompt: str) -> int:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 1, "temperature": 0}
    response = _post(server, "/v1/completions", body)
    assert response.status_code == 200, response.text
    return int(response.json()["usage"]["prompt_tokens"])


@pytest.mark.parametrize("api", sorted(ST_ENCODE))
def test_sillytavern_counts_equal_the_completion_prompt(
    server: SteerServer, tiny_bos: ModelHandle, api: str
) -> None:
    path, key, extra = ST_ENCODE[api]
    tokenizer = tiny_bos.tokenizer
    for prompt in PROMPTS[:3]:
        response = _post(server, path, {key: prompt, **extra})
        assert response.status_code == 200, response.text
        count, ids = _as_sillytavern_reads(response.json())
        if api in PLAIN_BY_DEFAULT:
            assert ids == tokenizer(prompt, add_special_tokens=False)["input_ids"]
        else:
            assert ids == tokenizer(prompt)["input_ids"]
            assert count == _prompt_tokens(server, prompt)
        assert count == len(ids)


def test_special_token_flags_keep_each_servers_meaning(
    server: SteerServer, tiny_bos: ModelHandle
) -> None:
    text = PROMPTS[3]
    with_bos = tiny_bos.tokenizer(text)["input_ids"]
    plain = tiny_bos.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert with_bos == [tiny_bos.tokenizer.bos_token_id, *plain]
    cases = [
        ("/v1/token/encode", {"text": text, "add_bos_token": False}, plain),
        ("/v1/token/encode", {"text": text, "add_bos_token": True}, with_bos),
        ("/tokenize", {"content": text, "add_special": True}, with_bos),
        ("/tokenize", {"prompt": text, "add_special_tokens": False}, plain),
        ("/tokenize", {"prompt": text, "add_special_tokens": None}, with_bos),
    ]
    for path, body, expected in cases:
        assert _post(server, path, body).json()["tokens"] == expected, (path, body)


def test_model_field_picks_the_tokenizer(
    server: SteerServer, qwen: ModelHandle, tiny_bos: ModelHandle
) -> None:
    text = PROMPTS[1]
    ids = _post(server, "/tokenize", {"model": "qwen", "prompt": text}).json()["tokens"]
    assert ids == qwen.tokenizer(text)["input_ids"]
    default = _post(server, "/tokenize", {"prompt": text}).json()["tokens"]
    assert default == [tiny_bos.tokenizer.bos_token_id, *ids]  # the default model's adds BOS
    missing = _post(server, "/v1/tokenize", {"model": "zzz", "prompt": text})
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "model"


def test_llamacpp_pieces_spell_the_text(server: SteerServer, tiny_bos: ModelHandle) -> None:
    """``with_pieces`` (newer SillyTavern asks llama.cpp for them): each token's piece, a string,
    or its bytes where a character is split across tokens (the emoji here, in byte-level BPE)."""
    text = "Seraphina smiles \U0001f642 and says: h\u00e9llo"
    body = {"content": text, "with_pieces": True}
    tokens = _post(server, "/tokenize", body).json()["tokens"]
    ids = [token["id"] for token in tokens]
    assert ids == tiny_bos.tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = [token["piece"] for token in tokens]
    assert any(isinstance(piece, list) for piece in pieces), "the emoji is split into bytes"
    assert all(isinstance(piece, (str, list)) for piece in pieces)
    spelled = b"".join(p.encode() if isinstance(p, str) else bytes(p) for p in pieces)
    assert spelled.decode() == text
    assert _post(server, "/tokenize", {"content": text}).json()["tokens"] == ids
    refused = _post(server, "/tokenize", {"content": text, "with_pieces": "yes"})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "with_pieces"


def test_sentencepiece_byte_tokens_are_bytes() -> None:
    assert _raw_bytes("<0xE2>") == b"\xe2" and _raw_bytes("<0xZZ>") is None
    assert _raw_bytes("\u0120the") == b" the"  # byte-level BPE's stand-in for a space
    assert _raw_bytes("\u2581the") is None  # SentencePiece's word marker is no byte


@pytest.mark.parametrize("path", sorted(DECODE))
def test_decoders_invert_the_encoders(
    server: SteerServer, tiny_bos: ModelHandle, path: str
) -> None:
    key, answer = DECODE[path]
    ids = tiny_bos.tokenizer(PROMPTS[4])["input_ids"]
    response = _post(server, path, {key: ids})
    assert response.status_code == 200, response.text
    assert response.json()[answer] == tiny_bos.tokenizer.decode(ids)
    assert response.json()[answer] == "<|im_start|>" + PROMPTS[4]  # special tokens kept
    assert _post(server, path, {key: []}).json()[answer] == ""


def test_current_model_routes_name_the_default(server: SteerServer) -> None:
    tabby = httpx.get(f"{server.http_url}/v1/model").json()
    assert tabby["id"] == "tiny" and tabby["object"] == "model"
    ooba = httpx.get(f"{server.http_url}/v1/internal/model/info").json()
    assert ooba == {"model_name": "tiny", "lora_names": []}


@pytest.mark.parametrize(
    ("path", "body", "param", "status"),
    [
        ("/v1/token/encode", {}, "text", 400),
        ("/v1/token/encode", {"text": 7}, "text", 400),
        ("/v1/token/encode", {"text": "hi", "add_bos_token": "yes"}, "add_bos_token", 400),
        ("/v1/token/encode", b'{"text": "a\\ud800"}', "text", 400),  # an unpaired surrogate
        ("/v1/token/encode", {"text": "x" * 64 * 32 + "x"}, "text", 400),
        ("/tokenize", {"model": 3, "prompt": "hi"}, "model", 400),
        ("/tokenize", {"text": "hi"}, "content", 400),
        ("/tokenize", {"content": "x" * 64 * 32 + "x"}, "content", 400),
        ("/v1/token/decode", {"tokens": "1 2"}, "tokens", 400),
        ("/v1/token/decode", {"tokens": [1, True]}, "tokens", 400),
        ("/v1/token/decode", {"tokens": [10**9]}, "tokens", 400),
        ("/v1/token/decode", {"tokens": [-1]}, "tokens", 400),
        ("/v1/token/decode", {"tokens": [1] * (64 + 400 + 1)}, "tokens", 400),
        ("/api/extra/detokenize", {"tokens": [1]}, "ids", 400),
    ],
)
def test_bad_bodies_are_400_naming_the_field(
    server: SteerServer, path: str, body: dict[str, Any] | bytes, param: str, status: int
) -> None:
    response = _post(server, path, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and "Traceback" not in error["message"]
    assert _post(server, "/v1/token/encode", {"text": "hi"}).status_code == 200  # still serving


def test_the_limits_are_the_servers_own(server: SteerServer) -> None:
    """A text as long as a prompt may be (64 tokens x 32 characters) and as many ids as a
    prompt and a reply together (64 + 400) are answered; one more is refused (the test above)."""
    assert _post(server, "/v1/token/encode", {"text": "x" * 64 * 32}).status_code == 200
    assert _post(server, "/v1/token/decode", {"tokens": [1] * (64 + 400)}).status_code == 200


def test_a_body_that_is_no_json_object_is_400(server: SteerServer) -> None:
    for raw in (b"[1, 2]", b"{", b'"text"'):
        response = httpx.post(f"{server.http_url}/v1/token/encode", content=raw, timeout=60)
        assert response.status_code == 400 and response.json()["error"]["param"] == "body"


def test_token_routes_need_the_bearer_token(tiny_llama: ModelHandle, tmp_path: Path) -> None:
    settings = make_settings(tmp_path, http_port=0, token="sesame")
    with SteerServer(settings, models={"tiny": tiny_llama}) as running:
        url = f"{running.http_url}/v1/token/encode"
        refused = httpx.post(url, json={"text": "hi"})
        assert refused.status_code == 401
        allowed = httpx.post(url, json={"text": "hi"}, headers={"Authorization": "Bearer sesame"})
        assert allowed.status_code == 200 and allowed.json()["length"] >= 1
