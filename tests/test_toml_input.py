"""Every recipe loader reads TOML through steer.toml_input: an unreadable file is a field error."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from steer.directions.recipe import load_direction_recipe
from steer.errors import InvalidArgumentError
from steer.recipes import load_edit_recipe
from steer.sae.recipe import load_sae_recipe
from steer.toml_input import parse_toml, read_toml

LOADERS: list[Callable[[Path], Any]] = [load_edit_recipe, load_direction_recipe, load_sae_recipe]
DEEP = "a = " + "[" * 50_000 + "]" * 50_000


@pytest.mark.parametrize("load", LOADERS)
@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"name = \xff\xfe\n", "not UTF-8"),
        (b"name = = 1\n", "Invalid"),
        (DEEP.encode(), "nested too deeply"),
    ],
)
def test_a_bad_recipe_file_is_a_field_error(
    load: Callable[[Path], Any], content: bytes, reason: str, tmp_path: Path
) -> None:
    path = tmp_path / "recipe.toml"
    path.write_bytes(content)
    with pytest.raises(InvalidArgumentError) as error:
        load(path)
    assert error.value.field == "recipe"
    assert str(path) in error.value.message and reason in error.value.message


def test_a_directory_is_not_an_edit_recipe(tmp_path: Path) -> None:
    (tmp_path / "edits.toml").mkdir()
    with pytest.raises(InvalidArgumentError) as error:
        load_edit_recipe(str(tmp_path / "edits.toml"))
    assert error.value.field == "recipe"


def test_recipe_text_too_deep_is_a_field_error() -> None:
    with pytest.raises(InvalidArgumentError) as error:
        load_edit_recipe(DEEP + "\n")
    assert error.value.field == "recipe" and "recipe TOML: nested too deeply" in error.value.message


def test_parse_and_read(tmp_path: Path) -> None:
    assert parse_toml("a = [1, {b = 2}]", what="t", field="f") == {"a": [1, {"b": 2}]}
    path = tmp_path / "ok.toml"
    path.write_text('[t]\nname = "café"\n', encoding="utf-8")
    assert read_toml(path, field="f") == {"t": {"name": "café"}}


def test_presets_and_slider_files_read_the_same_way(tmp_path: Path) -> None:
    from steer.rp.presets import load_preset
    from steer.service.sliders import SliderCatalogue

    path = tmp_path / "mine.toml"
    path.write_bytes(b"temperature = \xff\n")
    with pytest.raises(InvalidArgumentError) as preset:
        load_preset(str(path))
    assert preset.value.field == "preset" and "not UTF-8" in preset.value.message
    with pytest.raises(InvalidArgumentError) as sliders:
        SliderCatalogue.load(path)
    assert sliders.value.field == "sliders" and "not UTF-8" in sliders.value.message
    with pytest.raises(InvalidArgumentError) as missing:
        SliderCatalogue.load(tmp_path / "absent.toml")
    assert missing.value.field == "sliders"
