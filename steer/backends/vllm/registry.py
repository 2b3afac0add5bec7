"""What the vllm backend has registered in vLLM's workers, held while requests use it.

A request's steering is registered in every worker under its fingerprint
(:meth:`SteeringSpec.key <steer.backends.vllm.program.SteeringSpec.key>`), the SAEs its sliders
and feature gates read under theirs (:func:`steer.backends.vllm.program.sae_key`), each counted
by its users and forgotten in the workers when the last one lets go. Where the workers run in
other processes (tensor parallel) what is sent crosses pickled (:func:`worker.pack
<steer.backends.vllm.worker.pack>`); within one process it passes as it is.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from steer.backends.vllm import worker
from steer.backends.vllm.launch import workers_elsewhere
from steer.backends.vllm.program import SteeringSpec
from steer.sae.loading import SparseAutoencoder


def _as_is(value: Any) -> Any:
    return value


class WorkerRegistry:
    """Reference-counted steering and SAE registrations in one vLLM engine's workers."""

    def __init__(self, llm: Any) -> None:
        self.llm = llm
        self._pack: Callable[[Any], Any] = worker.pack if workers_elsewhere(llm) else _as_is
        #: registered steering key -> number of live requests holding it, and its steering
        self.users: dict[str, int] = {}
        self.specs: dict[str, SteeringSpec] = {}
        #: registered SAEs by key, and how many registered steerings read each (held here while
        #: registered, so that no other SAE can take its key)
        self.saes: dict[str, SparseAutoencoder] = {}
        self.sae_users: dict[str, int] = {}

    def hold(self, key: str, spec: SteeringSpec, saes: Mapping[str, SparseAutoencoder]) -> None:
        """One more request uses ``spec`` under ``key``; registered (its SAEs first) if new."""
        if key not in self.users:
            for sae in spec.saes:
                if sae not in self.sae_users:
                    self.llm.collective_rpc(worker.register_sae, args=(sae, self._pack(saes[sae])))
                    self.saes[sae] = saes[sae]
                    self.sae_users[sae] = 0
                self.sae_users[sae] += 1
            self.llm.collective_rpc(worker.register, args=(key, self._pack(spec)))
            self.specs[key] = spec
            self.users[key] = 0
        self.users[key] += 1

    def release(self, key: str) -> None:
        """One request fewer uses ``key`` (one never held is ignored); the last forgets it in
        the workers, and the SAEs no other registration reads."""
        if key not in self.users:
            return
        self.users[key] -= 1
        if self.users[key]:
            return
        del self.users[key]
        self.llm.collective_rpc(worker.forget, args=([key],))
        for sae in self.specs.pop(key).saes:
            self.sae_users[sae] -= 1
            if self.sae_users[sae] == 0:
                del self.sae_users[sae], self.saes[sae]
                self.llm.collective_rpc(worker.forget_sae, args=(sae,))
