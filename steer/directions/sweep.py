"""Strength sweep: what a vector does at each strength, and where the model stays coherent.

For each strength the vector is added (at its artifact's hooks) while the model reads the neutral
prompts followed by the unsteered model's own greedy reply to each (``tokens`` tokens,
teacher-forced). One forward pass per strength gives:

* ``kl_first_token``: mean ``KL(P_unsteered || P_steered)`` of the first reply token (nats);
* ``perplexity``: of the unsteered reply under the steered model (``exp`` of the mean negative
  log-likelihood per token); gibberish sends it up by orders of magnitude;
* ``p_positive`` / ``p_negative``: next-token probability of the target words of each side,
  summed over the words and averaged over the reply positions;
* ``effect``: ``log(p_positive / p_negative)`` minus its value at strength 0, so positive means
  "more like the positive examples" and 0 means no change.

Target words are the user's (``--positive-words``), else the words that most tell the two
sides' examples apart (in most of one side's examples, in few of the other's), each counted
through its single-token spellings (``" word"``, ``" Word"``, ``"Word"``;
:mod:`steer.directions.words`).

The suggested range is the widest run of strengths around 0, on each side, whose first-token KL
stays at most ``kl_bound`` (default 0.5 nats: on SmolLM2-135M the cheerful/gloomy vector still
writes fluent text at KL 0.4-0.7 and emoji strings or assistant boilerplate from about 0.7;
docs/directions.md, "Steering vectors").
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from steer.activations import forward
from steer.directions.recipe import SweepSection
from steer.directions.words import TargetWords, word_ids
from steer.errors import InvalidArgumentError
from steer.hooks import resid_post_hooks
from steer.interventions import Add, Intervention
from steer.models import ModelHandle
from steer.vectors import SteeringVector

#: strengths measured when none are given (units: the artifact's; typical residual norms for
#: steering vectors)
DEFAULT_STRENGTHS = (-1.0, -0.5, -0.4, -0.3, -0.2, -0.1, 0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 1.0)


@dataclass(frozen=True)
class SweepOptions:
    strengths: tuple[float, ...] = DEFAULT_STRENGTHS
    kl_bound: float = 0.5
    tokens: int = 16
    batch_size: int = 16
    #: measure outwards from 0 and stop a side at its first strength over the bound
    stop_early: bool = False


def options_from(section: SweepSection, *, stop_early: bool = True) -> SweepOptions:
    return SweepOptions(
        strengths=section.strengths or DEFAULT_STRENGTHS,
        kl_bound=section.kl_bound,
        tokens=section.tokens,
        stop_early=stop_early and not section.strengths,
    )


@dataclass(frozen=True)
class SweepRow:
    strength: float
    kl_first_token: float
    perplexity: float
    p_positive: float = math.nan
    p_negative: float = math.nan
    effect: float = math.nan
    coherent: bool = True


@dataclass
class SweepResult:
    rows: list[SweepRow]
    kl_bound: float
    suggested: tuple[float, float]
    words: TargetWords
    prompts: int
    tokens: int
    notes: list[str] = field(default_factory=list)
    #: what a strength of 1 is (the x axis of the plot)
    unit: str = "typical residual norms"

    def record(self) -> dict[str, Any]:
        """What ``steer.json`` keeps of the sweep."""
        return {
            "suggested_strengths": list(self.suggested),
            "sweep": {
                "table": "sweep.csv",
                "plot": "sweep.png",
                "kl_bound": self.kl_bound,
                "coherent": f"mean first-token KL on {self.prompts} neutral prompts <= "
                f"{self.kl_bound}",
                "suggested": list(self.suggested),
                "prompts": self.prompts,
                "tokens": self.tokens,
                "words": self.words.record(),
                "rows": [_json_row(row) for row in self.rows],
            },
        }


def _json_row(row: SweepRow) -> dict[str, Any]:
    return {
        k: None if isinstance(v, float) and math.isnan(v) else v for k, v in asdict(row).items()
    }


def added(vector: SteeringVector, hooks: Sequence[str], strength: float) -> tuple[Add]:
    return (Add(vector, strength, hooks=tuple(hooks)),)


def run(
    handle: ModelHandle,
    vector: SteeringVector,
    prompts: Sequence[Sequence[int]],
    options: SweepOptions,
    words: TargetWords,
    *,
    hooks: Sequence[str] | None = None,
    replies: Sequence[Sequence[int]] | None = None,
    progress: Callable[[str, float], None] = lambda message, fraction: None,
    check: Callable[[], None] = lambda: None,
) -> SweepResult:
    """Measure ``vector`` at each strength on ``prompts`` (chat-encoded neutral prompts) and
    ``replies``, the unsteered model's greedy replies to them (generated when not given).
    ``hooks`` default to each layer's ``blocks.L.hook_resid_post``."""
    if hooks is None:
        hooks = list(resid_post_hooks(vector.layers))
    if replies is None:
        from steer.directions.evaluate import generate

        progress("unsteered replies to the neutral prompts", 0.0)
        completions = generate(
            handle, prompts, max_new_tokens=options.tokens, batch_size=options.batch_size
        )
        replies = [ids for ids, _text in completions]
    # a reply the model ended at once is read as one pad token
    replies = [list(ids) or [handle.pad_token_id] for ids in replies]
    base = _measure(handle, prompts, replies, (), words, options.batch_size)
    measured: dict[float, _Measure] = {0.0: base}
    for side in (1.0, -1.0):
        for strength in sorted((s for s in options.strengths if s * side > 0), key=abs):
            check()
            progress(f"strength {strength:+g}", len(measured) / (len(options.strengths) + 1))
            steered = added(vector, hooks, strength)
            measured[strength] = _measure(
                handle, prompts, replies, steered, words, options.batch_size
            )
            if options.stop_early and _kl(base, measured[strength]) > options.kl_bound:
                break
    rows = [_row(strength, base, measured[strength], options) for strength in sorted(measured)]
    return _result(rows, options, words, len(prompts))


