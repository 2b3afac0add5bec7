"""``steer demo``: default vs steered generation on a local model, same seed, side by side.

``--vector DIR[=S1,S2,...]`` shows any vector artifact (``steer directions compute`` makes
them) at one or more strengths; with no strengths, at the ends of the range its sweep suggests
(``suggested_strengths`` in ``steer.json``). Strength 0 is the default column. Without
``--vector`` the steering vector is a contrast direction computed on the spot from a built-in
``--theme``: the mean residual stream of prompts about it minus that of neutral prompts, added
at one layer.
"""

from __future__ import annotations

import argparse
import shutil
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from steer import Add, SteeringVector
from steer.activations import forward
from steer.backends import engine_factory
from steer.cli.serve import add_backend_arguments
from steer.errors import InvalidArgumentError
from steer.generation import GenerationRequest, Message
from steer.interventions import Intervention
from steer.models import ModelHandle
from steer.offline import DEFAULT_MODEL
from steer.sampling import SamplingConfig
from steer.text import encode_chat

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
#: narrowest column before the completions are printed one under the other instead
MIN_COLUMN = 28


@dataclass(frozen=True)
class VectorFlag:
    """One ``--vector DIR[=S1,S2]``: an artifact directory and the strengths asked for."""

    directory: Path
    strengths: tuple[float, ...] = ()


def vector_flag(text: str) -> VectorFlag:
    directory, _, strengths = text.partition("=")
    try:
        values = tuple(float(s) for s in strengths.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected DIR or DIR=STRENGTH[,STRENGTH...], e.g. out/cheerful=-0.2,0.2; got {text!r}"
        ) from None
    return VectorFlag(Path(directory), values)


@dataclass(frozen=True)
class Column:
    label: str
    interventions: tuple[Intervention, ...] = ()


def theme_vector(handle: ModelHandle, theme: str, layer: int) -> SteeringVector:
    hook = f"blocks.{layer}.hook_resid_pre"

    def mean(prompts: list[str]) -> torch.Tensor:
        acts = forward(handle, [encode_chat(handle, p) for p in prompts], hooks=[hook])
        values = acts.activations[hook]
        assert isinstance(values, torch.Tensor)
        return values.mean(0)

    return SteeringVector(per_layer={layer: mean(THEMES[theme]) - mean(NEUTRAL)}, name=theme)


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    add = parser.add_argument
    add("--model", help=f"offline name or path (default: the vector's model, else {DEFAULT_MODEL})")
    add("--prompt", default="Tell me a short story about your weekend.", help="the user message")
    add(
        "--vector",
        type=vector_flag,
        action="append",
        metavar="DIR[=S1,S2]",
        help="a vector artifact and strengths, e.g. out/cheerful=-0.2,0.2 (repeatable; no "
        "strengths: the ends of its suggested range)",
    )
    add("--theme", choices=sorted(THEMES), help="without --vector: a built-in theme (ocean)")
    add("--layer", type=int, help="--theme only: the layer to add at (12)")
    add("--strength", type=float, help="--theme only: the strength (12)")
    add("--max-new-tokens", type=int, default=60, help="tokens generated per column")
    add("--temperature", type=float, default=0.7, help="sampling temperature (0 = greedy)")
    add("--seed", type=int, default=0, help="sampling seed, the same for every column")
    add("--width", type=int, help="output width (default: the terminal's)")
    add_backend_arguments(parser)
    return parser


def main(argv: list[str], *, prog: str = "steer demo", command: str = "demo") -> int:
    args = _parser(prog).parse_args(argv)
    if args.vector and (args.theme or args.layer is not None or args.strength is not None):
        raise InvalidArgumentError(
            "--theme, --layer and --strength make a built-in vector; use them without --vector",
            field="vector",
        )
    from steer.artifacts import load_vector
    from steer.models import load_model

    flags = args.vector or []
    artifacts = [load_vector(flag.directory) for flag in flags]  # before the model: fail fast
    model = args.model or _model_of(artifacts)
    print(f"loading {model}", flush=True)
    handle = load_model(model)
    if flags:
        columns = vector_columns(handle, flags)
    else:
        columns = [theme_column(handle, args.theme or "ocean", args.layer, args.strength)]
    texts = generate(handle, args, [Column("default"), *columns])
    width = args.width or shutil.get_terminal_size((120, 24)).columns
    print(f"model {handle.name} | prompt: {args.prompt!r} | seed {args.seed}")
    print(render([c.label for c in [Column("default"), *columns]], texts, width))
    return 0


