"""steer: activation steering and abliteration for transformers chat models."""

from steer.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    SteerError,
    UnsupportedArchitectureError,
)
from steer.gates import Condition, Gated, GateScope
from steer.interventions import Ablate, Add, Intervention, Phase
from steer.vectors import SteeringVector

__version__ = "0.1.0"

__all__ = [
    "Ablate",
    "Add",
    "Condition",
    "FailedPreconditionError",
    "GateScope",
    "Gated",
    "Intervention",
    "InvalidArgumentError",
    "NotFoundError",
    "Phase",
    "ResourceExhaustedError",
    "SteerError",
    "SteeringVector",
    "UnsupportedArchitectureError",
    "__version__",
]
