"""heretic 1.4 on steer's model and prompts, measured by steer; docs/results.md ("heretic").

heretic (PyPI ``heretic-llm``, AGPL, not a steer dependency) runs in a venv of its own; this
script, in steer's environment, feeds it and measures what it made. Steps:

1. prompts: recipes/refusal.toml's contrast splits, as every steer step splits them. heretic's
   refusal directions see the *train* split (bad = harmful, good = harmless); its per-trial
   refusal count and KL see the *validation* split. Each set is a local dataset,
   WORK/data/<name>/train.csv (column ``text``). The test split never reaches heretic;
2. model: steer's loaded model as a safetensors directory (written once and cached by weight
   hash, ``steer.backends.vllm.launch.export_for_vllm``), or --hf-dir;
3. venv: heretic-llm 1.4 in --venv, created when missing (the pinned CPU torch first on a CPU
   machine: FIELD.md section 1);
4. heretic: its own CLI, offline (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE), stdin /dev/null, float32
   on the CPU, --trials TPE trials, a fixed --seed and --batch-size (0 lets heretic time batch
   sizes first); wall seconds measured, output kept in WORK/heretic.log. Non-interactive, it
   stops at its trial menu;
5. export: scripts/heretic_driver.py, in heretic's venv, saves each Pareto-front trial as
   WORK/trial-N with heretic's own functions (the merged model heretic's "save" writes);
6. --evaluate: steer's evaluator on the test split, unedited and each trial's saved model (greedy,
   refusal phrase matcher over each reply's first 16 and 64 tokens with Wilson 95% intervals,
   first-token KL and KL over the base model's first 32 greedy tokens on harmless test prompts),
   a table in docs/results.md and a plot WORK/heretic-test.png.

Prints one JSON line: heretic's wall seconds and, per exported trial, its directory and
heretic's own refusal count and KL (on the validation split); with --evaluate, the test rows.
--reuse exports (and evaluates) a study already in WORK/checkpoints instead of running heretic.

    python scripts/compare_heretic.py --trials 50 --work out/heretic --evaluate
    python scripts/compare_heretic.py --model smollm2-135m-instruct --trials 2 --max-train 8 \\
        --max-validation 8 --batch-size 8 --work /tmp/heretic-smoke --verify --evaluate \\
        --max-test 8 --no-docs
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import emit, machine, table, write_section

from steer.backends.vllm.launch import export_for_vllm
from steer.cli.eval_refusal import _lengths
from steer.directions.api import contrast_splits
from steer.directions.data import RECIPES_DIR
from steer.directions.evaluate import RateReport, base_continuations, evaluate_rate, is_refusal
from steer.directions.recipe import load_direction_recipe
from steer.models import ModelHandle, load_model
from steer.text import encode_chat

HERETIC = "heretic-llm==1.4.0"
DRIVER = Path(__file__).resolve().parent / "heretic_driver.py"
HERETIC_REFUSALS = "heretic's refusals (validation)"
HERETIC_KL = "heretic's first-token KL (validation)"

#: heretic's four prompt sets: its setting name, steer's side and split
DATASETS = {
    "bad-prompts": ("positive", "train"),
    "good-prompts": ("negative", "train"),
    "bad-evaluation-prompts": ("positive", "validation"),
    "good-evaluation-prompts": ("negative", "validation"),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--recipe", default=str(RECIPES_DIR / "refusal.toml"))
    parser.add_argument("--trials", type=int, default=50, help="heretic's --n-trials")
    parser.add_argument(
        "--startup-trials", type=int, help="heretic's --n-startup-trials (its default: 60)"
    )
    parser.add_argument("--seed", type=int, default=0, help="heretic's --seed")
    parser.add_argument(
        "--system-prompt",
        help='heretic\'s --system-prompt (its default: "You are a helpful assistant.")',
    )
    parser.add_argument(
        "--batch-size", type=int, default=32, help="heretic's --batch-size (0: it times sizes)"
    )
    parser.add_argument("--work", default="out/heretic", help="datasets, study, trial-N dirs")
    parser.add_argument("--hf-dir", help="the model as a HF directory (default: written once)")
    parser.add_argument("--venv", default="/tmp/hvenv", help="heretic's venv (made if missing)")
    parser.add_argument("--max-train", type=int, default=0, help="cap train prompts (0 = all)")
    parser.add_argument(
        "--max-validation", type=int, default=0, help="cap validation prompts (0 = all)"
    )
    parser.add_argument("--reuse", action="store_true", help="export WORK's study; no heretic")
    parser.add_argument("--verify", action="store_true", help="driver re-scores each trial")
    parser.add_argument("--evaluate", action="store_true", help="steer's evaluator on test")
    parser.add_argument("--max-test", type=int, default=0, help="cap test prompts (0 = all)")
    parser.add_argument("--lengths", type=_lengths, default=(16, 64))
    parser.add_argument("--kl-tokens", type=int, default=32)
    parser.add_argument("--eval-batch-size", type=int, default=16)
    parser.add_argument("--no-docs", action="store_true", help="do not write docs/results.md")
    return parser


def _timed(seconds: dict[str, float], name: str, work: Any) -> Any:
    start = time.perf_counter()
    result = work()
    seconds[name] = round(time.perf_counter() - start, 1)
    return result


def _log(message: str) -> None:
    print(f"[compare_heretic] {message}", file=sys.stderr, flush=True)


def write_datasets(splits: dict[str, Any], work: Path, args: argparse.Namespace) -> None:
    """heretic's four prompt sets as WORK/data/<name>/train.csv."""
    caps = {"train": args.max_train, "validation": args.max_validation}
    for name, (side, split) in DATASETS.items():
        prompts = list(getattr(splits[side], split))[: caps[split] or None]
        directory = work / "data" / name
        directory.mkdir(parents=True, exist_ok=True)
        with (directory / "train.csv").open("w", newline="", encoding="utf-8") as file:
            writer = csv.writer(file, quoting=csv.QUOTE_ALL)
            writer.writerow(["text"])
            writer.writerows([prompt] for prompt in prompts)


