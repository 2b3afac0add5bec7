"""The one hook resolver: TransformerLens hook names -> modules of a Hugging Face model.

Users, protos, recipes and artifacts name points in the residual stream the TransformerLens way
(``blocks.12.hook_resid_post``). This module maps each name onto a concrete ``nn.Module`` of the
loaded HF model and says how the value is reached there (module input or output), through an
explicit per-architecture table. An architecture that is not in the table fails loudly; a caller
can pass its own :class:`ArchitectureLayout` for it.

Where the value lives, per kind (Llama-style block; Gemma 2/3 differences in brackets)::

    hook_embed        output of the token embedding  [Gemma: already scaled by sqrt(d_model)]
    hook_resid_pre    input of decoder layer L
    hook_attn_out     output of self_attn            [Gemma: output of post_attention_layernorm]
    hook_resid_mid    resid_pre + attn_out = input of the MLP-side norm
                      (post_attention_layernorm)     [Gemma: pre_feedforward_layernorm]
    hook_mlp_out      output of mlp                  [Gemma: output of post_feedforward_layernorm]
                      [MoE: the whole sparse block, routed experts (+ gated shared expert)]
    hook_resid_post   output of decoder layer L

Mixture-of-experts families (Mixtral, Qwen2-MoE, Qwen3-MoE) keep the Llama block; their ``mlp``
is the sparse MoE block (some Qwen MoE layers a dense MLP), described by :class:`ExpertLayout`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from torch import nn

from steer.errors import InvalidArgumentError, UnsupportedArchitectureError


class HookKind(StrEnum):
    EMBED = "hook_embed"
    RESID_PRE = "hook_resid_pre"
    RESID_MID = "hook_resid_mid"
    RESID_POST = "hook_resid_post"
    ATTN_OUT = "hook_attn_out"
    MLP_OUT = "hook_mlp_out"


_BLOCK_HOOK = re.compile(r"^blocks\.(\d+)\.(hook_[a-z_]+)$")


@dataclass(frozen=True, order=True)
class HookPoint:
    """A parsed hook name: ``layer`` is None only for ``hook_embed``."""

    layer: int | None
    kind: HookKind

    @property
    def name(self) -> str:
        if self.kind is HookKind.EMBED:
            return self.kind.value
        return f"blocks.{self.layer}.{self.kind.value}"

    def __str__(self) -> str:
        return self.name


def parse_hook_name(name: str, num_layers: int, *, field: str = "hook") -> HookPoint:
    """Parse and range-check a TransformerLens hook name against a model with ``num_layers``."""
    if name == HookKind.EMBED.value:
        return HookPoint(None, HookKind.EMBED)
    match = _BLOCK_HOOK.match(name)
    if match is None:
        raise InvalidArgumentError(
            f"unknown hook name {name!r}; expected 'hook_embed' or 'blocks.L.KIND' with KIND one "
            f"of {', '.join(k.value for k in HookKind if k is not HookKind.EMBED)}",
            field=field,
        )
    layer, kind_name = int(match.group(1)), match.group(2)
    try:
        kind = HookKind(kind_name)
    except ValueError:
        raise InvalidArgumentError(
            f"unknown hook kind {kind_name!r} in {name!r}; known kinds: "
            f"{', '.join(k.value for k in HookKind)}",
            field=field,
        ) from None
    if kind is HookKind.EMBED:
        raise InvalidArgumentError("hook_embed has no layer; write 'hook_embed'", field=field)
    if layer >= num_layers:
        raise InvalidArgumentError(
            f"layer {layer} out of range in {name!r}: the model has layers 0..{num_layers - 1}",
            field=field,
        )
    return HookPoint(layer, kind)


def resid_post_hooks(layers: Iterable[int]) -> tuple[str, ...]:
    """``blocks.L.hook_resid_post`` for each layer: where a vector is added when no hooks are
    named (the repeng / control-vector convention)."""
    return tuple(HookPoint(layer, HookKind.RESID_POST).name for layer in layers)


def all_hook_names(num_layers: int) -> list[str]:
    """Every hook name a model with ``num_layers`` layers exposes, in forward order."""
    names = [HookKind.EMBED.value]
    order = (
        HookKind.RESID_PRE,
        HookKind.ATTN_OUT,
        HookKind.RESID_MID,
        HookKind.MLP_OUT,
        HookKind.RESID_POST,
    )
    for layer in range(num_layers):
        names.extend(HookPoint(layer, kind).name for kind in order)
    return names


@dataclass(frozen=True)
class ExpertLayout:
    """A mixture-of-experts MLP block: its matrices that write the residual stream, as module
    parameters and as checkpoint tensors. Paths are relative to one decoder layer.

    transformers 5 stacks the routed experts of a layer into 3-D parameters
    (``experts.down_proj``: (num_experts, d_model, inner)), while ``save_pretrained`` writes one
    2-D tensor per expert under the checkpoint's own names (its conversion mapping stacks them
    again on load). Both name sets are here, so weight edits and weight hashes can use either.
    """

    #: every routed expert's down-projection, stacked: (num_experts, d_model, inner)
    down: str = "mlp.experts.down_proj"
    #: every expert's gate and up projections, stacked: (num_experts, 2 * inner, d_model)
    gate_up: str = "mlp.experts.gate_up_proj"
    #: module prefix of the block and what checkpoints call it (Mixtral: block_sparse_moe)
    block: str = "mlp"
    checkpoint_block: str = "mlp"
    #: checkpoint names of one expert's weights below ``checkpoint_block``; {expert} = its index
    checkpoint_down: str = "experts.{expert}.down_proj.weight"
    checkpoint_gate: str = "experts.{expert}.gate_proj.weight"
    checkpoint_up: str = "experts.{expert}.up_proj.weight"
    #: an always-active shared expert's down-projection module (Qwen2-MoE), if any
    shared_down: str | None = None

    def checkpoint_regex(self, template: str, expert: str = r"\d+") -> str:
        """A regular expression for ``checkpoint_block.template`` (one of the checkpoint_*
        names, relative to a decoder layer) whose expert index is matched by ``expert``."""
        escaped = re.escape(f"{self.checkpoint_block}.{template}")
        return escaped.replace(re.escape("{expert}"), expert)


@dataclass(frozen=True)
class ArchitectureLayout:
    """Where the hook points of one architecture family live, as dotted module paths.

    ``layers`` and ``embed`` are relative to the CausalLM model; the other fields are relative to
    one decoder layer.
    """

    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    #: module whose output is what the attention sub-block adds to the residual stream
    attn_out: str = "self_attn"
    #: module whose output is what the MLP sub-block adds to the residual stream
    mlp_out: str = "mlp"
    #: norm whose input is the residual stream between attention and MLP (hook_resid_mid)
    mid_norm: str = "post_attention_layernorm"
    #: modules that write into the residual stream (for weight orthogonalisation)
    attn_write: str = "self_attn.o_proj"
    #: the dense MLP's writing matrix (in MoE families: of the layers with a dense MLP)
    mlp_write: str = "mlp.down_proj"
    #: set for mixture-of-experts families: where the experts' writing matrices are
    experts: ExpertLayout | None = None

    @property
    def mlp_write_parameters(self) -> tuple[str, ...]:
        """The parameters of one decoder layer that write its MLP output, as named in the
        loaded model: the dense ``down_proj`` weight and, in mixture-of-experts families, the
        stacked routed experts and a shared expert's weight (a layer has those it has)."""
        parameters = [f"{self.mlp_write}.weight"]
        if self.experts is not None:
            parameters.append(self.experts.down)
            if self.experts.shared_down is not None:
                parameters.append(f"{self.experts.shared_down}.weight")
        return tuple(parameters)


