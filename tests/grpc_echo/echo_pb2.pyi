from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class SayRequest(_message.Message):
    __slots__ = ("text", "delay")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    DELAY_FIELD_NUMBER: _ClassVar[int]
    text: str
    delay: float
    def __init__(self, text: _Optional[str] = ..., delay: _Optional[float] = ...) -> None: ...

class SayReply(_message.Message):
    __slots__ = ("text", "server")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SERVER_FIELD_NUMBER: _ClassVar[int]
    text: str
    server: str
    def __init__(self, text: _Optional[str] = ..., server: _Optional[str] = ...) -> None: ...

class CountRequest(_message.Message):
    __slots__ = ("n", "interval")
    N_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_FIELD_NUMBER: _ClassVar[int]
    n: int
    interval: float
    def __init__(self, n: _Optional[int] = ..., interval: _Optional[float] = ...) -> None: ...

class CountReply(_message.Message):
    __slots__ = ("i", "server")
    I_FIELD_NUMBER: _ClassVar[int]
    SERVER_FIELD_NUMBER: _ClassVar[int]
    i: int
    server: str
    def __init__(self, i: _Optional[int] = ..., server: _Optional[str] = ...) -> None: ...
