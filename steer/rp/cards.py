"""Character cards: SillyTavern/TavernAI V2 JSON (and V1), and PNG cards with a ``chara`` chunk.

A PNG card is an ordinary PNG whose ``tEXt`` (or ``iTXt``) chunk with keyword ``chara`` holds the
card JSON, base64-encoded. :func:`read_card` accepts a path or bytes of either kind;
:func:`write_png_card` writes one (a 1x1 image unless an image is given), used by tests and
``steer`` tools that export cards. PNG chunks are parsed with their CRCs checked.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from steer.errors import InvalidArgumentError
from steer.rp.scene import Character, Scene, substitute

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

#: V2 field -> Character field
_FIELDS = {
    "name": "name",
    "description": "description",
    "personality": "personality",
    "scenario": "scenario",
    "first_mes": "first_message",
    "mes_example": "example_dialogue",
    "system_prompt": "system_prompt",
}


def card_from_json(data: Mapping[str, Any]) -> Character:
    """A V2 card (``{"spec": "chara_card_v2", "data": {...}}``) or a flat V1 card."""
    if not isinstance(data, Mapping):
        raise InvalidArgumentError("a card is a JSON object", field="card")
    spec = data.get("spec")
    if spec is not None and spec not in ("chara_card_v2", "chara_card_v3"):
        raise InvalidArgumentError(f"unsupported card spec {spec!r}", field="card.spec")
    fields = data.get("data") if spec else data
    if not isinstance(fields, Mapping):
        raise InvalidArgumentError("missing the card's data object", field="card.data")
    values: dict[str, str] = {}
    for card_field, character_field in _FIELDS.items():
        value = fields.get(card_field, "")
        if value is None:
            value = ""
        if not isinstance(value, str):
            raise InvalidArgumentError(
                f"must be a string, got {value!r}", field=f"card.{card_field}"
            )
        values[character_field] = value
    if not values["name"].strip():
        raise InvalidArgumentError("the card has no name", field="card.name")
    return Character(**values)


def card_to_json(character: Character) -> dict[str, Any]:
    """The V2 JSON of a character (the inverse of :func:`card_from_json`)."""
    values = asdict(character)
    data = {card_field: values[field] for card_field, field in _FIELDS.items()}
    data.update(
        creator_notes="",
        post_history_instructions="",
        alternate_greetings=[],
        tags=[],
        creator="",
        character_version="",
        extensions={},
    )
    return {"spec": "chara_card_v2", "spec_version": "2.0", "data": data}


def scene_with_card(card: Character, data: Mapping[str, Any] | None = None) -> Scene:
    """The scene ``data`` (shape of recipes/data/rp_scenarios.jsonl) with ``card`` as its first
    character, as SillyTavern starts a chat from a card.

    ``data`` may leave ``characters`` out (any it lists join after the card's). The card's
    scenario is the scene's when the scene has none, and its first message opens the turns
    unless they already begin with it; ``{{char}}`` is the card's name throughout.
    """
    values = dict(data or {})
    others = values.get("characters", [])
    if not isinstance(others, (list, tuple)):
        raise InvalidArgumentError("must be a list", field="characters")
    values["characters"] = [asdict(card), *others]
    if not values.get("scenario") and card.scenario.strip():
        values["scenario"] = card.scenario
    turns = values.get("turns", [])
    opened = isinstance(turns, (list, tuple)) and _opens_with(turns, card, values.get("user"))
    if card.first_message.strip() and isinstance(turns, (list, tuple)) and not opened:
        values["turns"] = [{"speaker": card.name, "content": card.first_message}, *turns]
    return Scene.from_dict(values)


def _opens_with(turns: Sequence[Any], card: Character, user: Any) -> bool:
    """Whether the first turn is the card's first message (as written, or with names filled)."""
    if not turns or not isinstance(turns[0], Mapping) or turns[0].get("speaker") != card.name:
        return False
    content = turns[0].get("content")
    user_name = user.get("name") if isinstance(user, Mapping) else None
    greetings = {card.first_message.strip()}
    if isinstance(user_name, str):
        greetings.add(substitute(card.first_message, card.name, user_name).strip())
    return isinstance(content, str) and content.strip() in greetings


def _chunks(blob: bytes) -> list[tuple[bytes, bytes]]:
    if not blob.startswith(PNG_SIGNATURE):
        raise InvalidArgumentError("not a PNG file", field="card")
    chunks = []
    offset = len(PNG_SIGNATURE)
    while offset < len(blob):
        if offset + 8 > len(blob):
            raise InvalidArgumentError("truncated PNG chunk header", field="card")
        (length,) = struct.unpack(">I", blob[offset : offset + 4])
        kind = blob[offset + 4 : offset + 8]
        body = blob[offset + 8 : offset + 8 + length]
        crc = blob[offset + 8 + length : offset + 12 + length]
        if len(body) != length or len(crc) != 4:
            raise InvalidArgumentError(f"truncated PNG chunk {kind!r}", field="card")
        if struct.unpack(">I", crc)[0] != zlib.crc32(kind + body):
            raise InvalidArgumentError(f"bad CRC in PNG chunk {kind!r}", field="card")
        chunks.append((kind, body))
        offset += 12 + length
        if kind == b"IEND":
            break
    return chunks


def _text_chunk(kind: bytes, body: bytes) -> tuple[str, str] | None:
    if kind == b"tEXt":
        keyword, _, text = body.partition(b"\0")
        return keyword.decode("latin-1"), text.decode("latin-1")
    if kind == b"iTXt":
        keyword, _, rest = body.partition(b"\0")
        compressed, method = rest[0], rest[1]
        _language, _, rest = rest[2:].partition(b"\0")
        _translated, _, text = rest.partition(b"\0")
        if compressed and method == 0:
            text = zlib.decompress(text)
        return keyword.decode("latin-1"), text.decode("utf-8")
    return None


def card_from_png(blob: bytes) -> Character:
    """Read the ``chara`` chunk of a PNG card."""
    for kind, body in _chunks(blob):
        entry = _text_chunk(kind, body)
        if entry is None or entry[0] != "chara":
            continue
        try:
            data = json.loads(base64.b64decode(entry[1], validate=True).decode("utf-8"))
        except (binascii.Error, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise InvalidArgumentError(
                f"the chara chunk is not base64 JSON: {error}", field="card"
            ) from None
        return card_from_json(data)
    raise InvalidArgumentError("the PNG has no 'chara' text chunk", field="card")


def read_card(source: str | Path | bytes) -> Character:
    """A card from a ``.json`` or ``.png`` path, or from the bytes of either."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise InvalidArgumentError(f"no card file at {path}", field="card")
        source = path.read_bytes()
    if source.startswith(PNG_SIGNATURE):
        return card_from_png(source)
    try:
        return card_from_json(json.loads(source.decode("utf-8")))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InvalidArgumentError(f"neither a PNG nor JSON card: {error}", field="card") from None


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def write_png_card(character: Character, path: str | Path | None = None) -> bytes:
    """A 1x1 PNG carrying the character's V2 JSON in a ``chara`` tEXt chunk; written if ``path``."""
    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)  # 1x1, 8-bit RGB
    pixels = zlib.compress(b"\x00\x80\x80\x80")  # filter byte + one grey pixel
    payload = base64.b64encode(json.dumps(card_to_json(character)).encode("utf-8"))
    blob = (
        PNG_SIGNATURE
        + _chunk(b"IHDR", header)
        + _chunk(b"tEXt", b"chara\0" + payload)
        + _chunk(b"IDAT", pixels)
        + _chunk(b"IEND", b"")
    )
    if path is not None:
        Path(path).write_bytes(blob)
    return blob
