"""`steer directions gate --compute`: the direction and its gate from one model load, the gate's
train prompts taken from the search's reads instead of read again, with the same results as
`steer directions compute` then `steer directions gate`."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from gate_setup import HARMFUL, contrast_setup

from steer.activations import encode_chat, forward, read_last
from steer.artifacts import load_vector
from steer.cli import main as cli_main
from steer.directions.api import compute
from steer.directions.gating import gate_reads, gate_splits
from steer.directions.pipeline import TrainReads
from steer.directions.recipe import load_direction_recipe
from steer.models import ModelHandle

HOOKS = ("blocks.1.hook_resid_pre", "blocks.2.hook_resid_pre")


@pytest.fixture
def setup(tiny_llama: ModelHandle, tmp_path: Path) -> dict[str, Path]:
    return contrast_setup(tiny_llama, tmp_path)


def _rows(handle: ModelHandle) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    """Prompts the model's first block sees (each pass adds its batch's rows)."""
    rows: list[int] = []
    hook = handle.resolver.layer(0).register_forward_pre_hook(
        lambda _module, args, kwargs: rows.append(
            int((args[0] if args else kwargs["hidden_states"]).shape[0])
        ),
        with_kwargs=True,
    )
    return rows, hook


def test_the_gate_reads_no_train_prompt_the_search_read(
    tiny_llama: ModelHandle, setup: dict[str, Path], tmp_path: Path
) -> None:
    handle = tiny_llama
    recipe = load_direction_recipe(setup["recipe"])
    known: TrainReads = {}
    compute(
        handle, recipe, tmp_path / "d", progress=lambda *_: None, cancelled=threading.Event(),
        reads=known,
    )  # fmt: skip
    splits = gate_splits(recipe)
    train = [*splits["positive"].train, *splits["negative"].train]
    assert set(known) == {tuple(encode_chat(handle, prompt)) for prompt in train}
    rows, hook = _rows(handle)
    try:
        again, labels = gate_reads(handle, recipe, HOOKS, known=known)
        from_known = sum(rows)
        rows.clear()
        alone, alone_labels = gate_reads(handle, recipe, HOOKS)
        from_scratch = sum(rows)
    finally:
        hook.remove()
    assert from_scratch - from_known == len(train)
    assert labels == alone_labels
    for key, by_hook in alone.read.items():
        for name, values in by_hook.items():
            torch.testing.assert_close(again.read[key][name], values, rtol=0, atol=1e-5)


def test_read_last_mixes_known_and_fresh_rows_in_order(tiny_llama: ModelHandle) -> None:
    """A prompt held at every hook comes from the known reads; one missing a hook is read."""
    handle = tiny_llama
    prompts = [encode_chat(handle, text) for text in HARMFUL[:5]]
    hooks = list(HOOKS)
    whole = forward(handle, prompts, hooks=hooks).activations
    marked = {name: torch.full((handle.d_model,), 7.0) for name in hooks}
    known = {
        tuple(prompts[1]): marked,
        tuple(prompts[3]): {hooks[0]: marked[hooks[0]]},  # not every hook: read again
    }
    mixed = read_last(handle, prompts, hooks, known=known)
    for name in hooks:
        assert torch.equal(mixed[name][1], marked[name])
        for row in (0, 2, 3, 4):
            torch.testing.assert_close(mixed[name][row], whole[name][row], rtol=0, atol=1e-5)


def _lines(output: str) -> list[dict]:
    lines = [json.loads(line) for line in output.strip().splitlines() if line.startswith("{")]
    for line in lines:
        line.pop("recipe")
    return lines


def test_compute_then_gate_in_one_command_equals_the_two_commands(
    setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["--model", str(setup["model"]), "--recipe", str(setup["recipe"])]
    flags = ["--hooks", ",".join(HOOKS), "--condition", "direction,discriminant", "--summed",
             "--target-fpr", "0.2"]  # fmt: skip
    assert cli_main(["directions", "compute", *common, "--out", str(tmp_path / "a")]) == 0
    capsys.readouterr()
    gate = ["directions", "gate", *common, *flags]
    assert cli_main([*gate, str(tmp_path / "a"), "--out", str(tmp_path / "ga")]) == 0
    apart = capsys.readouterr().out
    assert cli_main([*gate, str(tmp_path / "b"), "--compute", "--out", str(tmp_path / "gb")]) == 0
    together = capsys.readouterr().out
    first, second = (load_vector(tmp_path / name).vector for name in ("a", "b"))
    assert first.layers == second.layers
    assert (first.shared is None) == (second.shared is None)
    assert first.shared is None or torch.equal(first.shared, second.shared)
    for layer in first.layers:
        assert torch.equal(first.per_layer[layer], second.per_layer[layer])
    assert _lines(together) == _lines(apart) and len(_lines(apart)) == 1
    written = (tmp_path / "gb" / "gated.toml").read_text().replace(str(tmp_path / "b"), "A")
    assert written.replace(str(tmp_path / "gb"), "G") == (
        (tmp_path / "ga" / "gated.toml").read_text().replace(str(tmp_path / "a"), "A")
    ).replace(str(tmp_path / "ga"), "G")


def test_compute_checks_the_recipe_before_the_model_loads(
    setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--compute writes ARTIFACT, so a file there is the clear error compute gives."""
    (tmp_path / "file").write_text("x")
    argv = ["directions", "gate", str(tmp_path / "file"), "--compute", "--model",
            str(setup["model"]), "--recipe", str(setup["recipe"]),
            "--out", str(tmp_path / "g")]  # fmt: skip
    assert cli_main(argv) == 1
    assert "is a file, not a directory" in capsys.readouterr().err
    assert not (tmp_path / "g").exists()


def test_a_pairs_recipe_computes_and_gates_in_one_command(
    setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A pairs recipe's search reads replies, not the gate's prompts: the gate reads them all,
    with the same result as the two commands."""
    pairs = tmp_path / "pairs.jsonl"
    rows = [
        {"prompt": f"You are Sir Aldric, a knight. Scene {i}: the bandits block the road.",
         "positive": "I'm sorry, but violence is never the answer.",
         "negative": f"Sir Aldric laughs and draws his sword {i}."}
        for i in range(12)
    ]  # fmt: skip
    pairs.write_text("".join(json.dumps(row) + "\n" for row in rows))
    recipe = tmp_path / "pairs.toml"
    recipe.write_text(
        f'name = "p"\nkind = "pairs"\n[data]\npairs = "{pairs}"\ntrain = 0.5\nvalidation = 0.3\n'
        "[search]\ntop_k = 1\nrequire_induce = false\nbatch_size = 4\n"
    )
    common = ["--model", str(setup["model"]), "--recipe", str(recipe)]
    assert cli_main(["directions", "compute", *common, "--out", str(tmp_path / "a")]) == 0
    capsys.readouterr()
    gate = ["directions", "gate", *common, "--hooks", ",".join(HOOKS)]
    assert cli_main([*gate, str(tmp_path / "a"), "--out", str(tmp_path / "ga")]) == 0
    apart = capsys.readouterr().out
    assert cli_main([*gate, str(tmp_path / "b"), "--compute", "--out", str(tmp_path / "gb")]) == 0
    assert _lines(capsys.readouterr().out) == _lines(apart)
