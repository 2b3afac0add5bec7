"""Start a vLLM ``LLMEngine`` for a model steer has loaded.

Whatever steer loads (an offline name, a HF directory, a GGUF file, base + LoRA, a ``steer bake``
output) reaches vLLM as a safetensors directory: :func:`export_for_vllm` writes the loaded
weights once, under the cache directory, named by their weight hash, so the next start (and any
other process) reuses it. The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``)
unless tensor parallelism spreads it over several GPUs (or CPU workers, each bound to its share of
the cores: :func:`cpu_workers_bound`); its workers then get steer's hooks by ``collective_rpc``,
which needs ``VLLM_ALLOW_INSECURE_SERIALIZATION=1`` (set here, for functions of this package
only). Hooks need eager execution: ``enforce_eager`` is always on.
"""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from steer.errors import FailedPreconditionError, UnsupportedArchitectureError
from steer.models import ModelHandle
from steer.offline import cache_dir

#: model types whose vLLM decoder layer has the Llama layout the worker hooks expect
#: (``model.layers[L].self_attn`` / ``.mlp``, returning ``(hidden, residual)``)
#: (each is tested against the hf engine in tests/test_vllm.py)
VLLM_ARCHITECTURES = frozenset({"llama", "mistral", "qwen2"})

#: written last into an export directory: its presence means the export is complete
_COMPLETE = "steer-export.json"

#: the engines started by :func:`start_vllm` whose engine core runs in this process (by id)
_IN_PROCESS: set[int] = set()
_IN_PROCESS_LOCK = threading.Lock()


@dataclass(frozen=True)
class VllmOptions:
    """How to start vLLM. ``kv_cache_gib`` is the CPU KV cache (VLLM_CPU_KVCACHE_SPACE)."""

    tensor_parallel_size: int = 1
    max_model_len: int | None = None
    kv_cache_gib: int = 2
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    device: str | None = None


def require_vllm() -> None:
    try:
        import vllm  # noqa: F401
    except ImportError as error:
        raise FailedPreconditionError(
            f'the vllm backend needs vLLM (pip install -e ".[vllm]"): {error}', field="backend"
        ) from None


def export_for_vllm(handle: ModelHandle, root: Path | None = None) -> Path:
    """A safetensors directory holding ``handle``'s weights and tokenizer (made once)."""
    if handle.architecture not in VLLM_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"the vllm backend supports {', '.join(sorted(VLLM_ARCHITECTURES))}, not "
            f"{handle.architecture!r}; serve it with --backend hf",
            field="backend",
        )
    root = root or cache_dir() / "vllm"
    dtype = str(handle.dtype).removeprefix("torch.")
    target = root / f"{handle.weight_hash[:32]}-{dtype}"
    if (target / _COMPLETE).exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=root))
    try:
        with _dequantized_record(handle.model):
            handle.model.save_pretrained(staging, safe_serialization=True)
        handle.tokenizer.save_pretrained(staging)
        (staging / _COMPLETE).write_text(f'{{"weight_hash": "{handle.weight_hash}"}}\n')
        with contextlib.suppress(FileExistsError, OSError):
            staging.rename(target)  # another process may have finished it first
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


@contextlib.contextmanager
def _dequantized_record(model: Any) -> Iterator[None]:
    """A model loaded from GGUF holds plain float weights but keeps the GGUF quantizer, which
    makes ``save_pretrained`` refuse; hide it (and its config entry) while saving."""
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if quantizer is None or str(getattr(method, "value", method)) != "gguf":
        yield
        return
    config = model.config
    record = config.__dict__.pop("quantization_config", None)
    model.hf_quantizer = None
    try:
        yield
    finally:
        model.hf_quantizer = quantizer
        if record is not None:
            config.quantization_config = record


def _numa_nodes() -> int:
    return len(list(Path("/sys/devices/system/node").glob("node[0-9]*")))


