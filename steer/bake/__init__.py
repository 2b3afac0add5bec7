"""Baking: write recipe edits into new weights (model, LoRA adapter) or a control vector.

Layers: :mod:`steer.bake.edits` (pure torch: interventions -> rank-1 weight deltas),
:mod:`steer.bake.tensor_io` (streaming safetensors), :mod:`steer.bake.hashing` (background
hashing), :mod:`steer.bake.source` (what is read),
:mod:`steer.bake.model` (bake a model or adapter: its steps), :mod:`steer.bake.resolve` (recipe
-> weight plan, the directions' model check), :mod:`steer.bake.writer` (the shard-by-shard
full-model writer), :mod:`steer.bake.lora` (PEFT LoRA export), :mod:`steer.bake.names`
(tensor names), :mod:`steer.bake.options`, :mod:`steer.bake.threads` (thread tuning),
:mod:`steer.bake.control_vector` (llama.cpp GGUF), :mod:`steer.bake.provenance`
(record, verify, atomic rename), :mod:`steer.bake.api` (the entry point), and
:mod:`steer.bake.memory` (the same deltas applied to a loaded model in memory).
"""

from steer.bake.api import OUTPUT_FORMATS, bake
from steer.bake.control_vector import read_control_vector, write_control_vector
from steer.bake.options import BakeCancelled
from steer.bake.provenance import verify

__all__ = [
    "OUTPUT_FORMATS",
    "BakeCancelled",
    "bake",
    "read_control_vector",
    "verify",
    "write_control_vector",
]
