"""Roleplay: scenes, prompt formats with speaker labels, character cards, presets, metrics."""

from steer.rp.cards import card_from_json, read_card, write_png_card
from steer.rp.formats import FORMATS, PromptTokens, Rendered, get_format, register, tokenize
from steer.rp.presets import PRESETS, preset_config
from steer.rp.scene import Character, Scene, Turn, substitute

__all__ = [
    "FORMATS",
    "PRESETS",
    "Character",
    "PromptTokens",
    "Rendered",
    "Scene",
    "Turn",
    "card_from_json",
    "get_format",
    "preset_config",
    "read_card",
    "register",
    "substitute",
    "tokenize",
    "write_png_card",
]
