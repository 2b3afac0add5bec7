"""Bake sources: a safetensors model directory read tensor by tensor, or a GGUF / pickled
checkpoint dequantised into memory (those are small here; see docs/bake.md).

A source exposes the HF config as a dict, tensor specs per shard, ``read(name)``, the files to
hash for provenance, and :meth:`Source.weight_hash`, which reproduces
:attr:`steer.models.ModelHandle.weight_hash` without loading the model. Both kinds of hash can be
fed by the bake's own reads (``start_file_hashes``, ``start_weight_hashes``), so a bake that
reads every tensor once, rows in order, needs no second pass over the source; a bf16 tensor's
file leaf (:mod:`steer.digests`) is also its weight digest, so its bytes are hashed once.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from steer.bake.provenance import PROVENANCE
from steer.bake.tensor_io import SafetensorsReader, SourceBytes, TensorSpec
from steer.digests import file_digest
from steer.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    UnsupportedArchitectureError,
)
from steer.hooks import LAYOUTS, ExpertLayout
from steer.models import (
    bfloat16_bytes,
    check_gguf_model,
    combine_weight_digests,
    tensor_digest,
    unloadable,
    weight_digest,
)
from steer.offline import OFFLINE_MODELS, resolve_offline

#: files in a model directory that are not weights and travel to the output unchanged
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")
#: files not copied: rewritten by the bake, or (a source that is itself a bake output) the
#: source's provenance, which the output's own record replaces
SKIP_FILES = {
    "config.json",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
    PROVENANCE,
}

T = TypeVar("T")


@dataclass
class Source:
    """Where the weights come from. ``shards`` maps output shard file name -> tensor names."""

    name: str
    config: dict[str, Any]
    shards: dict[str, list[str]]
    specs: dict[str, TensorSpec]
    read: Callable[[str], torch.Tensor]
    #: rows start:stop of a tensor's first dimension
    read_rows: Callable[[str, int, int], torch.Tensor]
    #: files whose hash (:mod:`steer.digests`) goes into the provenance record
    files: list[Path]
    #: non-weight files copied to the output (tokenizer, generation config, chat template...)
    extra_files: list[Path] = field(default_factory=list)
    #: the same rows as raw bytes with their place in a source file (file sources only): the
    #: writer copies untouched tensors file to file instead of through torch
    read_rows_raw: Callable[[str, int, int], SourceBytes] | None = None
    #: writes tokenizer / generation config into a directory (in-memory sources)
    write_extras: Callable[[Path], None] | None = None
    close: Callable[[], None] = lambda: None
    #: computes the weight hash itself (in-memory sources), given the progress callback
    hash_weights: Callable[[Callable[[float], None] | None], str] | None = None
    #: start hashing source files as they are read in order; then {path: hash or None}
    start_file_hashes: Callable[[], None] = lambda: None
    streamed_file_hashes: Callable[[], dict[Path, str | None]] = dict
    #: start hashing tensors for the weight hash as their rows are read in order; then
    #: {stored tensor name: steer.models.tensor_digest} for those read whole
    start_weight_hashes: Callable[[], None] = lambda: None
    streamed_tensor_digests: Callable[[], dict[str, bytes]] = dict
    #: BLAKE3 of a stored tensor's bytes if a read since ``start_file_hashes`` covered them in
    #: order (its blake3-tensors leaf), else None: a tensor copied unchanged reuses it
    stored_digest: Callable[[str], bytes | None] = lambda _tensor: None
    #: the dtype the source file stores its matrices in when reads return another (a GGUF is
    #: read dequantised to float32): what a bake writes unless a dtype is asked for
    stored_dtype: str | None = None
    #: said (in the provenance notes) when the output keeps the reads' dtype for want of one
    dtype_note: str = ""

    def file_hashes(self) -> dict[str, str]:
        """The hash of every source file, reusing hashes made while reading where possible."""
        streamed = self.streamed_file_hashes()
        return {str(path): streamed.get(path) or file_digest(path) for path in self.files}

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type", ""))

    @property
    def tied(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", False))

    def weight_hash(self, progress: Callable[[float], None] | None = None) -> str:
        """BLAKE3 over state-dict names, shapes and bf16-rounded values, like ModelHandle.

        Tensors already hashed while reading (after ``start_weight_hashes``) are not read again.
        """
        if self.hash_weights is not None:
            return self.hash_weights(progress)
        floating = [name for name in self.specs if self.specs[name].dtype.is_floating_point]
        # state-dict name -> (shape, the stored tensors whose rows make it, in order)
        entries = state_dict_entries(self.model_type, floating, self.specs)
        embed = "model.embed_tokens.weight"
        if self.tied and "lm_head.weight" not in entries and embed in entries:
            entries["lm_head.weight"] = entries[embed]  # the state dict lists the tied head too
        streamed = self.streamed_tensor_digests()
        digests: dict[tuple[str, ...], bytes] = {}
        for index, (_name, (_shape, parts)) in enumerate(sorted(entries.items())):
            if parts not in digests:
                single = streamed.get(parts[0]) if len(parts) == 1 else None
                digests[parts] = single or tensor_digest(
                    chunk for part in parts for chunk in self._row_chunks(part)
                )
            if progress is not None:
                progress((index + 1) / len(entries))
        return combine_weight_digests(
            (name, shape, digests[parts]) for name, (shape, parts) in entries.items()
        )

    def _row_chunks(self, name: str) -> Iterator[torch.Tensor]:
        """A tensor as row blocks of about 16 MiB: the same bytes, one block in memory at a time."""
        shape = self.specs[name].shape
        if not shape:
            yield self.read(name)
            return
        rows = shape[0]
        step = max(1, rows * (16 << 20) // max(self.specs[name].nbytes, 1))
        for start in range(0, rows, step):
            yield self.read_rows(name, start, min(rows, start + step))


def state_dict_entries(
    model_type: str, names: Iterable[str], specs: dict[str, TensorSpec]
) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
    """State-dict name -> (shape, stored tensors in order) for the stored tensors ``names``.

    Most stored tensors are their state-dict entry. Mixture-of-experts checkpoints store one
    tensor per expert where transformers stacks them (its conversion mapping, on load):
    ``experts.down_proj`` is every expert's down-projection stacked, ``experts.gate_up_proj``
    every expert's gate rows then up rows. Stacking along the first dimension concatenates the
    row-major bytes, so the stacked tensor's digest is the parts' rows hashed in that order.
    """
    layout = LAYOUTS.get(model_type)
    experts = layout.experts if layout is not None else None
    entries: dict[str, tuple[tuple[int, ...], tuple[str, ...]]] = {
        name: (specs[name].shape, (name,)) for name in names
    }
    if layout is None or experts is None:
        return entries
    layer_prefix = rf"({re.escape(layout.layers)}\.(\d+)\.)"
    patterns = {
        kind: re.compile(layer_prefix + experts.checkpoint_regex(template, r"(\d+)"))
        for kind, template in (
            ("down", experts.checkpoint_down),
            ("gate", experts.checkpoint_gate),
            ("up", experts.checkpoint_up),
        )
    }
    block = re.compile(layer_prefix + re.escape(experts.checkpoint_block) + r"\.")
    found: dict[tuple[int, str], dict[int, str]] = {}
    for name in list(entries):
        for kind, pattern in patterns.items():
            match = pattern.fullmatch(name)
            if match is not None:
                found.setdefault((int(match.group(2)), kind), {})[int(match.group(3))] = name
                del entries[name]
                break
        else:
            # other tensors of the block under the module's name (Mixtral: block_sparse_moe.gate
            # -> mlp.gate)
            renamed = block.sub(rf"\g<1>{experts.block}.", name, count=1)
            if renamed != name:
                entries[renamed] = entries.pop(name)
    entries.update(_stacked_experts(layout.layers, experts, found, specs))
    return entries


def _stacked_experts(
    layers_prefix: str,
    experts: ExpertLayout,
    found: dict[tuple[int, str], dict[int, str]],
    specs: dict[str, TensorSpec],
) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
    """The stacked expert entries of each layer, from {(layer, kind): {expert: stored name}}."""
    entries: dict[str, tuple[tuple[int, ...], tuple[str, ...]]] = {}
    layers = sorted({layer for layer, _kind in found})
    for layer in layers:
        down = _experts_in_order(found.get((layer, "down"), {}), layer)
        gate = _experts_in_order(found.get((layer, "gate"), {}), layer)
        up = _experts_in_order(found.get((layer, "up"), {}), layer)
        if not len(down) == len(gate) == len(up):
            raise UnsupportedArchitectureError(
                f"layer {layer}: {len(down)} expert down-projections but {len(gate)} gate and "
                f"{len(up)} up projections in the checkpoint",
                field="model",
            )
        base = f"{layers_prefix}.{layer}"
        rows, columns = specs[down[0]].shape
        entries[f"{base}.{experts.down}"] = ((len(down), rows, columns), tuple(down))
        gate_rows, width = specs[gate[0]].shape
        stacked = (len(gate), gate_rows + specs[up[0]].shape[0], width)
        parts = tuple(part for pair in zip(gate, up, strict=True) for part in pair)
        entries[f"{base}.{experts.gate_up}"] = (stacked, parts)
    return entries


def _experts_in_order(by_index: dict[int, str], layer: int) -> list[str]:
    if sorted(by_index) != list(range(len(by_index))) or not by_index:
        raise UnsupportedArchitectureError(
            f"layer {layer}: the checkpoint's experts are not numbered 0..n-1 "
            f"({sorted(by_index)[:8]})",
            field="model",
        )
    return [by_index[index] for index in range(len(by_index))]


def open_source(
    model_source: str,
    *,
    allow_pickle: bool = False,
    dtype: torch.dtype = torch.float32,
    check: Callable[[], None] = lambda: None,
) -> Source:
    """Open an offline model name, a ``.gguf`` file, or a HF model directory. ``check`` raises
    when the caller has given up (a cancelled bake); a slow open calls it between its steps."""
    path = resolve_offline(model_source) if model_source in OFFLINE_MODELS else Path(model_source)
    if not path.exists():
        raise NotFoundError(
            f"{model_source!r} is neither an offline model ({', '.join(OFFLINE_MODELS)}) nor an "
            "existing path",
            field="model",
        )
    if path.is_file():
        if path.suffix != ".gguf":
            raise InvalidArgumentError(
                f"{path} is a file but not .gguf; pass a model directory or a .gguf file",
                field="model",
            )
        return _in_memory_source(model_source, path, allow_pickle=False, check=check)
    if not (path / "config.json").exists():
        raise NotFoundError(f"{path} has no config.json", field="model")
    if any(path.glob("*.safetensors")):
        return _safetensors_source(model_source, path)
    if any(path.glob("*.bin")):
        if not allow_pickle:
            raise FailedPreconditionError(
                f"{path} holds only pickled .bin weights; steer never unpickles by default. "
                "Convert them to safetensors, or pass --allow-pickle to load them with "
                "torch.load(weights_only=True)",
                field="model",
            )
        return _in_memory_source(model_source, path, allow_pickle=True, check=check)
    raise NotFoundError(f"no safetensors or .bin weights in {path}", field="model")


def _safetensors_files(directory: Path) -> list[str]:
    """The weight files: those the index names, else the one safetensors file."""
    index_path = directory / "model.safetensors.index.json"
    if index_path.exists():
        weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
        return sorted(set(weight_map.values()))
    files = sorted(p.name for p in directory.glob("*.safetensors"))
    if len(files) != 1:
        raise InvalidArgumentError(
            f"{directory} has {len(files)} safetensors files and no index", field="model"
        )
    return files


def _safetensors_source(name: str, directory: Path) -> Source:
    files = _safetensors_files(directory)
    readers = {file: SafetensorsReader(directory / file) for file in files}
    owner: dict[str, SafetensorsReader] = {}
    shards: dict[str, list[str]] = {}
    specs: dict[str, TensorSpec] = {}
    for file, reader in readers.items():
        shards[file] = reader.names_in_file_order()
        for tensor in shards[file]:
            owner[tensor] = reader
            specs[tensor] = reader.spec(tensor)
    extra = [
        p
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name not in SKIP_FILES and not p.name.endswith(WEIGHT_SUFFIXES)
    ]

    def close() -> None:
        for reader in readers.values():
            reader.close()

    def start_file_hashes() -> None:
        for reader in readers.values():
            reader.start_file_hash()

    def start_weight_hashes() -> None:
        for reader in readers.values():
            reader.start_tensor_hashes(_weight_bytes)

    def streamed_tensor_digests() -> dict[str, bytes]:
        return {
            tensor: digest
            for reader in readers.values()
            for tensor, digest in reader.tensor_digests().items()
        }

    return Source(
        name=name,
        config=json.loads((directory / "config.json").read_text()),
        shards=shards,
        specs=specs,
        read=lambda tensor: owner[tensor].read(tensor),
        read_rows=lambda tensor, start, stop: owner[tensor].read_rows(tensor, start, stop),
        read_rows_raw=lambda tensor, start, stop: owner[tensor].read_rows_raw(tensor, start, stop),
        files=[directory / "config.json", *(directory / f for f in files)],
        extra_files=extra,
        close=close,
        start_file_hashes=start_file_hashes,
        streamed_file_hashes=lambda: {directory / f: r.file_hash() for f, r in readers.items()},
        start_weight_hashes=start_weight_hashes,
        streamed_tensor_digests=streamed_tensor_digests,
        stored_digest=lambda tensor: owner[tensor].stored_digest(tensor),
    )


def _weight_bytes(spec: TensorSpec) -> Callable[[memoryview], memoryview] | None:
    """What the weight hash reads from a tensor's raw bytes: its values rounded to bfloat16; for
    a bf16 tensor the stored bytes themselves (None: its file leaf is its weight digest)."""
    if spec.dtype == torch.bfloat16:
        return None
    return lambda raw: bfloat16_bytes(torch.frombuffer(raw, dtype=spec.dtype))


def _in_memory_source(
    name: str, path: Path, *, allow_pickle: bool, check: Callable[[], None]
) -> Source:
    """GGUF or pickled weights: load through transformers (dequantised, float32), then read the
    state dict. GGUF-loaded models refuse save_pretrained, so the config is written without its
    quantization_config.

    Opening is a few steps with ``check`` (raises when the bake is cancelled) between them. The
    transformers calls take seconds each (the load dequantises every tensor in one call), so
    they run on a helper thread that ``check`` is polled beside (:func:`_run_checked`); the
    tokenizer is read only when the output is written, the weight hash only when a direction
    asks for it, tensor by tensor with ``check`` between tensors.
    """
    check()
    model = _run_checked(lambda: _load_model(path, allow_pickle=allow_pickle), check)
    stored_dtype, dtype_note = gguf_precision(path) if path.is_file() else (None, "")
    state = dict(model.state_dict())
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["dtype"] = "float32"
    if config.get("tie_word_embeddings") and "lm_head.weight" in state:
        del state["lm_head.weight"]  # tied: the file stores the embedding once
    specs = {key: TensorSpec(key, t.dtype, tuple(t.shape)) for key, t in state.items()}

    def write_extras(directory: Path) -> None:
        tokenizer = _run_checked(lambda: _load_tokenizer(path), check)
        tokenizer.save_pretrained(str(directory))
        model.generation_config.save_pretrained(str(directory))

    def hash_weights(progress: Callable[[float], None] | None) -> str:
        # what ModelHandle.weight_hash computes for this model, one tensor at a time
        entries = sorted((key, t) for key, t in model.state_dict().items() if t.is_floating_point())

        def tensors() -> Iterator[tuple[str, tuple[int, ...], Iterable[torch.Tensor]]]:
            for index, (key, tensor) in enumerate(entries):
                check()
                yield key, tuple(tensor.shape), (tensor.detach(),)
                if progress is not None:
                    progress((index + 1) / len(entries))

        return weight_digest(tensors())

    return Source(
        name=name,
        config=config,
        shards=_split(specs),
        specs=specs,
        read=lambda tensor: state[tensor].detach().cpu(),
        read_rows=lambda tensor, start, stop: state[tensor][start:stop].detach().cpu(),
        files=[path] if path.is_file() else [*sorted(path.glob("*.bin")), path / "config.json"],
        write_extras=write_extras,
        hash_weights=hash_weights,
        stored_dtype=stored_dtype,
        dtype_note=dtype_note,
    )


#: GGUF tensor types whose values a torch dtype holds as stored
_GGUF_FLOATS = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def gguf_precision(path: Path) -> tuple[str | None, str]:
    """The dtype a GGUF file stores its matrices in (F16 -> float16, BF16 -> bfloat16), so a
    bake keeps it, or None and why float32 stays: quantised matrices (Q4_1, Q8_0, ...) have
    dequantised values that only float32 holds exactly."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError):
        return None, ""
    kinds = {t.tensor_type.name for t in reader.tensors if len(t.shape) >= 2}
    if kinds and kinds <= set(_GGUF_FLOATS):
        # one float type is kept; float32 holds a mix of them exactly
        return _GGUF_FLOATS[kinds.pop()] if len(kinds) == 1 else "float32", ""
    quantised = ", ".join(sorted(kinds - set(_GGUF_FLOATS)))
    return None, (
        f"written as float32: the source's matrices are quantised ({quantised}) and only "
        "float32 holds their dequantised values exactly; --dtype bfloat16 halves the size"
    )


