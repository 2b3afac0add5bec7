from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Phase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PHASE_UNSPECIFIED: _ClassVar[Phase]
    PHASE_ALL: _ClassVar[Phase]
    PHASE_PROMPT: _ClassVar[Phase]
    PHASE_GENERATED: _ClassVar[Phase]

class SliderMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SLIDER_MODE_UNSPECIFIED: _ClassVar[SliderMode]
    SLIDER_MODE_CLAMP: _ClassVar[SliderMode]
    SLIDER_MODE_SCALE: _ClassVar[SliderMode]
    SLIDER_MODE_ADD_DECODER: _ClassVar[SliderMode]

class GateScope(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GATE_SCOPE_UNSPECIFIED: _ClassVar[GateScope]
    GATE_SCOPE_TOKEN: _ClassVar[GateScope]
    GATE_SCOPE_PROMPT: _ClassVar[GateScope]
    GATE_SCOPE_REPLY: _ClassVar[GateScope]

class Side(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SIDE_UNSPECIFIED: _ClassVar[Side]
    SIDE_DEFAULT: _ClassVar[Side]
    SIDE_STEERED: _ClassVar[Side]

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_CANCELLED: _ClassVar[FinishReason]
PHASE_UNSPECIFIED: Phase
PHASE_ALL: Phase
PHASE_PROMPT: Phase
PHASE_GENERATED: Phase
SLIDER_MODE_UNSPECIFIED: SliderMode
SLIDER_MODE_CLAMP: SliderMode
SLIDER_MODE_SCALE: SliderMode
SLIDER_MODE_ADD_DECODER: SliderMode
GATE_SCOPE_UNSPECIFIED: GateScope
GATE_SCOPE_TOKEN: GateScope
GATE_SCOPE_PROMPT: GateScope
GATE_SCOPE_REPLY: GateScope
SIDE_UNSPECIFIED: Side
SIDE_DEFAULT: Side
SIDE_STEERED: Side
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_CANCELLED: FinishReason

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class ChatPrompt(_message.Message):
    __slots__ = ("messages", "prompt_format")
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    prompt_format: str
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., prompt_format: _Optional[str] = ...) -> None: ...

class RolePlayPrompt(_message.Message):
    __slots__ = ("scene_json", "prompt_format", "speaker", "length", "card_json")
    SCENE_JSON_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    SPEAKER_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    CARD_JSON_FIELD_NUMBER: _ClassVar[int]
    scene_json: str
    prompt_format: str
    speaker: str
    length: str
    card_json: str
    def __init__(self, scene_json: _Optional[str] = ..., prompt_format: _Optional[str] = ..., speaker: _Optional[str] = ..., length: _Optional[str] = ..., card_json: _Optional[str] = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_k", "top_p", "min_p", "temperature_last", "typical_p", "tfs", "top_a", "mirostat_mode", "mirostat_tau", "mirostat_eta", "repetition_penalty", "repetition_penalty_range", "presence_penalty", "frequency_penalty", "dry_multiplier", "dry_base", "dry_allowed_length", "dry_sequence_breakers", "dry_range", "xtc_threshold", "xtc_probability", "logit_bias", "banned_strings", "ban_eos", "min_tokens", "sampler_order")
    class LogitBiasEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: float
        def __init__(self, key: _Optional[int] = ..., value: _Optional[float] = ...) -> None: ...
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    MIN_P_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_LAST_FIELD_NUMBER: _ClassVar[int]
    TYPICAL_P_FIELD_NUMBER: _ClassVar[int]
    TFS_FIELD_NUMBER: _ClassVar[int]
    TOP_A_FIELD_NUMBER: _ClassVar[int]
    MIROSTAT_MODE_FIELD_NUMBER: _ClassVar[int]
    MIROSTAT_TAU_FIELD_NUMBER: _ClassVar[int]
    MIROSTAT_ETA_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_RANGE_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_PENALTY_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_PENALTY_FIELD_NUMBER: _ClassVar[int]
    DRY_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    DRY_BASE_FIELD_NUMBER: _ClassVar[int]
    DRY_ALLOWED_LENGTH_FIELD_NUMBER: _ClassVar[int]
    DRY_SEQUENCE_BREAKERS_FIELD_NUMBER: _ClassVar[int]
    DRY_RANGE_FIELD_NUMBER: _ClassVar[int]
    XTC_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    XTC_PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    LOGIT_BIAS_FIELD_NUMBER: _ClassVar[int]
    BANNED_STRINGS_FIELD_NUMBER: _ClassVar[int]
    BAN_EOS_FIELD_NUMBER: _ClassVar[int]
    MIN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLER_ORDER_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    temperature_last: bool
    typical_p: float
    tfs: float
    top_a: float
    mirostat_mode: int
    mirostat_tau: float
    mirostat_eta: float
    repetition_penalty: float
    repetition_penalty_range: int
    presence_penalty: float
    frequency_penalty: float
    dry_multiplier: float
    dry_base: float
    dry_allowed_length: int
    dry_sequence_breakers: _containers.RepeatedScalarFieldContainer[str]
    dry_range: int
    xtc_threshold: float
    xtc_probability: float
    logit_bias: _containers.ScalarMap[int, float]
    banned_strings: _containers.RepeatedScalarFieldContainer[str]
    ban_eos: bool
    min_tokens: int
    sampler_order: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., min_p: _Optional[float] = ..., temperature_last: _Optional[bool] = ..., typical_p: _Optional[float] = ..., tfs: _Optional[float] = ..., top_a: _Optional[float] = ..., mirostat_mode: _Optional[int] = ..., mirostat_tau: _Optional[float] = ..., mirostat_eta: _Optional[float] = ..., repetition_penalty: _Optional[float] = ..., repetition_penalty_range: _Optional[int] = ..., presence_penalty: _Optional[float] = ..., frequency_penalty: _Optional[float] = ..., dry_multiplier: _Optional[float] = ..., dry_base: _Optional[float] = ..., dry_allowed_length: _Optional[int] = ..., dry_sequence_breakers: _Optional[_Iterable[str]] = ..., dry_range: _Optional[int] = ..., xtc_threshold: _Optional[float] = ..., xtc_probability: _Optional[float] = ..., logit_bias: _Optional[_Mapping[int, float]] = ..., banned_strings: _Optional[_Iterable[str]] = ..., ban_eos: _Optional[bool] = ..., min_tokens: _Optional[int] = ..., sampler_order: _Optional[_Iterable[str]] = ...) -> None: ...

class InlineVector(_message.Message):
    __slots__ = ("shared", "layers")
    SHARED_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    shared: _containers.RepeatedScalarFieldContainer[float]
    layers: _containers.RepeatedCompositeFieldContainer[LayerVector]
    def __init__(self, shared: _Optional[_Iterable[float]] = ..., layers: _Optional[_Iterable[_Union[LayerVector, _Mapping]]] = ...) -> None: ...

class LayerVector(_message.Message):
    __slots__ = ("layer", "values")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    layer: int
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, layer: _Optional[int] = ..., values: _Optional[_Iterable[float]] = ...) -> None: ...

