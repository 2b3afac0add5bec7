"""Commands that talk to a server: steer artifacts, generate/chat with cards and sliders, fail fast.

Also Directions.Delete, character cards in role-play prompts, and errors that say what to do (no
server, a port in use). Against an in-process server over loopback on the tiny llama."""

from __future__ import annotations

import io
import json
import socket
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from test_server import PROMPTS, direction_artifact, make_settings

from steer.artifacts import load_vector, save_vector
from steer.cli import main as steer_main
from steer.client import InvalidArgument, NotFound, SteerClient
from steer.errors import InvalidArgumentError
from steer.models import ModelHandle
from steer.rp.cards import card_from_json, card_to_json, scene_with_card, write_png_card
from steer.rp.formats import get_format
from steer.rp.scene import Character, Scene
from steer.server import SteerServer
from steer.vectors import SteeringVector

CARD = Character(
    name="Mira",
    description="{{char}} is a lighthouse keeper on a storm-beaten rock.",
    personality="dry, patient, fond of tea",
    scenario="{{user}} washes ashore below {{char}}'s lighthouse.",
    first_message="*Mira lowers her lantern.* You're lucky the tide turned, {{user}}.",
)


@pytest.fixture(scope="module")
def served(
    tiny_llama: ModelHandle, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SteerServer]:
    root = tmp_path_factory.mktemp("cli-remote")
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


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = steer_main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# -- steer artifacts and Directions.Delete ------------------------------------------------------


