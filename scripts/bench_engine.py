"""Decode speed with and without steering, per backend, same model, same run.

Steered = Add at 8 layers + Ablate of one direction everywhere (every resid_pre, attn_out and
mlp_out). Rows run the full ``--new-tokens`` (EOS is ignored by using raw story prompts and
counting only decode steps while the whole batch is running). Configurations (backend x steered
or not) are interleaved ``--repeats`` times and the median tokens/s is reported, so background
load hits every side; with both backends the vllm/hf ratio comes from the same run.

    python scripts/bench_engine.py                      # SmolLM2-135M on CPU, hf engine
    python scripts/bench_engine.py --backend hf,vllm    # both backends side by side
    python scripts/bench_engine.py --device cuda        # random Llama-3-8B-config model on GPU
    python scripts/bench_engine.py --device cuda --random-config DIR   # another real config
    python scripts/bench_engine.py --backend hf,vllm --rp-samplers    # + a SillyTavern preset

``--rp-samplers`` adds an unsteered configuration sampled with a SillyTavern-style preset (DRY,
XTC, min-p, temperature last, a repetition-penalty range: :data:`RP_PRESET`), which on the vllm
backend runs in steer's sampler pipeline inside vLLM; its column is its rate against plain
sampling on the same backend.
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

from steer import Ablate, Add, SteeringVector
from steer.backends import engine_factory
from steer.generation import GenerationRequest
from steer.models import ModelHandle, from_pretrained_model, load_model
from steer.sampling import SamplingConfig

PROMPT = "Once upon a time, in a village by the sea, there lived an old fisherman who"


LLAMA3_8B = {
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "rope_theta": 500000.0,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
}


def random_model(
    device: str, dtype: torch.dtype, config_dir: str | None, tokenizer_dir: str | None
) -> ModelHandle:
    """Random weights from a real config: ``config_dir``'s config.json, else Llama-3-8B's.

    The tokenizer comes from ``tokenizer_dir`` (else ``config_dir``, else SmolLM2's); its ids
    only feed the prompt, so any tokenizer whose vocabulary fits the model's serves."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if config_dir is None:
        config = AutoConfig.for_model(**LLAMA3_8B)
        name = "random-llama-3-8b-config"
    else:
        config = AutoConfig.from_pretrained(config_dir)
        name = f"random-{Path(config_dir).name}-config"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    source = tokenizer_dir or config_dir
    if source is None:
        tokenizer = load_model("smollm2-135m-instruct").tokenizer
    else:
        tokenizer = AutoTokenizer.from_pretrained(source)
    return from_pretrained_model(model, tokenizer, name=name)


#: plain sampling: temperature 1, nothing else
PLAIN = SamplingConfig(temperature=1.0)
#: a SillyTavern-style RP preset (as tests/st_bodies.py's TabbyAPI body, without banned strings)
RP_PRESET = SamplingConfig(
    temperature=1.1,
    temperature_last=True,
    min_p=0.05,
    repetition_penalty=1.05,
    repetition_penalty_range=2048,
    dry_multiplier=0.8,
    xtc_threshold=0.1,
    xtc_probability=0.5,
)


def steering(handle: ModelHandle) -> tuple:
    generator = torch.Generator().manual_seed(0)
    layers = [int(i * handle.num_layers / 8) for i in range(8)]
    vector = SteeringVector(
        per_layer={layer: torch.randn(handle.d_model, generator=generator) for layer in layers}
    )
    direction = SteeringVector.from_shared(torch.randn(handle.d_model, generator=generator))
    return (Add(vector, 0.5), Ablate(direction))


def decode_rate(
    engine: Any,
    batch: int,
    new_tokens: int,
    interventions: tuple,
    sampling: SamplingConfig = PLAIN,
    **fields: Any,
) -> float:
    """Decode tokens/s of ``batch`` rows; ``fields``: more GenerationRequest fields."""
    handle = engine.handle
    ids = tuple(handle.tokenizer(PROMPT)["input_ids"])
    for index in range(batch):
        engine.submit(
            GenerationRequest(
                prompt_ids=ids,
                interventions=interventions,
                sampling=replace(sampling, seed=index),
                max_new_tokens=new_tokens,
                **fields,
            )
        )
    engine.step()  # prefill + first token, not timed
    tokens, seconds = 0, 0.0
    while engine.num_running == batch:
        if handle.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        events = engine.step()
        if handle.device.type == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - start
        if any(e.finish_reason for e in events):
            break  # a finishing step also removes rows; leave it out
        tokens += len(events)
    while engine.has_work:
        engine.step()
    return tokens / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-docs", action="store_true")
    parser.add_argument("--backend", default="hf", help="hf, vllm or hf,vllm (side by side)")
    parser.add_argument(
        "--random-config",
        help="a directory with a real config.json: random weights (off CPU: default Llama-3-8B)",
    )
    parser.add_argument("--tokenizer", help="with random weights: a tokenizer directory")
    parser.add_argument(
        "--rp-samplers", action="store_true", help="also time RP_PRESET sampling (unsteered)"
    )
    args = parser.parse_args()

    if args.device == "cpu" and args.random_config is None:
        handle = load_model(args.model)
    else:
        dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
        handle = random_model(args.device, dtype, args.random_config, args.tokenizer)
    batches = [int(b) for b in args.batches.split(",")]
    backends = args.backend.split(",")
    engines = {name: engine_factory(handle, name, max_batch=max(batches))() for name in backends}
    steered = steering(handle)
    load_before = os.getloadavg()[0]
    record: dict = {"model": handle.name, "device": args.device, "machine": machine()}
    rows = []
    for batch in batches:
        rates: dict[tuple[str, bool], list[float]] = {}
        for engine in engines.values():
            decode_rate(engine, batch, 4, ())  # warm-up
            decode_rate(engine, batch, 4, steered)
            if args.rp_samplers:
                decode_rate(engine, batch, 4, (), RP_PRESET)
        for _ in range(args.repeats):
            for name, engine in engines.items():
                for steer in (False, True):
                    rate = decode_rate(engine, batch, args.new_tokens, steered if steer else ())
                    rates.setdefault((name, steer), []).append(rate)
                if args.rp_samplers:
                    rate = decode_rate(engine, batch, args.new_tokens, (), RP_PRESET)
                    rates.setdefault((name, "rp"), []).append(rate)
        for name in backends:
            plain_rate = statistics.median(rates[(name, False)])
            steer_rate = statistics.median(rates[(name, True)])
            row = {
                "backend": name,
                "batch": batch,
                "unsteered tok/s": plain_rate,
                "steered tok/s": steer_rate,
                "steered/unsteered": steer_rate / plain_rate,
            }
            if "hf" in backends:
                reference = statistics.median(rates[("hf", False)])
                row["unsteered vs hf"] = plain_rate / reference
                row["steered vs hf"] = steer_rate / statistics.median(rates[("hf", True)])
            if args.rp_samplers:
                rp_rate = statistics.median(rates[(name, "rp")])
                row["RP preset tok/s"] = rp_rate
                row["RP/plain"] = rp_rate / plain_rate
                record[f"{name}_batch{batch}_rp_tok_s"] = round(rp_rate, 2)
                record[f"{name}_batch{batch}_rp_ratio"] = round(rp_rate / plain_rate, 4)
            rows.append(row)
            prefix = f"{name}_batch{batch}"
            record[f"{prefix}_unsteered_tok_s"] = round(plain_rate, 2)
            record[f"{prefix}_steered_tok_s"] = round(steer_rate, 2)
            record[f"{prefix}_ratio"] = round(steer_rate / plain_rate, 4)
    record["load_before"] = round(load_before, 2)
    record["load_after"] = round(os.getloadavg()[0], 2)
    emit(record)
    if not args.no_docs:
        _write_docs(args, handle, record, rows, backends)


def _write_docs(args: Any, handle: ModelHandle, record: dict, rows: list, backends: list) -> None:
    section = f"engine-{args.device}-{args.backend.replace(',', '-')}"
    if args.device != "cpu" or args.random_config:
        section += f"-{handle.name}"
    if args.rp_samplers:
        section += "-rp"
    columns = ["backend", "batch", "unsteered tok/s", "steered tok/s", "steered/unsteered"]
    if "hf" in backends and len(backends) > 1:
        columns += ["unsteered vs hf", "steered vs hf"]
    if args.rp_samplers:
        columns += ["RP preset tok/s", "RP/plain"]
    markdown = (
        f"### Engine decode speed, {handle.name} ({handle.dtype}) on {args.device}\n\n"
        f"Machine: {record['machine']}, transformers {transformers.__version__}; load average "
        f"{record['load_before']} before, "
        f"{record['load_after']} after. Steered = Add at 8 layers + Ablate everywhere; median "
        f"of {args.repeats} interleaved runs of {args.new_tokens} tokens per configuration, "
        "all backends in one process and one run. Goal: steered/unsteered >= 0.97.\n"
        + (
            "RP preset = temperature 1.1 last, min-p 0.05, repetition penalty 1.05 over 2048, "
            "DRY 0.8, XTC 0.1/0.5 (unsteered; on vllm, steer's pipeline inside vLLM).\n"
            if args.rp_samplers
            else ""
        )
        + f"Command: `python scripts/bench_engine.py {' '.join(sys.argv[1:])}`\n\n"
        + table(rows, columns)
    )
    write_section("benchmarks.md", section, markdown, title="Benchmarks")


if __name__ == "__main__":
    main()
