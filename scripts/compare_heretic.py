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

--make-steer also makes steer's gated edit here, from scratch, with the one command a user runs
(``steer directions gate --compute``), timed, before heretic runs (so neither shares the cores).

Prints one JSON line: heretic's wall seconds and, per exported trial, its directory and
heretic's own refusal count and KL (on the validation split); with --evaluate, the test rows.
--reuse exports (and evaluates) a study already in WORK/checkpoints instead of running heretic;
--resume continues a study a --time-limit stopped (heretic's own "Continue the previous run", its
settings as the study holds them), adding the session's seconds to the run's; --keep-rows FILE
takes the rows an earlier record of the same study measured (the unedited model, steer's edits by
name, heretic trials still on the front) instead of measuring them again;
--from-record FILE writes the docs section and plot again from such a JSON line, running nothing;
with --steer / --baked it first measures those edits the same way (the record's model, test
split, lengths and KL tokens), adds their rows and prints the extended record.
The section says where heretic's time went (the seconds before its first trial, each trial's, as
its study recorded them) and, for a run stopped at --time-limit, the asked run extrapolated.

    python scripts/compare_heretic.py --trials 50 --work out/heretic --evaluate
    python scripts/compare_heretic.py --model smollm2-135m-instruct --trials 2 --max-train 8 \\
        --max-validation 8 --batch-size 8 --work /tmp/heretic-smoke --verify --evaluate \\
        --max-test 8 --no-docs
"""

from __future__ import annotations

import argparse
import csv
import functools
import itertools
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import (
    DOCS,
    command_block,
    command_line,
    emit,
    machine,
    named,
    rate_evaluator,
    table,
    timed,
    write_section,
)

from steer.backends.vllm.launch import export_for_vllm
from steer.cli.eval_refusal import _lengths, recipe_interventions
from steer.directions.api import contrast_splits
from steer.directions.data import RECIPES_DIR
from steer.directions.evaluate import RateReport, is_refusal
from steer.directions.recipe import load_direction_recipe
from steer.models import ModelHandle, load_model
from steer.recipes import load_edit_recipe, recipe_to_toml

HERETIC = "heretic-llm==1.4.0"
DRIVER = Path(__file__).resolve().parent / "heretic_driver.py"
HERETIC_REFUSALS = "heretic's refusals (validation)"
HERETIC_KL = "heretic's first-token KL (validation)"
HERETIC_SAMPLER = "heretic's sampler"

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
        "--time-limit",
        type=float,
        help="stop heretic after this many seconds and keep the trials it completed",
    )
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
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue WORK's study that --time-limit stopped, as heretic's own 'Continue the "
        "previous run' does (the settings the study holds; --trials and the like are ignored); "
        "its seconds are added to the first run's",
    )
    parser.add_argument(
        "--keep-rows",
        metavar="FILE",
        help="an earlier record on the same WORK study (FILE's last line): its rows for the "
        "unedited model, for steer edits of the same name and for heretic trials still on the "
        "front are kept, not measured again",
    )
    parser.add_argument("--verify", action="store_true", help="driver re-scores each trial")
    parser.add_argument("--evaluate", action="store_true", help="steer's evaluator on test")
    parser.add_argument("--max-test", type=int, default=0, help="cap test prompts (0 = all)")
    parser.add_argument("--lengths", type=_lengths, default=(16, 64))
    parser.add_argument("--kl-tokens", type=int, default=32)
    parser.add_argument("--eval-batch-size", type=int, default=16)
    parser.add_argument(
        "--steer",
        action="append",
        default=[],
        type=named("--steer"),
        metavar="NAME=RECIPE",
        help="also evaluate this steer edit recipe at run time (repeatable)",
    )
    parser.add_argument(
        "--baked",
        action="append",
        default=[],
        type=named("--baked"),
        metavar="NAME=DIR",
        help="also evaluate these baked weights (steer bake's output; repeatable)",
    )
    parser.add_argument(
        "--steer-seconds",
        type=float,
        help="wall seconds steer took to make its edits (as their scripts printed them)",
    )
    parser.add_argument(
        "--make-steer",
        action="store_true",
        help="make steer's gated edit here from scratch with the command a user runs (steer "
        "directions gate --compute, on --model and --recipe, into WORK/steer), time it, and "
        "evaluate it as 'steer gated' (its seconds replace --steer-seconds)",
    )
    parser.add_argument(
        "--steer-made-by",
        metavar="TEXT",
        help="how the --steer edits were made, for the docs (default: scripts/eval_gated.py); "
        "e.g. an earlier --make-steer run's command",
    )
    parser.add_argument("--no-docs", action="store_true", help="do not write docs/results.md")
    parser.add_argument(
        "--from-record",
        metavar="FILE",
        help="only write docs/results.md's section and the plot again from the JSON line a run "
        "printed (FILE's last line); nothing is run, unless --steer / --baked name edits to "
        "measure and add",
    )
    return parser


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


def run_logged(
    command: Sequence[str],
    work: Path,
    log: Path,
    finished: str = "",
    time_limit: float | None = None,
    resume: bool = False,
) -> bool:
    """Run in WORK (heretic reads a config.toml from its working directory; WORK has none),
    stdin /dev/null, output to ``log`` and stderr; stopped (SIGTERM) after ``time_limit``
    seconds. A failed exit is an error unless the output holds ``finished`` (heretic, its trials
    done, asks which trial to keep and dies with EOFError on the closed stdin) or the time limit
    stopped it. True when the time limit stopped it.

    With ``resume``, heretic finds its study and asks how to proceed; it reads the answer as a
    numbered choice on stdin when it believes it runs in a notebook (heretic/utils.py
    ``is_notebook``: a ``KAGGLE_KERNEL_RUN_TYPE`` variable), and choice 1 for an interrupted
    study is "Continue the previous run". stdin then closes as before."""
    env = offline_env(work) | ({"KAGGLE_KERNEL_RUN_TYPE": "steer-resume"} if resume else {})
    with log.open("w") as out:
        process = subprocess.Popen(
            command,
            cwd=work,
            env=env,
            stdin=subprocess.PIPE if resume else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        if resume:
            assert process.stdin is not None
            process.stdin.write("1\n")
            process.stdin.close()
        stopped = threading.Event()

        def stop() -> None:
            stopped.set()
            process.terminate()

        timer = threading.Timer(time_limit or 0, stop)
        if time_limit:
            timer.start()
        assert process.stdout is not None
        for line in process.stdout:
            out.write(line)
            print(line, end="", file=sys.stderr, flush=True)
        code = process.wait()
        timer.cancel()
    if code != 0 and not stopped.is_set() and not (finished and finished in log.read_text()):
        raise SystemExit(f"{command[0]} exited with {code}; see {log}")
    return stopped.is_set()


def study_file(work: Path) -> Path | None:
    """heretic's checkpoint journal in WORK/checkpoints (one study per WORK)."""
    files = sorted((work / "checkpoints").glob("*.jsonl"))
    if len(files) > 1:
        raise SystemExit(f"{work / 'checkpoints'} holds {len(files)} studies; keep one")
    return files[0] if files else None


