"""Attach per-hook-point functions to a model for the duration of a ``with`` block.

This is the only place that registers PyTorch hooks. Every caller -- generation, activation
reading, evaluation -- goes through :func:`attach`, and every hook is removed in ``finally``.

Hooks live on modules that every forward pass shares, so a hook acts only on forward passes run
by the thread that attached it: a direction computation on a job thread and the engine's decode
steps on its own thread can use one model at once without seeing each other's interventions.
:func:`cache_keyword` names the argument a model's ``forward`` takes its KV cache under.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from steer.hooks import HookKind, HookPoint, HookResolver

HookFn = Callable[[torch.Tensor], torch.Tensor]


def _replace_output(output: Any, fn: HookFn) -> Any:
    """Apply ``fn`` to a module output that is a tensor or a tuple whose first item is one."""
    if isinstance(output, torch.Tensor):
        return fn(output)
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return (fn(output[0]), *output[1:])
    raise TypeError(f"cannot hook a module output of type {type(output).__name__}")


def _first(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output[0]


@contextmanager
def attach(resolver: HookResolver, functions: Mapping[HookPoint, HookFn]) -> Iterator[None]:
    """Register ``functions`` (hook point -> x -> x) on the model; remove them on exit.

    ``hook_resid_mid`` has no module of its own whose output *is* the residual stream, so it is
    computed where it is formed: the layer input ``h`` is remembered by a pre-hook on the layer,
    and at the attention sub-block's output ``a`` the function sees ``mid = h + a``; the new
    attention output is ``fn(mid) - h``.
    """
    handles: list[RemovableHandle] = []
    owned = _owned_by(threading.get_ident())
    try:
        for point in sorted(functions, key=forward_order):
            handles.extend(_register(resolver, point, functions[point], functions, owned))
        yield
    finally:
        for handle in handles:
            handle.remove()


_KIND_ORDER = {
    HookKind.EMBED: 0,
    HookKind.RESID_PRE: 1,
    HookKind.ATTN_OUT: 2,
    HookKind.RESID_MID: 3,
    HookKind.MLP_OUT: 4,
    HookKind.RESID_POST: 5,
}


Wrap = Callable[[Callable[..., Any]], Callable[..., Any]]


def _owned_by(owner: int) -> Wrap:
    """Make a PyTorch hook a no-op (``None``: output unchanged) on threads other than ``owner``."""

    def wrap(hook: Callable[..., Any]) -> Callable[..., Any]:
        def owned(*args: Any) -> Any:
            if threading.get_ident() != owner:
                return None
            return hook(*args)

        return owned

    return wrap


def forward_order(point: HookPoint) -> tuple[int, int]:
    """Sort key of hook points in the order a forward pass reaches them."""
    return (-1 if point.layer is None else point.layer, _KIND_ORDER[point.kind])


def compose(*functions: HookFn) -> HookFn:
    """One hook function that applies ``functions`` in order (e.g. steer, then record)."""

    def composed(x: torch.Tensor) -> torch.Tensor:
        for fn in functions:
            x = fn(x)
        return x

    return composed


def _register(
    resolver: HookResolver,
    point: HookPoint,
    fn: HookFn,
    functions: Mapping[HookPoint, HookFn],
    owned: Wrap,
) -> list[RemovableHandle]:
    kind, layer = point.kind, point.layer
    if kind is HookKind.EMBED:
        return [resolver.embed.register_forward_hook(owned(lambda _m, _i, out: fn(out)))]
    assert layer is not None
    if kind is HookKind.RESID_PRE:
        return [
            resolver.layer(layer).register_forward_pre_hook(owned(_pre_hook(fn)), with_kwargs=True)
        ]
    if kind is HookKind.RESID_POST:
        return [
            resolver.layer(layer).register_forward_hook(
                owned(lambda _m, _i, out: _replace_output(out, fn))
            )
        ]
    if kind is HookKind.MLP_OUT:
        return [
            resolver.mlp_out_module(layer).register_forward_hook(
                owned(lambda _m, _i, out: _replace_output(out, fn))
            )
        ]
    if kind is HookKind.ATTN_OUT:
        mid = functions.get(HookPoint(layer, HookKind.RESID_MID))
        if mid is not None:
            return []  # registered together with resid_mid below, which needs the same hook
        return [
            resolver.attn_out_module(layer).register_forward_hook(
                owned(lambda _m, _i, out: _replace_output(out, fn))
            )
        ]
    if kind is HookKind.RESID_MID:
        return _register_mid(
            resolver, layer, fn, functions.get(HookPoint(layer, HookKind.ATTN_OUT)), owned
        )
    raise AssertionError(f"unhandled hook kind {kind}")


def _pre_hook(fn: HookFn) -> Callable[..., Any]:
    def hook(_module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (fn(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}

    return hook


def _register_mid(
    resolver: HookResolver, layer: int, mid_fn: HookFn, attn_fn: HookFn | None, owned: Wrap
) -> list[RemovableHandle]:
    layer_input: list[torch.Tensor] = []

    def remember(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        layer_input[:] = [args[0] if args else kwargs["hidden_states"]]

    def at_attention_output(attention_output: torch.Tensor) -> torch.Tensor:
        if attn_fn is not None:
            attention_output = attn_fn(attention_output)
        residual = layer_input[0]
        return mid_fn(residual + attention_output) - residual

    # The remembering pre-hook must run after any resid_pre hook on the same layer; PyTorch runs
    # pre-hooks in registration order, so register it last with prepend=False (the default).
    return [
        resolver.layer(layer).register_forward_pre_hook(owned(remember), with_kwargs=True),
        resolver.attn_out_module(layer).register_forward_hook(
            owned(lambda _m, _i, out: _replace_output(out, at_attention_output))
        ),
    ]


def recorder(store: list[torch.Tensor], select: Callable[[torch.Tensor], torch.Tensor]) -> HookFn:
    """A hook function that saves ``select(x)`` (detached, on CPU, float32) and changes nothing."""

    def record(x: torch.Tensor) -> torch.Tensor:
        store.append(select(x.detach()).to("cpu", torch.float32))
        return x

    return record


def cache_keyword(model: Any) -> str:
    """The name this model's ``forward`` takes the KV cache under: ``cache`` since transformers
    renamed it (``past_key_values`` then warns on every call), else the old name."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"
