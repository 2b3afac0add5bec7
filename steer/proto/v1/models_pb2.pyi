from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "default_model")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MODEL_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    default_model: str
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., default_model: _Optional[str] = ...) -> None: ...

class LoadModelRequest(_message.Message):
    __slots__ = ("source", "model_id", "dtype", "device")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    source: str
    model_id: str
    dtype: str
    device: str
    def __init__(self, source: _Optional[str] = ..., model_id: _Optional[str] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ...) -> None: ...

class UnloadModelRequest(_message.Message):
    __slots__ = ("model_id",)
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    def __init__(self, model_id: _Optional[str] = ...) -> None: ...

class UnloadModelResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfoRequest(_message.Message):
    __slots__ = ("model_id",)
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    def __init__(self, model_id: _Optional[str] = ...) -> None: ...

class SchedulerStats(_message.Message):
    __slots__ = ("running", "waiting", "requests_total", "cancelled_total", "failed_total", "tokens_total")
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    FAILED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    TOKENS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    running: int
    waiting: int
    requests_total: int
    cancelled_total: int
    failed_total: int
    tokens_total: int
    def __init__(self, running: _Optional[int] = ..., waiting: _Optional[int] = ..., requests_total: _Optional[int] = ..., cancelled_total: _Optional[int] = ..., failed_total: _Optional[int] = ..., tokens_total: _Optional[int] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model_id", "source", "architecture", "num_layers", "d_model", "dtype", "device", "hook_names", "chat_template", "weight_hash", "stats", "vocab_size")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    D_MODEL_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    HOOK_NAMES_FIELD_NUMBER: _ClassVar[int]
    CHAT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_HASH_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    source: str
    architecture: str
    num_layers: int
    d_model: int
    dtype: str
    device: str
    hook_names: _containers.RepeatedScalarFieldContainer[str]
    chat_template: str
    weight_hash: str
    stats: SchedulerStats
    vocab_size: int
    def __init__(self, model_id: _Optional[str] = ..., source: _Optional[str] = ..., architecture: _Optional[str] = ..., num_layers: _Optional[int] = ..., d_model: _Optional[int] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., hook_names: _Optional[_Iterable[str]] = ..., chat_template: _Optional[str] = ..., weight_hash: _Optional[str] = ..., stats: _Optional[_Union[SchedulerStats, _Mapping]] = ..., vocab_size: _Optional[int] = ...) -> None: ...

class ListSlidersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SliderInfo(_message.Message):
    __slots__ = ("name", "kind", "description", "min", "max", "default", "neutral")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    MIN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_FIELD_NUMBER: _ClassVar[int]
    NEUTRAL_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    description: str
    min: float
    max: float
    default: float
    neutral: float
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., description: _Optional[str] = ..., min: _Optional[float] = ..., max: _Optional[float] = ..., default: _Optional[float] = ..., neutral: _Optional[float] = ...) -> None: ...

class ListSlidersResponse(_message.Message):
    __slots__ = ("sliders",)
    SLIDERS_FIELD_NUMBER: _ClassVar[int]
    sliders: _containers.RepeatedCompositeFieldContainer[SliderInfo]
    def __init__(self, sliders: _Optional[_Iterable[_Union[SliderInfo, _Mapping]]] = ...) -> None: ...
