"""``steer models``: list, load and unload the models and SAEs of a running ``steer serve``."""

from __future__ import annotations

import argparse
import json
from typing import Any

from steer.cli.remote import connect, connection_arguments
from steer.errors import InvalidArgumentError


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
    connection_arguments(parser)
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
