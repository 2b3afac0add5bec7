"""Model loading: HF directories (single, sharded), pickles refused, LoRA merged, offline names."""

from __future__ import annotations

from pathlib import Path

import blake3
import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny import tiny_handle

from steer.activations import forward
from steer.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from steer.models import ModelHandle, load_model
from steer.offline import _require, resolve_offline

PROMPTS = [[5, 9, 30, 31, 32, 40], [7, 8, 9]]


def _logits(handle: ModelHandle) -> torch.Tensor:
    result = forward(handle, PROMPTS, logits="last").logits
    assert isinstance(result, torch.Tensor)
    return result


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelHandle, Path, Path]:
    handle = tiny_handle("qwen2")
    single = tmp_path_factory.mktemp("single")
    sharded = tmp_path_factory.mktemp("sharded")
    handle.model.save_pretrained(single)
    handle.model.save_pretrained(sharded, max_shard_size="100KB")
    for directory in (single, sharded):
        handle.tokenizer.save_pretrained(directory)
    return handle, single, sharded


def test_local_directories_load_to_the_same_model(saved) -> None:  # type: ignore[no-untyped-def]
    handle, single, sharded = saved
    assert len(list(sharded.glob("*.safetensors"))) > 1
    for directory in (single, sharded):
        loaded = load_model(directory)
        assert loaded.architecture == "qwen2" and loaded.num_layers == 4 and loaded.d_model == 64
        assert loaded.weight_hash == handle.weight_hash
        torch.testing.assert_close(_logits(loaded), _logits(handle), rtol=1e-5, atol=1e-5)


def test_weight_hash_changes_with_the_weights(saved) -> None:  # type: ignore[no-untyped-def]
    _handle, single, _ = saved
    loaded = load_model(single)
    before = loaded.weight_hash
    with torch.no_grad():
        loaded.model.model.layers[1].mlp.down_proj.weight[0, 0] += 1.0
    assert load_model(single).weight_hash == before
    changed = ModelHandle(loaded.model, loaded.tokenizer, "x", loaded.resolver)
    assert changed.weight_hash != before


def test_artifacts_from_the_sha256_format_are_checked_then_refreshed(tmp_path: Path) -> None:
    """An artifact recorded with weight-hash format 2 (SHA-256) does not load against the model
    until ``refresh_model_record`` has checked its hash in format 2 and recorded format 3; an
    artifact made for other weights is not refreshed."""
    import hashlib
    import json

    from steer.artifacts import load_vector, refresh_model_record, save_vector
    from steer.models import WEIGHT_HASH_FORMAT
    from steer.vectors import SteeringVector

    handle = tiny_handle("qwen2")
    other = tiny_handle("qwen2", seed=1)
    # format 2, computed independently: SHA-256 over name:shape; + SHA-256 of the bf16 bytes
    legacy = hashlib.sha256()
    for name, tensor in sorted(handle.model.state_dict().items()):
        if tensor.is_floating_point():
            legacy.update(f"{name}:{tuple(tensor.shape)};".encode())
            values = tensor.detach().to(torch.bfloat16).reshape(-1).view(torch.uint8)
            legacy.update(hashlib.sha256(values.numpy().tobytes()).digest())
    assert handle.weight_hash_in_format(2) == legacy.hexdigest() != handle.weight_hash

    vector = SteeringVector.from_shared(torch.randn(handle.d_model))
    made = save_vector(tmp_path / "old", vector, handle=handle, kind="direction")
    foreign = save_vector(tmp_path / "foreign", vector, handle=other, kind="direction")
    for directory, source in ((made, handle), (foreign, other)):
        sidecar = directory / "steer.json"
        metadata = json.loads(sidecar.read_text())
        metadata["model"]["weight_hash"] = source.weight_hash_in_format(2)
        metadata["model"]["weight_hash_format"] = 2
        sidecar.write_text(json.dumps(metadata))
    with pytest.raises(FailedPreconditionError, match="steer directions refresh"):
        load_vector(made, handle=handle)
    assert refresh_model_record(made, handle).endswith(f"format 2 -> {WEIGHT_HASH_FORMAT}")
    loaded = load_vector(made, handle=handle)
    assert loaded.metadata["model"]["weight_hash_format"] == WEIGHT_HASH_FORMAT
    assert torch.equal(loaded.vector.shared, vector.shared)
    assert "already" in refresh_model_record(made, handle)
    with pytest.raises(FailedPreconditionError, match="other weights"):
        refresh_model_record(foreign, handle)
    assert json.loads((foreign / "steer.json").read_text())["model"]["weight_hash_format"] == 2


