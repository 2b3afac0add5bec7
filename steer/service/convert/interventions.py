"""Proto interventions -> steer's: an ablation or addition of a server artifact or an inline
vector, an SAE feature slider, a named slider of the operator's catalogue (a ``recipe`` slider
gives its recipe's interventions, gates included), or any of these gated by a condition
(:mod:`steer.gates`).

Errors name the request field in proto terms (``interventions[2].add.strength``).
"""

from __future__ import annotations

from steer.artifacts import VectorArtifact
from steer.errors import FailedPreconditionError, InvalidArgumentError, SteerError, within
from steer.gates import BaseCondition, Condition, Gated
from steer.interventions import Add, Intervention, validate
from steer.proto.v1 import generation_pb2
from steer.recipes import EditRecipe
from steer.service.registry import LoadedModel
from steer.service.saes import SaeRegistry
from steer.service.sliders import SliderCatalogue
from steer.service.store import ArtifactStore
from steer.vectors import SteeringVector
from steer.wire import GATE_SCOPE_OF, PHASE_OF, SLIDER_MODE_OF


def intervention(
    message: generation_pb2.Intervention,
    loaded: LoadedModel,
    store: ArtifactStore,
    saes: SaeRegistry,
    field: str,
    sliders: SliderCatalogue | None = None,
) -> list[Intervention]:
    """The domain interventions of one proto intervention: one, or a recipe slider's (none: a
    named slider at its neutral value, which does nothing)."""
    which = message.WhichOneof("kind")
    if which is None:
        raise InvalidArgumentError("set ablate, add, slider, named or gated", field=field)
    if which == "named":
        return _named(message, loaded, store, saes, field, sliders or SliderCatalogue())
    if which == "gated":
        gated = _gated(message, loaded, store, saes, field, sliders)
        return [] if gated is None else [gated]
    return [_intervention(message, which, loaded, store, saes, f"{field}.{which}")]


def _named(
    message: generation_pb2.Intervention,
    loaded: LoadedModel,
    store: ArtifactStore,
    saes: SaeRegistry,
    field: str,
    catalogue: SliderCatalogue,
) -> list[Intervention]:
    """A named slider's interventions at the request's value."""
    slider = catalogue.get(message.named.name, f"{field}.named.name")
    value_field = f"{field}.named.value"
    if slider.recipe is None:
        resolved = slider.intervention(
            message.named.value, field=value_field, speaker=message.speaker
        )
        if resolved is None:
            return []
        return intervention(resolved, loaded, store, saes, f"{field}.named", catalogue)
    if message.speaker:
        raise InvalidArgumentError(
            "a recipe slider acts on every token its recipe says; it takes no speaker",
            field=f"{field}.speaker",
        )
    handle = loaded.handle

    def build(recipe: EditRecipe) -> list[Intervention]:
        try:
            built = recipe.for_model(handle, allow_other_model=slider.allow_other_model)
            validate(built, handle.resolver, handle.d_model)
        except SteerError as error:
            # the recipe is the operator's file: a mistake in it is the server's, not the request's
            raise FailedPreconditionError(
                f"slider {slider.name!r}: {error.message}", field=f"{field}.named.name"
            ) from None
        return built

    return catalogue.recipe_interventions(
        slider, message.named.value, handle, build, field=value_field
    )


def _intervention(
    message: generation_pb2.Intervention,
    which: str,
    loaded: LoadedModel,
    store: ArtifactStore,
    saes: SaeRegistry,
    field: str,
) -> Intervention:
    handle = loaded.handle
    speaker = message.speaker or None
    built: Intervention
    try:
        if which == "slider":
            built = _slider(message.slider, speaker, loaded, saes)
        elif which == "ablate":
            built = _ablation(message.ablate, speaker, loaded, store)
        else:
            built = _addition(message.add, speaker, loaded, store)
        validate([built], handle.resolver, handle.d_model)
    except SteerError as error:
        if error.status_code != "INVALID_ARGUMENT":
            error.field = f"{field}.{error.field}" if error.field else field
            raise
        raise within(error, field) from None
    return built


