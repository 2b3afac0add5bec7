"""The edit recipe's schema: edit kinds, their settings, and the interventions each lowers to.

The format is described in :mod:`steer.recipes`; :mod:`steer.recipes.files` reads and writes it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from steer.artifacts import VectorArtifact, load_vector
from steer.errors import InvalidArgumentError, SteerError, within
from steer.gates import BaseCondition, Condition, Gated, GateScope
from steer.hooks import HookKind, parse_hook_name, resid_post_hooks
from steer.interventions import Ablate, Add, Intervention
from steer.vectors import SteeringVector

if TYPE_CHECKING:
    from steer.models import ModelHandle
    from steer.sae.loading import SparseAutoencoder


class EditKind(StrEnum):
    ABLATE = "ablate"
    ADD = "add"
    FEATURE = "feature"


class AblationVariant(StrEnum):
    #: W <- W - w r r^T W on every matrix that writes the residual stream
    STANDARD = "standard"
    #: the same with r' = normalise(r - (r.g^) g^), g the harmless mean at each layer
    PROJECTED = "projected"
    #: standard, then each written d_model vector (a column of o_proj/down_proj, a row of the
    #: embedding) is rescaled to its original norm; has no activation-space form
    NORM_PRESERVING = "norm_preserving"


#: hook kinds the weight form of an ablation acts on: the embedding (resid_pre of layer 0) and
#: the attention and MLP outputs of each layer
WEIGHT_ABLATION_KINDS = (HookKind.ATTN_OUT, HookKind.MLP_OUT)


@dataclass(frozen=True)
class Kernel:
    """heretic-style layer weights: ``max + (|l - peak| / width) (min - max)`` within ``width``
    of ``peak_layer``, 0 outside."""

    max_weight: float
    min_weight: float
    peak_layer: float
    width: float

    def weight_at(self, layer: int) -> float:
        distance = abs(layer - self.peak_layer)
        if distance > self.width:
            return 0.0
        return self.max_weight + (distance / self.width) * (self.min_weight - self.max_weight)


@dataclass(frozen=True)
class EditGate:
    """``[edits.gate]``: the edit acts only where the residual at ``hook`` projects onto
    ``direction`` (a vector artifact) above ``threshold`` (below it with ``below``); with
    several hooks (TOML ``hooks``), where the sum of their projections, each times its entry of
    ``weights``, does; see :class:`~steer.gates.Gated`. Weights cannot hold a gate: baking needs
    ``ungated``."""

    hook: str | tuple[str, ...]
    direction: str
    threshold: float
    below: bool = False
    scope: GateScope = GateScope.TOKEN
    weights: tuple[float, ...] = ()
    #: with ``scope = "reply"``: how many reply tokens the condition reads (None: the default)
    reply_tokens: int | None = None
    #: with ``scope = "reply"``: "any" (None) or "mean" (:data:`steer.gates.REPLY_AGGREGATES`)
    reply_aggregate: str | None = None
    #: an SAE directory: the gate reads feature ``feature``'s activation at the SAE's hook
    #: instead of a direction's projection (``direction`` empty, ``hook`` empty or the SAE's;
    #: :class:`steer.sae.conditions.FeatureCondition`)
    sae: str | None = None
    feature: int | None = None


@dataclass(frozen=True)
class AblateEdit:
    direction: str
    variant: AblationVariant = AblationVariant.STANDARD
    weight: float = 1.0
    layers: tuple[int, ...] | None = None
    kernel: Kernel | None = None
    #: a separate kernel for the MLP outputs (heretic); ``kernel`` then covers attention only
    mlp_kernel: Kernel | None = None
    direction_layer: float | None = None
    harmless_mean: str | None = None
    #: weight of the embedding edit (resid_pre of layer 0); default: the weight at layer 0
    embedding_weight: float | None = None
    kind: EditKind = EditKind.ABLATE
    gate: EditGate | None = None

    def layer_weight(self, layer: int, *, mlp: bool = False) -> float:
        if mlp and self.mlp_kernel is not None:
            return self.mlp_kernel.weight_at(layer)
        if self.kernel is not None:
            return self.kernel.weight_at(layer)
        if self.layers is not None and layer not in self.layers:
            return 0.0
        return self.weight


@dataclass(frozen=True)
class AddEdit:
    vector: str
    strength: float = 1.0
    layers: tuple[int, ...] | None = None
    hooks: tuple[str, ...] = ()
    kind: EditKind = EditKind.ADD
    gate: EditGate | None = None


@dataclass(frozen=True)
class FeatureEdit:
    """An SAE feature slider baked as its decoder direction: approximate (the run-time slider
    sets the feature's activation; the bake adds ``value * W_dec[feature]`` to every token)."""

    sae: str
    feature: int
    value: float
    kind: EditKind = EditKind.FEATURE
    approximate: bool = True
    gate: EditGate | None = None


Edit = AblateEdit | AddEdit | FeatureEdit


@dataclass(frozen=True)
class EditRecipe:
    edits: tuple[Edit, ...]
    name: str = ""
    description: str = ""
    dtype: str | None = None
    #: directory relative artifact paths are resolved against
    base_dir: Path = field(default_factory=Path.cwd)

    def artifact_paths(self) -> list[Path]:
        paths = []
        for edit in self.edits:
            if isinstance(edit, AblateEdit):
                paths.append(self.resolve(edit.direction))
                if edit.harmless_mean:
                    paths.append(self.resolve(edit.harmless_mean))
            elif isinstance(edit, AddEdit):
                paths.append(self.resolve(edit.vector))
            else:
                paths.append(self.resolve(edit.sae))
            if edit.gate is not None:
                gate = edit.gate
                paths.append(self.resolve(gate.sae if gate.sae is not None else gate.direction))
        return paths

    def ungated(self) -> EditRecipe:
        """This recipe with every edit's gate dropped: each edit acts everywhere."""
        return replace(self, edits=tuple(replace(edit, gate=None) for edit in self.edits))

    def scaled(self, factor: float) -> EditRecipe:
        """This recipe with every edit's amount times ``factor``: ablation weights (kernels and
        the embedding weight too), addition strengths, feature values; gates as they are. What a
        named slider of kind ``recipe`` applies at value ``factor``; ``scaled(1.0)`` is this
        recipe itself."""
        if factor == 1.0:
            return self
        return replace(self, edits=tuple(_scaled(edit, factor) for edit in self.edits))

    def for_model(
        self, handle: ModelHandle, *, allow_other_model: bool = False
    ) -> list[Intervention]:
        """:meth:`lowered` for ``handle``'s model, each artifact checked against it (an artifact
        made for other weights is ``FAILED_PRECONDITION`` unless ``allow_other_model``): the
        run-time form every evaluation and the server's recipe sliders apply."""
        return self.lowered(
            handle.num_layers,
            load=lambda path: load_vector(path, handle=handle, allow_other_model=allow_other_model),
        )

    def resolve(self, path: str) -> Path:
        candidate = Path(path).expanduser()
        return candidate if candidate.is_absolute() else self.base_dir / candidate

    def interventions(
        self,
        num_layers: int,
        *,
        load: Callable[[Path], VectorArtifact] | None = None,
    ) -> list[tuple[Edit, list[Intervention]]]:
        """Each edit with the interventions it lowers to, in recipe order.

        ``load`` reads a vector artifact (default :func:`steer.artifacts.load_vector` without a
        model check; pass one that checks against your model).
        """
        loader = load or (lambda path: load_vector(path))
        result: list[tuple[Edit, list[Intervention]]] = []
        for index, edit in enumerate(self.edits):
            where = f"edits[{index}]"
            group = self._ungated(edit, num_layers, loader, where)
            if edit.gate is not None:
                group = _gated(self, edit.gate, group, num_layers, loader, f"{where}.gate")
            result.append((edit, group))
        return result

    def _ungated(
        self,
        edit: Edit,
        num_layers: int,
        loader: Callable[[Path], VectorArtifact],
        where: str,
    ) -> list[Intervention]:
        if isinstance(edit, AblateEdit):
            return _ablate_interventions(self, edit, num_layers, loader, where)
        if isinstance(edit, FeatureEdit):
            return [_feature_intervention(self, edit, num_layers, where)]
        addition = loader(self.resolve(edit.vector)).addition(
            edit.strength, hooks=edit.hooks or None, layers=edit.layers
        )
        hooks = addition.hooks or resid_post_hooks(addition.vector.layers)
        if not hooks:
            raise InvalidArgumentError(
                "a shared vector needs `layers` or `hooks`", field=f"{where}.layers"
            )
        for hook in hooks:
            parse_hook_name(hook, num_layers, field=f"{where}.hooks")
        return [addition]

    def lowered(
        self,
        num_layers: int,
        *,
        load: Callable[[Path], VectorArtifact] | None = None,
    ) -> list[Intervention]:
        """All the recipe's interventions in order, as the run-time engine applies them."""
        return [i for _edit, group in self.interventions(num_layers, load=load) for i in group]


def _scaled(edit: Edit, factor: float) -> Edit:
    """``edit`` with its amount times ``factor`` (:meth:`EditRecipe.scaled`)."""
    if isinstance(edit, AddEdit):
        return replace(edit, strength=edit.strength * factor)
    if isinstance(edit, FeatureEdit):
        return replace(edit, value=edit.value * factor)

    def kernel(k: Kernel | None) -> Kernel | None:
        if k is None:
            return None
        return replace(k, max_weight=k.max_weight * factor, min_weight=k.min_weight * factor)

    embedding = None if edit.embedding_weight is None else edit.embedding_weight * factor
    return replace(
        edit,
        weight=edit.weight * factor,
        kernel=kernel(edit.kernel),
        mlp_kernel=kernel(edit.mlp_kernel),
        embedding_weight=embedding,
    )


def _gated(
    recipe: EditRecipe,
    gate: EditGate,
    group: list[Intervention],
    num_layers: int,
    loader: Callable[[Path], VectorArtifact],
    where: str,
) -> list[Intervention]:
    """Each of an edit's interventions wrapped in the gate (the same condition for each)."""
    if isinstance(gate.hook, str) and gate.hook:
        parse_hook_name(gate.hook, num_layers, field=f"{where}.hook")
    for index, hook in enumerate(() if isinstance(gate.hook, str) else gate.hook):
        parse_hook_name(hook, num_layers, field=f"{where}.hooks[{index}]")
    sae = None if gate.sae is None else _gate_sae(recipe, gate, where)
    direction = None if sae is not None else loader(recipe.resolve(gate.direction)).vector
    try:
        condition: BaseCondition
        if sae is not None:
            from steer.sae.conditions import FeatureCondition

            assert gate.feature is not None, "the parser gives a feature gate its feature"
            condition = FeatureCondition(sae, gate.feature, gate.threshold, gate.below)
        else:
            assert direction is not None
            condition = Condition(gate.hook, direction, gate.threshold, gate.below, gate.weights)
        return [
            Gated(condition, inner, gate.scope, gate.reply_tokens, gate.reply_aggregate)
            for inner in group
        ]
    except SteerError as error:
        if error.status_code != "INVALID_ARGUMENT":
            raise
        field_name = error.field.removeprefix("condition.") if error.field else None
        raise within(InvalidArgumentError(error.message, field=field_name), where) from None


def _gate_sae(recipe: EditRecipe, gate: EditGate, where: str) -> SparseAutoencoder:
    """A feature gate's SAE, loaded without a model check (its hook and width are checked where
    the interventions are validated against the model)."""
    from steer.sae.loading import load_sae

    try:
        sae = load_sae(recipe.resolve(str(gate.sae)))
    except SteerError as error:
        error.field = f"{where}.sae" + (
            f".{error.field}" if error.field not in (None, "sae") else ""
        )
        raise
    if gate.hook and gate.hook != sae.hook_name:
        raise InvalidArgumentError(
            f"the SAE reads {sae.hook_name}, not {gate.hook}", field=f"{where}.hook"
        )
    return sae


def _direction(
    recipe: EditRecipe,
    edit: AblateEdit,
    num_layers: int,
    loader: Callable[[Path], VectorArtifact],
    where: str,
) -> SteeringVector:
    vector = loader(recipe.resolve(edit.direction)).vector
    if edit.direction_layer is not None:
        vector = SteeringVector.from_shared(
            _interpolate(vector, edit.direction_layer, f"{where}.direction_layer"),
            name=vector.name,
        )
    if edit.variant is AblationVariant.PROJECTED:
        if edit.harmless_mean is None:
            raise InvalidArgumentError(
                "the projected variant needs harmless_mean (a vector artifact of the mean "
                "harmless activation per layer)",
                field=f"{where}.harmless_mean",
            )
        mean = loader(recipe.resolve(edit.harmless_mean)).vector
        vector = _project_off(vector, mean, num_layers)
    return vector


def _interpolate(vector: SteeringVector, position: float, field_name: str) -> torch.Tensor:
    """The unit direction at a fractional layer: interpolate the neighbours' unit vectors."""
    low = math.floor(position)
    high = math.ceil(position)
    for layer in {low, high}:
        if not vector.has_layer(layer):
            raise InvalidArgumentError(
                f"the direction has no vector for layer {layer}; it covers {list(vector.layers)}",
                field=field_name,
            )
    unit_low = vector.at(low) / vector.at(low).norm()
    unit_high = vector.at(high) / vector.at(high).norm()
    fraction = position - low
    mixed = (1 - fraction) * unit_low + fraction * unit_high
    return mixed / mixed.norm()


def _project_off(
    direction: SteeringVector, mean: SteeringVector, num_layers: int
) -> SteeringVector:
    """r'_L = normalise(r_L - (r_L . g^_L) g^_L) for every layer."""
    per_layer = {}
    for layer in range(num_layers):
        if not direction.has_layer(layer):
            continue
        unit = direction.at(layer) / direction.at(layer).norm()
        harmless = mean.at(layer) / mean.at(layer).norm()
        projected = unit - (unit @ harmless) * harmless
        per_layer[layer] = projected / projected.norm()
    return SteeringVector(per_layer=per_layer, name=direction.name)


def _ablate_interventions(
    recipe: EditRecipe,
    edit: AblateEdit,
    num_layers: int,
    loader: Callable[[Path], VectorArtifact],
    where: str,
) -> list[Intervention]:
    """The weight form: each layer's attention and MLP outputs, plus the embedding as
    ``resid_pre`` of layer 0. (With one direction at weight 1 everywhere this equals the plain
    ``Ablate(direction)``, whose resid_pre projections at later layers are then no-ops.)"""
    direction = _direction(recipe, edit, num_layers, loader, where)
    if edit.layers is not None:
        for layer in edit.layers:
            if not 0 <= layer < num_layers:
                raise InvalidArgumentError(
                    f"layer {layer} out of range: the model has layers 0..{num_layers - 1}",
                    field=f"{where}.layers",
                )

    def weights(mlp: bool) -> dict[int, float]:
        table = {layer: edit.layer_weight(layer, mlp=mlp) for layer in range(num_layers)}
        table = {layer: w for layer, w in table.items() if w != 0.0}
        for layer in table:
            if not direction.has_layer(layer):
                raise InvalidArgumentError(
                    f"the direction has no vector for layer {layer}; set direction_layer or layers",
                    field=f"{where}.direction",
                )
        return table

    if edit.mlp_kernel is None:
        result: list[Intervention] = [
            Ablate(direction, layer_weights=weights(False), kinds=WEIGHT_ABLATION_KINDS)
        ]
    else:
        result = [
            Ablate(direction, layer_weights=weights(False), kinds=(HookKind.ATTN_OUT,)),
            Ablate(direction, layer_weights=weights(True), kinds=(HookKind.MLP_OUT,)),
        ]
    embedding = edit.embedding_weight if edit.embedding_weight is not None else edit.layer_weight(0)
    if embedding != 0.0:
        result.append(Ablate(direction, layers=(0,), weight=embedding, kinds=(HookKind.RESID_PRE,)))
    return result


def _feature_intervention(
    recipe: EditRecipe, edit: FeatureEdit, num_layers: int, where: str
) -> Intervention:
    from steer.sae.loading import decoder_row

    try:
        hook, row = decoder_row(recipe.resolve(edit.sae), edit.feature)
        parse_hook_name(hook, num_layers, field="sae")
    except SteerError as error:
        error.field = f"{where}.{error.field}" if error.field else where
        raise
    vector = SteeringVector.from_shared(row, name=f"feature-{edit.feature}")
    return Add(vector, edit.value, hooks=(hook,))
