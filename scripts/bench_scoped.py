"""Decode speed of the scoped ops on each backend: SAE sliders, token gates, speaker scopes.

Beside no steering and the plain steering of ``bench_engine.py`` (Add at 8 layers + Ablate
everywhere), same model, same run: a Clamp slider on a random SAE at the middle layer, an Add
at 8 layers behind a token gate that fires on about half the tokens, and the same Add scoped
to the replying character's tokens. On the vllm backend these run as per-pass scoped ops
(steer/backends/vllm/scoped.py); on hf as the plan's masked ops. Median tokens/s of
``--repeats`` interleaved runs; ratios against no steering on the same backend.

    python scripts/bench_scoped.py                  # SmolLM2-135M on CPU, hf and vllm
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
import transformers
from sae_lens import StandardSAE, StandardSAEConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import PROMPT, decode_rate, steering
from report import emit, machine, table, write_section

from steer import Add, SteeringVector
from steer.backends import engine_factory
from steer.gates import Condition, Gated, GateScope
from steer.models import ModelHandle, load_model
from steer.sae import Clamp, SparseAutoencoder

CONFIGS = ("none", "Add + Ablate", "SAE Clamp", "token-gated Add", "speaker-scoped Add")


def configurations(handle: ModelHandle) -> dict[str, tuple[tuple, dict[str, Any]]]:
    """Each configuration's interventions and the request fields it needs."""
    generator = torch.Generator().manual_seed(1)
    layers = [int(i * handle.num_layers / 8) for i in range(8)]
    vector = SteeringVector(
        per_layer={layer: torch.randn(handle.d_model, generator=generator) for layer in layers}
    )
    middle = handle.num_layers // 2
    torch.manual_seed(0)
    config = StandardSAEConfig(d_in=handle.d_model, d_sae=4 * handle.d_model)
    sae = SparseAutoencoder(StandardSAE(config), f"blocks.{middle}.hook_resid_post")
    condition = Condition(f"blocks.{layers[1]}.hook_resid_pre", vector, 0.0)
    late = tuple(f"blocks.{layer}.hook_resid_post" for layer in layers[1:])
    prompt_tokens = len(handle.tokenizer(PROMPT)["input_ids"])
    speakers = {"speakers": ("Narrator",) * prompt_tokens, "speaker": "Vex"}
    return {
        "none": ((), {}),
        "Add + Ablate": (steering(handle), {}),
        "SAE Clamp": ((Clamp(sae, 7, 5.0),), {}),
        "token-gated Add": (
            (Gated(condition, Add(vector, 0.5, hooks=late), scope=GateScope.TOKEN),),
            {},
        ),
        "speaker-scoped Add": ((Add(vector, 0.5, speaker="Vex"),), speakers),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--backend", default="hf,vllm")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args()

    handle = load_model(args.model)
    backends = args.backend.split(",")
    engines = {name: engine_factory(handle, name, max_batch=args.batch)() for name in backends}
    configs = configurations(handle)
    load_before = os.getloadavg()[0]
    for engine in engines.values():  # warm-up
        for interventions, fields in configs.values():
            decode_rate(engine, args.batch, 4, interventions, **fields)
    rates: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.repeats):
        for name, engine in engines.items():
            for config, (interventions, fields) in configs.items():
                rate = decode_rate(engine, args.batch, args.new_tokens, interventions, **fields)
                rates.setdefault((name, config), []).append(rate)
    record: dict = {"model": handle.name, "machine": machine(), "batch": args.batch}
    rows = []
    for name in backends:
        base = statistics.median(rates[(name, "none")])
        for config in CONFIGS:
            rate = statistics.median(rates[(name, config)])
            rows.append(
                {"backend": name, "steering": config, "tok/s": rate, "vs none": rate / base}
            )
            key = f"{name}_{config.replace(' + ', '_').replace(' ', '_').replace('-', '_')}"
            record[f"{key}_tok_s"] = round(rate, 2)
            record[f"{key}_vs_none"] = round(rate / base, 4)
    record["load_before"] = round(load_before, 2)
    record["load_after"] = round(os.getloadavg()[0], 2)
    emit(record)
    if not args.no_docs:
        markdown = (
            f"### Decode speed of scoped ops, {handle.name} ({handle.dtype}) on CPU\n\n"
            f"Machine: {record['machine']}, transformers {transformers.__version__}; load "
            f"average {record['load_before']} before, {record['load_after']} after. Batch "
            f"{args.batch}, {args.new_tokens} tokens, median of {args.repeats} interleaved runs. "
            "SAE Clamp: a random SAE with 4 x d_model features at the middle layer; token-gated "
            "Add: Add at 7 layers behind a gate at the second; speaker-scoped Add: Add on the "
            "replying character's tokens (all generated tokens).\n"
            f"Command: `python scripts/bench_scoped.py {' '.join(sys.argv[1:])}`\n\n"
            + table(rows, ["backend", "steering", "tok/s", "vs none"])
        )
        write_section("benchmarks.md", "scoped-cost", markdown, title="Benchmarks")


if __name__ == "__main__":
    main()
