"""The full-model writer: lay out the output, stream every tensor through its edit.

The layout is the config, the shards and any new biases; the tensors go into the shards two
shards at a time.
"""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from steer.bake import provenance
from steer.bake.edits import RankOneEdit, WeightPlan, edit_columns_into
from steer.bake.names import Names
from steer.bake.options import BakeOptions
from steer.bake.source import Source
from steer.bake.tensor_io import ShardWriter, SourceBytes, TensorSpec, empty
from steer.bake.threads import serial_torch_in_this_thread
from steer.digests import file_digest
from steer.errors import UnsupportedArchitectureError

#: bytes per row chunk when streaming a large tensor
CHUNK_BYTES = 16 << 20
#: shards written at once (see write_model)
SHARD_THREADS = 2


def _bias_tensors(
    config: dict[str, Any], plan: WeightPlan, names: Names, num_layers: int, dtype: torch.dtype
) -> tuple[dict[str, Any], dict[str, torch.Tensor], list[str]]:
    """Config changes and new bias tensors that make ``down_bias`` exact, per architecture.

    Llama has an ``mlp_bias`` flag (biases on gate/up/down). Qwen2 and Mistral have no MLP bias
    in transformers; without sliding-window attention they compute exactly what Llama computes
    (Qwen2 = Llama with q/k/v biases), so the output is written as a Llama model.
    """
    model_type = str(config.get("model_type"))
    notes: list[str] = []
    changes: dict[str, Any] = {"mlp_bias": True}
    hidden, inner = int(config["hidden_size"]), int(config["intermediate_size"])
    tensors: dict[str, torch.Tensor] = {}
    if model_type == "llama":
        pass  # mlp_bias is native; attention biases, if any, are already in the source
    elif model_type == "mistral":
        if config.get("sliding_window") is not None:
            raise UnsupportedArchitectureError(
                "mistral with sliding-window attention has no exact bias form", field="model"
            )
        changes |= {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
        changes |= {"attention_bias": False, "sliding_window": None}
        notes.append("written as a Llama model (Mistral has no MLP bias; no sliding window)")
    elif model_type == "qwen2":
        if config.get("use_sliding_window"):
            raise UnsupportedArchitectureError(
                "qwen2 with use_sliding_window has no exact bias form", field="model"
            )
        changes |= {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
        changes |= {"attention_bias": True, "layer_types": None, "use_sliding_window": None}
        notes.append("written as a Llama model with attention_bias (Qwen2 has no MLP bias)")
        for layer in range(num_layers):
            tensors[names.attention(layer).replace(".weight", ".bias")] = torch.zeros(hidden)
    else:
        raise UnsupportedArchitectureError(
            f"{model_type}: no exact form for an additive vector (no down_proj bias)",
            field="model",
        )
    prefix = names.layout.mlp_write.rsplit(".", 1)[0]
    for layer in range(num_layers):
        base = f"{names.layout.layers}.{layer}.{prefix}"
        tensors[f"{base}.gate_proj.bias"] = torch.zeros(inner)
        tensors[f"{base}.up_proj.bias"] = torch.zeros(inner)
        down = plan.down_bias.get(layer)
        tensors[names.mlp(layer).replace(".weight", ".bias")] = (
            torch.zeros(hidden) if down is None else down.clone()
        )
    return changes, {name: t.to(dtype) for name, t in tensors.items()}, notes


# ---------------------------------------------------------------------------------------------
# Streaming the tensors


def _output_dtype(spec: TensorSpec, dtype: torch.dtype | None) -> torch.dtype:
    return dtype if dtype is not None and spec.dtype.is_floating_point else spec.dtype


def _row_chunks(source: Source, name: str, dtype: torch.dtype) -> Iterator[torch.Tensor]:
    spec = source.specs[name]
    if not spec.shape or spec.nbytes <= CHUNK_BYTES:
        yield source.read(name).to(dtype)
        return
    rows = spec.shape[0]
    step = max(1, CHUNK_BYTES * rows // max(spec.nbytes, 1))
    for start in range(0, rows, step):
        yield source.read_rows(name, start, min(rows, start + step)).to(dtype)


def _copies_stored(source: Source, name: str, dtype: torch.dtype) -> bool:
    """Whether an unedited tensor is written as its stored bytes (copied file to file)."""
    return source.read_rows_raw is not None and dtype == source.specs[name].dtype


def _unchanged(
    source: Source, name: str, dtype: torch.dtype
) -> Iterator[torch.Tensor | SourceBytes]:
    """An unedited tensor: its bytes as stored (copied file to file), else converted chunks."""
    spec = source.specs[name]
    if source.read_rows_raw is None or not _copies_stored(source, name, dtype):
        yield from _row_chunks(source, name, dtype)
        return
    rows = spec.shape[0] if spec.shape else 1
    step = max(1, CHUNK_BYTES * rows // max(spec.nbytes, 1))
    for start in range(0, rows, step):
        yield source.read_rows_raw(name, start, min(rows, start + step))


def _embedding_chunks(
    source: Source, name: str, plan: WeightPlan, dtype: torch.dtype
) -> Iterator[torch.Tensor]:
    """Rows of the embedding (vocab, d_model): each row is a written vector (a column of M)."""
    stored = source.specs[name].dtype
    for chunk in _row_chunks(source, name, stored):
        edited = empty(tuple(chunk.shape), dtype)
        # the read buffer itself is never modified (it may still be queued for hashing)
        edit_columns_into(chunk.T, plan.embedding, edited.T, plan.embedding_shift)
        yield edited


def _edited_matrix(
    source: Source, name: str, edits: list[RankOneEdit], dtype: torch.dtype
) -> Iterator[torch.Tensor]:
    """A (d_model, n) writing matrix, or stacked experts (num_experts, d_model, n) one by one."""
    weight = source.read(name)
    out = empty(tuple(weight.shape), dtype)
    for matrix, edited in zip(
        weight.reshape(-1, *weight.shape[-2:]), out.view(-1, *out.shape[-2:]), strict=True
    ):
        edit_columns_into(matrix, edits, edited)
    yield out


@dataclass
class OutputLayout:
    shards: dict[str, list[TensorSpec]]
    produce: Callable[[str], Iterator[torch.Tensor | SourceBytes]]
    config: dict[str, Any]
    #: output tensor -> the source tensor whose stored bytes it is, unchanged (its hash is reused)
    copied_from: dict[str, str]


def plan_output(
    source: Source,
    plan: WeightPlan,
    names: Names,
    num_layers: int,
    dtype: torch.dtype | None,
    notes: list[str],
) -> OutputLayout:
    """Lay out the output: config and new biases -> edited matrices (checked present) -> the
    source's biases they change -> shards -> where each tensor comes from."""
    untie = plan.edits_embedding and source.tied
    config, extra = _output_config(source, plan, names, num_layers, dtype, notes)
    matrices = _edited_matrices(source, plan, names)
    # pops from extra the new zero biases the source already has
    biases = _source_biases(source, matrices, extra)
    shards = _output_shards(source, names, dtype, untie, extra)
    tensors = _OutputTensors(source, plan, names, dtype, untie, extra, matrices, biases)
    copied_from = {
        spec.name: origin
        for specs in shards.values()
        for spec in specs
        if (origin := tensors.unedited_origin(spec.name)) is not None
        and _copies_stored(source, origin, spec.dtype)
    }
    return OutputLayout(shards, tensors.produce, config, copied_from)


def _output_config(
    source: Source,
    plan: WeightPlan,
    names: Names,
    num_layers: int,
    dtype: torch.dtype | None,
    notes: list[str],
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The output's config.json and the new bias tensors an additive edit needs."""
    config = dict(source.config)
    if dtype is not None:
        config["dtype"] = str(dtype).removeprefix("torch.")
    extra: dict[str, torch.Tensor] = {}
    if plan.has_bias:
        bias_dtype = _output_dtype(source.specs[names.mlp(0)], dtype)
        changes, extra, bias_notes = _bias_tensors(config, plan, names, num_layers, bias_dtype)
        config |= changes
        config = {key: value for key, value in config.items() if value is not None}
        notes.extend(bias_notes)
    if plan.edits_embedding and source.tied:
        config["tie_word_embeddings"] = False
        notes.append("embedding edited: the tied output head was untied and keeps its weights")
    return config, extra


def _edited_matrices(
    source: Source, plan: WeightPlan, names: Names
) -> dict[str, list[RankOneEdit]]:
    """{weight tensor: its edits}; every tensor the plan edits must be in the source."""
    matrices: dict[str, list[RankOneEdit]] = {}
    for layer, edits in plan.attention.items():
        matrices[names.attention(layer)] = edits
    mlp_writes = names.mlp_writes(source.specs)
    for layer, edits in plan.mlp.items():
        for tensor in mlp_writes.get(layer, [names.mlp(layer)]):
            matrices[tensor] = edits
    for tensor in [*matrices, names.embedding]:
        if (tensor in matrices or plan.edits_embedding) and tensor not in source.specs:
            raise UnsupportedArchitectureError(
                f"the source has no tensor {tensor!r}; its names do not match the "
                f"{source.model_type} layout",
                field="model",
            )
    return matrices


def _output_shards(
    source: Source,
    names: Names,
    dtype: torch.dtype | None,
    untie: bool,
    extra: dict[str, torch.Tensor],
) -> dict[str, list[TensorSpec]]:
    """{shard file: its tensors}: the source's shards, plus an untied head beside the embedding
    and each layer's new biases beside its down_proj weight."""
    shards: dict[str, list[TensorSpec]] = {}
    placed = set()
    for file, tensor_names in source.shards.items():
        specs = []
        for name in tensor_names:
            spec = source.specs[name]
            specs.append(TensorSpec(name, _output_dtype(spec, dtype), spec.shape))
            if name == names.embedding and untie:
                specs.append(TensorSpec("lm_head.weight", _output_dtype(spec, dtype), spec.shape))
            for bias_name, bias in extra.items():
                # a layer's new biases go into the shard holding its down_proj weight
                if name == names.mlp(_layer_of(bias_name)) and bias_name not in placed:
                    specs.append(TensorSpec(bias_name, bias.dtype, tuple(bias.shape)))
                    placed.add(bias_name)
        shards[file] = specs
    missing = set(extra) - placed
    if missing:
        raise UnsupportedArchitectureError(
            f"no down_proj weight found for biases {sorted(missing)[:3]}", field="model"
        )
    return shards


@dataclass
class _OutputTensors:
    """Where each output tensor comes from: new, its stored bytes, or streamed through edits."""

    source: Source
    plan: WeightPlan
    names: Names
    dtype: torch.dtype | None
    untie: bool
    #: new tensors (biases an additive edit creates)
    extra: dict[str, torch.Tensor]
    matrices: dict[str, list[RankOneEdit]]
    biases: dict[str, tuple[list[RankOneEdit], torch.Tensor | None]]

    def unedited_origin(self, name: str) -> str | None:
        """The source tensor that output tensor ``name`` is, unedited, if any."""
        if name == "lm_head.weight" and self.untie:
            return self.names.embedding
        edited = name in self.matrices or name in self.biases
        edited = edited or (name == self.names.embedding and self.plan.edits_embedding)
        return None if name in self.extra or edited else name

    def produce(self, name: str) -> Iterator[torch.Tensor | SourceBytes]:
        source, names, plan, dtype = self.source, self.names, self.plan, self.dtype
        if name in self.extra:
            yield self.extra[name]
            return
        if name == "lm_head.weight" and self.untie:
            yield from _unchanged(
                source, names.embedding, _output_dtype(source.specs[names.embedding], dtype)
            )
            return
        out_dtype = _output_dtype(source.specs[name], dtype)
        if name in self.biases:
            yield _edited_bias(source, name, *self.biases[name]).to(out_dtype)
        elif name == names.embedding and plan.edits_embedding:
            yield from _embedding_chunks(source, name, plan, out_dtype)
        elif name in self.matrices:
            yield from _edited_matrix(source, name, self.matrices[name], out_dtype)
        else:
            yield from _unchanged(source, name, out_dtype)


def _source_biases(
    source: Source, matrices: dict[str, list[RankOneEdit]], extra: dict[str, torch.Tensor]
) -> dict[str, tuple[list[RankOneEdit], torch.Tensor | None]]:
    """Bias tensors the source already has that the bake changes: {name: (edits, added)}.

    A writing matrix's bias is part of what the edited hook sees (``W x + b``), so it takes the
    matrix's edits as one more column. A source that is itself a bake output (or a Llama with
    ``mlp_bias``) already has the biases an additive edit would create: the vector is added to
    the stored one, and zero biases the plan would create are dropped from ``extra`` (the
    source's are copied), so no tensor is written twice.
    """
    biases: dict[str, tuple[list[RankOneEdit], torch.Tensor | None]] = {}
    for matrix, edits in matrices.items():
        bias = matrix.removesuffix(".weight") + ".bias"
        if bias in source.specs:
            biases[bias] = (edits, None)
    for bias in [name for name in extra if name in source.specs]:
        added = extra.pop(bias)
        edits = biases.get(bias, ([], None))[0]
        if edits or bool(added.any()):
            biases[bias] = (edits, added)
    return biases


def _edited_bias(
    source: Source, name: str, edits: list[RankOneEdit], added: torch.Tensor | None
) -> torch.Tensor:
    """A stored bias (d_model,) edited like a matrix column, plus ``added``, in float32."""
    bias = source.read(name).float()
    edited = edit_columns_into(bias[:, None], edits, torch.empty(bias.shape[0], 1))[:, 0]
    return edited if added is None else edited + added.float()


def _layer_of(tensor: str) -> int:
    parts = tensor.split(".")
    for index, part in enumerate(parts[:-1]):
        if part == "layers":
            return int(parts[index + 1])
    raise AssertionError(tensor)


class _ShardStopped(Exception):
    """A shard writer stopped because another shard's writer failed."""


def write_model(
    directory: Path, source: Source, layout: OutputLayout, options: BakeOptions
) -> dict[str, str]:
    """Write shards, index, config and tokenizer files; return {file: hash}."""
    weight_map: dict[str, str] = {}
    hashes = _write_shards(directory, source, layout, options, weight_map)
    options.report("writing weights", 1.0)
    if len(layout.shards) > 1:
        size = sum(spec.nbytes for specs in layout.shards.values() for spec in specs)
        index = {"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))}
        write_json(directory / "model.safetensors.index.json", index)
    write_json(directory / "config.json", layout.config)
    for extra in source.extra_files:
        shutil.copyfile(extra, directory / extra.name)
    if source.write_extras is not None:
        source.write_extras(directory)
    return hashes | hash_and_sync(directory, skip=hashes)


def _write_shards(
    directory: Path,
    source: Source,
    layout: OutputLayout,
    options: BakeOptions,
    weight_map: dict[str, str],
) -> dict[str, str]:
    """Write every shard; return {shard file: hash} and fill ``weight_map`` {tensor: file}.

    Shards are written by :data:`SHARD_THREADS` threads at once, one shard per thread: reading,
    the float32 edits, writing, kernel-side copies and fsync all release the GIL, so one
    thread's edit math overlaps another's I/O (a single thread left a core idle most of the
    bake). Each thread holds one tensor (or row chunk) at a time, so peak memory grows by one
    tensor per thread.
    """
    total = sum(len(specs) for specs in layout.shards.values())
    done = [0]
    lock = threading.Lock()  # progress calls and the shared counters
    failed = threading.Event()  # another shard failed: stop at the next tensor

    def write_shard(file: str, specs: list[TensorSpec]) -> str:
        serial_torch_in_this_thread()
        writer = ShardWriter(directory / file, specs, opener=options.opener)
        try:
            for spec in specs:
                with lock:
                    if failed.is_set():
                        raise _ShardStopped
                    options.report("writing weights", done[0] / total)
                origin = layout.copied_from.get(spec.name)
                same_as = None if origin is None else partial(source.stored_digest, origin)
                writer.write(spec.name, layout.produce(spec.name), same_as)
                with lock:
                    weight_map[spec.name] = file
                    done[0] += 1
            return writer.close()
        except BaseException:
            failed.set()
            writer.abort()
            raise

    threads = max(1, min(SHARD_THREADS, len(layout.shards)))
    with ThreadPoolExecutor(threads, thread_name_prefix="steer-bake") as pool:
        futures = {
            file: pool.submit(write_shard, file, specs) for file, specs in layout.shards.items()
        }
        try:
            wait(futures.values())
        except BaseException:  # e.g. KeyboardInterrupt: stop the shards at their next tensor
            failed.set()
            raise
    for future in futures.values():  # the first real error, not a shard stopped because of it
        error = future.exception()
        if error is not None and not isinstance(error, _ShardStopped):
            raise error
    return {file: future.result() for file, future in futures.items()}


def hash_and_sync(directory: Path, skip: Iterable[str] = ()) -> dict[str, str]:
    """{file: hash} of the files the bake wrote whole (config, tokenizer, adapter), each fsynced;
    ``skip`` names files already hashed and synced (shards)."""
    hashes = {}
    for written in sorted(directory.iterdir()):
        if written.name not in skip and written.is_file():
            hashes[written.name] = file_digest(written)
            provenance.fsync_path(written)
    return hashes


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
