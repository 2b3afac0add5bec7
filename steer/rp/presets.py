"""Named sampler presets: the settings the model cards in shared/seeds/ recommend.

A preset is a partial :class:`SamplingConfig`; :func:`preset_config` fills in the rest and lets
a caller override fields (e.g. the seed). :func:`load_preset` also reads a TOML file with the
same field names, so users can keep their own presets next to recipes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from steer.errors import InvalidArgumentError, NotFoundError
from steer.sampling import SamplingConfig
from steer.toml_input import read_toml


@dataclass(frozen=True)
class Preset:
    name: str
    settings: Mapping[str, Any]
    #: where the settings come from
    source: str


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("default", {}, "neutral: temperature 1, every other sampler off"),
        Preset(
            "shorirp",
            {"temperature": 1.0, "min_p": 0.075, "presence_penalty": 0.4},
            "ShoriRP main choice (seed 003): temperature 1.0, min-p 0.05-0.10, presence 0.35-0.45",
        ),
        Preset(
            "temperature-last",
            {"temperature": 2.4, "min_p": 0.4, "frequency_penalty": 0.1, "temperature_last": True},
            "ShoriRP alternative 1 (seed 003): temperature 2.4, min-p 0.4, frequency 0.1, "
            "temperature last",
        ),
        Preset(
            "mirostat",
            {"mirostat_mode": 2, "mirostat_tau": 3.0, "mirostat_eta": 0.0175},
            "ShoriRP alternative 2 (seed 003): Mirostat 2, tau 3.0, eta 0.0175",
        ),
        Preset(
            "limarp",
            {
                "temperature": 0.5,
                "tfs": 0.9,
                "repetition_penalty": 1.15,
                "repetition_penalty_range": 512,
            },
            "LimaRP (seed 002): TFS 0.9, temperature 0.5, repetition penalty 1.15 over 512",
        ),
        Preset(
            "limamono",
            {
                "temperature": 1.0,
                "tfs": 0.85,
                "repetition_penalty": 1.11,
                "repetition_penalty_range": 2048,
            },
            "Limamono (seed 004): temperature 1.0, TFS 0.85, repetition penalty 1.11 over 2048",
        ),
        Preset(
            "near-greedy",
            {
                "temperature": 3.0,
                "min_p": 0.5,
                "temperature_last": True,
                "repetition_penalty": 1.03,
            },
            "Mirai (seed 001): temperature 3.0, min-p 0.5, temperature last, repetition 1.03",
        ),
        Preset(
            "dry-xtc",
            {
                "min_p": 0.05,
                "dry_multiplier": 0.8,
                "dry_base": 1.75,
                "dry_allowed_length": 2,
                "xtc_threshold": 0.1,
                "xtc_probability": 0.5,
            },
            "anti-repetition: min-p 0.05, DRY 0.8/1.75/2, XTC 0.1/0.5 (SillyTavern defaults)",
        ),
    )
}

_FIELD_NAMES = {f.name for f in fields(SamplingConfig)}


def _config(settings: Mapping[str, Any], origin: str) -> SamplingConfig:
    unknown = sorted(set(settings) - _FIELD_NAMES)
    if unknown:
        raise InvalidArgumentError(
            f"unknown sampler settings {unknown} in {origin}", field="preset"
        )
    return SamplingConfig(**dict(settings))


def preset_config(name: str, **overrides: Any) -> SamplingConfig:
    """The :class:`SamplingConfig` of a named preset (or a TOML path), with overrides applied."""
    config = load_preset(name)
    return replace(config, **overrides) if overrides else config


def load_preset(name_or_path: str) -> SamplingConfig:
    if name_or_path in PRESETS:
        return _config(PRESETS[name_or_path].settings, f"preset {name_or_path!r}")
    path = Path(name_or_path)
    if path.suffix == ".toml":
        if not path.is_file():
            raise NotFoundError(f"no preset file at {path}", field="preset")
        settings = read_toml(path, field="preset")
        return _config(settings.get("sampling", settings), str(path))
    raise NotFoundError(
        f"unknown preset {name_or_path!r}; choose from {sorted(PRESETS)} or a .toml file",
        field="preset",
    )