class AblateDirection(_message.Message):
    __slots__ = ("artifact_id", "layers", "weight", "layer_weights", "allow_other_model")
    class LayerWeightsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: float
        def __init__(self, key: _Optional[int] = ..., value: _Optional[float] = ...) -> None: ...
    ARTIFACT_ID_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    LAYER_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    ALLOW_OTHER_MODEL_FIELD_NUMBER: _ClassVar[int]
    artifact_id: str
    layers: _containers.RepeatedScalarFieldContainer[int]
    weight: float
    layer_weights: _containers.ScalarMap[int, float]
    allow_other_model: bool
    def __init__(self, artifact_id: _Optional[str] = ..., layers: _Optional[_Iterable[int]] = ..., weight: _Optional[float] = ..., layer_weights: _Optional[_Mapping[int, float]] = ..., allow_other_model: _Optional[bool] = ...) -> None: ...

class AddVector(_message.Message):
    __slots__ = ("artifact_id", "inline", "strength", "hooks", "phase", "allow_other_model")
    ARTIFACT_ID_FIELD_NUMBER: _ClassVar[int]
    INLINE_FIELD_NUMBER: _ClassVar[int]
    STRENGTH_FIELD_NUMBER: _ClassVar[int]
    HOOKS_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    ALLOW_OTHER_MODEL_FIELD_NUMBER: _ClassVar[int]
    artifact_id: str
    inline: InlineVector
    strength: float
    hooks: _containers.RepeatedScalarFieldContainer[str]
    phase: Phase
    allow_other_model: bool
    def __init__(self, artifact_id: _Optional[str] = ..., inline: _Optional[_Union[InlineVector, _Mapping]] = ..., strength: _Optional[float] = ..., hooks: _Optional[_Iterable[str]] = ..., phase: _Optional[_Union[Phase, str]] = ..., allow_other_model: _Optional[bool] = ...) -> None: ...

