"""The weight deltas of a recipe applied to a loaded model in memory.

This is the run-time form of edits that have no activation-space equivalent (norm-preserving
ablation): the same :func:`steer.bake.edits.edit_columns` the bake streams through, applied to
a copy of the model's parameters (every expert of a mixture-of-experts block on its own).
"""

from __future__ import annotations

import copy

import torch

from steer.bake.edits import check_layout, edit_columns
from steer.bake.resolve import resolve
from steer.errors import InvalidArgumentError
from steer.hooks import ArchitectureLayout
from steer.models import ModelHandle, from_pretrained_model
from steer.recipes import EditRecipe


@torch.no_grad()
def edited_copy(handle: ModelHandle, recipe: EditRecipe) -> ModelHandle:
    """A new handle whose model has ``recipe``'s ablations merged into its weights."""
    resolved = resolve(recipe, num_layers=handle.num_layers, d_model=handle.d_model)
    plan = resolved.plan
    if plan.has_bias or plan.embedding_shift is not None:
        raise InvalidArgumentError(
            "in-memory edits cover ablations; use Add interventions for vectors", field="recipe"
        )
    resolver = handle.resolver
    if plan.attention or plan.mlp:
        check_layout(resolver.layout, handle.architecture)
    model = copy.deepcopy(handle.model)
    layers = model.get_submodule(resolver.layout.layers)
    embedding = model.get_submodule(resolver.layout.embed)
    if plan.embedding:
        output = model.get_output_embeddings()
        if output is not None and output.weight is embedding.weight:
            output.weight = torch.nn.Parameter(embedding.weight.detach().clone())
            model.config.tie_word_embeddings = False
        weight = _weight(embedding)
        edited = edit_columns(weight.float().T, plan.embedding).T
        weight.copy_(edited.to(weight.dtype))
    for layer, edits in plan.attention.items():
        path = resolver.layout.attn_write
        weight = _weight(layers.get_submodule(str(layer)).get_submodule(path))
        weight.copy_(edit_columns(weight.float(), edits).to(weight.dtype))
    for layer, edits in plan.mlp.items():
        for weight in _mlp_writes(layers.get_submodule(str(layer)), resolver.layout):
            # stacked experts (num_experts, d_model, inner): each expert's matrix on its own
            for matrix in weight.view(-1, *weight.shape[-2:]):
                matrix.copy_(edit_columns(matrix.float(), edits).to(weight.dtype))
    return from_pretrained_model(model, handle.tokenizer, name=f"{handle.name}+edited")


def _mlp_writes(layer: torch.nn.Module, layout: ArchitectureLayout) -> list[torch.Tensor]:
    """The parameters of one decoder layer that write its MLP output (see ``Names.mlp_writes``
    for the checkpoint form): a dense down_proj, or the stacked experts and a shared expert."""
    parameters = dict(layer.named_parameters())
    return [parameters[path].data for path in layout.mlp_write_parameters if path in parameters]


def _weight(module: torch.nn.Module) -> torch.Tensor:
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    return weight
