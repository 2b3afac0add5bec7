from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LoadSaeRequest(_message.Message):
    __slots__ = ("path", "sae_id", "model", "hook", "allow_other_model")
    PATH_FIELD_NUMBER: _ClassVar[int]
    SAE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    HOOK_FIELD_NUMBER: _ClassVar[int]
    ALLOW_OTHER_MODEL_FIELD_NUMBER: _ClassVar[int]
    path: str
    sae_id: str
    model: str
    hook: str
    allow_other_model: bool
    def __init__(self, path: _Optional[str] = ..., sae_id: _Optional[str] = ..., model: _Optional[str] = ..., hook: _Optional[str] = ..., allow_other_model: _Optional[bool] = ...) -> None: ...

class SaeInfo(_message.Message):
    __slots__ = ("sae_id", "model", "path", "hook_name", "architecture", "d_in", "num_features", "sliders", "metadata_json")
    SAE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    HOOK_NAME_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    D_IN_FIELD_NUMBER: _ClassVar[int]
    NUM_FEATURES_FIELD_NUMBER: _ClassVar[int]
    SLIDERS_FIELD_NUMBER: _ClassVar[int]
    METADATA_JSON_FIELD_NUMBER: _ClassVar[int]
    sae_id: str
    model: str
    path: str
    hook_name: str
    architecture: str
    d_in: int
    num_features: int
    sliders: bool
    metadata_json: str
    def __init__(self, sae_id: _Optional[str] = ..., model: _Optional[str] = ..., path: _Optional[str] = ..., hook_name: _Optional[str] = ..., architecture: _Optional[str] = ..., d_in: _Optional[int] = ..., num_features: _Optional[int] = ..., sliders: _Optional[bool] = ..., metadata_json: _Optional[str] = ...) -> None: ...

class ListSaesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListSaesResponse(_message.Message):
    __slots__ = ("saes",)
    SAES_FIELD_NUMBER: _ClassVar[int]
    saes: _containers.RepeatedCompositeFieldContainer[SaeInfo]
    def __init__(self, saes: _Optional[_Iterable[_Union[SaeInfo, _Mapping]]] = ...) -> None: ...

class UnloadSaeRequest(_message.Message):
    __slots__ = ("sae_id",)
    SAE_ID_FIELD_NUMBER: _ClassVar[int]
    sae_id: str
    def __init__(self, sae_id: _Optional[str] = ...) -> None: ...

class UnloadSaeResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ActivationsRequest(_message.Message):
    __slots__ = ("sae_id", "text", "k", "per_token")
    SAE_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    sae_id: str
    text: str
    k: int
    per_token: bool
    def __init__(self, sae_id: _Optional[str] = ..., text: _Optional[str] = ..., k: _Optional[int] = ..., per_token: _Optional[bool] = ...) -> None: ...

class FeatureActivation(_message.Message):
    __slots__ = ("feature", "activation")
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    feature: int
    activation: float
    def __init__(self, feature: _Optional[int] = ..., activation: _Optional[float] = ...) -> None: ...

class TokenFeatures(_message.Message):
    __slots__ = ("token_id", "token", "features")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    token: str
    features: _containers.RepeatedCompositeFieldContainer[FeatureActivation]
    def __init__(self, token_id: _Optional[int] = ..., token: _Optional[str] = ..., features: _Optional[_Iterable[_Union[FeatureActivation, _Mapping]]] = ...) -> None: ...

class ActivationsResponse(_message.Message):
    __slots__ = ("top", "tokens")
    TOP_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    top: _containers.RepeatedCompositeFieldContainer[RankedFeature]
    tokens: _containers.RepeatedCompositeFieldContainer[TokenFeatures]
    def __init__(self, top: _Optional[_Iterable[_Union[RankedFeature, _Mapping]]] = ..., tokens: _Optional[_Iterable[_Union[TokenFeatures, _Mapping]]] = ...) -> None: ...

class SearchRequest(_message.Message):
    __slots__ = ("sae_id", "examples", "k")
    SAE_ID_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    sae_id: str
    examples: _containers.RepeatedScalarFieldContainer[str]
    k: int
    def __init__(self, sae_id: _Optional[str] = ..., examples: _Optional[_Iterable[str]] = ..., k: _Optional[int] = ...) -> None: ...