#: optuna's journal operation that sets a study attribute (optuna.storages.journal)
_SET_STUDY_USER_ATTR = 2


def study_finished(journal: Path) -> bool:
    """Whether heretic marked its study finished (its ``finished`` study attribute, the last
    value the journal set): every asked trial run, nothing for --resume to continue."""
    finished = False
    for line in journal.read_text().splitlines():
        operation = json.loads(line)
        if operation.get("op_code") == _SET_STUDY_USER_ATTR:
            finished = operation.get("user_attr", {}).get("finished", finished)
    return bool(finished)


def run_heretic(
    args: argparse.Namespace,
    handle: ModelHandle,
    splits: dict[str, Any],
    work: Path,
    seconds: dict[str, float],
) -> Path:
    """heretic's optimisation (unless --reuse: the study's datasets stay as they were, since
    the export recomputes the refusal directions from them; --resume continues the study on
    them too); the journal it leaves."""
    existing = study_file(work)
    if (args.reuse or args.resume) and existing is None:
        raise SystemExit(f"--reuse / --resume: no study in {work / 'checkpoints'}")
    if args.reuse:
        assert existing is not None
        return existing
    if args.resume and existing is not None and study_finished(existing):
        raise SystemExit(f"--resume: {existing} has run all its trials; --reuse exports it")
    if existing is not None and not args.resume:
        # heretic would ask whether to resume; with stdin closed it would just exit
        raise SystemExit(f"{existing} exists: pass --reuse to export it, --resume to continue it")
    if not args.resume:
        write_datasets(splits, work, args)
    hf_dir = timed(seconds, "hf_dir", lambda: hf_directory(handle, args))
    command, log = heretic_command(args, hf_dir, work), work / "heretic.log"
    record = work / "heretic-run.json"
    run = json.loads(record.read_text()) if args.resume else {}
    if args.resume:
        log = work / f"heretic-resume-{len(run.get('resumes', [])) + 1}.log"
    session: dict[str, Any] = {"started": time.time(), "command": command_line()}
    record.write_text(json.dumps(_with_session(run, session)))
    stopped = timed(
        seconds,
        "heretic",
        lambda: run_logged(
            command, work, log, "Optimization finished!", args.time_limit, resume=args.resume
        ),
    )
    session |= {"seconds": seconds["heretic"], "stopped": stopped}
    record.write_text(json.dumps(_with_session(run, session)))
    journal = study_file(work)
    if journal is None:
        raise SystemExit(f"heretic left no study in {work / 'checkpoints'}; see heretic.log")
    return journal


