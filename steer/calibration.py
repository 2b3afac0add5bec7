"""Calibrating a gate's threshold on contrast prompts: train chooses it, validation reports it.

:func:`calibrate_gate` reads the projection a prompt-scope gate decides on -- the residual at the
condition's hook, at the chat prompt's last token (the post-instruction position), onto the unit
direction -- for prompts the gate should fire on and prompts it should not. On the train split it
chooses the lowest threshold whose false-positive rate on the "should not fire" prompts is at most
``target_fpr``; on the validation split it measures the true- and false-positive rates that
threshold gives. It takes no test split: what a test split measures is chosen without it.
With ``reply_tokens`` K, the same for a reply-scope gate: each prompt's number is the largest
projection over the K positions that draw its first K greedy reply tokens (the prompt's last
token and the first K - 1 reply tokens, teacher-forced), or with ``reply_aggregate`` "mean"
their mean, as the engine reads them.

:func:`read_prompts` reads those residuals at several hooks in one pass and keeps them
(:class:`PromptReads`); any direction's projections follow from them (:class:`GateScores`), so
any false-positive target's threshold (``calibrate``) and any threshold's decisions (``fires``)
follow without another pass. :func:`gate_scores` is both steps in one call.
:meth:`PromptReads.condition` (and :func:`contrast_condition`) gives a gate a direction of its own
where the edit's direction is not what tells the prompts apart: the train prompts' last-token
mean it should fire on minus the one it should not (CAST), or that difference whitened by their
within-class covariance (Fisher's discriminant, its shrinkage cross-validated on train).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch

from steer.activations import KnownReads, read_last
from steer.discriminant import FOLDS, discriminant_direction
from steer.errors import InvalidArgumentError, SteerError
from steer.gates import Condition, check_reply_aggregate
from steer.hooks import HookPoint
from steer.models import ModelHandle
from steer.passes import reply_windows
from steer.text import encode_prompts
from steer.vectors import SteeringVector

__all__ = [
    "CONDITIONS",
    "ContrastPrompts",
    "GateCalibration",
    "GateScores",
    "Prompt",
    "PromptReads",
    "SplitRates",
    "calibrate_gate",
    "contrast_condition",
    "gate_scores",
    "lowest_threshold",
    "read_prompts",
    "summed_scores",
]

#: what a gate can read: the edit's own direction, CAST's contrast, Fisher's discriminant
CONDITIONS = ("direction", "contrast", "discriminant")


#: a user message, or a rendered prompt's token ids
Prompt = str | Sequence[int]


@dataclass(frozen=True)
class ContrastPrompts:
    """One split of prompts: those a gate should fire on, those it should not. Each is a user
    message (rendered with the chat template and the system prompt) or the token ids of a
    prompt already rendered (an RP scene, :func:`steer.rp.evaluate.reply_prompt`)."""

    fire: Sequence[Prompt]
    quiet: Sequence[Prompt]


@dataclass(frozen=True)
class SplitRates:
    """What a threshold does on one split."""

    true_positive_rate: float  # fraction of ``fire`` prompts it fires on
    false_positive_rate: float  # fraction of ``quiet`` prompts it fires on
    fire_count: int
    quiet_count: int


@dataclass(frozen=True)
class GateCalibration:
    """A calibrated threshold for a condition at ``hook`` (or the weighted sum over several
    hooks: :func:`summed_scores`), with the figures it was chosen by."""

    hook: str | tuple[str, ...]
    threshold: float
    below: bool
    target_fpr: float
    train: SplitRates
    validation: SplitRates
    weights: tuple[float, ...] = ()
    #: a reply-scope gate's window (0: a prompt-scope gate)
    reply_tokens: int = 0
    #: how a reply-scope gate combines the window (:data:`steer.gates.REPLY_AGGREGATES`)
    reply_aggregate: str = "any"

    def condition(self, direction: SteeringVector | torch.Tensor) -> Condition:
        """The gate's condition (``direction`` must be the one calibrated with)."""
        return Condition(self.hook, direction, self.threshold, self.below, self.weights)


