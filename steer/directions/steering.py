"""Steering vectors: "this vs that" sliders from two prompt sets or pairs, with no search.

The pipeline reads as its steps::

    load examples -> generate replies -> read activations -> one vector per layer
        -> normalise -> sweep -> save

* **Read.** ``read = "reply"`` (the default) lets the model answer each prompt greedily
  (``reply_tokens`` tokens; the unsteered replies to the neutral prompts, which the sweep
  reads, are generated in the same batch), then reads ``blocks.L.hook_resid_post`` over those
  reply tokens,
  teacher-forced, and averages them: the vector is what the model's own cheerful answers have
  that its gloomy ones lack. A pairs file's replies are given, not generated.
  ``read = "prompt"`` averages the prompt's last tokens instead (``search.positions``, default
  the chat template's tokens after the user message), which needs no generation.
* **Vector.** ``mean_difference`` (positive mean minus negative mean) or ``pca`` (first
  principal component of the paired differences, sign fixed so the positives project higher;
  line ``i`` of one set is paired with line ``i`` of the other), one per chosen layer.
* **Normalise.** Each layer's vector is scaled to the *typical residual norm* at that layer (the
  median L2 norm of ``blocks.L.hook_resid_post`` over every token but the first of the neutral
  prompts; the first token, the attention sink, is tens of times larger) divided by the number
  of layers. Strength 1 therefore shifts the residual stream by one typical norm in all (spread
  over the layers), strength 0.1 by a tenth of one: the same strength means the same push on
  any model and at any layer. The factors are recorded in ``steer.json`` (``normalization``).
* **Sweep.** :mod:`steer.directions.sweep` measures the vector at a range of strengths on the
  neutral prompts and records the range that keeps the model coherent (``suggested_strengths``).

The vector is added where it was read, ``blocks.L.hook_resid_post`` (the control-vector
convention: the bake writes it as a bias, and llama.cpp adds it at the same place).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from steer.activations import forward
from steer.artifacts import save_vector
from steer.directions import data as datasets
from steer.directions.methods import compute_direction, get_method
from steer.directions.recipe import DirectionRecipe, Read
from steer.directions.sweep import SweepResult
from steer.directions.words import TargetWords, target_words
from steer.errors import InvalidArgumentError
from steer.hooks import resid_post_hooks
from steer.models import ModelHandle
from steer.text import encode_chat, post_instruction_positions
from steer.vectors import SteeringVector

Progress = Callable[[str, float], None]

#: with no layers given, the vector goes at this fraction of the depth (see default_layers)
DEFAULT_LAYER_FRACTION = 0.6
#: what a strength of 1 means, as recorded in steer.json
STRENGTH_UNIT = "typical residual norm"


@dataclass(frozen=True)
class Examples:
    """A steering recipe's two sides as text: prompts, and for pairs the given replies."""

    positive: tuple[str, ...]
    negative: tuple[str, ...]
    positive_replies: tuple[str, ...] | None = None
    negative_replies: tuple[str, ...] | None = None
    hashes: Mapping[str, str] | None = None


@dataclass(frozen=True)
class Texts:
    """Per side (positive, negative): the prompts, and the replies read (if any)."""

    prompts: tuple[list[str], list[str]]
    replies: tuple[list[str], list[str]] = ([], [])


@dataclass(frozen=True)
class Made:
    """Everything a steering recipe produced, as :func:`save` writes it."""

    examples: Examples
    #: normalised, one vector per layer
    vector: SteeringVector
    #: the method's vectors before normalising, per layer
    raw: Mapping[int, torch.Tensor]
    #: typical residual norm per layer
    norms: Mapping[int, float]
    words: TargetWords
    sweep: SweepResult | None = None


def hook(layer: int) -> str:
    (name,) = resid_post_hooks((layer,))
    return name


def default_layers(num_layers: int) -> tuple[int, ...]:
    """One layer at :data:`DEFAULT_LAYER_FRACTION` of the depth (layer 18 of SmolLM2's 30)."""
    return (min(num_layers - 1, round(DEFAULT_LAYER_FRACTION * num_layers)),)


