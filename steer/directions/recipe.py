"""The recipe schema: one typed, validated description of how a direction is made.

A recipe is a TOML file (``recipes/refusal.toml``, ``recipes/moralizing.toml``,
``recipes/steering.toml``) or an equal dict. Every field is described below; unknown fields and
wrong types are errors that name the field (``data.train``). Command-line flags override fields
through :func:`with_overrides`. A field the recipe's kind does not read (``search.top_k`` in a
steering recipe, ``sweep`` in a refusal one) is an error too, so nothing set is silently ignored.

Relative data paths in a recipe file are taken from the file's directory (``DirectionRecipe.base``);
those in a dict (the server's, already absolute) or given on the command line, from the
current directory.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from steer.directions.methods import DEFAULT_SHRINKAGE, METHODS
from steer.errors import InvalidArgumentError, NotFoundError
from steer.limits import finite
from steer.toml_input import read_toml, typed_table


class RecipeKind(StrEnum):
    #: harmful vs harmless prompts, read at post-instruction positions; refusal score search
    REFUSAL = "refusal"
    #: (prompt, positive reply, negative reply) pairs, read at the reply tokens
    PAIRS = "pairs"
    #: any two prompt sets, read at post-instruction positions; no refusal filtering
    CONTRAST = "contrast"
    #: a "this vs that" slider: two prompt sets or pairs, one vector per chosen layer from the
    #: model's own replies (or the prompts), no search; strength in typical residual norms
    STEERING = "steering"


class Read(StrEnum):
    """Where a steering recipe reads its activations."""

    #: the model's own greedy reply to each prompt, teacher-forced, averaged over its tokens
    #: (for pairs: the given replies)
    REPLY = "reply"
    #: the prompt's last tokens (``search.positions``, default the chat template's
    #: post-instruction tokens), averaged
    PROMPT = "prompt"


@dataclass(frozen=True)
class DataSection:
    #: positive prompt set (harmful for refusal): "strongreject", "recipes:FILE" or a path
    positive: str = ""
    #: CSV column / JSONL field of the positive set ("" = the format's default)
    positive_column: str = ""
    #: negative prompt set (harmless for refusal)
    negative: str = ""
    negative_column: str = ""
    #: more prompts of each side for train and validation only, never the test split: cut
    #: train : validation as the sets are, mixed into their splits (see data.with_extra); one
    #: set or a list of sets (read in order and joined). The i-th set of each side is one
    #: source of prompts for a gate's new-source estimate (see gate_styles.source_labels)
    positive_extra: tuple[str, ...] = ()
    negative_extra: tuple[str, ...] = ()
    #: pairs file (.jsonl) for kind = "pairs"
    pairs: str = ""
    #: JSONL keys of the pairs file
    prompt_key: str = "prompt"
    positive_key: str = "positive"
    negative_key: str = "negative"
    #: optional system prompt used when encoding prompts
    system: str = ""
    #: prompts a gate for this direction must also stay quiet on, besides the harmless ones
    #: (``steer directions gate``; e.g. in-character RP situations with no moralizing trigger,
    #: so the gate learns the trigger rather than RP itself); one set or a list, each split
    #: like the other sets and joined split by split
    gate_quiet: tuple[str, ...] = ()
    #: prompts a gate for this direction must also fire on, besides the positive ones (e.g.
    #: more RP situations with a moralizing trigger, without replies: a gate needs more
    #: varied prompts than a direction needs pairs); one set or a list, as gate_quiet
    gate_fire: tuple[str, ...] = ()
    #: more ordinary requests the gate stays quiet on, each split joining the harmless set's;
    #: one set or a list, as gate_quiet
    gate_harmless: tuple[str, ...] = ()
    #: also calibrate the gate on the positive, gate_fire and gate_quiet prompts, RP
    #: situations ("You are WHO. EVENT"; moralizing), each rendered as the RP scene steer plays
    #: (:func:`steer.rp.scene.situation_scene`): in a scene a gate reads the character's name
    #: at the end of the prompt, not the chat template's assistant header, and a threshold
    #: calibrated on one-message prompts does not carry over
    gate_scenes: bool = False
    #: scenario files (``steer eval rp``'s JSONL) whose scenes, played unedited for a few
    #: replies, calibrate the gate too: scenes tagged crime, villain, horror or dark comedy on
    #: the side it fires on, the rest on the side it stays quiet on
    #: (:mod:`steer.directions.gate_scenarios`); one file or a list
    gate_scenarios: tuple[str, ...] = ()
    #: seed of the train / validation / test shuffle
    seed: int = 0
    #: shares of each set for training and validation; the rest is held-out test data
    train: float = 0.4
    validation: float = 0.2
    #: caps on the number of examples used per set (0 = no cap)
    max_train: int = 128
    max_validation: int = 32
    #: refusal only: keep harmful prompts the model refuses and harmless ones it answers
    filter: bool = True
    #: how the filter decides: "score" (the first-token refusal score > 0, as Arditi et al.) or
    #: "generation" (greedy completions of filter_tokens tokens checked by the refusal-phrase
    #: matcher, the evaluation's own test: models whose refusals open with many different
    #: tokens are refused far more often than their first-token score says)
    filter_by: str = "score"
    filter_tokens: int = 16
    #: steering only: "reply" or "prompt" (see :class:`Read`)
    read: str = "reply"
    #: steering only: reply tokens read per example (generated greedily for prompt sets; the
    #: first ones of a given reply for pairs)
    reply_tokens: int = 32


@dataclass(frozen=True)
class SearchSection:
    #: direction method (a name in steer.directions.methods.METHODS; steering: mean_difference
    #: or pca)
    method: str = "mean_difference"
    #: methods that whiten (``whitened``): shrinkage of the harmless token covariance towards
    #: (trace / d) I, in [0, 1]; smaller whitens more (docs/directions.md)
    shrinkage: float = DEFAULT_SHRINKAGE
    #: candidate layers; empty = every layer in [min_layer_fraction, max_layer_fraction).
    #: Steering: the layers the vector is read at and added to (empty = one layer at
    #: steer.directions.steering.DEFAULT_LAYER_FRACTION of the depth)
    layers: tuple[int, ...] = ()
    min_layer_fraction: float = 0.0
    #: Arditi et al. discard the last 20% of layers
    max_layer_fraction: float = 0.8
    #: negative token offsets; empty = the chat template's post-instruction positions
    positions: tuple[int, ...] = ()
    #: also try one direction per layer (each layer ablated with its own direction)
    per_layer: bool = True
    #: candidates are checked (induce and KL) in bypass order until this many pass the filters,
    #: checking at most max_checks. The one selected is the first to pass (the lowest bypass
    #: among those passing), so 1 selects the same as any larger top_k with the same max_checks;
    #: more fill the sweep table
    top_k: int = 8
    #: at most this many candidates checked (0 = 4 * top_k)
    max_checks: int = 0
    #: KL filter: first-token KL on harmless validation prompts under ablation must be below
    kl_threshold: float = 0.1
    #: adding the direction at its layer must raise the score on negative prompts above the
    #: unedited model's score there (Arditi et al. ask for > 0: on Qwen2.5-Coder-0.5B, harmless
    #: baseline -3.2, no raw direction reaches 0 at strength 1)
    require_induce: bool = True
    batch_size: int = 16


@dataclass(frozen=True)
class EvaluateSection:
    #: greedy tokens generated per prompt for the refusal / moralizing matcher
    max_new_tokens: int = 24
    #: teacher-forced tokens of the base model's answer for the multi-token KL
    kl_tokens: int = 8
    #: cap on held-out prompts per set (0 = all)
    max_test: int = 0
    batch_size: int = 16


@dataclass(frozen=True)
class SweepSection:
    """Steering only: the strength sweep run after the vector is made (and by
    ``steer directions sweep``), which records the strengths that keep the model coherent."""

    #: run the sweep when the vector is computed
    enabled: bool = True
    #: prompts the vector is measured on; they also give the typical residual norm
    neutral: str = "recipes:neutral.txt"
    #: strengths to measure (empty = steer.directions.sweep.DEFAULT_STRENGTHS)
    strengths: tuple[float, ...] = ()
    #: coherent = mean first-token KL on the neutral prompts at most this (nats)
    kl_bound: float = 0.5
    #: greedy tokens of the unsteered model's reply to each neutral prompt; perplexity and
    #: word probabilities are read over them
    tokens: int = 16
    #: words the effect is measured by (next-token probability); empty = the words that most
    #: tell the two sides' examples apart
    positive_words: tuple[str, ...] = ()
    negative_words: tuple[str, ...] = ()


@dataclass(frozen=True)
class DirectionRecipe:
    name: str = "direction"
    kind: RecipeKind = RecipeKind.REFUSAL
    data: DataSection = field(default_factory=DataSection)
    search: SearchSection = field(default_factory=SearchSection)
    evaluate: EvaluateSection = field(default_factory=EvaluateSection)
    sweep: SweepSection = field(default_factory=SweepSection)
    #: directory relative data paths are taken from ("" = the current directory); not saved
    base: str = ""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "kind": self.kind.value}
        for section in _SECTIONS:
            value = getattr(self, section)
            out[section] = {
                f.name: list(v) if isinstance(v := getattr(value, f.name), tuple) else v
                for f in fields(value)
                if applies(self.kind, section, f.name)
            }
            if not out[section]:
                del out[section]
        return out

    @property
    def is_steering(self) -> bool:
        return self.kind is RecipeKind.STEERING

    @property
    def relative_to(self) -> str:
        """What a relative data path of this recipe is taken from, for error messages."""
        if self.base:
            return f"relative to the recipe's directory {self.base}"
        return f"relative to the current directory {Path.cwd()}"


_SECTIONS = {
    "data": DataSection,
    "search": SearchSection,
    "evaluate": EvaluateSection,
    "sweep": SweepSection,
}
#: a gate's more prompt files: the data field -> the gate split it adds (or, "negative", joins)
GATE_SETS = {"gate_fire": "fire", "gate_quiet": "quiet", "gate_harmless": "negative"}
#: fields only the candidate search reads (kinds refusal, pairs, contrast); None = the section
_SEARCH_ONLY: dict[str, frozenset[str] | None] = {
    "data": frozenset(
        {
            "train",
            "validation",
            "max_validation",
            "seed",
            "positive_extra",
            "negative_extra",
            "filter",
            "filter_by",
            "filter_tokens",
            *GATE_SETS,
            "gate_scenes",
            "gate_scenarios",
        }
    ),
    "search": frozenset(
        {
            "shrinkage",
            "min_layer_fraction",
            "max_layer_fraction",
            "per_layer",
            "top_k",
            "max_checks",
            "kl_threshold",
            "require_induce",
        }
    ),
    "evaluate": None,
}
#: fields only a steering recipe reads
_STEERING_ONLY: dict[str, frozenset[str] | None] = {
    "data": frozenset({"read", "reply_tokens"}),
    "sweep": None,
}
#: the methods a steering vector may use
STEERING_METHODS = ("mean_difference", "pca")


def applies(kind: RecipeKind, section: str, name: str) -> bool:
    """Whether a recipe of ``kind`` reads the field ``section.name``."""
    table = _SEARCH_ONLY if kind is RecipeKind.STEERING else _STEERING_ONLY
    if section not in table:
        return True
    names = table[section]
    return names is not None and name not in names


def _check_applies(kind: RecipeKind, keys: Mapping[str, Any]) -> None:
    """Refuse fields (``section.name`` -> value) that ``kind`` would not read."""
    for key in keys:
        section, _, name = key.partition(".")
        if not applies(kind, section, name):
            what = "a steering recipe" if kind is RecipeKind.STEERING else f"kind {kind.value!r}"
            why = (
                "it has no candidate search, filter or held-out evaluation"
                if kind is RecipeKind.STEERING
                else "only kind 'steering' reads it"
            )
            raise InvalidArgumentError(f"{what} does not use {key} ({why})", field=key)


def load_direction_recipe(source: str | Path | Mapping[str, Any]) -> DirectionRecipe:
    """Parse and validate a recipe from a TOML path or a dict. Relative data paths in a file
    are taken from its directory."""
    base = ""
    if isinstance(source, Mapping):
        raw = dict(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise NotFoundError(
                f"no such recipe: {path}"
                + ("" if path.is_absolute() else f" (relative to {Path.cwd()})"),
                field="recipe",
            )
        raw = read_toml(path, field="recipe")
        base = str(path.resolve().parent)
    unknown = set(raw) - {"name", "kind", *_SECTIONS}
    if unknown:
        raise InvalidArgumentError(f"unknown recipe fields {sorted(unknown)}", field="recipe")
    try:
        kind = RecipeKind(raw.get("kind", "refusal"))
    except ValueError:
        raise InvalidArgumentError(
            f"unknown kind {raw.get('kind')!r}; use {', '.join(k.value for k in RecipeKind)}",
            field="kind",
        ) from None
    sections = {name: _section(cls, raw.get(name, {}), name) for name, cls in _SECTIONS.items()}
    _check_applies(
        kind,
        {
            f"{name}.{key}": value
            for name in _SECTIONS
            if isinstance(raw.get(name), Mapping)
            for key, value in raw[name].items()
        },
    )
    recipe = DirectionRecipe(
        name=str(raw.get("name", "direction")), kind=kind, base=base, **sections
    )
    _validate(recipe)
    if recipe.is_steering and recipe.data.read == Read.PROMPT and "reply_tokens" in raw["data"]:
        raise InvalidArgumentError(
            "reply_tokens sets how much of each reply is read; read = 'prompt' reads none",
            field="data.reply_tokens",
        )
    return recipe


def with_overrides(recipe: DirectionRecipe, overrides: Mapping[str, Any]) -> DirectionRecipe:
    """Replace fields named ``section.field`` (values already typed, None = keep)."""
    sections: dict[str, Any] = {name: getattr(recipe, name) for name in _SECTIONS}
    given = {key: value for key, value in overrides.items() if value is not None}
    for key, value in given.items():
        section, _, name = key.partition(".")
        if section not in sections or name not in {f.name for f in fields(sections[section])}:
            raise InvalidArgumentError(f"unknown recipe field {key!r}", field=key)
        current = sections[section]
        merged = {f.name: getattr(current, f.name) for f in fields(current)} | {name: value}
        sections[section] = _section(type(current), merged, section)
    _check_applies(recipe.kind, given)
    updated = replace(recipe, **sections)
    _validate(updated)
    return updated


def _section(cls: type, raw: Any, name: str) -> Any:
    return typed_table(cls, raw, name, list_items=_TUPLE_ITEMS, one_or_list=_SET_LISTS)


#: list fields that name prompt sets: one set may be given as a plain string ("" = none)
_SET_LISTS = frozenset({"positive_extra", "negative_extra", *GATE_SETS, "gate_scenarios"})
#: the item type of each list field
_TUPLE_ITEMS: dict[str, type] = {
    "positive_extra": str,
    "negative_extra": str,
    **dict.fromkeys(GATE_SETS, str),
    "gate_scenarios": str,
    "layers": int,
    "positions": int,
    "strengths": float,
    "positive_words": str,
    "negative_words": str,
}


def _validate(recipe: DirectionRecipe) -> None:
    data, search, evaluate = recipe.data, recipe.search, recipe.evaluate
    if recipe.is_steering:
        _validate_steering(recipe)
    elif recipe.kind is RecipeKind.PAIRS:
        _validate_pairs(data)
    elif not data.positive or not data.negative:
        field_name = "data.positive" if not data.positive else "data.negative"
        raise InvalidArgumentError(
            f"kind {recipe.kind.value!r} needs two prompt sets", field=field_name
        )
    if not 0 < data.train < 1:
        raise InvalidArgumentError("must be in (0, 1)", field="data.train")
    if not 0 < data.validation < 1 or data.train + data.validation >= 1:
        raise InvalidArgumentError(
            "must be in (0, 1) and leave a test share", field="data.validation"
        )
    if data.filter_by not in ("score", "generation"):
        raise InvalidArgumentError(
            f"unknown filter_by {data.filter_by!r}; use score or generation", field="data.filter_by"
        )
    if data.filter_tokens < 1:
        raise InvalidArgumentError("must be >= 1", field="data.filter_tokens")
    for name in ("max_train", "max_validation"):
        if getattr(data, name) < 0:
            raise InvalidArgumentError("must be >= 0 (0 = no cap)", field=f"data.{name}")
    if search.method not in METHODS:
        raise InvalidArgumentError(
            f"unknown method {search.method!r}; known: {', '.join(METHODS)}", field="search.method"
        )
    if not 0 < search.shrinkage <= 1:
        raise InvalidArgumentError("must be in (0, 1]", field="search.shrinkage")
    if not 0 <= search.min_layer_fraction < search.max_layer_fraction <= 1:
        raise InvalidArgumentError(
            "need 0 <= min_layer_fraction < max_layer_fraction <= 1",
            field="search.max_layer_fraction",
        )
    if any(p >= 0 for p in search.positions):
        raise InvalidArgumentError(
            "positions are negative offsets, e.g. [-1, -2]", field="search.positions"
        )
    if any(layer < 0 for layer in search.layers):
        raise InvalidArgumentError("layers must be >= 0", field="search.layers")
    if search.top_k < 1:
        raise InvalidArgumentError("must be >= 1", field="search.top_k")
    if search.max_checks < 0:
        raise InvalidArgumentError("must be >= 0 (0 = 4 * top_k)", field="search.max_checks")
    if not search.kl_threshold > 0:
        raise InvalidArgumentError("must be > 0", field="search.kl_threshold")
    for section, name in (
        ("search", "batch_size"),
        ("evaluate", "batch_size"),
        ("evaluate", "max_new_tokens"),
        ("evaluate", "kl_tokens"),
    ):
        if getattr(getattr(recipe, section), name) < 1:
            raise InvalidArgumentError("must be >= 1", field=f"{section}.{name}")
    if evaluate.max_test < 0:
        raise InvalidArgumentError("must be >= 0 (0 = all)", field="evaluate.max_test")


def _validate_pairs(data: DataSection) -> None:
    if not data.pairs:
        raise InvalidArgumentError("kind 'pairs' needs a pairs file", field="data.pairs")
    for name in ("positive_extra", "negative_extra"):
        if getattr(data, name):
            raise InvalidArgumentError("kind 'pairs' has no sets to extend", field=f"data.{name}")


def _validate_steering(recipe: DirectionRecipe) -> None:
    data, search, sweep = recipe.data, recipe.search, recipe.sweep
    sets = bool(data.positive or data.negative)
    if data.pairs and sets:
        raise InvalidArgumentError(
            "give two prompt sets (positive, negative) or a pairs file, not both",
            field="data.pairs",
        )
    if not data.pairs and not (data.positive and data.negative):
        field_name = "data.negative" if data.positive else "data.positive"
        raise InvalidArgumentError(
            "a steering recipe needs two prompt sets (positive and negative) or a pairs file",
            field=field_name,
        )
    if data.read not in {r.value for r in Read}:
        raise InvalidArgumentError(
            f"unknown read {data.read!r}; use {' or '.join(r.value for r in Read)}",
            field="data.read",
        )
    if data.pairs and data.read != Read.REPLY:
        raise InvalidArgumentError(
            "a pairs file is read at its replies; use read = 'reply'", field="data.read"
        )
    if search.positions and data.read != Read.PROMPT:
        raise InvalidArgumentError(
            "positions are prompt tokens; they apply with read = 'prompt'",
            field="search.positions",
        )
    if data.reply_tokens < 1:
        raise InvalidArgumentError("must be >= 1", field="data.reply_tokens")
    if search.method not in STEERING_METHODS:
        raise InvalidArgumentError(
            f"a steering vector is made with {' or '.join(STEERING_METHODS)}, "
            f"not {search.method!r}",
            field="search.method",
        )
    if not sweep.kl_bound > 0:
        raise InvalidArgumentError("must be > 0", field="sweep.kl_bound")
    if sweep.tokens < 1:
        raise InvalidArgumentError("must be >= 1", field="sweep.tokens")
    for strength in sweep.strengths:
        finite(strength, "sweep.strengths")
    if bool(sweep.positive_words) != bool(sweep.negative_words):
        raise InvalidArgumentError(
            "give words for both sides, or none (then they come from the data)",
            field="sweep.negative_words" if sweep.positive_words else "sweep.positive_words",
        )
