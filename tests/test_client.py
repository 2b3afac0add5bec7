"""steer.client (sync and asyncio) and the steer generate / models / chat commands, against an
in-process server over loopback."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from test_server import PROMPTS, direction_artifact, make_settings

from steer import errors
from steer.artifacts import save_vector
from steer.cli import main as steer_main
from steer.client import (
    AsyncSteerClient,
    InvalidArgument,
    NotFound,
    SteerClient,
    add,
    add_local,
    translate,
)
from steer.models import ModelHandle
from steer.server import SteerServer
from steer.vectors import SteeringVector


@pytest.fixture(scope="module")
def served(
    tiny_llama: ModelHandle, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SteerServer]:
    root = tmp_path_factory.mktemp("client")
    direction_artifact(root, tiny_llama, "refusal")
    vector = SteeringVector.from_shared(torch.randn(64, generator=torch.Generator().manual_seed(4)))
    save_vector(
        root / "artifacts" / "calm", vector, handle=tiny_llama, hooks=["blocks.2.hook_resid_post"]
    )
    with SteerServer(make_settings(root), models={"tiny": tiny_llama}) as server:
        yield server


@pytest.fixture
def client(served: SteerServer) -> Iterator[SteerClient]:
    with SteerClient(served.target, timeout=60) as connected:
        yield connected


def test_typed_errors_are_steer_errors_with_fields(client: SteerClient) -> None:
    with pytest.raises(InvalidArgument) as bad:
        client.complete("Hi", temperature=-2.0)
    assert isinstance(bad.value, errors.InvalidArgumentError)
    assert bad.value.field == "sampling.temperature"
    assert str(bad.value).startswith("sampling.temperature: ")
    with pytest.raises(NotFound) as missing:
        client.model_info("absent")
    assert isinstance(missing.value, errors.NotFoundError) and missing.value.field == "model"


def test_artifact_hooks_are_the_default_for_add(client: SteerClient, served: SteerServer) -> None:
    by_id = client.complete(
        PROMPTS[0], temperature=0, max_new_tokens=8, interventions=[add("calm", 5.0)]
    )
    local = add_local(served.settings.artifacts_dir / "calm", 5.0)  # hooks from its steer.json
    assert list(local.add.hooks) == ["blocks.2.hook_resid_post"]
    inline = client.complete(PROMPTS[0], temperature=0, max_new_tokens=8, interventions=[local])
    plain = client.complete(PROMPTS[0], temperature=0, max_new_tokens=8)
    assert by_id[None].token_ids == inline[None].token_ids != plain[None].token_ids


def test_async_client_matches_sync(client: SteerClient, served: SteerServer) -> None:
    sync = client.complete(PROMPTS[1], temperature=0, max_new_tokens=8)[None]

    async def run() -> tuple[list[str], list[Any], Any, Exception | None]:
        missing: Exception | None = None
        async with AsyncSteerClient(served.target, timeout=60) as remote:
            stream = remote.generate(PROMPTS[1], temperature=0, max_new_tokens=8)
            texts = [event.text async for event in stream]
            together = await asyncio.gather(
                *[remote.complete(p, temperature=0, max_new_tokens=8) for p in PROMPTS[:4]]
            )
            models = await remote.models()
            try:
                await remote.model_info("absent")
            except NotFound as error:
                missing = error
            return texts, list(together), models, missing

    texts, together, models, missing = asyncio.run(run())
    assert "".join(texts) == sync.text
    assert together[1][None].token_ids == sync.token_ids
    assert [m.model_id for m in models.models] == ["tiny"]
    assert isinstance(missing, NotFound)


def test_translate_keeps_unknown_codes() -> None:
    import grpc

    class Fake(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.DATA_LOSS

        def details(self) -> str:
            return "lost"

        def trailing_metadata(self) -> tuple:  # type: ignore[type-arg]
            return ()

    error = translate(Fake())
    assert error.code is grpc.StatusCode.DATA_LOSS and str(error) == "lost"


def _run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = steer_main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_generate_streams_and_compares(
    served: SteerServer, client: SteerClient, capsys: pytest.CaptureFixture[str]
) -> None:
    server = ["--server", served.target]
    options = [*server, "--temperature", "0", "--max-new-tokens", "8"]
    expected = client.complete(PROMPTS[2], temperature=0, max_new_tokens=8)[None]
    code, out, err = _run_cli(["generate", PROMPTS[2], "--raw", *options], capsys)
    assert code == 0 and out == expected.text + "\n" and "length" in err
    # by default the prompt is a user message in the model's chat template
    chat = client.complete(
        messages=[{"role": "user", "content": PROMPTS[2]}], temperature=0, max_new_tokens=8
    )[None]
    code, out, _ = _run_cli(["generate", PROMPTS[2], *options], capsys)
    assert code == 0 and out == chat.text + "\n" and chat.text != expected.text
    code, out, _ = _run_cli(
        [
            "generate",
            PROMPTS[2],
            *server,
            "--temperature",
            "0",
            "--max-new-tokens",
            "8",
            "--steer",
            "calm=5",
            "--compare",
            "--json",
        ],
        capsys,
    )
    records = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and {r["side"] for r in records} == {"default", "steered"}
    default = next(r for r in records if r["side"] == "default")
    assert default["token_ids"] == chat.token_ids
    code, _, err = _run_cli(["generate", "Hi", *server, "--steer", "calm"], capsys)
    assert code == 1 and "--steer" in err  # NAME=STRENGTH is required
    code, _, err = _run_cli(["generate", "Hi", *server, "--ablate", "absent"], capsys)
    assert code == 1 and "absent" in err


def test_cli_models_and_chat(
    served: SteerServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    server = ["--server", served.target]
    code, out, _ = _run_cli(["models", "list", *server], capsys)
    assert code == 0 and "tiny" in out and "layers=4" in out
    code, out, _ = _run_cli(["models", "info", "tiny", "--json", *server], capsys)
    assert code == 0 and json.loads(out)["dModel"] == 64
    monkeypatch.setattr("sys.stdin", io.StringIO("/steer calm=3\nHello\n/sliders\n/quit\n"))
    code, out, err = _run_cli(
        ["chat", *server, "--temperature", "0", "--max-new-tokens", "4"], capsys
    )
    assert code == 0 and "calm=3" in err and out.strip()


def test_upload_download_roundtrip_through_client(
    client: SteerClient, tiny_llama: ModelHandle, tmp_path: Path
) -> None:
    local = direction_artifact(tmp_path, tiny_llama, "mine", seed=8)
    client.upload_artifact(local)
    fetched = client.download_artifact("mine", tmp_path / "back")
    from steer.artifacts import load_vector

    original = load_vector(local).vector
    again = load_vector(fetched, handle=tiny_llama).vector
    assert all(torch.equal(original.at(layer), again.at(layer)) for layer in range(4))
