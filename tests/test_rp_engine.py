"""RP features inside the engine: per-row samplers, EOS control, banned strings, speaker scope."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from steer.generation import Engine, GenerationRequest
from steer.interventions import Add, Phase
from steer.models import ModelHandle
from steer.plan import build_plan
from steer.rp import Character, Scene, Turn, get_format, tokenize
from steer.rp.evaluate import EvalSettings, evaluate_rp, load_scenarios
from steer.rp.metrics import (
    Transcript,
    cross_context,
    distinct_n,
    impersonates,
    introduced_names,
    is_moralizing,
    recurring_names,
    repeated_share,
    rp_metrics,
)
from steer.runtime import attach, compose, recorder
from steer.sampling import SamplingConfig
from steer.vectors import SteeringVector

PROMPT = "The knight drew her sword; the dragon"

ROW_CONFIGS = (
    SamplingConfig(seed=1),
    SamplingConfig(seed=2, temperature=2.4, min_p=0.4, temperature_last=True),
    SamplingConfig(seed=3, mirostat_mode=2, mirostat_tau=3.0, mirostat_eta=0.0175),
    SamplingConfig(seed=4, mirostat_mode=1, mirostat_tau=4.0, mirostat_eta=0.1),
    SamplingConfig(seed=5, tfs=0.9, temperature=0.5, repetition_penalty=1.15),
    SamplingConfig(seed=6, dry_multiplier=0.8, xtc_probability=0.5, xtc_threshold=0.05),
    SamplingConfig(seed=7, typical_p=0.8, top_a=0.1, presence_penalty=0.4, frequency_penalty=0.2),
    SamplingConfig(temperature=0.0, repetition_penalty=1.3, logit_bias=((5, 3.0),)),
)


def _requests(configs: tuple[SamplingConfig, ...], **extra: object) -> list[GenerationRequest]:
    return [
        GenerationRequest(prompt=PROMPT, sampling=c, max_new_tokens=12, **extra)  # type: ignore[arg-type]
        for c in configs
    ]


def test_per_row_samplers_in_one_batch_equal_the_rows_alone(tiny_llama: ModelHandle) -> None:
    batched = Engine(tiny_llama).run(_requests(ROW_CONFIGS))
    for config, together in zip(ROW_CONFIGS, batched, strict=True):
        alone = Engine(tiny_llama).run(_requests((config,)))[0]
        assert together.token_ids == alone.token_ids, config


def test_mirostat_state_is_per_row(tiny_llama: ModelHandle) -> None:
    config = SamplingConfig(seed=11, mirostat_mode=2, mirostat_tau=2.0, mirostat_eta=0.5)
    results = Engine(tiny_llama).run(_requests((config, config, replace(config, seed=12))))
    # two rows with the same seed and request stay identical although they share a batch
    assert results[0].token_ids == results[1].token_ids


def test_min_tokens_and_ban_eos(tiny_llama: ModelHandle) -> None:
    eos = min(tiny_llama.eos_token_ids)
    eager = SamplingConfig(temperature=0.0, logit_bias=((eos, 100.0),))
    engine = Engine(tiny_llama)
    assert engine.run(_requests((eager,)))[0].usage.completion_tokens == 1
    held = engine.run(_requests((replace(eager, min_tokens=5),)))[0]
    assert held.usage.completion_tokens == 6 and held.finish_reason == "stop"
    assert eos not in held.token_ids[:5]
    banned = engine.run(_requests((replace(eager, ban_eos=True),)))[0]
    assert banned.finish_reason == "length" and eos not in banned.token_ids


def test_banned_strings_never_appear(tiny_llama: ModelHandle) -> None:
    engine = Engine(tiny_llama)
    for config in (SamplingConfig(temperature=0.0), SamplingConfig(seed=5)):
        free = engine.run([GenerationRequest(prompt=PROMPT, sampling=config, max_new_tokens=24)])
        text = free[0].text
        # a plain-ASCII piece of the free output (the tiny model also emits partial UTF-8)
        starts = [i for i in range(len(text) - 2) if text[i : i + 3].isascii()]
        assert starts
        phrase = text[starts[len(starts) // 2] :][:3]
        constrained = replace(config, banned_strings=(phrase,))
        result = engine.run(
            [GenerationRequest(prompt=PROMPT, sampling=constrained, max_new_tokens=24)]
        )[0]
        assert phrase not in result.text
        assert result.text != text


# -- speaker-scoped steering ------------------------------------------------------------------

SCENE = Scene(
    characters=(Character("Lysa", "An elven bard."), Character("Garrick", "A dwarven drummer.")),
    user=Character("Rosa", "The innkeeper."),
    turns=(
        Turn("Rosa", "One stage, two of you. Convince me."),
        Turn("Garrick", "Drums, Rosa! Nobody dances to a lute!"),
        Turn("Lysa", "Nobody dances to noise either, Garrick."),
    ),
)


def _hidden(
    handle: ModelHandle,
    ids: tuple[int, ...],
    speakers: tuple[str | None, ...],
    interventions: tuple[Add, ...],
    *hooks: str,
) -> list[torch.Tensor]:
    """Hidden states (tokens, d_model) at ``hooks`` for one prompt, with the engine's plan."""
    plan = build_plan([interventions], handle.resolver, handle.d_model, handle.dtype, handle.device)
    stores: list[list[torch.Tensor]] = [[] for _ in hooks]
    functions = dict(plan.hooks(Phase.PROMPT, [speakers]))
    for hook, store in zip(hooks, stores, strict=True):
        point = handle.resolver.parse(hook)
        record = recorder(store, lambda x: x)
        functions[point] = compose(functions[point], record) if point in functions else record
    with torch.inference_mode(), attach(handle.resolver, functions):
        handle.model(input_ids=torch.tensor([ids]), use_cache=False)
    return [store[0][0] for store in stores]


