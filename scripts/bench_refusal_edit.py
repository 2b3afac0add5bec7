"""How long steer takes to make its gated refusal edit from scratch, beside heretic's recorded
time; docs/results.md ("refusal-edit-time"). Issue #20's goal: at most a fifth of heretic's.

The one command a user runs, in its own process, timed wall to wall (model load included)::

    steer directions gate OUT/direction --compute --model M --recipe R --out OUT/gate \\
        --condition direction,discriminant --summed

(``compare_heretic.py --make-steer`` runs the same). heretic's seconds are given
(``--heretic-seconds``: its recorded run, docs/results.md "heretic"), since a heretic run is
hours (40 trials: 9251 s on 2 cores). With ``--evaluate``, ``steer eval refusal`` measures
the written recipe on the recipe's test split (16 and 64 tokens, KL over 32), also in its own
process; without it the section names the figures as not measured in this run.

    python scripts/bench_refusal_edit.py --heretic-seconds 9251 --out /tmp/refusal-edit --evaluate
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare_heretic import MAKE_STEER_FLAGS, steer_gate
from report import command_line, emit, run_facts, run_footer, write_section

from steer.directions.data import RECIPES_DIR

#: the issue's goal: steer's time at most this share of heretic's
GOAL = 0.2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--recipe", default=str(RECIPES_DIR / "refusal.toml"))
    parser.add_argument("--out", required=True, help="directory for the direction and the gate")
    parser.add_argument(
        "--heretic-seconds", type=float, required=True, help="heretic's recorded wall seconds"
    )
    parser.add_argument("--evaluate", action="store_true", help="steer eval refusal on test")
    parser.add_argument("--no-docs", action="store_true", help="do not write docs/results.md")
    return parser


def evaluate(model: str, direction_recipe: str, edits: Path) -> dict[str, Any]:
    """``steer eval refusal --edits EDITS`` on ``direction_recipe``'s test split, its JSON
    line."""
    command = [
        sys.executable, "-m", "steer", "eval", "refusal", "--model", model, "--recipe",
        direction_recipe, "--edits", str(edits), "--lengths", "16,64", "--kl-tokens", "32",
        "--json",
    ]  # fmt: skip
    done = subprocess.run(
        command, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True
    )
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return report


def markdown(record: dict[str, Any], command: str) -> str:
    kept = record["gate"]
    rates = kept["kept"]["validation"]
    lines = [
        "## steer's gated refusal edit from scratch, refusal-edit-time "
        "(`scripts/bench_refusal_edit.py`)",
        "",
        f"Model `{record['model']}`, recipe `{record['recipe']}`. One command, in its own "
        f"process, model load included: `steer directions gate DIR --compute "
        f"{' '.join(MAKE_STEER_FLAGS)}`. heretic's time is its recorded run's (docs/results.md "
        '"heretic", given with --heretic-seconds).',
        "",
        "| steer (s) | heretic (s) | steer / heretic | goal | met |",
        "|---|---|---|---|---|",
        f"| {record['steer_seconds']:.0f} | {record['heretic_seconds']:.0f} | "
        f"{record['ratio']:.3f} | <= {GOAL} | {'yes' if record['ratio'] <= GOAL else 'no'} |",
        "",
        f"Kept gate: {kept['condition']} at {', '.join(_hooks(kept['kept']['hook']))}, "
        f"validation true-/false-positive rate {rates['true_positive_rate']:.3f} / "
        f"{rates['false_positive_rate']:.3f}.",
    ]
    test = record.get("test")
    if test is None:
        lines.append(
            "The edit's test-split figures were not measured in this run (--evaluate not given)."
        )
    else:
        by_length = {entry["tokens"]: entry for entry in test["by_length"]}
        low, high = test["interval_95"]
        lines.append(
            f"Test split (`steer eval refusal --edits`; no choice is made on it): refusals "
            f"{by_length[16]['rate']:.3f} at 16 tokens, {test['refusal_rate']:.3f} "
            f"[{low:.3f}, {high:.3f}] at 64 (n {test['n']}); harmless first-token KL "
            f"{test['kl_first_token']:.4g}, multi-token {test['kl_multi_token']:.4g} "
            f"(n {test['n_kl']})."
        )
    lines += ["", run_footer(record, command)]
    return "\n".join(lines)


def _shown(path: str) -> str:
    """``path`` relative to the checkout where it lies inside it (recipes/refusal.toml)."""
    resolved, root = Path(path).resolve(), RECIPES_DIR.parent.resolve()
    return str(resolved.relative_to(root)) if resolved.is_relative_to(root) else path


def _hooks(hook: str | list[str]) -> list[str]:
    return [hook] if isinstance(hook, str) else list(hook)


def main() -> int:
    args = _parser().parse_args()
    command = command_line()
    load_before = os.getloadavg()[0]
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    recipe, report = steer_gate(args.model, args.recipe, Path(args.out))
    seconds["steer"] = round(time.perf_counter() - start, 1)
    record: dict[str, Any] = {
        "script": "bench_refusal_edit",
        "model": args.model,
        "recipe": _shown(args.recipe),
        "steer_seconds": seconds["steer"],
        "heretic_seconds": args.heretic_seconds,
        "ratio": round(seconds["steer"] / args.heretic_seconds, 4),
        "goal": GOAL,
        "gate": {key: report[key] for key in ("condition", "kept", "new_source")},
        "gated_recipe": str(recipe),
    }
    record |= run_facts(seconds, load_before)  # the load average after the one command
    if args.evaluate:
        start = time.perf_counter()
        record["test"] = evaluate(args.model, args.recipe, recipe)
        for entry in record["test"]["by_length"]:
            entry.pop("hits", None)  # one flag per prompt: in the eval's own output
        record["seconds"]["evaluate"] = round(time.perf_counter() - start, 1)
    if not args.no_docs:
        write_section("results.md", "refusal-edit-time", markdown(record, command))
    emit(record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
