"""``steer directions compute|sweep|optimize|gate|show|refresh``: make, measure, tune, gate,
inspect and re-hash artifacts."""

from __future__ import annotations

import argparse
import json
import sys
import threading
from pathlib import Path
from typing import Any

from steer.cli import gate
from steer.errors import InvalidArgumentError, NotFoundError

#: the model ``compute``, ``optimize`` and ``gate --compute`` load when no --model is given
COMPUTE_MODEL = "smollm2-135m-instruct"


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


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise InvalidArgumentError(
            f"expected e.g. -0.3,0,0.3, got {text!r}", field="strengths"
        ) from None


def _words(text: str) -> tuple[str, ...]:
    return tuple(w.strip() for w in text.split(",") if w.strip())


def _method(text: str) -> str:
    """``mean`` is short for ``mean_difference``."""
    return "mean_difference" if text == "mean" else text


#: compute flags -> the recipe field each sets
_FIELDS = {
    "method": "search.method",
    "shrinkage": "search.shrinkage",
    "layers": "search.layers",
    "positions": "search.positions",
    "top_k": "search.top_k",
    "kl_threshold": "search.kl_threshold",
    "seed": "data.seed",
    "max_train": "data.max_train",
    "max_validation": "data.max_validation",
    "positive": "data.positive",
    "negative": "data.negative",
    "pairs": "data.pairs",
    "system": "data.system",
    "read": "data.read",
    "reply_tokens": "data.reply_tokens",
    "neutral": "sweep.neutral",
    "strengths": "sweep.strengths",
    "kl_bound": "sweep.kl_bound",
    "positive_words": "sweep.positive_words",
    "negative_words": "sweep.negative_words",
}


def _compute_parser(commands: Any) -> None:
    compute = commands.add_parser(
        "compute",
        help="make a steering vector from two prompt files, or a direction from a recipe",
        description="With --positive and --negative (or --pairs) and no --recipe: a steering "
        "vector (a 'this vs that' slider) at one layer or a few, strength in typical residual "
        "norms, with a strength sweep (docs/directions.md, 'Steering vectors'). With --recipe: "
        "that recipe, flags overriding its fields.",
    )
    add = compute.add_argument
    add("--model", default=COMPUTE_MODEL, help="model name or path")
    add("--recipe", help="recipe TOML (default: none, a steering vector from the prompt files)")
    add("--out", required=True, help="artifact directory to write")
    add("--name", help="the vector's name (default: POSITIVE-vs-NEGATIVE from the file names)")
    add("--positive", help="positive prompts (.txt one a line, .jsonl, .csv), from the cwd")
    add("--negative", help="negative prompts, the other end of the slider")
    add("--pairs", help="instead of two files: .jsonl with prompt, positive, negative replies")
    add("--method", type=_method, help="mean (mean difference) or pca; recipes: any method")
    add("--layers", type=_layers, help="layers to read and add at (12, 10-14 or 12,16)")
    add("--read", choices=("reply", "prompt"), help="read the model's replies or the prompts")
    add("--reply-tokens", type=int, help="reply tokens generated and read per prompt (32)")
    add(
        "--positions",
        type=_positions,
        nargs="+",
        help="prompt offsets read with --read prompt (-1 -2, or --positions=-1,-2)",
    )
    add("--system", help="system prompt used when encoding every prompt")
    add("--max-train", type=int, help="use at most this many prompts per file (0 = all)")
    add("--neutral", help="neutral prompts for the norm and the sweep (recipes:neutral.txt)")
    add(
        "--strengths",
        type=_floats,
        nargs="+",
        help="sweep these strengths (-0.4 -0.2 0 0.2 0.4, or --strengths=-0.4,0,0.4)",
    )
    add("--kl-bound", type=float, help="coherent = first-token KL at most this (0.5)")
    add("--positive-words", type=_words, help="sweep effect: words of the positive side")
    add("--negative-words", type=_words, help="sweep effect: words of the negative side")
    add("--no-sweep", action="store_true", help="skip the strength sweep")
    add("--shrinkage", type=float, help="recipes: override search.shrinkage (whitened)")
    add("--top-k", type=int, help="recipes: override search.top_k")
    add("--kl-threshold", type=float, help="recipes: override search.kl_threshold")
    add("--seed", type=int, help="recipes: override data.seed (the split)")
    add("--max-validation", type=int, help="recipes: override data.max_validation")
    add("--no-filter", action="store_true", help="refusal recipes: set data.filter = false")
    add("--dtype", default="float32", help="float32, bfloat16 or float16")


