"""Tensor names of an architecture's layout: the embedding, each layer's writing matrices."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from steer.hooks import ArchitectureLayout


@dataclass(frozen=True)
class Names:
    layout: ArchitectureLayout

    @property
    def embedding(self) -> str:
        return f"{self.layout.embed}.weight"

    def attention(self, layer: int) -> str:
        return f"{self.layout.layers}.{layer}.{self.layout.attn_write}.weight"

    def mlp(self, layer: int) -> str:
        return f"{self.layout.layers}.{layer}.{self.layout.mlp_write}.weight"

    def module(self, tensor: str) -> str:
        return tensor.removesuffix(".weight")

    def mlp_writes(self, available: Iterable[str]) -> dict[int, list[str]]:
        """Layer -> the tensors among ``available`` that write its MLP output.

        Dense: ``down_proj``. Mixture of experts: every routed expert's down-projection, one
        2-D tensor per expert as checkpoints store them, or the stacked 3-D parameter (an
        in-memory source's state dict), plus a shared expert's; a Qwen MoE layer listed in
        ``mlp_only_layers`` has a dense ``down_proj`` instead.
        """
        layout, experts = self.layout, self.layout.experts
        alternatives = [re.escape(parameter) for parameter in layout.mlp_write_parameters]
        if experts is not None:
            alternatives.append(experts.checkpoint_regex(experts.checkpoint_down))
        pattern = re.compile(rf"{re.escape(layout.layers)}\.(\d+)\.(?:{'|'.join(alternatives)})")
        writes: dict[int, list[str]] = {}
        for name in available:
            match = pattern.fullmatch(name)
            if match is not None:
                writes.setdefault(int(match.group(1)), []).append(name)
        return writes
