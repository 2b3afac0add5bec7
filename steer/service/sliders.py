"""Named sliders: the operator's file that gives interventions a name, a range and a default.

``steer serve --sliders sliders.toml`` reads a file such as::

    [sliders.moralizing]
    description = "Lectures and moral caveats; 1 removes the moralizing direction"
    kind = "ablate"            # ablate | add | feature
    artifact = "moralizing-qwen"
    min = 0.0
    max = 1.5
    default = 0.0

    [sliders.cheerful]
    kind = "add"
    artifact = "cheerful"
    hooks = ["blocks.12.hook_resid_post"]   # optional; default: the artifact's own hooks
    phase = "generated"                      # prompt | generated | all (default)
    min = -8.0
    max = 8.0

    [sliders.dragons]
    kind = "feature"
    sae = "smollm2-sae"
    feature = 1234
    mode = "add_decoder"        # add_decoder | scale | clamp
    min = -4.0
    max = 4.0

    [sliders.lectures]
    description = "The gated moralizing edit: only where its gate fires"
    kind = "recipe"
    recipe = "gates/moralizing/gated.toml"   # an edit recipe; relative to this file
    min = 0.0
    max = 1.2

A slider at value ``v`` is the gRPC :class:`Intervention` its kind names with ``v`` as the
ablation weight, the addition strength or the feature slider's value; a ``recipe`` slider is
the edit recipe's interventions (gates included, exactly as ``steer eval --edits`` applies
them) with every edit's amount times ``v`` (:meth:`steer.recipes.EditRecipe.scaled`), so the
edit ``steer directions gate`` writes and the evaluations measure is one slider away from a
SillyTavern user. Both front ends move sliders by name (HTTP: a flat ``"steer.NAME": v`` field;
gRPC: ``Intervention.named``) and both turn the result into domain interventions through
:func:`steer.service.convert.intervention`, so a slider means the same thing everywhere. At its
neutral value (0; 1 for ``scale``) a slider adds no intervention at all, so the output is
bit-identical to no slider. A recipe slider's interventions (its artifacts and SAEs read from
disk) are built once per model and value and kept for the server's life, like the recipe
itself, which is read when the server starts.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steer.errors import InvalidArgumentError, SteerError
from steer.interventions import Intervention, Phase
from steer.limits import MAX_INTERVENTION_MAGNITUDE, finite
from steer.models import ModelHandle
from steer.proto.v1 import generation_pb2
from steer.recipes import EditRecipe, load_edit_recipe
from steer.sae.modes import SliderMode
from steer.toml_input import read_toml
from steer.wire import PHASES, SLIDER_MODE_OF, SLIDER_MODES

KINDS = ("ablate", "add", "feature", "recipe")
_KEYS = {
    "ablate": {"artifact", "allow_other_model"},
    "add": {"artifact", "hooks", "phase", "allow_other_model"},
    "feature": {"sae", "feature", "mode", "phase"},
    "recipe": {"recipe", "allow_other_model"},
}
_COMMON = {"kind", "description", "min", "max", "default"}
#: built recipe-slider interventions kept per model (the oldest value goes first past this)
RECIPE_CACHE_SIZE = 64


@dataclass(frozen=True)
class Slider:
    """One named slider: what it moves, and the values a request may give it."""

    name: str
    kind: str
    description: str
    minimum: float
    maximum: float
    default: float
    #: the proto intervention with the value left out (set per request); empty for a recipe
    template: generation_pb2.Intervention
    #: a ``recipe`` slider's edit recipe (None for every other kind)
    recipe: EditRecipe | None = None
    #: a ``recipe`` slider's artifacts may have been made for other weights of the same shape
    allow_other_model: bool = False

    @property
    def neutral(self) -> float | None:
        """The value that means "no intervention" (None: a clamp has none)."""
        if self.kind != "feature":
            return 0.0
        return SLIDER_MODE_OF[self.template.slider.mode].neutral

    def checked(self, value: float, *, field: str) -> float:
        """``value`` if this slider takes it (finite, within its range)."""
        value = finite(value, field)
        if not self.minimum <= value <= self.maximum:
            raise InvalidArgumentError(
                f"slider {self.name!r} takes values in [{self.minimum:g}, {self.maximum:g}], "
                f"got {value:g}",
                field=field,
            )
        return value

    def recipe_at(self, value: float, *, field: str) -> EditRecipe | None:
        """A ``recipe`` slider's recipe at ``value`` (every amount times it); None at 0."""
        assert self.recipe is not None, "only a recipe slider has a recipe"
        value = self.checked(value, field=field)
        return None if value == 0.0 else self.recipe.scaled(value)

    def intervention(
        self, value: float, *, field: str, speaker: str = ""
    ) -> generation_pb2.Intervention | None:
        """The proto intervention at ``value``; None at the neutral value (not for a
        ``recipe`` slider, which is no single proto intervention: :meth:`recipe_at`)."""
        assert self.recipe is None, "a recipe slider's value gives a recipe"
        value = self.checked(value, field=field)
        if value == self.neutral:
            return None
        message = generation_pb2.Intervention()
        message.CopyFrom(self.template)
        if self.kind == "ablate":
            message.ablate.weight = value
        elif self.kind == "add":
            message.add.strength = value
        else:
            message.slider.value = value
        message.speaker = speaker
        return message

    def describe(self) -> dict[str, Any]:
        """The slider as a UI draws it (``GET /v1/steer/sliders``)."""
        return {
            "name": self.name,
            "kind": self.kind,
            "description": self.description,
            "min": self.minimum,
            "max": self.maximum,
            "default": self.default,
            "neutral": self.neutral,
            "field": f"steer.{self.name}",
        }


