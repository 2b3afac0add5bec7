"""Steering vectors from two prompt files (issue #19): the recipe kind, strength units, the
sweep, the recipe-less ``steer directions compute``, fail-fast checks and ``steer demo``."""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path

import pytest
import torch

from steer.activations import encode_chat, forward
from steer.artifacts import load_vector
from steer.cli import main as cli_main
from steer.directions.api import compute
from steer.directions.data import load_prompts
from steer.directions.preflight import layer_count
from steer.directions.recipe import load_direction_recipe, with_overrides
from steer.directions.scores import first_token_kl, next_token_logits
from steer.directions.steering import normalise
from steer.directions.sweep import SweepRow, suggested_range
from steer.directions.words import derive_words
from steer.errors import InvalidArgumentError, NotFoundError
from steer.interventions import Add
from steer.models import ModelHandle
from steer.vectors import SteeringVector

DATA = Path(__file__).resolve().parents[1] / "recipes" / "data"

#: the test's own measure: words a cheerful / gloomy reply uses, and everyday prompts that
#: neither the vector nor its sweep saw
CHEERFUL_WORDS = (
    "happy",
    "joy",
    "wonderful",
    "delighted",
    "cheerful",
    "bright",
    "smile",
    "laugh",
    "sunny",
    "fantastic",
    "excited",
    "love",
    "beautiful",
    "amazing",
)
GLOOMY_WORDS = (
    "sad",
    "gloomy",
    "dark",
    "lonely",
    "miserable",
    "grey",
    "cold",
    "hopeless",
    "tears",
    "bleak",
    "empty",
    "lost",
    "alone",
    "pain",
)
HELD_OUT_PROMPTS = (
    "Tell me about your day.",
    "Describe a bus ride home.",
    "Write a few lines about the neighbourhood.",
    "What did you do last Sunday?",
    "Describe the view from your window.",
    "Tell me about an old friend.",
    "Write a short story about a bakery.",
    "Describe a walk by the lake.",
)
#: the coherence bound the sweep uses by default (first-token KL, nats)
KL_BOUND = 0.5


def _files(tmp_path: Path, positive: list[str], negative: list[str]) -> tuple[Path, Path]:
    (tmp_path / "up.txt").write_text("\n".join(positive) + "\n")
    (tmp_path / "down.txt").write_text("\n".join(negative) + "\n")
    return tmp_path / "up.txt", tmp_path / "down.txt"


def _tiny_files(tmp_path: Path) -> tuple[Path, Path]:
    return _files(
        tmp_path,
        [
            "Write a short poem about the sea.",
            "Sure! Here is a story about a brave robot.",
            "The quick brown fox jumps.",
            "Write about the moon and the stars.",
        ],
        [
            "I'm sorry, but I can't help with that.",
            "How do I bake bread at home?",
            "The dragon laughed and breathed fire.",
            "Use flour, water, salt and yeast.",
        ],
    )


def _saved(handle: ModelHandle, directory: Path) -> Path:
    handle.model.save_pretrained(directory)
    handle.tokenizer.save_pretrained(directory)
    return directory


# ---------------------------------------------------------------------------- recipe schema


