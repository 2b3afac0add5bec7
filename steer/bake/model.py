"""Bake a recipe into a new model directory or a PEFT LoRA adapter, shard by shard.

``bake_weights`` reads as its steps: open the source -> lower the recipe to interventions ->
plan the weight deltas -> check the architecture and the directions' model identity (cheap
fields) -> lay out the output -> stream every tensor through its edit into the temporary
directory, hashing source and output on the way -> config, index, tokenizer -> compare the
directions' weight hash -> provenance -> atomic rename. The source is read once.
"""

from __future__ import annotations

import ctypes
import json
import re
import shutil
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from steer.artifacts import VectorArtifact, load_vector
from steer.bake import provenance
from steer.bake.edits import (
    RankOneEdit,
    WeightPlan,
    build_plan,
    check_bias,
    check_layout,
    edit_columns_into,
    lora_factors,
)
from steer.bake.source import Source, open_source
from steer.bake.tensor_io import (
    Opener,
    ShardWriter,
    SourceBytes,
    TensorSpec,
    default_opener,
    empty,
)
from steer.digests import file_digest
from steer.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    SteerError,
    UnsupportedArchitectureError,
)
from steer.hooks import ArchitectureLayout, layout_for
from steer.interventions import Intervention
from steer.models import DTYPES, stale_weight_hash_hint
from steer.recipes import AblateEdit, AblationVariant, FeatureEdit, Recipe, recipe_to_dict

Progress = Callable[[str, float], None]
#: bytes per row chunk when streaming a large tensor
CHUNK_BYTES = 16 << 20
#: shards written at once (see write_model)
SHARD_THREADS = 2


def _omp_set_num_threads() -> Callable[[int], None] | None:
    try:
        return ctypes.CDLL(None).omp_set_num_threads  # type: ignore[no-any-return]
    except (OSError, AttributeError):  # torch built without OpenMP, or not loaded globally
        return None


_OMP_SET_NUM_THREADS = _omp_set_num_threads()


def serial_torch_in_this_thread() -> None:
    """Run torch's element-wise kernels on the calling thread only, leaving other threads as
    they are.

    The bake already runs one shard per core; if each shard thread's float32 edits also started
    torch's intra-op threads, twice as many threads as cores would contend (measured on 2
    cores: about 0.15 CPU s of a 1.6 s bake, scripts/bench_bake.py). ``torch.set_num_threads``
    would also change the default every thread started later inherits (a server's too), so this
    sets OpenMP's per-thread team size instead, after torch has initialised this thread's
    setting, which torch reads back on each parallel loop.
    """
    torch.get_num_threads()  # torch's once-per-thread setup, from the process-wide setting
    if _OMP_SET_NUM_THREADS is not None:
        _OMP_SET_NUM_THREADS(1)


class BakeCancelled(SteerError):
    """The caller cancelled the bake; nothing was written at the target."""

    status_code = "CANCELLED"


@dataclass
class BakeOptions:
    output_format: str = "model"
    overwrite: bool = False
    dtype: str | None = None
    allow_pickle: bool = False
    allow_other_model: bool = False
    progress: Progress | None = None
    cancelled: threading.Event | None = None
    #: opens output files; tests pass a failing one to simulate a full disk
    opener: Opener = default_opener
    notes: list[str] = field(default_factory=list)
    #: where outputs may go, see :func:`steer.bake.api.check_output` (a server sets them)
    root: Path | None = None
    keep: tuple[Path, ...] = ()
    reserved: tuple[Path, ...] = ()

    def check_cancelled(self) -> None:
        if self.cancelled is not None and self.cancelled.is_set():
            raise BakeCancelled("bake cancelled", field="cancelled")

    def report(self, stage: str, fraction: float) -> None:
        self.check_cancelled()
        if self.progress is not None:
            self.progress(stage, fraction)


# ---------------------------------------------------------------------------------------------
# Recipe -> plan


@dataclass
class ResolvedRecipe:
    plan: WeightPlan
    interventions: list[Intervention]
    artifacts: dict[str, dict[str, Any]]
    approximate: bool


def resolve(recipe: Recipe, *, num_layers: int, d_model: int) -> ResolvedRecipe:
    """Lower the recipe to interventions and those to a weight plan."""
    artifacts: dict[str, dict[str, Any]] = {}

    def load(path: Path) -> VectorArtifact:
        artifact = load_vector(path)
        recorded = artifact.metadata.get("d_model") or artifact.vector.d_model
        if int(recorded) != d_model:
            raise InvalidArgumentError(
                f"{path} has d_model {recorded} but the model has {d_model}: it was made for "
                "another model",
                field="direction",
            )
        artifacts[str(path)] = dict(artifact.metadata)
        return artifact

    pairs: list[tuple[Intervention, bool]] = []
    approximate = False
    for edit, interventions in recipe.interventions(num_layers, load=load):
        norm_preserving = (
            isinstance(edit, AblateEdit) and edit.variant is AblationVariant.NORM_PRESERVING
        )
        approximate = approximate or isinstance(edit, FeatureEdit)
        pairs.extend((intervention, norm_preserving) for intervention in interventions)
    plan = build_plan(pairs, num_layers, d_model)
    return ResolvedRecipe(plan, [pair[0] for pair in pairs], artifacts, approximate)


