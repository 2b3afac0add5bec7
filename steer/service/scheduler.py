"""One engine loop per model: concurrent Generate calls join its running batch.

A :class:`ModelWorker` owns an :class:`~steer.generation.Engine` and a thread that calls
``Engine.step()`` while there is work, handing each event to the queue of the request it belongs
to. Handlers :meth:`~ModelWorker.submit` requests and iterate their :class:`Subscription`; a
client that cancels or goes away calls :meth:`Subscription.cancel`, which frees the row at the
next step.

Requests sent together reach the worker a few milliseconds apart (each handler converts and
tokenises its own; 16 streams released at once arrive over 10-20 ms on loopback). An idle engine
that stepped on the first one would prefill it alone and let the others join one prefill later: a
second prefill, a KV-cache merge and rows that finish a step apart. So before the first step of an
empty batch the loop waits while requests keep coming: until no request has been announced
(:meth:`ModelWorker.arrival`, held by a handler while it prepares and submits) or submitted for
``ARRIVAL_GAP`` seconds, and never longer than ``admission_window``. A lone request pays the gap
once (5 ms against a prefill of 100+ ms); requests arriving while a batch runs join at the next
step boundary as before.

Other model code (SAE feature reads) is handed to the same thread with :meth:`ModelWorker.call`
and runs between two steps: hooks are attached to modules the engine's forward passes share, so
only one forward pass of a model may run at a time. The running batch waits for the call.

If a step raises (a bug, or ``torch.OutOfMemoryError`` inside one request), the engine's batch
state can no longer be trusted: every request in that engine gets the error as its status, the
engine is replaced by a fresh one, and the loop carries on serving new requests.

Heavy model code that is not a step (loading a model, its weight hash, jobs) runs in a thread of
its own that ends with it (:func:`in_short_thread`), never on the main thread or a gRPC handler
thread: see that function for why.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from steer.backends import GenerationEngine
from steer.errors import ResourceExhaustedError, UnavailableError
from steer.generation import Engine, GenerationEvent, GenerationRequest, encoded
from steer.limits import check_text_size
from steer.models import ModelHandle

log = logging.getLogger("steer.server")

T = TypeVar("T")

#: quiet time (seconds) after which an idle engine stops waiting for more requests of a burst
ARRIVAL_GAP = 0.005


def in_short_thread(function: Callable[[], T]) -> T:
    """Run ``function`` in a new thread that ends when it returns; return its result or raise
    its exception.

    torch's CPU kernels run on OpenMP (libgomp), which keeps a pool of worker threads for every
    thread that ever ran a parallel region, for that thread's whole life. Once pools hold more
    threads than there are cores, libgomp lets its workers spin only briefly before they sleep,
    and each of the engine's parallel regions then waits for its workers to wake. Measured on 2
    cores with SmolLM2: decode steps about 15% slower, for the rest of the process, after one
    weight hash had run on a gRPC handler thread. A thread that ends takes its pool with it.
    """
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append((True, function()))
        except BaseException as error:  # handed to the caller below
            outcome.append((False, error))

    thread = threading.Thread(target=run, name="steer-model-work")
    thread.start()
    thread.join()
    succeeded, value = outcome[0]
    if not succeeded:
        raise value
    return value  # type: ignore[no-any-return]


@dataclass
class Stats:
    """Counters of one worker (read without locking; they only grow)."""

    requests_total: int = 0
    cancelled_total: int = 0
    failed_total: int = 0
    tokens_total: int = 0


class Subscription:
    """The events of one or more requests submitted together, in arrival order.

    Iterating yields ``(index, event)`` where ``index`` is the request's position in the
    submitted list, until every request has its final event. Iterate it from a thread, or with
    ``async for`` when it was submitted with an event ``loop`` (then no thread waits on it). A
    request that failed on its own raises its error; an engine failure is raised too.
    """

    def __init__(
        self,
        worker: ModelWorker,
        request_ids: Sequence[str],
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self._worker = worker
        self.request_ids = tuple(request_ids)
        self._index = {request_id: i for i, request_id in enumerate(request_ids)}
        self._loop = loop
        self.queue: queue.SimpleQueue[GenerationEvent | BaseException] = queue.SimpleQueue()
        self._async_queue: asyncio.Queue[GenerationEvent | BaseException] = asyncio.Queue()
        self._open = set(request_ids)

    def put(self, item: GenerationEvent | BaseException) -> None:
        """Hand an event (or the engine's failure) to the reader; called by the engine thread."""
        if self._loop is None:
            self.queue.put(item)
            return
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody reads this any more
            self._loop.call_soon_threadsafe(self._async_queue.put_nowait, item)

    def _take(self, item: GenerationEvent | BaseException) -> tuple[int, GenerationEvent]:
        if isinstance(item, BaseException):
            self._open.clear()
            raise item
        if item.finish_reason is not None:
            self._open.discard(item.request_id)
        if item.error is not None:
            self._open.clear()
            raise item.error
        return self._index[item.request_id], item

    def __iter__(self) -> Iterator[tuple[int, GenerationEvent]]:
        while self._open:
            yield self._take(self.queue.get())

    async def __aiter__(self) -> AsyncIterator[tuple[int, GenerationEvent]]:
        while self._open:
            yield self._take(await self._async_queue.get())

    def cancel(self) -> None:
        """Free this subscription's rows at the next step (no-op once they finished)."""
        for request_id in self.request_ids:
            self._worker.cancel(request_id)


class ModelWorker:
    """An engine and the thread that steps it."""

    def __init__(
        self,
        handle: ModelHandle,
        *,
        max_batch: int = 16,
        max_waiting: int = 256,
        max_prompt_tokens: int = 8192,
        admission_window: float = 0.05,
        engine_factory: Callable[[], GenerationEngine] | None = None,
    ) -> None:
        self.handle = handle
        self.max_batch = max_batch
        self.max_waiting = max_waiting
        self.max_prompt_tokens = max_prompt_tokens
        #: longest wait of an idle engine for announced requests (seconds)
        self.admission_window = admission_window
        self.stats = Stats()
        #: makes this worker's engine (the hf Engine unless a backend gives another), again
        #: after a failed step
        self._new_engine: Callable[[], GenerationEngine] = engine_factory or (
            lambda: Engine(handle, max_batch=max_batch, max_waiting=max_waiting)
        )
        self._engine: GenerationEngine = self._new_engine()
        self._subscriptions: dict[str, Subscription] = {}
        #: model code waiting to run on the engine thread between two steps
        self._calls: list[tuple[Callable[[], Any], Future[Any]]] = []
        #: requests announced with :meth:`arrival` and not yet through it
        self._arriving = 0
        #: time.monotonic() of the latest announcement or submit
        self._last_arrival = 0.0
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._closing = False
        self._closed = False
        self._thread = threading.Thread(
            target=self._loop, name=f"steer-engine-{handle.name}", daemon=True
        )
        self._thread.start()

    # -- requests ---------------------------------------------------------------------------

    def submit(
        self,
        requests: Sequence[GenerationRequest],
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> Subscription:
        """Queue ``requests`` together (all or none); their events arrive on one subscription
        (read with ``async for`` on ``loop`` when it is given)."""
        prepared = [self._encode(request) for request in requests]
        with self._lock:
            if self._closing:
                raise UnavailableError(f"model {self.handle.name!r} is shutting down")
            if self._engine.num_waiting + len(prepared) > self.max_waiting:
                raise ResourceExhaustedError(
                    f"{self._engine.num_waiting} requests already waiting for "
                    f"{self.handle.name!r}; retry later",
                    field="queue",
                )
            subscription = Subscription(self, [r.request_id for r in prepared], loop)
            submitted: list[str] = []
            try:
                for request in prepared:
                    self._subscriptions[request.request_id] = subscription
                    submitted.append(self._engine.submit(request))
            except BaseException:
                for request in prepared:
                    self._subscriptions.pop(request.request_id, None)
                for request_id in submitted:
                    self._engine.cancel(request_id)
                raise
            self.stats.requests_total += len(prepared)
            self._last_arrival = time.monotonic()
            self._wake.notify()
        return subscription

    @contextmanager
    def arrival(self) -> Iterator[None]:
        """Announce a request while it is prepared and submitted (inside this block).

        An idle engine holds its first step while announced requests are being prepared, so
        requests sent together share one prefill (see the module docstring).
        """
        with self._lock:
            self._arriving += 1
            self._last_arrival = time.monotonic()
        try:
            yield
        finally:
            with self._lock:
                self._arriving -= 1
                self._wake.notify()

    def _encode(self, request: GenerationRequest) -> GenerationRequest:
        """Tokenise here so the prompt length limit is checked before the engine sees it (and
        the text's size before the tokeniser sees it)."""
        if request.prompt_ids is not None and len(request.prompt_ids) > self.max_prompt_tokens:
            raise ResourceExhaustedError(
                f"{len(request.prompt_ids)} prompt tokens; this server accepts at most "
                f"{self.max_prompt_tokens}",
                field="prompt",
            )
        characters = len(request.prompt or "") + sum(
            len(message.content) for message in request.messages or ()
        )
        check_text_size(characters, self.max_prompt_tokens, "prompt")
        request = encoded(self.handle, request)
        assert request.prompt_ids is not None
        if len(request.prompt_ids) > self.max_prompt_tokens:
            raise ResourceExhaustedError(
                f"the prompt has {len(request.prompt_ids)} tokens; this server accepts at most "
                f"{self.max_prompt_tokens}",
                field="prompt",
            )
        return replace(request, request_id=f"{self.handle.name}-{uuid.uuid4().hex}")

    def call(self, function: Callable[[], Any]) -> Future[Any]:
        """Run ``function()`` on the engine thread before its next step; its future result.

        Cancelling the future before it starts (the client went away) skips the call.
        """
        future: Future[Any] = Future()
        with self._lock:
            if self._closing:
                raise UnavailableError(f"model {self.handle.name!r} is shutting down")
            self._calls.append((function, future))
            self._wake.notify()
        return future

    def cancel(self, request_id: str) -> None:
        with self._lock:
            if request_id in self._subscriptions:
                self._engine.cancel(request_id)
                self._wake.notify()

    @property
    def running(self) -> int:
        return self._engine.num_running

    @property
    def waiting(self) -> int:
        return self._engine.num_waiting

    @property
    def open_requests(self) -> int:
        with self._lock:
            return len(self._subscriptions)

    # -- the loop ---------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._closed and not self._engine.has_work and not self._calls:
                    self._wake.wait()
                self._await_arrivals()
                calls, self._calls = self._calls, []
                closed, engine = self._closed, self._engine
            for function, future in calls:
                _run_call(function, future, closed)
            if closed:
                return
            if not engine.has_work:
                continue
            try:
                events = engine.step()
            except BaseException as error:  # any failure must not stop the loop
                self._fail_engine(engine, error)
                continue
            self._dispatch(events)

    def _await_arrivals(self) -> None:
        """With the lock held: let a burst of requests gather before an empty batch starts."""
        if self._engine.num_running or self.admission_window <= 0:
            return
        deadline = time.monotonic() + self.admission_window
        while not self._calls and not self._closing:
            now = time.monotonic()
            until = deadline
            if not self._arriving:
                until = min(deadline, self._last_arrival + ARRIVAL_GAP)
            if now >= until:
                return
            self._wake.wait(until - now)

    def _dispatch(self, events: Sequence[GenerationEvent]) -> None:
        with self._lock:
            for event in events:
                subscription = self._subscriptions.get(event.request_id)
                if event.finish_reason is not None:
                    self._subscriptions.pop(event.request_id, None)
                    if event.finish_reason == "cancelled":
                        self.stats.cancelled_total += 1
                    elif event.finish_reason == "error":
                        self.stats.failed_total += 1
                self.stats.tokens_total += len(event.token_ids)
                if subscription is not None:
                    subscription.put(event)

    def _fail_engine(self, engine: GenerationEngine, error: BaseException) -> None:
        log.warning("engine step failed for %s: %r; restarting its batch", self.handle.name, error)
        with self._lock:
            failed = dict(self._subscriptions)
            self._subscriptions.clear()
            self.stats.failed_total += len(failed)
            if engine is self._engine:
                _close_engine(engine, final=False)
                self._engine = self._new_engine()
        for subscription in {id(s): s for s in failed.values()}.values():
            subscription.put(error)

    # -- shutdown ---------------------------------------------------------------------------

    def close(self, grace: float) -> None:
        """Refuse new requests, let open ones finish for ``grace`` seconds, cancel the rest."""
        with self._lock:
            self._closing = True
        deadline = time.monotonic() + grace
        while self.open_requests and time.monotonic() < deadline:
            time.sleep(0.05)
        with self._lock:
            for request_id in list(self._subscriptions):
                self._engine.cancel(request_id)
            self._wake.notify()
        deadline = time.monotonic() + 30.0
        while self.open_requests and time.monotonic() < deadline:
            time.sleep(0.02)
        with self._lock:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=30.0)
        _close_engine(self._engine, final=True)


def _close_engine(engine: GenerationEngine, final: bool) -> None:
    """Let an engine that holds outside resources (the vllm backend's) release them: its open
    requests, and with ``final`` the engine underneath."""
    close = getattr(engine, "close", None)
    if close is not None:
        try:
            close(final=final)
        except Exception as error:  # a failing close must not stop a restart or a shutdown
            log.warning("closing the %s engine failed: %r", type(engine).__name__, error)


def _run_call(function: Callable[[], Any], future: Future[Any], closed: bool) -> None:
    if not future.set_running_or_notify_cancel():
        return  # cancelled while waiting
    if closed:
        future.set_exception(UnavailableError("the model was unloaded"))
        return
    try:
        future.set_result(function())
    except BaseException as error:  # the caller re-raises it; the loop goes on
        future.set_exception(error)