def _sweep_parser(commands: Any) -> None:
    sweep = commands.add_parser(
        "sweep",
        help="measure a vector's effect and KL at several strengths; record the coherent range",
        description="Adds the artifact at each strength on neutral prompts and reports the "
        "effect (target-word log-odds) against coherence (first-token KL, perplexity); writes "
        "sweep.csv and sweep.png into the artifact and its suggested range into steer.json.",
    )
    add = sweep.add_argument
    add("directory", metavar="ARTIFACT", help="a vector artifact directory")
    add("--model", help="model name or path (default: the one the artifact was made for)")
    add(
        "--strengths",
        type=_floats,
        nargs="+",
        help="strengths to measure (-0.4 -0.2 0 0.2 0.4; default -1 to 1 in 13 steps)",
    )
    add("--kl-bound", type=float, default=0.5, help="coherent = first-token KL at most this")
    add("--neutral", default="recipes:neutral.txt", help="neutral prompts file, from the cwd")
    add("--tokens", type=int, default=16, help="unsteered reply tokens read per prompt")
    add("--positive-words", type=_words, help="words of the positive side (default: recorded)")
    add("--negative-words", type=_words, help="words of the negative side")
    add("--system", help="system prompt used when encoding the neutral prompts")
    add("--dtype", default="float32", help="float32, bfloat16 or float16")


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    commands = parser.add_subparsers(dest="action", required=True)
    _compute_parser(commands)
    _sweep_parser(commands)

    optimize = commands.add_parser("optimize", help="heretic-style per-layer kernel search")
    optimize.add_argument("--model", default=COMPUTE_MODEL, help="model name or path")
    optimize.add_argument("--recipe", default=_default_recipe("refusal"), help="recipe TOML")
    optimize.add_argument("--out", required=True, help="directory for the Pareto front")
    optimize.add_argument("--trials", type=int, default=50, help="trial budget (this run)")
    optimize.add_argument("--storage", help="sqlite file to resume from (default OUT/study.db)")
    optimize.add_argument("--seed", type=int, default=0, help="sampler seed")
    optimize.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")

    refresh = commands.add_parser(
        "refresh",
        help="check artifacts' weight hashes in the format they were made in and record the "
        "current format (after a steer upgrade changed it)",
    )
    refresh.add_argument("directories", nargs="+", metavar="ARTIFACT", help="artifact dirs")
    refresh.add_argument("--model", required=True, help="the model the artifacts were made for")
    refresh.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")

    gate.add_parser(commands, _default_recipe("refusal"))

    show = commands.add_parser("show", help="print an artifact's sidecar summary")
    show.add_argument("directory", help="an artifact directory")
    show.add_argument("--json", action="store_true", help="print the full sidecar as JSON")
    return parser


def _flatten(groups: list[tuple[Any, ...]] | None) -> tuple[Any, ...] | None:
    """``--strengths -0.2 0.2`` and ``--strengths=-0.2,0.2`` alike (nargs of comma lists)."""
    return None if groups is None else tuple(value for group in groups for value in group)


def main(argv: list[str], *, prog: str = "steer directions", command: str = "directions") -> int:
    args = _parser(prog).parse_args(argv)
    for name in ("positions", "strengths"):
        if hasattr(args, name):
            setattr(args, name, _flatten(getattr(args, name)))
    if args.action == "show":
        return show_artifact(Path(args.directory), as_json=args.json)
    if args.action == "compute":
        return _compute(args)
    if args.action == "sweep":
        return _sweep(args)
    if args.action == "gate":
        return gate.run(args, artifact_model)
    from steer.directions.recipe import load_direction_recipe
    from steer.models import load_model

    if args.action == "refresh":
        from steer.artifacts import refresh_model_record

        handle = load_model(args.model, dtype=args.dtype)
        for directory in args.directories:
            print(refresh_model_record(directory, handle))
        return 0
    from steer.directions.preflight import check_recipe

    recipe = load_direction_recipe(args.recipe)
    if recipe.is_steering:
        raise InvalidArgumentError(
            "optimize searches ablation kernels for refusal, pairs and contrast recipes; a "
            "steering recipe has nothing to search (steer directions compute makes it)",
            field="recipe",
        )
    check_recipe(recipe, model=args.model, out=args.out)
    handle = load_model(args.model, dtype=args.dtype)
    from steer.directions.optimize import optimize

    front = optimize(
        handle,
        recipe,
        Path(args.out),
        trials=args.trials,
        storage=Path(args.storage) if args.storage else None,
        seed=args.seed,
        progress=printer(),
    )
    for trial in front:
        print(json.dumps(trial, sort_keys=True))
    return 0