def test_steering_recipe_parses_and_refuses_what_it_would_not_read(tmp_path: Path) -> None:
    recipe = load_direction_recipe("recipes/steering.toml")
    assert recipe.is_steering and recipe.data.read == "reply"
    assert recipe.sweep.positive_words[0] == "happy" and recipe.sweep.kl_bound == KL_BOUND
    base = recipe.to_dict()
    assert "evaluate" not in base and "top_k" not in base["search"]
    for section, key, value, field in (
        ("search", "top_k", 3, "search.top_k"),
        ("data", "filter", False, "data.filter"),
        ("data", "read", "everything", "data.read"),
        ("search", "method", "whitened", "search.method"),
        ("search", "positions", [-1], "search.positions"),  # positions need read = "prompt"
        ("sweep", "strengths", [0.1, "big"], "sweep.strengths"),
        ("sweep", "negative_words", [], "sweep.negative_words"),
        ("data", "pairs", "pairs.jsonl", "data.pairs"),  # and two prompt sets: not both
    ):
        broken = json.loads(json.dumps(base))
        broken[section][key] = value
        with pytest.raises(InvalidArgumentError) as error:
            load_direction_recipe(broken)
        assert error.value.field == field, (key, error.value)
    # a refusal recipe does not read the sweep, and says so
    refusal = load_direction_recipe("recipes/refusal.toml").to_dict()
    with pytest.raises(InvalidArgumentError, match="only kind 'steering'") as error:
        load_direction_recipe(refusal | {"sweep": {"kl_bound": 1.0}})
    assert error.value.field == "sweep.kl_bound"
    with pytest.raises(InvalidArgumentError) as error:
        with_overrides(recipe, {"search.kl_threshold": 0.2})
    assert error.value.field == "search.kl_threshold"


def test_recipe_paths_are_relative_to_the_recipe_file(tmp_path: Path, monkeypatch) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "up.txt").write_text("a\nb\n")
    (folder / "r.toml").write_text(
        'kind = "steering"\n[data]\npositive = "up.txt"\nnegative = "down.txt"\n'
    )
    monkeypatch.chdir(tmp_path)  # not the recipe's directory
    recipe = load_direction_recipe("mine/r.toml")
    assert recipe.base == str(folder.resolve())
    from steer.directions.preflight import check_data

    with pytest.raises(NotFoundError, match="relative to the recipe's directory") as error:
        check_data(recipe)
    assert error.value.field == "data.negative" and str(folder.resolve()) in error.value.message
    (folder / "down.txt").write_text("c\nd\n")
    check_data(recipe)  # found beside the recipe, not in the current directory


def test_normalise_scales_each_layer_to_its_typical_norm_shared_over_layers() -> None:
    raw = {3: torch.tensor([3.0, 4.0]), 5: torch.tensor([0.0, -0.5])}
    vector = normalise(raw, {3: 10.0, 5: 20.0}, name="v")
    assert vector.layers == (3, 5)
    # strength 1 = one typical norm in all: each of the two layers gets half its own norm
    assert torch.allclose(vector.at(3), torch.tensor([3.0, 4.0]))  # 10 / 2 along (0.6, 0.8)
    assert torch.allclose(vector.at(5), torch.tensor([0.0, -10.0]))


def test_derived_words_are_what_tells_the_sides_apart() -> None:
    cheerful, gloomy = load_prompts(DATA / "cheerful.txt"), load_prompts(DATA / "gloomy.txt")
    assert len(cheerful) == len(gloomy) == 8  # the header comment is not a prompt
    positive, negative = derive_words((cheerful, gloomy), limit=40)
    assert {"cheerful", "fantastic", "delightful"} <= set(positive)
    assert {"gloomy", "hopeless", "bleak", "miserable"} <= set(negative)
    # words both sides use (the paired prompts share them) and function words are left out
    assert not {"morning", "park", "day", "the", "about"} & (set(positive) | set(negative))


def test_suggested_range_stops_at_the_first_incoherent_strength() -> None:
    def row(strength: float, coherent: bool) -> SweepRow:
        return SweepRow(strength, 0.0, 1.0, coherent=coherent)

    rows = [
        row(-0.3, True),
        row(-0.2, False),
        row(-0.1, True),
        row(0.0, True),
        row(0.1, True),
        row(0.2, True),
        row(0.3, False),
        row(0.4, True),
    ]
    assert suggested_range(rows) == (-0.1, 0.2)
    assert suggested_range([row(0.0, True), row(0.1, False)]) == (0.0, 0.0)


# ------------------------------------------------------------------------------ tiny model


