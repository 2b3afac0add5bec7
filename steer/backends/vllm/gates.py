"""Prompt-scope gates on the vLLM backend: decided by a probe, then the request runs plainly.

The hf engine decides a prompt gate in the prompt pass, at the prompt's last token, and where it
fires runs the prompt pass again with the decision held, so a request whose gate fired runs
exactly as with the gated intervention always on and one whose gate stayed quiet as without it
(:mod:`steer.gates`). A vLLM request cannot run its prompt again under other steering, so the
backend decides a request's prompt gates first: a **probe** (the prompt, one greedy token, the
request's ungated interventions) reads every gate's condition at the prompt's last token in the
workers (:class:`~steer.backends.vllm.program.GateRead`), before any op at each read's hook,
as the hf engine reads it; the request then runs with the inner intervention of each gate that
fired, always on, and without the others: the hf engine's two outcomes.

The probe's prompt KV is what the request needs when no gate fires (reads change no activation),
so the probe carries the same prefix-cache salt: a request whose gates stay quiet takes its
prompt from vLLM's prefix cache (only the last token is computed again); one whose gate fired
computes its prompt again under the edit, as the hf engine's second prompt pass does.

One case differs from the hf engine and is refused: there, a gate decided early in the prompt
pass edits the residual that a later gate's condition reads; a probe reads every condition
without any gate's edit. A request where one gate's edit acts between its own condition and
another gate's condition is refused on this backend (FAILED_PRECONDITION).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from steer.backends.vllm.program import SteeringSpec, gate_read, lower_request
from steer.errors import FailedPreconditionError
from steer.gates import Gated, GateScope
from steer.hooks import HookResolver
from steer.interventions import Intervention
from steer.runtime import forward_order

#: what a gate probe's vLLM request id ends in (the request's own id before it)
PROBE_SUFFIX = "#gate-probe"


@dataclass(frozen=True)
class PromptGates:
    """A request's interventions with its prompt gates picked out (``gates``: their indices)."""

    interventions: tuple[Intervention, ...]
    gates: tuple[int, ...]

    @classmethod
    def of(cls, interventions: Sequence[Intervention]) -> PromptGates | None:
        """None where ``interventions`` hold no prompt gate that does something."""
        gates = tuple(
            index
            for index, intervention in enumerate(interventions)
            if isinstance(intervention, Gated)
            and intervention.scope is GateScope.PROMPT
            and not intervention.is_noop()
        )
        return cls(tuple(interventions), gates) if gates else None

    def gate(self, number: int) -> Gated:
        gated = self.interventions[self.gates[number]]
        assert isinstance(gated, Gated)
        return gated

    def check(self, resolver: HookResolver, d_model: int) -> None:
        """Refuse a request whose probe would read a condition the hf engine reads edited:
        one gate's op at or after its own condition (so it acts in the hf engine's first
        prompt pass) and before another gate's read."""
        for first in range(len(self.gates)):
            gated = self.gate(first)
            decided = forward_order(
                gated.condition.reads(gated, gated.scope, resolver, d_model)[-1][0]
            )
            acting = [
                point
                for point, _ in gated.inner.lowered(resolver, d_model)
                if forward_order(point) >= decided
            ]
            for second in range(len(self.gates)):
                if second == first:
                    continue
                other = self.gate(second).condition
                for read in [resolver.parse(hook) for hook in other.hooks]:
                    for point in acting:
                        if forward_order(point) < forward_order(read):
                            raise FailedPreconditionError(
                                f"on the vllm backend a prompt gate's condition cannot read "
                                f"another gate's edit ({point.name} acts before {read.name}); "
                                "serve with --backend hf for it",
                                field=f"interventions[{self.gates[second]}].condition",
                            )

    def probe_spec(self, resolver: HookResolver, d_model: int) -> SteeringSpec:
        """The probe's steering: the other interventions' ops (reply gates' edits off) and
        every prompt gate's reads."""
        ungated = [  # a reply gate's edit is off until its reply has read it
            x
            for i, x in enumerate(self.interventions)
            if i not in self.gates and not (isinstance(x, Gated) and x.scope is GateScope.REPLY)
        ]
        ops = lower_request(ungated, resolver, d_model).ops
        reads = []
        for number in range(len(self.gates)):
            gated = self.gate(number)
            for point, read in gated.condition.reads(gated, gated.scope, resolver, d_model):
                reads.append(gate_read(point, number, read, gated.condition))
        return SteeringSpec(ops, tuple(reads))

    def decide(self, values: Mapping[int, float]) -> tuple[bool, ...]:
        """Whether each gate fired, from its summed projection at the prompt's last token."""
        fired = []
        for number in range(len(self.gates)):
            condition = self.gate(number).condition
            value = values[number]
            fired.append(
                value < condition.threshold if condition.below else value > condition.threshold
            )
        return tuple(fired)

    def chosen(self, fired: Sequence[bool]) -> tuple[Intervention, ...]:
        """The interventions the request runs with, in the order given: the gates that fired
        (:func:`~steer.backends.vllm.program.lower_request` runs their edits always on), not
        the others."""
        return tuple(
            intervention
            for index, intervention in enumerate(self.interventions)
            if index not in self.gates or fired[self.gates.index(index)]
        )
