"""Baking a gated recipe: refused (weights cannot hold a gate) unless the ungated edit is asked for,
then baked without the gate and the provenance says so; through the library and the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from equivalence import interventions_of, logits, random_vector, relative_difference
from tiny import tiny_handle

from steer.artifacts import save_vector
from steer.bake import bake, read_control_vector
from steer.bake.api import bake_with_options
from steer.bake.options import BakeOptions
from steer.bake.provenance import PROVENANCE
from steer.cli import main as steer_main
from steer.errors import InvalidArgumentError
from steer.models import ModelHandle, load_model
from steer.recipes import load_edit_recipe

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelHandle, Path, Path, Path]:
    """The tiny llama saved as a source, a vector artifact and a condition direction for it."""
    root = tmp_path_factory.mktemp("bake-gates")
    handle = tiny_handle("llama")
    saved = root / "llama"
    handle.model.save_pretrained(saved)
    handle.tokenizer.save_pretrained(saved)
    vector = save_vector(root / "vector", random_vector(1), handle=handle)
    condition = save_vector(root / "condition", random_vector(7), handle=handle)
    return handle, saved, vector, condition


def _recipes(vector: Path, condition: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(gated, the same without its gate)."""
    edit = {"kind": "add", "vector": str(vector), "strength": 2.5, "layers": [1, 3]}
    gate = {"hook": HOOK, "direction": str(condition), "threshold": 0.5, "scope": "prompt"}
    return {"name": "g", "edits": [{**edit, "gate": gate}]}, {"name": "g", "edits": [edit]}


@pytest.mark.parametrize("output_format", ["model", "lora", "control-vector"])
def test_a_gated_recipe_is_refused(source, tmp_path: Path, output_format: str) -> None:  # type: ignore[no-untyped-def]
    _handle, saved, vector, condition = source
    gated, _ = _recipes(vector, condition)
    out = tmp_path / ("cv.gguf" if output_format == "control-vector" else "out")
    with pytest.raises(InvalidArgumentError) as raised:
        bake(str(saved), gated, out, output_format=output_format)
    assert raised.value.field == "edits[0].gate"
    assert raised.value.message.startswith("weights cannot hold a gate: ")
    assert "ungated" in raised.value.message
    assert not out.exists()


def test_ungated_bakes_the_edit_without_its_gate_and_says_so(source, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    handle, saved, vector, condition = source
    gated, ungated = _recipes(vector, condition)
    options = BakeOptions(ungated=True)
    out = bake_with_options(str(saved), load_edit_recipe(gated), tmp_path / "out", options)
    assert options.notes == []  # the caller's options are left as they were
    baked = load_model(str(out))
    runtime = logits(handle, interventions_of(ungated))
    assert relative_difference(runtime, logits(baked)) <= 1e-4
    assert relative_difference(runtime, logits(handle)) > 1e-2
    record = json.loads((out / PROVENANCE).read_text())
    assert "gate" not in record["recipe"]["edits"][0]
    dropped = [note for note in record["notes"] if note.startswith("UNGATED: edits[0]'s gate")]
    assert len(dropped) == 1
    assert HOOK in dropped[0] and "threshold 0.5" in dropped[0] and "scope prompt" in dropped[0]


def test_ungated_control_vector_records_the_dropped_gate(source, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _handle, saved, vector, condition = source
    gated, _ = _recipes(vector, condition)
    options = BakeOptions(output_format="control-vector", ungated=True)
    out = bake_with_options(str(saved), load_edit_recipe(gated), tmp_path / "cv.gguf", options)
    baked, metadata = read_control_vector(out)
    torch.testing.assert_close(baked.at(1), 2.5 * random_vector(1).at(1))
    provenance: Any = metadata["provenance"]
    assert any(note.startswith("UNGATED: edits[0]'s gate") for note in provenance["notes"])


def test_ungated_on_an_ungated_recipe_changes_nothing(source, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _handle, saved, vector, condition = source
    _, ungated = _recipes(vector, condition)
    options = BakeOptions(ungated=True)
    out = bake_with_options(str(saved), load_edit_recipe(ungated), tmp_path / "out", options)
    notes = json.loads((out / PROVENANCE).read_text())["notes"]
    assert not any(note.startswith("UNGATED") for note in notes)


def _write_recipe(directory: Path, vector: Path, condition: Path) -> Path:
    path = directory / "gated.toml"
    path.write_text(
        f'[[edits]]\nkind = "add"\nvector = "{vector}"\nstrength = 2.5\nlayers = [1, 3]\n\n'
        f'[edits.gate]\nhook = "{HOOK}"\ndirection = "{condition}"\nthreshold = 0.5\n'
    )
    return path


def test_the_cli_refuses_a_gated_recipe_without_ungated(  # type: ignore[no-untyped-def]
    source, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _handle, saved, vector, condition = source
    recipe = _write_recipe(tmp_path, vector, condition)
    argv = ["bake", "--model", str(saved), "--recipe", str(recipe), "--out", str(tmp_path / "o")]
    assert steer_main(argv) == 1
    assert "edits[0].gate: weights cannot hold a gate: " in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert steer_main([*argv, "--ungated"]) == 0
    captured = capsys.readouterr()
    assert "note: UNGATED: edits[0]'s gate" in captured.err
    record = json.loads((tmp_path / "o" / PROVENANCE).read_text())
    assert any(note.startswith("UNGATED") for note in record["notes"])


def test_the_cli_names_a_missing_gate_direction(
    source, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    _handle, saved, vector, _condition = source
    recipe = _write_recipe(tmp_path, vector, tmp_path / "nowhere")
    argv = ["bake", "--model", str(saved), "--recipe", str(recipe), "--out", str(tmp_path / "o")]
    assert steer_main([*argv, "--ungated"]) == 1
    assert "edits[0].gate.direction: " in capsys.readouterr().err