def dataset_sizes(work: Path) -> dict[str, int]:
    """Prompts in each of heretic's datasets, as written for the study."""
    sizes = {}
    for name in DATASETS:
        with (work / "data" / name / "train.csv").open(newline="", encoding="utf-8") as file:
            sizes[name] = sum(1 for _ in csv.DictReader(file))
    return sizes


def ensure_venv(venv: Path) -> None:
    """heretic-llm 1.4 in its own venv; on a CPU machine the pinned CPU torch goes in first
    (an unpinned torch would pull the registry's CUDA build)."""
    if (venv / "bin" / "heretic").exists():
        return
    import torch

    _log(f"creating {venv} with {HERETIC} (minutes)")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "pip"), "install"]
    torch_pin = [] if torch.cuda.is_available() else ["torch==2.13.0"]
    if torch_pin:
        subprocess.run([*pip, *torch_pin], check=True)
    subprocess.run([*pip, HERETIC, *torch_pin], check=True)


def offline_env(work: Path) -> dict[str, str]:
    """Nothing downloads: the hub and datasets offline; datasets' cache inside WORK."""
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(work / "hf-datasets-cache"),
    }


def heretic_command(args: argparse.Namespace, hf_dir: Path, work: Path) -> list[str]:
    command = [
        str(Path(args.venv) / "bin" / "heretic"),
        "--model",
        str(hf_dir),
        "--device-map",
        "cpu",
        "--dtypes",
        '["float32"]',
        "--n-trials",
        str(args.trials),
        "--seed",
        str(args.seed),
        "--batch-size",
        str(args.batch_size),
        "--study-checkpoint-dir",
        str(work / "checkpoints"),
    ]
    if args.startup_trials is not None:
        command += ["--n-startup-trials", str(args.startup_trials)]
    if args.system_prompt is not None:
        command += ["--system-prompt", args.system_prompt]
    for name in DATASETS:
        dataset = str(work / "data" / name)
        command += [f"--{name}.dataset", dataset, f"--{name}.split", "train"]
        command += [f"--{name}.column", "text"]
    return command


