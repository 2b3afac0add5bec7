"""Baking on tiny random models: baked weights == run-time interventions, exports, safety."""

from __future__ import annotations

import copy
import json
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from equivalence import interventions_of, logits, random_vector, relative_difference
from tiny import tiny_handle

from steer.artifacts import save_vector
from steer.bake import BakeCancelled, bake, read_control_vector, verify
from steer.bake.api import bake_with_options
from steer.bake.memory import edited_copy
from steer.bake.options import BakeOptions
from steer.bake.source import open_source
from steer.cli.bake import main as bake_main
from steer.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    ResourceExhaustedError,
    UnsupportedArchitectureError,
)
from steer.interventions import Ablate, Add
from steer.models import WEIGHT_HASH_FORMAT, ModelHandle, load_model
from steer.recipes import load_edit_recipe
from steer.vectors import SteeringVector

LLAMA_LIKE = ("llama", "mistral", "qwen2")
GEMMA = ("gemma2", "gemma3_text")


def save_source(  # type: ignore[no-untyped-def]
    handle: ModelHandle, directory: Path, dtype: torch.dtype | None = None, **save_kwargs
) -> Path:
    """The handle's model (a copy in ``dtype`` if given) and tokenizer saved as a source."""
    model = handle.model
    if dtype is not None:
        model = copy.deepcopy(model)
        torch.nn.Module.to(model, dtype)  # in place
    model.save_pretrained(directory, **save_kwargs)
    handle.tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[ModelHandle, Path, Path]]:
    """Per architecture: the tiny handle, its saved directory, a direction artifact for it."""
    root = tmp_path_factory.mktemp("bake-sources")
    result = {}
    for architecture in (*LLAMA_LIKE, *GEMMA):
        handle = tiny_handle(architecture)
        source = save_source(handle, root / architecture)
        direction = save_vector(root / f"{architecture}-direction", random_vector(1), handle=handle)
        result[architecture] = (handle, source, direction)
    return result


KERNEL = {"max_weight": 1.0, "min_weight": 0.3, "peak_layer": 1.5, "width": 2.0}


EDITS: dict[str, dict[str, Any]] = {
    "ablate-kernel": {"kind": "ablate", "kernel": KERNEL},
    "ablate-partial": {"kind": "ablate", "weight": 0.7, "layers": [1, 3]},
    "ablate-two-kernels": {
        "kind": "ablate",
        "kernel": KERNEL,
        "mlp_kernel": {**KERNEL, "peak_layer": 2.5},
        "direction_layer": 2.25,
    },
    "ablate-interpolated": {"kind": "ablate", "direction_layer": 1.5},
    "add": {"kind": "add", "strength": 2.5, "layers": [1, 2]},
    "add-resid-pre": {"kind": "add", "strength": -1.5, "hooks": ["blocks.2.hook_resid_pre"]},
}
CASES = [
    *((architecture, "ablate-kernel") for architecture in LLAMA_LIKE),
    *((architecture, "add") for architecture in LLAMA_LIKE),
    ("llama", "ablate-partial"),
    ("qwen2", "ablate-two-kernels"),
    ("mistral", "ablate-interpolated"),
    ("qwen2", "add-resid-pre"),
]


@pytest.mark.parametrize(("architecture", "case"), CASES, ids=[f"{a}-{c}" for a, c in CASES])
def test_baked_equals_runtime(sources, tmp_path, architecture, case) -> None:  # type: ignore[no-untyped-def]
    handle, source, direction = sources[architecture]
    edit = EDITS[case]
    key = "direction" if edit["kind"] == "ablate" else "vector"
    recipe = {"edits": [{**edit, key: str(direction)}]}
    baked = load_model(bake(str(source), recipe, tmp_path / "out"))
    runtime = logits(handle, interventions_of(recipe))
    assert relative_difference(runtime, logits(baked)) <= 1e-4
    # the edit matters: the unsteered model is far from both
    assert relative_difference(runtime, logits(handle)) > 1e-2


@pytest.mark.parametrize("architecture", LLAMA_LIKE)
def test_full_ablation_equals_plain_ablate(sources, tmp_path, architecture) -> None:  # type: ignore[no-untyped-def]
    """One direction at weight 1 everywhere: baked == run-time Ablate(direction) at every
    resid_pre, attn_out and mlp_out."""
    handle, source, direction = sources[architecture]
    recipe = {"edits": [{"kind": "ablate", "direction": str(direction), "direction_layer": 2}]}
    baked = load_model(bake(str(source), recipe, tmp_path / "out"))
    unit = random_vector(1).at(2)
    plain = Ablate(SteeringVector.from_shared(unit))
    assert relative_difference(logits(handle, [plain]), logits(baked)) <= 1e-4
    # and the plain intervention's resid_pre projections are what the bake relies on
    assert relative_difference(logits(handle, [plain]), logits(handle)) > 1e-2


def test_plain_ablate_intervention_bakes_directly(sources) -> None:  # type: ignore[no-untyped-def]
    """The full Ablate(direction) lowers to a weight plan (resid_pre beyond layer 0 is a no-op);
    a per-layer direction does not, and says why."""
    from steer.bake.edits import build_plan

    shared = SteeringVector.from_shared(random_vector(1).at(0))
    plan = build_plan([(Ablate(shared), False)], num_layers=4, d_model=64)
    assert len(plan.embedding) == 1 and sorted(plan.attention) == [0, 1, 2, 3]
    with pytest.raises(InvalidArgumentError, match="resid_pre"):
        build_plan([(Ablate(random_vector(1)), False)], num_layers=4, d_model=64)


