from steer.proto.v1 import jobs_pb2 as _jobs_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class BakeRequest(_message.Message):
    __slots__ = ("model_source", "recipe_toml", "recipe_path", "output", "output_format", "overwrite")
    MODEL_SOURCE_FIELD_NUMBER: _ClassVar[int]
    RECIPE_TOML_FIELD_NUMBER: _ClassVar[int]
    RECIPE_PATH_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    OVERWRITE_FIELD_NUMBER: _ClassVar[int]
    model_source: str
    recipe_toml: str
    recipe_path: str
    output: str
    output_format: str
    overwrite: bool
    def __init__(self, model_source: _Optional[str] = ..., recipe_toml: _Optional[str] = ..., recipe_path: _Optional[str] = ..., output: _Optional[str] = ..., output_format: _Optional[str] = ..., overwrite: _Optional[bool] = ...) -> None: ...
