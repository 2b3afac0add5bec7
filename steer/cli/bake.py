"""``steer bake``: write edits into new weights, a LoRA adapter or a control vector.

steer bake --model M (--recipe R | --ablate DIR ... | --add DIR:STRENGTH ...) --out OUT
           [--format model|lora|control-vector] [--dtype float32|bfloat16|float16]
           [--variant standard|projected|norm_preserving] [--overwrite] [--allow-pickle]
           [--ungated]
steer bake --verify OUT
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from tqdm.auto import tqdm

from steer.artifacts import load_vector
from steer.bake.api import OUTPUT_FORMATS, bake_with_options, recipe_from_flags
from steer.bake.control_vector import verify_control_vector
from steer.bake.options import BakeOptions
from steer.bake.provenance import PROVENANCE, verify
from steer.errors import NotFoundError
from steer.models import DTYPES
from steer.offline import DEFAULT_MODEL
from steer.recipes import AblationVariant, EditRecipe, load_edit_recipe


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="offline name, HF dir or .gguf")
    edits = parser.add_argument_group("edits (a recipe, or flags)")
    edits.add_argument("--recipe", help="TOML edit recipe (see recipes/bake-*.toml)")
    edits.add_argument("--ablate", action="append", default=[], metavar="DIR", help="direction")
    edits.add_argument(
        "--add", action="append", default=[], metavar="DIR:STRENGTH", help="vector and strength"
    )
    edits.add_argument(
        "--variant",
        choices=[v.value for v in AblationVariant],
        default="standard",
        help="ablation variant for --ablate",
    )
    parser.add_argument("--out", help="output directory (or .gguf file for control-vector)")
    parser.add_argument("--format", choices=OUTPUT_FORMATS, default="model")
    parser.add_argument("--dtype", choices=list(DTYPES), help="output dtype (default: source)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument("--allow-pickle", action="store_true", help="read pickled .bin weights")
    parser.add_argument(
        "--allow-other-model",
        action="store_true",
        help="use directions whose sidecar names other weights",
    )
    parser.add_argument(
        "--ungated",
        action="store_true",
        help="bake gated edits without their gates (weights cannot hold a gate; noted in the "
        "provenance)",
    )
    parser.add_argument(
        "--verify",
        metavar="OUT",
        help="re-hash a baked output (directory, or control-vector .gguf) and exit",
    )
    return parser


def _edit_paths(recipe: EditRecipe) -> Iterator[tuple[str, str]]:
    """(field, path as written) for every file an edit names."""
    for index, edit in enumerate(recipe.edits):
        for key in ("direction", "harmless_mean", "vector", "sae"):
            value = getattr(edit, key, None)
            if value:
                yield f"edits[{index}].{key}", value
        if edit.gate is not None:
            yield f"edits[{index}].gate.direction", edit.gate.direction


def _shown(path: Path) -> str:
    """``path`` relative to the current directory when it lies below it, else absolute."""
    relative = os.path.relpath(os.path.abspath(path))
    return os.path.abspath(path) if relative.startswith("..") else relative


def check_recipe_files(recipe: EditRecipe, origin: str) -> None:
    """Every artifact and SAE a recipe names exists (and an artifact loads) before the model is
    loaded, which takes a while; a missing one is named as written, where it was looked for and
    what relative paths are taken from (``origin``)."""
    for field, value in _edit_paths(recipe):
        path = recipe.resolve(value)
        shown = _shown(path)
        if not path.exists():
            raise NotFoundError(
                f"{value!r} is {shown}, which does not exist (paths in {origin} are relative to "
                f"{_shown(recipe.base_dir)}); make it first, e.g. with "
                "steer directions compute --out DIR",
                field=field,
            )
        if field.endswith(("direction", "vector", "harmless_mean")):  # incl. gate.direction
            load_vector(path, where=shown)


def _verify(target: Path) -> int:
    """Re-hash a baked output: a model or LoRA directory against its steer_provenance.json, a
    control-vector GGUF against the tensor digests its provenance carries."""
    problems = verify_control_vector(target) if target.is_file() else verify(target)
    for problem in problems:
        print(f"{target}: {problem}", file=sys.stderr)
    if not problems:
        print(f"{target}: ok")
    return 1 if problems else 0


def main(argv: list[str], *, prog: str = "steer bake", command: str = "bake") -> int:
    parser = _parser(prog)
    args = parser.parse_args(argv)
    if args.verify:
        return _verify(Path(args.verify))
    if not args.out:
        parser.error("--out is required")
    if args.recipe and (args.ablate or args.add):
        parser.error("give --recipe or --ablate/--add, not both")
    if not args.recipe and not (args.ablate or args.add):
        parser.error("give --recipe, --ablate or --add")
    recipe = load_edit_recipe(
        args.recipe or recipe_from_flags(args.ablate, args.add, variant=args.variant)
    )
    check_recipe_files(recipe, args.recipe or "--ablate/--add")
    bar = tqdm(total=100, desc="bake", unit="%", disable=not sys.stderr.isatty())
    last = [""]

    def progress(stage: str, fraction: float) -> None:
        if stage != last[0]:
            bar.set_description(stage)
            last[0] = stage
        bar.n = round(100 * fraction)
        bar.refresh()

    options = BakeOptions(
        output_format=args.format,
        overwrite=args.overwrite,
        dtype=args.dtype,
        allow_pickle=args.allow_pickle,
        allow_other_model=args.allow_other_model,
        ungated=args.ungated,
        progress=progress,
    )
    try:
        out = bake_with_options(args.model, recipe, Path(args.out), options)
    finally:
        bar.close()
    record = out / PROVENANCE
    if record.exists():
        # e.g. "APPROXIMATE: SAE feature edits ..." or "written as a Llama model ..."
        for note in json.loads(record.read_text()).get("notes", []):
            print(f"note: {note}", file=sys.stderr)
    print(out)
    return 0
