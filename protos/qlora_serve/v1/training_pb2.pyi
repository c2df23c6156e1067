from qlora_serve.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_QUEUED: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_SUCCEEDED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
    JOB_STATE_CANCELLED: _ClassVar[JobState]

class JobArtifactKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_ARTIFACT_KIND_UNSPECIFIED: _ClassVar[JobArtifactKind]
    JOB_ARTIFACT_KIND_LOSS_CURVE: _ClassVar[JobArtifactKind]
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_QUEUED: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_SUCCEEDED: JobState
JOB_STATE_FAILED: JobState
JOB_STATE_CANCELLED: JobState
JOB_ARTIFACT_KIND_UNSPECIFIED: JobArtifactKind
JOB_ARTIFACT_KIND_LOSS_CURVE: JobArtifactKind

class SubmitJobRequest(_message.Message):
    __slots__ = ("adapter_name", "train_jsonl", "eval_jsonl", "config_toml", "set_default")
    ADAPTER_NAME_FIELD_NUMBER: _ClassVar[int]
    TRAIN_JSONL_FIELD_NUMBER: _ClassVar[int]
    EVAL_JSONL_FIELD_NUMBER: _ClassVar[int]
    CONFIG_TOML_FIELD_NUMBER: _ClassVar[int]
    SET_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    adapter_name: str
    train_jsonl: bytes
    eval_jsonl: bytes
    config_toml: str
    set_default: bool
    def __init__(self, adapter_name: _Optional[str] = ..., train_jsonl: _Optional[bytes] = ..., eval_jsonl: _Optional[bytes] = ..., config_toml: _Optional[str] = ..., set_default: _Optional[bool] = ...) -> None: ...

class SubmitJobStreamRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: SubmitJobRequest
    chunk: DatasetChunk
    def __init__(self, header: _Optional[_Union[SubmitJobRequest, _Mapping]] = ..., chunk: _Optional[_Union[DatasetChunk, _Mapping]] = ...) -> None: ...

class DatasetChunk(_message.Message):
    __slots__ = ("dataset", "data")
    class Dataset(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        DATASET_UNSPECIFIED: _ClassVar[DatasetChunk.Dataset]
        DATASET_TRAIN: _ClassVar[DatasetChunk.Dataset]
        DATASET_EVAL: _ClassVar[DatasetChunk.Dataset]
    DATASET_UNSPECIFIED: DatasetChunk.Dataset
    DATASET_TRAIN: DatasetChunk.Dataset
    DATASET_EVAL: DatasetChunk.Dataset
    DATASET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dataset: DatasetChunk.Dataset
    data: bytes
    def __init__(self, dataset: _Optional[_Union[DatasetChunk.Dataset, str]] = ..., data: _Optional[bytes] = ...) -> None: ...

class TrainingJob(_message.Message):
    __slots__ = ("id", "adapter_name", "state", "step", "max_steps", "loss", "eval_loss", "error", "created_at", "started_at", "finished_at", "adapter", "owner")
    ID_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    EVAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    id: str
    adapter_name: str
    state: JobState
    step: int
    max_steps: int
    loss: float
    eval_loss: float
    error: str
    created_at: float
    started_at: float
    finished_at: float
    adapter: _common_pb2.AdapterRef
    owner: str
    def __init__(self, id: _Optional[str] = ..., adapter_name: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., step: _Optional[int] = ..., max_steps: _Optional[int] = ..., loss: _Optional[float] = ..., eval_loss: _Optional[float] = ..., error: _Optional[str] = ..., created_at: _Optional[float] = ..., started_at: _Optional[float] = ..., finished_at: _Optional[float] = ..., adapter: _Optional[_Union[_common_pb2.AdapterRef, _Mapping]] = ..., owner: _Optional[str] = ...) -> None: ...

class TrainingEvent(_message.Message):
    __slots__ = ("job", "event", "details_json")
    JOB_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    DETAILS_JSON_FIELD_NUMBER: _ClassVar[int]
    job: TrainingJob
    event: str
    details_json: str
    def __init__(self, job: _Optional[_Union[TrainingJob, _Mapping]] = ..., event: _Optional[str] = ..., details_json: _Optional[str] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[TrainingJob]
    def __init__(self, jobs: _Optional[_Iterable[_Union[TrainingJob, _Mapping]]] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class GetJobArtifactRequest(_message.Message):
    __slots__ = ("id", "kind")
    ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    id: str
    kind: JobArtifactKind
    def __init__(self, id: _Optional[str] = ..., kind: _Optional[_Union[JobArtifactKind, str]] = ...) -> None: ...

class JobArtifact(_message.Message):
    __slots__ = ("id", "kind", "media_type", "data", "step")
    ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MEDIA_TYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    id: str
    kind: JobArtifactKind
    media_type: str
    data: bytes
    step: int
    def __init__(self, id: _Optional[str] = ..., kind: _Optional[_Union[JobArtifactKind, str]] = ..., media_type: _Optional[str] = ..., data: _Optional[bytes] = ..., step: _Optional[int] = ...) -> None: ...
