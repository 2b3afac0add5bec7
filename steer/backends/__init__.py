"""Generation backends: what drives a model's forward passes for the service.

``hf`` is :class:`steer.generation.Engine` on the transformers model (exact; the reference every
other path is checked against; the default). ``vllm`` is :class:`steer.backends.vllm.VllmEngine`
(vLLM's V1 engine with steer's interventions inside its forward pass; ``pip install -e
".[vllm]"``). Both take the same :class:`~steer.generation.GenerationRequest` and emit the same
:class:`~steer.generation.GenerationEvent` stream, so the scheduler, gRPC and HTTP do not know
which one runs.

A backend declares what it can do (:class:`~steer.backends.capabilities.Capabilities`);
:func:`~steer.backends.capabilities.check_request` refuses a request that uses something else
with a FAILED_PRECONDITION naming the field, the thing and the backend, before the request
reaches the engine. This module imports neither torch nor vLLM.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from steer.errors import InvalidArgumentError

if TYPE_CHECKING:
    from steer.generation import GenerationEvent, GenerationRequest
    from steer.models import ModelHandle

BACKENDS = ("hf", "vllm")


class GenerationEngine(Protocol):
    """What the scheduler needs of an engine (both backends implement it)."""

    #: how many requests may wait for a row before ``submit`` refuses (ResourceExhaustedError)
    max_waiting: int

    def submit(self, request: GenerationRequest) -> str: ...
    def cancel(self, request_id: str) -> None: ...
    def step(self) -> list[GenerationEvent]: ...
    @property
    def num_running(self) -> int: ...
    @property
    def num_waiting(self) -> int: ...
    @property
    def has_work(self) -> bool: ...


def check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise InvalidArgumentError(
            f"unknown backend {name!r}; use one of {', '.join(BACKENDS)}", field="backend"
        )
    return name


def engine_factory(
    handle: ModelHandle,
    backend: str = "hf",
    *,
    max_batch: int = 16,
    max_waiting: int = 256,
    vllm_options: Any = None,
) -> Callable[[], GenerationEngine]:
    """A function that makes a fresh engine of ``backend`` for ``handle`` (the scheduler makes
    one at start and another after a failed step). For ``vllm`` this starts vLLM once, now; the
    engines it makes share it."""
    from steer.generation import Engine

    if check_backend(backend) == "hf":
        return lambda: Engine(handle, max_batch=max_batch, max_waiting=max_waiting)
    from steer.backends.vllm import VllmEngine, start_vllm

    llm = start_vllm(handle, max_batch=max_batch, options=vllm_options)
    return lambda: VllmEngine(handle, llm, max_batch=max_batch, max_waiting=max_waiting)
