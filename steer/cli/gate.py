"""``steer directions gate``: write a gated ablation recipe for a direction artifact.

The gate is calibrated on the recipe's train split and reported on validation
(steer.directions.gating)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from steer.errors import InvalidArgumentError

if TYPE_CHECKING:
    from steer.directions.pipeline import TrainReads


def add_parser(commands: Any, default_recipe: str) -> None:
    gate = commands.add_parser(
        "gate",
        help="write a gated ablation recipe: the direction ablated only for prompts a "
        "calibrated gate fires on",
    )
    add = gate.add_argument
    add("directory", metavar="ARTIFACT", help="the direction artifact to ablate")
    add("--recipe", default=default_recipe, help="the direction recipe whose prompts calibrate")
    add(
        "--model",
        help="model name or path (default: the artifact's; with --compute, steer directions "
        "compute's)",
    )
    add(
        "--compute",
        action="store_true",
        help="first compute the direction from --recipe on --model into ARTIFACT (as steer "
        "directions compute does), in this process: the model loads once and the gate's train "
        "prompts are not read again",
    )
    add("--out", required=True, help="directory for gated.toml (and the condition vector)")
    add(
        "--hooks",
        type=_names,
        help="candidate gate hooks, comma-separated (default: blocks.L.hook_resid_pre at a "
        "quarter, half and three quarters of the layers and the direction's layer)",
    )
    add(
        "--condition",
        type=_names,
        default=("direction",),
        help="what the gate reads: the direction itself, CAST's contrast vector, or Fisher's "
        "discriminant; several, comma-separated, are candidates alike (--choose keeps one)",
    )
    _choice_options(gate)
    _feature_options(gate)
    add("--target-fpr", type=float, default=0.02, help="false-positive rate allowed")
    _reply_options(gate)
    add(
        "--summed",
        action="store_true",
        help="also a gate reading all the hooks at once: the sum of their projections, each "
        "scaled by its spread over the quiet train prompts (kept if it separates validation "
        "best)",
    )
    _edit_options(gate)
    add("--batch-size", type=int, default=16)
    add("--dtype", default="float32", help="float32, bfloat16 or float16")


def _edit_options(gate: argparse.ArgumentParser) -> None:
    """What the written recipe does behind the gate."""
    add = gate.add_argument
    add("--weight", type=float, default=1.0, help="ablation weight")
    add(
        "--push",
        type=float,
        default=0.0,
        help="also subtract the direction at its own hook at this strength, behind the same "
        "gate (activation addition against the behaviour; 0 = ablation only)",
    )
    add(
        "--also",
        action="append",
        default=[],
        metavar="ARTIFACT",
        help="another direction ablated at the same weight behind the same gate (repeatable; "
        "the gate reads the first direction's condition)",
    )


def _choice_options(gate: argparse.ArgumentParser) -> None:
    """How the candidates' thresholds are set and one of them is kept."""
    gate.add_argument(
        "--choose",
        default="validation",
        help="keep the candidate that separates validation best, or (new-source) the one that "
        "separates each source of prompts best when fitted without it (the recipe's extras, or "
        "its gate_fire / gate_quiet files taken pairwise)",
    )
    gate.add_argument(
        "--calibrate",
        type=_names,
        default=("train",),
        help="set each threshold so the gate's false-positive rate on the train prompts is at "
        "most the target; (new-source) raise it further until so is the rate on each source "
        "of prompts when fitted without it, pooled; or (each-set) so that it is on the ordinary "
        "requests and on the situations without a trigger apart. Several, comma-separated: the "
        "prompts are read once and each calibration writes its recipe to OUT/<calibration>/",
    )


def _feature_options(gate: argparse.ArgumentParser) -> None:
    """A gate on an SAE feature instead of a direction's projection."""
    gate.add_argument(
        "--sae",
        metavar="DIR",
        help="gate on one feature of this SAE (SAELens directory; read at its own hook) instead "
        "of a projection: the candidates are --features, or the --top-features that separate "
        "the train prompts best in their worst prompt form; validation keeps one the same way",
    )
    gate.add_argument(
        "--features",
        type=_indices,
        default=(),
        help="with --sae: the candidate features, comma-separated (default: ranked on train)",
    )
    gate.add_argument(
        "--top-features",
        type=int,
        default=20,
        metavar="K",
        help="with --sae and no --features: how many of the best train separators are candidates",
    )


