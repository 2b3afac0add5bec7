"""``steer artifacts upload|list|download|delete``: vector artifacts on a running ``steer serve``.

An artifact is a directory with ``vectors.safetensors`` and ``steer.json`` (what
``steer directions compute --out DIR`` writes). Once uploaded, requests name it by its id:
``steer generate --steer ID=4``, ``steer chat --steer ID=2``, ``--ablate ID``, a named slider.

steer artifacts upload DIR [--id ID] [--overwrite]    # id: the directory's name by default
steer artifacts list [--json]                          # broken ones too, with the reason
steer artifacts download ID DIR [--overwrite]
steer artifacts delete ID
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from steer.cli.remote import connection_arguments, session
from steer.errors import FailedPreconditionError


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]) if __doc__ else None,
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    upload = actions.add_parser("upload", help="put a local artifact directory on the server")
    upload.add_argument("directory", type=Path, help="artifact directory (steer.json + vectors)")
    upload.add_argument("--id", default="", help="id on the server (default: the directory name)")
    upload.add_argument("--overwrite", action="store_true", help="replace an artifact of that id")
    listing = actions.add_parser("list", help="the server's artifacts, and any that are broken")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    download = actions.add_parser("download", help="copy an artifact from the server")
    download.add_argument("artifact_id", metavar="ID")
    download.add_argument("directory", type=Path, help="where to write it (created)")
    download.add_argument("--overwrite", action="store_true", help="write into a non-empty DIR")
    delete = actions.add_parser("delete", help="remove an artifact (a broken one too)")
    delete.add_argument("artifact_id", metavar="ID")
    for sub in (upload, listing, download, delete):
        connection_arguments(sub)
    return parser


def layer_summary(layers: list[int], has_shared: bool) -> str:
    """``8-12``, ``3,7,9`` or ``shared``: which layers an artifact has vectors for."""
    if not layers:
        return "shared" if has_shared else "-"
    ordered = sorted(layers)
    if ordered == list(range(ordered[0], ordered[-1] + 1)) and len(ordered) > 2:
        text = f"{ordered[0]}-{ordered[-1]}"
    else:
        text = ",".join(str(layer) for layer in ordered)
    return text + ("+shared" if has_shared else "")


def _describe(info: Any) -> dict[str, Any]:
    return {
        "artifact_id": info.artifact_id,
        "kind": info.kind,
        "d_model": info.d_model,
        "layers": list(info.layers),
        "has_shared": info.has_shared,
        "model_name": info.model_name,
        "broken": False,
    }


def _list(client: Any, as_json: bool) -> int:
    response = client.list_artifacts()
    records = [_describe(info) for info in response.artifacts]
    broken = [
        {"artifact_id": b.artifact_id, "broken": True, "reason": b.reason} for b in response.broken
    ]
    if as_json:
        for record in [*records, *broken]:
            print(json.dumps(record))
        return 0
    if not records and not broken:
        print("no artifacts on the server (put one there: steer artifacts upload DIR)")
    for record in records:
        layers = layer_summary(record["layers"], record["has_shared"])
        print(
            f"{record['artifact_id']:<24} {record['kind']:<10} layers={layers:<10} "
            f"d_model={record['d_model']:<6} model={record['model_name'] or '?'}"
        )
    for record in broken:
        print(f"{record['artifact_id']:<24} BROKEN     {record['reason']}")
    return 0


def _upload(client: Any, args: argparse.Namespace) -> int:
    from steer.artifacts import load_vector
    from steer.client import AlreadyExists

    artifact = load_vector(args.directory)  # a local mistake is named before anything is sent
    artifact_id = args.id or args.directory.resolve().name
    try:
        info = client.upload_artifact(args.directory, artifact_id, overwrite=args.overwrite)
    except AlreadyExists:
        raise FailedPreconditionError(
            f"the server already has an artifact {artifact_id!r}; add --overwrite to replace it "
            "or --id to choose another id",
            field="--id",
        ) from None
    layers = layer_summary(list(info.layers), info.has_shared)
    print(f"uploaded {args.directory} as {info.artifact_id} ({artifact.kind}, layers {layers})")
    print(f'use it:  steer generate --steer {info.artifact_id}=4 "..."')
    return 0


def _download(client: Any, args: argparse.Namespace) -> int:
    directory: Path = args.directory
    if directory.exists() and any(directory.iterdir()) and not args.overwrite:
        raise FailedPreconditionError(
            f"{directory} exists and is not empty; add --overwrite to write into it",
            field="directory",
        )
    client.download_artifact(args.artifact_id, directory)
    print(f"downloaded {args.artifact_id} to {directory}")
    return 0


def main(argv: list[str], *, prog: str = "steer artifacts", command: str = "artifacts") -> int:
    args = _parser(prog).parse_args(argv)
    with session(args) as client:
        if args.action == "list":
            return _list(client, args.json)
        if args.action == "upload":
            return _upload(client, args)
        if args.action == "download":
            return _download(client, args)
        response = client.delete_artifact(args.artifact_id)
        note = " (it was broken)" if response.was_broken else ""
        print(f"deleted {response.artifact_id}{note}")
    return 0
