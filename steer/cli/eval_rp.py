"""``steer eval rp``: play the project's RP scenarios and print one JSON line of RP metrics.

    steer eval rp --model smollm2-135m-instruct --preset shorirp --json
    steer eval rp --direction artifacts/moralizing            # ablate a direction
    steer eval rp --direction artifacts/warm:4@Lysa           # add it at strength 4, Lysa only
    steer eval rp --edits out/gated-moralizing/gated.toml     # an edit recipe, gates included

``--direction SPEC`` (repeatable) is ``PATH`` (ablate), ``PATH:STRENGTH`` (activation addition
at the artifact's hooks), either followed by ``@SPEAKER`` to act only on that character's tokens.
``--edits RECIPE.toml`` adds an edit recipe's run-time edits (the schema ``steer bake`` reads;
gated edits decide per request, i.e. per reply).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from typing import Any

from steer.errors import InvalidArgumentError


def parser(prog: str) -> argparse.ArgumentParser:
    from steer.rp.evaluate import SCENARIOS
    from steer.rp.formats import FORMATS
    from steer.rp.presets import PRESETS

    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model name or path")
    parser.add_argument(
        "--direction",
        action="append",
        default=[],
        metavar="PATH[:STRENGTH][@SPEAKER]",
        help="ablate (or with :STRENGTH add) a direction artifact; @SPEAKER scopes it",
    )
    parser.add_argument("--edits", help="an edit recipe (TOML) applied at run time")
    parser.add_argument(
        "--preset", default="default", help=f"sampler preset ({', '.join(PRESETS)}) or a .toml"
    )
    parser.add_argument("--format", default="chat_template", choices=sorted(FORMATS))
    parser.add_argument("--length", help="length hint for formats that have them (e.g. medium)")
    parser.add_argument("--scenarios", default=str(SCENARIOS), help="scenario JSONL file")
    parser.add_argument("--max-scenarios", type=int, default=0, help="play only the first N")
    parser.add_argument(
        "--skip-tags",
        default="",
        help="leave out scenarios with any of these tags (comma-separated, e.g. villain,crime)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="replies per scenario")
    parser.add_argument("--max-new-tokens", type=int, default=80)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--json", action="store_true", help="print one JSON line (the default)")
    return parser


def parse_direction(spec: str) -> tuple[str, float | None, str | None]:
    """``PATH[:STRENGTH][@SPEAKER]`` -> (path, strength or None for ablation, speaker)."""
    path, speaker = spec, None
    if "@" in spec:
        path, speaker = spec.rsplit("@", 1)
        if not speaker:
            raise InvalidArgumentError(f"empty speaker in {spec!r}", field="direction")
    strength = None
    head, _, tail = path.rpartition(":")
    if head:
        try:
            strength = float(tail)
        except ValueError:
            raise InvalidArgumentError(
                f"{tail!r} is not a strength in {spec!r}", field="direction"
            ) from None
        path = head
    return path, strength, speaker


def _interventions(handle: Any, specs: list[str], edits: str | None = None) -> tuple[Any, ...]:
    from steer.artifacts import load_vector
    from steer.cli.eval_refusal import recipe_interventions

    interventions: list[Any] = []
    for spec in specs:
        path, strength, speaker = parse_direction(spec)
        artifact = load_vector(path, handle=handle)
        if strength is None:
            interventions.append(artifact.ablation(speaker=speaker))
        else:
            interventions.append(artifact.addition(strength, speaker=speaker))
    if edits:
        interventions.extend(recipe_interventions(edits, handle))
    return tuple(interventions)


def main(argv: list[str], *, prog: str = "steer eval rp", command: str = "rp") -> int:
    from steer.models import load_model
    from steer.rp.evaluate import EvalSettings, evaluate_rp, load_scenarios
    from steer.rp.presets import load_preset

    args = parser(prog).parse_args(argv)
    if args.rounds < 1 or args.max_new_tokens < 1 or args.max_scenarios < 0:
        raise InvalidArgumentError("rounds and max-new-tokens must be >= 1", field="rounds")
    for spec in args.direction:
        parse_direction(spec)
    sampling = load_preset(args.preset)
    scenarios = load_scenarios(args.scenarios)
    skipped = {tag.strip() for tag in args.skip_tags.split(",") if tag.strip()}
    scenarios = [s for s in scenarios if not skipped.intersection(s.tags)]
    if not scenarios:
        raise InvalidArgumentError("--skip-tags leaves no scenario", field="skip_tags")
    if args.max_scenarios:
        scenarios = scenarios[: args.max_scenarios]
    start = time.perf_counter()
    handle = load_model(args.model, dtype=args.dtype)
    settings = EvalSettings(
        format=args.format,
        sampling=replace(sampling, seed=None),
        interventions=_interventions(handle, args.direction, args.edits),
        max_new_tokens=args.max_new_tokens,
        rounds=args.rounds,
        length=args.length,
        seed=args.seed,
    )
    report = evaluate_rp(handle, settings, scenarios)
    report.update(
        preset=args.preset,
        directions=args.direction,
        edits=args.edits,
        scenarios=[s.id for s in scenarios],
        seconds=round(time.perf_counter() - start, 1),
    )
    print(json.dumps(report))
    return 0