def steering_layers(num_layers: int, layers: Sequence[int]) -> tuple[int, ...]:
    """The recipe's layers checked against the model (default: :func:`default_layers`)."""
    if not layers:
        return default_layers(num_layers)
    bad = sorted({layer for layer in layers if not 0 <= layer < num_layers})
    if bad:
        raise InvalidArgumentError(
            f"layers {bad} out of range: the model has {num_layers} layers (0-{num_layers - 1})",
            field="search.layers",
        )
    return tuple(sorted(set(layers)))


def load_examples(recipe: DirectionRecipe) -> Examples:
    """Read the recipe's data (no model needed: ``steer directions compute`` checks it before
    loading one). PCA pairs line ``i`` of one set with line ``i`` of the other, so it needs
    sets of one size."""
    data, cap = recipe.data, recipe.data.max_train
    if data.pairs:
        pairs = datasets.recipe_pairs(recipe)[: cap or None]
        prompts = tuple(pair.prompt for pair in pairs)
        return Examples(
            prompts,
            prompts,
            tuple(pair.positive for pair in pairs),
            tuple(pair.negative for pair in pairs),
            {"pairs": datasets.content_hash(pairs)},
        )
    sides = []
    for name, column in (("positive", data.positive_column), ("negative", data.negative_column)):
        loaded = datasets.load_prompts(
            getattr(data, name), column=column or None, field=f"data.{name}", base=recipe.base
        )
        sides.append(tuple(loaded[: cap or None]))
    if get_method(recipe.search.method).paired and len(sides[0]) != len(sides[1]):
        raise InvalidArgumentError(
            f"pca pairs line i of the positive prompts with line i of the negative ones, but "
            f"there are {len(sides[0])} positive and {len(sides[1])} negative prompts; give "
            "sets of one size or use mean_difference",
            field="search.method",
        )
    hashes = {
        "positive": datasets.content_hash(sides[0]),
        "negative": datasets.content_hash(sides[1]),
    }
    return Examples(sides[0], sides[1], hashes=hashes)


def load_neutral(recipe: DirectionRecipe) -> list[str]:
    return datasets.load_prompts(recipe.sweep.neutral, field="sweep.neutral", base=recipe.base)


def compute_vector(
    handle: ModelHandle,
    recipe: DirectionRecipe,
    out_dir: Path,
    *,
    progress: Progress,
    check: Callable[[], None] = lambda: None,
) -> Path:
    """Make, normalise, sweep and save the recipe's steering vector; returns ``out_dir``."""
    from steer.directions import sweep

    progress("reading the examples", 0.0)
    examples = load_examples(recipe)
    system = recipe.data.system or None
    neutral = [encode_chat(handle, p, system) for p in load_neutral(recipe)]
    sides = (
        [encode_chat(handle, p, system) for p in examples.positive],
        [encode_chat(handle, p, system) for p in examples.negative],
    )
    layers = steering_layers(handle.num_layers, recipe.search.layers)
    progress("generating replies", 0.02)
    replies, neutral_replies = generate_replies(handle, recipe, examples, sides, neutral)
    check()
    progress("reading activations", 0.3)
    positive, negative, texts = read_activations(handle, recipe, examples, sides, replies, layers)
    raw = {
        layer: compute_direction(recipe.search.method, positive[:, i], negative[:, i])
        for i, layer in enumerate(layers)
    }
    progress("typical residual norms", 0.4)
    norms = typical_norms(handle, neutral, layers, batch_size=recipe.search.batch_size)
    vector = normalise(raw, norms, name=recipe.name)
    check()
    words = target_words(handle.tokenizer, recipe.sweep, texts.prompts, texts.replies)
    measured = None
    if recipe.sweep.enabled:
        measured = sweep.run(
            handle,
            vector,
            neutral,
            sweep.options_from(recipe.sweep),
            words,
            replies=neutral_replies,
            progress=lambda message, fraction: progress(message, 0.45 + 0.5 * fraction),
            check=check,
        )
    check()
    progress("saving", 0.97)
    path = save(handle, recipe, Made(examples, vector, raw, norms, words, measured), out_dir)
    progress("saved", 1.0)
    return path


