"""Loading models: local HF directories, single GGUF files, base + LoRA, offline names.

Safe by default: weights come from safetensors or GGUF; pickled ``.bin`` checkpoints load only
with ``allow_pickle=True`` (and then through ``torch.load(weights_only=True)``, which transformers
uses); ``trust_remote_code`` is off unless asked for.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from steer import digests
from steer.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from steer.hooks import ArchitectureLayout, HookResolver
from steer.offline import OFFLINE_MODELS, resolve_offline

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


#: the weight hash's format, recorded beside it in artifact sidecars: 3 = per-tensor BLAKE3s
#: combined in name order (2: the same with SHA-256; 1, unrecorded, hashed all values in one
#: stream)
WEIGHT_HASH_FORMAT = 3


def stale_weight_hash_hint(model: Mapping[str, Any]) -> str:
    """Why a recorded weight hash may differ although the weights are the same: it was made
    in an older format. Empty when the record names the current format."""
    if model.get("weight_hash_format") == WEIGHT_HASH_FORMAT:
        return ""
    return (
        " (its weight hash predates weight-hash format "
        f"{WEIGHT_HASH_FORMAT}; `steer directions refresh ARTIFACT --model MODEL` checks it "
        "in its own format and records the current one)"
    )


def bfloat16_bytes(chunk: torch.Tensor) -> memoryview:
    """The bytes the weight hash reads for ``chunk``: its values rounded to bfloat16, row-major.

    A bfloat16 tensor is its own rounding, so its bytes are hashed as stored (no copy).
    """
    rounded = chunk.detach().to("cpu", torch.bfloat16).contiguous().reshape(-1)
    return rounded.view(torch.uint8).numpy().data


#: the hash function of each weight-hash format that can still be computed (format 1 cannot)
_WEIGHT_HASHERS: dict[int, Callable[[], Any]] = {3: digests.new, 2: hashlib.sha256}


def tensor_digest(chunks: Iterable[torch.Tensor], weight_format: int = WEIGHT_HASH_FORMAT) -> bytes:
    """BLAKE3 of one tensor's :func:`bfloat16_bytes`; ``chunks`` are consecutive row blocks.
    ``weight_format`` 2 uses SHA-256 instead (the format before BLAKE3)."""
    digest = _WEIGHT_HASHERS[weight_format]()
    for chunk in chunks:
        digest.update(bfloat16_bytes(chunk))
    return bytes(digest.digest())


def combine_weight_digests(
    entries: Iterable[tuple[str, tuple[int, ...], bytes]], weight_format: int = WEIGHT_HASH_FORMAT
) -> str:
    """The weight hash from per-tensor digests: BLAKE3 over ``name:shape;`` + the tensor's
    :func:`tensor_digest`, in sorted name order. Per-tensor digests can be computed in any order
    (a bake source hashes tensors in file order while it reads them)."""
    digest = _WEIGHT_HASHERS[weight_format]()
    for name, shape, tensor in sorted(entries, key=lambda entry: entry[0]):
        digest.update(f"{name}:{tuple(shape)};".encode())
        digest.update(tensor)
    return str(digest.hexdigest())


def weight_digest(
    tensors: Iterable[tuple[str, tuple[int, ...], Iterable[torch.Tensor]]],
    weight_format: int = WEIGHT_HASH_FORMAT,
) -> str:
    """The weight hash of (name, shape, chunks) triples: :func:`tensor_digest` per tensor, then
    :func:`combine_weight_digests`. Loaded models and bake sources both hash through these, so
    the two always agree."""
    return combine_weight_digests(
        (
            (name, tuple(shape), tensor_digest(chunks, weight_format))
            for name, shape, chunks in tensors
        ),
        weight_format,
    )


@dataclass(frozen=True, eq=False)
class ModelHandle:
    """A loaded model with what the rest of steer needs to know about it."""

    model: PreTrainedModel
    tokenizer: Any
    name: str
    resolver: HookResolver = field(repr=False)

    @property
    def architecture(self) -> str:
        return str(self.model.config.model_type)

    @property
    def num_layers(self) -> int:
        return self.resolver.num_layers

    @property
    def d_model(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        weight = self.resolver.embed.weight
        assert isinstance(weight, torch.Tensor)
        return weight.device

    @property
    def chat_template(self) -> str | None:
        return getattr(self.tokenizer, "chat_template", None)

    @cached_property
    def eos_token_ids(self) -> frozenset[int]:
        ids: set[int] = set()
        for source in (self.model.generation_config.eos_token_id, self.tokenizer.eos_token_id):
            if isinstance(source, int):
                ids.add(source)
            elif source:
                ids.update(int(i) for i in source)
        return frozenset(ids)

    @cached_property
    def pad_token_id(self) -> int:
        for candidate in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id):
            if candidate is not None:
                return int(candidate)
        return 0

    def weight_hash_in_format(self, weight_format: int) -> str:
        """The weight hash as an older format computed it (to check an old artifact's record,
        see steer.artifacts.refresh_model_record); the current format is :attr:`weight_hash`."""
        if weight_format == WEIGHT_HASH_FORMAT:
            return self.weight_hash
        if weight_format not in _WEIGHT_HASHERS:
            raise FailedPreconditionError(
                f"weight-hash format {weight_format} can no longer be computed", field="artifact"
            )
        return self._weight_hash(weight_format)

    @cached_property
    def weight_hash(self) -> str:
        """BLAKE3 over parameter names, shapes and per-tensor BLAKE3s of the values rounded to
        bfloat16 (:func:`weight_digest`).

        Rounding to bfloat16 makes float32/bfloat16 loads of the same weights hash alike, so an
        artifact made on one can be checked against the other.
        """
        return self._weight_hash(WEIGHT_HASH_FORMAT)

    def _weight_hash(self, weight_format: int) -> str:
        with torch.no_grad():
            return weight_digest(
                (
                    (name, tuple(tensor.shape), (tensor,))
                    for name, tensor in sorted(self.model.state_dict().items())
                    if tensor.is_floating_point()
                ),
                weight_format,
            )

    def hook_names(self) -> list[str]:
        return self.resolver.hook_names()

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "architecture": self.architecture,
            "num_layers": self.num_layers,
            "d_model": self.d_model,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
        }


def _torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise InvalidArgumentError(
            f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}", field="dtype"
        )
    return DTYPES[dtype]


def _device_kwargs(device: str) -> dict[str, Any]:
    if device == "auto":
        return {"device_map": "auto"}
    if device == "cpu" or device.startswith("cuda"):
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise FailedPreconditionError("CUDA is not available on this machine", field="device")
        return {"device_map": device}
    raise InvalidArgumentError(
        f"unknown device {device!r}; use cpu, cuda[:N] or auto", field="device"
    )


def _quantization_kwargs(quantization: str | None) -> dict[str, Any]:
    if quantization is None:
        return {}
    if quantization not in ("4bit", "8bit"):
        raise InvalidArgumentError("quantization must be 4bit or 8bit", field="quantization")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise FailedPreconditionError(
            "4/8-bit loading needs bitsandbytes: pip install bitsandbytes", field="quantization"
        )
    from transformers import BitsAndBytesConfig

    flag = "load_in_4bit" if quantization == "4bit" else "load_in_8bit"
    return {"quantization_config": BitsAndBytesConfig(**{flag: True})}


def _weight_kwargs(directory: Path, allow_pickle: bool) -> dict[str, Any]:
    if any(directory.glob("*.safetensors")):
        return {"use_safetensors": True}
    if any(directory.glob("*.bin")):
        if not allow_pickle:
            raise FailedPreconditionError(
                f"{directory} holds only pickled .bin weights; steer never unpickles by default. "
                "Convert them to safetensors, or pass allow_pickle=True (--allow-pickle) to load "
                "them with torch.load(weights_only=True)",
                field="model",
            )
        return {"use_safetensors": False}
    raise NotFoundError(f"no safetensors or .bin weights in {directory}", field="model")


def load_model(
    source: str | Path,
    *,
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
    adapter: str | Path | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    quantization: str | None = None,
    layout: ArchitectureLayout | None = None,
) -> ModelHandle:
    """Load ``source``: an offline name, a HF model directory, a ``.gguf`` file, or a LoRA
    adapter directory (merged into its base at load). ``adapter`` merges an extra adapter."""
    torch_dtype = _torch_dtype(dtype)
    common: dict[str, Any] = {
        "dtype": torch_dtype,
        "trust_remote_code": trust_remote_code,
        **_device_kwargs(device),
        **_quantization_kwargs(quantization),
    }
    name = str(source)
    path = resolve_offline(name) if name in OFFLINE_MODELS else Path(source)
    if not path.exists():
        raise NotFoundError(
            f"{source!r} is neither an offline model ({', '.join(OFFLINE_MODELS)}) nor an "
            "existing path",
            field="model",
        )
    if path.is_dir() and (path / "adapter_config.json").exists():
        base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base:
            raise InvalidArgumentError(
                f"{path}/adapter_config.json names no base_model_name_or_path", field="model"
            )
        base_handle = load_model(
            base,
            dtype=dtype,
            device=device,
            allow_pickle=allow_pickle,
            trust_remote_code=trust_remote_code,
            layout=layout,
        )
        return _merge_adapter(base_handle, path, name, layout)
    model, tokenizer = _load_weights(path, common, allow_pickle)
    model.eval()
    model.requires_grad_(False)
    handle = ModelHandle(
        model=model,
        tokenizer=tokenizer,
        name=name,
        resolver=HookResolver(model, str(model.config.model_type), layout),
    )
    if adapter is not None:
        handle = _merge_adapter(handle, Path(adapter), name, layout)
    return handle


def _load_weights(path: Path, common: dict[str, Any], allow_pickle: bool) -> tuple[Any, Any]:
    if path.is_file():
        if path.suffix != ".gguf":
            raise InvalidArgumentError(
                f"{path} is a file but not .gguf; pass a model directory or a .gguf file",
                field="model",
            )
        check_gguf_model(path)
        # GGUF weights are dequantised by transformers; compute happens in the requested dtype.
        kwargs = {"gguf_file": path.name}
        with unloadable(path):
            model = AutoModelForCausalLM.from_pretrained(path.parent, **kwargs, **common)
            tokenizer = AutoTokenizer.from_pretrained(path.parent, **kwargs)
        return model, tokenizer
    if not (path / "config.json").exists():
        raise NotFoundError(f"{path} has no config.json", field="model")
    weight_kwargs = _weight_kwargs(path, allow_pickle)
    with unloadable(path):
        model = AutoModelForCausalLM.from_pretrained(path, **weight_kwargs, **common)
        tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def check_gguf_model(path: Path) -> None:
    """Refuse a GGUF file that is not a model (a llama.cpp control vector, garbage) before
    transformers reads it: transformers' own errors for those are bare ValueErrors."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
        field = reader.fields.get("general.architecture")
        architecture = bytes(field.parts[field.data[0]]).decode() if field else ""
    except (ValueError, OSError, IndexError, UnicodeDecodeError) as error:
        raise InvalidArgumentError(
            f"{path} is not a readable GGUF file: {error}", field="model"
        ) from None
    if architecture == "controlvector":
        raise InvalidArgumentError(
            f"{path} is a llama.cpp control vector, not a model; use it as a vector "
            "(steer.bake.control_vector.read_control_vector)",
            field="model",
        )


