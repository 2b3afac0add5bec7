"""Reading SAE features: per-token activations, top features, search, contrast, feature info.

Every function reads activations at the SAE's hook point with :func:`steer.activations.forward`
(the same path generation and sliders use) and encodes them with the SAE. A text's score for a
feature is its largest activation over the text's tokens, the first token excluded (the
attention sink, whose activation is off the scale of every other token's).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from steer.activations import forward
from steer.errors import InvalidArgumentError
from steer.generation import Engine, GenerationRequest, Message
from steer.models import ModelHandle
from steer.sae.loading import SparseAutoencoder
from steer.sampling import SamplingConfig
from steer.text import encode_text


@dataclass(frozen=True)
class TextFeatures:
    """One text: its tokens and their feature activations (tokens, num_features)."""

    text: str
    token_ids: tuple[int, ...]
    tokens: tuple[str, ...]
    activations: torch.Tensor

    def top_per_token(self, k: int = 5) -> list[list[tuple[int, float]]]:
        """The ``k`` strongest active features of each token, as (feature, activation)."""
        values, indices = self.activations.topk(min(k, self.activations.shape[1]), dim=-1)
        return [
            [(int(i), float(v)) for v, i in zip(row_values, row_indices, strict=True) if v > 0]
            for row_values, row_indices in zip(values, indices, strict=True)
        ]

    def scores(self) -> torch.Tensor:
        """Per feature, the largest activation over the tokens after the first: (num_features,)."""
        body = self.activations[1:] if self.activations.shape[0] > 1 else self.activations
        return body.max(0).values


def _check_texts(texts: Sequence[str], field_name: str) -> list[str]:
    if isinstance(texts, str) or not texts:
        raise InvalidArgumentError("expected a non-empty list of texts", field=field_name)
    checked = []
    for index, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise InvalidArgumentError(f"text {index} is empty", field=field_name)
        checked.append(text)
    return checked


def encode_texts(
    handle: ModelHandle,
    sae: SparseAutoencoder,
    texts: Sequence[str],
    *,
    field_name: str = "texts",
    batch_size: int = 16,
) -> list[TextFeatures]:
    """Feature activations of every token of every text."""
    texts = _check_texts(texts, field_name)
    prompts = [encode_text(handle.tokenizer, text) for text in texts]
    for index, ids in enumerate(prompts):
        if not ids:
            raise InvalidArgumentError(f"text {index} has no tokens", field=field_name)
    result = forward(handle, prompts, hooks=[sae.hook_name], positions="all", batch_size=batch_size)
    out = []
    for text, ids, activations in zip(
        texts, prompts, result.activations[sae.hook_name], strict=True
    ):
        tokens = tuple(handle.tokenizer.convert_ids_to_tokens(ids))
        out.append(TextFeatures(text, tuple(ids), tokens, sae.encode(activations)))
    return out


def text_scores(
    handle: ModelHandle, sae: SparseAutoencoder, texts: Sequence[str], field_name: str = "texts"
) -> torch.Tensor:
    """(texts, num_features): each text's largest activation per feature."""
    encoded = encode_texts(handle, sae, texts, field_name=field_name)
    return torch.stack([item.scores() for item in encoded])


@dataclass(frozen=True)
class RankedFeature:
    feature: int
    score: float
    #: mean text score in the (first) set
    mean_activation: float
    #: fraction of texts of the (first) set in which the feature fires
    frequency: float
    #: contrast only: mean text score in the second set, and AUROC of the score for set A vs B
    mean_activation_b: float | None = None
    auroc: float | None = None


def top_features(
    handle: ModelHandle, sae: SparseAutoencoder, text: str, k: int = 10
) -> list[RankedFeature]:
    """The features that fire most strongly anywhere in ``text`` (first token excluded)."""
    scores = text_scores(handle, sae, [text], "text")[0]
    values, indices = scores.topk(min(k, scores.numel()))
    return [
        RankedFeature(int(i), float(v), float(v), 1.0)
        for v, i in zip(values, indices, strict=True)
        if v > 0
    ]


