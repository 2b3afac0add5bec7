"""``steer demo``: default vs steered generation on a local model, same seed, side by side.

The steering vector is a contrast direction computed on the spot: the mean residual stream of
prompts about one theme minus that of neutral prompts, added at one layer.
"""

from __future__ import annotations

import argparse
import textwrap

import torch

from steer import Add, SteeringVector
from steer.activations import encode_chat, forward
from steer.generation import Engine, GenerationRequest, Message
from steer.models import ModelHandle, load_model
from steer.offline import DEFAULT_MODEL
from steer.sampling import SamplingConfig

THEMES = {
    "ocean": [
        "Tell me about the ocean.",
        "Describe waves crashing on the beach.",
        "What lives in the deep sea?",
        "Write about sailing across the sea.",
        "Why is the ocean salty?",
        "Describe a coral reef under the sea.",
    ],
    "gloom": [
        "Everything is hopeless and grey. Describe your day.",
        "Write about a funeral on a cold, rainy afternoon.",
        "Describe the loneliness of an empty house.",
        "Tell me why nothing ever works out.",
        "Write about loss and regret.",
        "Describe a dying garden in winter.",
    ],
}
NEUTRAL = [
    "Tell me about the city.",
    "Describe traffic in the morning.",
    "What lives in the desert?",
    "Write about driving across the country.",
    "Why is the sky blue?",
    "Describe a busy office.",
]


def theme_vector(handle: ModelHandle, theme: str, layer: int) -> SteeringVector:
    hook = f"blocks.{layer}.hook_resid_pre"

    def mean(prompts: list[str]) -> torch.Tensor:
        acts = forward(handle, [encode_chat(handle, p) for p in prompts], hooks=[hook])
        values = acts.activations[hook]
        assert isinstance(values, torch.Tensor)
        return values.mean(0)

    return SteeringVector(per_layer={layer: mean(THEMES[theme]) - mean(NEUTRAL)}, name=theme)


def main(argv: list[str], *, prog: str = "steer demo", command: str = "demo") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="offline name or path")
    parser.add_argument("--prompt", default="Tell me a short story about your weekend.")
    parser.add_argument("--theme", choices=sorted(THEMES), default="ocean")
    parser.add_argument("--layer", type=int, default=12)
    parser.add_argument("--strength", type=float, default=12.0)
    parser.add_argument("--max-new-tokens", type=int, default=60)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    handle = load_model(args.model)
    vector = theme_vector(handle, args.theme, args.layer)
    sampling = SamplingConfig(temperature=args.temperature, min_p=0.05, seed=args.seed)
    base = GenerationRequest(
        messages=(Message("user", args.prompt),),
        sampling=sampling,
        max_new_tokens=args.max_new_tokens,
    )
    steered = GenerationRequest(
        messages=base.messages,
        sampling=sampling,
        max_new_tokens=args.max_new_tokens,
        interventions=(Add(vector, args.strength, (f"blocks.{args.layer}.hook_resid_pre",)),),
    )
    default_result, steered_result = Engine(handle).run([base, steered])
    width = 60
    print(f"model {handle.name} | prompt: {args.prompt!r} | seed {args.seed}")
    print(f"{'default':<{width}} | {args.theme} x {args.strength} at layer {args.layer}")
    print("-" * width + "-+-" + "-" * width)
    left = textwrap.wrap(default_result.text, width) or [""]
    right = textwrap.wrap(steered_result.text, width) or [""]
    for index in range(max(len(left), len(right))):
        a = left[index] if index < len(left) else ""
        b = right[index] if index < len(right) else ""
        print(f"{a:<{width}} | {b}")
    return 0
