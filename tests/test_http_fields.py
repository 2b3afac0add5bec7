"""steer.http.fields: SillyTavern's request bodies mapped onto steer's sampler pipeline.

Every fixture of tests/st_bodies.py parses, each sampler it carries lands in the SamplingConfig
(asserted field by field), aliases resolve canonical-first, client sampler orders are completed,
unsupported samplers are reported only when they would have an effect, and every bad value is an
InvalidArgumentError naming the key the client sent.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from typing import Any

import pytest
import torch

from steer.errors import InvalidArgumentError
from steer.http.fields import (
    PARAMETERS,
    SAMPLER_FIELDS,
    UNSUPPORTED,
    ChatTurn,
    OpenAIRequest,
    full_order,
    parse_request,
)
from steer.sampling import DEFAULT_ORDER, SamplingConfig, process
from tests import st_bodies

INF = math.inf
BREAKERS = ("\n", ":", '"', "*")

#: what each fixture's samplers must become, written out by hand from the fixture's values
EXPECTED = {
    "tabby": SamplingConfig(
        temperature=1.1,
        temperature_last=True,
        min_p=0.05,
        repetition_penalty=1.05,
        repetition_penalty_range=2048,
        dry_multiplier=0.8,
        dry_base=1.75,
        dry_allowed_length=2,
        dry_sequence_breakers=BREAKERS,
        xtc_threshold=0.1,
        xtc_probability=0.5,
        logit_bias=((1012, -50.0), (28705, 5.0)),
        banned_strings=("shivers down", "ministrations"),
        seed=1234,
    ),
    "koboldcpp": SamplingConfig(
        temperature=0.8,
        top_k=40,
        top_p=0.95,
        min_p=0.02,
        repetition_penalty=1.1,
        repetition_penalty_range=360,
        dry_multiplier=0.8,
        dry_sequence_breakers=BREAKERS,
        logit_bias=((13, -INF), (29871, -INF)),
        # KoboldCpp's [6, 0, 1, 3, 4, 2, 5]: penalties, top_k, top_a, tfs, typical, top_p (with
        # min_p), temperature; DRY first and XTC last as KoboldCpp runs them
        sampler_order=(
            "logit_bias",
            "repetition_penalty",
            "presence_penalty",
            "frequency_penalty",
            "dry",
            "top_k",
            "top_a",
            "tfs",
            "typical_p",
            "top_p",
            "min_p",
            "temperature",
            "xtc",
        ),
    ),
    "ooba": SamplingConfig(
        temperature=0.9,
        typical_p=0.95,
        repetition_penalty=1.15,
        repetition_penalty_range=1024,
        frequency_penalty=0.1,
        presence_penalty=0.2,
        dry_allowed_length=3,
        mirostat_mode=2,
        mirostat_tau=4.5,
        mirostat_eta=0.15,
        ban_eos=True,
        min_tokens=16,
        seed=77,
        # OOBA_DEFAULT_ORDER puts top_a after tfs; the samplers steer lacks are skipped
        sampler_order=(
            "logit_bias",
            "repetition_penalty",
            "presence_penalty",
            "frequency_penalty",
            "dry",
            "temperature",
            "top_k",
            "top_p",
            "typical_p",
            "tfs",
            "top_a",
            "min_p",
            "xtc",
        ),
    ),
    "aphrodite": SamplingConfig(
        temperature=1.25,
        temperature_last=True,
        top_k=50,
        top_p=0.9,
        min_p=0.1,
        top_a=0.2,
        tfs=0.97,
        repetition_penalty=1.02,
        presence_penalty=0.3,
        xtc_threshold=0.15,
        xtc_probability=0.3,
        logit_bias=((13, -INF), (29871, -INF)),
        ban_eos=True,  # ignore_eos (canonical) is true, ban_eos_token false
        min_tokens=8,
        seed=42,
    ),
    "generic": SamplingConfig(
        temperature=0.9, top_p=0.92, frequency_penalty=0.2, presence_penalty=0.1, seed=7
    ),
    "llamacpp": SamplingConfig(
        temperature=0.9,
        top_k=40,
        top_p=0.95,
        min_p=0.05,
        repetition_penalty=1.08,
        repetition_penalty_range=512,
        dry_multiplier=0.8,
        dry_sequence_breakers=BREAKERS,
        # the pairs [[1012, -50], [28705, false]] and custom_token_bans "28705" (the same ban)
        logit_bias=((1012, -50.0), (28705, -INF)),
        # ST's LLAMACPP_DEFAULT_ORDER: penalties, dry, top_k, typ_p, top_p, min_p, xtc,
        # temperature (top_n_sigma and adaptive_p are samplers steer lacks): temperature last,
        # as llama.cpp runs it; top_a and tfs keep their places
        sampler_order=(
            "logit_bias",
            "repetition_penalty",
            "presence_penalty",
            "frequency_penalty",
            "dry",
            "top_k",
            "typical_p",
            "top_a",
            "top_p",
            "min_p",
            "tfs",
            "xtc",
            "temperature",
        ),
    ),
    "chat_custom": SamplingConfig(min_p=0.05, repetition_penalty=1.05),
}
FIXTURES = {**st_bodies.TEXT_COMPLETION_BODIES, "chat_custom": st_bodies.CHAT_CUSTOM}
#: keys ST sends that are neither samplers nor unsupported samplers: ignored silently
BOOKKEEPING = {
    "prompt",
    "messages",
    "model",
    "max_new_tokens",
    "max_tokens",
    "n_predict",
    "num_predict",
    "stop",
    "stopping_strings",
    "logprobs",
    "top_logprobs",
    "n_probs",
    "n",
    "stream",
    "do_sample",
    "logit_bias",
    "custom_token_bans",
    "sampler_order",
    "sampler_priority",
    "samplers",
    "cache_prompt",
    "add_bos_token",
    "truncation_length",
    "num_ctx",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "include_reasoning",
    "api_type",
    "api_server",
    "speculative_ngram",
    "early_stopping",
    "trim_stop",
    "steer.moralizing",
    "steer.cheerful",
}


def parse(name: str, **changes: Any) -> OpenAIRequest:
    """Parse a copy of fixture ``name`` with ``changes`` applied (a value of None deletes)."""
    body = copy.deepcopy(FIXTURES[name])
    for key, value in changes.items():
        if value is None:
            body.pop(key, None)
        else:
            body[key] = value
    return parse_request(body, chat=name.startswith("chat"))


def refused(body: Any, *, chat: bool = False) -> InvalidArgumentError:
    with pytest.raises(InvalidArgumentError) as caught:
        parse_request(body, chat=chat)
    return caught.value


def text_body(**fields: Any) -> dict[str, Any]:
    return {"prompt": "Once upon a time", **fields}


# -- the fixtures ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_each_fixture_lands_field_by_field(name: str) -> None:
    sampling = parse(name).sampling
    expected = EXPECTED[name]
    for field in dataclasses.fields(SamplingConfig):
        got, want = getattr(sampling, field.name), getattr(expected, field.name)
        assert got == want, f"{name}: {field.name} = {got!r}, expected {want!r}"


@pytest.mark.parametrize("name", sorted(st_bodies.TEXT_COMPLETION_BODIES))
def test_text_fixtures_parse(name: str) -> None:
    body = st_bodies.TEXT_COMPLETION_BODIES[name]
    parsed = parse(name)
    assert parsed.prompt == st_bodies.PROMPT and parsed.messages is None
    assert parsed.max_new_tokens == body["max_tokens"]
    assert parsed.stop == tuple(body["stop"])
    assert parsed.stream == body.get("stream", False)
    assert parsed.n == body.get("n", 1)
    assert parsed.model == body.get("model", "")
    assert parsed.logprobs == body.get("logprobs", 0)
    assert parsed.ignored == (), "ST's neutral values of unsupported samplers are not reported"
    assert parsed.sliders == {} and parsed.steering == () and parsed.prompt_format is None


def test_chat_fixture_parses() -> None:
    parsed = parse("chat_custom")
    assert parsed.prompt is None and parsed.messages is not None
    assert [(t.role, t.name) for t in parsed.messages] == [
        ("system", None),
        ("system", None),
        ("assistant", "Seraphina"),
        ("user", "Alex"),
        ("assistant", "Kael"),
    ]
    assert parsed.messages[3].content == "*I sit down on the moss.* Thank you..."
    assert dict(parsed.sliders) == {"moralizing": -1.0, "cheerful": 0.5}
    assert parsed.logprobs == 5 and parsed.stream and parsed.max_new_tokens == 300
    assert parsed.ignored == () and parsed.stop == ()


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_every_key_st_sends_is_accounted_for(name: str) -> None:
    """A fixture key is a sampler steer maps, an unsupported sampler, or known bookkeeping."""
    mapped = {alias for aliases, _ in SAMPLER_FIELDS.values() for alias in aliases}
    known = mapped | set(UNSUPPORTED) | set(PARAMETERS) | BOOKKEEPING
    assert set(FIXTURES[name]) - known == set()


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_unknown_keys_are_ignored(name: str) -> None:
    extra = {
        "frobnicate": {"deep": [1, 2, {"x": None}]},
        "user": "someone",
        "api_type": 5,
        "legacy_api": False,
        "bypass_status_check": True,
        "steer_something_else": "x",
    }
    assert parse(name, **extra) == parse(name)


# -- aliases -----------------------------------------------------------------------------------

ALIASES = [
    # (canonical, alias, canonical value, alias value, config field, canonical result)
    ("typical_p", "typical", 0.9, 0.8, "typical_p", 0.9),
    ("tfs", "tfs_z", 0.9, 0.8, "tfs", 0.9),
    ("mirostat_mode", "mirostat", 2, 1, "mirostat_mode", 2),
    ("repetition_penalty", "rep_pen", 1.2, 1.1, "repetition_penalty", 1.2),
    ("repetition_penalty", "repeat_penalty", 1.2, 1.1, "repetition_penalty", 1.2),
    ("repetition_penalty_range", "rep_pen_range", 512, 256, "repetition_penalty_range", 512),
    ("repetition_penalty_range", "repeat_last_n", 512, 256, "repetition_penalty_range", 512),
    ("dry_penalty_last_n", "dry_range", 300, 200, "dry_range", 300),
    ("min_tokens", "min_length", 5, 3, "min_tokens", 5),
    ("ignore_eos", "ban_eos_token", False, True, "ban_eos", False),
    ("seed", "sampler_seed", 11, 12, "seed", 11),
]


@pytest.mark.parametrize(("canonical", "alias", "one", "two", "field", "want"), ALIASES)
def test_alias_alone_lands(
    canonical: str, alias: str, one: Any, two: Any, field: str, want: Any
) -> None:
    parsed = parse_request(text_body(**{alias: two}), chat=False)
    assert getattr(parsed.sampling, field) == two


@pytest.mark.parametrize(("canonical", "alias", "one", "two", "field", "want"), ALIASES)
def test_canonical_name_wins(
    canonical: str, alias: str, one: Any, two: Any, field: str, want: Any
) -> None:
    for body in (
        text_body(**{canonical: one, alias: two}),
        text_body(**{alias: two, canonical: one}),
    ):
        assert getattr(parse_request(body, chat=False).sampling, field) == want


def test_null_counts_as_absent() -> None:
    parsed = parse_request(text_body(rep_pen=1.3, repetition_penalty=None, seed=None), chat=False)
    assert parsed.sampling.repetition_penalty == 1.3 and parsed.sampling.seed is None


@pytest.mark.parametrize(
    ("fields", "want"),
    [
        ({"max_tokens": 10, "max_new_tokens": 20, "n_predict": 30}, 10),
        ({"max_new_tokens": 20, "n_predict": 30}, 20),
        ({"max_completion_tokens": 40}, 40),
        ({"n_predict": 30}, 30),
        ({"num_predict": 50}, 50),
        ({"n_predict": -1}, None),
        ({}, None),
    ],
)
def test_max_new_tokens_aliases(fields: dict[str, Any], want: int | None) -> None:
    assert parse_request(text_body(**fields), chat=False).max_new_tokens == want


def test_stop_strings() -> None:
    parsed = parse_request(text_body(stop=["\nA:", "", "\nA:", "END"]), chat=False)
    assert parsed.stop == ("\nA:", "END")
    assert parse_request(text_body(stop="END"), chat=False).stop == ("END",)
    assert parse_request(text_body(stopping_strings=["X"]), chat=False).stop == ("X",)
    assert parse_request(text_body(stop=["Y"], stopping_strings=["X"]), chat=False).stop == ("Y",)


# -- individual mappings -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "field", "want"),
    [
        ({"top_k": -1}, "top_k", 0),
        ({"top_k": 40.0}, "top_k", 40),
        ({"dry_penalty_last_n": -1}, "dry_range", 0),
        ({"dry_penalty_last_n": 0}, "dry_range", 0),
        ({"dry_penalty_last_n": 64}, "dry_range", 64),
        ({"rep_pen_range": -1}, "repetition_penalty_range", 0),
        ({"seed": -1}, "seed", None),
        ({"sampler_seed": -1}, "seed", None),
        ({"do_sample": False, "temperature": 0.7}, "temperature", 0.0),
        ({"do_sample": True, "temperature": 0.7}, "temperature", 0.7),
        ({"temperature_last": True}, "temperature_last", True),
        ({"banned_strings": "shivers"}, "banned_strings", ("shivers",)),
        ({"banned_strings": ["a", "", "a", "b"]}, "banned_strings", ("a", "b")),
    ],
)
def test_value_mapping(fields: dict[str, Any], field: str, want: Any) -> None:
    assert getattr(parse_request(text_body(**fields), chat=False).sampling, field) == want


@pytest.mark.parametrize(
    "breakers",
    [
        '["\\n", ":", "\\"", "*"]',  # ST's setting as typed
        '["\\n",":","\\"","*"]',  # after replaceMacrosInList
        '"\\n", ":", "\\"", "*"',  # text-generation-webui's own form, without brackets
        ["\n", ":", '"', "*"],  # KoboldCpp's array
    ],
)
def test_dry_sequence_breakers_forms(breakers: Any) -> None:
    parsed = parse_request(text_body(dry_sequence_breakers=breakers), chat=False)
    assert parsed.sampling.dry_sequence_breakers == BREAKERS


def test_dry_sequence_breakers_fallbacks() -> None:
    parsed = parse_request(text_body(dry_sequence_breakers="a,b,,c"), chat=False)
    assert parsed.sampling.dry_sequence_breakers == ("a", "b", "c")  # ST's comma split
    assert parse_request(text_body(dry_sequence_breakers=""), chat=False).sampling == (
        SamplingConfig(dry_sequence_breakers=())
    )


def test_token_bans_and_logit_bias_merge() -> None:
    body = text_body(logit_bias={"5": 2.5, "7": -1}, custom_token_bans="7, 9")
    assert parse_request(body, chat=False).sampling.logit_bias == ((5, 2.5), (7, -INF), (9, -INF))
    listed = parse_request(text_body(custom_token_bans=[3, 4]), chat=False).sampling
    assert listed.logit_bias == ((3, -INF), (4, -INF))
    assert parse_request(text_body(custom_token_bans=""), chat=False).sampling.logit_bias == ()


def test_logprobs() -> None:
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    assert parse_request({**chat, "logprobs": True}, chat=True).logprobs == 1
    assert parse_request({**chat, "logprobs": True, "top_logprobs": 7}, chat=True).logprobs == 7
    assert parse_request({**chat, "logprobs": False, "top_logprobs": 7}, chat=True).logprobs == 0
    assert parse_request({**chat, "logprobs": 3}, chat=True).logprobs == 3
    assert parse_request(text_body(logprobs=5), chat=False).logprobs == 5
    assert parse_request(text_body(n_probs=4), chat=False).logprobs == 4
    assert parse_request(text_body(), chat=False).logprobs == 0


def test_stream_options_and_n() -> None:
    body = text_body(stream=True, stream_options={"include_usage": True}, n=3)
    parsed = parse_request(body, chat=False)
    assert parsed.stream and parsed.include_usage and parsed.n == 3
    assert not parse_request(text_body(stream_options={}), chat=False).include_usage


def test_chat_messages() -> None:
    body = {
        "messages": [
            {"role": "developer", "content": "Be brief."},
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            },
            {"role": "assistant", "content": "ok", "name": ""},
        ]
    }
    assert parse_request(body, chat=True).messages == (
        ChatTurn("system", "Be brief."),
        ChatTurn("user", "a\nb"),
        ChatTurn("assistant", "ok", None),
    )


def test_prompt_list_of_one() -> None:
    assert parse_request({"prompt": ["only"]}, chat=False).prompt == "only"


def test_sliders_steering_and_prompt_format() -> None:
    steering = [{"vector": "refusal", "strength": -1, "speaker": "Kael"}]
    body = {
        "messages": [{"role": "user", "content": "hi"}],
        "steer.moralizing": -1,
        "steer.cheerful": 0.25,
        "steering": steering,
        "steer_prompt_format": "chatml",
    }
    parsed = parse_request(body, chat=True)
    assert dict(parsed.sliders) == {"moralizing": -1.0, "cheerful": 0.25}
    assert all(isinstance(v, float) for v in parsed.sliders.values())
    assert parsed.steering == tuple(steering) and parsed.prompt_format == "chatml"


# -- sampler order -----------------------------------------------------------------------------


def test_full_order_keeps_unlisted_samplers_in_place() -> None:
    order = full_order(["min_p", "temperature"])
    assert order[DEFAULT_ORDER.index("temperature")] == "min_p"
    assert order[DEFAULT_ORDER.index("min_p")] == "temperature"
    assert [n for n in order if n not in ("temperature", "min_p")] == [
        n for n in DEFAULT_ORDER if n not in ("temperature", "min_p")
    ]


def test_sampler_the_client_did_not_list_still_runs() -> None:
    """Only temperature and top_k are ordered; min_p, which the client did not list, still cuts."""
    parsed = parse_request(
        text_body(sampler_priority=["top_k", "temperature"], min_p=0.5, top_k=3), chat=False
    )
    config = parsed.sampling
    assert config.sampler_order is not None and set(config.order()) == set(DEFAULT_ORDER)
    assert config.order().index("top_k") < config.order().index("temperature")
    logits = torch.tensor([4.0, 3.9, 1.0, 0.5, 0.0])
    out = process(logits, config)
    assert torch.isinf(out[2:]).all(), "min_p removed the tokens below half the top probability"
    assert torch.isfinite(out[:2]).all()


def test_kobold_order_runs_temperature_after_truncation() -> None:
    order = parse("koboldcpp").sampling.order()
    assert order.index("temperature") > order.index("min_p") > order.index("top_k")
    swapped = parse("koboldcpp", sampler_order=[5, 6, 0, 1, 3, 4, 2]).sampling.order()
    assert swapped.index("temperature") < swapped.index("repetition_penalty")
    assert swapped[-1] == "xtc" and swapped.index("dry") < swapped.index("top_k")


def test_default_order_is_stored_as_none() -> None:
    names = [n for n in DEFAULT_ORDER if n != "logit_bias"]
    parsed = parse_request(text_body(sampler_priority=names), chat=False)
    assert parsed.sampling.sampler_order is None


def test_aphrodite_and_string_priorities() -> None:
    aphrodite = ["temperature", "top_nsigma", "penalties", "top_p_top_k", "quadratic", "min_p"]
    order = parse_request(text_body(sampler_priority=aphrodite), chat=False).sampling.order()
    assert order.index("temperature") < order.index("repetition_penalty")
    assert order.index("frequency_penalty") < order.index("top_k") < order.index("top_p")
    text = parse_request(text_body(sampler_priority="min_p\ntemperature"), chat=False)
    assert text.sampling.order().index("min_p") < text.sampling.order().index("temperature")


def test_sampler_priority_is_canonical_over_sampler_order() -> None:
    body = text_body(sampler_priority=["min_p", "temperature"], sampler_order=[5, 2])
    order = parse_request(body, chat=False).sampling.order()
    assert order.index("min_p") < order.index("temperature")


def test_temperature_last_overrides_the_order() -> None:
    body = text_body(sampler_priority=["temperature", "top_k"], temperature_last=True)
    assert parse_request(body, chat=False).sampling.order()[-1] == "temperature"


# -- unsupported samplers ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "reported"),
    [
        ({"smoothing_factor": 0.3, "smoothing_curve": 2}, ("smoothing_curve", "smoothing_factor")),
        ({"nsigma": 1.5}, ("nsigma",)),
        ({"top_n_sigma": 1}, ("top_n_sigma",)),
        (
            {"dynamic_temperature": True, "dynatemp_low": 0.5, "dynatemp_high": 1.5},
            ("dynamic_temperature", "dynatemp_high", "dynatemp_low"),
        ),
        ({"dynatemp_range": 0.5}, ("dynatemp_range",)),
        ({"epsilon_cutoff": 3}, ("epsilon_cutoff",)),
        ({"eta_cutoff": 3}, ("eta_cutoff",)),
        ({"no_repeat_ngram_size": 3}, ("no_repeat_ngram_size",)),
        ({"encoder_repetition_penalty": 1.1}, ("encoder_repetition_penalty",)),
        ({"penalty_alpha": 0.6}, ("penalty_alpha",)),
        ({"guidance_scale": 1.5}, ("guidance_scale",)),
        ({"negative_prompt": "sad"}, ("negative_prompt",)),
        ({"grammar_string": "root ::= x"}, ("grammar_string",)),
        ({"adaptive_target": 0.5, "adaptive_decay": 0.9}, ("adaptive_decay", "adaptive_target")),
        ({"min_keep": 5}, ("min_keep",)),
        ({"skew": -1}, ("skew",)),
        ({"rep_pen_slope": 0.7}, ("rep_pen_slope",)),
        ({"num_beams": 4, "length_penalty": 1.2}, ("length_penalty", "num_beams")),
        ({"json_schema": {"type": "object"}}, ("json_schema",)),
        ({"echo": True}, ("echo",)),
    ],
)
def test_non_neutral_unsupported_fields_are_reported(
    fields: dict[str, Any], reported: tuple[str, ...]
) -> None:
    assert parse_request(text_body(**fields), chat=False).ignored == reported


@pytest.mark.parametrize(
    "fields",
    [
        {"smoothing_factor": 0, "smoothing_curve": 2},  # curve without smoothing: no effect
        {"nsigma": 0, "top_n_sigma": -1, "min_keep": 0, "skew": 0},
        {"dynamic_temperature": False, "dynatemp_low": 0.5, "dynatemp_exponent": 2},
        {"dynatemp": False},
        {"epsilon_cutoff": 0, "eta_cutoff": 0, "no_repeat_ngram_size": 0, "penalty_alpha": 0},
        {"encoder_repetition_penalty": 1, "guidance_scale": 1, "negative_prompt": ""},
        {"grammar": "", "grammar_string": "", "json_schema": None, "tools": []},
        {"adaptive_target": -0.01, "adaptive_decay": 0.9},
        {"num_beams": 1, "length_penalty": 2, "best_of": 1, "rep_pen_slope": 1},
        {"response_format": {"type": "text"}, "echo": False, "include_stop_str_in_output": False},
    ],
)
def test_neutral_unsupported_fields_are_not_reported(fields: dict[str, Any]) -> None:
    assert parse_request(text_body(**fields), chat=False).ignored == ()


# -- bad values --------------------------------------------------------------------------------

CHAT = {"messages": [{"role": "user", "content": "hi"}]}
BAD_TEXT = [
    # (fields added to a text body, the field the error names)
    ({"rep_pen": "1.1"}, "rep_pen"),
    ({"rep_pen": True}, "rep_pen"),
    ({"rep_pen": 0}, "rep_pen"),  # out of range: SamplingConfig's error, renamed
    ({"repeat_penalty": 500}, "repeat_penalty"),
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": 10**400}, "temperature"),
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"typical": 2}, "typical"),
    ({"tfs_z": "x"}, "tfs_z"),
    ({"top_k": 1.5}, "top_k"),
    ({"top_k": -2}, "top_k"),
    ({"top_k": 10**30}, "top_k"),
    ({"mirostat": 3}, "mirostat"),
    ({"min_length": -1}, "min_length"),
    ({"dry_allowed_length": 0}, "dry_allowed_length"),
    ({"dry_multiplier": [1]}, "dry_multiplier"),
    ({"dry_penalty_last_n": -5}, "dry_penalty_last_n"),
    ({"rep_pen_range": "all"}, "rep_pen_range"),
    ({"dry_sequence_breakers": '["\\n", 1]'}, "dry_sequence_breakers"),
    ({"dry_sequence_breakers": "[" * 100_000}, "dry_sequence_breakers"),
    ({"dry_sequence_breakers": {"a": 1}}, "dry_sequence_breakers"),
    ({"dry_sequence_breakers": ["x" * 1000]}, "dry_sequence_breakers"),
    ({"xtc_probability": 1.5}, "xtc_probability"),
    ({"temperature_last": "yes"}, "temperature_last"),
    ({"ban_eos_token": 1}, "ban_eos_token"),
    ({"ignore_eos": "true"}, "ignore_eos"),
    ({"seed": -2}, "seed"),
    ({"sampler_seed": 2**64}, "sampler_seed"),
    ({"banned_strings": [1]}, "banned_strings[0]"),
    ({"banned_strings": [f"phrase {i}" for i in range(100)]}, "banned_strings"),
    ({"logit_bias": [[1, 2, 3]]}, "logit_bias[0]"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"-3": 1}}, "logit_bias"),
    ({"logit_bias": {"99999999999": 1}}, "logit_bias"),
    ({"logit_bias": {"5": "x"}}, "logit_bias.5"),
    ({"logit_bias": {"5": 1e6}}, "logit_bias.5"),
    ({"custom_token_bans": "1,x"}, "custom_token_bans"),
    ({"custom_token_bans": "1" + ",2" * 5000}, "custom_token_bans"),
    ({"custom_token_bans": [True]}, "custom_token_bans"),
    ({"custom_token_bans": 5}, "custom_token_bans"),
    ({"sampler_order": [7]}, "sampler_order[0]"),
    ({"sampler_order": [1.5]}, "sampler_order[0]"),
    ({"sampler_order": [6, 6]}, "sampler_order"),
    ({"sampler_priority": 5}, "sampler_priority"),
    ({"sampler_priority": ["top_k", None]}, "sampler_priority[1]"),
    ({"sampler_priority": ["penalties", "repetition_penalty"]}, "sampler_priority"),
    ({"do_sample": "no"}, "do_sample"),
    ({"stop": [1]}, "stop[0]"),
    ({"stop": 5}, "stop"),
    ({"stopping_strings": {"a": 1}}, "stopping_strings"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": "300"}, "max_tokens"),
    ({"max_new_tokens": -1}, "max_new_tokens"),
    ({"n_predict": -2}, "n_predict"),
    ({"n": 0}, "n"),
    ({"n": 17}, "n"),
    ({"n": True}, "n"),
    ({"logprobs": 21}, "logprobs"),
    ({"logprobs": True}, "logprobs"),
    ({"n_probs": -1}, "n_probs"),
    ({"stream": "yes"}, "stream"),
    ({"stream_options": "x"}, "stream_options"),
    ({"stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
    ({"steer.moralizing": "high"}, "steer.moralizing"),
    ({"steer.moralizing": float("inf")}, "steer.moralizing"),
    ({"steer.moralizing": True}, "steer.moralizing"),
    ({"steer.": 1.0}, "steer."),
    ({"steering": {"vector": "x"}}, "steering"),
    ({"steering": [{"vector": "x"}, 3]}, "steering[1]"),
    ({"steer_prompt_format": "nope"}, "steer_prompt_format"),
    ({"steer_prompt_format": 3}, "steer_prompt_format"),
    ({"model": 5}, "model"),
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [1, "b"]}, "prompt"),
    ({"prompt": [[1], [2]]}, "prompt"),
    ({"prompt": [True]}, "prompt"),
    ({"prompt": [2**31]}, "prompt[0]"),
    ({"prompt": {"text": "x"}}, "prompt"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "messages"),
]


@pytest.mark.parametrize(("fields", "field"), BAD_TEXT)
def test_bad_text_values_name_the_clients_key(fields: dict[str, Any], field: str) -> None:
    assert refused(text_body(**fields)).field == field


BAD_CHAT = [
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": None}, "messages"),
    ({"prompt": "x"}, "prompt"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {}]}, None),
    ({"messages": [{"role": "user", "content": "a"}, "text"]}, "messages[1]"),
    ({"messages": [{"role": "narrator", "content": "a"}]}, "messages[0].role"),
    ({"messages": [{"role": "tool", "content": "a", "tool_call_id": "1"}]}, "messages[0].role"),
    ({"messages": [{"role": "function", "content": "a"}]}, "messages[0].role"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [{}]}]}, None),
    ({"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        "messages[0].content[0]",
    ),
    (
        {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
        "messages[0].content[0].text",
    ),
    ({"messages": [{"role": "user", "content": "a", "name": 3}]}, "messages[0].name"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"logprobs": "yes"}, "logprobs"),
]


@pytest.mark.parametrize(("fields", "field"), BAD_CHAT)
def test_bad_chat_values_name_the_clients_key(fields: dict[str, Any], field: str | None) -> None:
    body = {**CHAT, **fields}
    error = refused(body, chat=True)
    if field is None:  # the message index the error names
        index = len(body["messages"]) - 1
        assert error.field == f"messages[{index}].role"
    else:
        assert error.field == field


@pytest.mark.parametrize("body", [None, [], "prompt", 3, [{"prompt": "x"}]])
def test_a_body_that_is_not_an_object_is_refused(body: Any) -> None:
    assert refused(body).field == "body"
    assert refused(body, chat=True).field == "body"


def test_neither_prompt_nor_messages() -> None:
    assert refused({"temperature": 1}).field == "prompt"
    assert refused({"temperature": 1}, chat=True).field == "messages"


def test_deep_and_huge_values_do_not_crash() -> None:
    deep: Any = "leaf"
    for _ in range(100_000):
        deep = [deep]
    body = text_body(frobnicate=deep, steering=[{"nested": deep}], prompt="x" * 1_000_000)
    parsed = parse_request(body, chat=False)
    assert len(parsed.prompt or "") == 1_000_000 and parsed.steering[0]["nested"] is deep
    assert refused(text_body(temperature=[deep])).field == "temperature"
    assert refused(text_body(n=10**5000)).field == "n"
    assert refused(text_body(seed=float("inf"))).field == "seed"


def test_errors_from_json_text_round_trip() -> None:
    """A body as ST's JSON text, NaN included (Python's json reads it), parses or names a key."""
    text = json.dumps({**st_bodies.TABBY, "repetition_penalty": float("nan")})
    assert refused(json.loads(text)).field == "repetition_penalty"
    text = json.dumps({**st_bodies.KOBOLDCPP, "dry_base": float("-inf")})
    assert refused(json.loads(text)).field == "dry_base"
