"""What a backend can run, and the check that refuses a request needing more."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from steer.errors import FailedPreconditionError
from steer.hooks import HookKind
from steer.interventions import AddVector, GateScope, Intervention, ProjectOut, RowFunction
from steer.sampling import SamplingConfig

if TYPE_CHECKING:
    from steer.generation import GenerationRequest
    from steer.models import ModelHandle


@dataclass(frozen=True)
class Capabilities:
    """What a backend supports. ``None`` = everything (the reference backend)."""

    name: str
    #: hook kinds an op may sit at
    hook_kinds: frozenset[HookKind] | None = None
    #: whether ops may be speaker-scoped, gated or arbitrary row functions (SAE sliders)
    scoped_ops: bool = True
    #: gates run though ``scoped_ops`` is False: these scopes, on a direction's projection, when
    #: the gated intervention and the condition's hooks pass the other checks
    gate_scopes: frozenset[GateScope] = frozenset()
    #: feature sliders (Clamp, Scale) run though ``scoped_ops`` is False, and the gates in
    #: ``gate_scopes`` may read an SAE feature
    sae_features: bool = False
    #: ops may be speaker-scoped though ``scoped_ops`` is False
    speakers: bool = False
    #: SamplingConfig fields that may differ from their defaults
    sampler_fields: frozenset[str] | None = None


HF_CAPABILITIES = Capabilities("hf")


def check_request(request: GenerationRequest, handle: ModelHandle, caps: Capabilities) -> None:
    """Raise FailedPreconditionError if ``request`` needs something ``caps`` lacks."""
    if caps.sampler_fields is not None:
        _check_sampling(request.sampling, caps)
    if caps.scoped_ops and caps.hook_kinds is None:
        return
    for index, intervention in enumerate(request.interventions):
        if not intervention.is_noop():
            _check_intervention(intervention, handle, caps, f"interventions[{index}]")


def _check_intervention(
    intervention: Intervention, handle: ModelHandle, caps: Capabilities, field: str
) -> None:
    from steer.gates import Condition, Gated
    from steer.sae.sliders import FeatureSlider

    if isinstance(intervention, Gated) and intervention.scope in caps.gate_scopes:
        condition = intervention.condition
        if not isinstance(condition, Condition) and not caps.sae_features:
            raise FailedPreconditionError(
                f"the {caps.name} backend gates on a direction's projection, not on an SAE "
                "feature; serve with --backend hf for feature conditions",
                field=f"{field}.condition",
            )
        for hook in condition.hooks:
            point = handle.resolver.parse(hook, field=f"{field}.condition")
            _check_kind(point.kind, point.name, caps, f"{field}.condition")
        _check_intervention(intervention.inner, handle, caps, f"{field}.inner")
        return
    kind = type(intervention).__name__
    slider = caps.sae_features and isinstance(intervention, FeatureSlider)
    for point, op in intervention.lowered(handle.resolver, handle.d_model):
        spoken = op.speaker is None or caps.speakers
        plain = isinstance(op, (ProjectOut, AddVector)) and spoken
        plain = plain or (slider and isinstance(op, RowFunction) and spoken)
        if not plain and not caps.scoped_ops:
            raise FailedPreconditionError(
                f"the {caps.name} backend cannot run {kind} interventions "
                f"({_describe(intervention)}); serve with --backend hf for them",
                field=field,
            )
        _check_kind(point.kind, point.name, caps, field)


def _check_kind(kind: HookKind, name: str, caps: Capabilities, field: str) -> None:
    if caps.hook_kinds is not None and kind not in caps.hook_kinds:
        raise FailedPreconditionError(
            f"the {caps.name} backend has no {kind.value} hook ({name}); "
            f"it has {', '.join(sorted(k.value for k in caps.hook_kinds))}",
            field=field,
        )


def _describe(intervention: Any) -> str:
    if getattr(intervention, "speaker", None) is not None:
        return "speaker-scoped"
    name = type(intervention).__name__
    if name == "Gated":
        return f"{intervention.scope.value}-scope gated"
    return {"FeatureSlider": "SAE feature slider"}.get(name, name)


def _check_sampling(sampling: SamplingConfig, caps: Capabilities) -> None:
    assert caps.sampler_fields is not None
    for name in sampling.changed_fields():
        if name not in caps.sampler_fields:
            raise FailedPreconditionError(
                f"the {caps.name} backend has no {name} sampler yet; leave it at its "
                f"default ({getattr(SamplingConfig(), name)!r}) or serve with --backend hf",
                field=f"sampling.{name}",
            )
