"""Train an SAE on a loaded model's activations with SAELens' trainer, then measure it.

Steps: ``collect`` (activations at the hook point, read through steer's own forward pass, so
the SAE sees exactly the values sliders will edit) -> ``train`` (SAELens ``SAETrainer`` over a
shuffled in-memory buffer; SAELens folds any activation scaling into the weights) -> ``save``
(SAELens ``save_inference_model`` + a ``steer_sae.json`` sidecar) -> ``evaluate`` (L0,
explained variance, and the cross-entropy change when the reconstruction replaces the
activations).

Why not SAELens' ``LanguageModelSAETrainingRunner``: it loads the model itself by name and, for
``AutoModelForCausalLM``, wraps it in ``HookedProxyLM``, which registers forward hooks on the
model's submodules that are never removed and names points by HF module path
(``model.layers.3``), not by the TransformerLens names steer uses; and it streams a Hugging Face
dataset. Steer's models are loaded once (GGUF included) and shared with the server, so the
activations are read here and handed to the same trainer the runner uses.

The first token of every text is left out of training and metrics: it is the attention sink,
with a norm tens of times the others, and an SAE spends its capacity on it otherwise.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from sae_lens.config import SAETrainerConfig
from sae_lens.registry import get_sae_training_class
from tqdm.auto import tqdm

from steer.activations import forward
from steer.artifacts import model_identity
from steer.errors import InvalidArgumentError
from steer.hooks import HookPoint, HookResolver
from steer.interventions import Intervention, Op, RowFunction
from steer.limits import finite
from steer.models import ModelHandle
from steer.sae.loading import SIDECAR, SIDECAR_FORMAT, SparseAutoencoder, load_sae
from steer.text import encode_text

#: architecture -> name of its sparsity coefficient in SAELens' training config (None: uses k)
ARCHITECTURES: dict[str, str | None] = {
    "topk": None,
    "batchtopk": None,
    "standard": "l1_coefficient",
    "gated": "l1_coefficient",
    "jumprelu": "l0_coefficient",
}


@dataclass(frozen=True)
class TrainingConfig:
    """How to train one SAE. Every field is checked in ``__post_init__``."""

    #: TransformerLens hook name, e.g. blocks.12.hook_resid_post
    hook: str
    #: training samples (tokens) drawn from the activation buffer; the buffer repeats as epochs
    tokens: int = 200_000
    #: distinct tokens of activations collected from the corpus (the buffer size)
    buffer_tokens: int = 50_000
    d_sae: int = 2048
    architecture: str = "topk"
    #: active features per token (topk / batchtopk)
    k: int = 32
    #: l1 (standard, gated) or l0 (jumprelu) coefficient
    sparsity_coefficient: float = 5.0
    learning_rate: float = 4e-4
    batch_size: int = 1024
    #: longest text, in tokens (longer texts are cut)
    context_size: int = 256
    #: fraction of the corpus texts held out for the metrics
    eval_fraction: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise InvalidArgumentError(
                f"unknown architecture {self.architecture!r}; choose one of "
                f"{', '.join(ARCHITECTURES)}",
                field="architecture",
            )
        for name in ("tokens", "buffer_tokens", "d_sae", "k", "batch_size", "context_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidArgumentError(f"must be a positive integer, got {value!r}", field=name)
        if self.k > self.d_sae:
            raise InvalidArgumentError(f"k={self.k} exceeds d_sae={self.d_sae}", field="k")
        for name in ("sparsity_coefficient", "learning_rate"):
            value = getattr(self, name)
            if finite(value, name, numbers_only=True) <= 0:
                raise InvalidArgumentError(f"must be a positive number, got {value!r}", field=name)
        if not 0.0 <= self.eval_fraction < 1.0:
            raise InvalidArgumentError("must be in [0, 1)", field="eval_fraction")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], where: str = "config") -> TrainingConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise InvalidArgumentError(
                f"{where}: unknown setting(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(known))}",
                field=unknown[0],
            )
        return cls(**dict(values))


# ---------------------------------------------------------------------------------------------
# collect


def tokenize(handle: ModelHandle, texts: Sequence[str], context_size: int) -> list[list[int]]:
    """Token ids of each text, cut to ``context_size``; texts of one token are dropped."""
    ids = []
    for text in texts:
        tokens = encode_text(handle.tokenizer, text)[:context_size]
        if len(tokens) > 1:
            ids.append(tokens)
    return ids


def collect_activations(
    handle: ModelHandle,
    prompts: Sequence[Sequence[int]],
    hook: str,
    *,
    max_tokens: int | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> torch.Tensor:
    """Activations at ``hook`` of every token but the first: (tokens, d_model) float32."""
    handle.resolver.parse(hook, field="hook")
    chunks: list[torch.Tensor] = []
    total = 0
    step = batch_size * 4
    bar = tqdm(total=max_tokens, desc="activations", disable=not progress, unit="tok")
    for start in range(0, len(prompts), step):
        result = forward(
            handle,
            prompts[start : start + step],
            hooks=[hook],
            positions="all",
            batch_size=batch_size,
        )
        for row in result.activations[hook]:
            chunks.append(row[1:])
            total += row.shape[0] - 1
            bar.update(row.shape[0] - 1)
        if max_tokens is not None and total >= max_tokens:
            break
    bar.close()
    if not chunks:
        raise InvalidArgumentError("the corpus yielded no activations", field="corpus")
    activations = torch.cat(chunks)
    return activations[:max_tokens] if max_tokens is not None else activations


def _batches(activations: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless shuffled mini-batches over ``activations`` (a new permutation each epoch)."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(activations.shape[0], generator=generator)
        for start in range(0, order.numel() - batch_size + 1, batch_size):
            yield activations[order[start : start + batch_size]]


# ---------------------------------------------------------------------------------------------
# train


def train(
    activations: torch.Tensor, config: TrainingConfig, *, model_name: str = ""
) -> SparseAutoencoder:
    """Train an SAE with SAELens' ``SAETrainer`` on (tokens, d_in) activations."""
    if activations.ndim != 2 or activations.shape[0] < config.batch_size:
        raise InvalidArgumentError(
            f"need at least batch_size={config.batch_size} activation rows, got "
            f"{tuple(activations.shape)}",
            field="tokens",
        )
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(config.seed)
    training_class, config_class = get_sae_training_class(config.architecture)
    extra: dict[str, Any] = {}
    coefficient = ARCHITECTURES[config.architecture]
    if coefficient is None:
        extra["k"] = config.k
    else:
        extra[coefficient] = config.sparsity_coefficient
    # Scale inputs to norm sqrt(d_in) on average (SAELens' "expected_average_only_in"), done
    # here rather than by the trainer so the decoder bias can start at the scaled data mean; the
    # factor is folded into the weights afterwards, as SAELens does.
    d_in = int(activations.shape[1])
    sample = activations[: min(len(activations), 20_000)]
    scaling_factor = math.sqrt(d_in) / float(sample.norm(dim=-1).mean())
    scaled = activations * scaling_factor
    sae_config = config_class(d_in=d_in, d_sae=config.d_sae, **extra)
    sae_config.metadata.hook_name = config.hook
    sae_config.metadata.model_name = model_name
    sae_config.metadata.model_class_name = "AutoModelForCausalLM"
    sae = training_class(sae_config)
    with torch.no_grad():
        sae.b_dec.copy_(sample.mean(0) * scaling_factor)
    steps = max(1, config.tokens // config.batch_size)
    trainer_config = SAETrainerConfig(
        total_training_samples=steps * config.batch_size,
        train_batch_size_samples=config.batch_size,
        lr=config.learning_rate,
        lr_end=config.learning_rate / 10,
        lr_scheduler_name="cosineannealing",
        lr_warm_up_steps=min(100, steps // 10),
        lr_decay_steps=steps // 5,
        dead_feature_window=max(50, steps // 4),
        feature_sampling_window=max(100, steps // 2),
        device="cpu",
    )
    batches = _batches(scaled, config.batch_size, config.seed)
    trained = SAETrainer(cfg=trainer_config, sae=sae, data_provider=batches).fit()
    trained.fold_activation_norm_scaling_factor(scaling_factor)
    return _to_inference(trained, config.hook)


def _to_inference(trained: Any, hook: str) -> SparseAutoencoder:
    """The inference SAE SAELens would save (``save_inference_model`` + ``load_from_disk``)."""
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        trained.save_inference_model(directory)
        return load_sae(directory, hook=hook)


# ---------------------------------------------------------------------------------------------
# save


def save(
    sae: SparseAutoencoder,
    path: str | Path,
    *,
    handle: ModelHandle | None = None,
    **metadata: Any,
) -> Path:
    """Write the SAE in SAELens' format plus the ``steer_sae.json`` sidecar."""
    from steer import __version__

    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    sae.sae.save_model(str(directory))
    sidecar = {
        "format": SIDECAR_FORMAT,
        "format_version": 1,
        "hook_name": sae.hook_name,
        "architecture": sae.architecture,
        "d_model": sae.d_in,
        "d_sae": sae.num_features,
        "model": model_identity(handle) if handle is not None else None,
        "steer_version": __version__,
        **metadata,
    }
    temporary = directory / (SIDECAR + ".tmp")
    temporary.write_text(json.dumps(sidecar, indent=2, sort_keys=True, default=str))
    os.replace(temporary, directory / SIDECAR)
    return directory


# ---------------------------------------------------------------------------------------------
# evaluate


@dataclass(frozen=True, eq=False)
class Splice(Intervention):
    """Replace the activations at the SAE's hook point with its reconstruction (no error term).

    The first token of each row is left alone (see the module docstring); rows must therefore be
    unpadded, i.e. run one prompt per batch.
    """

    sae: SparseAutoencoder
    zero: bool = False

    def lower(self, resolver: HookResolver, d_model: int) -> list[tuple[HookPoint, Op]]:
        point = resolver.parse(self.sae.hook_name, field="sae.hook_name")
        sae, zero = self.sae, self.zero

        def splice(x_row: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            out = x_row.clone()
            rest = x_row[1:]
            replaced = torch.zeros_like(rest) if zero else sae.decode(sae.encode(rest))
            out[1:] = torch.where(mask[1:, None], replaced.to(x_row.dtype), rest)
            return out

        return [(point, RowFunction(splice))]


@dataclass(frozen=True)
class Metrics:
    #: mean number of active features per token
    l0: float
    #: 1 - sum |x - x_hat|^2 / sum |x - mean x|^2
    explained_variance: float
    #: next-token cross-entropy (nats/token) of the clean model
    ce_clean: float
    #: cross-entropy with the reconstruction in place of the activations
    ce_spliced: float
    #: cross-entropy with the activations zeroed (the scale the change is judged against)
    ce_zero: float
    #: fraction of features that never fired on the evaluation tokens
    dead_fraction: float
    tokens: int

    @property
    def ce_change(self) -> float:
        return self.ce_spliced - self.ce_clean

    @property
    def ce_recovered(self) -> float:
        """1 - (spliced - clean) / (zero - clean): 1 means the SAE loses nothing."""
        span = self.ce_zero - self.ce_clean
        return 1.0 - self.ce_change / span if span > 0 else float("nan")

    def to_dict(self) -> dict[str, float]:
        values = asdict(self)
        values["ce_change"] = self.ce_change
        values["ce_recovered"] = self.ce_recovered
        return values


def _cross_entropy(handle: ModelHandle, prompts: Sequence[Sequence[int]], splice: Any) -> float:
    interventions = () if splice is None else (splice,)
    result = forward(handle, prompts, interventions=interventions, logits="all", batch_size=1)
    assert isinstance(result.logits, list)
    total, count = 0.0, 0
    for ids, logits in zip(prompts, result.logits, strict=True):
        targets = torch.tensor(ids[2:])
        # positions 1.. are where the splice acts; their logits predict tokens 2..
        loss = torch.nn.functional.cross_entropy(logits[1:-1], targets, reduction="sum")
        total += float(loss)
        count += targets.numel()
    return total / max(count, 1)


def evaluate(
    handle: ModelHandle, sae: SparseAutoencoder, prompts: Sequence[Sequence[int]]
) -> Metrics:
    """L0, explained variance and cross-entropy change on held-out ``prompts``."""
    prompts = [p for p in prompts if len(p) > 2]
    if not prompts:
        raise InvalidArgumentError("no evaluation text longer than two tokens", field="corpus")
    activations = collect_activations(handle, prompts, sae.hook_name)
    features = sae.encode(activations)
    reconstruction = sae.decode(features)
    residual = (activations - reconstruction).pow(2).sum()
    variance = (activations - activations.mean(0)).pow(2).sum()
    fired = (features > 0).any(0)
    return Metrics(
        l0=float((features > 0).float().sum(-1).mean()),
        explained_variance=float(1.0 - residual / variance),
        ce_clean=_cross_entropy(handle, prompts, None),
        ce_spliced=_cross_entropy(handle, prompts, Splice(sae)),
        ce_zero=_cross_entropy(handle, prompts, Splice(sae, zero=True)),
        dead_fraction=float(1.0 - fired.float().mean()),
        tokens=int(activations.shape[0]),
    )


@dataclass
class TrainingRun:
    sae: SparseAutoencoder
    metrics: Metrics
    timings: dict[str, float] = field(default_factory=dict)


def train_on_texts(
    handle: ModelHandle,
    texts: Sequence[str],
    config: TrainingConfig,
    *,
    progress: bool = False,
) -> TrainingRun:
    """collect -> train -> evaluate on a held-out split of ``texts``."""
    prompts = tokenize(handle, texts, config.context_size)
    return train_on_ids(handle, prompts, config, progress=progress)


def train_on_ids(
    handle: ModelHandle,
    prompts: Sequence[Sequence[int]],
    config: TrainingConfig,
    *,
    progress: bool = False,
) -> TrainingRun:
    """:func:`train_on_texts` on token ids already made (a chat prompt as a gate reads it, an
    RP scene): a shuffled ``eval_fraction`` of them held out for the metrics."""
    import random
    import time

    timings: dict[str, float] = {}
    handle.resolver.parse(config.hook, field="hook")
    prompts = [list(p)[: config.context_size] for p in prompts]
    random.Random(config.seed).shuffle(prompts)
    held_out = int(len(prompts) * config.eval_fraction)
    eval_prompts, train_prompts = prompts[:held_out], prompts[held_out:]
    if not train_prompts:
        raise InvalidArgumentError("the corpus has no training text", field="corpus")
    started = time.perf_counter()
    activations = collect_activations(
        handle, train_prompts, config.hook, max_tokens=config.buffer_tokens, progress=progress
    )
    timings["collect_s"] = time.perf_counter() - started
    started = time.perf_counter()
    sae = train(activations, config, model_name=handle.name)
    timings["train_s"] = time.perf_counter() - started
    started = time.perf_counter()
    metrics = evaluate(
        handle, sae, eval_prompts or train_prompts[: max(1, len(train_prompts) // 10)]
    )
    timings["evaluate_s"] = time.perf_counter() - started
    timings["buffer_tokens"] = float(activations.shape[0])
    return TrainingRun(sae, metrics, timings)