def test_artifacts_upload_list_download_delete(
    served: SteerServer, tiny_llama: ModelHandle, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    server = ["--server", served.target]
    local = direction_artifact(tmp_path, tiny_llama, "cheerful", seed=3)
    code, out, _ = run(["artifacts", "upload", str(local), *server], capsys)
    assert code == 0 and "uploaded" in out and "cheerful" in out
    code, _, err = run(["artifacts", "upload", str(local), *server], capsys)
    assert code == 1 and "--overwrite" in err  # exists: the hint names the flag, not the proto
    code, out, _ = run(["artifacts", "upload", str(local), "--id", "other", *server], capsys)
    assert code == 0 and "as other" in out
    code, out, _ = run(["artifacts", "list", "--json", *server], capsys)
    records = {r["artifact_id"]: r for r in map(json.loads, out.splitlines())}
    assert records["cheerful"]["layers"] == [0, 1, 2, 3] and records["calm"]["has_shared"]
    back = tmp_path / "back"
    code, out, _ = run(["artifacts", "download", "cheerful", str(back), *server], capsys)
    assert code == 0
    assert torch.equal(load_vector(back).vector.at(2), load_vector(local).vector.at(2))
    code, _, err = run(["artifacts", "download", "cheerful", str(back), *server], capsys)
    assert code == 1 and "--overwrite" in err  # never writes into a non-empty directory
    for artifact_id in ("cheerful", "other"):
        code, out, _ = run(["artifacts", "delete", artifact_id, *server], capsys)
        assert code == 0 and f"deleted {artifact_id}" in out
    code, _, err = run(["artifacts", "delete", "cheerful", *server], capsys)
    assert code == 1 and "no artifact 'cheerful'" in err
    assert not (served.settings.artifacts_dir / "cheerful").exists()


def test_upload_of_a_directory_that_is_no_artifact_fails_before_sending(
    served: SteerServer, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "empty").mkdir()
    code, _, err = run(["artifacts", "upload", str(tmp_path / "empty"), "--server", "x:1"], capsys)
    assert code == 1 and "is not a steer vector artifact" in err and "Traceback" not in err


def test_broken_artifacts_are_listed_and_deletable(
    served: SteerServer, client: SteerClient, capsys: pytest.CaptureFixture
) -> None:
    broken = served.settings.artifacts_dir / "broken"
    broken.mkdir()
    (broken / "steer.json").write_text("[1, 2]")
    (broken / "vectors.safetensors").write_bytes(b"garbage")
    code, out, _ = run(["artifacts", "list", "--server", served.target], capsys)
    assert code == 0 and "calm" in out
    assert any(line.startswith("broken") and "BROKEN" in line for line in out.splitlines())
    response = client.delete_artifact("broken")
    assert response.was_broken and not broken.exists()
    assert "broken" not in {b.artifact_id for b in client.list_artifacts().broken}


def test_delete_is_confined_and_refuses_links(
    served: SteerServer, client: SteerClient, tmp_path: Path
) -> None:
    store = served.settings.artifacts_dir
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("precious")
    (store / "escape").symlink_to(outside, target_is_directory=True)
    try:
        with pytest.raises(NotFound, match="link"):
            client.delete_artifact("escape")
        assert (outside / "keep.txt").read_text() == "precious"
    finally:
        (store / "escape").unlink()
    for bad in ("../artifacts", "", ".hidden", "a/b"):
        with pytest.raises(InvalidArgument) as error:
            client.delete_artifact(bad)
        assert error.value.field == "artifact_id"
    with pytest.raises(NotFound):
        client.delete_artifact("never-was")
    assert (store / "calm").is_dir()  # nothing else went


# -- character cards ----------------------------------------------------------------------------


def test_scene_with_card_puts_the_card_in_as_the_format_defines() -> None:
    scene = scene_with_card(CARD, {"user": {"name": "Tomas"}})
    assert scene.characters[0].name == "Mira" and scene.user.name == "Tomas"
    assert scene.scenario == "Tomas washes ashore below Mira's lighthouse."
    assert [t.speaker for t in scene.turns] == ["Mira"]
    assert scene.turns[0].content.endswith("lucky the tide turned, Tomas.")
    text = get_format("chatml").render(scene, "Mira").text
    for part in ("lighthouse keeper on a storm-beaten rock", "fond of tea", "washes ashore"):
        assert part in text
    assert "Mira: *Mira lowers her lantern.*" in text
    # a scene that already opens with the first message (as SillyTavern sends it) keeps one
    again = scene_with_card(
        CARD, {"user": {"name": "Tomas"}, "turns": [t.__dict__ for t in scene.turns]}
    )
    assert again.turns == scene.turns
    # the scene's own scenario wins; other characters join after the card's
    own = scene_with_card(
        CARD,
        {"scenario": "A calm night.", "characters": [{"name": "Gull", "description": "a bird"}]},
    )
    assert own.scenario == "A calm night." and own.names == ("Mira", "Gull")


def _spelled_out(user: str, turns: list[dict[str, str]]) -> dict[str, Any]:
    """The scene a card stands for, written out without the card."""
    character = CARD.__dict__ | {"scenario": ""}
    opening = {"speaker": "Mira", "content": CARD.first_message}
    return {
        "characters": [character],
        "user": {"name": user},
        "scenario": CARD.scenario,
        "turns": [opening, *turns],
    }


def test_card_in_the_roleplay_prompt_equals_the_scene_spelled_out(client: SteerClient) -> None:
    turns = [{"speaker": "Tomas", "content": "Where am I?"}]
    options: dict[str, Any] = {"temperature": 0, "max_new_tokens": 8}
    with_card = client.complete(
        roleplay={
            "card": card_to_json(CARD),
            "scene": {"user": {"name": "Tomas"}, "turns": turns},
            "prompt_format": "chatml",
        },
        **options,
    )[None]
    written = client.complete(
        roleplay={"scene": _spelled_out("Tomas", turns), "prompt_format": "chatml"}, **options
    )[None]
    no_card = client.complete(
        roleplay={"scene": {"characters": [{"name": "Mira"}]}, "prompt_format": "chatml"},
        **options,
    )[None]
    assert with_card.token_ids == written.token_ids
    assert with_card.prompt_tokens == written.prompt_tokens > no_card.prompt_tokens + 30


def test_bad_cards_name_the_field(client: SteerClient) -> None:
    from steer.proto.v1 import generation_pb2

    for card_json, field in (
        ("not json", "roleplay.card_json"),
        ('{"spec": "chara_card_v2", "data": {"name": ""}}', "roleplay.card_json.name"),
        ('{"name": "Mira", "description": 3}', "roleplay.card_json.description"),
        ('{"spec": "chara_card_v9"}', "roleplay.card_json.spec"),
    ):
        message = generation_pb2.GenerateRequest(max_new_tokens=2)
        message.roleplay.card_json = card_json
        with pytest.raises(InvalidArgument) as error:
            list(client.stream(message))
        assert error.value.field == field, (card_json, error.value)


def test_generate_and_chat_with_a_card(
    served: SteerServer,
    client: SteerClient,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    card_file = tmp_path / "mira.png"
    write_png_card(CARD, card_file)
    common = ["--server", served.target, "--temperature", "0", "--max-new-tokens", "6"]
    turns = [{"speaker": "Tomas", "content": "Where am I?"}]
    expected = client.complete(
        roleplay={"scene": _spelled_out("Tomas", turns)}, temperature=0, max_new_tokens=6
    )[None]
    argv = ["generate", "Where am I?", "--card", str(card_file), "--user", "Tomas", *common]
    code, out, _ = run(argv, capsys)
    assert code == 0 and out == expected.text + "\n"
    monkeypatch.setattr("sys.stdin", io.StringIO("Where am I?\n/quit\n"))
    code, out, _ = run(["chat", "--card", str(card_file), "--user", "Tomas", *common], capsys)
    greeting, reply = out.split("\n", 1)
    assert (
        code == 0
        and greeting == "Mira: *Mira lowers her lantern.* You're lucky the tide turned, Tomas."
    )
    assert reply == f"> {expected.text}\n> "  # the prompt "> " is input()'s
    code, _, err = run(["generate", "Hi", "--card", str(tmp_path / "none.json"), *common], capsys)
    assert code == 1 and "no card file" in err


# -- steer chat: sliders ------------------------------------------------------------------------


def test_chat_sliders_list_vectors_drop_zero_and_check_ids_at_once(
    served: SteerServer, tiny_llama: ModelHandle, tmp_path: Path, capsys, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    vector = save_vector(
        tmp_path / "loud",
        SteeringVector.from_shared(4 * torch.randn(64, generator=torch.Generator().manual_seed(9))),
        handle=tiny_llama,
        hooks=["blocks.1.hook_resid_post"],
    )
    lines = "/steer calm=3\n/steer nope=2\n/sliders\n/steer calm=0\n/sliders\nHello\n/quit\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(lines))
    common = ["--server", served.target, "--temperature", "0", "--max-new-tokens", "6"]
    code, out, err = run(["chat", "--vector", f"{vector}=1", *common], capsys)
    listings = [line for line in err.splitlines() if line.startswith("sliders:")]
    assert code == 0 and f"vector {vector}=1" in listings[-1]
    assert "calm=3" in listings[0] and "calm" not in listings[-1]  # /steer calm=0 removes it
    assert "nope" in err and "no artifact 'nope'" in err  # refused when typed
    assert all("nope" not in line for line in listings)
    # the --vector slider is applied to the chat's messages, as generate applies it
    assert (
        code == 0
        and [line for line in err.splitlines() if "error" in line and "nope" not in line] == []
    )
    code, steered, _ = run(["generate", "Hello", "--vector", f"{vector}=1", *common], capsys)
    assert code == 0 and steered.strip()
    code, plain, _ = run(["generate", "Hello", *common], capsys)
    assert f"> {steered}> " in out and steered != plain


def test_chat_refuses_an_unknown_id_before_the_first_message(
    served: SteerServer, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n"))
    code, out, err = run(["chat", "--server", served.target, "--steer", "absent=2"], capsys)
    assert code == 1 and "absent" in err and "steer artifacts list" in err and not out


# -- failing fast -------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["generate", "Hi"], ["chat"], ["artifacts", "list"]])
def test_no_server_says_to_start_one(
    command: list[str], capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n"))
    target = f"127.0.0.1:{free_port()}"
    code, _, err = run([*command, "--server", target], capsys)
    assert code == 1 and "steer serve" in err and target in err and "Traceback" not in err


@pytest.mark.parametrize("option", ["--port", "--http-port"])
def test_serve_on_a_port_in_use_says_so_before_loading(
    option: str, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded before the port was checked")

    monkeypatch.setattr("steer.models.load_model", no_load)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        ports = ["--port", port] if option == "--port" else ["--port", "0", "--http-port", port]
        code, _, err = run(["serve", "--model", "smollm2-135m-instruct", *ports], capsys)
    assert code == 1 and f"port {port} on 127.0.0.1 is in use" in err and f"{option} N" in err


def test_serve_names_an_unknown_model_before_loading_any(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("steer.models.load_model", lambda *a, **k: pytest.fail("loaded"))
    argv = ["serve", "--port", "0", "--http-port", "-1", "--model", "smollm2-135m-instruct"]
    code, _, err = run([*argv, "--model", "no-such-model"], capsys)
    assert code == 1 and "no-such-model" in err and "--model" in err


# -- smaller things -----------------------------------------------------------------------------


def test_generation_passes_the_cache_without_the_deprecated_name(tiny_llama: ModelHandle) -> None:
    from steer.generation import Engine, GenerationRequest

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Engine(tiny_llama).run([GenerationRequest(prompt=PROMPTS[0], max_new_tokens=3)])
    assert not [w for w in caught if "past_key_values" in str(w.message)]


def test_chat_template_format_without_a_tokenizer_says_what_is_missing(
    tiny_llama: ModelHandle,
) -> None:
    scene = Scene(characters=(Character("Mira"),))
    with pytest.raises(InvalidArgumentError) as error:
        get_format("chat_template").render(scene, "Mira")
    assert "tokenizer" in str(error.value) and "no chat template" not in str(error.value)
    # an empty conversation is the scene's fault, not an internal error of the template
    with pytest.raises(InvalidArgumentError, match="nothing to render"):
        get_format("chat_template").render(scene, "Mira", tokenizer=tiny_llama.tokenizer)


def test_card_json_round_trip_keeps_every_field() -> None:
    assert card_from_json(card_to_json(CARD)) == CARD
