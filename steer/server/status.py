"""Errors on the wire: domain exceptions -> gRPC status codes, never a stack trace.

Every servicer method is wrapped by :func:`guard`, which answers each exception with the status
:func:`steer.service.failures.describe` names for it (``INTERNAL`` with an incident id for one
that is not a domain error; the traceback goes to the server log only).

The offending field travels in the trailing metadata key ``steer-field``
(:data:`steer.errors.FIELD_METADATA_KEY`) so the client can re-raise the same typed exception
with the same ``field``.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from steer.errors import FIELD_METADATA_KEY, InvalidArgumentError
from steer.service.failures import describe

__all__ = ["guard", "status_of"]


class Malformed:
    """Stands in for a request whose bytes did not parse; :func:`guard` answers it."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def status_of(error: BaseException) -> tuple[grpc.StatusCode, str, str | None]:
    """(status code, message, field) for an exception raised while serving."""
    failure = describe(error)
    return grpc.StatusCode[failure.code], failure.message, failure.field


async def abort(context: grpc.aio.ServicerContext, error: BaseException) -> None:
    code, message, field = status_of(error)
    if field:
        context.set_trailing_metadata(((FIELD_METADATA_KEY, field),))
    await context.abort(code, message)


def _check_request(request: Any) -> None:
    if isinstance(request, Malformed):
        raise InvalidArgumentError(f"the request does not parse: {request.error}")


def inline(method: Callable[..., Any]) -> Callable[..., Any]:
    """Mark a synchronous servicer method cheap and non-blocking: it runs on the event loop
    itself, so it answers even while every blocking-rpc thread is busy (Models.Info, List)."""
    method.steer_inline = True  # type: ignore[attr-defined]
    return method


def guard(method: Callable[..., Any], streaming: bool) -> Callable[..., Any]:
    """Wrap one servicer method for the asyncio server; every exception becomes its status.

    Streaming methods are async generators: a waiting stream holds no thread. Unary methods are
    coroutines, :func:`inline` functions, or ordinary functions, which run in the loop's default
    executor (a bounded pool of threads for blocking work: file I/O, tokenising, jobs).
    """
    if streaming:
        if not inspect.isasyncgenfunction(method):
            raise TypeError(f"{method.__qualname__}: a streaming rpc must be an async generator")

        @functools.wraps(method)
        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                _check_request(request)
                async for item in method(request, context):
                    yield item
            except Exception as error:
                await abort(context, error)

        return stream

    @functools.wraps(method)
    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            _check_request(request)
            if inspect.iscoroutinefunction(method):
                return await method(request, context)
            if getattr(method, "steer_inline", False):
                return method(request, context)
            return await asyncio.get_running_loop().run_in_executor(
                None, functools.partial(method, request, context)
            )
        except Exception as error:
            await abort(context, error)

    return unary
