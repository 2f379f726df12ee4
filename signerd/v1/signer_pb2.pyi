from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KeyPurpose(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KEY_PURPOSE_UNSPECIFIED: _ClassVar[KeyPurpose]
    KEY_PURPOSE_METADATA: _ClassVar[KeyPurpose]
    KEY_PURPOSE_RAW: _ClassVar[KeyPurpose]

class SignatureEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SIGNATURE_ENCODING_UNSPECIFIED: _ClassVar[SignatureEncoding]
    SIGNATURE_ENCODING_RAW: _ClassVar[SignatureEncoding]
    SIGNATURE_ENCODING_DER: _ClassVar[SignatureEncoding]

class RsaPadding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RSA_PADDING_UNSPECIFIED: _ClassVar[RsaPadding]
    RSA_PADDING_PSS: _ClassVar[RsaPadding]
    RSA_PADDING_PKCS1V15: _ClassVar[RsaPadding]

class CertificateProfile(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CERTIFICATE_PROFILE_UNSPECIFIED: _ClassVar[CertificateProfile]
    CERTIFICATE_PROFILE_CA: _ClassVar[CertificateProfile]
    CERTIFICATE_PROFILE_CODE_SIGNING: _ClassVar[CertificateProfile]
KEY_PURPOSE_UNSPECIFIED: KeyPurpose
KEY_PURPOSE_METADATA: KeyPurpose
KEY_PURPOSE_RAW: KeyPurpose
SIGNATURE_ENCODING_UNSPECIFIED: SignatureEncoding
SIGNATURE_ENCODING_RAW: SignatureEncoding
SIGNATURE_ENCODING_DER: SignatureEncoding
RSA_PADDING_UNSPECIFIED: RsaPadding
RSA_PADDING_PSS: RsaPadding
RSA_PADDING_PKCS1V15: RsaPadding
CERTIFICATE_PROFILE_UNSPECIFIED: CertificateProfile
CERTIFICATE_PROFILE_CA: CertificateProfile
CERTIFICATE_PROFILE_CODE_SIGNING: CertificateProfile

class Key(_message.Message):
    __slots__ = ("key_id", "algorithm", "gun", "role", "token", "keytype", "public_key_der", "public_key_pem", "tuf_public", "used", "purpose")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    GUN_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    KEYTYPE_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_DER_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_PEM_FIELD_NUMBER: _ClassVar[int]
    TUF_PUBLIC_FIELD_NUMBER: _ClassVar[int]
    USED_FIELD_NUMBER: _ClassVar[int]
    PURPOSE_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    algorithm: str
    gun: str
    role: str
    token: str
    keytype: str
    public_key_der: bytes
    public_key_pem: str
    tuf_public: bytes
    used: bool
    purpose: KeyPurpose
    def __init__(self, key_id: _Optional[str] = ..., algorithm: _Optional[str] = ..., gun: _Optional[str] = ..., role: _Optional[str] = ..., token: _Optional[str] = ..., keytype: _Optional[str] = ..., public_key_der: _Optional[bytes] = ..., public_key_pem: _Optional[str] = ..., tuf_public: _Optional[bytes] = ..., used: _Optional[bool] = ..., purpose: _Optional[_Union[KeyPurpose, str]] = ...) -> None: ...

class CreateKeyRequest(_message.Message):
    __slots__ = ("gun", "role", "algorithm", "token", "purpose")
    GUN_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    PURPOSE_FIELD_NUMBER: _ClassVar[int]
    gun: str
    role: str
    algorithm: str
    token: str
    purpose: KeyPurpose
    def __init__(self, gun: _Optional[str] = ..., role: _Optional[str] = ..., algorithm: _Optional[str] = ..., token: _Optional[str] = ..., purpose: _Optional[_Union[KeyPurpose, str]] = ...) -> None: ...

class GetKeyRequest(_message.Message):
    __slots__ = ("key_id",)
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    def __init__(self, key_id: _Optional[str] = ...) -> None: ...

class ListKeysRequest(_message.Message):
    __slots__ = ("gun", "role", "token", "page_size", "page_token")
    GUN_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    gun: str
    role: str
    token: str
    page_size: int
    page_token: str
    def __init__(self, gun: _Optional[str] = ..., role: _Optional[str] = ..., token: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListKeysResponse(_message.Message):
    __slots__ = ("keys", "next_page_token")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedCompositeFieldContainer[Key]
    next_page_token: str
    def __init__(self, keys: _Optional[_Iterable[_Union[Key, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DeleteKeyRequest(_message.Message):
    __slots__ = ("key_id",)
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    def __init__(self, key_id: _Optional[str] = ...) -> None: ...

class DeleteKeyResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SignRequest(_message.Message):
    __slots__ = ("key_id", "message", "digest", "encoding", "rsa_padding")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    RSA_PADDING_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    message: bytes
    digest: bytes
    encoding: SignatureEncoding
    rsa_padding: RsaPadding
    def __init__(self, key_id: _Optional[str] = ..., message: _Optional[bytes] = ..., digest: _Optional[bytes] = ..., encoding: _Optional[_Union[SignatureEncoding, str]] = ..., rsa_padding: _Optional[_Union[RsaPadding, str]] = ...) -> None: ...

class SignResponse(_message.Message):
    __slots__ = ("key_id", "signature", "algorithm", "method", "encoding")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    signature: bytes
    algorithm: str
    method: str
    encoding: SignatureEncoding
    def __init__(self, key_id: _Optional[str] = ..., signature: _Optional[bytes] = ..., algorithm: _Optional[str] = ..., method: _Optional[str] = ..., encoding: _Optional[_Union[SignatureEncoding, str]] = ...) -> None: ...

class SignBatchRequest(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[SignRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[SignRequest, _Mapping]]] = ...) -> None: ...

class SignBatchItem(_message.Message):
    __slots__ = ("code", "error", "response")
    CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    code: int
    error: str
    response: SignResponse
    def __init__(self, code: _Optional[int] = ..., error: _Optional[str] = ..., response: _Optional[_Union[SignResponse, _Mapping]] = ...) -> None: ...

class SignStreamResponse(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[SignBatchItem]
    def __init__(self, items: _Optional[_Iterable[_Union[SignBatchItem, _Mapping]]] = ...) -> None: ...

class SignBatchResponse(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[SignBatchItem]
    def __init__(self, items: _Optional[_Iterable[_Union[SignBatchItem, _Mapping]]] = ...) -> None: ...

class ListTokensRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TokenInfo(_message.Message):
    __slots__ = ("name", "module", "profile", "manufacturer", "model", "serial", "label", "healthy", "error", "algorithms", "key_count", "sessions", "free_public_memory", "free_private_memory")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODULE_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    MANUFACTURER_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SERIAL_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ALGORITHMS_FIELD_NUMBER: _ClassVar[int]
    KEY_COUNT_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    FREE_PUBLIC_MEMORY_FIELD_NUMBER: _ClassVar[int]
    FREE_PRIVATE_MEMORY_FIELD_NUMBER: _ClassVar[int]
    name: str
    module: str
    profile: str
    manufacturer: str
    model: str
    serial: str
    label: str
    healthy: bool
    error: str
    algorithms: _containers.RepeatedScalarFieldContainer[str]
    key_count: int
    sessions: int
    free_public_memory: int
    free_private_memory: int
    def __init__(self, name: _Optional[str] = ..., module: _Optional[str] = ..., profile: _Optional[str] = ..., manufacturer: _Optional[str] = ..., model: _Optional[str] = ..., serial: _Optional[str] = ..., label: _Optional[str] = ..., healthy: _Optional[bool] = ..., error: _Optional[str] = ..., algorithms: _Optional[_Iterable[str]] = ..., key_count: _Optional[int] = ..., sessions: _Optional[int] = ..., free_public_memory: _Optional[int] = ..., free_private_memory: _Optional[int] = ...) -> None: ...

class ListTokensResponse(_message.Message):
    __slots__ = ("tokens",)
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedCompositeFieldContainer[TokenInfo]
    def __init__(self, tokens: _Optional[_Iterable[_Union[TokenInfo, _Mapping]]] = ...) -> None: ...

class CertifyKeyRequest(_message.Message):
    __slots__ = ("key_id", "subject", "issuer_key_id", "validity_days", "profile")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    ISSUER_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    VALIDITY_DAYS_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    subject: str
    issuer_key_id: str
    validity_days: int
    profile: CertificateProfile
    def __init__(self, key_id: _Optional[str] = ..., subject: _Optional[str] = ..., issuer_key_id: _Optional[str] = ..., validity_days: _Optional[int] = ..., profile: _Optional[_Union[CertificateProfile, str]] = ...) -> None: ...

class GetCertificateChainRequest(_message.Message):
    __slots__ = ("key_id",)
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    def __init__(self, key_id: _Optional[str] = ...) -> None: ...

class CertificateChain(_message.Message):
    __slots__ = ("key_id", "certificates")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATES_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    certificates: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, key_id: _Optional[str] = ..., certificates: _Optional[_Iterable[bytes]] = ...) -> None: ...

class SetKeyPurposeRequest(_message.Message):
    __slots__ = ("key_id", "purpose")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    PURPOSE_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    purpose: KeyPurpose
    def __init__(self, key_id: _Optional[str] = ..., purpose: _Optional[_Union[KeyPurpose, str]] = ...) -> None: ...

class GetStateRequest(_message.Message):
    __slots__ = ("gun",)
    GUN_FIELD_NUMBER: _ClassVar[int]
    gun: str
    def __init__(self, gun: _Optional[str] = ...) -> None: ...

class MetaVersion(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class RoleState(_message.Message):
    __slots__ = ("role", "version", "sha256", "signed_at", "meta")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIGNED_AT_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    role: str
    version: int
    sha256: str
    signed_at: str
    meta: _containers.RepeatedCompositeFieldContainer[MetaVersion]
    def __init__(self, role: _Optional[str] = ..., version: _Optional[int] = ..., sha256: _Optional[str] = ..., signed_at: _Optional[str] = ..., meta: _Optional[_Iterable[_Union[MetaVersion, _Mapping]]] = ...) -> None: ...

class GetStateResponse(_message.Message):
    __slots__ = ("gun", "roles")
    GUN_FIELD_NUMBER: _ClassVar[int]
    ROLES_FIELD_NUMBER: _ClassVar[int]
    gun: str
    roles: _containers.RepeatedCompositeFieldContainer[RoleState]
    def __init__(self, gun: _Optional[str] = ..., roles: _Optional[_Iterable[_Union[RoleState, _Mapping]]] = ...) -> None: ...

class ResetStateRequest(_message.Message):
    __slots__ = ("gun",)
    GUN_FIELD_NUMBER: _ClassVar[int]
    gun: str
    def __init__(self, gun: _Optional[str] = ...) -> None: ...

class ResetStateResponse(_message.Message):
    __slots__ = ("removed",)
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    removed: int
    def __init__(self, removed: _Optional[int] = ...) -> None: ...
