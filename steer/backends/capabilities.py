"""What a backend can run, and the check that refuses a request needing more."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from steer.errors import FailedPreconditionError
from steer.hooks import HookKind
from steer.interventions import Intervention, RowFunction
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
    #: whether ops may be arbitrary row functions besides feature sliders (an SAE splice,
    #: :class:`steer.sae.training.Splice`); gates, sliders and speaker scopes every backend runs
    row_functions: bool = True
    #: SamplingConfig fields that may differ from their defaults
    sampler_fields: frozenset[str] | None = None


HF_CAPABILITIES = Capabilities("hf")


def check_request(request: GenerationRequest, handle: ModelHandle, caps: Capabilities) -> None:
    """Raise FailedPreconditionError if ``request`` needs something ``caps`` lacks."""
    if caps.sampler_fields is not None:
        _check_sampling(request.sampling, caps)
    if caps.row_functions and caps.hook_kinds is None:
        return
    for index, intervention in enumerate(request.interventions):
        if not intervention.is_noop():
            _check_intervention(intervention, handle, caps, f"interventions[{index}]")


def _check_intervention(
    intervention: Intervention, handle: ModelHandle, caps: Capabilities, field: str
) -> None:
    """Check a gate's condition hooks and its inner intervention apart (their fields named),
    any other intervention's ops."""
    from steer.gates import Gated
    from steer.sae.sliders import FeatureSlider

    if isinstance(intervention, Gated):
        for hook in intervention.condition.hooks:
            point = handle.resolver.parse(hook, field=f"{field}.condition")
            _check_kind(point.kind, point.name, caps, f"{field}.condition")
        _check_intervention(intervention.inner, handle, caps, f"{field}.inner")
        return
    slider = isinstance(intervention, FeatureSlider)
    for point, op in intervention.lowered(handle.resolver, handle.d_model):
        if isinstance(op, RowFunction) and not slider and not caps.row_functions:
            raise FailedPreconditionError(
                f"the {caps.name} backend cannot run {type(intervention).__name__} "
                "interventions (a function of the stream other than a feature slider); serve "
                "with --backend hf for them",
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


def _check_sampling(sampling: SamplingConfig, caps: Capabilities) -> None:
    assert caps.sampler_fields is not None
    for name in sampling.changed_fields():
        if name not in caps.sampler_fields:
            raise FailedPreconditionError(
                f"the {caps.name} backend has no {name} sampler yet; leave it at its "
                f"default ({getattr(SamplingConfig(), name)!r}) or serve with --backend hf",
                field=f"sampling.{name}",
            )