def _load_model(path: Path, *, allow_pickle: bool) -> Any:
    """The model of a GGUF file or a pickled checkpoint directory, float32 on the CPU."""
    from transformers import AutoModelForCausalLM

    common: dict[str, Any] = {"dtype": torch.float32, "device_map": "cpu"}
    if path.is_file():
        check_gguf_model(path)
        with unloadable(path):
            return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **common)
    if not allow_pickle:  # open_source checked it; kept beside the call that unpickles
        raise FailedPreconditionError(f"{path} holds pickled weights", field="model")
    # transformers reads .bin with torch.load(weights_only=True)
    with unloadable(path):
        return AutoModelForCausalLM.from_pretrained(path, use_safetensors=False, **common)


def _load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    if path.is_file():
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return AutoTokenizer.from_pretrained(path)


def _run_checked(step: Callable[[], T], check: Callable[[], None], poll: float = 0.05) -> T:
    """``step()``, run on a helper thread while this one calls ``check`` every ``poll`` seconds.

    A step that cannot stop midway (a transformers load) then no longer delays a cancel: the
    ``check`` that raises ends the wait at once, and the abandoned step finishes on its own
    thread, its result dropped.
    """
    future: Future[T] = Future()

    def run() -> None:
        try:
            future.set_result(step())
        except BaseException as error:  # handed to the waiting thread
            future.set_exception(error)

    threading.Thread(target=run, name="steer-bake-open", daemon=True).start()
    while True:
        check()
        try:
            return future.result(timeout=poll)
        except TimeoutError:
            continue


def _split(specs: dict[str, TensorSpec], max_bytes: int = 2 << 30) -> dict[str, list[str]]:
    groups: list[list[str]] = [[]]
    size = 0
    for name, spec in specs.items():
        if groups[-1] and size + spec.nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += spec.nbytes
    if len(groups) == 1:
        return {"model.safetensors": groups[0]}
    count = len(groups)
    return {f"model-{i + 1:05d}-of-{count:05d}.safetensors": g for i, g in enumerate(groups)}