def _indices(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in _names(text))
    except ValueError:
        raise argparse.ArgumentTypeError("expected feature indices, e.g. 12,345") from None


def _reply_options(gate: argparse.ArgumentParser) -> None:
    """The options of a reply-scope gate (what it reads after the prompt)."""
    gate.add_argument(
        "--reply-tokens",
        type=int,
        default=0,
        metavar="K",
        help="a reply-scope gate: read the model's first K reply tokens, drawn without the edit, "
        "and start the reply over with the edit on where it fires (0 = a prompt-scope gate, "
        "reading the prompt's last token)",
    )
    gate.add_argument(
        "--reply-aggregate",
        default="any",
        help="how a reply-scope gate combines its K positions: fire if any position's "
        "projection passes the threshold, or if their mean does (any, mean)",
    )


def _names(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    if not names:
        raise argparse.ArgumentTypeError("expected at least one name")
    return names


def run(args: argparse.Namespace, model_of: Any) -> int:
    """Read the gate prompts once; for each calibration, choose, write the recipe and print the
    choice as a JSON line."""
    from steer.artifacts import load_vector
    from steer.directions.gate_recipe import gated_ablation_recipe
    from steer.directions.gating import choose_from, gate_reads
    from steer.directions.recipe import load_direction_recipe
    from steer.models import load_model

    _check_options(args)
    directory, out = Path(args.directory), Path(args.out)
    recipe = load_direction_recipe(args.recipe)
    if recipe.is_steering:
        raise InvalidArgumentError(
            "a gate is calibrated on a contrast or pairs recipe's prompts", field="recipe"
        )
    model = _model_name(args, directory, model_of)
    also = [Path(path) for path in args.also]
    for path in also:
        load_vector(path)  # readable before the model loads
    _preflight(args, recipe, model, directory)
    print(f"loading {model}", file=sys.stderr, flush=True)
    handle = load_model(model, dtype=args.dtype)
    known = _computed(handle, recipe, directory) if args.compute else None
    artifact = load_vector(directory, handle=handle)
    for path in also:
        load_vector(path, handle=handle)  # made for this model, or a clear error
    if args.sae:
        return _feature_gate(args, handle, recipe, known, [directory, *also], out)
    hooks = args.hooks or _default_hooks(handle.num_layers, artifact.metadata.get("layer"))
    print(f"reading the gate prompts at {', '.join(hooks)}", file=sys.stderr, flush=True)
    reads, labels = gate_reads(
        handle, recipe, hooks, batch_size=args.batch_size, reply_tokens=args.reply_tokens,
        aggregate=args.reply_aggregate, known=known,
    )  # fmt: skip
    for calibrate in args.calibrate:
        choice = choose_from(
            reads, labels, artifact.vector, conditions=args.condition,
            target_fpr=args.target_fpr, summed=args.summed, choose=args.choose,
            calibrate=calibrate,
        )  # fmt: skip
        condition = directory if choice.condition == "direction" else choice.vector
        path = gated_ablation_recipe(
            out / calibrate if len(args.calibrate) > 1 else out,
            [directory, *also],
            condition,
            choice.calibration,
            weight=args.weight,
            push=args.push,
            handle=handle,
            new_source=choice.new_source,
            each_set=choice.calibrate == "each-set",
        )
        print(json.dumps({"recipe": str(path), **choice.as_dict()}, sort_keys=True), flush=True)
    return 0


def _feature_gate(
    args: argparse.Namespace,
    handle: Any,
    recipe: Any,
    known: Any,
    directions: list[Path],
    out: Path,
) -> int:
    """``--sae``: the gate prompts read at the SAE's hook; the kept feature's recipe written
    and the choice printed as a JSON line."""
    from steer.directions.gate_recipe import SaeFeature, gated_ablation_recipe
    from steer.directions.gating import gate_reads
    from steer.sae.conditions import choose_feature_gate
    from steer.sae.loading import load_sae

    sae = load_sae(args.sae, handle, where=args.sae)
    for index, feature in enumerate(args.features):
        sae.check_feature(feature, f"features[{index}]")
    print(f"reading the gate prompts at {sae.hook_name}", file=sys.stderr, flush=True)
    reads, _labels = gate_reads(
        handle, recipe, [sae.hook_name], batch_size=args.batch_size,
        reply_tokens=args.reply_tokens, aggregate=args.reply_aggregate, known=known,
    )  # fmt: skip
    choice = choose_feature_gate(
        reads, sae, target_fpr=args.target_fpr, features=args.features, k=args.top_features
    )
    path = gated_ablation_recipe(
        out,
        directions,
        SaeFeature(Path(args.sae), choice.feature),
        choice.calibration,
        weight=args.weight,
        push=args.push,
    )
    print(json.dumps({"recipe": str(path), **choice.as_dict()}, sort_keys=True), flush=True)
    return 0


def _model_name(args: argparse.Namespace, directory: Path, model_of: Any) -> str:
    """The model to load: --model, else the artifact's; with --compute, --model or
    ``steer directions compute``'s default."""
    if args.compute:
        from steer.cli.directions import COMPUTE_MODEL

        return str(args.model or COMPUTE_MODEL)
    from steer.artifacts import load_vector

    return str(args.model or model_of(load_vector(directory).metadata))


def _preflight(args: argparse.Namespace, recipe: Any, model: str, directory: Path) -> None:
    """Everything checked before the model loads: the choices, the data, the model's source,
    the output; with --compute, what ``steer directions compute`` checks, ARTIFACT its output."""
    from steer.directions.gating import check_choice
    from steer.directions.preflight import check_data, check_model_source, check_recipe

    for calibrate in args.calibrate:
        check_choice(args.choose, args.condition, recipe, calibrate)
    if args.compute:
        check_recipe(recipe, model=model, out=directory)  # data and model source too
    else:
        check_data(recipe)
        check_model_source(model)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InvalidArgumentError(f"output {out} is a file, not a directory", field="out")


def _computed(handle: Any, recipe: Any, directory: Path) -> TrainReads:
    """Compute ``recipe``'s direction into ``directory`` with a progress bar; the train
    prompts' reads the search made (:data:`steer.activations.KnownReads`)."""
    import contextlib
    import threading

    from steer.cli.directions import printer, show_artifact
    from steer.directions.api import compute

    known: TrainReads = {}
    progress = printer()
    compute(handle, recipe, directory, progress=progress, cancelled=threading.Event(), reads=known)
    progress.close()
    with contextlib.redirect_stdout(sys.stderr):  # stdout keeps the gate's JSON lines alone
        show_artifact(directory, as_json=False)
    return known


def _check_options(args: argparse.Namespace) -> None:
    """The options that need no file or model, checked first."""
    from steer.directions.gate_recipe import check_push
    from steer.gates import MAX_REPLY_TOKENS, check_reply_aggregate

    check_push(args.push)
    if args.sae:
        _check_feature_options(args)
    elif args.features:
        raise InvalidArgumentError("--features needs --sae", field="features")
    if len(set(args.calibrate)) < len(args.calibrate):
        raise InvalidArgumentError("names a calibration twice", field="calibrate")
    check_reply_aggregate(args.reply_aggregate)
    if args.reply_aggregate != "any" and not args.reply_tokens:
        raise InvalidArgumentError(
            "only a reply-scope gate (--reply-tokens K) combines reply tokens",
            field="reply_aggregate",
        )
    if not 0 <= args.reply_tokens <= MAX_REPLY_TOKENS:
        raise InvalidArgumentError(
            f"must be from 0 to {MAX_REPLY_TOKENS}, got {args.reply_tokens}", field="reply_tokens"
        )


def _check_feature_options(args: argparse.Namespace) -> None:
    """--sae reads one feature at the SAE's hook, calibrated on train, kept on validation."""
    if args.hooks:
        raise InvalidArgumentError("--sae reads at the SAE's own hook", field="hooks")
    for name, value, default in (
        ("condition", args.condition, ("direction",)),
        ("summed", args.summed, False),
        ("choose", args.choose, "validation"),
        ("calibrate", args.calibrate, ("train",)),
    ):
        if value != default:
            raise InvalidArgumentError(
                f"--{name} does not apply to a feature gate (--sae)", field=name
            )
    if args.top_features < 1:
        raise InvalidArgumentError("must be at least 1", field="top_features")
    if not Path(args.sae).is_dir():
        raise InvalidArgumentError(f"{args.sae} is not an SAE directory", field="sae")


def _default_hooks(num_layers: int, layer: Any) -> list[str]:
    layers = {num_layers // 4, num_layers // 2, (3 * num_layers) // 4}
    if isinstance(layer, int) and 0 <= layer < num_layers:
        layers.add(layer)
    return [f"blocks.{n}.hook_resid_pre" for n in sorted(layers)]