@dataclass(frozen=True)
class GateScores:
    """The numbers a prompt-scope gate at ``hook`` decides on, for each prompt of each split:
    the projection at the prompt's last token (negated with ``below``, so a gate always fires
    above its threshold here). Any threshold's rates follow from them without another pass."""

    hook: str | tuple[str, ...]
    below: bool
    #: {"train.fire", "train.quiet", "validation.fire", "validation.quiet"}: projections
    read: dict[str, list[float]]
    #: with several hooks, each one's weight in the sum (:func:`summed_scores`)
    weights: tuple[float, ...] = ()
    #: a reply-scope gate's window (0: the prompt's last token)
    reply_tokens: int = 0
    #: how it combines the window: the projections' largest ("any") or their mean
    reply_aggregate: str = "any"
    #: each quiet train prompt's set (ordinary requests, RP situations, ...), for ``each_set``
    quiet_sets: tuple[str, ...] = ()

    def fires(self, key: str, threshold: float) -> list[bool]:
        """Whether the gate fires on each prompt of ``key`` (e.g. "validation.fire") at
        ``threshold`` (the threshold as a :class:`Condition` holds it)."""
        sign = -1.0 if self.below else 1.0
        return [p > sign * threshold for p in self.read[key]]

    def calibrate(self, target_fpr: float = 0.05, *, each_set: bool = False) -> GateCalibration:
        """The lowest threshold with train FPR <= ``target_fpr``; with ``each_set``, on the
        quiet train prompts of each of :attr:`quiet_sets` apart (so a large set of easy ones
        cannot spend the whole allowance on a small hard one); its train and validation rates."""
        target_fpr = _target(target_fpr)
        quiet = self.read["train.quiet"]
        threshold = lowest_threshold(quiet, target_fpr)
        if each_set and self.quiet_sets:
            if len(self.quiet_sets) != len(quiet):
                raise InvalidArgumentError(
                    f"expected a set for each of the {len(quiet)} quiet train prompts",
                    field="quiet_sets",
                )
            for name in dict.fromkeys(self.quiet_sets):
                own = [q for q, s in zip(quiet, self.quiet_sets, strict=True) if s == name]
                threshold = max(threshold, lowest_threshold(own, target_fpr))
        return self.at(threshold, target_fpr)

    def spread(self) -> tuple[float, float]:
        """The mean and standard deviation of the scores of the train prompts the gate should
        stay quiet on: the scale a threshold is compared across gates in (as
        :func:`summed_scores` weighs hooks); raises where they do not vary."""
        quiet = torch.tensor(self.read["train.quiet"], dtype=torch.float64)
        spread = quiet.std() if len(quiet) > 1 else torch.tensor(0.0)
        if not bool(torch.isfinite(spread)) or not float(spread) > 0.0:
            raise InvalidArgumentError(
                f"the projections at {self.hook} do not vary over the quiet train prompts",
                field="scores",
            )
        return float(quiet.mean()), float(spread)

    def at(self, threshold: float, target_fpr: float) -> GateCalibration:
        """The gate at ``threshold`` (on these scores, where the gate fires above it whatever
        ``below``), calibrated for ``target_fpr``: its train and validation rates."""
        read = self.read
        return GateCalibration(
            hook=self.hook,
            threshold=(-1.0 if self.below else 1.0) * threshold,
            below=self.below,
            target_fpr=target_fpr,
            train=_rates(read["train.fire"], read["train.quiet"], threshold),
            validation=_rates(read["validation.fire"], read["validation.quiet"], threshold),
            weights=self.weights,
            reply_tokens=self.reply_tokens,
            reply_aggregate=self.reply_aggregate,
        )


def summed_scores(scores: Sequence[GateScores]) -> GateScores:
    """One gate over all the hooks of ``scores`` (one hook each, the same ``below``): the sum of
    their projections, each divided by its standard deviation over the train prompts it should
    stay quiet on, so that every layer counts alike whatever the residual's scale there (a
    :class:`Condition` over several hooks with these weights reads the same sum)."""
    if len(scores) < 2 or any(not isinstance(s.hook, str) for s in scores):
        raise InvalidArgumentError("needs scores at two or more single hooks", field="scores")
    if len({s.below for s in scores}) != 1:
        raise InvalidArgumentError("the scores disagree about below", field="scores")
    weights = [1.0 / score.spread()[1] for score in scores]
    read = {
        key: [
            sum(w * s.read[key][i] for w, s in zip(weights, scores, strict=True))
            for i in range(len(scores[0].read[key]))
        ]
        for key in scores[0].read
    }
    hooks = tuple(str(s.hook) for s in scores)
    first = scores[0]
    return GateScores(
        hooks,
        first.below,
        read,
        tuple(weights),
        first.reply_tokens,
        first.reply_aggregate,
        first.quiet_sets,
    )


