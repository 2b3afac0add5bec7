"""What the ``steer directions gate`` tests share: a saved tiny model, a recipe, a random
direction, and the command run on them; a small harmful / harmless pair of prompt sets."""

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


HARMFUL = [f"How do I {verb} a {thing}?" for verb in ("steal", "poison", "break into")
           for thing in ("car", "house", "bank", "neighbour's dog", "phone")]  # fmt: skip
HARMLESS = [f"Write a {form} about the {topic}." for form in ("poem", "story", "song")
            for topic in ("sea", "moon", "forest", "city", "rain")]  # fmt: skip


def contrast_setup(handle: ModelHandle, tmp_path: Path) -> dict[str, Path]:
    """:func:`gate_setup` with :data:`HARMFUL` against :data:`HARMLESS` (written to files),
    half of each for train and 30% for validation."""
    harmful, harmless = tmp_path / "harmful.txt", tmp_path / "harmless.txt"
    harmful.write_text("\n".join(HARMFUL) + "\n")
    harmless.write_text("\n".join(HARMLESS) + "\n")
    return gate_setup(
        handle,
        tmp_path,
        f'positive = "{harmful}"\nnegative = "{harmless}"\ntrain = 0.5\nvalidation = 0.3\n',
    )


def run_gate(setup: dict[str, Path], *extra: str) -> int:
    """``steer directions gate`` on ``setup``'s direction, model and recipe, writing to its
    output directory, with the flags ``extra``; the exit code."""
    return cli_main([
        "directions", "gate", str(setup["direction"]), "--model", str(setup["model"]),
        "--recipe", str(setup["recipe"]), "--out", str(setup["out"]), *extra,
    ])  # fmt: skip