def generate_replies(
    handle: ModelHandle,
    recipe: DirectionRecipe,
    examples: Examples,
    sides: tuple[list[list[int]], list[list[int]]],
    neutral: list[list[int]],
) -> tuple[list[list[int]] | None, list[list[int]] | None]:
    """(the examples' reply ids, the unsteered replies to the neutral prompts), each None when
    not needed. What must be generated -- the model's own replies to the examples
    (``read = "reply"`` with prompt sets) and to the neutral prompts (for the sweep) -- is
    generated greedily in one batch: on a CPU a decode step of 32 rows costs little more than
    one of 16."""
    count = recipe.data.reply_tokens
    groups = []
    own = recipe.data.read == Read.REPLY and examples.positive_replies is None
    if own:
        groups.append((sides[0] + sides[1], count))
    if recipe.sweep.enabled:
        groups.append((neutral, recipe.sweep.tokens))
    generated = greedy(handle, groups)
    replies = generated.pop(0) if own else None
    if examples.positive_replies is not None and examples.negative_replies is not None:
        replies = [
            list(handle.tokenizer(text, add_special_tokens=False)["input_ids"])[:count]
            for text in (*examples.positive_replies, *examples.negative_replies)
        ]
    if replies is not None and any(not reply for reply in replies):
        raise InvalidArgumentError(
            "an example has an empty reply (the model stopped at once, or a pairs reply is "
            "empty); use read = 'prompt' or other examples",
            field="data.read" if own else "data.pairs",
        )
    return replies, generated.pop(0) if recipe.sweep.enabled else None


#: most rows generated at once
MAX_GENERATION_BATCH = 64


def greedy(
    handle: ModelHandle, groups: Sequence[tuple[list[list[int]], int]]
) -> list[list[list[int]]]:
    """Greedy completion ids of each group of prompts, up to the group's token count, all
    groups in one continuous batch."""
    from steer.generation import Engine, GenerationRequest
    from steer.sampling import SamplingConfig

    requests = [
        GenerationRequest(
            prompt_ids=tuple(prompt),
            sampling=SamplingConfig.greedy_config(),
            max_new_tokens=tokens,
        )
        for prompts, tokens in groups
        for prompt in prompts
    ]
    if not requests:
        return []
    engine = Engine(handle, max_batch=min(len(requests), MAX_GENERATION_BATCH))
    results = iter(engine.run(requests))
    return [[list(next(results).token_ids) for _ in prompts] for prompts, _tokens in groups]


def read_activations(
    handle: ModelHandle,
    recipe: DirectionRecipe,
    examples: Examples,
    sides: tuple[list[list[int]], list[list[int]]],
    replies: list[list[int]] | None,
    layers: Sequence[int],
) -> tuple[torch.Tensor, torch.Tensor, Texts]:
    """(positive, negative) activations (n, len(layers), d_model), read at the ``replies``
    (positive then negative) or, with none, at the prompts; and the examples' texts."""
    batch = recipe.search.batch_size
    texts = (list(examples.positive), list(examples.negative))
    if replies is None:
        positions = recipe.search.positions or post_instruction_positions(handle)
        hooks = [hook(layer) for layer in layers]
        means = []
        for prompts in sides:
            result = forward(handle, prompts, hooks=hooks, positions=positions, batch_size=batch)
            means.append(_stack(result.activations, layers, lambda rows: rows.mean(1)))
        return means[0], means[1], Texts(texts)
    count = len(sides[0])
    means = [
        _reply_means(handle, sides[0], replies[:count], layers, batch),
        _reply_means(handle, sides[1], replies[count:], layers, batch),
    ]
    decoded = [handle.tokenizer.decode(reply) for reply in replies]
    return means[0], means[1], Texts(texts, (decoded[:count], decoded[count:]))


def _reply_means(
    handle: ModelHandle,
    prompts: list[list[int]],
    replies: list[list[int]],
    layers: Sequence[int],
    batch_size: int,
) -> torch.Tensor:
    """(n, len(layers), d_model): the mean over each reply's tokens, teacher-forced."""
    full = [p + r for p, r in zip(prompts, replies, strict=True)]
    result = forward(
        handle,
        full,
        hooks=[hook(layer) for layer in layers],
        positions="all",
        batch_size=batch_size,
    )
    means = []
    for layer in layers:
        rows = result.activations[hook(layer)]
        assert isinstance(rows, list)
        means.append(
            torch.stack([row[len(p) :].mean(0) for row, p in zip(rows, prompts, strict=True)])
        )
    return torch.stack(means, dim=1)