_LLAMA_LAYOUT = ArchitectureLayout()
# Gemma 2/3 put an extra RMSNorm after attention and after the MLP, *before* the residual add, so
# what reaches the residual stream is the norm's output, not the attention/MLP output itself.
_GEMMA_LAYOUT = ArchitectureLayout(
    attn_out="post_attention_layernorm",
    mlp_out="post_feedforward_layernorm",
    mid_norm="pre_feedforward_layernorm",
)
_MIXTRAL_LAYOUT = ArchitectureLayout(
    experts=ExpertLayout(
        checkpoint_block="block_sparse_moe",
        checkpoint_down="experts.{expert}.w2.weight",
        checkpoint_gate="experts.{expert}.w1.weight",
        checkpoint_up="experts.{expert}.w3.weight",
    )
)
_QWEN2_MOE_LAYOUT = ArchitectureLayout(
    experts=ExpertLayout(shared_down="mlp.shared_expert.down_proj")
)
_QWEN3_MOE_LAYOUT = ArchitectureLayout(experts=ExpertLayout())

#: model_type (from config.json) -> layout. Only architectures covered by the tiny-model tests.
LAYOUTS: dict[str, ArchitectureLayout] = {
    "llama": _LLAMA_LAYOUT,
    "mistral": _LLAMA_LAYOUT,
    "qwen2": _LLAMA_LAYOUT,
    "qwen3": _LLAMA_LAYOUT,
    "gemma2": _GEMMA_LAYOUT,
    "gemma3_text": _GEMMA_LAYOUT,
    "mixtral": _MIXTRAL_LAYOUT,
    "qwen2_moe": _QWEN2_MOE_LAYOUT,
    "qwen3_moe": _QWEN3_MOE_LAYOUT,
}


