"""Save heretic's Pareto-front trials as HF model directories; runs inside heretic's own venv.

heretic 1.4 keeps its study in an Optuna journal (``CHECKPOINT_DIR/<model path>.jsonl``): the
settings it ran with (``response_prefix`` and ``batch_size`` already fixed, the seed drawn) as a
study attribute, and each trial's abliteration parameters, refusal count and KL divergence as
trial attributes. The refusal directions are not stored; heretic recomputes them on every start
(``run()`` in heretic/main.py). This driver does what heretic's interactive "save the model to
a local folder" with the "merge" strategy does, once per Pareto-front trial, with heretic's own
functions: load the settings from the study, ``Model(settings)``, the per-layer refusal
directions from the residual means of the bad and good prompts (orthogonalised to the good
direction when the settings say so, as ``run()`` does), then per trial ``reset_model``,
``abliterate``, ``get_merged_model`` and ``save_pretrained`` (model and tokenizer).
``--verify`` also re-scores every rebuilt trial with heretic's ``Evaluator`` (one extra trial's
worth of work each) and records the refusals and KL it measures beside the study's.

It writes ``OUT/trial-N`` (N: heretic's trial index) with a ``heretic-trial.json`` beside the
weights, and ``OUT/heretic-trials.json`` listing them, with the study's times (when its first
trial started, when its last completed, each completed trial's seconds and start); the last line of
stdout is that list as one JSON line. Run offline (HF_HUB_OFFLINE=1), from a directory without
a config.toml:

    /tmp/hvenv/bin/python scripts/heretic_driver.py --study WORK/checkpoints/X.jsonl --out WORK
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import torch
import torch.nn.functional as F
import transformers
from heretic.config import Settings
from heretic.evaluator import Evaluator
from heretic.model import AbliterationParameters, Model
from heretic.utils import get_trial_parameters, load_prompts, set_seed
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
from optuna.trial import FrozenTrial, TrialState


def load_study(path: Path) -> optuna.Study:
    """heretic's study, opened the way heretic opens it (a journal file with an open lock)."""
    backend = JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path)))
    return optuna.load_study(study_name="heretic", storage=JournalStorage(backend))


def pareto_front(study: optuna.Study) -> list[FrozenTrial]:
    """The trials heretic offers when it finishes: sorted by (refusals, KL), each kept when its
    KL is below every kept one's (heretic/main.py computes the front the same way)."""
    completed = [t for t in study.trials if t.state == TrialState.COMPLETE]
    ordered = sorted(
        completed, key=lambda t: (t.user_attrs["refusals"], t.user_attrs["kl_divergence"])
    )
    front, lowest = [], math.inf
    for trial in ordered:
        if trial.user_attrs["kl_divergence"] < lowest:
            lowest = trial.user_attrs["kl_divergence"]
            front.append(trial)
    return front


def refusal_directions(settings: Settings, model: Model) -> torch.Tensor:
    """Per-layer refusal directions, shape (layers + 1, d_model), row 0 the embeddings, as
    heretic 1.4's ``run()`` computes them inline (no function of heretic's to import): the unit
    difference of the bad and good prompts' residual means, made orthogonal to the unit good
    mean when the settings ask for it."""
    good_means = model.get_residuals_mean(load_prompts(settings, settings.good_prompts))
    bad_means = model.get_residuals_mean(load_prompts(settings, settings.bad_prompts))
    directions = F.normalize(bad_means - good_means, p=2, dim=1)
    if settings.orthogonalize_direction:
        good_directions = F.normalize(good_means, p=2, dim=1)
        projection = torch.sum(directions * good_directions, dim=1)
        directions = directions - projection.unsqueeze(1) * good_directions
        directions = F.normalize(directions, p=2, dim=1)
    return directions


def abliterate(model: Model, directions: torch.Tensor, trial: FrozenTrial) -> None:
    """heretic's ``reset_trial_model``: a clean model, then the trial's abliteration."""
    model.reset_model()
    parameters = {
        component: AbliterationParameters(**values)
        for component, values in trial.user_attrs["parameters"].items()
    }
    model.abliterate(directions, trial.user_attrs["direction_index"], parameters)


def save_trial(model: Model, settings: Settings, directory: Path) -> None:
    """heretic's "save the model to a local folder" with the merge strategy."""
    merged = model.get_merged_model()
    merged.save_pretrained(str(directory), max_shard_size=settings.max_shard_size)
    del merged
    model.tokenizer.save_pretrained(str(directory))
    if model.processor is not None:
        model.processor.save_pretrained(str(directory))


def trial_record(trial: FrozenTrial, directory: Path) -> dict[str, Any]:
    attrs = trial.user_attrs
    return {
        "trial": attrs["index"],
        "dir": str(directory),
        "refusals": attrs["refusals"],
        "n_bad_prompts": attrs["n_bad_prompts"],
        "base_refusals": attrs["base_refusals"],
        "kl_divergence": attrs["kl_divergence"],
        "direction_index": attrs["direction_index"],
        "parameters": attrs["parameters"],
        "shown_parameters": get_trial_parameters(trial),
        "optuna_params": trial.params,
    }


def export(study_path: Path, out: Path, verify: bool) -> list[dict[str, Any]]:
    study = load_study(study_path)
    settings = Settings.model_validate_json(study.user_attrs["settings"])
    front = pareto_front(study)
    if not front:
        raise SystemExit(f"{study_path} holds no completed trial (stopped too early?)")
    set_seed(settings.seed)
    model = Model(settings)
    directions = refusal_directions(settings, model)
    evaluator = Evaluator(settings, model) if verify else None
    records = []
    for trial in front:
        start = time.perf_counter()
        directory = out / f"trial-{trial.user_attrs['index']}"
        abliterate(model, directions, trial)
        record = trial_record(trial, directory)
        if evaluator is not None:
            _score, kl_divergence, refusals = evaluator.get_score()
            record["verify"] = {"refusals": refusals, "kl_divergence": kl_divergence}
        save_trial(model, settings, directory)
        record["export_seconds"] = round(time.perf_counter() - start, 1)
        (directory / "heretic-trial.json").write_text(json.dumps(record, indent=2) + "\n")
        records.append(record)
    completed = [t for t in study.trials if t.state == TrialState.COMPLETE]
    summary = {
        "study": str(study_path),
        "settings": json.loads(settings.model_dump_json()),
        "completed_trials": len(completed),
        "first_start": min(t.datetime_start.timestamp() for t in completed),
        "last_complete": max(t.datetime_complete.timestamp() for t in completed),
        "trial_seconds": [
            round((t.datetime_complete - t.datetime_start).total_seconds(), 1) for t in completed
        ],
        "trial_starts": [t.datetime_start.timestamp() for t in completed],
    }
    manifest = {**summary, "trials": records}
    (out / "heretic-trials.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return records


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", required=True, help="heretic's checkpoint journal (.jsonl)")
    parser.add_argument("--out", required=True, help="trial-N directories go here")
    parser.add_argument("--verify", action="store_true", help="re-score each rebuilt trial")
    args = parser.parse_args()
    # heretic's Settings parses sys.argv when constructed; keep ours away from it
    sys.argv = sys.argv[:1]
    torch.set_grad_enabled(False)
    transformers.logging.set_verbosity_error()
    records = export(Path(args.study), Path(args.out), args.verify)
    print(json.dumps({"trials": records}, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