def compute_recipe(args: argparse.Namespace) -> Any:
    """The recipe ``steer directions compute`` runs: ``--recipe`` with the flags over it, or
    with no recipe a steering recipe from the prompt files. Flags the recipe's kind would not
    read are errors; data paths given as flags are taken from the current directory."""
    from steer.directions.recipe import applies, load_direction_recipe, with_overrides

    overrides = {field: getattr(args, flag) for flag, field in _FIELDS.items()}
    overrides["data.filter"] = False if args.no_filter else None
    overrides["sweep.enabled"] = False if args.no_sweep else None
    for key in ("data.positive", "data.negative", "data.pairs", "sweep.neutral"):
        overrides[key] = _cli_path(overrides[key], key)
    if args.recipe:
        recipe = load_direction_recipe(args.recipe)
    elif args.positive or args.negative or args.pairs:
        data = {
            key.removeprefix("data."): overrides.pop(key)
            for key in ("data.positive", "data.negative", "data.pairs")
            if overrides[key]
        }
        recipe = load_direction_recipe(
            {"name": args.name or _name(args), "kind": "steering", "data": data}
        )
    else:
        raise InvalidArgumentError(
            "give --positive and --negative (two prompt files) or --pairs for a steering "
            "vector, or a --recipe (e.g. recipes/refusal.toml)",
            field="positive",
        )
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        if value is not None and not applies(recipe.kind, section, name):
            flag = _flag(key)
            raise InvalidArgumentError(
                f"{flag} does not apply to a {recipe.kind.value} recipe ({key}); leave it out",
                field=flag.removeprefix("--"),
            )
    if args.name and args.recipe:
        from dataclasses import replace

        recipe = replace(recipe, name=args.name)
    recipe = with_overrides(recipe, overrides)
    _check_combinations(args, recipe)
    return recipe


def _check_combinations(args: argparse.Namespace, recipe: Any) -> None:
    """Flags that the rest of the command line would leave unread."""
    if not recipe.is_steering:
        return
    if args.reply_tokens is not None and recipe.data.read == "prompt":
        raise InvalidArgumentError(
            "--reply-tokens sets how much of each reply is read; with --read prompt no reply "
            "is read",
            field="reply-tokens",
        )
    if not recipe.sweep.enabled:
        for flag in ("strengths", "kl_bound"):
            if getattr(args, flag) is not None:
                raise InvalidArgumentError(
                    f"--{flag.replace('_', '-')} sets the sweep, which --no-sweep turns off",
                    field=flag.replace("_", "-"),
                )


def _name(args: argparse.Namespace) -> str:
    if args.pairs:
        return Path(args.pairs).stem
    stems = [Path(p).stem.removeprefix("recipes:") for p in (args.positive, args.negative) if p]
    return "-vs-".join(stems) or "vector"


def _flag(key: str) -> str:
    special = {"data.filter": "--no-filter", "sweep.enabled": "--no-sweep"}
    if key in special:
        return special[key]
    flag = next(f for f, k in _FIELDS.items() if k == key)
    return "--" + flag.replace("_", "-")


def _cli_path(value: str | None, key: str) -> str | None:
    """A data path from the command line, made absolute from the current directory (a recipe's
    own relative paths are taken from its directory); built-in names stay as they are."""
    if value is None or value == "strongreject" or value.startswith("recipes:"):
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        from steer.directions.data import relative_to

        where = relative_to(value)
        raise NotFoundError(
            f"{_flag(key)} {value}: no such file" + (f" ({where})" if where else ""),
            field=_flag(key).removeprefix("--"),
        )
    return str(path.absolute())