class SliderCatalogue:
    """Every slider of one server, by name."""

    def __init__(self, sliders: Mapping[str, Slider] | None = None) -> None:
        self.sliders = dict(sliders or {})
        # per model (dropped with it): (slider, value) -> the recipe's interventions at value
        self._built: weakref.WeakKeyDictionary[
            ModelHandle, dict[tuple[str, float], list[Intervention]]
        ] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def recipe_interventions(
        self,
        slider: Slider,
        value: float,
        handle: ModelHandle,
        build: Callable[[EditRecipe], list[Intervention]],
        *,
        field: str,
    ) -> list[Intervention]:
        """A ``recipe`` slider's interventions for ``handle``'s model at ``value`` (none at 0):
        ``build`` of its scaled recipe the first time, the same interventions (immutable)
        after that. A ``build`` that raises keeps nothing, so the next request sees the error
        again."""
        value = slider.checked(value, field=field)
        if value == 0.0:
            return []
        key = (slider.name, value)
        with self._lock:
            kept = self._built.get(handle, {}).get(key)
        if kept is None:  # scaled only when built: a request it keeps does no recipe work
            recipe = slider.recipe_at(value, field=field)
            assert recipe is not None
            kept = build(recipe)
            with self._lock:
                built = self._built.setdefault(handle, {})
                built[key] = kept
                while len(built) > RECIPE_CACHE_SIZE:
                    del built[next(iter(built))]
        return list(kept)

    @classmethod
    def load(cls, path: Path) -> SliderCatalogue:
        """Read a sliders TOML file; every mistake names ``sliders.NAME.KEY``. A recipe
        slider's ``recipe`` path is taken from the file's directory."""
        path = Path(path)
        return cls.from_dict(read_toml(path, field="sliders"), base=path.resolve().parent)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, base: Path | None = None) -> SliderCatalogue:
        """The catalogue of parsed TOML; ``base``: the directory relative recipe paths are
        taken from (default: the working directory)."""
        unknown = set(data) - {"sliders"}
        if unknown:
            raise InvalidArgumentError(f"unknown keys {sorted(unknown)}", field="sliders")
        tables = data.get("sliders", {})
        if not isinstance(tables, Mapping):
            raise InvalidArgumentError("[sliders.NAME] tables expected", field="sliders")
        base = base or Path.cwd()
        return cls({name: _slider(name, table, base) for name, table in tables.items()})

    def get(self, name: str, field: str) -> Slider:
        slider = self.sliders.get(name)
        if slider is None:
            known = ", ".join(sorted(self.sliders)) or "none"
            raise InvalidArgumentError(
                f"no slider {name!r} on this server; sliders: {known}", field=field
            )
        return slider

    def defaults(self, excluding: set[str]) -> list[tuple[str, generation_pb2.Intervention]]:
        """A named intervention at its default value for every slider not in ``excluding``
        whose default is not neutral (the operator's "on unless moved")."""
        return [
            (name, _named(name, slider.default))
            for name, slider in sorted(self.sliders.items())
            if name not in excluding and slider.default != slider.neutral
        ]


def _named(name: str, value: float, speaker: str = "") -> generation_pb2.Intervention:
    return generation_pb2.Intervention(
        named=generation_pb2.NamedSlider(name=name, value=value), speaker=speaker
    )


