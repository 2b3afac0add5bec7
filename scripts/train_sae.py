"""Train the shipped SmolLM2-135M SAE recipe once, measure it, record it in docs/results.md.

    python scripts/train_sae.py [--recipe recipes/sae-smollm2.toml] [--out out/sae-smollm2]

Steps: load the recipe -> build its corpus (the model answers the project's prompts) -> train
(steer.sae.training: SAELens' trainer) -> metrics on held-out text (L0, explained variance, CE
change) -> a contrast check on the project's moralizing/in-character pairs (features picked on
two thirds of the pairs, AUROC on the held-out third) -> save -> one JSON line + docs section.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import emit, machine, table, write_section

from steer.models import load_model
from steer.sae.features import auroc, contrast, text_scores
from steer.sae.recipe import load_sae_recipe
from steer.sae.training import save, train_on_texts

ROOT = Path(__file__).resolve().parent.parent


def contrast_check(handle, sae, pairs_file: Path) -> dict:  # type: ignore[no-untyped-def]
    rows = [json.loads(line) for line in pairs_file.read_text().splitlines() if line.strip()]
    split = len(rows) * 2 // 3
    train, held_out = rows[:split], rows[split:]
    ranked = contrast(
        handle,
        sae,
        [row["moralizing"] for row in train],
        [row["in_character"] for row in train],
        k=5,
    )
    scores_a = text_scores(handle, sae, [row["moralizing"] for row in held_out])
    scores_b = text_scores(handle, sae, [row["in_character"] for row in held_out])
    features = [r.feature for r in ranked]
    held = auroc(scores_a[:, features], scores_b[:, features]).tolist()
    top = ranked[0]
    # orient: 1.0 means the feature ranks the set it fires more on first
    oriented = [a if r.score > 0 else 1.0 - a for a, r in zip(held, ranked, strict=True)]
    return {
        "pairs_train": len(train),
        "pairs_held_out": len(held_out),
        "top_feature": top.feature,
        "top_score": top.score,
        "fires_more_on": "moralizing" if top.score > 0 else "in-character",
        "auroc_train": top.auroc if top.score > 0 else 1.0 - (top.auroc or 0.0),
        "auroc_held_out": oriented[0],
        "held_out_auroc_top5": [round(v, 3) for v in oriented],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "sae-smollm2.toml"))
    parser.add_argument("--out", default=str(ROOT / "out" / "sae-smollm2"))
    parser.add_argument(
        "--pairs", default=str(ROOT / "recipes" / "data" / "moralizing_pairs.jsonl")
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    started = time.perf_counter()
    recipe = load_sae_recipe(args.recipe)
    load_average = os.getloadavg()[0]
    handle = load_model(recipe.model, dtype=recipe.dtype)
    corpus_started = time.perf_counter()
    texts = recipe.corpus.texts(handle, progress=True)
    corpus_s = time.perf_counter() - corpus_started
    run = train_on_texts(handle, texts, recipe.training, progress=True)
    check = contrast_check(handle, run.sae, Path(args.pairs))
    total_s = time.perf_counter() - started
    metrics = run.metrics.to_dict()
    save(
        run.sae,
        args.out,
        handle=handle,
        training=recipe.training.__dict__,
        recipe=str(Path(args.recipe).relative_to(ROOT)),
        metrics=metrics,
        contrast_check=check,
        corpus_texts=len(texts),
    )
    record = {
        "script": "train_sae",
        "model": handle.name,
        "hook": recipe.training.hook,
        "architecture": recipe.training.architecture,
        "d_sae": recipe.training.d_sae,
        "k": recipe.training.k,
        "training_tokens": recipe.training.tokens,
        "buffer_tokens": run.timings["buffer_tokens"],
        "corpus_texts": len(texts),
        **metrics,
        **check,
        "corpus_s": corpus_s,
        **{k: v for k, v in run.timings.items() if k.endswith("_s")},
        "total_s": total_s,
        "load_average_at_start": load_average,
        "machine": machine(),
    }
    emit(record)
    if not args.no_docs:
        write_section("results.md", "sae", _markdown(record), title="Results")
    return 0


def _markdown(record: dict) -> str:  # type: ignore[type-arg]
    rows = [
        {"metric": "L0 (active features per token)", "value": record["l0"]},
        {"metric": "explained variance", "value": record["explained_variance"]},
        {"metric": "CE clean (nats/token)", "value": record["ce_clean"]},
        {"metric": "CE with SAE reconstruction spliced in", "value": record["ce_spliced"]},
        {"metric": "CE change", "value": record["ce_change"]},
        {"metric": "CE with the activations zeroed", "value": record["ce_zero"]},
        {"metric": "fraction of CE recovered", "value": record["ce_recovered"]},
        {"metric": "dead features (on held-out text)", "value": record["dead_fraction"]},
        {"metric": "contrast top feature fires more on", "value": record["fires_more_on"]},
        {"metric": "contrast top feature, AUROC on picking pairs", "value": record["auroc_train"]},
        {"metric": "contrast top feature, AUROC held out", "value": record["auroc_held_out"]},
        {"metric": "top 5 features, AUROC held out", "value": record["held_out_auroc_top5"]},
    ]
    return (
        "## SAE: SmolLM2-135M-Instruct (`recipes/sae-smollm2.toml`)\n\n"
        f"`python scripts/train_sae.py` -- {record['architecture']} SAE, d_sae "
        f"{record['d_sae']}, k {record['k']}, at `{record['hook']}`; "
        f"{record['training_tokens']} training samples over a buffer of "
        f"{int(record['buffer_tokens'])} distinct tokens from {record['corpus_texts']} texts "
        "(the model's own answers to the project's prompts, plus the prompts). Metrics on "
        f"{record['tokens']} held-out tokens. Contrast check: moralizing vs in-character "
        f"replies of `recipes/data/moralizing_pairs.jsonl`, feature picked on "
        f"{record['pairs_train']} pairs, AUROC of its text score on the other "
        f"{record['pairs_held_out']}.\n\n"
        + table(rows, ["metric", "value"])
        + "\n\nTime: corpus {:.0f} s, activations {:.0f} s, training {:.0f} s, metrics {:.0f} s;"
        " {:.0f} s in all, on {} (load average {:.1f} at start: the CPU was shared with other"
        " jobs).".format(
            record["corpus_s"],
            record["collect_s"],
            record["train_s"],
            record["evaluate_s"],
            record["total_s"],
            record["machine"],
            record["load_average_at_start"],
        )
    )


if __name__ == "__main__":
    sys.exit(main())