class FeatureSlider(_message.Message):
    __slots__ = ("sae_id", "feature", "mode", "value", "phase")
    SAE_ID_FIELD_NUMBER: _ClassVar[int]
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    sae_id: str
    feature: int
    mode: SliderMode
    value: float
    phase: Phase
    def __init__(self, sae_id: _Optional[str] = ..., feature: _Optional[int] = ..., mode: _Optional[_Union[SliderMode, str]] = ..., value: _Optional[float] = ..., phase: _Optional[_Union[Phase, str]] = ...) -> None: ...

class NamedSlider(_message.Message):
    __slots__ = ("name", "value")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    name: str
    value: float
    def __init__(self, name: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...

class GateFeature(_message.Message):
    __slots__ = ("sae_id", "feature")
    SAE_ID_FIELD_NUMBER: _ClassVar[int]
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    sae_id: str
    feature: int
    def __init__(self, sae_id: _Optional[str] = ..., feature: _Optional[int] = ...) -> None: ...

class GateCondition(_message.Message):
    __slots__ = ("hook", "artifact_id", "inline", "feature", "threshold", "below", "allow_other_model", "hooks", "weights")
    HOOK_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_ID_FIELD_NUMBER: _ClassVar[int]
    INLINE_FIELD_NUMBER: _ClassVar[int]
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    BELOW_FIELD_NUMBER: _ClassVar[int]
    ALLOW_OTHER_MODEL_FIELD_NUMBER: _ClassVar[int]
    HOOKS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    hook: str
    artifact_id: str
    inline: InlineVector
    feature: GateFeature
    threshold: float
    below: bool
    allow_other_model: bool
    hooks: _containers.RepeatedScalarFieldContainer[str]
    weights: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, hook: _Optional[str] = ..., artifact_id: _Optional[str] = ..., inline: _Optional[_Union[InlineVector, _Mapping]] = ..., feature: _Optional[_Union[GateFeature, _Mapping]] = ..., threshold: _Optional[float] = ..., below: _Optional[bool] = ..., allow_other_model: _Optional[bool] = ..., hooks: _Optional[_Iterable[str]] = ..., weights: _Optional[_Iterable[float]] = ...) -> None: ...

