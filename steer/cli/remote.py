"""``steer generate``, ``steer chat`` and ``steer models``: talk to a running ``steer serve``.

``steer models`` itself lives in :mod:`steer.cli.server_models`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steer.errors import FailedPreconditionError, InvalidArgumentError, SteerError

DEFAULT_SERVER = os.environ.get("STEER_SERVER", "127.0.0.1:50051")


def connection_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--server", default=DEFAULT_SERVER, help=f"HOST:PORT (default {DEFAULT_SERVER})"
    )
    parser.add_argument("--token-file", type=Path, help="bearer token for a server with auth")
    parser.add_argument("--tls-ca", type=Path, help="PEM root certificate: connect over TLS")
    parser.add_argument("--timeout", type=float, help="seconds per call")


def _generation_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="", help="model id on the server (default: its default)")
    parser.add_argument(
        "--steer",
        action="append",
        default=[],
        metavar="ID=STRENGTH",
        help="slider: add the server artifact ID times STRENGTH (repeatable; "
        "put one there with steer artifacts upload)",
    )
    parser.add_argument(
        "--vector",
        action="append",
        default=[],
        metavar="DIR=STRENGTH",
        help="slider from a local artifact directory, sent inline (repeatable)",
    )
    parser.add_argument(
        "--ablate", action="append", default=[], metavar="ID", help="ablate a server direction"
    )
    parser.add_argument(
        "--slider",
        action="append",
        default=[],
        metavar="MODE:SAE:FEATURE=VALUE",
        help="SAE feature slider (MODE clamp, scale or add_decoder; SAE a loaded SAE id), "
        "e.g. clamp:my-sae:123=0 (repeatable)",
    )
    parser.add_argument(
        "--card",
        type=Path,
        help="character card (SillyTavern V2/V1 JSON or PNG): the model plays the character; "
        "its description, personality, scenario and first message are in the prompt",
    )
    parser.add_argument("--user", default="User", help="your name in the scene (with --card)")
    parser.add_argument(
        "--format",
        default="chat_template",
        help="role-play prompt format with --card: chat_template (default), chatml, mistral, "
        "llama3, alpaca, limamono or shorirp (docs/rp.md)",
    )
    parser.add_argument("--temperature", type=float, help="0 = greedy (default 1)")
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--min-p", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--max-new-tokens", type=int, default=0, help="0 = server default")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _split_slider(text: str, option: str) -> tuple[str, float]:
    name, sep, value = text.rpartition("=")
    try:
        if not sep or not name:
            raise ValueError
        return name, float(value)
    except ValueError:
        raise InvalidArgumentError(f"expected NAME=STRENGTH, got {text!r}", field=option) from None


def feature_sliders(args: argparse.Namespace) -> list[Any]:
    """``--slider MODE:SAE:FEATURE=VALUE`` options as slider interventions."""
    from steer.client import slider

    built = []
    for text in args.slider:
        name, value = _split_slider(text, "--slider")
        mode, _, rest = name.partition(":")
        sae_id, _, feature = rest.partition(":")
        if not sae_id or not feature.isdigit():
            raise InvalidArgumentError(
                f"expected MODE:SAE:FEATURE=VALUE, got {text!r}", field="--slider"
            )
        built.append(slider(sae_id, int(feature), mode, value))
    return built


def interventions(args: argparse.Namespace) -> list[Any]:
    from steer.client import ablate, add

    built = [ablate(artifact_id) for artifact_id in args.ablate] + feature_sliders(args)
    for text in args.steer:
        name, strength = _split_slider(text, "--steer")
        built.append(add(name, strength))
    return built + [interventions_of_vector(text) for text in args.vector]


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "model": args.model,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "min_p": args.min_p,
        "seed": args.seed,
        "max_new_tokens": args.max_new_tokens,
        "stop": args.stop,
    }


def _options(args: argparse.Namespace) -> dict[str, Any]:
    return {**_sampling(args), "interventions": interventions(args)}


def connect(args: argparse.Namespace) -> Any:
    from steer.cli.serve import read_token
    from steer.client import SteerClient

    return SteerClient(
        args.server,
        token=read_token(args.token_file) if args.token_file else None,
        root_certificates=args.tls_ca.read_bytes() if args.tls_ca else None,
        timeout=args.timeout,
    )


@contextmanager
def session(args: argparse.Namespace) -> Iterator[Any]:
    """A connected client; no server at ``--server`` becomes an error that says what to do."""
    from steer.client import Unavailable

    try:
        with connect(args) as client:
            yield client
    except Unavailable as error:
        if "connect" not in error.message.lower():
            raise  # e.g. the server is shutting down
        raise FailedPreconditionError(
            f"no steer server answers at {args.server}: start one with `steer serve` (in "
            "another terminal), or name a running one with --server HOST:PORT",
            field="--server",
        ) from None


# -- character cards --------------------------------------------------------------------------


@dataclass(frozen=True)
class CardScene:
    """A character card played through the server's role-play prompt (docs/rp.md)."""

    card: Any  # steer.rp.scene.Character
    user: str
    prompt_format: str
    system: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> CardScene | None:
        if args.card is None:
            return None
        from steer.rp.cards import read_card
        from steer.rp.formats import get_format

        get_format(args.format)  # an unknown format is named before anything is sent
        return cls(read_card(args.card), args.user, args.format, args.system)

    @property
    def greeting(self) -> str:
        """The card's first message, ``{{user}}`` and ``{{char}}`` filled in."""
        return str(self.card.with_user(self.user).first_message)

    def request(self, turns: list[dict[str, str]]) -> dict[str, Any]:
        """``roleplay`` for :func:`steer.client.generate_request`: the card and the turns after
        its first message (the server puts that message first)."""
        from steer.rp.cards import card_to_json

        scene: dict[str, Any] = {"user": {"name": self.user}, "turns": turns}
        if self.system:
            scene["system"] = self.system
        return {
            "card": card_to_json(self.card),
            "scene": scene,
            "prompt_format": self.prompt_format,
            "speaker": self.card.name,
        }