def named_interventions(
    values: Mapping[str, float], speaker: str = ""
) -> list[generation_pb2.Intervention]:
    """``{"moralizing": 1.0}`` as ``Intervention.named`` messages (the HTTP front end's flat
    ``steer.NAME`` fields take this path, so they mean what they mean over gRPC)."""
    return [_named(name, value, speaker) for name, value in values.items()]


def _slider(name: str, table: Any, base: Path) -> Slider:
    where = f"sliders.{name}"
    if not isinstance(table, Mapping):
        raise InvalidArgumentError("must be a table", field=where)
    kind = table.get("kind")
    if kind not in KINDS:
        raise InvalidArgumentError(f"kind must be one of {', '.join(KINDS)}", field=f"{where}.kind")
    unknown = set(table) - _COMMON - _KEYS[kind]
    if unknown:
        raise InvalidArgumentError(f"unknown keys {sorted(unknown)}", field=where)
    bound = MAX_INTERVENTION_MAGNITUDE
    minimum = finite(table.get("min", -1.0), f"{where}.min", magnitude=bound)
    maximum = finite(table.get("max", 1.0), f"{where}.max", magnitude=bound)
    default = finite(table.get("default", 0.0), f"{where}.default", magnitude=bound)
    if not minimum <= default <= maximum:
        raise InvalidArgumentError("need min <= default <= max", field=f"{where}.default")
    description = table.get("description", "")
    if not isinstance(description, str):
        raise InvalidArgumentError("must be a string", field=f"{where}.description")
    allow_other = table.get("allow_other_model", False)
    if not isinstance(allow_other, bool):
        raise InvalidArgumentError("must be true or false", field=f"{where}.allow_other_model")
    if kind == "recipe":
        recipe = _recipe(_text(table, "recipe", where), base, f"{where}.recipe")
        template = generation_pb2.Intervention()
        return Slider(
            name, kind, description, minimum, maximum, default, template, recipe, allow_other
        )
    template = _template(kind, table, where)
    return Slider(name, kind, description, minimum, maximum, default, template)


def _recipe(text: str, base: Path, field: str) -> EditRecipe:
    """The edit recipe a recipe slider names, read when the server starts, so its mistakes show
    there (its artifacts are checked against each request's model)."""
    path = Path(text).expanduser()
    path = path if path.is_absolute() else base / path
    try:
        return load_edit_recipe(path)
    except SteerError as error:
        inner = f".{error.field}" if error.field and error.field != "recipe" else ""
        raise InvalidArgumentError(f"{path}: {error.message}", field=f"{field}{inner}") from None


def _text(table: Mapping[str, Any], key: str, where: str) -> str:
    value = table.get(key)
    if not isinstance(value, str) or not value:
        raise InvalidArgumentError("required: a non-empty string", field=f"{where}.{key}")
    return value


def _choice(
    table: Mapping[str, Any], key: str, choices: Mapping[Any, Any], default: str, where: str
) -> Any:
    value = table.get(key, default)
    if value not in choices:
        raise InvalidArgumentError(
            f"must be one of {', '.join(choices)}, got {value!r}", field=f"{where}.{key}"
        )
    return choices[value]


def _template(kind: str, table: Mapping[str, Any], where: str) -> generation_pb2.Intervention:
    message = generation_pb2.Intervention()
    allow_other = bool(table.get("allow_other_model", False))  # checked by _slider
    if kind == "ablate":
        message.ablate.artifact_id = _text(table, "artifact", where)
        message.ablate.allow_other_model = allow_other
    elif kind == "add":
        message.add.artifact_id = _text(table, "artifact", where)
        hooks = table.get("hooks", [])
        if not isinstance(hooks, list) or not all(isinstance(h, str) for h in hooks):
            raise InvalidArgumentError("a list of hook names", field=f"{where}.hooks")
        message.add.hooks.extend(hooks)
        message.add.phase = _choice(table, "phase", PHASES, Phase.ALL, where)
        message.add.allow_other_model = allow_other
    else:
        message.slider.sae_id = _text(table, "sae", where)
        feature = table.get("feature")
        if isinstance(feature, bool) or not isinstance(feature, int) or not 0 <= feature < 2**32:
            raise InvalidArgumentError("a feature index >= 0", field=f"{where}.feature")
        message.slider.feature = feature
        message.slider.mode = _choice(table, "mode", SLIDER_MODES, SliderMode.ADD_DECODER, where)
        message.slider.phase = _choice(table, "phase", PHASES, Phase.ALL, where)
    return message
