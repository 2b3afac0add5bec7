"""Features service messages: a loaded SAE's :class:`SaeInfo`, ranked features, per-token
activations and one feature's description; a request's texts checked against the limits."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING

from steer.errors import InvalidArgumentError, ResourceExhaustedError
from steer.limits import check_text_size
from steer.models import ModelHandle
from steer.proto.v1 import features_pb2
from steer.service.saes import LoadedSae
from steer.service.settings import ServerSettings
from steer.text import encode_text

if TYPE_CHECKING:
    from steer.sae.features import FeatureInfo, RankedFeature, TextFeatures

DEFAULT_FEATURES = 10


def sae_info(entry: LoadedSae) -> features_pb2.SaeInfo:
    sae = entry.sae
    return features_pb2.SaeInfo(
        sae_id=entry.sae_id,
        model=entry.model_id,
        path=entry.path,
        hook_name=sae.hook_name,
        architecture=sae.architecture,
        d_in=sae.d_in,
        num_features=sae.num_features,
        sliders=sae.affine_decoder,
        metadata_json=json.dumps(dict(sae.metadata), sort_keys=True, default=str),
    )


def texts(
    values: Sequence[str], handle: ModelHandle, settings: ServerSettings, field: str
) -> list[str]:
    """A request's texts within the server's limits: how many, and tokens per text.

    Emptiness is the library's to check (it names the same field)."""
    if len(values) > settings.max_feature_texts:
        raise InvalidArgumentError(
            f"{len(values)} texts; at most {settings.max_feature_texts}", field=field
        )
    for index, text in enumerate(values):
        check_text_size(len(text), settings.max_prompt_tokens, f"{field}[{index}]")
        count = len(encode_text(handle.tokenizer, text))
        if count > settings.max_prompt_tokens:
            raise ResourceExhaustedError(
                f"{count} tokens; this server accepts at most {settings.max_prompt_tokens}",
                field=f"{field}[{index}]",
            )
    return list(values)


def ranked_feature(ranked: RankedFeature) -> features_pb2.RankedFeature:
    message = features_pb2.RankedFeature(
        feature=ranked.feature,
        score=ranked.score,
        mean_activation=ranked.mean_activation,
        frequency=ranked.frequency,
    )
    if ranked.mean_activation_b is not None:
        message.mean_activation_b = ranked.mean_activation_b
    if ranked.auroc is not None:
        message.auroc = ranked.auroc
    return message


def ranked_features(ranking: Sequence[RankedFeature]) -> features_pb2.RankedFeatures:
    return features_pb2.RankedFeatures(features=[ranked_feature(r) for r in ranking])


def activations_response(
    top: Sequence[RankedFeature], encoded: TextFeatures | None, k: int
) -> features_pb2.ActivationsResponse:
    response = features_pb2.ActivationsResponse(top=[ranked_feature(r) for r in top])
    if encoded is not None:
        for token_id, token, features in zip(
            encoded.token_ids, encoded.tokens, encoded.top_per_token(k), strict=True
        ):
            response.tokens.add(
                token_id=token_id,
                token=token,
                features=[
                    features_pb2.FeatureActivation(feature=feature, activation=activation)
                    for feature, activation in features
                ],
            )
    return response


def feature_info(info: FeatureInfo) -> features_pb2.FeatureInfo:
    message = features_pb2.FeatureInfo(
        feature=info.feature,
        hook_name=info.hook_name,
        decoder_norm=info.decoder_norm,
        promoted=[features_pb2.TokenEffect(token=t, logit=v) for t, v in info.promoted],
        suppressed=[features_pb2.TokenEffect(token=t, logit=v) for t, v in info.suppressed],
        top_snippets=[
            features_pb2.Snippet(
                text=s.text, activation=s.activation, token=s.token, marked=s.marked
            )
            for s in info.top_snippets
        ],
    )
    if info.density is not None:
        message.density = info.density
    return message