def _gated(
    message: generation_pb2.Intervention,
    loaded: LoadedModel,
    store: ArtifactStore,
    saes: SaeRegistry,
    field: str,
    sliders: SliderCatalogue | None,
) -> Intervention | None:
    """A :class:`~steer.gates.Gated` intervention; its inner one is converted like any other (None:
    a named slider at its neutral value, which does nothing gated or not)."""
    gated = message.gated
    if message.speaker:
        raise InvalidArgumentError(
            "a gate has no speaker of its own; set it on the inner intervention",
            field=f"{field}.speaker",
        )
    field = f"{field}.gated"
    if gated.scope not in GATE_SCOPE_OF:
        raise InvalidArgumentError("set scope: token, prompt or reply", field=f"{field}.scope")
    if not gated.HasField("inner"):
        raise InvalidArgumentError("required", field=f"{field}.inner")
    inner_which = gated.inner.WhichOneof("kind")
    inners = intervention(gated.inner, loaded, store, saes, f"{field}.inner", sliders)
    if not inners:
        return None
    if len(inners) > 1:
        raise InvalidArgumentError(
            "a recipe slider brings its own gates; it cannot sit inside another",
            field=f"{field}.inner.named.name",
        )
    inner = inners[0]
    handle = loaded.handle
    try:
        condition = _condition(gated.condition, loaded, store, saes)
        scope = GATE_SCOPE_OF[gated.scope]
        aggregate = gated.reply_aggregate or None
        built = Gated(condition, inner, scope, gated.reply_tokens or None, aggregate)
        validate([built], handle.resolver, handle.d_model)
    except SteerError as error:
        # the library names the inner intervention's fields "inner.x"; the proto "inner.<kind>.x"
        if error.field and error.field.startswith("inner.") and inner_which:
            error.field = f"inner.{inner_which}.{error.field.removeprefix('inner.')}"
        if error.status_code != "INVALID_ARGUMENT":
            error.field = f"{field}.{error.field}" if error.field else field
            raise
        raise within(error, field) from None
    return built


def _condition(
    message: generation_pb2.GateCondition,
    loaded: LoadedModel,
    store: ArtifactStore,
    saes: SaeRegistry,
) -> BaseCondition:
    if message.WhichOneof("direction") == "feature":
        return _feature_condition(message, loaded, saes)
    if message.hook and message.hooks:
        raise InvalidArgumentError("set hook or hooks, not both", field="condition.hooks")
    if not message.hook and not message.hooks:
        raise InvalidArgumentError("required", field="condition.hook")
    if message.weights and not message.hooks:
        raise InvalidArgumentError("weights need hooks", field="condition.weights")
    source = message.WhichOneof("direction")
    if source is None:
        raise InvalidArgumentError("set artifact_id or inline", field="condition.direction")
    if source == "artifact_id":
        try:
            artifact = _artifact(store, message.artifact_id, loaded, message.allow_other_model)
        except SteerError as error:
            error.field = f"condition.{error.field}" if error.field else "condition"
            raise
        direction = artifact.vector
    else:
        direction = _inline_vector(message.inline, "condition.inline")
    hook = message.hook or tuple(message.hooks)
    return Condition(hook, direction, message.threshold, message.below, tuple(message.weights))


def _feature_condition(
    message: generation_pb2.GateCondition, loaded: LoadedModel, saes: SaeRegistry
) -> BaseCondition:
    """A gate on an SAE feature's activation, the SAE loaded for this request's model."""
    from steer.sae.conditions import FeatureCondition

    if message.hooks or message.weights:
        raise InvalidArgumentError(
            "an SAE feature is read at the SAE's one hook", field="condition.hooks"
        )
    feature = message.feature
    if not feature.sae_id:
        raise InvalidArgumentError("required", field="condition.feature.sae_id")
    try:
        entry = saes.get(feature.sae_id)
        entry.check_model(loaded.handle, loaded.model_id, field="sae_id")
    except SteerError as error:
        error.field = f"condition.feature.{error.field}" if error.field else "condition.feature"
        raise
    if message.hook and message.hook != entry.sae.hook_name:
        raise InvalidArgumentError(
            f"the SAE reads {entry.sae.hook_name}, not {message.hook}", field="condition.hook"
        )
    try:
        return FeatureCondition(entry.sae, feature.feature, message.threshold, message.below)
    except InvalidArgumentError as error:
        error.field = (error.field or "").replace("condition.feature", "condition.feature.feature")
        raise