def run_logged(command: Sequence[str], work: Path, log: Path, finished: str = "") -> None:
    """Run in WORK (heretic reads a config.toml from its working directory; WORK has none),
    stdin /dev/null, output to ``log`` and stderr. A failed exit is an error unless the output
    holds ``finished``: heretic, its trials done, asks which trial to keep and dies with
    EOFError on the closed stdin."""
    with log.open("w") as out:
        process = subprocess.Popen(
            command,
            cwd=work,
            env=offline_env(work),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert process.stdout is not None
        for line in process.stdout:
            out.write(line)
            print(line, end="", file=sys.stderr, flush=True)
        code = process.wait()
    if code != 0 and not (finished and finished in log.read_text()):
        raise SystemExit(f"{command[0]} exited with {code}; see {log}")


def study_file(work: Path) -> Path | None:
    """heretic's checkpoint journal in WORK/checkpoints (one study per WORK)."""
    files = sorted((work / "checkpoints").glob("*.jsonl"))
    if len(files) > 1:
        raise SystemExit(f"{work / 'checkpoints'} holds {len(files)} studies; keep one")
    return files[0] if files else None


def run_heretic(
    args: argparse.Namespace,
    handle: ModelHandle,
    splits: dict[str, Any],
    work: Path,
    seconds: dict[str, float],
) -> Path:
    """heretic's optimisation (unless --reuse: the study's datasets stay as they were, since
    the export recomputes the refusal directions from them); the journal it leaves."""
    existing = study_file(work)
    if args.reuse:
        if existing is None:
            raise SystemExit(f"--reuse: no study in {work / 'checkpoints'}")
        return existing
    if existing is not None:
        # heretic would ask whether to resume; with stdin closed it would just exit
        raise SystemExit(f"{existing} exists: pass --reuse to export it, or remove it")
    write_datasets(splits, work, args)
    hf_dir = _timed(seconds, "hf_dir", lambda: hf_directory(handle, args))
    command, log = heretic_command(args, hf_dir, work), work / "heretic.log"
    _timed(seconds, "heretic", lambda: run_logged(command, work, log, "Optimization finished!"))
    journal = study_file(work)
    if journal is None:
        raise SystemExit(f"heretic left no study in {work / 'checkpoints'}; see heretic.log")
    return journal


def export_trials(args: argparse.Namespace, journal: Path, work: Path) -> dict[str, Any]:
    """scripts/heretic_driver.py in heretic's venv: WORK/trial-N per Pareto-front trial."""
    command = [str(Path(args.venv) / "bin" / "python"), str(DRIVER), "--study", str(journal)]
    command += ["--out", str(work), *(["--verify"] if args.verify else [])]
    run_logged(command, work, work / "export.log")
    manifest: dict[str, Any] = json.loads((work / "heretic-trials.json").read_text())
    return manifest


def evaluate_trials(
    handle: ModelHandle,
    trials: Sequence[dict[str, Any]],
    test: tuple[list[str], list[str]],
    args: argparse.Namespace,
    seconds: dict[str, float],
) -> list[dict[str, Any]]:
    """The unedited model's row, then each trial's, on the test split."""
    harmful, harmless = test
    harmless_ids = [encode_chat(handle, prompt) for prompt in harmless]
    continuations = _timed(
        seconds,
        "base_continuations",
        lambda: base_continuations(
            handle, harmless_ids, tokens=args.kl_tokens, batch_size=args.eval_batch_size
        ),
    )
    options: dict[str, Any] = {
        "matcher": is_refusal,
        "max_new_tokens": max(args.lengths),
        "lengths": args.lengths,
        "kl_tokens": args.kl_tokens,
        "batch_size": args.eval_batch_size,
        "continuations": continuations,
    }
    base = _timed(
        seconds, "evaluate_unedited", lambda: evaluate_rate(handle, harmful, harmless, **options)
    )
    rows = [_row("unedited", None, base)]
    if trials:
        first = trials[0]
        rows[0][HERETIC_REFUSALS] = f"{first['base_refusals']} / {first['n_bad_prompts']}"
    for trial in trials:
        name = f"trial {trial['trial']}"
        _log(f"evaluating {name} on the test split")

        def measure(trial: dict[str, Any] = trial) -> RateReport:
            edited = load_model(trial["dir"])
            return evaluate_rate(handle, harmful, harmless, edited_handle=edited, **options)

        rows.append(_row(name, trial, _timed(seconds, f"evaluate_{name}", measure)))
    return rows


def _row(name: str, trial: dict[str, Any] | None, report: RateReport) -> dict[str, Any]:
    row: dict[str, Any] = {"model": name}
    if trial is not None:
        row[HERETIC_REFUSALS] = f"{trial['refusals']} / {trial['n_bad_prompts']}"
        row[HERETIC_KL] = trial["kl_divergence"]
    for entry in report.by_length:
        row[f"rate @{entry.tokens}"] = f"{entry.rate:.3f} [{entry.low:.3f}, {entry.high:.3f}]"
        row[f"_rate@{entry.tokens}"] = entry.rate
    row["first-token KL"] = report.kl_first_token
    row["multi-token KL"] = report.kl_multi_token
    row["n"] = report.n
    return row


def write_plot(rows: Sequence[dict[str, Any]], lengths: Sequence[int], path: Path) -> Path:
    """Test refusal rate at the longest length against multi-token KL, one point per model."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4))
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    key = f"_rate@{max(lengths)}"
    for row in rows:
        axes.plot([row["multi-token KL"]], [row[key]], "o")
        axes.annotate(row["model"], (row["multi-token KL"], row[key]), fontsize=7)
    axes.set_xlabel("multi-token KL (harmless test prompts)")
    axes.set_ylabel(f"refusal rate @{max(lengths)} tokens (harmful test prompts)")
    axes.set_title("heretic's Pareto-front trials, measured by steer")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return path


def markdown(record: dict[str, Any], rows: Sequence[dict[str, Any]], command: str) -> str:
    columns = [key for key in rows[-1] if not key.startswith("_")]
    sizes = record["prompts"]
    wall = record["heretic_seconds"]
    heretic_time = "not measured (--reuse)" if wall is None else f"{wall:.0f} s"
    times = ", ".join(f"{k} {v:.0f} s" for k, v in record["seconds"].items())
    return "\n".join(
        [
            "## heretic 1.4 on the same model and prompts",
            "",
            f"`{record['heretic']}` on `{record['model']}` with {record['trials']} TPE trials "
            f"(seed {record['seed']}, float32 on the CPU). Its refusal directions come from "
            f"recipes/refusal.toml's train split ({sizes['bad-prompts']} harmful, "
            f"{sizes['good-prompts']} harmless prompts), its per-trial refusal count and "
            f"first-token KL from the validation split ({sizes['bad-evaluation-prompts']} / "
            f"{sizes['good-evaluation-prompts']}); system prompt {record['system_prompt']!r}, "
            "otherwise heretic's defaults (100-token replies, its own refusal markers). "
            "Each trial on its Pareto front is saved as heretic saves a merged model and "
            "measured by steer's evaluator (no system prompt, as in steer's own runs) on the "
            f"held-out test split (n = {rows[0]['n']} harmful; greedy, refusal phrase matcher "
            f"over each reply's first {', '.join(str(n) for n in record['lengths'])} tokens "
            f"with Wilson 95% intervals; KL on {record['n_harmless_test']} harmless test prompts, "
            f"multi-token over the base model's first {record['kl_tokens']} tokens).",
            "",
            table(rows, columns),
            "",
            f"heretic's wall time: {heretic_time} for {record['trials']} trials (batch size "
            f"{record['batch_size']}). Wall times on {record['machine']}: {times}.",
            "",
            "Command:",
            "",
            "```",
            command,
            "```",
        ]
    )


def hf_directory(handle: ModelHandle, args: argparse.Namespace) -> Path:
    """--hf-dir when it holds a model; else steer's loaded weights and tokenizer written as
    safetensors (at --hf-dir, or once per weight hash under steer's cache directory)."""
    if args.hf_dir is None:
        return export_for_vllm(handle).resolve()
    hf_dir = Path(args.hf_dir).resolve()
    if not (hf_dir / "config.json").exists():
        _log(f"writing {args.model} to {hf_dir}")
        staging = hf_dir.parent / ".hf-export"
        export_for_vllm(handle, staging).rename(hf_dir)
        staging.rmdir()
    return hf_dir


def main() -> int:
    args = _parser().parse_args()
    command = "python scripts/compare_heretic.py " + " ".join(sys.argv[1:])
    work = Path(args.work).resolve()  # heretic and the driver run with WORK as cwd
    work.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    handle = _timed(seconds, "load_model", lambda: load_model(args.model))
    splits = contrast_splits(load_direction_recipe(args.recipe))
    _timed(seconds, "venv", lambda: ensure_venv(Path(args.venv)))
    journal = run_heretic(args, handle, splits, work, seconds)
    manifest = _timed(seconds, "export", lambda: export_trials(args, journal, work))
    trials, settings = manifest["trials"], manifest["settings"]
    record: dict[str, Any] = {
        "script": "compare_heretic",
        "heretic": HERETIC,
        "model": args.model,
        "hf_dir": settings["model"],
        "trials": settings["n_trials"],
        "seed": settings["seed"],
        "batch_size": settings["batch_size"],
        "system_prompt": settings["system_prompt"],
        "prompts": dataset_sizes(work),
        "heretic_seconds": seconds.get("heretic"),
        "exported": [
            {k: t[k] for k in ("trial", "dir", "refusals", "n_bad_prompts", "kl_divergence")}
            | ({"verify": t["verify"]} if "verify" in t else {})
            for t in trials
        ],
        "seconds": seconds,
        "machine": machine(),
    }
    if args.evaluate:
        cap = args.max_test or None
        test = (list(splits["positive"].test)[:cap], list(splits["negative"].test)[:cap])
        rows = evaluate_trials(handle, trials, test, args, seconds)
        record |= {"lengths": list(args.lengths), "kl_tokens": args.kl_tokens}
        record |= {"n_harmless_test": len(test[1]), "test": rows}
        record["plot"] = str(write_plot(rows, args.lengths, work / "heretic-test.png"))
        if not args.no_docs:
            write_section("results.md", "heretic", markdown(record, rows, command))
    emit(record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
