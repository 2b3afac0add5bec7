"""A prompt or reply gate's cost per request on each backend, beside the edit always on and none.

The edit always on, behind a gate that stays quiet, and behind one that fires (prompt scope and
reply scope), beside no edit; same model, same run.

A batch of ``--batch`` requests, each with its own RP-length prompt (no prefix shared between
requests or runs), is submitted at once and run to the end; the figures are the batch's wall
time and the mean time to each request's first token, medians of ``--repeats`` interleaved
runs. The edit: the refusal-style ablation of one direction at every layer (ops before the
condition's hook, so a fired gate costs the hf engine a second prompt pass), gated at
``blocks.{L/2}.hook_resid_pre``. On the vllm backend every gated request first runs a gate probe
(the prompt and one token); a quiet gate's request then takes the probe's prompt KV from
vLLM's prefix cache, a fired one computes its prompt again under the edit.

    python scripts/bench_gated.py                       # SmolLM2-135M on CPU, hf and vllm
    python scripts/bench_gated.py --backend hf          # one backend
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import emit, machine, table, write_section

from steer import Ablate, SteeringVector
from steer.backends import engine_factory
from steer.gates import Condition, Gated, GateScope
from steer.generation import GenerationRequest
from steer.interventions import Intervention
from steer.models import ModelHandle, load_model
from steer.sampling import SamplingConfig

SCENE = (
    "The tavern was loud with sailors back from the long voyage, and the fire threw shadows "
    "across the low beams while the innkeeper counted coins behind the bar. "
)
CONFIGS = (
    "no edit",
    "always on",
    "gated, quiet",
    "gated, fires",
    "reply gate, quiet",
    "reply gate, fires",
)


def configurations(handle: ModelHandle) -> dict[str, tuple[Intervention, ...]]:
    generator = torch.Generator().manual_seed(0)
    direction = SteeringVector.from_shared(torch.randn(handle.d_model, generator=generator))
    hook = f"blocks.{handle.num_layers // 2}.hook_resid_pre"

    def gated(threshold: float, scope: GateScope = GateScope.PROMPT) -> tuple[Intervention, ...]:
        condition = Condition(hook, direction, threshold)
        return (Gated(condition, Ablate(direction), scope=scope),)

    return {
        "no edit": (),
        "always on": (Ablate(direction),),
        "gated, quiet": gated(1e9),
        "gated, fires": gated(-1e9),
        "reply gate, quiet": gated(1e9, GateScope.REPLY),
        "reply gate, fires": gated(-1e9, GateScope.REPLY),
    }


def run_batch(
    engine: Any, prompts: list[tuple[int, ...]], interventions: tuple, new_tokens: int
) -> tuple[float, float]:
    """(wall seconds to the batch's end, mean seconds to a request's first token)."""
    start = time.perf_counter()
    ids = [
        engine.submit(
            GenerationRequest(
                prompt_ids=prompt,
                interventions=interventions,
                sampling=replace(SamplingConfig.greedy_config(), ban_eos=True),
                max_new_tokens=new_tokens,
            )
        )
        for prompt in prompts
    ]
    first: dict[str, float] = {}
    while engine.has_work:
        for event in engine.step():
            if event.token_ids and event.request_id not in first:
                first[event.request_id] = time.perf_counter() - start
    wall = time.perf_counter() - start
    return wall, statistics.mean(first[i] for i in ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--backend", default="hf,vllm")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=384)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args()

    handle = load_model(args.model)
    backends = args.backend.split(",")
    engines = {name: engine_factory(handle, name, max_batch=args.batch)() for name in backends}
    configs = configurations(handle)
    scene = list(handle.tokenizer(SCENE * 40)["input_ids"])
    serial = iter(range(10**9))

    def prompts() -> list[tuple[int, ...]]:  # each its own first tokens: no shared prefix
        return [
            tuple(handle.tokenizer(f"Scene {next(serial)}.")["input_ids"])
            + tuple(scene[: args.prompt_tokens])
            for _ in range(args.batch)
        ]

    load_before = os.getloadavg()[0]
    for engine in engines.values():  # warm-up
        for interventions in configs.values():
            run_batch(engine, prompts()[:2], interventions, 2)
    walls: dict[tuple[str, str], list[float]] = {}
    firsts: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.repeats):
        for name, engine in engines.items():
            for config, interventions in configs.items():
                wall, first = run_batch(engine, prompts(), interventions, args.new_tokens)
                walls.setdefault((name, config), []).append(wall)
                firsts.setdefault((name, config), []).append(first)
    record: dict = {"model": handle.name, "machine": machine(), "batch": args.batch}
    rows = []
    for name in backends:
        base = statistics.median(walls[(name, "always on")])
        for config in CONFIGS:
            wall = statistics.median(walls[(name, config)])
            first = statistics.median(firsts[(name, config)])
            rows.append(
                {
                    "backend": name,
                    "edit": config,
                    "batch wall s": wall,
                    "first token s": first,
                    "wall vs always on": wall / base,
                }
            )
            key = f"{name}_{config.replace(', ', '_').replace(' ', '_')}"
            record[f"{key}_wall_s"] = round(wall, 3)
            record[f"{key}_first_token_s"] = round(first, 3)
            record[f"{key}_vs_always_on"] = round(wall / base, 4)
    record["load_before"] = round(load_before, 2)
    record["load_after"] = round(os.getloadavg()[0], 2)
    emit(record)
    if not args.no_docs:
        _write_docs(args, handle, record, rows)


def _write_docs(args: Any, handle: ModelHandle, record: dict, rows: list) -> None:
    columns = ["backend", "edit", "batch wall s", "first token s", "wall vs always on"]
    markdown = (
        f"### A prompt gate's cost per request, {handle.name} ({handle.dtype}) on CPU\n\n"
        f"Machine: {record['machine']}, transformers {transformers.__version__}; load average "
        f"{record['load_before']} before, {record['load_after']} after. {args.batch} requests "
        f"submitted at once, each its own {args.prompt_tokens}-token prompt, "
        f"{args.new_tokens} greedy tokens; median of {args.repeats} interleaved runs. The edit: "
        "one direction ablated at every layer; gated at the middle layer's resid_pre (prompt "
        "scope; reply scope: its default window of 4 reply tokens), with a threshold nothing "
        "passes (quiet) or everything passes (fires).\n"
        f"Command: `python scripts/bench_gated.py {' '.join(sys.argv[1:])}`\n\n"
        + table(rows, columns)
    )
    write_section("benchmarks.md", "gated-cost", markdown, title="Benchmarks")


if __name__ == "__main__":
    main()