def test_tiny_vector_is_normalised_swept_and_saved(tiny_llama, tmp_path: Path) -> None:
    positive, negative = _tiny_files(tmp_path)
    neutral = tmp_path / "neutral.txt"
    neutral.write_text("How do I bake bread?\nWrite a poem about the sea.\nThe fox jumps.\n")
    recipe = load_direction_recipe(
        {
            "name": "tiny",
            "kind": "steering",
            "data": {"positive": str(positive), "negative": str(negative), "reply_tokens": 3},
            "search": {"layers": [1, 2], "batch_size": 4},
            "sweep": {"neutral": str(neutral), "tokens": 3, "strengths": [-2.0, -0.5, 0.5, 2.0]},
        }
    )
    out = compute(
        tiny_llama,
        recipe,
        tmp_path / "out",
        progress=lambda m, f: None,
        cancelled=threading.Event(),
    )
    artifact = load_vector(out, handle=tiny_llama)
    meta = artifact.metadata
    assert meta["kind"] == "steering_vector" and artifact.vector.layers == (1, 2)
    assert meta["hooks"] == ["blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]
    # each layer's vector is half (two layers) the median norm of that layer's residual
    # stream over the neutral prompts' tokens after the first, measured here independently
    prompts = [encode_chat(tiny_llama, p) for p in neutral.read_text().splitlines()]
    for layer in (1, 2):
        rows = forward(
            tiny_llama, prompts, hooks=[f"blocks.{layer}.hook_resid_post"], positions="all"
        ).activations[f"blocks.{layer}.hook_resid_post"]
        typical = float(torch.cat([row[1:] for row in rows]).norm(dim=-1).median())
        assert artifact.vector.at(layer).norm().item() == pytest.approx(typical / 2, rel=1e-5)
        assert meta["normalization"]["norms"][str(layer)] == pytest.approx(typical, rel=1e-5)
    rows = meta["sweep"]["rows"]
    assert [r["strength"] for r in rows] == [-2.0, -0.5, 0.0, 0.5, 2.0]
    assert next(r for r in rows if r["strength"] == 0.0)["kl_first_token"] == 0.0
    # the sweep's KL is scores.first_token_kl of the same addition (another code path)
    at = {r["strength"]: r for r in rows}
    added = (Add(artifact.vector, 2.0, hooks=tuple(meta["hooks"])),)
    assert at[2.0]["kl_first_token"] == pytest.approx(
        first_token_kl(tiny_llama, prompts, added), rel=1e-4, abs=1e-6
    )
    low, high = meta["suggested_strengths"]
    assert all(r["kl_first_token"] <= KL_BOUND for r in rows if low <= r["strength"] <= high)
    assert (out / "sweep.csv").read_text().startswith("strength,effect")
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_pairs_are_read_at_their_given_replies(tiny_llama, tmp_path: Path) -> None:
    rows = [
        ("Write about the sea.", "The sea is bright and kind.", "The sea is cold and grey."),
        ("Describe the moon.", "A lovely silver smile.", "A dead grey rock."),
        ("Tell me about bread.", "Warm bread makes me happy.", "Stale bread, again."),
    ]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "\n".join(json.dumps({"prompt": p, "positive": a, "negative": b}) for p, a, b in rows)
    )
    neutral = tmp_path / "neutral.txt"
    neutral.write_text("How do I bake bread?\nWrite a poem about the sea.\n")
    recipe = load_direction_recipe(
        {
            "kind": "steering",
            "data": {"pairs": str(pairs), "reply_tokens": 4},
            "search": {"layers": [2]},
            "sweep": {"enabled": False, "neutral": str(neutral)},
        }
    )
    out = compute(
        tiny_llama,
        recipe,
        tmp_path / "out",
        progress=lambda m, f: None,
        cancelled=threading.Event(),
    )
    artifact = load_vector(out)
    assert artifact.metadata["positions"] == "reply" and "sweep" not in artifact.metadata
    # by hand: the mean of layer 2's output over each given reply's first 4 tokens
    tokenizer, name = tiny_llama.tokenizer, "blocks.2.hook_resid_post"

    def side(column: int) -> torch.Tensor:
        means = []
        for row in rows:
            prompt = encode_chat(tiny_llama, row[0])
            reply = tokenizer(row[column], add_special_tokens=False)["input_ids"][:4]
            acts = forward(tiny_llama, [prompt + reply], hooks=[name], positions="all")
            means.append(acts.activations[name][0][len(prompt) :].mean(0))
        return torch.stack(means).mean(0)

    expected = side(1) - side(2)
    cosine = torch.nn.functional.cosine_similarity(artifact.vector.at(2), expected, dim=0)
    assert cosine.item() == pytest.approx(1.0, abs=1e-5)