class ContrastRequest(_message.Message):
    __slots__ = ("sae_id", "set_a", "set_b", "k")
    SAE_ID_FIELD_NUMBER: _ClassVar[int]
    SET_A_FIELD_NUMBER: _ClassVar[int]
    SET_B_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    sae_id: str
    set_a: _containers.RepeatedScalarFieldContainer[str]
    set_b: _containers.RepeatedScalarFieldContainer[str]
    k: int
    def __init__(self, sae_id: _Optional[str] = ..., set_a: _Optional[_Iterable[str]] = ..., set_b: _Optional[_Iterable[str]] = ..., k: _Optional[int] = ...) -> None: ...

class RankedFeature(_message.Message):
    __slots__ = ("feature", "score", "mean_activation", "frequency", "mean_activation_b", "auroc")
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    MEAN_ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_FIELD_NUMBER: _ClassVar[int]
    MEAN_ACTIVATION_B_FIELD_NUMBER: _ClassVar[int]
    AUROC_FIELD_NUMBER: _ClassVar[int]
    feature: int
    score: float
    mean_activation: float
    frequency: float
    mean_activation_b: float
    auroc: float
    def __init__(self, feature: _Optional[int] = ..., score: _Optional[float] = ..., mean_activation: _Optional[float] = ..., frequency: _Optional[float] = ..., mean_activation_b: _Optional[float] = ..., auroc: _Optional[float] = ...) -> None: ...

class RankedFeatures(_message.Message):
    __slots__ = ("features",)
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    features: _containers.RepeatedCompositeFieldContainer[RankedFeature]
    def __init__(self, features: _Optional[_Iterable[_Union[RankedFeature, _Mapping]]] = ...) -> None: ...

class FeatureInfoRequest(_message.Message):
    __slots__ = ("sae_id", "feature", "corpus", "num_tokens", "num_snippets", "context_tokens")
    SAE_ID_FIELD_NUMBER: _ClassVar[int]
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    CORPUS_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_SNIPPETS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    sae_id: str
    feature: int
    corpus: _containers.RepeatedScalarFieldContainer[str]
    num_tokens: int
    num_snippets: int
    context_tokens: int
    def __init__(self, sae_id: _Optional[str] = ..., feature: _Optional[int] = ..., corpus: _Optional[_Iterable[str]] = ..., num_tokens: _Optional[int] = ..., num_snippets: _Optional[int] = ..., context_tokens: _Optional[int] = ...) -> None: ...

class TokenEffect(_message.Message):
    __slots__ = ("token", "logit")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    LOGIT_FIELD_NUMBER: _ClassVar[int]
    token: str
    logit: float
    def __init__(self, token: _Optional[str] = ..., logit: _Optional[float] = ...) -> None: ...

class Snippet(_message.Message):
    __slots__ = ("text", "activation", "token", "marked")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    MARKED_FIELD_NUMBER: _ClassVar[int]
    text: str
    activation: float
    token: str
    marked: str
    def __init__(self, text: _Optional[str] = ..., activation: _Optional[float] = ..., token: _Optional[str] = ..., marked: _Optional[str] = ...) -> None: ...

class FeatureInfo(_message.Message):
    __slots__ = ("feature", "hook_name", "decoder_norm", "promoted", "suppressed", "top_snippets", "density")
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    HOOK_NAME_FIELD_NUMBER: _ClassVar[int]
    DECODER_NORM_FIELD_NUMBER: _ClassVar[int]
    PROMOTED_FIELD_NUMBER: _ClassVar[int]
    SUPPRESSED_FIELD_NUMBER: _ClassVar[int]
    TOP_SNIPPETS_FIELD_NUMBER: _ClassVar[int]
    DENSITY_FIELD_NUMBER: _ClassVar[int]
    feature: int
    hook_name: str
    decoder_norm: float
    promoted: _containers.RepeatedCompositeFieldContainer[TokenEffect]
    suppressed: _containers.RepeatedCompositeFieldContainer[TokenEffect]
    top_snippets: _containers.RepeatedCompositeFieldContainer[Snippet]
    density: float
    def __init__(self, feature: _Optional[int] = ..., hook_name: _Optional[str] = ..., decoder_norm: _Optional[float] = ..., promoted: _Optional[_Iterable[_Union[TokenEffect, _Mapping]]] = ..., suppressed: _Optional[_Iterable[_Union[TokenEffect, _Mapping]]] = ..., top_snippets: _Optional[_Iterable[_Union[Snippet, _Mapping]]] = ..., density: _Optional[float] = ...) -> None: ...