def layout_for(model_type: str, override: ArchitectureLayout | None = None) -> ArchitectureLayout:
    if override is not None:
        return override
    layout = LAYOUTS.get(model_type)
    if layout is None:
        raise UnsupportedArchitectureError(
            f"no hook layout for model_type {model_type!r}; "
            f"supported: {', '.join(sorted(LAYOUTS))}."
            " Pass layout=ArchitectureLayout(...) naming the decoder layer list, embedding, and the"
            " modules whose outputs are added to the residual stream.",
            field="model",
        )
    return layout


def _get_submodule(root: nn.Module, path: str, what: str) -> nn.Module:
    try:
        return root.get_submodule(path)
    except AttributeError:
        raise UnsupportedArchitectureError(
            f"the model has no module {path!r} ({what}); its layout does not match the table."
            " Pass a matching ArchitectureLayout.",
            field="model",
        ) from None


class HookResolver:
    """Maps hook points of one loaded model to modules. Built once per model."""

    def __init__(self, model: nn.Module, model_type: str, layout: ArchitectureLayout | None = None):
        self.layout = layout_for(model_type, layout)
        self.model_type = model_type
        layers = _get_submodule(model, self.layout.layers, "decoder layer list")
        if not isinstance(layers, nn.ModuleList):
            raise UnsupportedArchitectureError(
                f"{self.layout.layers!r} is a {type(layers).__name__}, not a ModuleList",
                field="model",
            )
        self.layers: nn.ModuleList = layers
        self.embed = _get_submodule(model, self.layout.embed, "token embedding")
        self.final_norm = _get_submodule(model, self.layout.final_norm, "final norm")
        # Check every layer up front so a mismatch fails at load, not mid-generation.
        for index, layer in enumerate(self.layers):
            for path in (self.layout.attn_out, self.layout.mlp_out, self.layout.mid_norm):
                _get_submodule(layer, path, f"layer {index}")

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def parse(self, name: str, *, field: str = "hook") -> HookPoint:
        return parse_hook_name(name, self.num_layers, field=field)

    def layer(self, index: int) -> nn.Module:
        return self.layers[index]

    def attn_out_module(self, layer: int) -> nn.Module:
        return self.layers[layer].get_submodule(self.layout.attn_out)

    def mlp_out_module(self, layer: int) -> nn.Module:
        return self.layers[layer].get_submodule(self.layout.mlp_out)

    def mid_norm_module(self, layer: int) -> nn.Module:
        return self.layers[layer].get_submodule(self.layout.mid_norm)

    def hook_names(self) -> list[str]:
        return all_hook_names(self.num_layers)