def _with_session(run: dict[str, Any], session: dict[str, Any]) -> dict[str, Any]:
    """heretic-run.json with a session: the first run's own fields, each resumed one's in
    ``resumes``."""
    if not run:
        return session
    return run | {"resumes": [*run.get("resumes", []), session]}


def export_trials(args: argparse.Namespace, journal: Path, work: Path) -> dict[str, Any]:
    """scripts/heretic_driver.py in heretic's venv: WORK/trial-N per Pareto-front trial. With
    --reuse, an export already made from this journal (every trial directory there) is kept."""
    done = work / "heretic-trials.json"
    if args.reuse and done.exists() and done.stat().st_mtime > journal.stat().st_mtime:
        kept: dict[str, Any] = json.loads(done.read_text())
        if all((Path(trial["dir"]) / "config.json").exists() for trial in kept["trials"]):
            _log(f"keeping the export in {done}")
            return kept
    command = [str(Path(args.venv) / "bin" / "python"), str(DRIVER), "--study", str(journal)]
    command += ["--out", str(work), *(["--verify"] if args.verify else [])]
    run_logged(command, work, work / "export.log")
    manifest: dict[str, Any] = json.loads((work / "heretic-trials.json").read_text())
    return manifest


def evaluate_models(
    handle: ModelHandle,
    trials: Sequence[dict[str, Any]],
    test: tuple[list[str], list[str]],
    args: argparse.Namespace,
    seconds: dict[str, float],
    unedited: bool = True,
    kept: Mapping[str, dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """On the test split: the unedited model's row (unless ``unedited`` is false), each heretic
    trial's, then each of steer's edits (--steer run-time recipes, --baked weight
    directories). A row named in ``kept`` (an earlier run's, see :func:`kept_rows`) is taken
    from there instead of measured again."""
    kept = kept or {}

    @functools.cache
    def evaluator() -> Callable[..., RateReport]:
        """The base model's continuations, once, when a row is measured."""
        return timed(
            seconds,
            "base_continuations",
            lambda: rate_evaluator(
                handle,
                *test,
                matcher=is_refusal,
                lengths=args.lengths,
                kl_tokens=args.kl_tokens,
                batch_size=args.eval_batch_size,
            ),
        )

    def evaluate(edits: Sequence[Any] = (), edited_handle: ModelHandle | None = None) -> Any:
        return evaluator()(edits, edited_handle=edited_handle)

    def row(name: str, side: str, measure: Callable[[], RateReport]) -> dict[str, Any]:
        if name in kept:
            _log(f"keeping {name}'s row from --keep-rows")
            return dict(kept[name])
        _log(f"evaluating {name} on the test split")
        return _row(name, side, timed(seconds, f"evaluate_{name.removeprefix('steer ')}", measure))

    def weights(directory: str) -> Callable[[], RateReport]:
        return lambda: evaluate(edited_handle=load_model(directory))

    rows = []
    if unedited:
        rows.append(row("unedited", "unedited", evaluate))
    if trials and unedited:
        first = trials[0]
        rows[0][HERETIC_REFUSALS] = f"{first['base_refusals']} / {first['n_bad_prompts']}"
    for trial in trials:
        name = f"heretic trial {trial['trial']}"
        measured = row(name, "heretic", weights(trial["dir"]))
        measured[HERETIC_REFUSALS] = f"{trial['refusals']} / {trial['n_bad_prompts']}"
        measured[HERETIC_KL] = trial["kl_divergence"]
        rows.append(measured)
    for name, recipe in args.steer:
        edits = recipe_interventions(recipe, handle)
        rows.append(row(f"steer {name}", "steer", lambda e=edits: evaluate(e)))
    for name, directory in args.baked:
        rows.append(row(f"steer {name}", "steer", weights(directory)))
    return rows


def kept_rows(
    path: str, test: tuple[list[str], list[str]], args: argparse.Namespace
) -> tuple[dict[str, dict[str, Any]], dict[str, float]]:
    """--keep-rows: the test rows of an earlier record (FILE's last line) by name, and the
    seconds each one's evaluation took there (where it says), after checking that it measured
    the same model, test split sizes, lengths and KL tokens."""
    record = json.loads(Path(path).read_text().strip().splitlines()[-1])
    if "test" not in record:
        raise SystemExit(f"--keep-rows: {path} has no test rows (--evaluate)")
    theirs = (record["model"], record["test"][0]["n"], record["n_harmless_test"])
    theirs += (tuple(record["lengths"]), record["kl_tokens"])
    ours = (args.model, len(test[0]), len(test[1]), tuple(args.lengths), args.kl_tokens)
    if theirs != ours:
        raise SystemExit(
            f"--keep-rows: {path} measured (model, harmful, harmless, lengths, KL tokens) "
            f"{theirs}, this run {ours}"
        )
    spent = dict(record.get("seconds", {}))
    for added in record.get("added", []):
        spent |= added.get("seconds", {})
    rows = {row["model"]: row for row in record["test"]}
    keys = {name: f"evaluate_{name.removeprefix('steer ')}" for name in rows}
    return rows, {name: spent[key] for name, key in keys.items() if key in spent}


def _row(name: str, side: str, report: RateReport) -> dict[str, Any]:
    row: dict[str, Any] = {"model": name, "_side": side}
    for entry in report.by_length:
        row[f"rate @{entry.tokens}"] = f"{entry.rate:.3f} [{entry.low:.3f}, {entry.high:.3f}]"
        row[f"_rate@{entry.tokens}"] = entry.rate
    row["first-token KL"] = report.kl_first_token
    row["multi-token KL"] = report.kl_multi_token
    row["n"] = report.n
    return row


def beats(rows: Sequence[dict[str, Any]], tokens: int) -> dict[str, list[str]]:
    """For each of steer's rows, the heretic trials it beats on both axes: a strictly lower
    refusal rate at ``tokens`` and a strictly lower first-token KL."""
    key = f"_rate@{tokens}"
    heretic = [row for row in rows if row["_side"] == "heretic"]
    return {
        row["model"]: [
            other["model"]
            for other in heretic
            if row[key] < other[key] and row["first-token KL"] < other["first-token KL"]
        ]
        for row in rows
        if row["_side"] == "steer"
    }


def front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point is at least as good as on both axes (lower is better), sorted
    by the first axis."""
    kept: list[tuple[float, float]] = []
    for x, y in sorted(set(points)):
        if not kept or y < kept[-1][1]:
            kept.append((x, y))
    return kept


def write_plot(rows: Sequence[dict[str, Any]], lengths: Sequence[int], path: Path) -> Path:
    """Test refusal rate at the longest length against first-token and multi-token KL: one
    point per model (heretic's TPE trials as triangles, where rows name their sampler), each
    side's front as a line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.5))
    FigureCanvasAgg(figure)
    key = f"_rate@{max(lengths)}"
    styles = {"unedited": ("k", "s"), "heretic": ("tab:orange", "o"), "steer": ("tab:blue", "D")}
    for axes, kl in zip(figure.subplots(1, 2), ("first-token KL", "multi-token KL"), strict=True):
        for side, (colour, marker) in styles.items():
            points = [(row[kl], row[key]) for row in rows if row["_side"] == side]
            if not points:
                continue
            if side != "unedited":
                axes.plot(*zip(*front(points), strict=True), color=colour, linewidth=1)
            for sampler in ("", "random", "TPE"):
                chosen = [
                    (row[kl], row[key])
                    for row in rows
                    if row["_side"] == side and row.get(HERETIC_SAMPLER, "") == sampler
                ]
                if chosen:
                    axes.scatter(
                        *zip(*chosen, strict=True),
                        color=colour,
                        marker="^" if sampler == "TPE" else marker,
                        label=f"{side} ({sampler})" if sampler else side,
                    )
        for row in rows:
            label = row["model"].removeprefix("heretic ")
            axes.annotate(
                label, (row[kl], row[key]), xytext=(4, 4), textcoords="offset points", fontsize=6
            )
        axes.set_xscale("symlog", linthresh=1e-3)
        axes.set_xlabel(f"{kl} (harmless test prompts)")
        axes.set_ylabel(f"refusal rate @{max(lengths)} tokens (harmful test prompts)")
        axes.legend(fontsize=7)
    figure.suptitle("heretic's Pareto-front trials and steer's edits, measured by steer")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return path


def _summary(record: dict[str, Any]) -> str:
    """Which of steer's points beat every heretic point, and the two wall times."""
    heretic = [row for row in record["test"] if row["_side"] == "heretic"]
    won = [
        name for name, beaten in record["beats"].items() if heretic and len(beaten) == len(heretic)
    ]
    best = ", ".join(
        f"{name} beats {len(b)} of {len(heretic)}" for name, b in record["beats"].items()
    )
    wall, steer = record["heretic_seconds"], record["steer_seconds"]
    times = f"heretic {wall:.0f} s" if wall is not None else "heretic's time not measured"
    if wall is not None and record["heretic_stopped"]:
        times += f" (stopped there, after {record['completed_trials']} trials)"
    if steer is not None:
        how = "measured here" if record.get("steer_made_here") else "as given by --steer-seconds"
        times += f", steer {steer:.0f} s ({how})"
        if wall:
            times += f" ({steer / wall:.2f} of heretic's)"
    verdict = (
        f"{', '.join(won)} beat{'s' if len(won) == 1 else ''} every heretic point"
        if won
        else "No steer point beats every heretic point"
    )
    return (
        f"{verdict} on both axes (a strictly lower refusal rate at {max(record['lengths'])} "
        f"tokens and a strictly lower first-token KL){': ' + best if best else ''}. "
        f"Time to make the edits: {times}."
    )


def _trials(record: dict[str, Any]) -> str:
    done, asked, startup = record["completed_trials"], record["trials"], record["startup_trials"]
    text = f"{done} trials"
    if record["heretic_stopped"]:
        text += f" completed of {asked} asked (stopped early)"
    if done <= startup:
        text += f", all of them random start-up trials (TPE starts after {startup})"
    else:
        text += f", the first {startup} random start-up trials, then TPE"
    resumes = record.get("heretic_resumes") or []
    if resumes:
        text += f", in {1 + len(resumes)} sessions (stopped by a time limit, then resumed"
        if done < asked and not record["heretic_stopped"]:
            text += f"; heretic counts the trials a time limit cut off among its {asked}"
        text += ")"
    return text


def _load(record: dict[str, Any]) -> str:
    if "load_average" not in record:
        return ""
    before, after = record["load_average"]
    return f" (load average {before} before the run, {after} after heretic)"


def _steer_maker(record: dict[str, Any]) -> str:
    if record.get("steer_made_here"):
        return f"made here by `steer directions gate --compute {' '.join(MAKE_STEER_FLAGS)}`"
    return record.get("steer_made_by") or "scripts/eval_gated.py"


def _heretic_times(record: dict[str, Any]) -> str:
    """Where heretic's time went, as its study recorded it ('' for a study without times)."""
    trials = record.get("heretic_trial_seconds")
    if not trials:
        return ""
    ordered = sorted(trials)
    text = (
        f" heretic's {len(trials)} trials took {sum(trials):.0f} s together (median "
        f"{statistics.median(ordered):.0f} s, {ordered[0]:.0f}-{ordered[-1]:.0f} s)"
    )
    setup = record.get("heretic_setup_seconds")
    if setup is None:
        return text + "."
    text += f"; {setup:.0f} s passed before its first trial (loading, refusal directions)."
    steer = record.get("steer_seconds")
    if steer is not None:
        done = sum(1 for end in itertools.accumulate(trials, initial=setup) if end <= steer) - 1
        text += f" At steer's {steer:.0f} s heretic had completed {max(done, 0)} trials."
    if record["heretic_stopped"]:
        full = setup + record["trials"] * statistics.median(ordered)
        text += (
            f" Its {record['trials']} asked trials would take about {full:.0f} s at that "
            f"median (an extrapolation, not measured)"
        )
        text += f", steer's {steer / full:.3f} of it." if steer is not None else "."
    elif record.get("heretic_resumes"):
        one = setup + sum(trials)
        text += (
            f" In one session (its first start-up and its completed trials, without the "
            f"repeated start-up and the trial the time limit cut off) that is {one:.0f} s"
        )
        text += f", steer's {steer / one:.3f} of it." if steer is not None else "."
    return text


def with_sampler(rows: Sequence[dict[str, Any]], startup: int) -> list[dict[str, Any]]:
    """Each heretic row with the sampler that proposed its trial: heretic numbers its trials
    from 1, and its TPE sampler proposes every trial after the first ``startup`` random ones."""
    marked = []
    for row in rows:
        if row["_side"] == "heretic":
            number = int(row["model"].rsplit(" ", 1)[-1])
            row = row | {HERETIC_SAMPLER: "random" if number <= startup else "TPE"}
        marked.append(row)
    return marked


def markdown(record: dict[str, Any], rows: Sequence[dict[str, Any]], command: str) -> str:
    """The section, from the record and its test rows (marked by :func:`with_sampler`)."""
    rates = [f"rate @{tokens}" for tokens in record["lengths"]]
    columns = ["model", *rates, "first-token KL", "multi-token KL", "n"]
    columns += [HERETIC_SAMPLER, HERETIC_REFUSALS, HERETIC_KL]
    sizes = record["prompts"]
    times = ", ".join(f"{k} {v:.0f} s" for k, v in record["seconds"].items())
    steer = [row["model"] for row in rows if row["_side"] == "steer"]
    return "\n".join(
        [
            "## heretic 1.4 beside steer, on the same model and prompts",
            "",
            f"`{record['heretic']}` on `{record['model']}`: {_trials(record)}; "
            f"seed {record['seed']}, float32 on the CPU. Its refusal directions come from "
            f"recipes/refusal.toml's train split ({sizes['bad-prompts']} harmful, "
            f"{sizes['good-prompts']} harmless prompts), its per-trial refusal count and "
            f"first-token KL from the validation split ({sizes['bad-evaluation-prompts']} / "
            f"{sizes['good-evaluation-prompts']}); system prompt {record['system_prompt']!r}, "
            "otherwise heretic's defaults (100-token replies, its own refusal markers). "
            "Each trial on its Pareto front is saved as heretic saves a merged model. "
            f"steer's edits ({', '.join(steer) or 'none'}) were chosen on the same train and "
            f"validation splits ({_steer_maker(record)}). Every row is measured by steer's "
            "evaluator (no system prompt) on the held-out test split, once "
            f"(n = {rows[0]['n']} harmful; greedy, refusal phrase matcher over each reply's "
            f"first {', '.join(str(n) for n in record['lengths'])} tokens with Wilson 95% "
            f"intervals; KL on {record['n_harmless_test']} harmless test prompts, multi-token "
            f"over the base model's first {record['kl_tokens']} tokens).",
            "",
            table(rows, columns),
            "",
            _summary(record),
            "",
            f"![refusals against KL, both fronts]({Path(record['plot']).name})",
            "",
            f"Wall times on {record['machine']}{_load(record)}: {times}.{_heretic_times(record)}",
            "",
            *command_block(command),
            *_sessions(record),
            *_added(record),
        ]
    )


def _sessions(record: dict[str, Any]) -> list[str]:
    """For a run resumed with --resume: heretic's sessions and their commands, and the rows this
    run kept from an earlier record (--keep-rows) instead of measuring them again."""
    lines: list[str] = []
    resumes = record.get("heretic_resumes") or []
    if resumes:
        first = record.get("heretic_command") or "(its command was not recorded)"
        lines += ["", "heretic's first session ran as", "", "```", first, "```"]
    for resume in resumes:
        setup = resume["setup_seconds"]
        before = f", {setup:.0f} s of it before its first trial" if setup is not None else ""
        lines += ["", f"and was resumed ({resume['seconds']:.0f} s{before}) as", ""]
        lines += ["```", resume["command"], "```"]
    kept = record.get("kept_rows")
    if kept:
        shown = [
            f"{name} ({spent:.0f} s there)" if spent is not None else name
            for name, spent in kept["rows"].items()
        ]
        lines += [
            "",
            f"Rows kept from an earlier record of the same study and test split "
            f"(`--keep-rows {kept['from']}`; measured the same way, not again here): "
            f"{', '.join(shown)}.",
        ]
    return lines


def _added(record: dict[str, Any]) -> list[str]:
    """The closing lines for rows a later --from-record run measured and added."""
    lines: list[str] = []
    for added in record.get("added", []):
        made = f" ({added['made_by']})" if added.get("made_by") else ""
        lines += ["", f"Added afterwards, measured the same way: {', '.join(added['rows'])}{made}."]
        lines += ["", *command_block(added["command"])]
    return lines


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


#: what ``--make-steer`` runs after ``steer directions gate ARTIFACT --compute``: the gate of
#: docs/directions.md ("heretic"), every other flag at its default
MAKE_STEER_FLAGS = ("--condition", "direction,discriminant", "--summed")


def steer_gate(model: str, recipe: str, out: Path) -> tuple[Path, dict[str, Any]]:
    """steer's gated refusal edit from scratch, as a user makes it: ``steer directions gate
    OUT/direction --compute`` on ``model`` and ``recipe`` into OUT/gate with
    :data:`MAKE_STEER_FLAGS`, in its own process; (the recipe it wrote, the JSON report it
    printed). Its progress goes to this process's stderr."""
    command = [
        sys.executable, "-m", "steer", "directions", "gate", str(out / "direction"), "--compute",
        "--model", model, "--recipe", recipe, "--out", str(out / "gate"), *MAKE_STEER_FLAGS,
    ]  # fmt: skip
    _log("steer: " + " ".join(command[1:]))
    done = subprocess.run(
        command, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True
    )
    report = json.loads(done.stdout.strip().splitlines()[-1])
    return Path(report["recipe"]), report


def ungated_copy(recipe: Path) -> Path:
    """The gated recipe's edits acting everywhere (what ``steer bake --ungated`` bakes), as
    RECIPE's sibling ``always.toml``."""
    path = recipe.with_name("always.toml")
    path.write_text(recipe_to_toml(load_edit_recipe(recipe).ungated()))
    return path


def heretic_run(work: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """heretic's wall seconds and whether it was stopped early, as its run in WORK recorded
    them (a --resume session's seconds added to the first run's; stopped as the last session
    was), with the seconds before its first trial started (model load, refusal directions) and
    each completed trial's seconds, as its study recorded them. A run stopped from outside (no
    seconds recorded) counts from its start to its last completed trial. Each resumed session:
    its seconds, the seconds before its first trial and its command."""
    path = work / "heretic-run.json"
    run: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    sessions = [run, *run.get("resumes", [])] if run else []
    for session in sessions:
        if "seconds" not in session and "started" in session:
            session |= {"seconds": manifest["last_complete"] - session["started"], "stopped": True}
    setup = None
    if "started" in run and "first_start" in manifest:
        setup = manifest["first_start"] - run["started"]
    starts = manifest.get("trial_starts", [])

    def before_first_trial(started: float) -> float | None:
        first = min((start for start in starts if start >= started), default=None)
        return None if first is None else first - started

    resumes = [
        {
            "seconds": session["seconds"],
            "setup_seconds": before_first_trial(session["started"]),
            "command": session.get("command"),
        }
        for session in sessions[1:]
    ]
    return {
        "seconds": sum(session["seconds"] for session in sessions) if sessions else None,
        "stopped": sessions[-1].get("stopped", False) if sessions else False,
        "setup_seconds": setup,
        "trial_seconds": manifest.get("trial_seconds"),
        "resumes": resumes,
        "command": run.get("command"),
    }


def main() -> int:
    args = _parser().parse_args()
    if args.from_record:
        record = json.loads(Path(args.from_record).read_text().strip().splitlines()[-1])
        if args.steer or args.baked:
            record = add_rows(record, args)
            emit(record)
        return render(record)
    command, load_before = command_line(), os.getloadavg()[0]
    work = Path(args.work).resolve()  # heretic and the driver run with WORK as cwd
    work.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    handle = timed(seconds, "load_model", lambda: load_model(args.model))
    splits = contrast_splits(load_direction_recipe(args.recipe))
    if args.make_steer:
        made, _report = timed(
            seconds, "steer", lambda: steer_gate(args.model, args.recipe, work / "steer")
        )
        args.steer += [("always on", str(ungated_copy(made))), ("gated", str(made))]
        args.steer_seconds = seconds["steer"]
    timed(seconds, "venv", lambda: ensure_venv(Path(args.venv)))
    journal = run_heretic(args, handle, splits, work, seconds)
    manifest = timed(seconds, "export", lambda: export_trials(args, journal, work))
    trials, settings = manifest["trials"], manifest["settings"]
    run = heretic_run(work, manifest)
    record: dict[str, Any] = {
        "script": "compare_heretic",
        "heretic": HERETIC,
        "model": args.model,
        "hf_dir": settings["model"],
        "trials": settings["n_trials"],
        "seed": settings["seed"],
        "startup_trials": settings["n_startup_trials"],
        "batch_size": settings["batch_size"],
        "system_prompt": settings["system_prompt"],
        "prompts": dataset_sizes(work),
        "completed_trials": manifest["completed_trials"],
        "heretic_seconds": run["seconds"],
        "heretic_stopped": run["stopped"],
        "heretic_setup_seconds": run["setup_seconds"],
        "heretic_trial_seconds": run["trial_seconds"],
        "heretic_resumes": run["resumes"],
        "heretic_command": run["command"],
        "steer_seconds": args.steer_seconds,
        "steer_made_here": args.make_steer,
        "steer_made_by": None if args.make_steer else args.steer_made_by,
        "exported": [
            {k: t[k] for k in ("trial", "dir", "refusals", "n_bad_prompts", "kl_divergence")}
            | ({"verify": t["verify"]} if "verify" in t else {})
            for t in trials
        ],
        "seconds": seconds,
        "machine": machine(),
    }
    record["load_average"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]  # after heretic
    if args.evaluate:
        test = test_prompts(splits, args.max_test)
        kept, spent = kept_rows(args.keep_rows, test, args) if args.keep_rows else ({}, {})
        rows = evaluate_models(handle, trials, test, args, seconds, kept=kept)
        if kept:
            used = {row["model"]: spent.get(row["model"]) for row in rows if row["model"] in kept}
            record["kept_rows"] = {"from": args.keep_rows, "rows": used}
        record |= {"lengths": list(args.lengths), "kl_tokens": args.kl_tokens}
        record |= {"n_harmless_test": len(test[1]), "test": rows}
        record["beats"] = beats(rows, max(args.lengths))
        record["command"] = command
        publish(record, DOCS if not args.no_docs else work, docs=not args.no_docs)
    emit(record)
    return 0


def test_prompts(splits: dict[str, Any], cap: int) -> tuple[list[str], list[str]]:
    """The recipe's harmful and harmless test prompts, the first ``cap`` of each (0: all)."""
    harmful, harmless = splits["positive"].test, splits["negative"].test
    return list(harmful)[: cap or None], list(harmless)[: cap or None]


def add_rows(record: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """--from-record with --steer / --baked: those edits measured on the record's model and
    test split, at its lengths and KL tokens, as rows added to the record (which says so)."""
    if "test" not in record:
        raise SystemExit("--from-record: the record has no test rows to add to (--evaluate)")
    handle = load_model(record["model"])
    test = test_prompts(contrast_splits(load_direction_recipe(args.recipe)), args.max_test)
    if (len(test[0]), len(test[1])) != (record["test"][0]["n"], record["n_harmless_test"]):
        raise SystemExit(
            f"--from-record: {args.recipe} gives {len(test[0])} / {len(test[1])} test prompts, "
            f"the record {record['test'][0]['n']} / {record['n_harmless_test']}"
        )
    args.lengths, args.kl_tokens = tuple(record["lengths"]), record["kl_tokens"]
    seconds: dict[str, float] = {}  # this run's, kept apart from the record's
    rows = evaluate_models(handle, [], test, args, seconds, unedited=False)
    added = {"command": command_line(), "rows": [row["model"] for row in rows]}
    added |= {"made_by": args.steer_made_by, "seconds": seconds}
    record["test"] = [row for row in record["test"] if row["model"] not in added["rows"]] + rows
    record["beats"] = beats(record["test"], max(args.lengths))
    record["added"] = [*record.get("added", []), added]
    return record


def render(record: dict[str, Any]) -> int:
    """--from-record: the plot and docs/results.md's section from a run's JSON line."""
    if "test" not in record or "command" not in record:
        raise SystemExit("--from-record: the record has no test rows or no command (--evaluate)")
    publish(record, DOCS, docs=True)
    return 0


def publish(record: dict[str, Any], plot_dir: Path, docs: bool) -> None:
    """The plot (PLOT_DIR/heretic-test.png, its path kept in the record) and, with ``docs``,
    docs/results.md's section, from a record with test rows, each heretic row marked with its
    sampler once for both."""
    rows = with_sampler(record["test"], record["startup_trials"])
    record["plot"] = str(write_plot(rows, record["lengths"], plot_dir / "heretic-test.png"))
    if docs:
        write_section("results.md", "heretic", markdown(record, rows, record["command"]))


if __name__ == "__main__":
    sys.exit(main())