@contextmanager
def unloadable(path: Path) -> Iterator[None]:
    """transformers' refusals of a model on disk (an architecture it lacks, a broken config or
    tokenizer) as one FailedPreconditionError naming the path; out-of-memory passes through."""
    try:
        yield
    except (ValueError, KeyError, TypeError, OSError, AttributeError) as error:
        raise FailedPreconditionError(
            f"{path} cannot be loaded: {type(error).__name__}: {error}", field="model"
        ) from None


def _merge_adapter(
    handle: ModelHandle, adapter: Path, name: str, layout: ArchitectureLayout | None
) -> ModelHandle:
    from peft import PeftModel

    if not (adapter / "adapter_config.json").exists():
        raise NotFoundError(f"{adapter} is not a PEFT adapter directory", field="adapter")
    peft_model = PeftModel.from_pretrained(handle.model, str(adapter))
    merged = peft_model.merge_and_unload()
    merged.eval()
    return ModelHandle(
        model=merged,
        tokenizer=handle.tokenizer,
        name=name,
        resolver=HookResolver(merged, str(merged.config.model_type), layout),
    )


def from_pretrained_model(
    model: PreTrainedModel,
    tokenizer: Any,
    name: str = "model",
    layout: ArchitectureLayout | None = None,
) -> ModelHandle:
    """Wrap an already constructed model (tests, notebooks, embedding applications)."""
    model.eval()
    model.requires_grad_(False)
    return ModelHandle(
        model=model,
        tokenizer=tokenizer,
        name=name,
        resolver=HookResolver(model, str(model.config.model_type), layout),
    )
