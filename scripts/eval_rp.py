"""RP metrics for default vs the seeds' sampler presets, with and without the moralizing direction.

    python scripts/eval_rp.py --models smollm2-135m-instruct
    python scripts/eval_rp.py --models qwen2.5-coder-0.5b-instruct --presets default,shorirp

Steps: load each model → get its moralizing direction (``--direction`` artifact, else computed
from recipes/moralizing.toml with steer.directions, else none) → ``steer.rp.evaluate`` for every
preset (and the ablated variants) → one JSON line per run → the table in docs/results.md,
section "rp". Records accumulate in ``--records`` so models run in separate invocations share
one table.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import emit, machine, table, write_section

from steer.interventions import Ablate
from steer.models import ModelHandle, load_model
from steer.rp.evaluate import EvalSettings, evaluate_rp, load_scenarios
from steer.rp.presets import PRESETS, load_preset

COLUMNS = (
    "model",
    "preset",
    "moralizing",
    "words_per_reply",
    "repetition_in_reply",
    "repetition_across_turns",
    "cross_context_repetition",
    "slop_rate",
    "distinct_2",
    "moralizing_rate",
    "impersonation_rate",
    "recurring_names",
)


def moralizing_direction(
    handle: ModelHandle, given: str | None, work: Path
) -> tuple[Ablate, str] | None:
    """The model's moralizing direction as an ablation with a one-line description (layer,
    method, validation KL, whether it passed the recipe's filters), or None."""
    from steer.artifacts import load_vector

    if given:
        return _described(load_vector(given, handle=handle), given)
    try:
        from steer.directions.api import compute
    except ImportError:
        return None
    out = work / f"moralizing-{handle.name}"
    if not (out / "steer.json").exists():
        recipe = Path(__file__).resolve().parent.parent / "recipes" / "moralizing.toml"
        compute(
            handle,
            recipe,
            out,
            progress=lambda stage, fraction: print(f"[{fraction:5.1%}] {stage}", file=sys.stderr),
            cancelled=threading.Event(),
        )
    return _described(load_vector(out, handle=handle), str(out))


def _described(artifact: Any, where: str) -> tuple[Ablate, str]:
    meta = artifact.metadata
    metrics = meta.get("metrics") or {}
    kl = metrics.get("kl_first_token_validation")
    text = (
        f"layer {meta.get('layer')}, {meta.get('method')}, validation first-token KL "
        f"{kl:.3g}, passed filters: {metrics.get('passed_filters')}"
        if isinstance(kl, float)
        else f"{where} (no validation metrics)"
    )
    return Ablate(artifact.vector), text


def run_model(
    name: str, presets: list[str], args: argparse.Namespace, save: Callable[[dict[str, Any]], None]
) -> None:
    handle = load_model(name)
    scenarios = load_scenarios()[: args.max_scenarios or None]
    found = None
    if not args.no_direction:
        found = moralizing_direction(handle, args.direction, Path(args.work))
    runs: list[tuple[str, tuple[Ablate, ...]]] = [(p, ()) for p in presets]
    if found is not None:
        runs += [(p, (found[0],)) for p in args.ablated_presets.split(",") if p]
    for preset, interventions in runs:
        start = time.perf_counter()
        settings = EvalSettings(
            sampling=load_preset(preset),
            interventions=interventions,
            max_new_tokens=args.max_new_tokens,
            rounds=args.rounds,
            seed=args.seed,
        )
        metrics = evaluate_rp(handle, settings, scenarios)
        record = {
            **metrics,
            "preset": preset,
            "moralizing": "ablated" if interventions else "-",
            "direction": found[1] if interventions and found else None,
            "seconds": round(time.perf_counter() - start, 1),
            "max_new_tokens": args.max_new_tokens,
            "rounds": args.rounds,
            "scenarios": len(scenarios),
        }
        emit(record)
        save(record)


