from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CreateKeyRequest(_message.Message):
    __slots__ = ("algorithm", "gun", "role")
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    GUN_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    algorithm: str
    gun: str
    role: str
    def __init__(self, algorithm: _Optional[str] = ..., gun: _Optional[str] = ..., role: _Optional[str] = ...) -> None: ...

class KeyInfo(_message.Message):
    __slots__ = ("keyID", "algorithm")
    KEYID_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    keyID: KeyID
    algorithm: Algorithm
    def __init__(self, keyID: _Optional[_Union[KeyID, _Mapping]] = ..., algorithm: _Optional[_Union[Algorithm, _Mapping]] = ...) -> None: ...

class KeyID(_message.Message):
    __slots__ = ("ID",)
    ID_FIELD_NUMBER: _ClassVar[int]
    ID: str
    def __init__(self, ID: _Optional[str] = ...) -> None: ...

class Algorithm(_message.Message):
    __slots__ = ("algorithm",)
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    algorithm: str
    def __init__(self, algorithm: _Optional[str] = ...) -> None: ...

class GetKeyInfoResponse(_message.Message):
    __slots__ = ("keyInfo", "publicKey", "role")
    KEYINFO_FIELD_NUMBER: _ClassVar[int]
    PUBLICKEY_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    keyInfo: KeyInfo
    publicKey: bytes
    role: str
    def __init__(self, keyInfo: _Optional[_Union[KeyInfo, _Mapping]] = ..., publicKey: _Optional[bytes] = ..., role: _Optional[str] = ...) -> None: ...

class PublicKey(_message.Message):
    __slots__ = ("keyInfo", "publicKey")
    KEYINFO_FIELD_NUMBER: _ClassVar[int]
    PUBLICKEY_FIELD_NUMBER: _ClassVar[int]
    keyInfo: KeyInfo
    publicKey: bytes
    def __init__(self, keyInfo: _Optional[_Union[KeyInfo, _Mapping]] = ..., publicKey: _Optional[bytes] = ...) -> None: ...

class Signature(_message.Message):
    __slots__ = ("keyInfo", "algorithm", "content")
    KEYINFO_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    keyInfo: KeyInfo
    algorithm: Algorithm
    content: bytes
    def __init__(self, keyInfo: _Optional[_Union[KeyInfo, _Mapping]] = ..., algorithm: _Optional[_Union[Algorithm, _Mapping]] = ..., content: _Optional[bytes] = ...) -> None: ...

class SignatureRequest(_message.Message):
    __slots__ = ("keyID", "content")
    KEYID_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    keyID: KeyID
    content: bytes
    def __init__(self, keyID: _Optional[_Union[KeyID, _Mapping]] = ..., content: _Optional[bytes] = ...) -> None: ...

class Void(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
