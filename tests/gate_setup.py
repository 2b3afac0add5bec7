"""What the ``steer directions gate`` tests share: a saved tiny model, a recipe, a random
direction, and the command run on them."""

from __future__ import annotations

from pathlib import Path

from equivalence import random_vector

from steer.artifacts import save_vector
from steer.cli import main as cli_main
from steer.models import ModelHandle


def gate_setup(handle: ModelHandle, tmp_path: Path, data: str) -> dict[str, Path]:
    """``handle``'s model and tokenizer saved, a refusal-kind recipe whose ``[data]`` section is
    ``data`` (TOML lines), and a random direction artifact for the model; their paths, and the
    gate's output directory (not made)."""
    model = tmp_path / "model"
    handle.model.save_pretrained(model)
    handle.tokenizer.save_pretrained(model)
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'name = "tiny"\nkind = "refusal"\n[data]\n{data}')
    direction = save_vector(
        tmp_path / "direction", random_vector(1, handle.num_layers, handle.d_model), handle=handle
    )
    return {"model": model, "recipe": recipe, "direction": direction, "out": tmp_path / "gated"}


def run_gate(setup: dict[str, Path], *extra: str) -> int:
    """``steer directions gate`` on ``setup``'s direction, model and recipe, writing to its
    output directory, with the flags ``extra``; the exit code."""
    return cli_main([
        "directions", "gate", str(setup["direction"]), "--model", str(setup["model"]),
        "--recipe", str(setup["recipe"]), "--out", str(setup["out"]), *extra,
    ])  # fmt: skip