def render(records: list[dict[str, Any]], args: argparse.Namespace) -> str:
    rows = []
    order = list(PRESETS)
    records = sorted(
        records,
        key=lambda r: (r["model"], r["moralizing"] != "-", order.index(r["preset"])),
    )
    first = records[0] if records else {}  # every record shares these settings (see main)
    for record in records:
        row = dict(record)
        names = record.get("recurring_names") or []
        row["recurring_names"] = ", ".join(f"{n} ({c})" for n, c in names[:3]) or "-"
        rows.append(row)
    return "\n".join(
        [
            "## Roleplay metrics (`scripts/eval_rp.py`)",
            "",
            f"{first.get('scenarios', args.scenarios_count)} project scenarios "
            f"(recipes/data/rp_scenarios.jsonl), {first.get('rounds', args.rounds)} replies each "
            "(scripted user follow-ups), at most "
            f"{first.get('max_new_tokens', args.max_new_tokens)} new tokens per reply, format "
            "`chat_template`, seeded per "
            f"scenario. Presets are the seeds' settings (steer.rp.presets); `moralizing = "
            "ablated` removes the direction computed from recipes/moralizing.toml. Metric "
            "definitions: steer/rp/metrics.py (repetition shares are of word 3-grams; "
            "cross-context of 4-grams seen in 4+ scenarios; slop per 1,000 words).",
            "",
            f"Measured on {machine()}.",
            "",
            table(rows, COLUMNS),
            "",
            "Moralizing directions used for the ablated rows:",
            "",
            *sorted({f"- {r['model']}: {r['direction']}" for r in records if r.get("direction")}),
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2-135m-instruct")
    parser.add_argument(
        "--presets", default="default,shorirp,temperature-last,mirostat,limarp,dry-xtc"
    )
    parser.add_argument("--ablated-presets", default="default,shorirp")
    parser.add_argument("--direction", help="moralizing direction artifact (else computed)")
    parser.add_argument("--no-direction", action="store_true")
    parser.add_argument("--work", default="/tmp/steer-eval-rp", help="where computed directions go")
    parser.add_argument("--records", default="/tmp/steer-eval-rp/records.jsonl")
    parser.add_argument("--max-scenarios", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-docs", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument(
        "--render-only", action="store_true", help="rewrite the docs table from --records"
    )
    args = parser.parse_args()
    presets = [p for p in args.presets.split(",") if p]
    unknown = [p for p in presets if p not in PRESETS]
    if unknown:
        parser.error(f"unknown presets {unknown}")
    args.scenarios_count = len(load_scenarios()[: args.max_scenarios or None])
    records_path = Path(args.records)
    records_path.parent.mkdir(parents=True, exist_ok=True)
    old = []
    if records_path.exists():
        old = [json.loads(line) for line in records_path.read_text().splitlines() if line]

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.render_only:
        write_section("results.md", "rp", render(old, args))
        return 0
    settings = {
        "max_new_tokens": args.max_new_tokens,
        "rounds": args.rounds,
        "scenarios": args.scenarios_count,
    }
    # rows measured with other settings would not be comparable: this run replaces them
    stale = [r for r in old if any(r.get(k) != v for k, v in settings.items())]
    if stale:
        print(f"dropping {len(stale)} records made with other settings", file=sys.stderr)
        old[:] = [r for r in old if r not in stale]

    def save(record: dict[str, Any]) -> None:
        """Keep every finished run at once, so a stopped run still leaves its rows."""
        key = (record["model"], record["preset"], record["moralizing"])
        old[:] = [r for r in old if (r["model"], r["preset"], r["moralizing"]) != key]
        old.append(record)
        records_path.write_text("".join(json.dumps(r) + "\n" for r in old))
        if not args.no_docs:
            write_section("results.md", "rp", render(old, args))

    for model in args.models.split(","):
        run_model(model, presets, args, save)
    return 0


if __name__ == "__main__":
    sys.exit(main())