def _result(
    rows: list[SweepRow], options: SweepOptions, words: TargetWords, prompts: int
) -> SweepResult:
    notes = []
    if not words.usable:
        notes.append(
            "no target words (none given, and no single-token words tell the examples apart): "
            "the sweep reports KL and perplexity only"
        )
    suggested = suggested_range(rows)
    if suggested == (0.0, 0.0):
        notes.append(
            f"every strength measured costs a first-token KL over {options.kl_bound}: try "
            "smaller strengths"
        )
    return SweepResult(rows, options.kl_bound, suggested, words, prompts, options.tokens, notes)


def suggested_range(rows: Sequence[SweepRow]) -> tuple[float, float]:
    """(low, high): on each side of 0, the strength furthest out before the first incoherent
    one (0 when the first one is)."""
    ends = []
    for side in (-1.0, 1.0):
        end = 0.0
        for row in sorted(
            (r for r in rows if r.strength * side > 0), key=lambda r: abs(r.strength)
        ):
            if not row.coherent:
                break
            end = row.strength
        ends.append(end)
    return ends[0], ends[1]


@dataclass(frozen=True)
class _Measure:
    #: (n, vocab) log-probabilities of the first reply token
    first: torch.Tensor
    #: mean negative log-likelihood per reply token
    nll: float
    p_positive: float
    p_negative: float


def _measure(
    handle: ModelHandle,
    prompts: Sequence[Sequence[int]],
    replies: Sequence[Sequence[int]],
    steered: Sequence[Intervention],
    words: TargetWords,
    batch_size: int,
) -> _Measure:
    firsts, nll, count, positive, negative = [], 0.0, 0, 0.0, 0.0
    full = [list(p) + list(r) for p, r in zip(prompts, replies, strict=True)]
    # full-vocabulary logits at every position: one batch of 16 SmolLM2 rows is ~170 MB
    chunk = max(1, batch_size)
    for start in range(0, len(full), chunk):
        result = forward(
            handle,
            full[start : start + chunk],
            interventions=steered,
            logits="all",
            batch_size=chunk,
        )
        assert isinstance(result.logits, list)
        for row, prompt, reply in zip(
            result.logits,
            prompts[start : start + chunk],
            replies[start : start + chunk],
            strict=True,
        ):
            log_probs = torch.log_softmax(row[len(prompt) - 1 : -1].double(), dim=-1)
            firsts.append(log_probs[0])
            nll -= float(log_probs.gather(1, torch.tensor(list(reply))[:, None]).sum())
            count += len(reply)
            probs = log_probs.exp()
            positive += float(probs[:, list(words.positive_ids)].sum(-1).mean())
            negative += float(probs[:, list(words.negative_ids)].sum(-1).mean())
    n = len(full)
    return _Measure(torch.stack(firsts), nll / count, positive / n, negative / n)


def _kl(base: _Measure, steered: _Measure) -> float:
    kl = (base.first.exp() * (base.first - steered.first)).sum(-1).clamp_min(0.0)
    return float(kl.mean())


def _row(strength: float, base: _Measure, steered: _Measure, options: SweepOptions) -> SweepRow:
    kl = _kl(base, steered)
    effect = math.nan
    if min(base.p_positive, base.p_negative, steered.p_positive, steered.p_negative) > 0:
        effect = math.log(steered.p_positive / steered.p_negative) - math.log(
            base.p_positive / base.p_negative
        )
    usable = steered.p_positive > 0 or steered.p_negative > 0
    return SweepRow(
        strength=strength,
        kl_first_token=kl,
        perplexity=math.exp(steered.nll),
        p_positive=steered.p_positive if usable else math.nan,
        p_negative=steered.p_negative if usable else math.nan,
        effect=effect,
        coherent=kl <= options.kl_bound,
    )


# ------------------------------------------------------------------------------------ output

COLUMNS = ("strength", "effect", "p_positive", "p_negative", "kl_first_token", "perplexity")


