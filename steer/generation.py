"""Batched, KV-cached, streaming generation with per-row interventions.

:class:`Engine` keeps a running batch. Each :meth:`Engine.step`

1. drops cancelled rows,
2. decodes one token for every running row (one forward pass, the batch's intervention plan
   attached for the *generated* phase),
3. admits waiting requests: prefills them together (their own plan, *prompt* phase), draws their
   first token, and merges their KV cache into the running batch,
4. returns the events (token ids, text delta, finish reason, usage) of this step.

A request with a reply-scope gate (:mod:`steer.gates`) holds its first tokens back until the
gate decides; if it fires, the row leaves the batch and rejoins the queue's head to start its
reply over with the gate's edit on (same seed), and the tokens it held back are dropped.

Rows join and leave only at step boundaries, which is what a server's scheduler needs. The
engine works on token ids: a request's text is turned into ids by :mod:`steer.text`
(:func:`encoded`) before its row is queued, and each row keeps a :class:`~steer.text.TextStream`
only to find stop strings and stream text. The engine is synchronous and not thread-safe except
for :meth:`~Engine.submit` and :meth:`~Engine.cancel`, which may be called from other threads.
"""

from __future__ import annotations

import itertools
import math
import secrets
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from steer import kvcache
from steer.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    ResourceExhaustedError,
)
from steer.gates import Gated, reply_gated
from steer.interventions import Phase, validate
from steer.models import ModelHandle
from steer.passes import forward_pass, prefill
from steer.plan import InterventionPlan, Window, build_plan
from steer.requests import (
    GenerationEvent,
    GenerationRequest,
    GenerationResult,
    Usage,
    checked,
    encoded,
    next_text,
    run_to_end,
)
from steer.runtime import cache_keyword
from steer.sampling import BannedStrings, SamplerState, banned_strings, choose
from steer.text import Message, TextStream

# re-exported: the request types and engine rules live in steer.requests
__all__ = [
    "Engine",
    "GenerationEvent",
    "GenerationRequest",
    "GenerationResult",
    "Message",
    "Usage",
    "checked",
    "encoded",
    "next_text",
    "run_to_end",
]


@dataclass
class _Row:
    request: GenerationRequest
    prompt_ids: list[int]
    seed: int
    generator: torch.Generator | None
    stream: TextStream
    generated: list[int] = field(default_factory=list)
    position: int = 0  # position id of the next token fed to the model
    finish_reason: str | None = None
    #: per-row sampler state (Mirostat's mu, resolved DRY breakers)
    sampler_state: SamplerState = field(default_factory=SamplerState)
    banned: BannedStrings | None = None
    #: set when this row failed on its own (finish_reason "error")
    error: BaseException | None = None
    #: this request's prompt-gate decisions (steer.gates): taken in its prompt pass, held for
    #: its reply; they live and die with the row, whatever batch it is in
    gate_decisions: dict[object, bool | float] = field(default_factory=dict)
    #: the request's reply-scope gates, and the events held back until they have decided
    reply_gates: tuple[Gated, ...] = ()
    held_back: list[GenerationEvent] = field(default_factory=list)
    #: a reply gate fired: the row leaves the batch and queues again to start over
    restarting: bool = False