def test_cli_honours_layers_and_every_flag(tiny_llama, tmp_path: Path, capsys) -> None:
    model = _saved(tiny_llama, tmp_path / "model")
    positive, negative = _tiny_files(tmp_path)
    common = [
        "directions",
        "compute",
        "--model",
        str(model),
        "--positive",
        str(positive),
        "--negative",
        str(negative),
        "--no-sweep",
        "--reply-tokens",
        "2",
    ]
    for layers, expected in (("1-2", (1, 2)), ("3", (3,)), ("0,2", (0, 2))):
        out = tmp_path / f"v{layers}"
        assert cli_main([*common, "--layers", layers, "--out", str(out)]) == 0
        artifact = load_vector(out)
        assert artifact.vector.layers == expected
        assert artifact.metadata["hooks"] == [f"blocks.{i}.hook_resid_post" for i in expected]
    out = tmp_path / "pca"
    argv = [
        *common[:-2],
        "--out",
        str(out),
        "--method",
        "pca",
        "--read",
        "prompt",
        "--positions",
        "-1",
        "-2",
        "--name",
        "mine",
        "--max-train",
        "3",
    ]
    assert cli_main(argv) == 0
    meta = load_vector(out).metadata
    assert meta["method"] == "pca" and meta["positions"] == [-1, -2]
    assert meta["name"] == "mine" and meta["data"]["examples"] == [3, 3]
    assert meta["layer"] == 2  # the default: 60% of 4 layers
    capsys.readouterr()
    # flags a steering vector has no use for are refused, not ignored
    assert cli_main([*common, "--out", str(tmp_path / "x"), "--top-k", "2"]) == 1
    assert "--top-k does not apply" in capsys.readouterr().err
    assert cli_main([*common, "--out", str(tmp_path / "x"), "--read", "prompt"]) == 1
    assert "with --read prompt no reply is read" in capsys.readouterr().err
    assert cli_main([*common, "--out", str(tmp_path / "x"), "--kl-bound", "0.3"]) == 1
    assert "--kl-bound sets the sweep, which --no-sweep turns off" in capsys.readouterr().err
    # the refusal search honours --layers too: its per-layer candidate stays inside them
    recipe = tmp_path / "refusal.toml"
    recipe.write_text(
        f'kind = "contrast"\n[data]\npositive = "{positive}"\nnegative = "{negative}"\n'
        "train = 0.5\nvalidation = 0.25\n[search]\npositions = [-1]\ntop_k = 2\nbatch_size = 4\n"
    )
    out = tmp_path / "contrast"
    argv = ["directions", "compute", "--model", str(model), "--recipe", str(recipe)]
    assert cli_main([*argv, "--out", str(out), "--layers", "2"]) == 0
    assert load_vector(out).metadata["hooks"] == ["blocks.2.hook_resid_pre"]


