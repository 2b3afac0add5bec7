"""A small generic job runner: an id, a progress stream, cancellation and a result.

A job is a function ``work(progress, cancelled) -> (result, metadata_json)`` run on a worker
thread (or placed elsewhere: ``JobRunner.place``); ``progress(stage, fraction)`` updates
watchers and ``cancelled`` is a :class:`threading.Event` the function checks between steps.
Direction computation and bakes both run through it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Protocol

from steer.errors import NotFoundError
from steer.service.failures import describe
from steer.service.scheduler import in_short_thread

Work = Callable[[Callable[[str, float], None], threading.Event], tuple[str, str]]


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def done(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


@dataclass(frozen=True)
class JobSnapshot:
    job_id: str
    kind: str
    state: JobState = JobState.QUEUED
    stage: str = ""
    progress: float = 0.0
    result: str = ""
    result_metadata: str = ""
    error_code: str = ""
    error: str = ""


class _Job:
    def __init__(self, snapshot: JobSnapshot) -> None:
        self.snapshot = snapshot
        self.cancelled = threading.Event()
        self.changed = threading.Condition()
        self.version = 0
        #: asyncio watchers: (their loop, the event to set on the next change)
        self.waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    def update(self, **changes: object) -> None:
        with self.changed:
            self.snapshot = replace(self.snapshot, **changes)  # type: ignore[arg-type]
            self.version += 1
            self.changed.notify_all()
            waiters, self.waiters = self.waiters, []
        for loop, event in waiters:
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
                loop.call_soon_threadsafe(event.set)

    async def changed_since(self, version: int) -> None:
        """Return once the job's version is past ``version`` (no thread waits)."""
        loop = asyncio.get_running_loop()
        while True:
            event = asyncio.Event()
            with self.changed:
                if self.version != version:
                    return
                self.waiters.append((loop, event))
            await event.wait()


class Jobs(Protocol):
    """What the servicers need of a job table: :class:`JobRunner` in one process, or a
    cluster's shared one (:class:`steer.cluster.jobs.RemoteJobs`)."""

    #: True when jobs run outside this process (their work must then be plain data)
    remote: bool

    def start(self, kind: str, work: Work) -> JobSnapshot: ...
    def get(self, job_id: str) -> JobSnapshot: ...
    def list(self) -> list[JobSnapshot]: ...
    def cancel(self, job_id: str) -> JobSnapshot: ...
    def watch_async(self, job_id: str) -> AsyncIterator[JobSnapshot]: ...
    def close(self) -> None: ...


#: finished jobs kept for Get / List / Watch; older ones are forgotten (NOT_FOUND)
KEEP_FINISHED = 256


class JobRunner:
    """Runs jobs, ``workers`` at once. Queued and running jobs are always kept; of the finished
    ones only the latest ``keep_finished``, so a long-lived server's job list stays bounded.

    ``place`` wraps each job's work before it runs (:func:`steer.cluster.jobs.on_ray` runs it
    as a Ray task); a runner with one is ``remote``: its work must be plain data (see
    :mod:`steer.service.job_work`), not a closure over the server's loaded models."""

    def __init__(
        self,
        workers: int = 1,
        keep_finished: int = KEEP_FINISHED,
        place: Callable[[str, Work], Work] | None = None,
    ) -> None:
        self.place = place
        #: True when jobs run outside this process (they then load their own models)
        self.remote = place is not None
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="steer-job")
        self._jobs: dict[str, _Job] = {}
        #: ids of finished jobs still kept, oldest first
        self._finished: OrderedDict[str, None] = OrderedDict()
        self._keep_finished = keep_finished
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def start(self, kind: str, work: Work) -> JobSnapshot:
        with self._lock:
            job_id = f"{kind}-{next(self._ids)}"
            job = _Job(JobSnapshot(job_id, kind))
            self._jobs[job_id] = job
        # the executor bounds how many jobs run at once; each runs in a thread of its own that
        # ends with it (see steer.service.scheduler.in_short_thread)
        placed = self.place(job_id, work) if self.place is not None else work
        self._executor.submit(in_short_thread, lambda: self._run(job, placed))
        return job.snapshot

    def _run(self, job: _Job, work: Work) -> None:
        if job.cancelled.is_set():
            self._finish(job, state=JobState.CANCELLED)
            return
        job.update(state=JobState.RUNNING)

        def progress(stage: str, fraction: float) -> None:
            job.update(stage=str(stage), progress=min(1.0, max(0.0, float(fraction))))

        try:
            result, metadata = work(progress, job.cancelled)
        except BaseException as error:  # a job failure is reported, not raised
            if job.cancelled.is_set():
                self._finish(job, state=JobState.CANCELLED)
                return
            failure = describe(error)
            self._finish(job, state=JobState.FAILED, error_code=failure.code, error=failure.message)
            return
        if job.cancelled.is_set():
            self._finish(job, state=JobState.CANCELLED)
            return
        self._finish(
            job, state=JobState.SUCCEEDED, progress=1.0, result=result, result_metadata=metadata
        )

    def _finish(self, job: _Job, **changes: object) -> None:
        """Set the job's final state, then forget the oldest finished jobs beyond the limit."""
        job.update(**changes)
        job_id = job.snapshot.job_id
        with self._lock:
            if job_id not in self._jobs or job_id in self._finished:
                return  # already forgotten, or finished twice (cancelled while queued)
            self._finished[job_id] = None
            while len(self._finished) > self._keep_finished:
                oldest, _ = self._finished.popitem(last=False)
                del self._jobs[oldest]

    def _job(self, job_id: str) -> _Job:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise NotFoundError(
                f"no job {job_id!r} (the latest {self._keep_finished} finished jobs are kept)",
                field="job_id",
            )
        return job

    def get(self, job_id: str) -> JobSnapshot:
        return self._job(job_id).snapshot

    def list(self) -> list[JobSnapshot]:
        with self._lock:
            return [job.snapshot for job in self._jobs.values()]

    def cancel(self, job_id: str) -> JobSnapshot:
        job = self._job(job_id)
        job.cancelled.set()
        if job.snapshot.state is JobState.QUEUED:
            self._finish(job, state=JobState.CANCELLED)
        return job.snapshot

    def watch(
        self, job_id: str, is_active: Callable[[], bool] = lambda: True
    ) -> Iterator[JobSnapshot]:
        """Yield the job's state now and after every change, until it is done."""
        job = self._job(job_id)
        seen = -1
        while True:
            with job.changed:
                while job.version == seen and is_active():
                    job.changed.wait(timeout=0.5)
                seen, snapshot = job.version, job.snapshot
            if not is_active():
                return
            yield snapshot
            if snapshot.state.done:
                return

    async def watch_async(self, job_id: str) -> AsyncIterator[JobSnapshot]:
        """:meth:`watch` for an event loop: the job's state now and after every change, until
        it is done; a watcher that goes away is simply no longer awaited."""
        job = self._job(job_id)
        seen = -1
        while True:
            await job.changed_since(seen)
            with job.changed:
                seen, snapshot = job.version, job.snapshot
            yield snapshot
            if snapshot.state.done:
                return

    def close(self) -> None:
        with self._lock:
            jobs = list(self._jobs.values())
        for job in jobs:
            job.cancelled.set()
        self._executor.shutdown(wait=False, cancel_futures=True)