def test_weight_hash_is_per_tensor_and_order_free() -> None:
    """One BLAKE3 per tensor (of its bf16 bytes, however it is chunked), combined in name order:
    the per-tensor digests can be computed in any order, e.g. a file's."""
    from steer.models import combine_weight_digests, tensor_digest, weight_digest

    generator = torch.Generator().manual_seed(0)
    tensors = {"b.weight": torch.randn(6, 4, generator=generator), "a.bias": torch.randn(4)}
    whole = weight_digest((name, tuple(t.shape), (t,)) for name, t in sorted(tensors.items()))
    chunked = weight_digest(
        (name, tuple(t.shape), t.split(2)) for name, t in sorted(tensors.items())
    )
    shuffled = combine_weight_digests(
        (name, tuple(t.shape), tensor_digest((t.to(torch.bfloat16),)))
        for name, t in reversed(tensors.items())
    )
    assert whole == chunked == shuffled
    assert (
        tensor_digest((tensors["a.bias"],))
        == blake3.blake3(
            tensors["a.bias"].to(torch.bfloat16).view(torch.int16).numpy().tobytes()
        ).digest()
    )
    renamed = weight_digest((f"x{name}", tuple(t.shape), (t,)) for name, t in tensors.items())
    assert renamed != whole


def test_pickled_weights_need_the_explicit_flag(saved, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    handle, _, _ = saved
    handle.model.config.save_pretrained(tmp_path)
    handle.tokenizer.save_pretrained(tmp_path)
    torch.save(handle.model.state_dict(), tmp_path / "pytorch_model.bin")
    assert list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.safetensors"))
    with pytest.raises(FailedPreconditionError, match="never unpickles"):
        load_model(tmp_path)
    loaded = load_model(tmp_path, allow_pickle=True)
    torch.testing.assert_close(_logits(loaded), _logits(handle), rtol=1e-5, atol=1e-5)


def test_lora_adapter_is_merged_at_load(saved, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    handle, single, _ = saved
    base = load_model(single).model
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights=False
    )
    peft_model = get_peft_model(base, config)
    peft_model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        expected = peft_model(torch.tensor([PROMPTS[0]])).logits[0, -1]
    for merged in (
        load_model(single, adapter=tmp_path / "adapter"),
        # an adapter directory alone names its base in adapter_config.json
        load_model(tmp_path / "adapter"),
    ):
        got = forward(merged, [PROMPTS[0]], logits="last").logits
        assert isinstance(got, torch.Tensor)
        torch.testing.assert_close(got[0], expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(got, _logits(handle)[:1])


@pytest.mark.parametrize(
    ("kwargs", "error", "field"),
    [
        ({"source": "no-such-model"}, NotFoundError, "model"),
        ({"source": "/nonexistent/dir"}, NotFoundError, "model"),
        ({"dtype": "float8"}, InvalidArgumentError, "dtype"),
        ({"device": "tpu"}, InvalidArgumentError, "device"),
        ({"quantization": "3bit"}, InvalidArgumentError, "quantization"),
    ],
)
def test_bad_load_arguments(saved, kwargs, error, field) -> None:  # type: ignore[no-untyped-def]
    _handle, single, _ = saved
    kwargs = {"source": single, **kwargs}
    with pytest.raises(error) as raised:
        load_model(**kwargs)
    assert raised.value.field == field


def test_missing_offline_package_names_the_extra() -> None:
    with pytest.raises(FailedPreconditionError, match=r"steer\[offline\]"):
        _require("steer_no_such_package", "steer-no-such-package")


def test_bfloat16_load(saved) -> None:  # type: ignore[no-untyped-def]
    handle, single, _ = saved
    loaded = load_model(single, dtype="bfloat16")
    assert loaded.dtype == torch.bfloat16
    assert loaded.weight_hash == handle.weight_hash  # hashed at bfloat16 precision


@pytest.mark.slow
def test_qwen_is_assembled_once_and_reused() -> None:
    first = resolve_offline("qwen2.5-coder-0.5b-instruct")
    stamp = first.with_suffix(".gguf.sha256")
    modified = first.stat().st_mtime_ns
    assert resolve_offline("qwen2.5-coder-0.5b-instruct") == first
    assert first.stat().st_mtime_ns == modified and stamp.exists()
    assert first.stat().st_size == 491_400_064