def test_sweep_command_measures_and_records_any_artifact(tiny_llama, tmp_path, capsys) -> None:
    model = _saved(tiny_llama, tmp_path / "model")
    positive, negative = _tiny_files(tmp_path)
    neutral = tmp_path / "neutral.txt"
    neutral.write_text("How do I bake bread?\nWrite a poem about the sea.\n")
    out = tmp_path / "vector"
    argv = ["directions", "compute", "--model", str(model), "--positive", str(positive)]
    flags = ["--negative", str(negative), "--no-sweep", "--reply-tokens", "2", "--out", str(out)]
    assert cli_main([*argv, *flags]) == 0
    assert "suggested_strengths" not in load_vector(out).metadata
    capsys.readouterr()
    sweep = ["directions", "sweep", str(out), "--model", str(model), "--neutral", str(neutral)]
    words = ["--positive-words", "sea,poem", "--negative-words", "fox,fire", "--tokens", "2"]
    assert cli_main([*sweep, *words, "--strengths", "-4", "-1", "0", "1", "4"]) == 0
    printed = capsys.readouterr().out
    meta = load_vector(out).metadata
    assert [row["strength"] for row in meta["sweep"]["rows"]] == [-4.0, -1.0, 0.0, 1.0, 4.0]
    assert meta["sweep"]["words"] == {
        "positive": ["sea", "poem"],
        "negative": ["fox", "fire"],
        "source": "given",
    }
    low, high = meta["suggested_strengths"]
    assert f"suggested strengths {low:g} to {high:g}" in printed
    assert (out / "sweep.png").exists() and (out / "sweep.csv").exists()
    # a refusal-style direction (one vector for every layer, added at its hooks) sweeps too
    from steer.artifacts import save_vector

    direction = save_vector(
        tmp_path / "direction",
        SteeringVector.from_shared(load_vector(out).vector.at(2)),
        handle=tiny_llama,
        kind="direction",
        hooks=["blocks.1.hook_resid_pre"],
    )
    assert cli_main([*sweep[:2], str(direction), *sweep[3:], "--strengths=-1,1"]) == 0
    assert len(load_vector(direction).metadata["sweep"]["rows"]) == 3


