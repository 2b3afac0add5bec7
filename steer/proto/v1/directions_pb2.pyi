from steer.proto.v1 import jobs_pb2 as _jobs_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ComputeDirectionRequest(_message.Message):
    __slots__ = ("model", "recipe_toml", "recipe_path", "artifact_id", "overwrite")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    RECIPE_TOML_FIELD_NUMBER: _ClassVar[int]
    RECIPE_PATH_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_ID_FIELD_NUMBER: _ClassVar[int]
    OVERWRITE_FIELD_NUMBER: _ClassVar[int]
    model: str
    recipe_toml: str
    recipe_path: str
    artifact_id: str
    overwrite: bool
    def __init__(self, model: _Optional[str] = ..., recipe_toml: _Optional[str] = ..., recipe_path: _Optional[str] = ..., artifact_id: _Optional[str] = ..., overwrite: _Optional[bool] = ...) -> None: ...

class ListArtifactsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListArtifactsResponse(_message.Message):
    __slots__ = ("artifacts", "broken")
    ARTIFACTS_FIELD_NUMBER: _ClassVar[int]
    BROKEN_FIELD_NUMBER: _ClassVar[int]
    artifacts: _containers.RepeatedCompositeFieldContainer[ArtifactInfo]
    broken: _containers.RepeatedCompositeFieldContainer[BrokenArtifact]
    def __init__(self, artifacts: _Optional[_Iterable[_Union[ArtifactInfo, _Mapping]]] = ..., broken: _Optional[_Iterable[_Union[BrokenArtifact, _Mapping]]] = ...) -> None: ...

class BrokenArtifact(_message.Message):
    __slots__ = ("artifact_id", "reason")
    ARTIFACT_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    artifact_id: str
    reason: str
    def __init__(self, artifact_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class GetArtifactRequest(_message.Message):
    __slots__ = ("artifact_id",)
    ARTIFACT_ID_FIELD_NUMBER: _ClassVar[int]
    artifact_id: str
    def __init__(self, artifact_id: _Optional[str] = ...) -> None: ...

class ArtifactInfo(_message.Message):
    __slots__ = ("artifact_id", "kind", "d_model", "layers", "has_shared", "model_name", "metadata_json")
    ARTIFACT_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    D_MODEL_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    HAS_SHARED_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    METADATA_JSON_FIELD_NUMBER: _ClassVar[int]
    artifact_id: str
    kind: str
    d_model: int
    layers: _containers.RepeatedScalarFieldContainer[int]
    has_shared: bool
    model_name: str
    metadata_json: str
    def __init__(self, artifact_id: _Optional[str] = ..., kind: _Optional[str] = ..., d_model: _Optional[int] = ..., layers: _Optional[_Iterable[int]] = ..., has_shared: _Optional[bool] = ..., model_name: _Optional[str] = ..., metadata_json: _Optional[str] = ...) -> None: ...

class ArtifactFiles(_message.Message):
    __slots__ = ("artifact_id", "vectors_safetensors", "steer_json")
    ARTIFACT_ID_FIELD_NUMBER: _ClassVar[int]
    VECTORS_SAFETENSORS_FIELD_NUMBER: _ClassVar[int]
    STEER_JSON_FIELD_NUMBER: _ClassVar[int]
    artifact_id: str
    vectors_safetensors: bytes
    steer_json: bytes
    def __init__(self, artifact_id: _Optional[str] = ..., vectors_safetensors: _Optional[bytes] = ..., steer_json: _Optional[bytes] = ...) -> None: ...

class UploadArtifactRequest(_message.Message):
    __slots__ = ("files", "overwrite")
    FILES_FIELD_NUMBER: _ClassVar[int]
    OVERWRITE_FIELD_NUMBER: _ClassVar[int]
    files: ArtifactFiles
    overwrite: bool
    def __init__(self, files: _Optional[_Union[ArtifactFiles, _Mapping]] = ..., overwrite: _Optional[bool] = ...) -> None: ...

class DeleteArtifactRequest(_message.Message):
    __slots__ = ("artifact_id",)
    ARTIFACT_ID_FIELD_NUMBER: _ClassVar[int]
    artifact_id: str
    def __init__(self, artifact_id: _Optional[str] = ...) -> None: ...

class DeleteArtifactResponse(_message.Message):
    __slots__ = ("artifact_id", "was_broken")
    ARTIFACT_ID_FIELD_NUMBER: _ClassVar[int]
    WAS_BROKEN_FIELD_NUMBER: _ClassVar[int]
    artifact_id: str
    was_broken: bool
    def __init__(self, artifact_id: _Optional[str] = ..., was_broken: _Optional[bool] = ...) -> None: ...