def _model_of(artifacts: Sequence[Any]) -> str:
    if not artifacts:
        return DEFAULT_MODEL
    from steer.cli.directions import artifact_model

    return artifact_model(artifacts[0].metadata)


def vector_columns(handle: ModelHandle, flags: Sequence[VectorFlag]) -> list[Column]:
    """One column per (artifact, non-zero strength), each added at the artifact's hooks."""
    from steer.artifacts import load_vector
    from steer.directions.api import interventions_for

    columns = []
    for flag in flags:
        artifact = load_vector(flag.directory, handle=handle)
        strengths = flag.strengths or tuple(artifact.metadata.get("suggested_strengths") or ())
        if not strengths:
            strengths = (1.0,)
        name = artifact.metadata.get("name") or flag.directory.name
        for strength in strengths:
            if strength != 0:  # strength 0 is the default column
                steered = interventions_for(artifact, strength=strength)
                columns.append(Column(f"{name} {strength:+g}", tuple(steered)))
    if not columns:
        raise InvalidArgumentError("every strength given is 0 (the default column)", field="vector")
    return columns


def theme_column(
    handle: ModelHandle, theme: str, layer: int | None, strength: float | None
) -> Column:
    layer = 12 if layer is None else layer
    strength = 12.0 if strength is None else strength
    vector = theme_vector(handle, theme, layer)
    added = Add(vector, strength, (f"blocks.{layer}.hook_resid_pre",))
    return Column(f"{theme} x {strength:g} at layer {layer}", (added,))


def generate(handle: ModelHandle, args: argparse.Namespace, columns: Sequence[Column]) -> list[str]:
    """Every column's completion in one batch, same seed, with a progress bar."""
    from tqdm.auto import tqdm

    sampling = SamplingConfig(temperature=args.temperature, min_p=0.05, seed=args.seed)
    if args.temperature == 0:
        sampling = SamplingConfig.greedy_config()
    options = None
    if args.backend == "vllm":
        from steer.backends.vllm import VllmOptions

        options = VllmOptions(args.tensor_parallel_size, kv_cache_gib=args.kv_cache_gib)
    engine = engine_factory(handle, args.backend, max_batch=len(columns), vllm_options=options)()
    ids = [
        engine.submit(
            GenerationRequest(
                messages=(Message("user", args.prompt),),
                sampling=sampling,
                max_new_tokens=args.max_new_tokens,
                interventions=column.interventions,
            )
        )
        for column in columns
    ]
    texts: dict[str, list[str]] = {i: [] for i in ids}
    total = args.max_new_tokens * len(columns)
    with tqdm(total=total, desc="generating", unit="tok", leave=False) as bar:
        while engine.has_work:
            for event in engine.step():
                if event.error is not None:
                    raise event.error
                texts[event.request_id].append(event.text)
                bar.update(len(event.token_ids))
    return ["".join(texts[i]) for i in ids]


def render(labels: Sequence[str], texts: Sequence[str], width: int) -> str:
    """Columns side by side if each gets MIN_COLUMN characters, else one under the other."""
    count = len(labels)
    column = (width - 3 * (count - 1)) // count
    if column < MIN_COLUMN:
        pairs = zip(labels, texts, strict=True)
        return "\n\n".join(f"== {label}\n{textwrap.fill(text, width)}" for label, text in pairs)
    wrapped = [textwrap.wrap(text, column) or [""] for text in texts]
    lines = [" | ".join(f"{label[:column]:<{column}}" for label in labels)]
    lines.append("-+-".join("-" * column for _ in labels))
    for index in range(max(len(w) for w in wrapped)):
        cells = [w[index] if index < len(w) else "" for w in wrapped]
        lines.append(" | ".join(f"{cell:<{column}}" for cell in cells).rstrip())
    return "\n".join(lines)
