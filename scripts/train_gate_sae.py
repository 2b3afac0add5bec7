"""Train an SAE on a gate recipe's train prompts, for a gate on one of its features.

    python scripts/train_gate_sae.py --recipe recipes/moralizing-gate.toml \
        --hook blocks.19.hook_resid_pre --out /tmp/sae-gate [--model qwen2.5-coder-0.5b-instruct]

The corpus is the **train** split of the recipe's gate prompts exactly as ``steer directions
gate`` reads them (:func:`steer.directions.gating.gate_prompts`: one-message chat prompts under
the recipe's system prompt, and with ``data.gate_scenes`` the same situations as RP scenes),
every position but the first; no validation or test prompt reaches the SAE. A shuffled 5% of
those prompts is held out for the SAE's own metrics (L0, explained variance, cross-entropy with
the reconstruction spliced in). Then ``steer directions gate ... --sae OUT`` chooses a feature.
Prints one JSON line (the metrics, the corpus size, the wall times, the load average).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import emit, machine

from steer.calibration import Prompt
from steer.directions.gate_scenarios import with_scenarios
from steer.directions.gating import gate_prompts, gate_splits
from steer.directions.recipe import load_direction_recipe
from steer.directions.scene_forms import SCENE_FORMS, scene_prompts
from steer.models import ModelHandle, load_model
from steer.sae.training import TrainingConfig, save, train_on_ids
from steer.text import encode_chat, encode_prompt

ROOT = Path(__file__).resolve().parent.parent


def train_prompt_ids(handle: ModelHandle, recipe_path: str) -> list[list[int]]:
    """The recipe's gate prompts of the train split, as the gate reads them (token ids)."""
    recipe = load_direction_recipe(recipe_path)
    splits = gate_splits(recipe)
    rendered = scene_prompts(handle) if recipe.data.gate_scenes else ()
    parts = {part: gate_prompts(splits, part, rendered) for part in ("train", "validation")}
    train = with_scenarios(handle, recipe, parts, SCENE_FORMS)["train"]
    system = recipe.data.system or None

    def ids(prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return encode_chat(handle, prompt, system)
        return encode_prompt(handle, prompt_ids=prompt)

    return [ids(prompt) for prompt in (*train.fire, *train.quiet)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "moralizing-gate.toml"))
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--hook", default="blocks.19.hook_resid_pre")
    parser.add_argument("--out", required=True)
    parser.add_argument("--d-sae", type=int, default=2048)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=300_000, help="training samples")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    started = time.perf_counter()
    load_average = os.getloadavg()[0]
    handle = load_model(args.model)
    prompts = train_prompt_ids(handle, args.recipe)
    config = TrainingConfig(
        hook=args.hook,
        tokens=args.tokens,
        buffer_tokens=10_000_000,  # every position of every train prompt
        d_sae=args.d_sae,
        architecture="topk",
        k=args.k,
        learning_rate=1e-3,
        batch_size=512,
        context_size=1024,
        eval_fraction=0.05,
        seed=args.seed,
    )
    run = train_on_ids(handle, prompts, config, progress=True)
    metrics = run.metrics.to_dict()
    save(
        run.sae,
        args.out,
        handle=handle,
        training=config.__dict__,
        corpus=f"train prompts of {args.recipe} as the gate reads them",
        corpus_prompts=len(prompts),
        metrics=metrics,
    )
    emit(
        {
            "script": "train_gate_sae",
            "model": handle.name,
            "recipe": args.recipe,
            "hook": args.hook,
            "d_sae": args.d_sae,
            "k": args.k,
            "training_tokens": args.tokens,
            "corpus_prompts": len(prompts),
            "buffer_tokens": run.timings["buffer_tokens"],
            **metrics,
            **{k: v for k, v in run.timings.items() if k.endswith("_s")},
            "total_s": time.perf_counter() - started,
            "load_average_at_start": load_average,
            "machine": machine(),
            "out": args.out,
        }
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
