"""steer bake from the command line: GGUF source precision, --verify of control vectors, files.

A float16 GGUF source bakes to float16 (quantised ones stay float32, with a note saying why);
``steer bake --verify`` re-hashes a control-vector GGUF against the tensor digests it carries;
every file a recipe names is checked, relative to the recipe, before a model is loaded."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open
from tiny import tiny_handle

from steer.artifacts import save_vector
from steer.bake import bake
from steer.bake.control_vector import verify_control_vector
from steer.bake.source import gguf_precision
from steer.cli import main as steer_main
from steer.models import ModelHandle, load_model
from steer.vectors import SteeringVector

#: Hugging Face Llama module -> llama.cpp tensor name within a block
_BLOCK_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_TOP_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def _gguf_name(key: str) -> str:
    if key in _TOP_NAMES:
        return _TOP_NAMES[key]
    parts = key.split(".")  # model.layers.L.<module>.weight
    return f"blk.{parts[2]}.{_BLOCK_NAMES['.'.join(parts[3:-1])]}.weight"


def _write_tokenizer(writer: gguf.GGUFWriter, handle: ModelHandle) -> None:
    data = json.loads(handle.tokenizer.backend_tokenizer.to_str())["model"]
    tokens = [token for token, _ in sorted(data["vocab"].items(), key=lambda item: item[1])]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * len(tokens))
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in data["merges"]])
    writer.add_bos_token_id(handle.tokenizer.bos_token_id)
    writer.add_eos_token_id(handle.tokenizer.eos_token_id)


def write_tiny_gguf(path: Path, matrix_dtype: type = np.float16) -> Path:
    """The tiny llama as a llama.cpp GGUF whose matrices are stored as ``matrix_dtype`` (norms
    float32, as llama.cpp writes them)."""
    handle = tiny_handle("llama")
    config = handle.model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_embedding_length(config.hidden_size)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    _write_tokenizer(writer, handle)
    for key, tensor in handle.model.state_dict().items():
        values = tensor.detach().numpy()
        writer.add_tensor(
            _gguf_name(key), values.astype(matrix_dtype if values.ndim > 1 else np.float32)
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_recipe(vector: Path) -> dict[str, object]:
    return {"edits": [{"kind": "add", "vector": str(vector), "strength": 2.0, "layers": [1, 2]}]}


@pytest.fixture(scope="module")
def gguf_source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("gguf")
    source = write_tiny_gguf(root / "tiny-f16.gguf")
    vector = SteeringVector.from_shared(torch.randn(64, generator=torch.Generator().manual_seed(2)))
    return source, save_vector(root / "vector", vector, handle=load_model(source))


def test_precision_of_gguf_files(tmp_path: Path) -> None:
    assert gguf_precision(write_tiny_gguf(tmp_path / "a.gguf", np.float16)) == ("float16", "")
    assert gguf_precision(write_tiny_gguf(tmp_path / "b.gguf", np.float32)) == ("float32", "")
    from steer.offline import resolve_offline

    dtype, note = gguf_precision(resolve_offline("smollm2-135m-instruct"))  # Q4_1 and Q8_0
    assert dtype is None and "Q4_1" in note and "--dtype" in note


def test_bake_from_a_float16_gguf_writes_float16(
    gguf_source: tuple[Path, Path], tmp_path: Path
) -> None:
    source, vector = gguf_source
    out = bake(str(source), _add_recipe(vector), tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    with safe_open(str(out / "model.safetensors"), "pt") as tensors:
        assert {tensors.get_tensor(name).dtype for name in tensors.keys()} == {torch.float16}  # noqa: SIM118
    asked = bake(str(source), {**_add_recipe(vector), "dtype": "float32"}, tmp_path / "asked")
    assert json.loads((asked / "config.json").read_text())["dtype"] == "float32"
    # the source's float16 matrices are written as they are stored: float32 holds the same values
    with (
        safe_open(str(out / "model.safetensors"), "pt") as half,
        safe_open(str(asked / "model.safetensors"), "pt") as full,
    ):
        for name in half.keys():  # noqa: SIM118
            if name.endswith("proj.weight"):
                assert torch.equal(half.get_tensor(name).float(), full.get_tensor(name)), name


def test_verify_checks_a_control_vector(
    gguf_source: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source, vector = gguf_source
    out = bake(
        str(source), _add_recipe(vector), tmp_path / "v.gguf", output_format="control-vector"
    )
    assert verify_control_vector(out) == []
    assert steer_main(["bake", "--verify", str(out)]) == 0
    assert capsys.readouterr().out.strip().endswith("ok")
    blob = bytearray(out.read_bytes())
    blob[-4:] = np.float32(123.0).tobytes()  # the last value of the last tensor
    out.write_bytes(bytes(blob))
    assert verify_control_vector(out) == ["hash mismatch: direction.2"]
    assert steer_main(["bake", "--verify", str(out)]) == 1
    assert "hash mismatch: direction.2" in capsys.readouterr().err
    # a control vector steer did not write has nothing to check against
    from steer.bake.control_vector import write_control_vector

    plain = tmp_path / "plain.gguf"
    write_control_vector(plain, SteeringVector(per_layer={1: torch.ones(64)}), model_hint="llama")
    assert "no steer provenance" in verify_control_vector(plain)[0]


def test_missing_recipe_files_are_named_before_the_model_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("steer.cli.bake.bake_with_options", lambda *a: pytest.fail("baked"))
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    recipe = recipes / "r.toml"
    recipe.write_text('[[edits]]\nkind = "add"\nvector = "../out/cheerful"\nstrength = 2.0\n')
    monkeypatch.chdir(tmp_path)
    assert steer_main(["bake", "--recipe", "recipes/r.toml", "--out", "baked"]) == 1
    err = capsys.readouterr().err
    assert "edits[0].vector: '../out/cheerful' is out/cheerful, which does not exist" in err
    assert "relative to recipes" in err
    (tmp_path / "out" / "cheerful").mkdir(parents=True)  # there, but no artifact
    assert steer_main(["bake", "--recipe", "recipes/r.toml", "--out", "baked"]) == 1
    assert "out/cheerful is not a steer vector artifact" in capsys.readouterr().err
