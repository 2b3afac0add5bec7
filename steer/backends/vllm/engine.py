""":class:`VllmEngine`: steer's engine interface on vLLM's V1 engine.

The service drives it exactly like :class:`steer.generation.Engine` (submit, cancel, step); each
step is one ``LLMEngine.step()``, so vLLM's own scheduler (continuous batching, chunked prefill,
prefix caching, paged KV) decides the batch. A request's interventions are checked against
:data:`CAPABILITIES`, lowered once by the service's hook resolver, registered in every worker
under their fingerprint (:meth:`SteeringSpec.key <steer.backends.vllm.program.SteeringSpec.key>`)
and named in the request's ``extra_args``; the fingerprint of its ops is its ``cache_salt``, so
prompt KV is shared only between requests steered alike. A registration lives while requests
use it (:mod:`steer.backends.vllm.registry`). A request with prompt-scope gates first runs a
gate probe (:mod:`steer.backends.vllm.gates`), then generates with the gates' decisions; one
with reply-scope gates holds its reply's first tokens back until they decide, and may start
over (:mod:`steer.backends.vllm.replies`).
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from steer.backends.capabilities import Capabilities, check_request
from steer.backends.vllm import worker
from steer.backends.vllm.gates import PROBE_SUFFIX, PromptGates
from steer.backends.vllm.launch import shutdown_vllm
from steer.backends.vllm.params import (
    SAMPLER_FIELDS,
    encode,
    needs_pipeline,
    probe_params,
    sampling_params,
)
from steer.backends.vllm.program import (
    SteeringSpec,
    lower_request,
    saes_of,
    speakers_args,
    speakers_salt,
)
from steer.backends.vllm.registry import WorkerRegistry
from steer.backends.vllm.replies import ReplyWindow
from steer.errors import ResourceExhaustedError
from steer.hooks import HookKind
from steer.interventions import Intervention
from steer.models import ModelHandle
from steer.requests import (
    GenerationEvent,
    GenerationRequest,
    GenerationResult,
    Usage,
    checked,
    next_text,
    run_to_end,
)
from steer.sampling.processors import SamplerState
from steer.text import TextStream

CAPABILITIES = Capabilities(
    "vllm",
    hook_kinds=frozenset(
        {
            HookKind.EMBED,
            HookKind.RESID_PRE,
            HookKind.ATTN_OUT,
            HookKind.MLP_OUT,
            HookKind.RESID_POST,
        }
    ),
    row_functions=False,
    sampler_fields=SAMPLER_FIELDS,
)


@dataclass
class _Row:
    request: GenerationRequest
    prompt_ids: list[int]
    seed: int
    stream: TextStream
    key: str | None
    #: its prompt gates while their probe runs (None: none, or decided)
    gates: PromptGates | None = None
    #: the interventions it generates with once its prompt gates have decided
    chosen: tuple[Intervention, ...] = ()
    #: its reply-scope gates (None: none)
    reply: ReplyWindow | None = None
    #: the vLLM request id its reply runs under (its own id, then one per reply started over)
    vid: str = ""
    attempt: int = 0
    generated: int = 0
    finish_reason: str | None = None
    counted_cache: bool = False


class VllmEngine:
    """Continuous-batching generation with steer's interventions on a vLLM ``LLMEngine``."""

    capabilities = CAPABILITIES

    def __init__(
        self, handle: ModelHandle, llm: Any, *, max_batch: int = 16, max_waiting: int = 256
    ) -> None:
        self.handle = handle
        self.llm = llm
        self.max_batch = max_batch
        self.max_waiting = max_waiting
        self._lock = threading.Lock()
        self._ids = 0
        self._pending: list[_Row] = []
        self._cancelled: set[str] = set()
        self._rows: dict[str, _Row] = {}
        #: the rows whose gate probe runs, by the probe's vLLM request id
        self._probes: dict[str, _Row] = {}
        #: the rows generating, by the vLLM request id of their current reply
        self._attempts: dict[str, _Row] = {}
        #: the lowered interventions of the pending requests, by request id
        self._specs_waiting: dict[str, SteeringSpec] = {}
        #: the steering and SAEs the workers hold for live requests
        self.registry = WorkerRegistry(llm)
        #: prompt tokens whose KV came from vLLM's prefix cache, over all requests so far
        self.cached_prompt_tokens = 0
        llm.collective_rpc(worker.install)

    # -- requests -----------------------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> str:
        """Validate and queue a request; it reaches vLLM at the next step. Returns its id."""
        request = checked(self.handle, request)
        check_request(request, self.handle, CAPABILITIES)
        resolver, d_model = self.handle.resolver, self.handle.d_model
        gates = PromptGates.of(request.interventions)
        reply = ReplyWindow.of(request.interventions)
        if gates is None:
            spec = self._reply_spec(reply, request.interventions)
        else:
            gates.check(resolver, d_model)
            spec = gates.probe_spec(resolver, d_model)
        seed = secrets.randbits(63) if request.sampling.seed is None else request.sampling.seed
        with self._lock:
            if len(self._pending) >= self.max_waiting:
                raise ResourceExhaustedError(
                    f"{len(self._pending)} requests already waiting", field="queue"
                )
            self._ids += 1
            request = replace(request, request_id=request.request_id or f"vreq-{self._ids}")
            row = _Row(
                request=request,
                prompt_ids=list(request.prompt_ids or ()),
                seed=seed,
                stream=TextStream(self.handle.tokenizer, request.stop),
                key=None if spec.is_empty else spec.key(),
                gates=gates,
                chosen=tuple(request.interventions),
                reply=reply,
                vid=request.request_id,
            )
            self._pending.append(row)
            self._specs_waiting[request.request_id] = spec
        return request.request_id

    def cancel(self, request_id: str) -> None:
        with self._lock:
            self._cancelled.add(request_id)

    @property
    def num_running(self) -> int:
        return len(self._rows)

    @property
    def num_waiting(self) -> int:
        """Requests not yet in a running batch: steer's queue and vLLM's own beyond
        ``max_batch`` (so the service's ``max_waiting`` bounds both)."""
        with self._lock:
            return len(self._pending) + max(0, len(self._rows) - self.max_batch)

    @property
    def has_work(self) -> bool:
        return bool(self._rows) or self.num_waiting > 0

    # -- stepping -----------------------------------------------------------------------------

    def step(self) -> list[GenerationEvent]:
        with self._lock:
            pending, self._pending = self._pending, []
            cancelled, self._cancelled = self._cancelled, set()
            specs, self._specs_waiting = self._specs_waiting, {}
        events: list[GenerationEvent] = []
        for row in pending:
            self._start_or_fail(row, specs[row.request.request_id], events)
        for request_id in cancelled:
            victim = self._rows.get(request_id)
            if victim is not None:
                probing = victim.gates is not None
                self.llm.abort_request([request_id + PROBE_SUFFIX if probing else victim.vid])
                victim.finish_reason = "cancelled"
                events.append(self._final(victim, ""))
                self._finish(victim)
        if self._rows:
            probed, replying = [], []
            for output in self.llm.step():
                probe = self._probes.get(output.request_id)
                if probe is not None:
                    if output.finished:
                        probed.append(probe)
                    continue
                running = self._attempts.get(output.request_id)
                if running is None:
                    continue
                if running.reply is not None and not running.reply.decided:
                    replying.append((running, output))
                else:
                    events.extend(self._advance(running, output))
            if probed:
                self._decide(probed, events)
            if replying:
                self._read_replies(replying, events)
        return events

    def _reply_spec(
        self, reply: ReplyWindow | None, interventions: Sequence[Intervention]
    ) -> SteeringSpec:
        """The steering a reply generates with: ``interventions`` with the reply gates as
        decided so far, and the undecided ones' reads (:mod:`steer.backends.vllm.replies`)."""
        resolver, d_model = self.handle.resolver, self.handle.d_model
        if reply is None or reply.decided:
            current = interventions if reply is None else reply.current(interventions)
            return lower_request(current, resolver, d_model)
        spec = lower_request(reply.current(interventions), resolver, d_model)
        return replace(spec, reads=reply.reads(resolver, d_model))

    def _read_replies(self, replying: list[tuple[_Row, Any]], events: list) -> None:
        """Run the reply gates' rules on the new tokens of ``replying`` rows, with the values
        their workers read."""
        taken = self._take_reads([row.vid for row, _ in replying])
        for row, output in replying:
            reply = row.reply
            assert reply is not None
            reply.merge(taken.get(row.vid, {}))
            completion = output.outputs[0]
            tokens = list(completion.token_ids)
            logprobs = completion.logprobs or [None] * len(tokens)
            for index, (token, ranked) in enumerate(zip(tokens, logprobs, strict=False)):
                if reply.fires_at(row.generated):
                    self._start_over(row, output, events)
                    break
                event = self._token_event(row, int(token), _top(ranked, row.request))
                if reply.close(row.generated, row.finish_reason is not None):
                    self._start_over(row, output, events)
                    break
                reply.held.append(event)
                if reply.decided:  # the held tokens go out; the reply goes on as drawn
                    events.extend(reply.held)
                    reply.held.clear()
                    events.extend(self._advance(row, output, start=index + 1))
                    break
            else:
                if output.finished:  # vLLM ended it before the gates decided (context full)
                    self._end_undecided(row, output, events)

    def _end_undecided(self, row: _Row, output: Any, events: list) -> None:
        """vLLM ended a reply whose gates had not decided: decide them on what they read; a
        gate that fires starts the reply over, else the held tokens go out and it ends."""
        assert row.reply is not None
        if row.reply.close(row.generated, finished=True):
            self._start_over(row, output, events)
            return
        events.extend(row.reply.held)
        row.reply.held.clear()
        events.extend(self._advance(row, output, start=len(output.outputs[0].token_ids)))

    def _start_over(self, row: _Row, output: Any, events: list) -> None:
        """A reply gate fired: drop the reply and start it again from the prompt, the fired
        gates' edits on (same seed)."""
        assert row.reply is not None
        if not output.finished:
            self.llm.abort_request([row.vid])
        self._attempts.pop(row.vid, None)
        self._release(row)
        row.reply.restart()
        row.attempt += 1
        row.vid = f"{row.request.request_id}#reply-{row.attempt}"
        row.stream = TextStream(self.handle.tokenizer, row.request.stop)
        row.generated, row.finish_reason = 0, None
        spec = self._reply_spec(row.reply, row.chosen)
        row.key = None if spec.is_empty else spec.key()
        self._start_or_fail(row, spec, events)

    def _start_or_fail(self, row: _Row, spec: SteeringSpec, events: list[GenerationEvent]) -> None:
        try:
            self._start(row, spec)
        except Exception as error:  # vLLM refused this request alone (its prompt's length)
            row.finish_reason = "error"
            events.append(replace(self._final(row, ""), error=error))
            self._finish(row)

    def _decide(self, rows: list[_Row], events: list[GenerationEvent]) -> None:
        """Decide the prompt gates of ``rows`` from their finished probes' reads, then start
        each request with the interventions its gates chose."""
        ids = [row.request.request_id + PROBE_SUFFIX for row in rows]
        taken = self._take_reads(ids)
        for row, probe_id in zip(rows, ids, strict=True):
            gates = row.gates
            assert gates is not None
            self._release(row)
            row.gates = None
            if probe_id not in taken:
                row.finish_reason = "error"
                error = RuntimeError(f"the gate probe of {row.request.request_id} read nothing")
                events.append(replace(self._final(row, ""), error=error))
                self._finish(row)
                continue
            values = {gate: value for (gate, _), value in taken[probe_id].items()}
            row.chosen = gates.chosen(gates.decide(values))
            spec = self._reply_spec(row.reply, row.chosen)
            row.key = None if spec.is_empty else spec.key()
            self._start_or_fail(row, spec, events)

    def _take_reads(self, ids: list[str]) -> dict[str, dict[tuple[int, int], float]]:
        """The gate values the workers read for ``ids``, by (gate, offset)."""
        # every worker reads the same residual stream: the first worker's values serve
        return worker.unpack(self.llm.collective_rpc(worker.take_reads, args=(ids,))[0])

    def run(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Generate ``requests`` to completion; results in the order given."""
        return run_to_end(self, requests)

    def close(self, final: bool = False) -> None:
        """Abort whatever still runs and forget its steering; ``final`` also shuts the vLLM
        engine down (the model is unloaded)."""
        if self._rows:
            self.llm.abort_request(list(self._attempts) + list(self._probes))
        for row in list(self._rows.values()):
            self._finish(row)
        if final:
            shutdown_vllm(self.llm)

    # -- internals ----------------------------------------------------------------------------

    def _start(self, row: _Row, spec: SteeringSpec) -> None:
        from vllm.inputs import TokensPrompt

        request = row.request
        if row.key is not None:
            self.registry.hold(row.key, spec, saes_of(request.interventions))
        prompt = TokensPrompt(prompt_token_ids=row.prompt_ids)
        salt, speakers = spec.salt(), None
        if spec.needs_speakers:
            speakers = speakers_args(request.speakers, request.speaker)
            salt = f"{salt}-{speakers_salt(speakers)}"
        if salt is not None:
            prompt["cache_salt"] = salt
        self._rows[request.request_id] = row
        if row.gates is not None:  # its gate probe first (steer.backends.vllm.gates)
            probe_id = request.request_id + PROBE_SUFFIX
            self._probes[probe_id] = row
            assert row.key is not None  # a probe always reads
            self.llm.add_request(probe_id, prompt, probe_params(row.key, probe_id, speakers))
            return
        pipeline = None
        if needs_pipeline(request.sampling):  # samplers vLLM lacks: steer's logits processor
            vocab = int(self.handle.model.config.vocab_size)
            state = SamplerState.for_request(request.sampling, self.handle.tokenizer, vocab)
            pipeline = encode(request.sampling, state)
        params = sampling_params(
            request,
            row.seed,
            self.handle.eos_token_ids,
            row.key,
            pipeline,
            speakers,
            row.vid if spec.reads else None,
        )
        self._attempts[row.vid] = row
        self.llm.add_request(row.vid, prompt, params)  # raises for this row alone

    def _advance(self, row: _Row, output: Any, start: int = 0) -> list[GenerationEvent]:
        """The events of ``output``'s tokens from ``start`` on, and the row's end."""
        if not row.counted_cache and output.num_cached_tokens is not None:
            self.cached_prompt_tokens += int(output.num_cached_tokens)
            row.counted_cache = True
        completion = output.outputs[0]
        tokens = list(completion.token_ids)
        logprobs = completion.logprobs or [None] * len(tokens)
        events = []
        for token, ranked in zip(tokens[start:], logprobs[start:], strict=False):
            if row.finish_reason is not None:
                break
            events.append(self._token_event(row, int(token), _top(ranked, row.request)))
        if row.finish_reason is None and output.finished:
            # vLLM ended it for a reason of its own (the context is full)
            row.finish_reason = "length"
            events.append(self._final(row, row.stream.flush()))
        if row.finish_reason is not None:
            if not output.finished:
                self.llm.abort_request([row.vid])
            self._finish(row)
        return events

    def _token_event(
        self, row: _Row, token: int, top: tuple[tuple[int, float], ...]
    ) -> GenerationEvent:
        """The hf engine's rule for one generated token (EOS, stop strings, length)."""
        row.generated += 1
        delta, row.finish_reason = next_text(
            row.stream, token, self.handle.eos_token_ids, row.generated, row.request.max_new_tokens
        )
        if row.finish_reason:
            return self._final(row, delta, (token,), top)
        return GenerationEvent(row.request.request_id, (token,), delta, top)

    def _final(
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
            usage=Usage(len(row.prompt_ids), row.generated),
            seed=row.seed,
        )

    def _finish(self, row: _Row) -> None:
        self._rows.pop(row.request.request_id, None)
        self._attempts.pop(row.vid, None)
        self._release(row)

    def _release(self, row: _Row) -> None:
        """Drop ``row``'s hold on its steering registration (and its probe's entry)."""
        self._probes.pop(row.request.request_id + PROBE_SUFFIX, None)
        key, row.key = row.key, None
        if key is not None:  # unless unsteered (or it failed before it was registered)
            self.registry.release(key)


def _top(ranked: Any, request: GenerationRequest) -> tuple[tuple[int, float], ...]:
    """vLLM's logprobs of one position (the sampled token is added if it is not in the top k)
    as steer's top-k (token, logprob) pairs, best first."""
    if not request.top_logprobs or not ranked:
        return ()
    best = sorted(ranked.items(), key=lambda item: item[1].rank)
    return tuple(
        (int(token), float(value.logprob))
        for token, value in best
        if value.rank is not None and value.rank <= request.top_logprobs
    )[: request.top_logprobs]