def table(result: SweepResult) -> str:
    """The sweep as an aligned text table, the suggested range marked."""
    low, high = result.suggested
    lines = [" ".join(f"{c:>14}" for c in COLUMNS) + "  coherent"]
    for row in result.rows:
        values = [getattr(row, c) for c in COLUMNS]
        mark = "yes" if row.coherent else "no"
        if low <= row.strength <= high:
            mark += "  <- suggested"
        lines.append(" ".join(f"{v:>14.4g}" for v in values) + f"  {mark}")
    lines.append(
        f"suggested strengths {low:g} to {high:g} (first-token KL <= {result.kl_bound} on "
        f"{result.prompts} neutral prompts)"
    )
    return "\n".join(lines)


def write(directory: Path, result: SweepResult, *, title: str = "") -> dict[str, Any]:
    """Write ``sweep.csv`` and ``sweep.png`` into ``directory`` (each atomically); returns the
    metadata to record in ``steer.json``."""
    for name, writer in (("sweep.csv", _write_csv), ("sweep.png", _write_plot)):
        stem, suffix = name.split(".")
        temporary = directory / f".{stem}.tmp.{suffix}"
        writer(temporary, result, title)
        os.replace(temporary, directory / name)
    return result.record()


def _write_csv(path: Path, result: SweepResult, title: str) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*COLUMNS, "coherent", "suggested"])
        low, high = result.suggested
        for row in result.rows:
            values = ["" if math.isnan(v := getattr(row, c)) else f"{v:.6g}" for c in COLUMNS]
            writer.writerow([*values, int(row.coherent), int(low <= row.strength <= high)])


def _write_plot(path: Path, result: SweepResult, title: str) -> None:
    """Effect and KL against strength; the suggested range shaded, the KL bound dashed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4))
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    strengths = [row.strength for row in result.rows]
    axes.axvspan(*result.suggested, color="tab:green", alpha=0.12, label="suggested range")
    axes.plot(
        strengths,
        [r.kl_first_token for r in result.rows],
        "o-",
        color="tab:red",
        label="first-token KL (nats)",
    )
    axes.axhline(
        result.kl_bound,
        color="tab:red",
        linestyle="--",
        linewidth=1,
        label=f"KL bound {result.kl_bound}",
    )
    axes.set_xlabel(f"strength ({result.unit})")
    axes.set_ylabel("KL on neutral prompts")
    if result.words.usable:
        effect_axes = axes.twinx()
        effect_axes.plot(
            strengths,
            [r.effect for r in result.rows],
            "s-",
            color="tab:blue",
            label="effect: log-odds of target words vs strength 0",
        )
        effect_axes.set_ylabel("effect (log-odds shift)")
        effect_axes.legend(loc="upper right", fontsize=7)
    axes.legend(loc="upper left", fontsize=7)
    axes.set_title(title or "strength sweep")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def update_sidecar(directory: Path, record: dict[str, Any]) -> None:
    """Merge ``record`` into the artifact's ``steer.json`` (atomically)."""
    sidecar = directory / "steer.json"
    metadata = json.loads(sidecar.read_text())
    metadata.update(record)
    temporary = directory / ".steer.json.tmp"
    temporary.write_text(json.dumps(metadata, indent=2, sort_keys=True, default=str))
    os.replace(temporary, sidecar)


def sweep_artifact(
    handle: ModelHandle,
    directory: Path,
    neutral: Sequence[str],
    options: SweepOptions,
    *,
    words: tuple[Sequence[str], Sequence[str]] | None = None,
    system: str | None = None,
    progress: Callable[[str, float], None] = lambda message, fraction: None,
) -> SweepResult:
    """Sweep the artifact in ``directory`` (any vector artifact: added at its ``hooks``), write
    ``sweep.csv`` and ``sweep.png`` beside it and record the suggested range in its
    ``steer.json``. ``words`` default to the ones the artifact records, if any."""
    from steer.artifacts import load_vector
    from steer.text import encode_chat

    artifact = load_vector(directory, handle=handle)
    metadata = artifact.metadata
    hooks = list(metadata.get("hooks") or [])
    if not hooks and artifact.vector.shared is not None:
        raise InvalidArgumentError(
            f"{directory} holds one vector for every layer and names no hooks to add it at",
            field="artifact",
        )
    recorded = metadata.get("target_words") or {}
    given = words or (recorded.get("positive") or (), recorded.get("negative") or ())
    positive, positive_ids = word_ids(handle.tokenizer, list(given[0]))
    negative, negative_ids = word_ids(handle.tokenizer, list(given[1]))
    if words and not (positive_ids and negative_ids):
        raise InvalidArgumentError(
            "no word of one side is a single token for this model's tokenizer; give whole "
            "common words",
            field="negative_words" if positive_ids else "positive_words",
        )
    source = "given" if words else "recorded in the artifact"
    target = TargetWords(positive, negative, positive_ids, negative_ids, source)
    prompts = [encode_chat(handle, text, system) for text in neutral]
    result = run(
        handle, artifact.vector, prompts, options, target, hooks=hooks or None, progress=progress
    )
    if not metadata.get("normalization"):
        result.unit = "the artifact's own units"
    record = write(
        directory, result, title=f"{metadata.get('name') or directory.name}: strength sweep"
    )
    update_sidecar(directory, record)
    return result