class _Printer:
    """A progress bar for ``progress(message, fraction)`` callbacks: the bar, then the
    current step (written once, after the bar)."""

    def __init__(self) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=1000, bar_format="{percentage:3.0f}%|{bar}| {elapsed}<{remaining} {desc}"
        )

    def __call__(self, message: str, fraction: float) -> None:
        self.bar.n = int(1000 * min(max(fraction, 0.0), 1.0))
        self.bar.set_description_str(message[:60], refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def printer() -> _Printer:
    return _Printer()


def _compute(args: argparse.Namespace) -> int:
    """Check everything that needs no model, then load it and compute."""
    from steer.directions.api import compute
    from steer.directions.preflight import check_recipe
    from steer.models import load_model

    recipe = compute_recipe(args)
    check_recipe(recipe, model=args.model, out=args.out)
    print(f"loading {args.model}", file=sys.stderr, flush=True)
    handle = load_model(args.model, dtype=args.dtype)
    progress = printer()
    path = compute(handle, recipe, Path(args.out), progress=progress, cancelled=threading.Event())
    progress.close()
    return show_artifact(path, as_json=False)


def _sweep(args: argparse.Namespace) -> int:
    from steer.artifacts import load_vector
    from steer.directions.data import load_prompts
    from steer.directions.preflight import check_model_source
    from steer.directions.sweep import DEFAULT_STRENGTHS, SweepOptions, sweep_artifact, table
    from steer.models import load_model

    directory = Path(args.directory)
    metadata = load_vector(directory).metadata
    model = args.model or artifact_model(metadata)
    neutral = load_prompts(_cli_path(args.neutral, "sweep.neutral") or "", field="neutral")
    if bool(args.positive_words) != bool(args.negative_words):
        raise InvalidArgumentError(
            "give --positive-words and --negative-words together", field="positive-words"
        )
    options = SweepOptions(
        strengths=args.strengths or DEFAULT_STRENGTHS, kl_bound=args.kl_bound, tokens=args.tokens
    )
    check_model_source(model)
    print(f"loading {model}", file=sys.stderr, flush=True)
    handle = load_model(model, dtype=args.dtype)
    words = (args.positive_words, args.negative_words) if args.positive_words else None
    progress = printer()
    result = sweep_artifact(
        handle, directory, neutral, options, words=words, system=args.system, progress=progress
    )
    progress.close()
    print(table(result))
    for note in result.notes:
        print(f"note: {note}")
    print(f"wrote {directory / 'sweep.csv'}, {directory / 'sweep.png'}; range in steer.json")
    return 0


def artifact_model(metadata: Any) -> str:
    """The model an artifact names, when it can be loaded by that name; else the default."""
    from steer.offline import DEFAULT_MODEL, OFFLINE_MODELS

    name = str((metadata.get("model") or {}).get("name") or "")
    if name in OFFLINE_MODELS or (name and Path(name).exists()):
        return name
    return DEFAULT_MODEL


def show_artifact(directory: Path, *, as_json: bool) -> int:
    from steer.artifacts import load_vector

    artifact = load_vector(directory)
    metadata = dict(artifact.metadata)
    if as_json:
        print(json.dumps(metadata, indent=2, sort_keys=True))
        return 0
    model = metadata.get("model") or {}
    print(f"{directory}: {metadata.get('kind')} {artifact.vector!r}")
    print(f"  model    {model.get('name')} ({str(model.get('weight_hash', ''))[:12]})")
    layers = metadata.get("layers")
    where = f"layers {layers}" if layers and len(layers) > 1 else f"layer {metadata.get('layer')}"
    print(f"  method   {metadata.get('method')}  {where}  positions {metadata.get('positions')}")
    print(f"  hooks    {', '.join(metadata.get('hooks') or [])[:120]}")
    for key, value in (metadata.get("metrics") or {}).items():
        print(f"  {key:<26} {value}")
    _show_steering(metadata)
    for note in metadata.get("notes") or []:
        print(f"  note: {note}")
    return 0


def _show_steering(metadata: dict[str, Any]) -> None:
    """The units, suggested range and sweep of a steering vector."""
    normalization = metadata.get("normalization") or {}
    if normalization:
        raw = normalization.get("raw_relative") or {}
        print(
            f"  strength {normalization.get('unit')}s (1 = one typical residual norm in all); "
            f"raw vector length {', '.join(f'L{k}: {v:.3g}' for k, v in raw.items())}"
        )
    suggested = metadata.get("suggested_strengths")
    sweep = metadata.get("sweep") or {}
    if suggested:
        print(
            f"  suggested strengths {suggested[0]:g} to {suggested[1]:g} "
            f"({sweep.get('coherent', '')})"
        )
    words = sweep.get("words") or metadata.get("target_words") or {}
    if words.get("positive"):
        print(f"  words    + {', '.join(words['positive'])} / - {', '.join(words['negative'])}")
    rows = sweep.get("rows") or []
    if rows:
        print("  strength     effect   KL first   perplexity")
        for row in rows:
            effect = row.get("effect")
            print(
                f"  {row['strength']:>8g} {'' if effect is None else f'{effect:+.3f}':>10} "
                f"{row['kl_first_token']:>10.3f} {row['perplexity']:>12.3g}"
            )