@pytest.mark.parametrize("architecture", LLAMA_LIKE)
def test_projected_variant(sources, tmp_path, architecture) -> None:  # type: ignore[no-untyped-def]
    handle, source, direction = sources[architecture]
    mean = save_vector(tmp_path / "mean", random_vector(2), handle=handle)
    recipe = {
        "edits": [
            {
                "kind": "ablate",
                "direction": str(direction),
                "variant": "projected",
                "harmless_mean": str(mean),
            }
        ]
    }
    interventions = interventions_of(recipe)
    projected = interventions[0].direction
    for layer in range(4):
        assert abs(float(projected.at(layer) @ random_vector(2).at(layer))) < 1e-5
    baked = load_model(bake(str(source), recipe, tmp_path / "out"))
    assert relative_difference(logits(handle, interventions), logits(baked)) <= 1e-4


@pytest.mark.parametrize("architecture", LLAMA_LIKE)
def test_norm_preserving_equals_in_memory_form(sources, tmp_path, architecture) -> None:  # type: ignore[no-untyped-def]
    handle, source, direction = sources[architecture]
    recipe = {
        "edits": [{"kind": "ablate", "direction": str(direction), "variant": "norm_preserving"}]
    }
    edited = edited_copy(handle, load_edit_recipe(recipe))
    baked = load_model(bake(str(source), recipe, tmp_path / "out"))
    assert relative_difference(logits(edited), logits(baked)) <= 1e-4
    # norms of the written vectors are kept; the direction is gone from them
    unit = random_vector(1).at(2) / random_vector(1).at(2).norm()
    before = handle.model.model.layers[2].mlp.down_proj.weight
    after = baked.model.model.layers[2].mlp.down_proj.weight
    torch.testing.assert_close(after.norm(dim=0), before.norm(dim=0), rtol=1e-5, atol=1e-6)
    assert (unit @ after).abs().max() < 1e-4 < (unit @ before).abs().max()
    # and it differs from the plain (non norm-preserving) ablation
    plain = logits(
        handle, interventions_of({"edits": [{**recipe["edits"][0], "variant": "standard"}]})
    )
    assert relative_difference(plain, logits(baked)) > 1e-3


