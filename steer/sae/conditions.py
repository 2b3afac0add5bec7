"""SAE features as gate conditions: a gate that fires where a feature is active.

:class:`FeatureCondition` is a :class:`~steer.gates.Gated` condition that reads feature ``k``
of an SAE at the SAE's hook point: the gate fires where ``encode(x)[k] > threshold`` (``<`` with
``below``), ``x`` the residual as it arrives there (before any op at that point edits it). The
SAE's own ``encode`` computes it, so the condition is the feature exactly as the SAE defines it
for every architecture SAELens runs (TopK's competition between features included); a threshold
of 0 fires wherever the feature fires at all. It works in every scope a projection does (token,
prompt, reply with "any" or "mean").

:func:`feature_scores` turns a gate's prompt reads (:func:`steer.calibration.read_prompts` at the
SAE's hook) into the :class:`~steer.calibration.GateScores` of one feature, so its threshold is
calibrated on train and reported on validation as a direction's is;
:func:`rank_features` ranks every feature of the SAE by how well it alone separates the train
prompts at a false-positive target, and :func:`choose_feature_gate` calibrates the best of them
(or the features named) on train and keeps the one that separates validation best, as
``steer directions gate --sae`` does. Where the reads know each prompt's form (one message, a
scene, a chat request: :attr:`~steer.calibration.PromptReads.forms`), both go by the form the
feature does worst in: a feature that marks a situation only when it is rendered as a scene
is no gate for a front end that sends one message.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from steer.calibration import GateCalibration, GateScores, PromptReads
from steer.errors import InvalidArgumentError
from steer.gates import BaseCondition
from steer.hooks import HookPoint, HookResolver
from steer.interventions import GateScope, ReadGate
from steer.limits import finite
from steer.sae.loading import SparseAutoencoder
from steer.sae.sliders import check_sae

__all__ = [
    "FeatureCondition",
    "FeatureGateChoice",
    "FeatureRank",
    "choose_feature_gate",
    "feature_scores",
    "form_rates",
    "rank_features",
]


@dataclass(frozen=True, eq=False)
class FeatureCondition(BaseCondition):
    """Fires where feature ``feature`` of ``sae`` has an activation above ``threshold`` at the
    SAE's hook point (below it with ``below``)."""

    sae: SparseAutoencoder
    feature: int
    threshold: float = 0.0
    below: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.sae, SparseAutoencoder):
            raise InvalidArgumentError(
                f"expected a SparseAutoencoder, got {type(self.sae).__name__}",
                field="condition.sae",
            )
        self.sae.check_feature(self.feature, "condition.feature")
        object.__setattr__(self, "threshold", finite(self.threshold, "condition.threshold"))

    @property
    def hooks(self) -> tuple[str, ...]:
        return (self.sae.hook_name,)

    def reads(
        self,
        gate: object,
        scope: GateScope,
        resolver: HookResolver,
        d_model: int,
        *,
        mean: bool = False,
    ) -> list[tuple[HookPoint, ReadGate]]:
        point = check_sae(self.sae, resolver, d_model, field="condition.sae")
        sae, feature = self.sae, self.feature

        def score(x_row: torch.Tensor) -> torch.Tensor:
            return sae.encode(x_row)[..., feature].to(x_row.device)

        read = ReadGate(gate, None, self.threshold, self.below, scope, mean=mean, score=score)
        return [(point, read)]


def feature_scores(
    reads: PromptReads, sae: SparseAutoencoder, feature: int, *, below: bool = False
) -> GateScores:
    """The :class:`GateScores` of a gate on ``feature`` from ``reads`` taken at the SAE's hook:
    each prompt's activation of the feature at its last token (for a reply window, the largest
    over the window, or with "mean" reads their mean), negated with ``below``."""
    sae.check_feature(feature)
    by_point = {point.name: point for point in reads.points}
    if sae.hook_name not in by_point:
        raise InvalidArgumentError(
            f"the reads are at {', '.join(by_point)}, not at the SAE's {sae.hook_name}",
            field="sae.hook_name",
        )
    sign = -1.0 if below else 1.0
    store = {}
    for key, by_hook in reads.read.items():
        values = sae.encode(by_hook[sae.hook_name])[..., feature].cpu() * sign
        if values.dim() == 2:
            values = values.mean(-1) if reads.reply_aggregate == "mean" else values.amax(-1)
        store[key] = _finite(values, key)
    return GateScores(
        sae.hook_name,
        below,
        store,
        reply_tokens=reads.reply_tokens,
        reply_aggregate=reads.reply_aggregate,
        quiet_sets=reads.quiet_sets.get("train.quiet", ()),
    )


@dataclass(frozen=True)
class FeatureRank:
    """One feature's separation of the train prompts at a false-positive target."""

    feature: int
    threshold: float
    true_positive_rate: float
    false_positive_rate: float
    #: the lowest true-positive rate over the prompt forms (= the pooled one without forms)
    worst_form_rate: float