class Engine:
    """Continuous-batching generator over one loaded model."""

    def __init__(self, handle: ModelHandle, *, max_batch: int = 16, max_waiting: int = 256):
        self.handle = handle
        self.max_batch = max_batch
        self.max_waiting = max_waiting
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._waiting: list[_Row] = []
        self._cancelled: set[str] = set()
        self._rows: list[_Row] = []
        self._cache: Any = None
        self._mask: torch.Tensor | None = None
        self._plan: InterventionPlan | None = None
        self._cache_keyword = cache_keyword(handle.model)

    # -- requests ---------------------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> str:
        """Validate and queue a request; it joins the batch at the next step. Returns its id."""
        request = checked(self.handle, request)
        prompt_ids = list(request.prompt_ids or ())
        if request.speakers is not None and len(request.speakers) != len(prompt_ids):
            raise InvalidArgumentError(
                f"{len(request.speakers)} speakers for {len(prompt_ids)} prompt tokens",
                field="speakers",
            )
        validate(request.interventions, self.handle.resolver, self.handle.d_model)
        strings = request.sampling.banned_strings
        banned = banned_strings(strings, self.handle.tokenizer) if strings else None
        seed = secrets.randbits(63) if request.sampling.seed is None else request.sampling.seed
        stream, sampler_state, generator = self._reply_start(request, seed)
        with self._lock:
            if len(self._waiting) >= self.max_waiting:
                raise ResourceExhaustedError(
                    f"{len(self._waiting)} requests already waiting", field="queue"
                )
            request = replace(request, request_id=request.request_id or f"req-{next(self._ids)}")
            row = _Row(
                request=request,
                prompt_ids=prompt_ids,
                seed=seed,
                generator=generator,
                stream=stream,
                sampler_state=sampler_state,
                banned=banned,
                reply_gates=reply_gated(request.interventions),
            )
            self._waiting.append(row)
        return request.request_id

    def cancel(self, request_id: str) -> None:
        """Mark a request cancelled; its row is freed at the next step."""
        with self._lock:
            self._cancelled.add(request_id)

    @property
    def num_running(self) -> int:
        return len(self._rows)

    @property
    def num_waiting(self) -> int:
        with self._lock:
            return len(self._waiting)

    @property
    def has_work(self) -> bool:
        return bool(self._rows) or self.num_waiting > 0

    # -- stepping ---------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[GenerationEvent]:
        events = self._drop_cancelled()
        if self._rows:
            events.extend(self._decode())
            self._remove_finished()
        events.extend(self._admit())
        return events

    def generate(self, requests: Iterable[GenerationRequest]) -> Iterator[GenerationEvent]:
        """Submit ``requests`` and step until this engine has no work left."""
        for request in requests:
            self.submit(request)
        while self.has_work:
            yield from self.step()

    def run(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Generate ``requests`` to completion; results in the order given."""
        return run_to_end(self, requests)

    # -- internals --------------------------------------------------------------------------

    def _drop_cancelled(self) -> list[GenerationEvent]:
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
            waiting = [r for r in self._waiting if r.request.request_id in cancelled]
            self._waiting = [r for r in self._waiting if r.request.request_id not in cancelled]
        events = []
        for row in waiting + [r for r in self._rows if r.request.request_id in cancelled]:
            row.finish_reason = "cancelled"
            events.append(self._final_event(row, ""))
        if any(r.finish_reason for r in self._rows):
            self._remove_finished()
        return events

    def _decode(self) -> list[GenerationEvent]:
        assert self._mask is not None and self._plan is not None
        rows, plan = self._rows, self._plan
        last = torch.tensor([[row.generated[-1]] for row in rows])
        positions = torch.tensor([[row.position] for row in rows])
        self._mask = torch.cat([self._mask, torch.ones(len(rows), 1, dtype=torch.long)], 1)
        speakers = [[row.request.speaker] for row in rows] if plan.needs_speakers else None
        decisions = [row.gate_decisions for row in rows]
        logits = forward_pass(
            self.handle,
            plan,
            Phase.GENERATED,
            (last, self._mask, positions),
            self._cache,
            decisions,
            speakers,
            keyword=self._cache_keyword,
        )[:, -1, :].cpu()  # one transfer per step: the samplers and their generators run on CPU
        for row in self._rows:
            row.position += 1
        return [e for i, row in enumerate(self._rows) for e in self._after_pass(row, logits[i])]

    def _admit(self) -> list[GenerationEvent]:
        with self._lock:
            free = self.max_batch - len(self._rows)
            new_rows, self._waiting = self._waiting[:free], self._waiting[free:]
        if not new_rows:
            return []
        events: list[GenerationEvent] = []
        for group in self._prefill_groups(new_rows, events):
            events.extend(self._join(*group))
        self._remove_finished(force_replan=True)
        return events

    def _prefill_groups(
        self, rows: list[_Row], events: list[GenerationEvent]
    ) -> Iterator[tuple[list[_Row], torch.Tensor, Any, torch.Tensor]]:
        """Prefill ``rows`` together; if that raises, each row alone, so that a row whose
        interventions cannot be built or run fails by itself (an event in ``events``) and the
        others are admitted as if it had never been there."""
        try:
            yield (rows, *self._prefill(rows))
            return
        except Exception as error:
            if len(rows) == 1:
                events.append(self._fail_row(rows[0], error))
                return
        for row in rows:
            try:
                prefilled = self._prefill([row])
            except Exception as error:  # this row's own failure
                events.append(self._fail_row(row, error))
                continue
            yield ([row], *prefilled)

    def _prefill(self, rows: Sequence[_Row]) -> tuple[torch.Tensor, Any, torch.Tensor]:
        """The prompt pass over ``rows`` (:func:`prefill`): (last logits, new cache, mask)."""
        width = max(len(row.prompt_ids) for row in rows)
        plan = self._build_plan(rows)
        speakers: list[list[str | None]] | None = None
        if plan.needs_speakers:
            padding: list[str | None] = [None] * width
            speakers = [
                padding[: width - len(r.prompt_ids)]
                + list(r.request.speakers or padding[: len(r.prompt_ids)])
                for r in rows
            ]
        logits, cache, mask = prefill(
            self.handle,
            plan,
            [row.prompt_ids for row in rows],
            [row.gate_decisions for row in rows],
            speakers,
            keyword=self._cache_keyword,
        )
        return logits.cpu(), cache, mask

    def _join(
        self, rows: list[_Row], logits: torch.Tensor, cache: Any, mask: torch.Tensor
    ) -> list[GenerationEvent]:
        """Draw the first token of prefilled ``rows`` and merge them into the running batch."""
        events = []
        for index, row in enumerate(rows):
            row.position = len(row.prompt_ids)
            events.extend(self._after_pass(row, logits[index]))
        if self._rows:
            assert self._mask is not None
            self._cache, self._mask = kvcache.merge(self._cache, self._mask, cache, mask)
        else:
            self._cache, self._mask = cache, mask
        self._rows.extend(rows)
        return events

    def _build_plan(self, rows: Sequence[_Row]) -> InterventionPlan:
        return build_plan(
            [row.request.interventions for row in rows],
            self.handle.resolver,
            self.handle.d_model,
            self.handle.dtype,
            self.handle.device,
        )

    def _after_pass(self, row: _Row, logits: torch.Tensor) -> list[GenerationEvent]:
        """The events of ``row`` after a forward pass: its next token's, unless a reply gate
        fired in that pass (the row starts over: none) or is still reading (held back)."""
        undecided = [gate for gate in row.reply_gates if gate not in row.gate_decisions]
        if any(row.gate_decisions.get(Window(gate)) for gate in undecided):
            self._start_over(row)
            return []
        event = self._advance_or_fail(row, logits)
        if not undecided:
            return [event]
        if row.finish_reason == "error":
            row.held_back.clear()
            return [event]
        for gate in undecided:
            assert gate.reply_tokens is not None
            if row.finish_reason or len(row.generated) >= gate.reply_tokens:
                if gate.window_fires(row.gate_decisions, len(row.generated)):
                    row.gate_decisions[Window(gate)] = True  # a mean gate, on its whole window
                    self._start_over(row)
                    return []
                row.gate_decisions[gate] = False  # read its whole window without firing
        row.held_back.append(event)
        if any(gate not in row.gate_decisions for gate in undecided):
            return []
        events, row.held_back = row.held_back, []
        return events

    def _start_over(self, row: _Row) -> None:
        """Reset ``row`` to before its first token, with every reply gate that has fired held
        on (the others read again), and mark it to leave the batch for the queue's head."""
        decided = row.gate_decisions
        fired = [g for g in row.reply_gates if decided.get(Window(g)) or decided.get(g)]
        row.gate_decisions.clear()
        row.gate_decisions.update({gate: True for gate in fired})
        row.generated, row.held_back, row.position = [], [], 0
        row.stream, row.sampler_state, row.generator = self._reply_start(row.request, row.seed)
        row.finish_reason = None  # a mean gate decides after the window's last token, maybe EOS
        row.restarting = True

    def _reply_start(
        self, request: GenerationRequest, seed: int
    ) -> tuple[TextStream, SamplerState, torch.Generator | None]:
        """A reply's state before its first token (text stream, sampler state, random
        generator seeded with ``seed``): at submit, and again where a reply starts over."""
        tokenizer = self.handle.tokenizer
        vocab = int(self.handle.model.config.vocab_size)
        sampler_state = SamplerState.for_request(request.sampling, tokenizer, vocab)
        greedy = request.sampling.greedy
        generator = None if greedy else torch.Generator(device="cpu").manual_seed(seed)
        return TextStream(tokenizer, request.stop), sampler_state, generator

    def _advance_or_fail(self, row: _Row, logits: torch.Tensor) -> GenerationEvent:
        """:meth:`_advance`; an exception there belongs to this row (its sampler settings, or
        activations its interventions drove out of range) and fails it alone."""
        try:
            return self._advance(row, logits)
        except Exception as error:
            return self._fail_row(row, error)

    def _fail_row(self, row: _Row, error: BaseException) -> GenerationEvent:
        row.finish_reason = "error"
        row.error = error
        return self._final_event(row, "")

    def _advance(self, row: _Row, logits: torch.Tensor) -> GenerationEvent:
        """Choose the next token of ``row`` from its logits and turn it into an event."""
        request = row.request
        # one float64 sum: non-finite exactly where an entry is (float32 values cannot overflow
        # it), and a seventh of the cost of isfinite().all() on a 150k vocabulary, every row
        if not math.isfinite(float(logits.sum(dtype=torch.float64))):
            raise _non_finite(request)
        token = self._choose(row, logits)
        row.generated.append(token)
        top: tuple[tuple[int, float], ...] = ()
        if request.top_logprobs:
            values, indices = torch.log_softmax(logits, -1).topk(request.top_logprobs)
            top = tuple(zip(indices.tolist(), values.tolist(), strict=True))
        delta, row.finish_reason = next_text(
            row.stream,
            token,
            self.handle.eos_token_ids,
            len(row.generated),
            request.max_new_tokens,
        )
        if row.finish_reason:
            return self._final_event(row, delta, (token,), top)
        return GenerationEvent(request.request_id, (token,), delta, top)

    def _choose(self, row: _Row, logits: torch.Tensor) -> int:
        """Sample with the row's settings; EOS and banned-phrase completions are masked."""
        sampling = row.request.sampling
        masked: set[int] = set()
        if sampling.ban_eos or len(row.generated) < sampling.min_tokens:
            masked.update(self.handle.eos_token_ids)
        window: list[int] = []
        if row.banned is not None:
            window = row.generated[-(row.banned.longest + 8) :]
            tail = self.handle.tokenizer.decode(window, skip_special_tokens=True)
            masked.update(row.banned.tokens_to_ban(tail))
        history = row.prompt_ids + row.generated
        mirostat_mu = row.sampler_state.mirostat_mu
        for _attempt in range(16):
            row.sampler_state.mirostat_mu = mirostat_mu
            token = choose(logits, sampling, row.generator, history, row.sampler_state, masked)
            if row.banned is None:
                return token
            text = self.handle.tokenizer.decode([*window, token], skip_special_tokens=True)
            if not row.banned.completed(text):
                return token
            # the joined text completes a phrase that the per-token texts did not show
            masked.add(token)
        return token

    def _final_event(
        self,
        row: _Row,
        text: str,
        token_ids: tuple[int, ...] = (),
        top: tuple[tuple[int, float], ...] = (),
    ) -> GenerationEvent:
        return GenerationEvent(
            request_id=row.request.request_id,
            token_ids=token_ids,
            text=text,
            top_logprobs=top,
            finish_reason=row.finish_reason,
            usage=Usage(len(row.prompt_ids), len(row.generated)),
            seed=row.seed,
            error=row.error,
        )

    def _remove_finished(self, force_replan: bool = False) -> None:
        """Drop finished rows from the batch, and rows starting over (back to the queue's
        head); replan if any left (or with ``force_replan``)."""
        rows = self._rows
        keep = [i for i, r in enumerate(rows) if r.finish_reason is None and not r.restarting]
        if len(keep) == len(self._rows) and not force_replan:
            return
        again = [row for row in rows if row.restarting and row.finish_reason is None]
        for row in again:
            row.restarting = False
        with self._lock:
            self._waiting[:0] = again
        if not keep:
            self._rows, self._cache, self._mask, self._plan = [], None, None, None
            return
        if len(keep) != len(self._rows):
            assert self._mask is not None
            self._cache, self._mask = kvcache.select_rows(
                self._cache, self._mask, torch.tensor(keep)
            )
            self._rows = [self._rows[i] for i in keep]
        self._plan = self._build_plan(self._rows)


def _non_finite(request: GenerationRequest) -> Exception:
    if request.interventions:
        return InvalidArgumentError(
            "this request's interventions drove the model's activations to inf or NaN; "
            "lower their strength or weight",
            field="interventions",
        )
    return FailedPreconditionError("the model produced inf or NaN logits for this prompt")