def search(
    handle: ModelHandle, sae: SparseAutoencoder, examples: Sequence[str], k: int = 10
) -> list[RankedFeature]:
    """Features shared by the example texts: mean text score times the fraction that fire."""
    scores = text_scores(handle, sae, examples, "examples")
    mean = scores.mean(0)
    frequency = (scores > 0).float().mean(0)
    ranking = mean * frequency
    values, indices = ranking.topk(min(k, ranking.numel()))
    return [
        RankedFeature(int(i), float(v), float(mean[i]), float(frequency[i]))
        for v, i in zip(values, indices, strict=True)
        if v > 0
    ]


def auroc(positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """Per column, P(score of a positive > score of a negative), ties counting half.

    positive: (P, F), negative: (N, F) -> (F,)
    """
    greater = (positive[:, None, :] > negative[None, :, :]).float().mean((0, 1))
    ties = (positive[:, None, :] == negative[None, :, :]).float().mean((0, 1))
    return greater + 0.5 * ties


def contrast(
    handle: ModelHandle,
    sae: SparseAutoencoder,
    set_a: Sequence[str],
    set_b: Sequence[str],
    k: int = 10,
) -> list[RankedFeature]:
    """Features whose text scores differ most between the two sets of texts, strongest first."""
    scores_a = text_scores(handle, sae, set_a, "set_a")
    scores_b = text_scores(handle, sae, set_b, "set_b")
    return rank_contrast(scores_a, scores_b, k)


def rank_contrast(
    scores_a: torch.Tensor, scores_b: torch.Tensor, k: int = 10
) -> list[RankedFeature]:
    """Rank features by how their text scores differ: (A texts, F) vs (B texts, F).

    The score is a standardised mean difference (mean A - mean B over the pooled standard
    deviation, plus a small floor so features that never fire in one set do not divide by
    zero). Positive: fires more on set A; negative: more on set B. Both directions are ranked
    together by magnitude.
    """
    mean_a, mean_b = scores_a.mean(0), scores_b.mean(0)
    pooled = torch.sqrt((scores_a.var(0, unbiased=False) + scores_b.var(0, unbiased=False)) / 2)
    floor = 0.1 * torch.cat([scores_a, scores_b]).abs().mean().clamp(min=1e-6)
    difference = (mean_a - mean_b) / (pooled + floor)
    areas = auroc(scores_a, scores_b)
    frequency = (scores_a > 0).float().mean(0)
    order = difference.abs().argsort(descending=True)[:k]
    return [
        RankedFeature(
            feature=int(i),
            score=float(difference[i]),
            mean_activation=float(mean_a[i]),
            frequency=float(frequency[i]),
            mean_activation_b=float(mean_b[i]),
            auroc=float(areas[i]),
        )
        for i in order
        if difference[i] != 0
    ]


def scores_of(sae: SparseAutoencoder, activations: Sequence[torch.Tensor]) -> torch.Tensor:
    """Text scores from activations already read at the SAE's hook: list of (tokens, d_in)
    -> (texts, num_features)."""
    body = [x[1:] if x.shape[0] > 1 else x for x in activations]
    return torch.stack([sae.encode(x).max(0).values for x in body])


@dataclass(frozen=True)
class Snippet:
    text: str
    activation: float
    #: the token where the feature fires most, and the snippet with it in [[ ]]
    token: str
    marked: str


@dataclass(frozen=True)
class FeatureInfo:
    feature: int
    hook_name: str
    decoder_norm: float
    #: tokens whose logits the decoder direction raises / lowers most (direct unembedding)
    promoted: tuple[tuple[str, float], ...]
    suppressed: tuple[tuple[str, float], ...]
    top_snippets: tuple[Snippet, ...] = ()
    #: fraction of the corpus' tokens (first excluded) on which it fires
    density: float | None = None
    label: str | None = None


def _snippet(handle: ModelHandle, item: TextFeatures, feature: int, width: int) -> Snippet:
    column = item.activations[:, feature]
    column = column.clone()
    if column.numel() > 1:
        column[0] = float("-inf")
    position = int(column.argmax())
    start, stop = max(0, position - width), min(len(item.token_ids), position + 4)
    decode = handle.tokenizer.decode
    before = decode(list(item.token_ids[start:position]))
    token = decode([item.token_ids[position]])
    after = decode(list(item.token_ids[position + 1 : stop]))
    return Snippet(
        text=before + token + after,
        activation=float(item.activations[position, feature]),
        token=token,
        marked=f"{before}[[{token}]]{after}",
    )


def feature_info(
    handle: ModelHandle,
    sae: SparseAutoencoder,
    feature: int,
    *,
    corpus: Sequence[str] = (),
    num_tokens: int = 10,
    num_snippets: int = 5,
    context_tokens: int = 12,
) -> FeatureInfo:
    """Decoder norm, promoted/suppressed tokens, and (with a corpus) top snippets and density.

    Promoted tokens come from the unembedding applied to the decoder direction (the final
    norm's gain is ignored: a direct-logit view, not a full forward pass).
    """
    sae.check_feature(feature)
    direction = sae.direction(feature)
    unembedding = handle.model.get_output_embeddings().weight.detach().float().cpu()
    logits = unembedding @ direction
    count = min(num_tokens, logits.numel())
    top, bottom = logits.topk(count), (-logits).topk(count)
    names = handle.tokenizer.convert_ids_to_tokens
    promoted = tuple(
        (str(name), float(value))
        for name, value in zip(names(top.indices.tolist()), top.values, strict=True)
    )
    suppressed = tuple(
        (str(name), -float(value))
        for name, value in zip(names(bottom.indices.tolist()), bottom.values, strict=True)
    )
    snippets: list[Snippet] = []
    density = None
    if corpus:
        encoded = encode_texts(handle, sae, corpus, field_name="corpus")
        firing = sum(int((item.activations[1:, feature] > 0).sum()) for item in encoded)
        tokens = sum(max(item.activations.shape[0] - 1, 0) for item in encoded)
        density = firing / max(tokens, 1)
        ranked = sorted(encoded, key=lambda item: -float(item.scores()[feature]))
        snippets = [
            _snippet(handle, item, feature, context_tokens)
            for item in ranked[:num_snippets]
            if float(item.scores()[feature]) > 0
        ]
    return FeatureInfo(
        feature=feature,
        hook_name=sae.hook_name,
        decoder_norm=float(direction.norm()),
        promoted=promoted,
        suppressed=suppressed,
        top_snippets=tuple(snippets),
        density=density,
    )


LABEL_PROMPT = (
    "Below are text snippets. In each, one token is marked with [[ ]]; a hidden feature of a "
    "language model fires on it. In at most six words, name what the marked tokens have in "
    "common. Reply with the name only.\n\n{snippets}"
)


def auto_label(
    labeller: ModelHandle, info: FeatureInfo, *, max_new_tokens: int = 16, seed: int = 0
) -> str:
    """A short label for a feature from its top snippets, written by a chat model (greedy)."""
    if not info.top_snippets:
        raise InvalidArgumentError(
            "the feature has no top snippets; pass a corpus to feature_info first",
            field="corpus",
        )
    if labeller.chat_template is None:
        raise InvalidArgumentError("the labelling model needs a chat template", field="labeller")
    listing = "\n".join(f"- {snippet.marked}" for snippet in info.top_snippets)
    request = GenerationRequest(
        messages=(Message("user", LABEL_PROMPT.format(snippets=listing)),),
        sampling=SamplingConfig(temperature=0.0, seed=seed),
        max_new_tokens=max_new_tokens,
        stop=("\n",),
    )
    (result,) = Engine(labeller, max_batch=1).run([request])
    return result.text.strip().strip('"').strip()