def _stack(
    activations: Mapping[str, Any],
    layers: Sequence[int],
    reduce: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    return torch.stack([reduce(activations[hook(layer)]) for layer in layers], dim=1)


def typical_norms(
    handle: ModelHandle,
    prompts: Sequence[Sequence[int]],
    layers: Sequence[int],
    *,
    batch_size: int = 16,
) -> dict[int, float]:
    """Median L2 norm of ``blocks.L.hook_resid_post`` over every token but the first of
    ``prompts`` (the first, the attention sink, is far larger than the rest)."""
    result = forward(
        handle,
        prompts,
        hooks=[hook(layer) for layer in layers],
        positions="all",
        batch_size=batch_size,
    )
    norms = {}
    for layer in layers:
        rows = result.activations[hook(layer)]
        assert isinstance(rows, list)
        tokens = torch.cat([row[1:] for row in rows])
        if len(tokens) == 0:
            raise InvalidArgumentError(
                "the neutral prompts have no tokens after the first", field="sweep.neutral"
            )
        norms[layer] = float(tokens.norm(dim=-1).median())
    return norms


def normalise(
    raw: Mapping[int, torch.Tensor], norms: Mapping[int, float], *, name: str = ""
) -> SteeringVector:
    """Each layer's vector at length ``norms[layer] / len(raw)``: strength 1 adds one typical
    residual norm in all, spread over the layers."""
    share = 1.0 / len(raw)
    return SteeringVector(
        per_layer={
            layer: vector / vector.norm() * norms[layer] * share for layer, vector in raw.items()
        },
        name=name,
    )


def normalization_record(
    raw: Mapping[int, torch.Tensor], norms: Mapping[int, float], recipe: DirectionRecipe
) -> dict[str, Any]:
    """What ``steer.json`` says about the units of strength."""
    return {
        "unit": STRENGTH_UNIT,
        "meaning": "strength 1 adds one typical residual norm in all, spread evenly over the "
        "layers; the vector at layer L has length norms[L] / number of layers",
        "statistic": "median L2 norm of blocks.L.hook_resid_post over every token but the "
        "first of the neutral prompts",
        "neutral": recipe.sweep.neutral,
        "norms": {str(layer): value for layer, value in norms.items()},
        "raw_norms": {str(layer): float(vector.norm()) for layer, vector in raw.items()},
        "raw_relative": {
            str(layer): float(vector.norm()) / norms[layer] for layer, vector in raw.items()
        },
        "share": 1.0 / len(raw),
    }


def save(handle: ModelHandle, recipe: DirectionRecipe, made: Made, out_dir: Path) -> Path:
    """Write the sweep files (when the sweep ran) and the artifact."""
    from steer.directions import sweep

    out_dir.mkdir(parents=True, exist_ok=True)
    metadata: dict[str, Any] = {}
    notes: list[str] = []
    if made.sweep is not None:
        metadata = sweep.write(out_dir, made.sweep, title=f"{recipe.name}: strength sweep")
        notes.extend(made.sweep.notes)
    layers = made.vector.layers
    positions: list[int] | str = "reply"
    if recipe.data.read == Read.PROMPT:
        positions = list(recipe.search.positions or post_instruction_positions(handle))
    examples = made.examples
    return save_vector(
        out_dir,
        made.vector,
        handle=handle,
        kind="steering_vector",
        hooks=[hook(layer) for layer in layers],
        positions=positions,
        method=recipe.search.method,
        layer=layers[0] if len(layers) == 1 else None,
        layers=list(layers),
        data={
            **(examples.hashes or {}),
            "read": recipe.data.read,
            "examples": [len(examples.positive), len(examples.negative)],
        },
        normalization=normalization_record(made.raw, made.norms, recipe),
        target_words=made.words.record(),
        recipe=recipe.to_dict(),
        notes=notes,
        **metadata,
    )
