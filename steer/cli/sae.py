"""``steer sae train|info``: train a sparse autoencoder on a local model, or describe one.

Examples::

    steer sae train --recipe recipes/sae-smollm2.toml --out runs/sae-smollm2
    steer sae train --model smollm2-135m-instruct --hook blocks.12.hook_resid_post \\
        --tokens 400000 --d-sae 2048 --arch topk --corpus generated \\
        --prompts recipes/data/sae_corpus/prompts.txt --out runs/sae
    steer sae info runs/sae --json
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from steer.errors import InvalidArgumentError
from steer.models import load_model
from steer.sae.loading import load_sae
from steer.sae.recipe import CorpusSpec, SaeRecipe, load_sae_recipe
from steer.sae.training import ARCHITECTURES, TrainingConfig, save, train_on_texts

#: command-line option -> TrainingConfig field
_OVERRIDES = {
    "hook": "hook",
    "tokens": "tokens",
    "buffer_tokens": "buffer_tokens",
    "d_sae": "d_sae",
    "arch": "architecture",
    "k": "k",
    "sparsity_coefficient": "sparsity_coefficient",
    "lr": "learning_rate",
    "batch_size": "batch_size",
    "context_size": "context_size",
    "seed": "seed",
}


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Train or describe SAEs.")
    sub = parser.add_subparsers(dest="action", required=True)
    train = sub.add_parser("train", help="train an SAE with SAELens on a local model")
    train.add_argument("--recipe", help="TOML recipe (options below override it)")
    train.add_argument("--model", help="offline name or path (default smollm2-135m-instruct)")
    train.add_argument("--dtype")
    train.add_argument("--hook", help="e.g. blocks.12.hook_resid_post")
    train.add_argument("--tokens", type=int, help="training samples (tokens)")
    train.add_argument("--buffer-tokens", type=int, help="distinct tokens of activations")
    train.add_argument("--d-sae", type=int)
    train.add_argument("--arch", choices=sorted(ARCHITECTURES))
    train.add_argument("--k", type=int, help="active features per token (topk, batchtopk)")
    train.add_argument("--sparsity-coefficient", type=float, help="l1 / l0 coefficient")
    train.add_argument("--lr", type=float)
    train.add_argument("--batch-size", type=int)
    train.add_argument("--context-size", type=int)
    train.add_argument("--seed", type=int)
    train.add_argument(
        "--corpus",
        action="append",
        default=[],
        help="a .txt/.jsonl file, or 'generated' (the model answers --prompts); repeatable",
    )
    train.add_argument("--prompts", help="prompt file for a generated corpus")
    train.add_argument("--samples-per-prompt", type=int)
    train.add_argument("--max-new-tokens", type=int)
    train.add_argument("--out", required=True, help="directory to write the SAE to")
    train.add_argument("--json", action="store_true")
    info = sub.add_parser("info", help="describe an SAE directory")
    info.add_argument("path")
    info.add_argument("--json", action="store_true")
    return parser


def _corpus(args: argparse.Namespace, base: CorpusSpec | None) -> CorpusSpec:
    """The recipe's corpus with the command line's --corpus/--prompts/... applied."""
    changes: dict[str, Any] = {}
    if args.corpus:
        generated = "generated" in args.corpus
        prompts = Path(args.prompts) if args.prompts else (base.prompts if base else None)
        changes["generated"] = generated
        changes["prompts"] = prompts if generated else None
        changes["files"] = tuple(Path(item) for item in args.corpus if item != "generated")
    elif base is None:
        raise InvalidArgumentError("give --corpus FILE or --corpus generated", field="corpus")
    if args.samples_per_prompt is not None:
        changes["samples_per_prompt"] = args.samples_per_prompt
    if args.max_new_tokens is not None:
        changes["max_new_tokens"] = args.max_new_tokens
    if base is None:
        return CorpusSpec(**changes)
    return replace(base, **changes) if changes else base


def _recipe(args: argparse.Namespace) -> SaeRecipe:
    base = load_sae_recipe(args.recipe) if args.recipe else None
    if base is None and not args.hook:
        raise InvalidArgumentError("give --hook (or --recipe)", field="hook")
    overrides = {
        field: getattr(args, option)
        for option, field in _OVERRIDES.items()
        if getattr(args, option) is not None
    }
    if base is None:
        training = TrainingConfig(**overrides)
    else:
        training = replace(base.training, **overrides) if overrides else base.training
    return SaeRecipe(
        model=args.model or (base.model if base else "smollm2-135m-instruct"),
        dtype=args.dtype or (base.dtype if base else "float32"),
        corpus=_corpus(args, base.corpus if base else None),
        training=training,
        path=base.path if base else None,
    )


def main(argv: list[str], *, prog: str = "steer sae", command: str = "sae") -> int:
    args = _parser(prog).parse_args(argv)
    if args.action == "info":
        sae = load_sae(args.path)
        described = {
            "path": str(args.path),
            "architecture": sae.architecture,
            "hook_name": sae.hook_name,
            "d_in": sae.d_in,
            "d_sae": sae.num_features,
            "metadata": dict(sae.metadata),
        }
        if args.json:
            json.dump(described, sys.stdout, indent=2, default=str)
            print()
        else:
            for key, value in described.items():
                print(f"{key}: {value}")
        return 0
    recipe = _recipe(args)
    handle = load_model(recipe.model, dtype=recipe.dtype)
    handle.resolver.parse(recipe.training.hook, field="hook")
    texts = recipe.corpus.texts(handle, progress=True)
    run = train_on_texts(handle, texts, recipe.training, progress=True)
    record = {
        "out": str(args.out),
        "model": handle.name,
        "hook": recipe.training.hook,
        "texts": len(texts),
        "metrics": run.metrics.to_dict(),
        "timings": run.timings,
    }
    save(
        run.sae,
        args.out,
        handle=handle,
        training=recipe.training.__dict__,
        recipe=str(recipe.path) if recipe.path else None,
        metrics=run.metrics.to_dict(),
        corpus_texts=len(texts),
    )
    if args.json:
        json.dump(record, sys.stdout, indent=2, default=str)
        print()
    else:
        metrics = run.metrics
        print(
            f"saved {args.out}: L0 {metrics.l0:.1f}, explained variance "
            f"{metrics.explained_variance:.3f}, CE {metrics.ce_clean:.3f} -> "
            f"{metrics.ce_spliced:.3f} (+{metrics.ce_change:.3f})"
        )
    return 0