@contextlib.contextmanager
def cpu_workers_bound(workers: int) -> Iterator[None]:
    """While vLLM starts ``workers`` CPU workers, give each its own share of this process's cores.

    vLLM binds each CPU worker's threads to a NUMA node of its own and will not start more
    workers than the machine has nodes; on fewer nodes (one, on most machines) the cores are
    split here instead, in ``VLLM_CPU_OMP_THREADS_BIND`` for this start only (a later start with
    another worker count would read it too). A binding the user set is kept.
    """
    if "VLLM_CPU_OMP_THREADS_BIND" in os.environ or _numa_nodes() >= workers:
        yield  # the user's binding, or vLLM's own: a node per worker
        return
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < workers:
        raise FailedPreconditionError(
            f"tensor_parallel_size {workers} needs a CPU core per worker; "
            f"this process may use {len(cores)}",
            field="tensor_parallel_size",
        )
    share = len(cores) // workers
    groups = [cores[rank * share : (rank + 1) * share] for rank in range(workers)]
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(
        ",".join(str(core) for core in group) for group in groups
    )
    try:
        yield
    finally:
        del os.environ["VLLM_CPU_OMP_THREADS_BIND"]


def start_vllm(
    handle: ModelHandle, *, max_batch: int = 16, options: VllmOptions | None = None
) -> Any:
    """A vLLM V1 ``LLMEngine`` on ``handle``'s weights, ready for steer's hooks."""
    require_vllm()
    options = options or VllmOptions()
    heads = int(getattr(handle.model.config, "num_attention_heads", 1) or 1)
    if heads % options.tensor_parallel_size:
        raise FailedPreconditionError(
            f"tensor_parallel_size {options.tensor_parallel_size} must divide the model's "
            f"{heads} attention heads (each worker holds an equal share of them)",
            field="tensor_parallel_size",
        )
    directory = export_for_vllm(handle)
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(options.kv_cache_gib)
    if options.tensor_parallel_size == 1:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.engine.llm_engine import LLMEngine

    longest = int(getattr(handle.model.config, "max_position_embeddings", 8192) or 8192)
    arguments: dict[str, Any] = {
        "model": str(directory),
        "tokenizer": str(directory),
        "dtype": str(handle.dtype).removeprefix("torch."),
        "enforce_eager": True,
        "enable_prefix_caching": options.enable_prefix_caching,
        "max_num_seqs": max_batch,
        # never past what the model's positions allow (vLLM refuses to start otherwise)
        "max_model_len": min(options.max_model_len or 8192, longest),
        "tensor_parallel_size": options.tensor_parallel_size,
        "seed": 0,
        "disable_log_stats": True,
        # steer's RP samplers vLLM lacks (DRY, XTC, Mirostat, ...): steer.backends.vllm.samplers
        "logits_processors": ["steer.backends.vllm.samplers:SteerSamplers"],
    }
    if handle.device.type == "cuda":
        arguments["gpu_memory_utilization"] = options.gpu_memory_utilization
    threads = torch.get_num_threads()
    workers = options.tensor_parallel_size
    cpu = handle.device.type == "cpu" and workers > 1
    with cpu_workers_bound(workers) if cpu else contextlib.nullcontext():
        llm = LLMEngine.from_engine_args(EngineArgs(**arguments))
    # vLLM's CPU worker drops torch to one thread "for serving" several workers; in this
    # process it would slow the hf side (jobs, feature reads) and vLLM's own forward alike
    torch.set_num_threads(threads)
    if _in_process(llm):
        with _IN_PROCESS_LOCK:
            _IN_PROCESS.add(id(llm))
    return llm


def _in_process(llm: Any) -> bool:
    from vllm.v1.engine.core_client import InprocClient

    return isinstance(llm.engine_core, InprocClient)


def workers_elsewhere(llm: Any) -> bool:
    """Whether ``llm``'s workers run in other processes (``collective_rpc`` then serializes)."""
    return not _in_process(llm) or llm.vllm_config.parallel_config.tensor_parallel_size > 1


def shutdown_vllm(llm: Any) -> None:
    """Shut down an engine :func:`start_vllm` started (its model is unloaded).

    An engine core running in this process tears down the process's distributed state (vLLM's
    parallel groups, torch's process group) as it shuts down, and every other engine core in
    this process runs on that same state: a server holding two models would fail every step of
    the one left. While others remain, the teardown keeps the shared state and only frees memory.
    """
    with _IN_PROCESS_LOCK:
        in_process = id(llm) in _IN_PROCESS
        _IN_PROCESS.discard(id(llm))
        if not (in_process and _IN_PROCESS):
            llm.engine_core.shutdown()
            return
        from vllm.v1.engine import core

        cleanup = core.cleanup_dist_env_and_memory
        core.cleanup_dist_env_and_memory = lambda *args, **kwargs: gc.collect()
        try:
            llm.engine_core.shutdown()
        finally:
            core.cleanup_dist_env_and_memory = cleanup
