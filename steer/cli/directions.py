"""``steer directions compute|optimize|show|refresh``: make, tune, inspect, re-hash artifacts."""

from __future__ import annotations

import argparse
import json
import threading
from pathlib import Path
from typing import Any

from steer.errors import InvalidArgumentError


def _layers(text: str) -> tuple[int, ...]:
    """``"18,19,20"`` or ``"10-21"`` -> layer tuple."""
    layers: list[int] = []
    try:
        for part in text.split(","):
            if "-" in part.strip()[1:]:
                low, high = part.split("-", 1)
                layers.extend(range(int(low), int(high) + 1))
            elif part.strip():
                layers.append(int(part))
    except ValueError:
        raise InvalidArgumentError(
            f"expected e.g. 18,19,20 or 10-21, got {text!r}", field="layers"
        ) from None
    return tuple(layers)


def _positions(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise InvalidArgumentError(
            f"expected e.g. -1,-2, got {text!r}", field="positions"
        ) from None


def _default_recipe(name: str) -> str:
    from steer.directions.data import RECIPES_DIR

    return str(RECIPES_DIR / f"{name}.toml")


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    commands = parser.add_subparsers(dest="action", required=True)

    compute = commands.add_parser("compute", help="search and save a direction from a recipe")
    compute.add_argument("--model", default="smollm2-135m-instruct", help="model name or path")
    compute.add_argument("--recipe", default=_default_recipe("refusal"), help="recipe TOML")
    compute.add_argument("--out", required=True, help="artifact directory to write")
    compute.add_argument("--method", help="override search.method")
    compute.add_argument(
        "--shrinkage", type=float, help="override search.shrinkage (methods that whiten)"
    )
    compute.add_argument("--layers", type=_layers, help="override search.layers (10-21 or 18,20)")
    compute.add_argument("--positions", type=_positions, help="override search.positions (-1,-2)")
    compute.add_argument("--top-k", type=int, help="override search.top_k")
    compute.add_argument("--kl-threshold", type=float, help="override search.kl_threshold")
    compute.add_argument("--seed", type=int, help="override data.seed")
    compute.add_argument("--max-train", type=int, help="override data.max_train")
    compute.add_argument("--max-validation", type=int, help="override data.max_validation")
    compute.add_argument("--positive", help="override data.positive (harmful prompts)")
    compute.add_argument("--negative", help="override data.negative (harmless prompts)")
    compute.add_argument("--no-filter", action="store_true", help="set data.filter = false")
    compute.add_argument("--dtype", default="float32")

    optimize = commands.add_parser("optimize", help="heretic-style per-layer kernel search")
    optimize.add_argument("--model", default="smollm2-135m-instruct")
    optimize.add_argument("--recipe", default=_default_recipe("refusal"))
    optimize.add_argument("--out", required=True, help="directory for the Pareto front")
    optimize.add_argument("--trials", type=int, default=50, help="trial budget (this run)")
    optimize.add_argument("--storage", help="sqlite file to resume from (default OUT/study.db)")
    optimize.add_argument("--seed", type=int, default=0, help="sampler seed")
    optimize.add_argument("--dtype", default="float32")

    refresh = commands.add_parser(
        "refresh",
        help="check artifacts' weight hashes in the format they were made in and record the "
        "current format (after a steer upgrade changed it)",
    )
    refresh.add_argument("directories", nargs="+", metavar="ARTIFACT")
    refresh.add_argument("--model", required=True, help="the model the artifacts were made for")
    refresh.add_argument("--dtype", default="float32")

    show = commands.add_parser("show", help="print an artifact's sidecar summary")
    show.add_argument("directory")
    show.add_argument("--json", action="store_true", help="print the full sidecar as JSON")
    return parser


def main(argv: list[str], *, prog: str = "steer directions", command: str = "directions") -> int:
    args = _parser(prog).parse_args(argv)
    if args.action == "show":
        return _show(Path(args.directory), as_json=args.json)
    from steer.directions.recipe import load_recipe, with_overrides
    from steer.models import load_model

    if args.action == "refresh":
        from steer.artifacts import refresh_model_record

        handle = load_model(args.model, dtype=args.dtype)
        for directory in args.directories:
            print(refresh_model_record(directory, handle))
        return 0
    recipe = load_recipe(args.recipe)
    if args.action == "compute":
        recipe = with_overrides(recipe, _overrides(args))
    handle = load_model(args.model, dtype=args.dtype)
    if args.action == "compute":
        return _compute(handle, recipe, Path(args.out))
    from steer.directions.optimize import optimize

    front = optimize(
        handle,
        recipe,
        Path(args.out),
        trials=args.trials,
        storage=Path(args.storage) if args.storage else None,
        seed=args.seed,
        progress=_printer(),
    )
    for trial in front:
        print(json.dumps(trial, sort_keys=True))
    return 0


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "search.method": args.method,
        "search.shrinkage": args.shrinkage,
        "search.layers": args.layers,
        "search.positions": args.positions,
        "search.top_k": args.top_k,
        "search.kl_threshold": args.kl_threshold,
        "data.seed": args.seed,
        "data.max_train": args.max_train,
        "data.max_validation": args.max_validation,
        "data.positive": args.positive,
        "data.negative": args.negative,
        "data.filter": False if args.no_filter else None,
    }


def _printer():  # type: ignore[no-untyped-def]
    from tqdm.auto import tqdm

    bar = tqdm(total=1000, unit="‰", bar_format="{l_bar}{bar}| {elapsed}<{remaining} {desc}")

    def progress(message: str, fraction: float) -> None:
        bar.n = int(1000 * min(max(fraction, 0.0), 1.0))
        bar.set_description_str(message[:60])
        bar.refresh()

    return progress


def _compute(handle: Any, recipe: Any, out: Path) -> int:
    from steer.directions.api import compute

    path = compute(handle, recipe, out, progress=_printer(), cancelled=threading.Event())
    print()
    return _show(path, as_json=False)


def _show(directory: Path, *, as_json: bool) -> int:
    from steer.artifacts import load_vector

    artifact = load_vector(directory)
    metadata = dict(artifact.metadata)
    if as_json:
        print(json.dumps(metadata, indent=2, sort_keys=True))
        return 0
    model = metadata.get("model") or {}
    print(f"{directory}: {metadata.get('kind')} {artifact.vector!r}")
    print(f"  model    {model.get('name')} ({str(model.get('weight_hash', ''))[:12]})")
    print(
        f"  method   {metadata.get('method')}  layer {metadata.get('layer')}  "
        f"positions {metadata.get('positions')}"
    )
    print(f"  hooks    {', '.join(metadata.get('hooks') or [])[:120]}")
    for key, value in (metadata.get("metrics") or {}).items():
        print(f"  {key:<26} {value}")
    for note in metadata.get("notes") or []:
        print(f"  note: {note}")
    return 0
