"""Interventions for a request, built on the client's side: :func:`ablate` and :func:`add` (a
server artifact, or a vector sent inline), :func:`add_local` (a local artifact),
:func:`slider` (a feature of an SAE the server has loaded) and :func:`gated` (any of them only
where a condition fires)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from steer.proto.v1 import generation_pb2
from steer.vectors import SteeringVector
from steer.wire import gate_scope_number, phase_number, slider_mode_number


def ablate(
    artifact_id: str,
    *,
    layers: Sequence[int] = (),
    weight: float | None = None,
    layer_weights: Mapping[int, float] | None = None,
    allow_other_model: bool = False,
    speaker: str = "",
) -> generation_pb2.Intervention:
    """Ablate the server-side direction ``artifact_id`` (only ``speaker``'s tokens if set)."""
    message = generation_pb2.AblateDirection(
        artifact_id=artifact_id,
        layers=list(layers),
        layer_weights=dict(layer_weights or {}),
        allow_other_model=allow_other_model,
    )
    if weight is not None:
        message.weight = weight
    return generation_pb2.Intervention(ablate=message, speaker=speaker)


def add(
    vector: str | SteeringVector | Sequence[float],
    strength: float = 1.0,
    *,
    hooks: Sequence[str] = (),
    phase: str = "all",
    allow_other_model: bool = False,
    speaker: str = "",
) -> generation_pb2.Intervention:
    """Add a vector: a server artifact id, a :class:`SteeringVector`, or floats (shared).

    With ``speaker``, only that character's tokens are steered (role-play prompts)."""
    message = generation_pb2.AddVector(
        strength=strength,
        hooks=list(hooks),
        phase=phase_number(phase),
        allow_other_model=allow_other_model,
    )
    if isinstance(vector, str):
        message.artifact_id = vector
    else:
        message.inline.CopyFrom(inline_vector(vector))
    return generation_pb2.Intervention(add=message, speaker=speaker)


def inline_vector(vector: SteeringVector | Sequence[float]) -> generation_pb2.InlineVector:
    if not isinstance(vector, SteeringVector):
        return generation_pb2.InlineVector(shared=[float(v) for v in vector])
    message = generation_pb2.InlineVector()
    if vector.shared is not None:
        message.shared.extend(vector.shared.tolist())
    for layer in vector.layers:
        message.layers.add(layer=layer, values=vector.per_layer[layer].tolist())
    return message


def add_local(
    path: str | Path,
    strength: float = 1.0,
    *,
    hooks: Sequence[str] | None = None,
    phase: str = "all",
) -> generation_pb2.Intervention:
    """Add a local vector artifact, sent inline; hooks default to the artifact's own."""
    from steer.artifacts import load_vector

    artifact = load_vector(path)
    if hooks is None:
        hooks = artifact.hooks
    return add(artifact.vector, strength, hooks=hooks, phase=phase)


def slider(
    sae_id: str,
    feature: int,
    mode: str,
    value: float,
    *,
    phase: str = "all",
    speaker: str = "",
) -> generation_pb2.Intervention:
    """Move feature ``feature`` of the server's SAE ``sae_id`` (see ``load_sae``).

    ``mode``: ``clamp`` (f = value), ``scale`` (f = value * f) or ``add_decoder``
    (f = f + value); the SAE's error term is kept, so ``scale`` 1 and ``add_decoder`` 0 change
    nothing."""
    message = generation_pb2.FeatureSlider(
        sae_id=sae_id,
        feature=feature,
        mode=slider_mode_number(mode),
        value=value,
        phase=phase_number(phase),
    )
    return generation_pb2.Intervention(slider=message, speaker=speaker)


def gated(
    inner: generation_pb2.Intervention,
    hook: str | Sequence[str],
    direction: str | SteeringVector | Sequence[float],
    threshold: float,
    *,
    scope: str = "token",
    below: bool = False,
    weights: Sequence[float] = (),
    allow_other_model: bool = False,
    reply_tokens: int = 0,
    reply_aggregate: str = "",
) -> generation_pb2.Intervention:
    """``inner`` only where the residual at ``hook`` projects onto ``direction`` (a server
    artifact id, a :class:`SteeringVector` or floats; normalised by the server) above
    ``threshold`` (below it with ``below``): per token (``scope="token"``), decided once from
    the prompt's last token and held for the reply (``scope="prompt"``), or decided once from
    the first ``reply_tokens`` reply tokens (0: the server's default), the reply starting over
    with ``inner`` on where it fires (``scope="reply"``; ``reply_aggregate`` "mean": where
    their projections' mean passes the threshold, "any" or "": where any does). With several
    hooks (a list), where the sum of their projections, each times its entry of ``weights`` (1
    each by default), is."""
    condition = generation_pb2.GateCondition(
        threshold=threshold, below=below, allow_other_model=allow_other_model
    )
    if isinstance(hook, str):
        condition.hook = hook
    else:
        condition.hooks.extend(hook)
        condition.weights.extend(weights)
    if isinstance(direction, str):
        condition.artifact_id = direction
    else:
        condition.inline.CopyFrom(inline_vector(direction))
    message = generation_pb2.GatedIntervention(
        condition=condition,
        inner=inner,
        scope=gate_scope_number(scope),
        reply_tokens=reply_tokens,
        reply_aggregate=reply_aggregate,
    )
    return generation_pb2.Intervention(gated=message)


def feature_gated(
    inner: generation_pb2.Intervention,
    sae_id: str,
    feature: int,
    threshold: float = 0.0,
    *,
    scope: str = "token",
    below: bool = False,
    reply_tokens: int = 0,
    reply_aggregate: str = "",
) -> generation_pb2.Intervention:
    """``inner`` only where feature ``feature`` of the SAE loaded as ``sae_id`` (``load_sae``)
    is active above ``threshold`` (0: wherever it is active at all; below it with ``below``), at
    the SAE's hook point; ``scope``, ``reply_tokens`` and ``reply_aggregate`` as for
    :func:`gated`."""
    condition = generation_pb2.GateCondition(
        threshold=threshold,
        below=below,
        feature=generation_pb2.GateFeature(sae_id=sae_id, feature=feature),
    )
    message = generation_pb2.GatedIntervention(
        condition=condition,
        inner=inner,
        scope=gate_scope_number(scope),
        reply_tokens=reply_tokens,
        reply_aggregate=reply_aggregate,
    )
    return generation_pb2.Intervention(gated=message)