def expected_weight_hashes(
    artifacts: dict[str, dict[str, Any]], source: Source, options: BakeOptions
) -> dict[str, str]:
    """{artifact path: the weight hash its sidecar names}, empty when the check is off.

    The cheap part of the identity check fails here, before anything is written: a sidecar that
    names another architecture or layer count (d_model was checked by :func:`resolve`).
    """
    if options.allow_other_model:
        return {}
    num_layers = int(source.config["num_hidden_layers"])
    for path, meta in artifacts.items():
        model = meta.get("model") or {}
        recorded = {
            "architecture": model.get("architecture"),
            "num_layers": model.get("num_layers"),
        }
        actual = {"architecture": source.model_type, "num_layers": num_layers}
        for key, value in recorded.items():
            if value is not None and str(value) != str(actual[key]):
                raise FailedPreconditionError(
                    f"{path} was made for model {model.get('name')!r} ({key} {value}), not "
                    f"{source.name!r} ({key} {actual[key]}); pass allow_other_model "
                    "(--allow-other-model) to use it anyway",
                    field="direction",
                )
    return {
        path: str(meta["model"]["weight_hash"])
        for path, meta in artifacts.items()
        if (meta.get("model") or {}).get("weight_hash")
    }


def check_directions_model(
    expected: dict[str, str],
    artifacts: dict[str, dict[str, Any]],
    source: Source,
    options: BakeOptions,
) -> str | None:
    """Refuse directions whose sidecar names another model's weights. Returns the hash.

    Called when the bake's pass over the source ends: the tensors it read in order were hashed
    on the way (``Source.start_weight_hashes``); only the rest are read again here.
    """
    if not expected:
        return None
    options.report("hashing source weights", 0.0)
    actual = source.weight_hash(lambda f: options.report("hashing source weights", f))
    for path, weight_hash in expected.items():
        if weight_hash != actual:
            model = artifacts[path].get("model") or {}
            raise FailedPreconditionError(
                f"{path} was made for model {model.get('name')!r} (weight hash "
                f"{weight_hash[:12]}…), not {source.name!r} ({actual[:12]}…)"
                f"{stale_weight_hash_hint(model)}; pass allow_other_model "
                "(--allow-other-model) to use it anyway",
                field="direction",
            )
    return actual