def rank_features(
    reads: PromptReads, sae: SparseAutoencoder, *, target_fpr: float, k: int = 10
) -> list[FeatureRank]:
    """The ``k`` features of ``sae`` that separate the train prompts best on their own: each
    feature's threshold set as a gate's would be (the lowest with train FPR <= ``target_fpr``,
    as :func:`~steer.calibration.lowest_threshold` sets it), ranked by TPR - FPR with the TPR
    of the prompt form it is lowest in (``reads.forms``: a feature that marks the situation in
    a scene but not as one message is no gate for both), then by the lower FPR. Train only:
    the choice among them is validation's."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InvalidArgumentError(f"expected a whole number >= 1, got {k!r}", field="k")
    fire = _activations(reads, sae, "train.fire")
    quiet = _activations(reads, sae, "train.quiet")
    allowed = math.floor(target_fpr * quiet.shape[0] + 1e-9)
    if allowed >= quiet.shape[0]:
        raise InvalidArgumentError("the target allows every quiet prompt", field="target_fpr")
    thresholds = quiet.sort(0, descending=True).values[allowed]  # (features,)
    fired = fire > thresholds
    tpr = fired.double().mean(0)
    fpr = (quiet > thresholds).double().mean(0)
    worst = tpr.clone()
    for mask in _form_masks(reads, "train.fire").values():
        worst = torch.minimum(worst, fired[mask].double().mean(0))
    order = sorted(range(sae.num_features), key=lambda f: (-(worst[f] - fpr[f]), fpr[f], f))
    return [
        FeatureRank(f, float(thresholds[f]), float(tpr[f]), float(fpr[f]), float(worst[f]))
        for f in order[:k]
    ]


def form_rates(
    reads: PromptReads, scores: GateScores, threshold: float, split: str = "validation"
) -> dict[str, tuple[float, float]]:
    """{form: (TPR, FPR)} of the gate at ``threshold`` on ``split``'s prompts of each form
    (``reads.forms``; NaN where a form has no prompt on a side); empty without forms."""
    rates: dict[str, list[float]] = {}
    for side in ("fire", "quiet"):
        fires = torch.tensor(scores.fires(f"{split}.{side}", threshold), dtype=torch.float64)
        for form, mask in _form_masks(reads, f"{split}.{side}").items():
            rates.setdefault(form, [math.nan, math.nan])[side == "quiet"] = float(
                fires[mask].mean()
            )
    return {form: (pair[0], pair[1]) for form, pair in sorted(rates.items())}


def _form_masks(reads: PromptReads, key: str) -> dict[str, torch.Tensor]:
    """{form: the mask of ``key``'s prompts in it}; none without forms or with only one."""
    labels = reads.forms.get(key, ())
    if len(set(labels)) < 2:
        return {}
    return {form: torch.tensor([label == form for label in labels]) for form in set(labels)}


@dataclass(frozen=True)
class FeatureGateChoice:
    """The kept feature gate (``feature`` at ``calibration``) and every candidate's, with each
    candidate's validation rates by prompt form (``forms``: feature -> {form: (TPR, FPR)})."""

    feature: int
    calibration: GateCalibration
    candidates: tuple[tuple[int, GateCalibration], ...]
    forms: dict[int, dict[str, tuple[float, float]]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        def by_form(feature: int) -> dict[str, Any]:
            rates = {  # JSON has no NaN: a side without prompts of a form is null
                form: [None if math.isnan(rate) else rate for rate in pair]
                for form, pair in self.forms.get(feature, {}).items()
            }
            return {"validation_by_form": rates} if rates else {}

        return {
            "condition": "feature",
            "feature": self.feature,
            "kept": {**asdict(self.calibration), **by_form(self.feature)},
            "candidates": [{"feature": f, **asdict(c), **by_form(f)} for f, c in self.candidates],
        }


def choose_feature_gate(
    reads: PromptReads,
    sae: SparseAutoencoder,
    *,
    target_fpr: float,
    features: Sequence[int] = (),
    k: int = 20,
) -> FeatureGateChoice:
    """A gate on one feature of ``sae``: each of ``features`` (default: the ``k`` best by
    :func:`rank_features`, train only, those that separate the train prompts at all)
    calibrated on train at ``target_fpr``; kept, the one
    whose validation TPR - FPR is highest, the TPR of its worst prompt form (then the lower
    FPR; then the earlier candidate)."""
    candidates = list(features) or [
        rank.feature
        for rank in rank_features(reads, sae, target_fpr=target_fpr, k=k)
        if rank.worst_form_rate > rank.false_positive_rate  # one that separates at all
    ]
    if not candidates:
        raise InvalidArgumentError(
            f"no feature of the SAE fires on more of the train prompts it should fire on than "
            f"of those it should not, in every prompt form, at a false-positive rate <= "
            f"{target_fpr:g}",
            field="sae",
        )
    calibrated = []
    forms = {}
    for feature in candidates:
        scores = feature_scores(reads, sae, feature)
        calibration = scores.calibrate(target_fpr)
        calibrated.append((feature, calibration))
        forms[feature] = form_rates(reads, scores, calibration.threshold)

    def separation(candidate: tuple[int, GateCalibration]) -> tuple[float, float]:
        rates = candidate[1].validation
        by_form = [tpr for tpr, _fpr in forms[candidate[0]].values() if not math.isnan(tpr)]
        worst = min([rates.true_positive_rate, *by_form])
        return worst - rates.false_positive_rate, -rates.false_positive_rate

    feature, calibration = max(calibrated, key=separation)
    return FeatureGateChoice(feature, calibration, tuple(calibrated), forms)


def _activations(reads: PromptReads, sae: SparseAutoencoder, key: str) -> torch.Tensor:
    """(prompts, features) float32: every feature at each prompt's read (a window's largest)."""
    features = sae.encode(reads.read[key][sae.hook_name]).cpu()
    if features.dim() == 3:
        features = features.mean(1) if reads.reply_aggregate == "mean" else features.amax(1)
    return features


def _finite(values: torch.Tensor, key: str) -> list[float]:
    listed = values.tolist()
    for index, value in enumerate(listed):
        if not math.isfinite(value):
            raise InvalidArgumentError(
                f"the feature's activation is not finite ({value})", field=f"{key}[{index}]"
            )
    return listed
