"""Decode speed with and without steering, same model, same run.

Steered = Add at 8 layers + Ablate of one direction everywhere (every resid_pre, attn_out and
mlp_out). Rows run the full ``--new-tokens`` (EOS is ignored by using raw story prompts and
counting only decode steps while the whole batch is running). Configurations are interleaved
``--repeats`` times and the median tokens/s is reported, so background load hits both sides.

    python scripts/bench_engine.py                      # SmolLM2-135M on CPU
    python scripts/bench_engine.py --device cuda        # random Llama-3-8B-config model on GPU
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import emit, machine, table, write_section

from steer import Ablate, Add, SteeringVector
from steer.generation import Engine, GenerationRequest
from steer.models import ModelHandle, from_pretrained_model, load_model
from steer.sampling import SamplingConfig

PROMPT = "Once upon a time, in a village by the sea, there lived an old fisherman who"


def llama3_8b_random(device: str, dtype: torch.dtype) -> ModelHandle:
    from transformers import AutoModelForCausalLM, LlamaConfig

    from steer.models import load_model as _unused  # noqa: F401

    config = LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_theta=500000.0,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
    )
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tokenizer = load_model("smollm2-135m-instruct").tokenizer  # any tokenizer: ids are clipped
    return from_pretrained_model(model, tokenizer, name="random-llama-3-8b-config")


def steering(handle: ModelHandle) -> tuple:
    generator = torch.Generator().manual_seed(0)
    layers = [int(i * handle.num_layers / 8) for i in range(8)]
    vector = SteeringVector(
        per_layer={layer: torch.randn(handle.d_model, generator=generator) for layer in layers}
    )
    direction = SteeringVector.from_shared(torch.randn(handle.d_model, generator=generator))
    return (Add(vector, 0.5), Ablate(direction))


def decode_rate(handle: ModelHandle, batch: int, new_tokens: int, interventions: tuple) -> float:
    ids = tuple(handle.tokenizer(PROMPT)["input_ids"])
    engine = Engine(handle, max_batch=batch)
    for index in range(batch):
        engine.submit(
            GenerationRequest(
                prompt_ids=ids,
                interventions=interventions,
                sampling=SamplingConfig(temperature=1.0, seed=index),
                max_new_tokens=new_tokens,
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
    args = parser.parse_args()

    if args.device == "cpu":
        handle = load_model(args.model)
    else:
        handle = llama3_8b_random(args.device, torch.bfloat16)
    steered = steering(handle)
    record: dict = {"model": handle.name, "device": args.device, "machine": machine()}
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        decode_rate(handle, batch, 4, ())  # warm-up
        plain, steer = [], []
        for _ in range(args.repeats):
            plain.append(decode_rate(handle, batch, args.new_tokens, ()))
            steer.append(decode_rate(handle, batch, args.new_tokens, steered))
        plain_rate, steer_rate = statistics.median(plain), statistics.median(steer)
        record[f"batch{batch}_unsteered_tok_s"] = round(plain_rate, 2)
        record[f"batch{batch}_steered_tok_s"] = round(steer_rate, 2)
        record[f"batch{batch}_ratio"] = round(steer_rate / plain_rate, 4)
        rows.append(
            {
                "batch": batch,
                "unsteered tok/s": plain_rate,
                "steered tok/s": steer_rate,
                "ratio": steer_rate / plain_rate,
            }
        )
    emit(record)
    if not args.no_docs:
        section = f"engine-{args.device}"
        markdown = (
            f"### Engine decode speed, {handle.name} on {args.device}\n\n"
            f"Machine: {record['machine']}. Steered = Add at 8 layers + Ablate everywhere; "
            f"median of {args.repeats} interleaved runs of {args.new_tokens} tokens.\n"
            f"Command: `python scripts/bench_engine.py --device {args.device}`\n\n"
            + table(rows, ["batch", "unsteered tok/s", "steered tok/s", "ratio"])
        )
        write_section("benchmarks.md", section, markdown, title="Benchmarks")


if __name__ == "__main__":
    main()