# ---------------------------------------------------------------------------------------------
# Architecture: tensor names and the bias flag


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
    config = dict(source.config)
    if dtype is not None:
        config["dtype"] = str(dtype).removeprefix("torch.")
    extra: dict[str, torch.Tensor] = {}
    untie = plan.edits_embedding and source.tied
    if plan.has_bias:
        bias_dtype = _output_dtype(source.specs[names.mlp(0)], dtype)
        changes, extra, bias_notes = _bias_tensors(config, plan, names, num_layers, bias_dtype)
        config |= changes
        config = {key: value for key, value in config.items() if value is not None}
        notes.extend(bias_notes)
    if untie:
        config["tie_word_embeddings"] = False
        notes.append("embedding edited: the tied output head was untied and keeps its weights")
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
    biases = _source_biases(source, matrices, extra)

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

    def unedited_origin(name: str) -> str | None:
        """The source tensor that output tensor ``name`` is, unedited, if any."""
        if name == "lm_head.weight" and untie:
            return names.embedding
        edited = name in matrices or name in biases
        edited = edited or (name == names.embedding and plan.edits_embedding)
        return None if name in extra or edited else name

    copied_from = {
        spec.name: origin
        for specs in shards.values()
        for spec in specs
        if (origin := unedited_origin(spec.name)) is not None
        and _copies_stored(source, origin, spec.dtype)
    }

    def produce(name: str) -> Iterator[torch.Tensor | SourceBytes]:
        if name in extra:
            yield extra[name]
            return
        if name == "lm_head.weight" and untie:
            yield from _unchanged(
                source, names.embedding, _output_dtype(source.specs[names.embedding], dtype)
            )
            return
        out_dtype = _output_dtype(source.specs[name], dtype)
        if name in biases:
            yield _edited_bias(source, name, *biases[name]).to(out_dtype)
        elif name == names.embedding and plan.edits_embedding:
            yield from _embedding_chunks(source, name, plan, out_dtype)
        elif name in matrices:
            yield from _edited_matrix(source, name, matrices[name], out_dtype)
        else:
            yield from _unchanged(source, name, out_dtype)

    return OutputLayout(shards, produce, config, copied_from)


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
    """Write shards, index, config and tokenizer files; return {file: hash}.

    Shards are written by :data:`SHARD_THREADS` threads at once, one shard per thread: reading,
    the float32 edits, writing, kernel-side copies and fsync all release the GIL, so one
    thread's edit math overlaps another's I/O (a single thread left a core idle most of the
    bake). Each thread holds one tensor (or row chunk) at a time, so peak memory grows by one
    tensor per thread.
    """
    hashes: dict[str, str] = {}
    total = sum(len(specs) for specs in layout.shards.values())
    done = [0]
    weight_map = {}
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
    hashes.update((file, future.result()) for file, future in futures.items())
    options.report("writing weights", 1.0)
    if len(layout.shards) > 1:
        size = sum(spec.nbytes for specs in layout.shards.values() for spec in specs)
        index = {"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))}
        _write_json(directory / "model.safetensors.index.json", index)
    _write_json(directory / "config.json", layout.config)
    for extra in source.extra_files:
        shutil.copyfile(extra, directory / extra.name)
    if source.write_extras is not None:
        source.write_extras(directory)
    return hashes | _hash_and_sync(directory, skip=hashes)


def _hash_and_sync(directory: Path, skip: Iterable[str] = ()) -> dict[str, str]:
    """{file: hash} of the files the bake wrote whole (config, tokenizer, adapter), each fsynced;
    ``skip`` names files already hashed and synced (shards)."""
    hashes = {}
    for written in sorted(directory.iterdir()):
        if written.name not in skip and written.is_file():
            hashes[written.name] = file_digest(written)
            provenance.fsync_path(written)
    return hashes


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------
# LoRA


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
    _write_json(directory / "adapter_config.json", adapter_config)
    options.report("computing LoRA factors", 1.0)
    return _hash_and_sync(directory)


# ---------------------------------------------------------------------------------------------
# The orchestrator


def bake_weights(model_source: str, recipe: Recipe, out_dir: Path, options: BakeOptions) -> Path:
    """Bake ``recipe`` into a model directory (format "model") or a LoRA adapter ("lora")."""
    if options.output_format not in ("model", "lora"):
        raise InvalidArgumentError(
            f"unknown output format {options.output_format!r}", field="output_format"
        )
    dtype_name = options.dtype or recipe.dtype
    if dtype_name is not None and dtype_name not in DTYPES:
        raise InvalidArgumentError(
            f"unknown dtype {dtype_name!r}; use {', '.join(DTYPES)}", field="dtype"
        )
    options.report("opening source", 0.0)
    source = open_source(
        model_source, allow_pickle=options.allow_pickle, check=options.check_cancelled
    )
    try:
        return _bake(source, recipe, out_dir, options, dtype_name or source.stored_dtype)
    finally:
        source.close()


def _bake(
    source: Source, recipe: Recipe, out_dir: Path, options: BakeOptions, dtype_name: str | None
) -> Path:
    config = source.config
    num_layers, d_model = int(config["num_hidden_layers"]), int(config["hidden_size"])
    layout = layout_for(source.model_type)
    names = Names(layout)
    resolved = resolve(recipe, num_layers=num_layers, d_model=d_model)
    plan = resolved.plan
    if plan.attention or plan.mlp or plan.has_bias or plan.embedding_shift is not None:
        check_layout(layout, source.model_type)
    if plan.has_bias:
        check_bias(layout, source.model_type)
    expected = expected_weight_hashes(resolved.artifacts, source, options)
    notes = list(options.notes)
    if dtype_name is None and options.output_format == "model" and source.dtype_note:
        notes.append(source.dtype_note)
    if resolved.approximate:
        notes.append(
            "APPROXIMATE: SAE feature edits are baked as value * decoder direction added to every "
            "token; the run-time slider sets the feature activation instead"
        )
    # one pass over the source: the file hashes (provenance) and, when a direction names its
    # model, the weight hash are fed by the reads that produce the output
    source.start_file_hashes()
    if expected:
        source.start_weight_hashes()
    with provenance.atomic_directory(out_dir, overwrite=options.overwrite) as temp:
        if options.output_format == "lora":
            hashes = write_lora(temp, source, plan, names, options)
        else:
            dtype = DTYPES[dtype_name] if dtype_name else None
            output = plan_output(source, plan, names, num_layers, dtype, notes)
            hashes = write_model(temp, source, output, options)
        # a mismatch raises here, before the rename: nothing appears at the target
        weight_hash = check_directions_model(expected, resolved.artifacts, source, options)
        options.report("hashing source", 0.0)
        record = provenance.record(
            output_format=options.output_format,
            source={
                "name": source.name,
                "model_type": source.model_type,
                "weight_hash": weight_hash,
                "files": source.file_hashes(),
            },
            recipe=recipe_to_dict(recipe),
            directions=resolved.artifacts,
            files=hashes,
            notes=notes,
        )
        provenance.write(temp, record)
        options.report("done", 1.0)
    return out_dir