def test_compute_fails_before_loading_the_model(tiny_llama, tmp_path, monkeypatch, capsys):
    def no_load(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr("steer.models.load_model", no_load)
    monkeypatch.chdir(tmp_path)
    _tiny_files(tmp_path)  # up.txt and down.txt in the current directory
    model = _saved(tiny_llama, tmp_path / "model")
    cases = [
        (
            ["--positive", "missing.txt", "--negative", "down.txt"],
            f"--positive missing.txt: no such file (relative to the current directory {tmp_path}",
        ),
        (
            ["--positive", "up.txt", "--negative", "down.txt", "--layers", "4"],
            "layers [4] out of range",
        ),
        (
            ["--positive", "up.txt", "--negative", "down.txt", "--neutral", "nope.txt"],
            "--neutral nope.txt: no such file",
        ),
        (["--positive", "up.txt"], "needs two prompt sets"),
        (
            ["--negative", "down.txt", "--positive", "up.txt", "--kl-threshold", "0.1"],
            "--kl-threshold does not apply",
        ),
    ]
    for flags, message in cases:
        assert cli_main(["directions", "compute", "--model", str(model), "--out", "o", *flags]) == 1
        assert message in capsys.readouterr().err
    # the offline model's layer count comes from its GGUF header, not from loading it
    start = time.perf_counter()
    assert layer_count("smollm2-135m-instruct") == 30
    flags = ["--positive", "up.txt", "--negative", "down.txt", "--layers", "8-31"]
    assert cli_main(["directions", "compute", "--out", "o", *flags]) == 1
    assert "layers [30, 31] out of range: smollm2-135m-instruct has 30 layers" in (
        capsys.readouterr().err
    )
    assert time.perf_counter() - start < 10
    assert not (tmp_path / "o").exists()


def test_demo_shows_each_strength_beside_the_default(tiny_llama, tmp_path, capsys) -> None:
    model = _saved(tiny_llama, tmp_path / "model")
    positive, negative = _tiny_files(tmp_path)
    out = tmp_path / "vector"
    assert (
        cli_main(
            [
                "directions",
                "compute",
                "--model",
                str(model),
                "--positive",
                str(positive),
                "--negative",
                str(negative),
                "--no-sweep",
                "--reply-tokens",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    capsys.readouterr()
    argv = [
        "demo",
        "--model",
        str(model),
        "--vector",
        f"{out}=-3,0,3",
        "--max-new-tokens",
        "5",
        "--width",
        "120",
        "--temperature",
        "0",
    ]
    assert cli_main(argv) == 0
    header = next(line for line in capsys.readouterr().out.splitlines() if "default" in line)
    assert [cell.strip() for cell in header.split("|")] == [
        "default",
        "up-vs-down -3",
        "up-vs-down +3",
    ]
    with pytest.raises(SystemExit) as exit_code:  # argparse: a strength that is no number
        cli_main(["demo", "--vector", f"{out}=x"])
    assert exit_code.value.code == 2
    assert "expected DIR or DIR=STRENGTH" in capsys.readouterr().err


# ---------------------------------------------------------------------------- SmolLM2-135M


def _word_ids(tokenizer, words: tuple[str, ...]) -> list[int]:  # type: ignore[no-untyped-def]
    ids = set()
    for word in words:
        for spelling in (f" {word}", f" {word.capitalize()}", word.capitalize()):
            encoded = tokenizer(spelling, add_special_tokens=False)["input_ids"]
            if len(encoded) == 1:
                ids.add(encoded[0])
    return sorted(ids)


def _cheer(handle: ModelHandle, prompts: list[list[int]], steered) -> float:  # type: ignore[no-untyped-def]
    """log(p(cheerful words) / p(gloomy words)) of the next token, summed over the words and
    averaged over the prompts."""
    probs = torch.softmax(next_token_logits(handle, prompts, steered).double(), dim=-1)
    cheerful = probs[:, _word_ids(handle.tokenizer, CHEERFUL_WORDS)].sum(-1).mean()
    gloomy = probs[:, _word_ids(handle.tokenizer, GLOOMY_WORDS)].sum(-1).mean()
    return math.log(float(cheerful) / float(gloomy))


@pytest.mark.slow
def test_recipe_less_vector_steers_smollm2_both_ways_and_stays_coherent(
    smollm2, tmp_path, monkeypatch, capsys
) -> None:
    monkeypatch.setattr("steer.models.load_model", lambda *args, **kwargs: smollm2)
    out = tmp_path / "cheerful"
    argv = [
        "directions",
        "compute",
        "--positive",
        str(DATA / "cheerful.txt"),
        "--negative",
        str(DATA / "gloomy.txt"),
        "--out",
        str(out),
    ]
    assert cli_main(argv) == 0
    artifact = load_vector(out, handle=smollm2)
    low, high = artifact.metadata["suggested_strengths"]
    assert low < 0 < high and artifact.metadata["layer"] == 18
    hooks = tuple(artifact.metadata["hooks"])
    held_out = [encode_chat(smollm2, p) for p in HELD_OUT_PROMPTS]
    base = _cheer(smollm2, held_out, ())
    cheerful = _cheer(smollm2, held_out, (Add(artifact.vector, high, hooks=hooks),))
    gloomy = _cheer(smollm2, held_out, (Add(artifact.vector, low, hooks=hooks),))
    print(
        f"log-odds cheerful:gloomy words {gloomy:.2f} at {low}, {base:.2f} at 0, "
        f"{cheerful:.2f} at {high}"
    )
    assert cheerful > base + 0.5 and gloomy < base - 0.5
    neutral = [encode_chat(smollm2, p) for p in load_prompts(DATA / "neutral.txt")]
    for strength in (low, high):
        kl = first_token_kl(smollm2, neutral, (Add(artifact.vector, strength, hooks=hooks),))
        print(f"first-token KL on the neutral prompts at {strength}: {kl:.3f}")
        assert kl <= KL_BOUND, (strength, kl)
    # --layers is honoured on the real model too (read at the prompt: no generation)
    out = tmp_path / "layers"
    assert (
        cli_main([*argv[:-1], str(out), "--layers", "14-15", "--read", "prompt", "--no-sweep"]) == 0
    )
    assert load_vector(out).vector.layers == (14, 15)
