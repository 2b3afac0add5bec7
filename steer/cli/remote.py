"""``steer generate``, ``steer chat`` and ``steer models``: talk to a running ``steer serve``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from steer.errors import InvalidArgumentError

DEFAULT_SERVER = os.environ.get("STEER_SERVER", "127.0.0.1:50051")


def _connection_arguments(parser: argparse.ArgumentParser) -> None:
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
        help="slider: add the server artifact ID times STRENGTH (repeatable)",
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
    from steer.client import ablate, add, add_local

    built = [ablate(artifact_id) for artifact_id in args.ablate] + feature_sliders(args)
    for text in args.steer:
        name, strength = _split_slider(text, "--steer")
        built.append(add(name, strength))
    for text in args.vector:
        path, strength = _split_slider(text, "--vector")
        built.append(add_local(path, strength))
    return built


def _options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "model": args.model,
        "interventions": interventions(args),
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "min_p": args.min_p,
        "seed": args.seed,
        "max_new_tokens": args.max_new_tokens,
        "stop": args.stop,
    }


def connect(args: argparse.Namespace) -> Any:
    from steer.cli.serve import read_token
    from steer.client import SteerClient

    return SteerClient(
        args.server,
        token=read_token(args.token_file) if args.token_file else None,
        root_certificates=args.tls_ca.read_bytes() if args.tls_ca else None,
        timeout=args.timeout,
    )


# -- generate ---------------------------------------------------------------------------------


def generate(argv: list[str], prog: str) -> int:
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
    _connection_arguments(parser)
    _generation_arguments(parser)
    args = parser.parse_args(argv)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    request: dict[str, Any] = _options(args)
    if not args.raw:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        request["messages"] = [*messages, {"role": "user", "content": prompt}]
        prompt = None
    with connect(args) as client:
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


def chat(argv: list[str], prog: str) -> int:
    parser = argparse.ArgumentParser(prog=prog, description="Interactive chat with sliders.")
    parser.add_argument("--system", help="system message")
    _connection_arguments(parser)
    _generation_arguments(parser)
    args = parser.parse_args(argv)
    sliders: dict[str, float] = dict(_split_slider(s, "--steer") for s in args.steer)
    features = feature_sliders(args)
    ablations: list[str] = list(args.ablate)
    history: list[dict[str, str]] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    from steer.client import RemoteError, ablate, add

    print(CHAT_HELP, file=sys.stderr)
    with connect(args) as client:
        while True:
            try:
                line = input("> ").strip()
            except EOFError:
                return 0
            if not line:
                continue
            if line.startswith("/"):
                if _chat_command(line, sliders, ablations, history, args.system):
                    return 0
                continue
            history.append({"role": "user", "content": line})
            options = _options(args)
            options["interventions"] = (
                [ablate(a) for a in ablations]
                + features
                + [add(name, strength) for name, strength in sliders.items() if strength]
            )
            reply = ""
            try:
                for event in client.generate(messages=history, **options):
                    reply += event.text
                    print(event.text, end="", flush=True)
            except RemoteError as error:
                history.pop()
                print(f"error: {error}", file=sys.stderr)
                continue
            print()
            history.append({"role": "assistant", "content": reply})


def _chat_command(
    line: str,
    sliders: dict[str, float],
    ablations: list[str],
    history: list[dict[str, str]],
    system: str | None,
) -> bool:
    """Handle a /command; True means quit."""
    command, _, rest = line.partition(" ")
    if command in ("/quit", "/exit"):
        return True
    if command == "/steer":
        try:
            name, strength = _split_slider(rest.strip(), "/steer")
        except InvalidArgumentError as error:
            print(error, file=sys.stderr)
            return False
        sliders[name] = strength
    elif command == "/ablate" and rest.strip():
        ablations.append(rest.strip())
    elif command == "/reset":
        del history[int(bool(system)) :]
    elif command != "/sliders":
        print(CHAT_HELP, file=sys.stderr)
        return False
    shown = ", ".join(f"{n}={s:g}" for n, s in sliders.items()) or "none"
    print(f"sliders: {shown}; ablated: {', '.join(ablations) or 'none'}", file=sys.stderr)
    return False


# -- models -----------------------------------------------------------------------------------


def models(argv: list[str], prog: str) -> int:
    parser = argparse.ArgumentParser(prog=prog, description="Models on a running server.")
    parser.add_argument(
        "action",
        nargs="?",
        default="list",
        choices=("list", "info", "load", "unload", "saes", "load-sae", "unload-sae"),
    )
    parser.add_argument(
        "name",
        nargs="?",
        default="",
        help="model id, source for load, SAE directory for load-sae, SAE id for unload-sae",
    )
    parser.add_argument("--id", default="", help="id to load the model or SAE under")
    parser.add_argument("--model", default="", help="load-sae: the model it is for")
    parser.add_argument("--dtype", default="")
    parser.add_argument("--device", default="")
    parser.add_argument("--json", action="store_true")
    _connection_arguments(parser)
    args = parser.parse_args(argv)
    from google.protobuf.json_format import MessageToDict

    with connect(args) as client:
        if args.action in ("saes", "load-sae", "unload-sae"):
            return _saes(client, args)
        if args.action == "list":
            response = client.models()
            if args.json:
                print(json.dumps(MessageToDict(response)))
                return 0
            for info in response.models:
                mark = "*" if info.model_id == response.default_model else " "
                print(
                    f"{mark} {info.model_id:<28} {info.architecture:<12} layers={info.num_layers} "
                    f"d_model={info.d_model} running={info.stats.running} "
                    f"waiting={info.stats.waiting}"
                )
            return 0
        if args.action in ("load", "unload") and not args.name:
            raise InvalidArgumentError(f"{args.action} needs a name", field="name")
        if args.action == "unload":
            client.unload_model(args.name)
            print(f"unloaded {args.name}")
            return 0
        if args.action == "load":
            info = client.load_model(args.name, args.id, dtype=args.dtype, device=args.device)
        else:
            info = client.model_info(args.name)
        record = MessageToDict(info)
        if not args.json:
            record.pop("chatTemplate", None)
            record["hookNames"] = f"{len(info.hook_names)} names"
        print(json.dumps(record, indent=None if args.json else 2))
    return 0


def _saes(client: Any, args: argparse.Namespace) -> int:
    """``steer models saes|load-sae|unload-sae``: SAEs on the server, for --slider."""
    from google.protobuf.json_format import MessageToDict

    if args.action != "saes" and not args.name:
        raise InvalidArgumentError(f"{args.action} needs a name", field="name")
    if args.action == "unload-sae":
        client.unload_sae(args.name)
        print(f"unloaded {args.name}")
        return 0
    if args.action == "load-sae":
        infos = [client.load_sae(args.name, args.id, model=args.model)]
    else:
        infos = client.saes()
    for info in infos:
        if args.json:
            print(json.dumps(MessageToDict(info)))
        else:
            print(
                f"{info.sae_id:<24} model={info.model} {info.hook_name} "
                f"features={info.num_features} path={info.path}"
            )
    return 0


def main(argv: list[str], *, prog: str = "steer", command: str = "generate") -> int:
    commands = {"generate": generate, "chat": chat, "models": models}
    if command not in commands:
        raise InvalidArgumentError(f"unknown command {command!r}", field="command")
    return commands[command](argv, prog)
