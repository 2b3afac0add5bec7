"""The hook resolver on every supported architecture: names, ranges, and what the values are."""

from __future__ import annotations

import pytest
import torch
from equivalence import residual_stream
from tiny import tiny_tokenizer
from transformers import AutoModelForCausalLM, GPT2Config

from steer.activations import forward
from steer.errors import InvalidArgumentError, UnsupportedArchitectureError
from steer.hooks import ArchitectureLayout, all_hook_names, parse_hook_name
from steer.models import ModelHandle, from_pretrained_model

PROMPTS = [[5, 9, 30, 31, 32, 40], [7, 8, 9]]


def test_every_hook_name_resolves_and_reads(tiny: ModelHandle) -> None:
    names = tiny.hook_names()
    assert len(names) == 1 + 5 * tiny.num_layers
    result = forward(tiny, PROMPTS, hooks=names, positions="all")
    for name in names:
        values = result.activations[name]
        assert isinstance(values, list)
        assert [tuple(v.shape) for v in values] == [(len(p), tiny.d_model) for p in PROMPTS]


def test_hook_values_match_the_residual_stream(tiny: ModelHandle) -> None:
    """resid_pre/post agree with HF hidden_states; mid = pre + attn_out; post = mid + mlp_out."""
    residual_stream(tiny, PROMPTS[0])


def test_a_read_without_logits_stops_after_its_last_point(tiny: ModelHandle) -> None:
    """Reading early hooks without logits ends the pass there: the later blocks never run, and
    the values equal a read of the whole pass (the same one with logits), bit for bit."""
    hooks = ["blocks.0.hook_mlp_out", "hook_embed", "blocks.1.hook_resid_mid"]
    later = tiny.resolver.layer(tiny.num_layers - 1)
    calls: list[int] = []
    handle = later.register_forward_pre_hook(lambda _module, _args: calls.append(1))
    try:
        early = forward(tiny, PROMPTS, hooks=hooks, positions="all")
        assert calls == []
        whole = forward(tiny, PROMPTS, hooks=hooks, positions="all", logits="last")
        assert len(calls) == 1
    finally:
        handle.remove()
    for name in hooks:
        for read, reference in zip(early.activations[name], whole.activations[name], strict=True):
            assert torch.equal(read, reference)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("blocks.99.hook_resid_post", "out of range"),
        ("blocks.0.hook_resid_side", "unknown hook kind"),
        ("layers.0.mlp", "unknown hook name"),
        ("blocks.0.hook_embed", "no layer"),
        ("", "unknown hook name"),
    ],
)
def test_bad_hook_names_are_typed_errors(name: str, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message) as error:
        parse_hook_name(name, num_layers=4)
    assert error.value.field == "hook"


def test_all_hook_names_are_in_forward_order() -> None:
    names = all_hook_names(2)
    assert names[:3] == ["hook_embed", "blocks.0.hook_resid_pre", "blocks.0.hook_attn_out"]
    assert names[-1] == "blocks.1.hook_resid_post"


def _tiny_gpt2() -> AutoModelForCausalLM:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tiny_tokenizer()), n_embd=32, n_layer=2, n_head=2, n_positions=64
    )
    return AutoModelForCausalLM.from_config(config)


def test_unsupported_architecture_fails_loudly() -> None:
    with pytest.raises(UnsupportedArchitectureError, match="ArchitectureLayout"):
        from_pretrained_model(_tiny_gpt2(), tiny_tokenizer())


def test_a_user_layout_makes_an_unknown_architecture_work() -> None:
    layout = ArchitectureLayout(
        layers="transformer.h",
        embed="transformer.wte",
        final_norm="transformer.ln_f",
        attn_out="attn",
        mlp_out="mlp",
        mid_norm="ln_2",
        attn_write="attn.c_proj",
        mlp_write="mlp.c_proj",
    )
    handle = from_pretrained_model(_tiny_gpt2(), tiny_tokenizer(), layout=layout)
    with torch.no_grad():
        hidden = handle.model(torch.tensor([[1, 2, 3]]), output_hidden_states=True).hidden_states
    # GPT-2's final hidden state is after ln_f, so compare layer 0's output
    acts = forward(handle, [[1, 2, 3]], hooks=["blocks.0.hook_resid_post"]).activations
    torch.testing.assert_close(acts["blocks.0.hook_resid_post"], hidden[1][:, -1])


def test_hooks_act_only_on_the_thread_that_attached_them(tiny: ModelHandle) -> None:
    """A job thread's hooks (every kind, resid_mid included) never leak into another thread's
    forward pass that runs while they are attached."""
    import threading

    from steer.hooks import HookPoint
    from steer.runtime import attach

    ids = torch.tensor([PROMPTS[0]])

    def logits() -> torch.Tensor:
        with torch.no_grad():
            return tiny.model(ids).logits

    clean = logits()
    points = [parse_hook_name(name, tiny.num_layers) for name in tiny.hook_names()]
    functions = {point: (lambda x: x + 1.0) for point in points if isinstance(point, HookPoint)}
    attached, release = threading.Event(), threading.Event()
    seen: dict[str, torch.Tensor] = {}

    def job() -> None:
        with attach(tiny.resolver, functions):
            seen["job"] = logits()
            attached.set()
            release.wait(timeout=30)

    thread = threading.Thread(target=job)
    thread.start()
    try:
        assert attached.wait(timeout=30)
        other = logits()  # runs while the job thread's hooks are registered
    finally:
        release.set()
        thread.join()
    assert torch.equal(other, clean)
    assert not torch.allclose(seen["job"], clean)
