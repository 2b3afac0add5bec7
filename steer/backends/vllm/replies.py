"""Reply-scope gates on the vLLM backend: the reply's first tokens held back until they decide.

Then the reply is kept, or started over with the edit on.

The hf engine reads a reply gate's condition at each position that draws one of the reply's
first ``reply_tokens`` tokens (the prompt's last token, then each fed-back reply token), with
the gated edit off, and holds those tokens back. Where an "any" gate's read passes the threshold
the reply starts over at once from the prompt with that gate's edit on (same seed: exactly the
edit always on); a "mean" gate decides on its window's mean when the window closes (or the
reply ends first). Where every gate stays quiet the held tokens go out and the reply goes on as
drawn, bit-identical to no gate (:mod:`steer.gates`).

On vLLM the generating request carries its undecided gates' reads over their windows
(:class:`~steer.backends.vllm.program.GateRead` with ``window``); after each step the engine
takes the values the workers read and runs :class:`ReplyWindow`'s rules on each new token;
starting over aborts the vLLM request and starts another from the prompt with the fired
gates' edits always on and the others reading again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from steer.backends.vllm.program import GateRead, gate_read
from steer.gates import Gated, GateScope
from steer.hooks import HookResolver
from steer.interventions import Intervention
from steer.requests import GenerationEvent


@dataclass
class ReplyWindow:
    """A request's reply-scope gates and what they have decided in the current reply."""

    gates: tuple[Gated, ...]
    #: the gates that fired (in any reply so far: their edits stay on)
    fired: set[int] = field(default_factory=set)
    #: the gates that read their whole window in this reply without firing
    quiet: set[int] = field(default_factory=set)
    #: (gate, offset) -> the value read at that position in this reply
    values: dict[tuple[int, int], float] = field(default_factory=dict)
    #: this reply's events, held back until every gate has decided
    held: list[GenerationEvent] = field(default_factory=list)

    @classmethod
    def of(cls, interventions: Sequence[Intervention]) -> ReplyWindow | None:
        """None where ``interventions`` hold no reply gate that does something."""
        gates = tuple(
            intervention
            for intervention in interventions
            if isinstance(intervention, Gated)
            and intervention.scope is GateScope.REPLY
            and not intervention.is_noop()
        )
        return cls(gates) if gates else None

    @property
    def undecided(self) -> list[int]:
        return [n for n in range(len(self.gates)) if n not in self.fired | self.quiet]

    @property
    def decided(self) -> bool:
        return not self.undecided

    def current(self, interventions: Sequence[Intervention]) -> tuple[Intervention, ...]:
        """``interventions`` as this reply runs them: the reply gates that fired (their edits
        always on, :func:`~steer.backends.vllm.program.lower_request`), not the others (the
        undecided ones only read: :meth:`reads`)."""
        fired = [self.gates[number] for number in self.fired]
        return tuple(
            intervention
            for intervention in interventions
            if not (isinstance(intervention, Gated) and intervention.scope is GateScope.REPLY)
            or any(intervention is gate for gate in fired)
        )

    def reads(self, resolver: HookResolver, d_model: int) -> tuple[GateRead, ...]:
        """The undecided gates' reads over their windows."""
        found = []
        for number in self.undecided:
            gated = self.gates[number]
            assert gated.reply_tokens is not None
            reads = gated.condition.reads(gated, gated.scope, resolver, d_model)
            for point, read in reads:
                found.append(gate_read(point, number, read, gated.condition, gated.reply_tokens))
        return tuple(found)

    def restart(self) -> None:
        """Forget this reply (a gate fired): the fired gates stay fired, the rest read again."""
        self.quiet.clear()
        self.values.clear()
        self.held.clear()

    def fires_at(self, offset: int) -> bool:
        """Whether an undecided "any" gate fires at ``offset`` (the position drawing reply
        token ``offset + 1``); marks those that do."""
        firing = False
        for number in self.undecided:
            gated = self.gates[number]
            if gated.reply_aggregate == "mean" or (number, offset) not in self.values:
                continue
            value = self.values[(number, offset)]
            if _passes(gated, value):
                self.fired.add(number)
                firing = True
        return firing

    def close(self, count: int, finished: bool) -> bool:
        """After reply token ``count``: decide the gates whose window has closed (or every
        undecided one if the reply ``finished``); True where a mean gate fired (marked)."""
        firing = False
        for number in self.undecided:
            gated = self.gates[number]
            assert gated.reply_tokens is not None
            if not finished and count < gated.reply_tokens:
                continue
            if gated.reply_aggregate == "mean":
                read = [self.values.get((number, offset), 0.0) for offset in range(count)]
                if _passes(gated, sum(read) / count):
                    self.fired.add(number)
                    firing = True
                    continue
            self.quiet.add(number)
        return firing

    def merge(self, values: Mapping[tuple[int, int], float]) -> None:
        self.values.update(values)


def _passes(gated: Gated, value: float) -> bool:
    condition = gated.condition
    return value < condition.threshold if condition.below else value > condition.threshold
