"""PEFT LoRA export: the ablation deltas as rank-r adapter factors (no bias, no constant)."""

from __future__ import annotations

from pathlib import Path

import torch

from steer.bake.edits import RankOneEdit, WeightPlan, lora_factors
from steer.bake.names import Names
from steer.bake.options import BakeOptions
from steer.bake.source import Source
from steer.bake.writer import hash_and_sync, write_json
from steer.errors import InvalidArgumentError


def lora_tensors(
    source: Source, plan: WeightPlan, names: Names
) -> tuple[dict[str, torch.Tensor], list[str], int]:
    """PEFT LoRA tensors reproducing the ablation deltas (rank = edits per matrix, zero-padded)."""
    if plan.has_bias or plan.embedding_shift is not None:
        raise InvalidArgumentError(
            "a LoRA adapter cannot add a constant vector; export additive edits as a full model "
            "or a control vector",
            field="output_format",
        )
    if plan.embedding and source.tied:
        raise InvalidArgumentError(
            "the model ties its output head to the embedding: a LoRA on embed_tokens would also "
            "change the head when merged. Export a full model instead",
            field="output_format",
        )
    if plan.mlp and names.layout.experts is not None:
        raise InvalidArgumentError(
            "a LoRA adapter cannot target the stacked experts of a mixture-of-experts block "
            "(transformers keeps them in one 3-D parameter, not Linear modules); export a full "
            "model",
            field="output_format",
        )
    matrices: list[tuple[str, list[RankOneEdit], bool]] = []
    if plan.embedding:
        matrices.append((names.embedding, plan.embedding, True))
    for layer, edits in sorted(plan.attention.items()):
        matrices.append((names.attention(layer), edits, False))
    for layer, edits in sorted(plan.mlp.items()):
        matrices.append((names.mlp(layer), edits, False))
    if not matrices:
        raise InvalidArgumentError("the recipe edits no matrix", field="recipe")
    _check_no_biases(source, [name for name, _edits, _embedding in matrices])
    rank = max(len(edits) for _name, edits, _embedding in matrices)
    tensors: dict[str, torch.Tensor] = {}
    modules = []
    for name, edits, is_embedding in matrices:
        weight = source.read(name).float()
        matrix = weight.T if is_embedding else weight
        b, a = lora_factors(matrix, edits)
        pad = rank - b.shape[1]
        b = torch.nn.functional.pad(b, (0, pad))
        a = torch.nn.functional.pad(a, (0, 0, 0, pad))
        module = names.module(name)
        modules.append(module)
        prefix = f"base_model.model.{module}"
        if is_embedding:
            tensors[f"{prefix}.lora_embedding_A"] = a.contiguous()
            tensors[f"{prefix}.lora_embedding_B"] = b.contiguous()
        else:
            tensors[f"{prefix}.lora_A.weight"] = a.contiguous()
            tensors[f"{prefix}.lora_B.weight"] = b.contiguous()
    return tensors, modules, rank


def _check_no_biases(source: Source, matrices: list[str]) -> None:
    """An edit also projects a matrix's bias (see :func:`_source_biases`); a LoRA has no bias
    term, so a source whose edited matrix has a non-zero bias is refused."""
    for name in matrices:
        bias = name.removesuffix(".weight") + ".bias"
        if bias in source.specs and bool(source.read(bias).any()):
            raise InvalidArgumentError(
                f"the source's {bias} is not zero (e.g. a bake output with an added vector): a "
                "LoRA adapter cannot edit a bias; export a full model",
                field="output_format",
            )


def write_lora(
    directory: Path, source: Source, plan: WeightPlan, names: Names, options: BakeOptions
) -> dict[str, str]:
    from safetensors.torch import save_file

    options.report("computing LoRA factors", 0.0)
    tensors, modules, rank = lora_tensors(source, plan, names)
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": source.name,
        "r": rank,
        # alpha = r makes PEFT's scaling alpha / r exactly 1
        "lora_alpha": rank,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "target_modules": modules,
        "use_rslora": False,
        "use_dora": False,
    }
    write_json(directory / "adapter_config.json", adapter_config)
    options.report("computing LoRA factors", 1.0)
    return hash_and_sync(directory)