# -- generate ---------------------------------------------------------------------------------


def _generate_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Generate through a running server.")
    parser.add_argument("prompt", help="prompt text ('-' reads stdin)")
    parser.add_argument(
        "--raw",
        action="store_true",
        help="send the prompt as raw text; by default it is a user message in the chat template",
    )
    parser.add_argument("--system", help="system message")
    parser.add_argument("--compare", action="store_true", help="default vs steered, same seed")
    parser.add_argument("--json", action="store_true", help="one JSON line per completion")
    connection_arguments(parser)
    _generation_arguments(parser)
    return parser


def _generate_request(args: argparse.Namespace, prompt: str) -> tuple[str | None, dict[str, Any]]:
    """(raw prompt or None, the other generate_request options) for ``steer generate``."""
    request: dict[str, Any] = _options(args)
    card = CardScene.from_args(args)
    if card is not None:
        if args.raw:
            raise InvalidArgumentError("a card's scene is not raw text; drop --raw", field="--raw")
        request["roleplay"] = card.request([{"speaker": args.user, "content": prompt}])
        return None, request
    if args.raw:
        return prompt, request
    messages = [{"role": "system", "content": args.system}] if args.system else []
    request["messages"] = [*messages, {"role": "user", "content": prompt}]
    return None, request


def generate(argv: list[str], prog: str) -> int:
    args = _generate_parser(prog).parse_args(argv)
    text = sys.stdin.read() if args.prompt == "-" else args.prompt
    prompt, request = _generate_request(args, text)
    with session(args) as client:
        if args.compare or args.json:
            completions = client.complete(prompt, compare=args.compare, **request)
            for side, completion in completions.items():
                if args.json:
                    record = {"side": side, **completion.__dict__}
                    print(json.dumps(record))
                else:
                    print(f"--- {side} ---\n{completion.text}\n")
            return 0
        final = None
        for event in client.generate(prompt, **request):
            print(event.text, end="", flush=True)
            if event.finish_reason:
                final = event
        print()
        if final is not None:
            print(
                f"[{final.finish_reason}; {final.completion_tokens} tokens; seed {final.seed}]",
                file=sys.stderr,
            )
    return 0


# -- chat -------------------------------------------------------------------------------------

CHAT_HELP = """commands: /steer ID=STRENGTH (0 removes), /ablate ID, /sliders, /reset, /quit"""