def _artifact(
    store: ArtifactStore, artifact_id: str, loaded: LoadedModel, allow_other_model: bool
) -> VectorArtifact:
    return store.load_for(
        artifact_id, loaded.handle, allow_other_model=allow_other_model, field="artifact_id"
    )


def _ablation(
    message: generation_pb2.AblateDirection,
    speaker: str | None,
    loaded: LoadedModel,
    store: ArtifactStore,
) -> Intervention:
    if not message.artifact_id:
        raise InvalidArgumentError("required", field="artifact_id")
    artifact = _artifact(store, message.artifact_id, loaded, message.allow_other_model)
    return artifact.ablation(
        message.weight if message.HasField("weight") else 1.0,
        layers=tuple(message.layers) or None,
        layer_weights=dict(message.layer_weights) or None,
        speaker=speaker,
    )


def _addition(
    message: generation_pb2.AddVector,
    speaker: str | None,
    loaded: LoadedModel,
    store: ArtifactStore,
) -> Intervention:
    source = message.WhichOneof("vector")
    if source is None:
        raise InvalidArgumentError("set artifact_id or inline", field="vector")
    artifact = None
    if source == "artifact_id":
        artifact = _artifact(store, message.artifact_id, loaded, message.allow_other_model)
    vector = artifact.vector if artifact is not None else _inline_vector(message.inline, "inline")
    if message.phase not in PHASE_OF:
        raise InvalidArgumentError(f"unknown phase {message.phase}", field="phase")
    phase = PHASE_OF[message.phase]
    if artifact is not None:  # hooks default to the artifact's own
        hooks = tuple(message.hooks) or None
        return artifact.addition(message.strength, hooks=hooks, phase=phase, speaker=speaker)
    return Add(
        vector, strength=message.strength, hooks=tuple(message.hooks), phase=phase, speaker=speaker
    )


def _inline_vector(message: generation_pb2.InlineVector, field: str) -> SteeringVector:
    per_layer: dict[int, list[float]] = {}
    for index, layer in enumerate(message.layers):
        if layer.layer in per_layer:
            raise InvalidArgumentError(
                f"layer {layer.layer} given twice", field=f"{field}.layers[{index}].layer"
            )
        per_layer[layer.layer] = list(layer.values)
    shared = list(message.shared) or None
    try:
        return SteeringVector(per_layer=per_layer, shared=shared)  # type: ignore[arg-type]
    except SteerError as error:
        raise InvalidArgumentError(error.message, field=field) from None


def _slider(
    message: generation_pb2.FeatureSlider,
    speaker: str | None,
    loaded: LoadedModel,
    saes: SaeRegistry,
) -> Intervention:
    """A :mod:`steer.sae.sliders` intervention on an SAE loaded for this request's model."""
    from steer.sae.sliders import feature_slider

    if message.mode not in SLIDER_MODE_OF:
        raise InvalidArgumentError("set mode: clamp, scale or add_decoder", field="mode")
    if message.phase not in PHASE_OF:
        raise InvalidArgumentError(f"unknown phase {message.phase}", field="phase")
    if not message.sae_id:
        raise InvalidArgumentError("required", field="sae_id")
    entry = saes.get(message.sae_id)
    entry.check_model(loaded.handle, loaded.model_id, field="sae_id")
    return feature_slider(
        SLIDER_MODE_OF[message.mode],
        entry.sae,
        message.feature,
        message.value,
        PHASE_OF[message.phase],
        speaker,
    )