def _slider(handle: ModelHandle, layers: range, scale: float, speaker: str, phase: Phase) -> Add:
    torch.manual_seed(0)
    direction = torch.randn(handle.d_model)
    unit = direction / direction.norm()
    vector = SteeringVector(per_layer={layer: scale * unit for layer in layers})
    return Add(vector, 1.0, phase=phase, speaker=speaker)


@pytest.mark.parametrize("format_name", ["chatml", "shorirp"])
def test_speaker_slider_changes_only_that_speakers_tokens(
    tiny_llama: ModelHandle, format_name: str
) -> None:
    rendered = get_format(format_name).render(SCENE, "Lysa")
    tokens = tokenize(tiny_llama.tokenizer, rendered)
    slider = _slider(tiny_llama, range(1, 2), 5.0, "Garrick", Phase.ALL)
    hook = "blocks.1.hook_resid_post"
    (base,) = _hidden(tiny_llama, tokens.ids, tokens.speakers, (), hook)
    (steered,) = _hidden(tiny_llama, tokens.ids, tokens.speakers, (slider,), hook)
    changed = (steered - base).abs().amax(dim=-1) > 0
    garrick = torch.tensor([s == "Garrick" for s in tokens.speakers])
    assert garrick.any()
    assert torch.equal(changed, garrick)
    # a slider scoped to nobody in the scene is an exact no-op
    ghost = _slider(tiny_llama, range(1, 2), 5.0, "Nobody", Phase.ALL)
    assert torch.equal(_hidden(tiny_llama, tokens.ids, tokens.speakers, (ghost,), hook)[0], base)