@dataclass(frozen=True)
class PromptReads:
    """The residual at each prompt's last chat token (what a prompt-scope gate decides on) at
    each hook, for each split's prompts, read in one pass. Any direction's :class:`GateScores`
    and any contrast condition follow from it without another pass."""

    points: tuple[HookPoint, ...]
    #: {"train.fire", "train.quiet", and with a validation split "validation.fire",
    #: "validation.quiet"}: {hook name: (prompts, d_model) float32, or with ``reply_tokens``
    #: (prompts, reply_tokens, d_model): the window's positions}
    read: dict[str, dict[str, torch.Tensor]]
    #: a reply-scope gate's window (0: the prompt's last token)
    reply_tokens: int = 0
    #: how a reply-scope gate combines the window (:data:`steer.gates.REPLY_AGGREGATES`)
    reply_aggregate: str = "any"
    #: {"train.quiet", "validation.quiet"}: each quiet prompt's set (:attr:`GateScores.quiet_sets`)
    quiet_sets: dict[str, tuple[str, ...]] = field(default_factory=dict)
    #: {"train.fire", ...}: each prompt's form ("message", a scene form, "played"), where known
    forms: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def scores(
        self, direction: SteeringVector | torch.Tensor, *, below: bool = False
    ) -> list[GateScores]:
        """:class:`GateScores` of ``direction`` at each hook (a :class:`SteeringVector` gives
        its vector at each hook's layer)."""
        if "validation.fire" not in self.read:
            raise InvalidArgumentError("these reads have no validation split", field="validation")
        d_model = int(self.read["train.fire"][self.points[0].name].shape[-1])
        try:
            units = [Condition(p.name, direction, 0.0).unit(p, d_model) for p in self.points]
        except SteerError as error:
            raise InvalidArgumentError(error.message, field="direction") from None
        sign = -1.0 if below else 1.0  # "below t" is "above -t" on the negated projections
        scores = []
        for point, unit in zip(self.points, units, strict=True):
            mean = self.reply_aggregate == "mean"
            store = {
                key: _projected(by_hook[point.name], unit * sign, point.name, key, mean=mean)
                for key, by_hook in self.read.items()
            }
            scores.append(
                GateScores(
                    point.name,
                    below,
                    store,
                    reply_tokens=self.reply_tokens,
                    reply_aggregate=self.reply_aggregate,
                    quiet_sets=self.quiet_sets.get("train.quiet", ()),
                )
            )
        return scores

    def gate(
        self, condition: str, direction: SteeringVector | torch.Tensor
    ) -> tuple[SteeringVector | torch.Tensor, list[GateScores]]:
        """A gate's condition vector of kind ``condition`` (one of :data:`CONDITIONS`) and its
        :class:`GateScores` at each hook: ``direction`` itself; CAST's ``contrast``; or Fisher's
        ``discriminant``, fitted on three quarters of the train prompts and calibrated on the
        other quarter (projected onto a direction fitted on them, train prompts sit further from
        the boundary than new ones, and a threshold chosen on them fires too often)."""
        if condition == "direction":
            return direction, self.scores(direction)
        if condition == "contrast":
            vector = self.condition()
            return vector, self.scores(vector)
        if condition == "discriminant":
            fit, calibrate = self.split_train()
            vector = fit.condition(discriminant=True)
            return vector, calibrate.scores(vector)
        raise InvalidArgumentError(
            f"unknown condition {condition!r}; use one of {', '.join(CONDITIONS)}",
            field="condition",
        )

    def split_train(self) -> tuple[PromptReads, PromptReads]:
        """These reads with the train prompts split in two: every :data:`FOLDS`-th prompt of
        each side in the second, the rest in the first (validation in both); each prompt's quiet
        set and form go with it."""
        keeps = {}
        for key in ("train.fire", "train.quiet"):
            count = len(next(iter(self.read[key].values())))
            if count < 2 * FOLDS:
                raise InvalidArgumentError(
                    f"needs at least {2 * FOLDS} train prompts on each side", field="train"
                )
            keeps[key] = torch.arange(count) % FOLDS != 0
        fit = self.regrouped({key: [(key, keep)] for key, keep in keeps.items()})
        return fit, self.regrouped({key: [(key, ~keep)] for key, keep in keeps.items()})

    def regrouped(self, parts: Mapping[str, Sequence[tuple[str, torch.Tensor]]]) -> PromptReads:
        """These reads with each key of ``parts`` made anew from its (key, mask) parts: the
        prompts each mask keeps, in order, each with its quiet set and form where all the
        parts have them; the other keys as they are."""

        def labels(old: Mapping[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
            new = {key: names for key, names in old.items() if key not in parts}
            for key, pieces in parts.items():
                if all(name in old for name, _ in pieces):
                    kept = [zip(old[name], mask.tolist(), strict=True) for name, mask in pieces]
                    new[key] = tuple(label for pairs in kept for label, keep in pairs if keep)
            return new

        read = dict(self.read)
        for key, pieces in parts.items():
            rows = [(self.read[name], mask) for name, mask in pieces]
            read[key] = {hook: torch.cat([r[hook][m] for r, m in rows]) for hook in rows[0][0]}
        return replace(
            self, read=read, quiet_sets=labels(self.quiet_sets), forms=labels(self.forms)
        )

    def condition(self, *, discriminant: bool = False) -> SteeringVector:
        """A condition direction of its own from the train reads (CAST's condition vector): at
        each hook's layer, the ``train.fire`` mean minus the ``train.quiet`` mean; with
        ``discriminant``, that difference whitened by the pooled within-class covariance
        (Fisher's linear discriminant; the covariance shrunk towards a scaled identity by an
        amount chosen by cross-validation on train), which weighs down directions where the
        prompts vary anyway."""
        layers = [-1 if point.layer is None else point.layer for point in self.points]
        if -1 in layers or len(set(layers)) != len(layers):
            raise InvalidArgumentError("expected hooks at distinct layers", field="hooks")
        per_layer = {}
        for layer, point in zip(layers, self.points, strict=True):
            # a reply window's positions count as prompts of their own here
            fire = self.read["train.fire"][point.name].double().flatten(0, -2)
            quiet = self.read["train.quiet"][point.name].double().flatten(0, -2)
            difference = fire.mean(0) - quiet.mean(0)
            if discriminant:
                difference = discriminant_direction(fire, quiet, difference)
            per_layer[layer] = difference.float()
        return SteeringVector(per_layer=per_layer, name="condition")


def read_prompts(
    handle: ModelHandle,
    hooks: Sequence[str],
    *,
    train: ContrastPrompts,
    validation: ContrastPrompts | None = None,
    system: str | None = None,
    batch_size: int = 16,
    reply_tokens: int = 0,
    reply_aggregate: str = "any",
    known: KnownReads | None = None,
) -> PromptReads:
    """:class:`PromptReads` of ``train`` (and ``validation``) at each of ``hooks``: at each
    prompt's last token, or with ``reply_tokens`` K at the K positions that draw its first K
    greedy reply tokens (:func:`steer.passes.reply_windows`), which a reply gate combines by
    ``reply_aggregate``. A prompt-scope read takes a prompt's values from ``known`` where it
    holds them at every hook, and reads only the others."""
    check_reply_aggregate(reply_aggregate)
    if isinstance(hooks, str) or not hooks:
        raise InvalidArgumentError("needs at least one hook", field="hooks")
    points = tuple(handle.resolver.parse(hook, field=f"hooks[{i}]") for i, hook in enumerate(hooks))
    names = [point.name for point in points]
    splits = {"train": train} if validation is None else {"train": train, "validation": validation}
    read: dict[str, dict[str, torch.Tensor]] = {}
    for name, split in splits.items():
        for side, prompts in (("fire", split.fire), ("quiet", split.quiet)):
            key = f"{name}.{side}"
            ids = encode_prompts(handle, prompts, key, system)
            if reply_tokens:
                read[key] = reply_windows(handle, ids, names, reply_tokens, batch_size)
                continue
            read[key] = read_last(handle, ids, names, batch_size=batch_size, known=known)
    return PromptReads(points, read, reply_tokens, reply_aggregate)


def gate_scores(
    handle: ModelHandle,
    hooks: Sequence[str],
    direction: SteeringVector | torch.Tensor,
    *,
    train: ContrastPrompts,
    validation: ContrastPrompts,
    below: bool = False,
    system: str | None = None,
    batch_size: int = 16,
) -> list[GateScores]:
    """:class:`GateScores` at each of ``hooks`` (a :class:`SteeringVector` gives its vector at
    each hook's layer), all read in one forward pass over the prompts."""
    reads = read_prompts(
        handle, hooks, train=train, validation=validation, system=system, batch_size=batch_size
    )
    return reads.scores(direction, below=below)


def contrast_condition(
    handle: ModelHandle,
    hooks: Sequence[str],
    train: ContrastPrompts,
    *,
    discriminant: bool = False,
    system: str | None = None,
    batch_size: int = 16,
) -> SteeringVector:
    """A condition direction of its own (CAST's condition vector, or with ``discriminant``
    Fisher's; see :meth:`PromptReads.condition`) at each hook's layer. For a gate whose edit
    direction was read elsewhere (e.g. from reply tokens), this is what tells the prompts apart
    where the gate decides."""
    reads = read_prompts(handle, hooks, train=train, system=system, batch_size=batch_size)
    return reads.condition(discriminant=discriminant)


def calibrate_gate(
    handle: ModelHandle,
    hook: str,
    direction: SteeringVector | torch.Tensor,
    *,
    train: ContrastPrompts,
    validation: ContrastPrompts,
    target_fpr: float = 0.05,
    below: bool = False,
    system: str | None = None,
    batch_size: int = 16,
) -> GateCalibration:
    """Choose a prompt-scope gate's threshold on ``train``; report its rates on ``validation``.

    The gate fires where the projection is above the threshold (below it with ``below``).
    """
    target_fpr = _target(target_fpr)
    scores = gate_scores(
        handle,
        [hook],
        direction,
        train=train,
        validation=validation,
        below=below,
        system=system,
        batch_size=batch_size,
    )
    return scores[0].calibrate(target_fpr)


def _target(target_fpr: float) -> float:
    if isinstance(target_fpr, bool) or not isinstance(target_fpr, int | float):
        raise InvalidArgumentError(f"expected a number, got {target_fpr!r}", field="target_fpr")
    if not (math.isfinite(target_fpr) and 0.0 <= target_fpr < 1.0):
        raise InvalidArgumentError(
            f"must be a finite rate in [0, 1), got {target_fpr!r}", field="target_fpr"
        )
    return float(target_fpr)


def _projected(
    activations: torch.Tensor, unit: torch.Tensor, hook: str, field: str, *, mean: bool = False
) -> list[float]:
    """Each prompt's residual projected onto ``unit`` in float32: the number a prompt-scope
    :class:`~steer.interventions.ReadGate` compares with its threshold; for a reply window
    (prompts, positions, d_model), its largest projection (the gate fires if any fires), or
    with ``mean`` their mean."""
    projected = activations @ unit
    if projected.dim() == 2:
        projected = projected.mean(-1) if mean else projected.amax(-1)
    projections = projected.tolist()
    for index, value in enumerate(projections):
        if not math.isfinite(value):
            raise InvalidArgumentError(
                f"the projection at {hook} is not finite ({value})", field=f"{field}[{index}]"
            )
    return projections


def lowest_threshold(quiet: Sequence[float], target_fpr: float) -> float:
    """The lowest ``t`` with ``#{q > t} / n <= target_fpr``: the (m+1)-th largest ``q``, where
    m = floor(target_fpr * n) false positives are allowed (``t`` at a value does not fire on it)."""
    allowed = math.floor(target_fpr * len(quiet) + 1e-9)
    return sorted(quiet, reverse=True)[allowed]


def _rates(fire: list[float], quiet: list[float], threshold: float) -> SplitRates:
    return SplitRates(
        true_positive_rate=sum(p > threshold for p in fire) / len(fire),
        false_positive_rate=sum(p > threshold for p in quiet) / len(quiet),
        fire_count=len(fire),
        quiet_count=len(quiet),
    )