class GatedIntervention(_message.Message):
    __slots__ = ("condition", "inner", "scope", "reply_tokens", "reply_aggregate")
    CONDITION_FIELD_NUMBER: _ClassVar[int]
    INNER_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    REPLY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REPLY_AGGREGATE_FIELD_NUMBER: _ClassVar[int]
    condition: GateCondition
    inner: Intervention
    scope: GateScope
    reply_tokens: int
    reply_aggregate: str
    def __init__(self, condition: _Optional[_Union[GateCondition, _Mapping]] = ..., inner: _Optional[_Union[Intervention, _Mapping]] = ..., scope: _Optional[_Union[GateScope, str]] = ..., reply_tokens: _Optional[int] = ..., reply_aggregate: _Optional[str] = ...) -> None: ...

class Intervention(_message.Message):
    __slots__ = ("ablate", "add", "slider", "named", "gated", "speaker")
    ABLATE_FIELD_NUMBER: _ClassVar[int]
    ADD_FIELD_NUMBER: _ClassVar[int]
    SLIDER_FIELD_NUMBER: _ClassVar[int]
    NAMED_FIELD_NUMBER: _ClassVar[int]
    GATED_FIELD_NUMBER: _ClassVar[int]
    SPEAKER_FIELD_NUMBER: _ClassVar[int]
    ablate: AblateDirection
    add: AddVector
    slider: FeatureSlider
    named: NamedSlider
    gated: GatedIntervention
    speaker: str
    def __init__(self, ablate: _Optional[_Union[AblateDirection, _Mapping]] = ..., add: _Optional[_Union[AddVector, _Mapping]] = ..., slider: _Optional[_Union[FeatureSlider, _Mapping]] = ..., named: _Optional[_Union[NamedSlider, _Mapping]] = ..., gated: _Optional[_Union[GatedIntervention, _Mapping]] = ..., speaker: _Optional[str] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("model", "text", "chat", "token_ids", "roleplay", "sampling", "stop", "seed", "max_new_tokens", "interventions", "top_logprobs", "compare")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    CHAT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    ROLEPLAY_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    INTERVENTIONS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    COMPARE_FIELD_NUMBER: _ClassVar[int]
    model: str
    text: str
    chat: ChatPrompt
    token_ids: TokenIds
    roleplay: RolePlayPrompt
    sampling: SamplingParams
    stop: _containers.RepeatedScalarFieldContainer[str]
    seed: int
    max_new_tokens: int
    interventions: _containers.RepeatedCompositeFieldContainer[Intervention]
    top_logprobs: int
    compare: bool
    def __init__(self, model: _Optional[str] = ..., text: _Optional[str] = ..., chat: _Optional[_Union[ChatPrompt, _Mapping]] = ..., token_ids: _Optional[_Union[TokenIds, _Mapping]] = ..., roleplay: _Optional[_Union[RolePlayPrompt, _Mapping]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., stop: _Optional[_Iterable[str]] = ..., seed: _Optional[int] = ..., max_new_tokens: _Optional[int] = ..., interventions: _Optional[_Iterable[_Union[Intervention, _Mapping]]] = ..., top_logprobs: _Optional[int] = ..., compare: _Optional[bool] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ...) -> None: ...

class TokenLogprob(_message.Message):
    __slots__ = ("token_id", "logprob")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    logprob: float
    def __init__(self, token_id: _Optional[int] = ..., logprob: _Optional[float] = ...) -> None: ...

class TopLogprobs(_message.Message):
    __slots__ = ("candidates",)
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    candidates: _containers.RepeatedCompositeFieldContainer[TokenLogprob]
    def __init__(self, candidates: _Optional[_Iterable[_Union[TokenLogprob, _Mapping]]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("side", "token_ids", "text", "top_logprobs", "finish_reason", "usage", "seed")
    SIDE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    side: Side
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    top_logprobs: _containers.RepeatedCompositeFieldContainer[TopLogprobs]
    finish_reason: FinishReason
    usage: Usage
    seed: int
    def __init__(self, side: _Optional[_Union[Side, str]] = ..., token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., top_logprobs: _Optional[_Iterable[_Union[TopLogprobs, _Mapping]]] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., seed: _Optional[int] = ...) -> None: ...
