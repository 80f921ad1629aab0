import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StateSnapshot(_message.Message):
    __slots__ = ("clusters",)
    CLUSTERS_FIELD_NUMBER: _ClassVar[int]
    clusters: _containers.RepeatedCompositeFieldContainer[ClusterSnapshot]
    def __init__(self, clusters: _Optional[_Iterable[_Union[ClusterSnapshot, _Mapping]]] = ...) -> None: ...

class ClusterSnapshot(_message.Message):
    __slots__ = ("id", "affiliates")
    ID_FIELD_NUMBER: _ClassVar[int]
    AFFILIATES_FIELD_NUMBER: _ClassVar[int]
    id: str
    affiliates: _containers.RepeatedCompositeFieldContainer[AffiliateSnapshot]
    def __init__(self, id: _Optional[str] = ..., affiliates: _Optional[_Iterable[_Union[AffiliateSnapshot, _Mapping]]] = ...) -> None: ...

class AffiliateSnapshot(_message.Message):
    __slots__ = ("id", "expiration", "data", "endpoints", "ttl")
    ID_FIELD_NUMBER: _ClassVar[int]
    EXPIRATION_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    id: str
    expiration: _timestamp_pb2.Timestamp
    data: bytes
    endpoints: _containers.RepeatedCompositeFieldContainer[EndpointSnapshot]
    ttl: _duration_pb2.Duration
    def __init__(self, id: _Optional[str] = ..., expiration: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., data: _Optional[bytes] = ..., endpoints: _Optional[_Iterable[_Union[EndpointSnapshot, _Mapping]]] = ..., ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class EndpointSnapshot(_message.Message):
    __slots__ = ("expiration", "data", "ttl")
    EXPIRATION_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    expiration: _timestamp_pb2.Timestamp
    data: bytes
    ttl: _duration_pb2.Duration
    def __init__(self, expiration: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., data: _Optional[bytes] = ..., ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...