@pytest.mark.parametrize("architecture", GEMMA)
@pytest.mark.parametrize("kind", ["ablate", "add"])
def test_gemma_has_no_exact_form(sources, tmp_path, architecture, kind) -> None:  # type: ignore[no-untyped-def]
    """Gemma normalises attention/MLP outputs before the residual add: no exact weight edit."""
    _handle, source, direction = sources[architecture]
    key = "direction" if kind == "ablate" else "vector"
    recipe = {"edits": [{"kind": kind, key: str(direction), "layers": [1]}]}
    with pytest.raises(UnsupportedArchitectureError, match="post_attention_layernorm"):
        bake(str(source), recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_gemma_control_vector_is_allowed(sources, tmp_path) -> None:  # type: ignore[no-untyped-def]
    _handle, source, direction = sources["gemma2"]
    recipe = {"edits": [{"kind": "add", "vector": str(direction), "layers": [1], "strength": 2.0}]}
    out = bake(str(source), recipe, tmp_path / "cv.gguf", output_format="control-vector")
    vector, metadata = read_control_vector(out)
    torch.testing.assert_close(vector.at(1), 2.0 * random_vector(1).at(1))
    assert metadata["model_hint"] == "gemma2"


def test_combined_recipe_and_multiple_directions(sources, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Two full ablations (their span is removed, as at run time) plus an addition."""
    handle, source, direction = sources["llama"]
    second = save_vector(tmp_path / "second", random_vector(3), handle=handle)
    recipe = {
        "edits": [
            {"kind": "ablate", "direction": str(direction), "direction_layer": 1},
            {"kind": "ablate", "direction": str(second), "direction_layer": 2},
            {"kind": "add", "vector": str(second), "strength": 1.5, "layers": [2]},
        ]
    }
    baked = load_model(bake(str(source), recipe, tmp_path / "out"))
    assert relative_difference(logits(handle, interventions_of(recipe)), logits(baked)) <= 1e-4


def test_zero_strength_bake_is_a_copy(sources, tmp_path) -> None:  # type: ignore[no-untyped-def]
    handle, source, direction = sources["qwen2"]
    recipe = {"edits": [{"kind": "add", "vector": str(direction), "strength": 0.0}]}
    baked = load_model(bake(str(source), recipe, tmp_path / "out"))
    for reference, candidate in zip(logits(handle), logits(baked), strict=True):
        assert torch.equal(reference, candidate)
    assert baked.architecture == "qwen2"


def test_tied_embeddings_are_untied(tmp_path) -> None:
    from tiny import tiny_config, tiny_tokenizer
    from transformers import AutoModelForCausalLM

    from steer.models import from_pretrained_model

    torch.manual_seed(0)
    config = tiny_config("llama")
    config.tie_word_embeddings = True
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 2:
                parameter.normal_(0, 0.2)
    handle = from_pretrained_model(model, tiny_tokenizer(), name="tied")
    source = save_source(handle, tmp_path / "src")
    assert open_source(str(source)).weight_hash() == handle.weight_hash
    direction = save_vector(tmp_path / "dir", random_vector(1), handle=handle)
    recipe = {"edits": [{"kind": "ablate", "direction": str(direction), "direction_layer": 0}]}
    out = bake(str(source), recipe, tmp_path / "out")
    baked = load_model(out)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    assert torch.equal(baked.model.lm_head.weight, handle.model.model.embed_tokens.weight)
    assert not torch.equal(baked.model.model.embed_tokens.weight, baked.model.lm_head.weight)
    assert relative_difference(logits(handle, interventions_of(recipe)), logits(baked)) <= 1e-4
    with pytest.raises(InvalidArgumentError, match="ties its output head"):
        bake(str(source), recipe, tmp_path / "lora", output_format="lora")


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_source_weight_hash_matches_handle(sources, architecture) -> None:  # type: ignore[no-untyped-def]
    handle, source, _direction = sources[architecture]
    assert open_source(str(source)).weight_hash() == handle.weight_hash


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_lora_on_base_equals_baked(sources, tmp_path, architecture) -> None:  # type: ignore[no-untyped-def]
    handle, source, direction = sources[architecture]
    second = save_vector(tmp_path / "second", random_vector(3), handle=handle)
    recipe = {
        "edits": [
            {"kind": "ablate", "direction": str(direction), "kernel": KERNEL},
            {"kind": "ablate", "direction": str(second), "weight": 0.5},
        ]
    }
    baked = load_model(bake(str(source), recipe, tmp_path / "model"))
    adapter = bake(str(source), recipe, tmp_path / "lora", output_format="lora")
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 2 and "model.embed_tokens" in config["target_modules"]
    on_base = load_model(adapter)  # PEFT merges the adapter into its base
    assert relative_difference(logits(baked), logits(on_base)) <= 1e-4
    assert verify(adapter) == []


def test_lora_refuses_what_is_not_low_rank(sources, tmp_path) -> None:  # type: ignore[no-untyped-def]
    _handle, source, direction = sources["llama"]
    for edit, match in (
        ({"kind": "ablate", "direction": str(direction), "variant": "norm_preserving"}, "low-rank"),
        ({"kind": "add", "vector": str(direction)}, "constant vector"),
    ):
        with pytest.raises(InvalidArgumentError, match=match):
            bake(str(source), {"edits": [edit]}, tmp_path / "lora", output_format="lora")
        assert not (tmp_path / "lora").exists()


def test_control_vector_round_trip(sources, tmp_path) -> None:  # type: ignore[no-untyped-def]
    handle, source, direction = sources["llama"]
    edit = {"kind": "add", "vector": str(direction), "strength": 3.0, "layers": [1, 3]}
    recipe = {"name": "cv", "edits": [edit]}
    out = bake(str(source), recipe, tmp_path / "cv.gguf", output_format="control-vector")
    vector, metadata = read_control_vector(out)
    assert vector.layers == (1, 3)
    for layer in (1, 3):
        torch.testing.assert_close(vector.at(layer), 3.0 * random_vector(1).at(layer))
    assert metadata["model_hint"] == "llama" and metadata["layer_count"] == 2
    provenance: Any = metadata["provenance"]
    assert provenance["recipe"]["name"] == "cv"
    # imported as a steering vector, it steers exactly like the recipe
    imported = logits(handle, [Add(vector, 1.0)])
    assert relative_difference(logits(handle, interventions_of(recipe)), imported) <= 1e-6
    with pytest.raises(InvalidArgumentError, match="additive vectors only"):
        bake(
            str(source),
            {"edits": [{"kind": "ablate", "direction": str(direction)}]},
            tmp_path / "bad.gguf",
            output_format="control-vector",
        )
    layer_zero = {"edits": [{"kind": "add", "vector": str(direction), "layers": [0]}]}
    with pytest.raises(InvalidArgumentError, match="layer 0"):
        bake(str(source), layer_zero, tmp_path / "zero.gguf", output_format="control-vector")
    assert not (tmp_path / "bad.gguf").exists() and not (tmp_path / "zero.gguf").exists()


# ---------------------------------------------------------------------------------------------
# Mechanics and bad input


def test_sharded_output_dtype_and_provenance(sources, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    handle, _source, direction = sources["llama"]
    # a sharded source: 3 shards
    sharded = save_source(handle, tmp_path / "sharded", max_shard_size="60KB")
    assert len(list(sharded.glob("*.safetensors"))) > 2
    recipe = {"edits": [{"kind": "add", "vector": str(direction), "layers": [1]}]}
    out = bake(str(sharded), recipe, tmp_path / "out")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in sharded.glob("*.safetensors")}
    assert "model.layers.1.mlp.down_proj.bias" in index["weight_map"]
    record = json.loads((out / "steer_provenance.json").read_text())
    assert record["recipe"]["edits"][0]["vector"] == str(direction)
    assert str(direction) in record["directions"]
    assert any(name.endswith("tokenizer.json") for name in record["files"])
    assert verify(out) == []
    # --dtype
    options = BakeOptions(dtype="bfloat16")
    out16 = bake_with_options(str(sharded), load_edit_recipe(recipe), tmp_path / "bf16", options)
    assert load_model(out16, dtype="bfloat16").model.model.layers[1].mlp.down_proj.bias.dtype == (
        torch.bfloat16
    )


def test_verify_detects_tampering(sources, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    _handle, source, direction = sources["llama"]
    recipe = {"edits": [{"kind": "ablate", "direction": str(direction)}]}
    out = bake(str(source), recipe, tmp_path / "out")
    assert bake_main(["--verify", str(out)]) == 0
    weights = out / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert bake_main(["--verify", str(out)]) == 1
    assert "hash mismatch: model.safetensors" in capsys.readouterr().err


def _tensors_digest_by_definition(path: Path) -> str:
    """blake3-tensors written out from its definition (steer.digests): BLAKE3 over the tag, the
    file size, the header, and the BLAKE3 of each tensor's bytes in file order."""
    import struct

    import blake3

    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    spans = sorted(
        tuple(info["data_offsets"]) for name, info in header.items() if name != "__metadata__"
    )
    root = blake3.blake3(b"steer.safetensors.tensors.v1\0")
    root.update(struct.pack("<Q", len(data)))
    root.update(data[: 8 + length])
    for begin, end in spans:
        if end > begin:
            root.update(blake3.blake3(data[8 + length + begin : 8 + length + end]).digest())
    return root.hexdigest()


def test_provenance_hashes_are_blake3_tensors_and_older_records_verify(sources, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Recorded hashes are blake3-tensors: for safetensors files the root over per-tensor BLAKE3
    leaves (computed here from its definition), for every other file plain BLAKE3 (what ``b3sum``
    prints). Records from before it (``blake3``: plain for every file; none: SHA-256) still
    verify; an unknown algorithm is reported, not guessed."""
    import hashlib

    import blake3

    handle, _source, direction = sources["qwen2"]
    sharded = tmp_path / "src"
    save_source(handle, sharded, torch.bfloat16, max_shard_size="60KB")
    recipe = {"edits": [{"kind": "ablate", "direction": str(direction), "layers": [1]}]}
    out = bake(str(sharded), recipe, tmp_path / "out")
    path = out / "steer_provenance.json"
    record = json.loads(path.read_text())
    assert record["file_hash"] == "blake3-tensors"
    recorded = {out / name: digest for name, digest in record["files"].items()}
    recorded |= {Path(name): digest for name, digest in record["source"]["files"].items()}
    assert sum(file.suffix == ".safetensors" for file in recorded) > 4
    for file, digest in recorded.items():
        if file.suffix == ".safetensors":
            assert digest == _tensors_digest_by_definition(file), file
        else:
            assert digest == blake3.blake3(file.read_bytes()).hexdigest(), file
    for algorithm, hasher in (("blake3", blake3.blake3), (None, hashlib.sha256)):
        older = dict(
            record, files={n: hasher((out / n).read_bytes()).hexdigest() for n in record["files"]}
        )
        if algorithm is None:
            del older["file_hash"]
        else:
            older["file_hash"] = algorithm
        path.write_text(json.dumps(older))
        assert verify(out) == [], algorithm
    record["file_hash"] = "md5"
    path.write_text(json.dumps(record))
    assert verify(out) == ["steer_provenance.json names an unknown file hash 'md5'"]


def test_tensors_digest_covers_the_header_and_every_byte(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Changing a tensor byte, the header's metadata, or appending a byte changes the digest; a
    file that is not safetensors gets plain BLAKE3."""
    import blake3
    from safetensors.torch import save_file

    from steer.digests import tensors_digest

    tensors = {"a": torch.arange(12.0).reshape(3, 4), "b": torch.ones(5), "empty": torch.ones(0)}
    path = tmp_path / "x.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    digest = tensors_digest(path)
    assert digest == _tensors_digest_by_definition(path)
    data = path.read_bytes()
    variants = [bytearray(data) for _ in range(3)]
    variants[0][-1] ^= 1
    save_file(tensors, str(tmp_path / "y.safetensors"), metadata={"format": "pu"})
    variants[1] = bytearray((tmp_path / "y.safetensors").read_bytes())
    variants[2] += b"\0"
    for index, variant in enumerate(variants):
        path.write_bytes(bytes(variant))
        assert tensors_digest(path) != digest, index
    garbage = tmp_path / "bad.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    assert tensors_digest(garbage) == blake3.blake3(b"not a safetensors file").hexdigest()


def test_a_copied_tensor_the_source_could_not_hash_is_hashed_from_the_output(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """``same_as`` returning None (the source read the tensor out of order): the writer hashes
    the bytes it wrote back from its file, and the digest is still the file's."""
    from steer.bake.tensor_io import ShardWriter, TensorSpec
    from steer.digests import tensors_digest

    values = {"a": torch.randn(64, 8), "b": torch.randn(3)}
    specs = [TensorSpec(name, t.dtype, tuple(t.shape)) for name, t in values.items()]
    path = tmp_path / "out.safetensors"
    writer = ShardWriter(path, specs)
    writer.write("a", [values["a"][:10], values["a"][10:]], same_as=lambda: None)
    writer.write("b", [values["b"]])
    assert writer.close() == tensors_digest(path) == _tensors_digest_by_definition(path)


def test_existing_target_needs_overwrite(sources, tmp_path) -> None:  # type: ignore[no-untyped-def]
    _handle, source, direction = sources["llama"]
    recipe = {"edits": [{"kind": "add", "vector": str(direction), "layers": [1]}]}
    out = bake(str(source), recipe, tmp_path / "out")
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(FailedPreconditionError, match="overwrite"):
        bake(str(source), recipe, out)
    stronger = {"edits": [{"kind": "add", "vector": str(direction), "layers": [1], "strength": 2}]}
    bake(str(source), stronger, out, overwrite=True)
    assert (out / "model.safetensors").read_bytes() != before
    assert verify(out) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_direction_from_another_model_is_refused(sources, tmp_path) -> None:  # type: ignore[no-untyped-def]
    _handle, source, _direction = sources["llama"]
    _qwen_handle, _qwen_source, qwen_direction = sources["qwen2"]
    # same d_model, other weights: the weight hash differs
    with pytest.raises(FailedPreconditionError, match="was made for model 'tiny-qwen2'"):
        bake(
            str(source),
            {"edits": [{"kind": "ablate", "direction": str(qwen_direction)}]},
            tmp_path / "a",
        )
    wide = save_vector(tmp_path / "wide", random_vector(1, d_model=32))
    with pytest.raises(InvalidArgumentError, match="d_model 32"):
        bake(str(source), {"edits": [{"kind": "ablate", "direction": str(wide)}]}, tmp_path / "b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wide"]
    options = BakeOptions(allow_other_model=True)
    recipe = load_edit_recipe({"edits": [{"kind": "ablate", "direction": str(qwen_direction)}]})
    assert bake_with_options(str(source), recipe, tmp_path / "c", options).exists()


def test_direction_for_other_weights_is_refused_when_the_pass_ends(sources, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Same architecture and sizes, other weights: only the weight hash tells them apart. It is
    computed during the bake's one read pass; the mismatch aborts before the rename."""
    _handle, source, _direction = sources["llama"]
    other = tiny_handle("llama", seed=1)
    direction = save_vector(tmp_path / "other", random_vector(1), handle=other)
    stages: list[str] = []

    def progress(stage: str, fraction: float) -> None:
        stages.append(stage)

    recipe = {"edits": [{"kind": "ablate", "direction": str(direction)}]}
    with pytest.raises(FailedPreconditionError, match="was made for model 'tiny-llama'") as error:
        bake(str(source), recipe, tmp_path / "out", progress=progress)
    assert "predates" not in str(error.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other"]  # no target, no temporary
    # the weights were hashed while writing, not in a pass of their own before it
    assert stages.index("writing weights") < stages.index("hashing source weights")
    # a sidecar from an older weight-hash format says so
    sidecar = direction / "steer.json"
    metadata = json.loads(sidecar.read_text())
    del metadata["model"]["weight_hash_format"]
    sidecar.write_text(json.dumps(metadata))
    with pytest.raises(
        FailedPreconditionError, match=f"predates weight-hash format {WEIGHT_HASH_FORMAT}"
    ):
        bake(str(source), recipe, tmp_path / "out")


def test_other_architecture_is_refused_before_writing(sources, tmp_path) -> None:  # type: ignore[no-untyped-def]
    _handle, source, _direction = sources["llama"]
    _qwen, _qwen_source, qwen_direction = sources["qwen2"]
    stages: list[str] = []

    def progress(stage: str, fraction: float) -> None:
        stages.append(stage)

    recipe = {"edits": [{"kind": "ablate", "direction": str(qwen_direction)}]}
    with pytest.raises(FailedPreconditionError, match="architecture qwen2"):
        bake(str(source), recipe, tmp_path / "out", progress=progress)
    assert "writing weights" not in stages
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_hash_from_the_bake_pass_equals_the_handle(sources, tmp_path, dtype) -> None:  # type: ignore[no-untyped-def]
    """The digests fed by the bake's reads (raw bytes for bf16, rounded for fp32, a sharded
    source) combine to the loaded model's weight hash, which the provenance then records."""
    handle, _source, _direction = sources["qwen2"]
    sharded = tmp_path / "src"
    save_source(handle, sharded, dtype, max_shard_size="60KB")
    assert len(list(sharded.glob("*.safetensors"))) > 2
    loaded = load_model(sharded, dtype=dtype)
    assert loaded.weight_hash == handle.weight_hash  # bf16 rounding: same hash either way
    direction = save_vector(tmp_path / "d", random_vector(1), handle=loaded)
    recipe = {"edits": [{"kind": "ablate", "direction": str(direction), "layers": [1]}]}
    out = bake(str(sharded), recipe, tmp_path / "out")
    record = json.loads((out / "steer_provenance.json").read_text())
    assert record["source"]["weight_hash"] == handle.weight_hash
    assert all(record["source"]["files"].values()) and verify(out) == []
    opened = open_source(str(sharded))
    opened.start_weight_hashes()
    for name in opened.specs:  # read in file order: every tensor hashed on the way
        opened.read(name)
    assert len(opened.streamed_tensor_digests()) == len(opened.specs)
    assert opened.weight_hash() == handle.weight_hash


def test_a_checked_bf16_bake_hashes_each_source_byte_once(sources, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Every byte a checked bake of a bf16 source hashes, counted at the one place bytes are
    hashed on the way (BackgroundHash.update, the real one still runs): each source tensor once
    (its leaf is the file hash's and the weight hash's) plus the output tensors it edits; the
    tensors it copies unchanged reuse the source's leaves. The outputs still verify."""
    from steer.bake import hashing

    handle, _source, _direction = sources["qwen2"]
    bf16 = tmp_path / "src"
    save_source(handle, bf16, torch.bfloat16, max_shard_size="60KB")
    direction = save_vector(tmp_path / "d", random_vector(1), handle=load_model(bf16))
    hashed = [0]
    update = hashing.BackgroundHash.update

    def counting(self, data):  # type: ignore[no-untyped-def]
        hashed[0] += memoryview(data).nbytes
        update(self, data)

    monkeypatch.setattr(hashing.BackgroundHash, "update", counting)
    recipe = {"edits": [{"kind": "ablate", "direction": str(direction), "layers": [1]}]}
    out = bake(str(bf16), recipe, tmp_path / "out")
    opened = open_source(str(bf16))
    source_bytes = sum(spec.nbytes for spec in opened.specs.values())
    edited = ("model.layers.1.self_attn.o_proj.weight", "model.layers.1.mlp.down_proj.weight")
    assert hashed[0] == source_bytes + sum(opened.specs[name].nbytes for name in edited)
    assert verify(out) == []
    record = json.loads((out / "steer_provenance.json").read_text())
    assert record["source"]["weight_hash"] == handle.weight_hash


def test_background_hashes_keep_order_and_bound_the_queue() -> None:
    """Interleaved hashes on shared workers equal plain BLAKE3, and the queued bytes stay
    within the bound (plus the update just submitted)."""
    import blake3

    from steer.bake.hashing import BackgroundHash, HashWorkers

    workers = HashWorkers(threads=2, max_queued=256 << 10)
    generator = torch.Generator().manual_seed(0)
    blocks = [
        torch.randint(0, 255, (size,), dtype=torch.uint8, generator=generator).numpy().tobytes()
        for size in (100, 70_000, 200_000, 5_000, 131_072) * 6
    ]
    hashes = [BackgroundHash(b"head", workers=workers) for _ in range(3)]
    expected = [blake3.blake3(b"head") for _ in range(3)]
    for index, block in enumerate(blocks):
        hashes[index % 3].update(block)
        expected[index % 3].update(block)
        assert workers._queued <= (256 << 10) + len(block)
    assert [h.hexdigest() for h in hashes] == [e.hexdigest() for e in expected]


def test_kernel_copies_and_written_bytes_give_the_same_output(
    sources, tmp_path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    """Untouched tensors are copied file to file; where copy_file_range fails (another
    filesystem, an old kernel) the read bytes are written instead: same files either way."""
    import errno
    import os

    _handle, source, direction = sources["qwen2"]
    recipe = {"edits": [{"kind": "ablate", "direction": str(direction), "layers": [1]}]}
    copied = bake(str(source), recipe, tmp_path / "copied")
    calls = []

    def cross_device(*args: object) -> int:
        calls.append(args)
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", cross_device)
    written = bake(str(source), recipe, tmp_path / "written")
    assert len(calls) == 1  # the first failure switches the writer to write()
    assert verify(written) == [] and verify(copied) == []
    assert (written / "model.safetensors").read_bytes() == (
        copied / "model.safetensors"
    ).read_bytes()


def test_pickled_source_needs_the_flag(sources, tmp_path) -> None:  # type: ignore[no-untyped-def]
    handle, _source, direction = sources["llama"]
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    handle.model.config.save_pretrained(pickled)
    handle.tokenizer.save_pretrained(pickled)
    torch.save(handle.model.state_dict(), pickled / "pytorch_model.bin")
    recipe = {"edits": [{"kind": "ablate", "direction": str(direction)}]}
    with pytest.raises(FailedPreconditionError, match="pickled"):
        bake(str(pickled), recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    options = BakeOptions(allow_pickle=True)
    out = bake_with_options(str(pickled), load_edit_recipe(recipe), tmp_path / "out", options)
    assert (
        relative_difference(logits(handle, interventions_of(recipe)), logits(load_model(out)))
        <= 1e-4
    )


class FullDisk:
    """A writer that fails with ENOSPC after ``budget`` bytes."""

    def __init__(self, budget: int) -> None:
        self.budget = budget

    def __call__(self, path: Path):  # type: ignore[no-untyped-def]
        import errno

        file = path.open("wb")
        disk = self

        class Writer:
            def write(self, data) -> int:  # type: ignore[no-untyped-def]
                size = len(memoryview(data).cast("B"))
                if size > disk.budget:
                    raise OSError(errno.ENOSPC, "No space left on device")
                disk.budget -= size
                return file.write(data)

            def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
                return getattr(file, name)

        return Writer()


@pytest.mark.parametrize("sharded", [False, True])
def test_full_disk_leaves_nothing(sources, tmp_path, sharded) -> None:  # type: ignore[no-untyped-def]
    """Also with shards written by parallel threads: the disk error is what is raised (not the
    other thread's stop), and no target or temporary is left."""
    handle, source, direction = sources["llama"]
    if sharded:
        source = save_source(handle, tmp_path / "sharded", max_shard_size="60KB")
    recipe = load_edit_recipe({"edits": [{"kind": "ablate", "direction": str(direction)}]})
    options = BakeOptions(opener=FullDisk(100_000))
    with pytest.raises(ResourceExhaustedError, match="no space left"):
        bake_with_options(str(source), recipe, tmp_path / "out", options)
    assert [p.name for p in tmp_path.iterdir()] == (["sharded"] if sharded else [])


def test_parallel_shards_equal_one_at_a_time(sources, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Shards written by several threads at once are byte for byte the shards one thread
    writes, with the same recorded hashes."""
    import steer.bake.writer as bake_writer

    handle, _source, direction = sources["qwen2"]
    sharded = save_source(handle, tmp_path / "sharded", max_shard_size="60KB")
    assert len(list(sharded.glob("*.safetensors"))) > 2
    recipe = {"edits": [{"kind": "ablate", "direction": str(direction)}]}
    parallel = bake(str(sharded), recipe, tmp_path / "parallel")
    monkeypatch.setattr(bake_writer, "SHARD_THREADS", 1)
    serial = bake(str(sharded), recipe, tmp_path / "serial")
    files = sorted(p.name for p in serial.iterdir() if p.name != "steer_provenance.json")
    assert sorted(p.name for p in parallel.iterdir() if p.name != "steer_provenance.json") == files
    for name in files:
        assert (parallel / name).read_bytes() == (serial / name).read_bytes(), name
    records = [
        json.loads((out / "steer_provenance.json").read_text()) for out in (parallel, serial)
    ]
    assert records[0]["files"] == records[1]["files"]
    assert records[0]["source"]["files"] == records[1]["source"]["files"]


def test_cancel_leaves_nothing(sources, tmp_path) -> None:  # type: ignore[no-untyped-def]
    _handle, source, direction = sources["llama"]
    cancelled = threading.Event()
    stages: list[str] = []

    def progress(stage: str, fraction: float) -> None:
        stages.append(stage)
        if stage == "writing weights" and fraction > 0.3:
            cancelled.set()

    recipe = {"edits": [{"kind": "ablate", "direction": str(direction)}]}
    with pytest.raises(BakeCancelled):
        bake(str(source), recipe, tmp_path / "out", progress=progress, cancelled=cancelled)
    assert "writing weights" in stages
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("recipe", "field"),
    [
        ({"edits": []}, "edits"),
        ({"edits": [{"kind": "shave"}]}, "edits[0].kind"),
        ({"edits": [{"kind": "add", "vector": "v", "strenght": 1}]}, "edits[0].strenght"),
        (
            {"edits": [{"kind": "add", "vector": "v", "strength": float("nan")}]},
            "edits[0].strength",
        ),
        ({"edits": [{"kind": "ablate", "direction": "d", "variant": "odd"}]}, "edits[0].variant"),
        ({"edits": [{"kind": "ablate", "direction": "d", "layers": [-1]}]}, "edits[0].layers"),
        (
            {"edits": [{"kind": "ablate", "direction": "d", "kernel": {"max_weight": 1}}]},
            "edits[0].kernel",
        ),
        ({"edits": [{"kind": "ablate"}]}, "edits[0].direction"),
        (
            {"edits": [{"kind": "feature", "sae": "s", "feature": -2, "value": 1}]},
            "edits[0].feature",
        ),
        ({"dtype": "int4", "edits": [{"kind": "add", "vector": "v"}]}, "dtype"),
        ({"edit": []}, "edit"),
    ],
)
def test_recipe_errors_name_the_field(recipe, field) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidArgumentError) as error:
        load_edit_recipe(recipe)
    assert error.value.field == field


def test_recipe_semantic_errors(sources, tmp_path) -> None:  # type: ignore[no-untyped-def]
    _handle, source, direction = sources["llama"]
    bad_layer = {"edits": [{"kind": "ablate", "direction": str(direction), "layers": [9]}]}
    with pytest.raises(InvalidArgumentError) as error:
        bake(str(source), bad_layer, tmp_path / "out")
    assert error.value.field == "edits[0].layers"
    projected = {"edits": [{"kind": "ablate", "direction": str(direction), "variant": "projected"}]}
    with pytest.raises(InvalidArgumentError) as error:
        bake(str(source), projected, tmp_path / "out")
    assert error.value.field == "edits[0].harmless_mean"
    with pytest.raises(InvalidArgumentError) as error:
        bake(str(source), bad_layer, tmp_path / "out", output_format="onnx")
    assert error.value.field == "output_format"
    assert not (tmp_path / "out").exists()


def test_toml_recipe_paths_are_relative_to_the_file(sources, tmp_path) -> None:  # type: ignore[no-untyped-def]
    handle, source, _direction = sources["llama"]
    save_vector(tmp_path / "recipes" / "vec", random_vector(5), handle=handle)
    recipe_file = tmp_path / "recipes" / "r.toml"
    recipe_file.write_text(
        'name = "t"\n[[edits]]\nkind = "add"\nvector = "vec"\nstrength = 2.0\nlayers = [2]\n'
    )
    code = bake_main(
        ["--model", str(source), "--recipe", str(recipe_file), "--out", str(tmp_path / "o")]
    )
    assert code == 0
    recipe = load_edit_recipe(str(recipe_file))
    interventions = recipe.lowered(4)
    assert isinstance(interventions[0], Add)
    assert interventions[0].vector.at(2).equal(random_vector(5).at(2))
    baked = load_model(tmp_path / "o")
    assert relative_difference(logits(handle, interventions), logits(baked)) <= 1e-4


def test_cli_flags(sources, tmp_path) -> None:  # type: ignore[no-untyped-def]
    handle, source, direction = sources["llama"]
    out = tmp_path / "o"
    argv = ["--model", str(source), "--add", f"{direction}:1.5", "--out", str(out)]
    assert bake_main(argv) == 0
    recipe = {"edits": [{"kind": "add", "vector": str(direction), "strength": 1.5}]}
    assert (
        relative_difference(logits(handle, interventions_of(recipe)), logits(load_model(out)))
        <= 1e-4
    )
    from steer.cli import main as steer_main

    assert steer_main(["bake", *argv]) == 1  # exists: a typed error, exit 1
    assert (
        steer_main(
            ["bake", "--model", str(source), "--add", "nocolon", "--out", str(tmp_path / "x")]
        )
        == 1
    )


KILL_SCRIPT = """
import sys, time
from steer.bake import bake

def progress(stage, fraction):
    if stage == "writing weights":
        print(f"writing {fraction:.2f}", flush=True)
        time.sleep(0.1)

bake(sys.argv[1], {"edits": [{"kind": "ablate", "direction": sys.argv[2]}]}, sys.argv[3],
     progress=progress)
print("finished", flush=True)
"""


def test_sigkill_mid_bake_leaves_no_target_and_source_intact(sources, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import hashlib
    import signal
    import subprocess
    import sys

    _handle, source, direction = sources["llama"]

    def hashes() -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in source.iterdir()}

    before = hashes()
    out = tmp_path / "out"
    child = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, str(source), str(direction), str(out)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    for line in child.stdout:
        if line.startswith("writing") and float(line.split()[1]) >= 0.25:
            child.send_signal(signal.SIGKILL)
            break
    assert child.wait() == -signal.SIGKILL
    assert not out.exists()
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert len(leftovers) == 1 and leftovers[0].startswith(".out.steer-tmp-")  # killed mid-way
    assert hashes() == before
    # the next bake to the same target clears the dead process's temporary directory
    bake(str(source), {"edits": [{"kind": "ablate", "direction": str(direction)}]}, out)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert verify(out) == []


def test_example_recipes_parse() -> None:
    root = Path(__file__).resolve().parent.parent / "recipes"
    files = sorted(root.glob("bake-*.toml"))
    assert len(files) >= 3
    for file in files:
        recipe = load_edit_recipe(str(file))
        assert recipe.edits and recipe.name


def test_feature_edit_is_baked_as_decoder_direction_and_flagged(sources, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from safetensors.torch import save_file

    handle, source, _direction = sources["llama"]
    sae = tmp_path / "sae"
    sae.mkdir()
    decoder = torch.randn(8, 64, generator=torch.Generator().manual_seed(4))
    save_file(
        {"W_dec": decoder, "W_enc": decoder.T.contiguous()}, str(sae / "sae_weights.safetensors")
    )
    (sae / "cfg.json").write_text(
        json.dumps({"d_in": 64, "d_sae": 8, "metadata": {"hook_name": "blocks.1.hook_resid_post"}})
    )
    recipe = {"edits": [{"kind": "feature", "sae": str(sae), "feature": 3, "value": 2.0}]}
    out = bake(str(source), recipe, tmp_path / "out")
    runtime = logits(
        handle,
        [Add(SteeringVector.from_shared(decoder[3]), 2.0, hooks=("blocks.1.hook_resid_post",))],
    )
    assert relative_difference(runtime, logits(load_model(out))) <= 1e-4
    notes = json.loads((out / "steer_provenance.json").read_text())["notes"]
    assert any("APPROXIMATE" in note for note in notes)
    bad = {"edits": [{"kind": "feature", "sae": str(sae), "feature": 8, "value": 1.0}]}
    with pytest.raises(InvalidArgumentError) as error:
        bake(str(source), bad, tmp_path / "bad")
    assert error.value.field == "edits[0].feature"


def test_add_uses_the_artifacts_hooks(sources, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A direction from `steer directions` records where it was read (resid_pre of layer L);
    adding it without layers adds it there, as `steer eval --direction D --strength S` does."""
    handle, source, _direction = sources["qwen2"]
    vector = SteeringVector.from_shared(random_vector(6).at(0))
    artifact = save_vector(
        tmp_path / "d", vector, handle=handle, kind="direction", hooks=["blocks.2.hook_resid_pre"]
    )
    out = bake(
        str(source),
        {"edits": [{"kind": "add", "vector": str(artifact), "strength": -2.0}]},
        tmp_path / "o",
    )
    runtime = logits(handle, [Add(vector, -2.0, hooks=("blocks.2.hook_resid_pre",))])
    assert relative_difference(runtime, logits(load_model(out))) <= 1e-4
    assert relative_difference(runtime, logits(handle)) > 1e-2
