"""The RP evaluation: play every scenario for a few turns, then score the replies.

Steps: ``load_scenarios`` → for each round, ``render`` every scene in a prompt format and
``generate`` all replies in one batch (each row with its own seed) → append the reply and the
scripted user follow-up → ``rp_metrics`` over the transcripts.

Stop strings are the format's own, without its "user's name" stops: a reply in which the model
starts writing the user's lines is kept whole for the impersonation rate, and only the part before
the impersonation goes into the conversation history.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from steer.errors import InvalidArgumentError, NotFoundError
from steer.generation import Engine, GenerationRequest
from steer.interventions import Intervention
from steer.models import ModelHandle
from steer.rp.formats import PromptTokens, Rendered, get_format, tokenize
from steer.rp.metrics import Transcript, load_phrases, rp_metrics
from steer.rp.scene import Scene, Turn
from steer.sampling import SamplingConfig

DATA = Path(__file__).resolve().parents[2] / "recipes" / "data"
SCENARIOS = DATA / "rp_scenarios.jsonl"
SLOP_PHRASES = DATA / "slop_phrases.txt"


@dataclass(frozen=True)
class Scenario:
    """A scene to play, with the user's scripted follow-up lines."""

    id: str
    kind: str
    scene: Scene
    followups: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()


def load_scenarios(path: str | Path = SCENARIOS) -> list[Scenario]:
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"no scenario file at {path}", field="scenarios")
    scenarios = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):  # a comment describes the file
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as error:
            raise InvalidArgumentError(f"{path}:{number}: {error}", field="scenarios") from None
        scenarios.append(
            Scenario(
                id=str(data.get("id", number)),
                kind=str(data.get("kind", "plain")),
                scene=Scene.from_dict(data),
                followups=tuple(data.get("followups", ())),
                tags=tuple(str(tag) for tag in data.get("tags", ())),
            )
        )
    return scenarios


@dataclass(frozen=True)
class EvalSettings:
    format: str = "chat_template"
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    interventions: tuple[Intervention, ...] = ()
    max_new_tokens: int = 80
    #: replies per scenario (1 + scripted follow-ups used)
    rounds: int = 3
    length: str | None = None
    seed: int = 0


def _next_speaker(scene: Scene, round_index: int) -> str:
    return scene.names[round_index % len(scene.names)]


def _cut_impersonation(text: str, user: str) -> str:
    lines = text.splitlines()
    for index, line in enumerate(lines):
        if line.strip().startswith(f"{user}:"):
            return "\n".join(lines[:index]).strip()
    return text.strip()


def reply_prompt(
    handle: ModelHandle,
    scene: Scene,
    speaker: str | None = None,
    *,
    format: str = "chat_template",
    length: str | None = None,
) -> tuple[Rendered, PromptTokens]:
    """The prompt for ``speaker``'s (default: the first character's) next reply in ``scene``,
    rendered in ``format`` and tokenized, as :func:`play` sends it: it ends with the speaker's
    name, so a prompt-scope gate reads that name's last token."""
    speaker = scene.names[0] if speaker is None else speaker
    rendered = get_format(format).render(scene, speaker, length=length, tokenizer=handle.tokenizer)
    return rendered, tokenize(handle.tokenizer, rendered)


def play(
    handle: ModelHandle, scenarios: Sequence[Scenario], settings: EvalSettings
) -> list[Transcript]:
    """Play every scenario for ``settings.rounds`` replies; returns their transcripts."""
    scenes = [s.scene for s in scenarios]
    replies: list[list[str]] = [[] for _ in scenarios]
    first_prompts: list[str] = [""] * len(scenarios)
    engine = Engine(handle, max_batch=max(1, len(scenarios)))
    for round_index in tqdm(range(settings.rounds), desc="rp rounds", leave=False):
        requests = []
        for index, scene in enumerate(scenes):
            speaker = _next_speaker(scene, round_index)
            rendered, tokens = reply_prompt(
                handle, scene, speaker, format=settings.format, length=settings.length
            )
            if round_index == 0:
                first_prompts[index] = rendered.text
            stop = tuple(s for s in rendered.stop if s not in rendered.impersonation_stop)
            seed = settings.seed * 1_000_003 + index * 101 + round_index
            requests.append(
                GenerationRequest(
                    prompt_ids=tokens.ids,
                    speakers=tokens.speakers,
                    speaker=speaker,
                    interventions=settings.interventions,
                    sampling=replace(settings.sampling, seed=seed),
                    max_new_tokens=settings.max_new_tokens,
                    stop=stop,
                    request_id=f"{scenarios[index].id}-{round_index}",
                )
            )
        for index, result in enumerate(engine.run(requests)):
            replies[index].append(result.text)
            scenes[index] = after_reply(scenarios[index], scenes[index], round_index, result.text)
    return [
        Transcript(s.id, tuple(r), prompt, s.scene.user.name)
        for s, r, prompt in zip(scenarios, replies, first_prompts, strict=True)
    ]


def after_reply(scenario: Scenario, scene: Scene, round_index: int, reply: str) -> Scene:
    """``scene`` (``scenario``'s, before round ``round_index``) after that round's ``reply``,
    cut where the model starts writing the user's lines, and the user's scripted follow-up for
    the round, if the scenario has one."""
    kept = _cut_impersonation(reply, scene.user.name)
    scene = scene.with_turn(Turn(_next_speaker(scene, round_index), kept))
    if round_index < len(scenario.followups):
        scene = scene.with_turn(Turn(scene.user.name, scenario.followups[round_index]))
    return scene


def played_turns(scenario: Scenario, replies: Sequence[str]) -> list[tuple[Scene, str]]:
    """The scene and speaker each of ``replies`` (one transcript's, in order) was asked for in
    :func:`play`."""
    scene, turns = scenario.scene, []
    for round_index, reply in enumerate(replies):
        turns.append((scene, _next_speaker(scene, round_index)))
        scene = after_reply(scenario, scene, round_index, reply)
    return turns


def evaluate_rp(
    handle: ModelHandle,
    settings: EvalSettings,
    scenarios: Sequence[Scenario] | None = None,
    slop_phrases: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Play the scenarios and return the metrics (one flat JSON-able dict)."""
    scenarios = list(scenarios) if scenarios is not None else load_scenarios()
    if not scenarios:
        raise InvalidArgumentError("no scenarios to play", field="scenarios")
    phrases = load_phrases(SLOP_PHRASES) if slop_phrases is None else slop_phrases
    transcripts = play(handle, scenarios, settings)
    metrics = rp_metrics(transcripts, phrases)
    return {"model": handle.name, "format": settings.format, **metrics}