@dataclass
class ChatState:
    """What ``steer chat`` sends with every message, and the conversation so far."""

    sliders: dict[str, float]
    #: --vector: local artifacts sent inline, (option text, intervention)
    vectors: list[tuple[str, Any]]
    features: list[Any]
    #: the --slider texts, for /sliders
    feature_texts: list[str]
    ablations: list[str]
    system: str | None = None
    card: CardScene | None = None
    #: chat messages ({role, content}), or with a card the scene's turns ({speaker, content})
    history: list[dict[str, str]] = field(default_factory=list)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ChatState:
        vectors = [(text, interventions_of_vector(text)) for text in args.vector]
        sliders = dict(_split_slider(s, "--steer") for s in args.steer)
        state = cls(
            sliders={name: strength for name, strength in sliders.items() if strength},
            vectors=vectors,
            features=feature_sliders(args),
            feature_texts=list(args.slider),
            ablations=list(args.ablate),
            system=args.system,
            card=CardScene.from_args(args),
        )
        state.reset()
        return state

    def reset(self) -> None:
        has_system = self.system and self.card is None
        self.history = [{"role": "system", "content": self.system or ""}] if has_system else []

    def interventions(self) -> list[Any]:
        from steer.client import ablate, add

        return (
            [ablate(a) for a in self.ablations]
            + self.features
            + [add(name, strength) for name, strength in self.sliders.items()]
            + [intervention for _, intervention in self.vectors]
        )

    def summary(self) -> str:
        shown = [f"{name}={strength:g}" for name, strength in self.sliders.items()]
        shown += [f"vector {text}" for text, _ in self.vectors]
        shown += [f"feature {text}" for text in self.feature_texts]
        ablated = ", ".join(self.ablations) or "none"
        return f"sliders: {', '.join(shown) or 'none'}; ablated: {ablated}"

    def request(self, line: str) -> dict[str, Any]:
        """The options of the next request, with ``line`` as the user's new message."""
        if self.card is None:
            self.history.append({"role": "user", "content": line})
            return {"messages": list(self.history)}
        self.history.append({"speaker": self.card.user, "content": line})
        return {"roleplay": self.card.request(list(self.history))}

    def reply(self, text: str) -> None:
        if self.card is None:
            self.history.append({"role": "assistant", "content": text})
        else:
            self.history.append({"speaker": self.card.card.name, "content": text.strip()})


def interventions_of_vector(text: str) -> Any:
    """``--vector DIR=STRENGTH`` as an inline add (the local artifact is read here)."""
    from steer.client import add_local

    path, strength = _split_slider(text, "--vector")
    return add_local(path, strength)


def check_artifact(client: Any, artifact_id: str, option: str) -> None:
    """Raise at once (NotFound, FailedPrecondition) if the server cannot use ``artifact_id``."""
    from steer.client import RemoteError

    try:
        client.artifact(artifact_id)
    except RemoteError as error:
        hint = " (steer artifacts list shows what the server has)"
        raise type(error)(f"{error.message}{hint}", field=option) from None


def chat(argv: list[str], prog: str) -> int:
    parser = argparse.ArgumentParser(prog=prog, description="Interactive chat with sliders.")
    parser.add_argument("--system", help="system message")
    connection_arguments(parser)
    _generation_arguments(parser)
    args = parser.parse_args(argv)
    state = ChatState.from_args(args)
    print(CHAT_HELP, file=sys.stderr)
    with session(args) as client:
        client.model_info(args.model)  # no server, or no such model: said before the first line
        for name in state.sliders:
            check_artifact(client, name, "--steer")
        for name in state.ablations:
            check_artifact(client, name, "--ablate")
        if state.card is not None and state.card.greeting:
            print(f"{state.card.card.name}: {state.card.greeting}")
        return _chat_loop(client, state, _sampling(args))


def _chat_loop(client: Any, state: ChatState, options: dict[str, Any]) -> int:
    from steer.client import RemoteError

    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            return 0
        if not line:
            continue
        if line.startswith("/"):
            if _chat_command(line, state, client):
                return 0
            continue
        request = state.request(line)
        reply = ""
        try:
            for event in client.generate(**request, interventions=state.interventions(), **options):
                reply += event.text
                print(event.text, end="", flush=True)
        except RemoteError as error:
            state.history.pop()
            print(f"error: {error}", file=sys.stderr)
            continue
        print()
        state.reply(reply)


def _chat_command(line: str, state: ChatState, client: Any) -> bool:
    """Handle a /command; True means quit. Ids are checked with the server at once."""
    command, _, rest = line.partition(" ")
    rest = rest.strip()
    try:
        if command in ("/quit", "/exit"):
            return True
        if command == "/steer":
            name, strength = _split_slider(rest, "/steer")
            if strength:
                check_artifact(client, name, "/steer")
                state.sliders[name] = strength
            else:
                state.sliders.pop(name, None)
        elif command == "/ablate" and rest:
            check_artifact(client, rest, "/ablate")
            state.ablations.append(rest)
        elif command == "/reset":
            state.reset()
        elif command != "/sliders":
            print(CHAT_HELP, file=sys.stderr)
            return False
    except SteerError as error:
        print(f"error: {error}", file=sys.stderr)
        return False
    print(state.summary(), file=sys.stderr)
    return False


def main(argv: list[str], *, prog: str = "steer", command: str = "generate") -> int:
    from steer.cli.server_models import models

    commands = {"generate": generate, "chat": chat, "models": models}
    if command not in commands:
        raise InvalidArgumentError(f"unknown command {command!r}", field="command")
    return commands[command](argv, prog)
