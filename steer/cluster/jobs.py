"""A cluster's jobs: one job table every replica shares, each job's work in a Ray task.

* ``SteerJobs`` (one replica, no CPU of its own) holds the :class:`JobRunner` behind the Jobs
  rpcs: a job started through any replica is seen, watched and cancelled through any other.
* Each job's work (plain data, :mod:`steer.service.job_work`) runs as a Ray task with the
  ``[jobs]`` resources of the deployment file, in a worker process that loads its own model, so a
  direction compute or a bake never takes a serving replica's cores. Its progress streams back
  as the task's yields; cancelling a job kills its task (a bake's partial output is removed by
  the next server that starts on the same models root, as after any killed bake).
* :class:`RemoteJobs` is what a replica's servicers use instead of a local runner.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from steer.errors import CancelledError, SteerError
from steer.service.failures import describe
from steer.service.jobs import JobRunner, JobSnapshot, Work


class JobFailed(SteerError):
    """A job's failure as its Ray task reported it (status name and message kept)."""

    def __init__(self, message: str, *, field: str | None = None, status: str = "INTERNAL"):
        super().__init__(message, field=field)
        self.status_code = status


def _run_job(work: Work) -> Iterator[tuple[Any, ...]]:
    """The Ray task: run ``work`` on a thread, yield its progress, then its outcome."""
    import os

    import ray

    events: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
    context = ray.get_runtime_context()
    where = f"running as Ray task {context.get_task_id()} (pid {os.getpid()})"

    def run() -> None:
        try:
            result, metadata = work(lambda s, f: events.put(("progress", s, f)), threading.Event())
            events.put(("done", result, metadata))
        except BaseException as error:  # reported to the job table, not raised here
            failure = describe(error)
            events.put(("failed", failure.code, failure.message))

    yield ("progress", where, 0.0)
    threading.Thread(target=run, name="steer-job", daemon=True).start()
    while True:
        event = events.get()
        yield event
        if event[0] != "progress":
            return


def on_ray(num_cpus: float, num_gpus: float) -> Callable[[str, Work], Work]:
    """A :class:`JobRunner` ``place``: each job's work becomes a Ray task with these resources,
    followed here (progress relayed, cancellation kills the task)."""
    import ray

    task = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, num_returns="streaming", max_retries=0)(
        _run_job
    )

    def place(job_id: str, work: Work) -> Work:
        def follow(progress: Callable[[str, float], None], cancelled: threading.Event) -> Any:
            stream: Any = task.options(name=f"steer-{job_id}").remote(work)
            progress(f"waiting for a Ray worker ({num_cpus:g} CPU, {num_gpus:g} GPU)", 0.0)
            while True:
                ready, _ = ray.wait([stream], timeout=0.5)
                if cancelled.is_set():
                    ray.cancel(stream, force=True)
                    raise CancelledError("cancelled")
                if not ready:
                    continue
                kind, *rest = ray.get(next(stream))
                if kind == "progress":
                    progress(*rest)
                elif kind == "done":
                    return tuple(rest)
                else:
                    raise JobFailed(rest[1], status=rest[0])

        return follow

    return place


class JobsBody:
    """The shared job table (wrapped as the ``SteerJobs`` deployment by ``build_app``)."""

    def __init__(self, config: dict[str, Any]) -> None:
        from steer.cluster.config import ClusterConfig

        jobs = ClusterConfig.from_dict(config).jobs
        self.runner = JobRunner(
            workers=jobs.max_running, place=on_ray(jobs.num_cpus, jobs.num_gpus)
        )

    def start(self, kind: str, work: Work) -> JobSnapshot:
        return self.runner.start(kind, work)

    def get(self, job_id: str) -> JobSnapshot:
        return self.runner.get(job_id)

    def list(self) -> list[JobSnapshot]:
        return self.runner.list()

    def cancel(self, job_id: str) -> JobSnapshot:
        return self.runner.cancel(job_id)

    async def watch(self, job_id: str) -> AsyncIterator[JobSnapshot]:
        async for snapshot in self.runner.watch_async(job_id):
            yield snapshot


def _unwrapped(error: BaseException) -> BaseException:
    """The steer error a deployment raised, out of Ray's wrapper (or ``error`` itself)."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, SteerError) else error


class RemoteJobs:
    """A replica's view of the shared job table (the servicers' ``Jobs``)."""

    remote = True

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    def _call(self, method: str, *args: Any) -> Any:
        try:
            return getattr(self.handle, method).remote(*args).result()
        except Exception as error:
            raise _unwrapped(error) from None

    def start(self, kind: str, work: Work) -> JobSnapshot:
        return self._call("start", kind, work)  # type: ignore[no-any-return]

    def get(self, job_id: str) -> JobSnapshot:
        return self._call("get", job_id)  # type: ignore[no-any-return]

    def list(self) -> list[JobSnapshot]:
        return self._call("list")  # type: ignore[no-any-return]

    def cancel(self, job_id: str) -> JobSnapshot:
        return self._call("cancel", job_id)  # type: ignore[no-any-return]

    async def watch_async(self, job_id: str) -> AsyncIterator[JobSnapshot]:
        try:
            async for snapshot in self.handle.options(stream=True).watch.remote(job_id):
                yield snapshot
        except Exception as error:
            raise _unwrapped(error) from None

    def close(self) -> None:
        """Nothing to close: the job table outlives any one replica."""