@pytest.mark.slow
def test_speaker_slider_on_smollm2(smollm2: ModelHandle) -> None:
    """Real model: hidden states move only at the speaker's tokens (and causally after them at
    deeper layers), and generation changes only when that speaker is the one replying."""
    rendered = get_format("chat_template").render(SCENE, "Lysa", tokenizer=smollm2.tokenizer)
    tokens = tokenize(smollm2.tokenizer, rendered)
    garrick = [i for i, s in enumerate(tokens.speakers) if s == "Garrick"]
    assert garrick and all(s in (None, "Garrick", "Lysa", "Rosa") for s in tokens.speakers)
    slider = _slider(smollm2, range(12, 13), 40.0, "Garrick", Phase.ALL)
    hooks = ("blocks.12.hook_resid_post", "blocks.20.hook_resid_post")
    base, deeper_base = _hidden(smollm2, tokens.ids, tokens.speakers, (), *hooks)
    steered, deeper = _hidden(smollm2, tokens.ids, tokens.speakers, (slider,), *hooks)
    changed = ((steered - base).abs().amax(dim=-1) > 0).nonzero().flatten().tolist()
    assert changed == garrick
    before = garrick[0]
    assert torch.equal(deeper[:before], deeper_base[:before])
    assert not torch.equal(deeper[before:], deeper_base[before:])

    generated_only = _slider(smollm2, range(4, 24), 30.0, "Garrick", Phase.GENERATED)
    greedy = SamplingConfig(temperature=0.0)

    def reply(speaker: str, interventions: tuple[Add, ...]) -> GenerationRequest:
        prompt = get_format("chat_template").render(SCENE, speaker, tokenizer=smollm2.tokenizer)
        ids = tokenize(smollm2.tokenizer, prompt)
        return GenerationRequest(
            prompt_ids=ids.ids,
            speakers=ids.speakers,
            speaker=speaker,
            interventions=interventions,
            sampling=greedy,
            max_new_tokens=10,
        )

    results = Engine(smollm2).run(
        [
            reply("Lysa", ()),
            reply("Lysa", (generated_only,)),
            reply("Garrick", ()),
            reply("Garrick", (generated_only,)),
        ]
    )
    assert results[0].token_ids == results[1].token_ids  # Lysa speaks: Garrick's slider is idle
    assert results[2].token_ids != results[3].token_ids  # Garrick speaks: his slider acts


def test_eval_rp_is_seeded_and_counts_replies(tiny_llama: ModelHandle) -> None:
    scenarios = load_scenarios()[:2]
    settings = EvalSettings(sampling=SamplingConfig(min_p=0.1), max_new_tokens=8, rounds=2, seed=1)
    first = evaluate_rp(tiny_llama, settings, scenarios)
    assert first["replies"] == 4
    assert 0 < first["distinct_1"] <= 1
    # seeded: the same settings give the same metrics, another seed other replies
    assert evaluate_rp(tiny_llama, settings, scenarios) == first
    other = evaluate_rp(tiny_llama, replace(settings, seed=2), scenarios)
    assert (
        other["distinct_1"] != first["distinct_1"]
        or other["words_per_reply"] != first["words_per_reply"]
    )


# -- metrics on hand-written text ---------------------------------------------------------------


def test_metrics_on_hand_written_replies() -> None:
    assert repeated_share([("a",), ("b",), ("a",), ("a",)]) == 0.5
    assert repeated_share([("a",)], seen=[("a",)]) == 1.0
    assert distinct_n(["a b a b"], 1) == 0.5
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)
    assert is_moralizing("I'm sorry, but I can't help with that.")
    assert not is_moralizing('"Get out of my lighthouse," she growled.')
    assert impersonates("She laughed.\nTomas: Wait!", "Tomas")
    assert not impersonates("Tomas waited.", "Tomas")
    assert introduced_names("They met Elara by the river.", "a river scene") == {"Elara"}
    shiver = "a shiver ran down my spine as the door opened"
    transcripts = [
        Transcript(str(i), (f"{shiver} {i}", f"word{i} other{i} text{i} here{i}"), "", "U")
        for i in range(5)
    ]
    # 11 words: 8 four-grams, the 7 without the number are shared by all five scenarios
    assert cross_context(transcripts) == pytest.approx(5 * 7 / (5 * 8 + 5 * 1))
    named = [Transcript(str(i), (f"Then came Elara, tired {i}.",), "", "U") for i in range(3)]
    assert recurring_names(named) == [("Elara", 3)]
    metrics = rp_metrics(transcripts, slop_phrases=("shiver ran down",))
    assert metrics["slop_reply_rate"] == 0.5
    assert metrics["repetition_across_turns"] == 0.0
    assert metrics["impersonation_rate"] == 0.0
