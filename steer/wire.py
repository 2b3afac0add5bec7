"""The protocol's enum tables, once: phases, slider modes, gate scopes, finish reasons and sides
by the names people write, for the service's conversion (:mod:`steer.service.convert`) and the
client alike.

The proto enums are numbers on the wire; a user writes ``phase="prompt"`` or ``mode="clamp"``,
the engine reports ``finish_reason="length"``, the library speaks
:class:`~steer.interventions.Phase`.
"""

from __future__ import annotations

from steer.errors import InvalidArgumentError
from steer.interventions import GateScope, Phase
from steer.proto.v1 import generation_pb2
from steer.sae.modes import SliderMode

#: a phase's name (a :class:`Phase` value) -> its proto enum
PHASES: dict[str, generation_pb2.Phase] = {
    Phase.ALL.value: generation_pb2.PHASE_ALL,
    Phase.PROMPT.value: generation_pb2.PHASE_PROMPT,
    Phase.GENERATED.value: generation_pb2.PHASE_GENERATED,
}
#: a proto phase -> the library's :class:`Phase` (unspecified means every token)
PHASE_OF: dict[int, Phase] = {
    generation_pb2.PHASE_UNSPECIFIED: Phase.ALL,
    **{number: Phase(name) for name, number in PHASES.items()},
}

#: a slider mode (:class:`~steer.sae.modes.SliderMode`, a string) -> its proto enum
SLIDER_MODES: dict[SliderMode, generation_pb2.SliderMode] = {
    SliderMode.CLAMP: generation_pb2.SLIDER_MODE_CLAMP,
    SliderMode.SCALE: generation_pb2.SLIDER_MODE_SCALE,
    SliderMode.ADD_DECODER: generation_pb2.SLIDER_MODE_ADD_DECODER,
}
#: a proto slider mode -> the library's mode
SLIDER_MODE_OF: dict[int, SliderMode] = {number: mode for mode, number in SLIDER_MODES.items()}

#: a gate scope (:class:`~steer.interventions.GateScope`) -> its proto enum
GATE_SCOPES: dict[GateScope, generation_pb2.GateScope] = {
    GateScope.TOKEN: generation_pb2.GATE_SCOPE_TOKEN,
    GateScope.PROMPT: generation_pb2.GATE_SCOPE_PROMPT,
    GateScope.REPLY: generation_pb2.GATE_SCOPE_REPLY,
}
#: a proto gate scope -> the library's (unspecified is refused)
GATE_SCOPE_OF: dict[int, GateScope] = {number: scope for scope, number in GATE_SCOPES.items()}

#: a finish reason the engine reports -> its proto enum
FINISH_REASONS: dict[str, generation_pb2.FinishReason] = {
    "stop": generation_pb2.FINISH_REASON_STOP,
    "length": generation_pb2.FINISH_REASON_LENGTH,
    "cancelled": generation_pb2.FINISH_REASON_CANCELLED,
}
#: a proto finish reason -> its name (None: not the last message)
FINISH_REASON_NAMES: dict[int, str | None] = {
    generation_pb2.FINISH_REASON_UNSPECIFIED: None,
    **{number: name for name, number in FINISH_REASONS.items()},
}

#: a proto side -> its name in compare mode (None: not a compare stream)
SIDES: dict[int, str | None] = {
    generation_pb2.SIDE_UNSPECIFIED: None,
    generation_pb2.SIDE_DEFAULT: "default",
    generation_pb2.SIDE_STEERED: "steered",
}


def phase_number(name: str) -> generation_pb2.Phase:
    """The proto enum of the phase ``name``; an unknown name is refused naming ``phase``."""
    if name not in PHASES:
        raise InvalidArgumentError(f"use one of {', '.join(PHASES)}", field="phase")
    return PHASES[name]


def slider_mode_number(name: str) -> generation_pb2.SliderMode:
    """The proto enum of the slider mode ``name``; an unknown name is refused naming ``mode``."""
    if name not in SLIDER_MODES:
        raise InvalidArgumentError(f"use one of {', '.join(SLIDER_MODES)}", field="mode")
    return SLIDER_MODES[SliderMode(name)]


def gate_scope_number(name: str) -> generation_pb2.GateScope:
    """The proto enum of the gate scope ``name``; an unknown name is refused naming ``scope``."""
    if name not in GATE_SCOPES:
        raise InvalidArgumentError(f"use one of {', '.join(GATE_SCOPES)}", field="scope")
    return GATE_SCOPES[GateScope(name)]
