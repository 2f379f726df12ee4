"""Low-level PKCS#11 pieces that python-pkcs11 does not offer.

Two problems are solved here, and nothing else:

1. python-pkcs11 calls ``C_Initialize(NULL)``. With NULL, SoftHSM turns off
   its internal locking (concurrent sessions then crash it), and YubiHSM's
   module refuses the call with CKR_ARGUMENTS_BAD. :class:`ThreadSafeLib`
   overrides ``initialize()`` so the module is initialised with
   ``CK_C_INITIALIZE_ARGS{flags=CKF_OS_LOCKING_OK}`` (PKCS#11 v2.40 §5.4).
   python-pkcs11 then believes it never initialised the module, so it never
   finalises it either: :meth:`ThreadSafeLib.close` calls ``C_Finalize``.

2. python-pkcs11 binds every key object to the session that found it. The
   signing path wants any pooled session to sign with a cached object
   handle (handles are valid in all sessions of an application, §2.4.1), so
   ``C_SignInit``/``C_Sign`` are called here through the module's own
   function list. ctypes releases the GIL for the duration of the call.
"""

from __future__ import annotations

import ctypes
import os
import re
from dataclasses import dataclass
from typing import Any

from pkcs11 import _pkcs11

CK_ULONG = ctypes.c_ulong
CK_RV = CK_ULONG
CKF_OS_LOCKING_OK = 0x2
CKR_OK = 0x0
CKR_CRYPTOKI_ALREADY_INITIALIZED = 0x191
CKR_PIN_INCORRECT = 0xA0
CKR_PIN_LOCKED = 0xA4
CKR_SESSION_COUNT = 0xB1  # the device has no session free
CKR_DEVICE_REMOVED = 0x32
CKR_USER_ALREADY_LOGGED_IN = 0x100
CKR_USER_NOT_LOGGED_IN = 0x101
CKU_USER = 1
CKR_ATTRIBUTE_SENSITIVE = 0x11
CKR_ATTRIBUTE_TYPE_INVALID = 0x12
CKR_BUFFER_TOO_SMALL = 0x150
CKA_CLASS = 0x0
CKA_LABEL = 0x3
CKA_ID = 0x102
CKA_KEY_TYPE = 0x100
CKA_MODULUS = 0x120
CKA_PUBLIC_EXPONENT = 0x122
CKA_EC_POINT = 0x181
CKA_VALUE = 0x11
CKA_CERTIFICATE_TYPE = 0x80
CKC_X_509 = 0x0
CKO_DATA = 0x0
CKO_CERTIFICATE = 0x1
CKO_PUBLIC_KEY = 0x2
CKO_PRIVATE_KEY = 0x3
_UNAVAILABLE = CK_ULONG(-1).value  # CK_UNAVAILABLE_INFORMATION
_FIND_CHUNK = 1024  # handles per C_FindObjects call
CKS_RO_USER_FUNCTIONS = 1
CKS_RW_USER_FUNCTIONS = 3

CKM_RSA_PKCS = 0x1
CKM_RSA_PKCS_PSS = 0xD
CKM_SHA256 = 0x250
CKM_SHA384 = 0x260
CKM_SHA512 = 0x270
CKM_ECDSA = 0x1041
CKM_EDDSA = 0x1057
CKG_MGF1_SHA256 = 0x2
CKG_MGF1_SHA384 = 0x3
CKG_MGF1_SHA512 = 0x4

# Return values that mean "the session or the login is gone": re-open, log
# in again and retry once.
SESSION_LOST = frozenset({0xB0, 0xB3, 0x101, 0x190})  # SESSION_CLOSED, _HANDLE_INVALID,
# USER_NOT_LOGGED_IN, CRYPTOKI_NOT_INITIALIZED
# Return values that mean "the device is gone or broken".
DEVICE_LOST = frozenset({0x30, 0x31, 0x32, 0xE0, 0xE1})  # DEVICE_ERROR, _MEMORY,
# _REMOVED, TOKEN_NOT_PRESENT, TOKEN_NOT_RECOGNIZED
HANDLE_LOST = frozenset({0x60, 0x82})  # KEY_HANDLE_INVALID, OBJECT_HANDLE_INVALID
DATA_INVALID = frozenset({0x20, 0x21})  # DATA_INVALID, DATA_LEN_RANGE
# KEY_FUNCTION_NOT_PERMITTED, KEY_TYPE_INCONSISTENT, MECHANISM_INVALID, MECHANISM_PARAM_INVALID,
# and a template the token refuses: ATTRIBUTE_TYPE_INVALID, ATTRIBUTE_VALUE_INVALID,
# TEMPLATE_INCOMPLETE, TEMPLATE_INCONSISTENT
NOT_SUPPORTED = frozenset({0x68, 0x63, 0x70, 0x71, 0x12, 0x13, 0xD0, 0xD1})

_NAMES = {
    0x5: "CKR_GENERAL_ERROR",
    0x6: "CKR_FUNCTION_FAILED",
    0x7: "CKR_ARGUMENTS_BAD",
    0x12: "CKR_ATTRIBUTE_TYPE_INVALID",
    0x13: "CKR_ATTRIBUTE_VALUE_INVALID",
    0x20: "CKR_DATA_INVALID",
    0x21: "CKR_DATA_LEN_RANGE",
    0x30: "CKR_DEVICE_ERROR",
    0x31: "CKR_DEVICE_MEMORY",
    0x32: "CKR_DEVICE_REMOVED",
    0x60: "CKR_KEY_HANDLE_INVALID",
    0x63: "CKR_KEY_TYPE_INCONSISTENT",
    0x68: "CKR_KEY_FUNCTION_NOT_PERMITTED",
    0x70: "CKR_MECHANISM_INVALID",
    0x71: "CKR_MECHANISM_PARAM_INVALID",
    0x82: "CKR_OBJECT_HANDLE_INVALID",
    0x90: "CKR_OPERATION_ACTIVE",
    0xA0: "CKR_PIN_INCORRECT",
    0xA4: "CKR_PIN_LOCKED",
    0xB0: "CKR_SESSION_CLOSED",
    0xB1: "CKR_SESSION_COUNT",
    0xB3: "CKR_SESSION_HANDLE_INVALID",
    0xE0: "CKR_TOKEN_NOT_PRESENT",
    0xE1: "CKR_TOKEN_NOT_RECOGNIZED",
    0x101: "CKR_USER_NOT_LOGGED_IN",
    0x102: "CKR_USER_PIN_NOT_INITIALIZED",
    0x150: "CKR_BUFFER_TOO_SMALL",
    0xD0: "CKR_TEMPLATE_INCOMPLETE",
    0xD1: "CKR_TEMPLATE_INCONSISTENT",
    0x190: "CKR_CRYPTOKI_NOT_INITIALIZED",
    0x191: "CKR_CRYPTOKI_ALREADY_INITIALIZED",
}


def rv_name(rv: int) -> str:
    return _NAMES.get(rv, f"CKR_0x{rv:08X}")


# python-pkcs11 raises one exception class per CK_RV and keeps no rv (its
# _pkcs11.pxd, map_rv_to_error). A class is named after its CK_RV in
# CamelCase, but for these:
_CLASS_RVS = {
    "AnotherUserAlreadyLoggedIn": "CKR_USER_ANOTHER_ALREADY_LOGGED_IN",
    "FunctionCancelled": "CKR_FUNCTION_CANCELED",
    "RandomNoRNG": "CKR_RANDOM_NO_RNG",
    "SessionReadWriteSOExists": "CKR_SESSION_READ_WRITE_SO_EXISTS",
    "SlotIDInvalid": "CKR_SLOT_ID_INVALID",
    "TokenNotRecognised": "CKR_TOKEN_NOT_RECOGNIZED",
}
# A few CK_RVs it raises as its base class, PKCS11Error, with a sentence of
# its own ("Initialisation error (not initialized). Should never see this.").
_PROSE_RVS = {
    "Buffer was too small": "CKR_BUFFER_TOO_SMALL",
    "Initialisation error (already initialized)": "CKR_CRYPTOKI_ALREADY_INITIALIZED",
    "Initialisation error (not initialized)": "CKR_CRYPTOKI_NOT_INITIALIZED",
    "Parallel not supported": "CKR_SESSION_PARALLEL_NOT_SUPPORTED",
    "User type invalid": "CKR_USER_TYPE_INVALID",
}
# Errors python-pkcs11 raises by itself (NoSuchKey, MultipleObjectsReturned...).
_NOT_RVS = frozenset({"NoSuchKey", "NoSuchToken", "MultipleObjectsReturned",
                      "MultipleTokensReturned"})
_RVS = {name: rv for rv, name in _NAMES.items()}
UNRECOGNISED = "an error the PKCS#11 module did not name"


def failure_name(e: Exception) -> str:
    """The CK_RV name (``"CKR_GENERAL_ERROR"``) behind a P11Error or a
    python-pkcs11 exception, else :data:`UNRECOGNISED`: what signerd's own
    messages say of a token's failure. python-pkcs11's class names and
    sentences (and anything else a module says) belong in the log only:
    :func:`failure_detail`."""
    if isinstance(e, P11Error):
        return rv_name(e.rv)
    kind = type(e).__name__
    if kind == "PKCS11Error":
        text = str(e)
        return next((rv for prose, rv in _PROSE_RVS.items() if text.startswith(prose)),
                    UNRECOGNISED)
    if kind in _NOT_RVS:
        return UNRECOGNISED
    return _CLASS_RVS.get(kind) or "CKR_" + re.sub(r"(?<!^)(?=[A-Z])", "_", kind).upper()


def failure_rv(e: Exception) -> int | None:
    """The CK_RV behind a P11Error or a python-pkcs11 exception, for those
    signerd acts on (:data:`_NAMES`); None otherwise."""
    if isinstance(e, P11Error):
        return e.rv
    return _RVS.get(failure_name(e))


def failure_detail(e: Exception) -> str:
    """Everything the library said about a failure, for the log: the
    exception's class and text (``"PKCS11Error: Initialisation error ..."``)."""
    text = str(e)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def ulong(value: int) -> bytes:
    """A CK_ULONG attribute value (CKA_CLASS, CKA_KEY_TYPE) as the module reads it."""
    return bytes(CK_ULONG(value))


class P11Error(Exception):
    """A PKCS#11 call returned something other than CKR_OK."""

    def __init__(self, function: str, rv: int) -> None:
        super().__init__(f"{function} failed: {rv_name(rv)}")
        self.function = function
        self.rv = rv


class _InitArgs(ctypes.Structure):
    _fields_ = [
        ("CreateMutex", ctypes.c_void_p),
        ("DestroyMutex", ctypes.c_void_p),
        ("LockMutex", ctypes.c_void_p),
        ("UnlockMutex", ctypes.c_void_p),
        ("flags", CK_ULONG),
        ("pReserved", ctypes.c_void_p),
    ]


class _SessionInfo(ctypes.Structure):
    _fields_ = [
        ("slotID", CK_ULONG),
        ("state", CK_ULONG),
        ("flags", CK_ULONG),
        ("ulDeviceError", CK_ULONG),
    ]


class _Version(ctypes.Structure):
    _fields_ = [("major", ctypes.c_ubyte), ("minor", ctypes.c_ubyte)]


class _TokenInfo(ctypes.Structure):
    """CK_TOKEN_INFO (PKCS#11 v2.40 §3.2)."""

    _fields_ = [
        ("label", ctypes.c_char * 32),
        ("manufacturerID", ctypes.c_char * 32),
        ("model", ctypes.c_char * 16),
        ("serialNumber", ctypes.c_char * 16),
        ("flags", CK_ULONG),
        ("ulMaxSessionCount", CK_ULONG),
        ("ulSessionCount", CK_ULONG),
        ("ulMaxRwSessionCount", CK_ULONG),
        ("ulRwSessionCount", CK_ULONG),
        ("ulMaxPinLen", CK_ULONG),
        ("ulMinPinLen", CK_ULONG),
        ("ulTotalPublicMemory", CK_ULONG),
        ("ulFreePublicMemory", CK_ULONG),
        ("ulTotalPrivateMemory", CK_ULONG),
        ("ulFreePrivateMemory", CK_ULONG),
        ("hardwareVersion", _Version),
        ("firmwareVersion", _Version),
        ("utcTime", ctypes.c_char * 16),
    ]


@dataclass(frozen=True)
class TokenInfo:
    """What C_GetTokenInfo says of a token. Text fields are the blank-padded
    CK_UTF8CHAR fields with the padding stripped; a memory figure the token
    does not report (CK_UNAVAILABLE_INFORMATION) is None, in bytes otherwise."""

    label: str
    manufacturer: str
    model: str
    serial: str
    free_public_memory: int | None
    free_private_memory: int | None
    max_sessions: int | None


class _Mechanism(ctypes.Structure):
    _fields_ = [
        ("mechanism", CK_ULONG),
        ("pParameter", ctypes.c_void_p),
        ("ulParameterLen", CK_ULONG),
    ]


class _PssParams(ctypes.Structure):
    _fields_ = [("hashAlg", CK_ULONG), ("mgf", CK_ULONG), ("sLen", CK_ULONG)]


class _Attribute(ctypes.Structure):
    _fields_ = [("type", CK_ULONG), ("pValue", ctypes.c_void_p), ("ulValueLen", CK_ULONG)]


# CK_FUNCTION_LIST up to C_Sign, in the order of PKCS#11 v2.40 §5.2 (the
# struct is only read through the module's pointer, so the tail is omitted).
_FUNCTIONS = (
    "C_Initialize C_Finalize C_GetInfo C_GetFunctionList C_GetSlotList C_GetSlotInfo "
    "C_GetTokenInfo C_GetMechanismList C_GetMechanismInfo C_InitToken C_InitPIN C_SetPIN "
    "C_OpenSession C_CloseSession C_CloseAllSessions C_GetSessionInfo C_GetOperationState "
    "C_SetOperationState C_Login C_Logout C_CreateObject C_CopyObject C_DestroyObject "
    "C_GetObjectSize C_GetAttributeValue C_SetAttributeValue C_FindObjectsInit C_FindObjects "
    "C_FindObjectsFinal C_EncryptInit C_Encrypt C_EncryptUpdate C_EncryptFinal C_DecryptInit "
    "C_Decrypt C_DecryptUpdate C_DecryptFinal C_DigestInit C_Digest C_DigestUpdate C_DigestKey "
    "C_DigestFinal C_SignInit C_Sign"
).split()


class _FunctionList(ctypes.Structure):
    _fields_ = [("major", ctypes.c_ubyte), ("minor", ctypes.c_ubyte)] + [
        (name, ctypes.c_void_p) for name in _FUNCTIONS
    ]


_P = ctypes.POINTER
_ULONG_P = _P(CK_ULONG)
_C_Initialize = ctypes.CFUNCTYPE(CK_RV, ctypes.c_void_p)
_C_Finalize = ctypes.CFUNCTYPE(CK_RV, ctypes.c_void_p)
_C_InitToken = ctypes.CFUNCTYPE(CK_RV, CK_ULONG, ctypes.c_char_p, CK_ULONG, ctypes.c_char_p)
_C_CloseAllSessions = ctypes.CFUNCTYPE(CK_RV, CK_ULONG)
_C_Login = ctypes.CFUNCTYPE(CK_RV, CK_ULONG, CK_ULONG, ctypes.c_char_p, CK_ULONG)
_C_Logout = ctypes.CFUNCTYPE(CK_RV, CK_ULONG)
_C_GetSessionInfo = ctypes.CFUNCTYPE(CK_RV, CK_ULONG, ctypes.c_void_p)
_C_GetTokenInfo = ctypes.CFUNCTYPE(CK_RV, CK_ULONG, ctypes.c_void_p)
_C_SignInit = ctypes.CFUNCTYPE(CK_RV, CK_ULONG, _P(_Mechanism), CK_ULONG)
_C_Sign = ctypes.CFUNCTYPE(CK_RV, CK_ULONG, ctypes.c_char_p, CK_ULONG, ctypes.c_char_p, _ULONG_P)
_C_GetAttributeValue = ctypes.CFUNCTYPE(CK_RV, CK_ULONG, CK_ULONG, _P(_Attribute), CK_ULONG)
_C_FindObjectsInit = ctypes.CFUNCTYPE(CK_RV, CK_ULONG, _P(_Attribute), CK_ULONG)
_C_FindObjects = ctypes.CFUNCTYPE(CK_RV, CK_ULONG, _ULONG_P, CK_ULONG, _ULONG_P)
_C_FindObjectsFinal = ctypes.CFUNCTYPE(CK_RV, CK_ULONG)
_C_DestroyObject = ctypes.CFUNCTYPE(CK_RV, CK_ULONG, CK_ULONG)


@dataclass(frozen=True)
class Mechanism:
    """A mechanism with its parameters spelled out: no library defaults."""

    mechanism: int
    pss_hash: int = 0
    pss_mgf: int = 0
    pss_salt: int = 0

    def _struct(self) -> tuple[_Mechanism, Any]:
        if self.mechanism != CKM_RSA_PKCS_PSS:
            return _Mechanism(self.mechanism, None, 0), None
        params = _PssParams(self.pss_hash, self.pss_mgf, self.pss_salt)
        return (
            _Mechanism(
                self.mechanism,
                ctypes.cast(ctypes.pointer(params), ctypes.c_void_p),
                ctypes.sizeof(params),
            ),
            params,  # keep alive for the duration of the call
        )


class Module:
    """A loaded PKCS#11 module's function list, for the calls made here."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._dll = ctypes.CDLL(path)  # same handle as python-pkcs11's dlopen
        funcs = _P(_FunctionList)()
        rv = self._dll.C_GetFunctionList(ctypes.byref(funcs))
        if rv != CKR_OK:
            raise P11Error("C_GetFunctionList", rv)
        fl = funcs.contents
        self._initialize = _C_Initialize(fl.C_Initialize)
        self._finalize = _C_Finalize(fl.C_Finalize)
        self._init_token = _C_InitToken(fl.C_InitToken)
        self._close_all = _C_CloseAllSessions(fl.C_CloseAllSessions)
        self._login = _C_Login(fl.C_Login)
        self._logout = _C_Logout(fl.C_Logout)
        self._session_info = _C_GetSessionInfo(fl.C_GetSessionInfo)
        self._token_info = _C_GetTokenInfo(fl.C_GetTokenInfo)
        self._sign_init = _C_SignInit(fl.C_SignInit)
        self._sign = _C_Sign(fl.C_Sign)
        self._get_attribute_value = _C_GetAttributeValue(fl.C_GetAttributeValue)
        self._find_init = _C_FindObjectsInit(fl.C_FindObjectsInit)
        self._find = _C_FindObjects(fl.C_FindObjects)
        self._find_final = _C_FindObjectsFinal(fl.C_FindObjectsFinal)
        self._destroy = _C_DestroyObject(fl.C_DestroyObject)

    def initialize(self) -> None:
        args = _InitArgs(None, None, None, None, CKF_OS_LOCKING_OK, None)
        rv = self._initialize(ctypes.cast(ctypes.pointer(args), ctypes.c_void_p))
        if rv not in (CKR_OK, CKR_CRYPTOKI_ALREADY_INITIALIZED):
            raise P11Error("C_Initialize", rv)

    def finalize(self) -> None:
        rv = self._finalize(None)
        if rv not in (CKR_OK, 0x190):  # already finalised is fine at shutdown
            raise P11Error("C_Finalize", rv)

    def init_token(self, slot_id: int, so_pin: bytes, label: str) -> None:
        """C_InitToken: the label is blank-padded to 32 bytes (§5.6)."""
        padded = label.encode().ljust(32, b" ")[:32]
        rv = self._init_token(slot_id, so_pin, len(so_pin), padded)
        if rv != CKR_OK:
            raise P11Error("C_InitToken", rv)

    def close_all_sessions(self, slot_id: int) -> None:
        rv = self._close_all(slot_id)
        if rv != CKR_OK:
            raise P11Error("C_CloseAllSessions", rv)

    def login(self, session: int, pin: bytes) -> None:
        """C_Login as CKU_USER. Unlike python-pkcs11's ``open(user_pin=)``, a
        refused PIN leaks no session: the caller owns and closes it."""
        rv = self._login(session, CKU_USER, pin, len(pin))
        if rv not in (CKR_OK, CKR_USER_ALREADY_LOGGED_IN):
            raise P11Error("C_Login", rv)

    def logout(self, session: int) -> None:
        self._logout(session)  # best effort, at shutdown

    def session_state(self, session: int) -> int:
        """CK_SESSION_INFO.state: CKS_RO_USER_FUNCTIONS (1) or CKS_RW_USER_FUNCTIONS (3)
        when logged in."""
        info = _SessionInfo()
        rv = self._session_info(session, ctypes.byref(info))
        if rv != CKR_OK:
            raise P11Error("C_GetSessionInfo", rv)
        return int(info.state)

    def token_info(self, slot_id: int) -> TokenInfo:
        """C_GetTokenInfo for ``slot_id``: no session needed, and every module
        here answers it from the token's store or device, so it doubles as the
        health probe (SoftHSM 2.6.1 answers CKR_GENERAL_ERROR once the token's
        directory is gone, and until the module is initialised again).
        python-pkcs11's Token does not carry the memory figures.

        Raises P11Error."""
        info = _TokenInfo()
        rv = self._token_info(slot_id, ctypes.byref(info))
        if rv != CKR_OK:
            raise P11Error("C_GetTokenInfo", rv)

        def text(raw: bytes) -> str:
            return raw.decode("utf-8", "replace").rstrip(" \x00")

        def number(value: int) -> int | None:
            return None if value == _UNAVAILABLE else int(value)

        return TokenInfo(
            text(bytes(info.label)),
            text(bytes(info.manufacturerID)),
            text(bytes(info.model)),
            text(bytes(info.serialNumber)),
            number(info.ulFreePublicMemory),
            number(info.ulFreePrivateMemory),
            # 0 is CK_EFFECTIVELY_INFINITE
            None if info.ulMaxSessionCount in (0, _UNAVAILABLE) else int(info.ulMaxSessionCount),
        )

    def logged_in(self, session: int) -> bool:
        """Whether ``session`` acts for the logged-in user."""
        return self.session_state(session) in (CKS_RO_USER_FUNCTIONS, CKS_RW_USER_FUNCTIONS)

    def sign(
        self, session: int, key: int, mechanism: Mechanism, data: bytes, max_len: int
    ) -> bytes:
        """One C_SignInit + C_Sign on ``session`` with the object ``key``."""
        mech, keepalive = mechanism._struct()
        rv = self._sign_init(session, ctypes.byref(mech), key)
        if rv != CKR_OK:
            raise P11Error("C_SignInit", rv)
        out = ctypes.create_string_buffer(max_len)
        out_len = CK_ULONG(max_len)
        rv = self._sign(session, data, len(data), out, ctypes.byref(out_len))
        del keepalive
        if rv != CKR_OK:
            raise P11Error("C_Sign", rv)
        return out.raw[: out_len.value]

    # Listing keys. python-pkcs11's get_objects() builds a Python object per
    # handle with several C_GetAttributeValue calls each; with 10,000 keys on
    # a token that dominated daemon start. These calls read only what
    # signerd needs, many handles per C_FindObjects.

    def find_objects(self, session: int, template: dict[int, bytes]) -> list[int]:
        """Every object handle matching ``template`` (attribute type -> the
        attribute's encoded value, e.g. CKA_CLASS as a native CK_ULONG)."""
        keep = [ctypes.create_string_buffer(v, len(v)) for v in template.values()]
        attrs = (_Attribute * max(1, len(template)))(*[
            _Attribute(t, ctypes.cast(b, ctypes.c_void_p), len(v))
            for (t, v), b in zip(template.items(), keep, strict=True)
        ])
        rv = self._find_init(session, attrs, len(template))
        if rv != CKR_OK:
            raise P11Error("C_FindObjectsInit", rv)
        found: list[int] = []
        chunk = (CK_ULONG * _FIND_CHUNK)()
        count = CK_ULONG(0)
        try:
            while True:
                rv = self._find(session, chunk, _FIND_CHUNK, ctypes.byref(count))
                if rv != CKR_OK:
                    raise P11Error("C_FindObjects", rv)
                found.extend(chunk[: count.value])
                if count.value < _FIND_CHUNK:
                    return found
        finally:
            self._find_final(session)  # must end the search even after an error

    def destroy(self, session: int, handle: int) -> None:
        """C_DestroyObject: objects are destroyed by the handles the key
        index keeps, with no search. Raises P11Error."""
        rv = self._destroy(session, handle)
        if rv != CKR_OK:
            raise P11Error("C_DestroyObject", rv)

    def attribute_reader(self, sizes: dict[int, int]) -> AttributeReader:
        """A reader of the attributes ``sizes`` names (type -> expected size)."""
        return AttributeReader(self, sizes)

    def get_attributes(self, session: int, handle: int,
                       sizes: dict[int, int]) -> dict[int, bytes | None]:
        """Read the attributes ``sizes`` names with one C_GetAttributeValue
        (see :class:`AttributeReader`)."""
        return AttributeReader(self, sizes).read(session, handle)

    def _attribute_lengths(self, session: int, handle: int, types: list[int]) -> list[int]:
        """§5.7: with NULL buffers, C_GetAttributeValue reports each length."""
        attrs = (_Attribute * len(types))(*[_Attribute(t, None, 0) for t in types])
        rv = self._get_attribute_value(session, handle, attrs, len(types))
        if rv not in (CKR_OK, CKR_ATTRIBUTE_SENSITIVE, CKR_ATTRIBUTE_TYPE_INVALID):
            raise P11Error("C_GetAttributeValue", rv)
        return [1 if a.ulValueLen == _UNAVAILABLE else int(a.ulValueLen) for a in attrs]


class AttributeReader:
    """Reads a fixed set of attributes from object after object.

    The CK_ATTRIBUTE array and its buffers are built once and reused:
    listing a 10,000-key token makes 20,000 calls, and building them per call
    cost a quarter of the listing. A value larger than its expected size is
    read again at its real size. An attribute the object lacks (or keeps
    secret) comes back as None.
    """

    def __init__(self, module: Module, sizes: dict[int, int]) -> None:
        self._module = module
        self._types = list(sizes)
        self._sizes = [sizes[t] for t in self._types]
        self._bufs = [ctypes.create_string_buffer(n) for n in self._sizes]
        self._attrs = (_Attribute * len(self._types))(*[
            _Attribute(t, ctypes.cast(b, ctypes.c_void_p), n)
            for t, b, n in zip(self._types, self._bufs, self._sizes, strict=True)
        ])

    def read(self, session: int, handle: int) -> dict[int, bytes | None]:
        attrs = self._attrs
        for a, n in zip(attrs, self._sizes, strict=True):
            a.ulValueLen = n  # the module overwrote it with the value's length
        rv = self._module._get_attribute_value(session, handle, attrs, len(self._types))
        if rv == CKR_BUFFER_TOO_SMALL:
            # A too-small buffer gets CK_UNAVAILABLE_INFORMATION, not its length.
            lengths = self._module._attribute_lengths(session, handle, self._types)
            if lengths == self._sizes:
                raise P11Error("C_GetAttributeValue", rv)
            return AttributeReader(self._module, dict(zip(self._types, lengths, strict=True))
                                   ).read(session, handle)
        if rv not in (CKR_OK, CKR_ATTRIBUTE_SENSITIVE, CKR_ATTRIBUTE_TYPE_INVALID):
            raise P11Error("C_GetAttributeValue", rv)
        return {t: None if a.ulValueLen == _UNAVAILABLE else ctypes.string_at(b, a.ulValueLen)
                for t, a, b in zip(self._types, attrs, self._bufs, strict=True)}


class ThreadSafeLib(_pkcs11.lib):
    """python-pkcs11's ``lib``, initialised with CKF_OS_LOCKING_OK.

    Create it with :func:`load`; python-pkcs11's cached ``pkcs11.lib()``
    would initialise with NULL.
    """

    module: Module

    def initialize(self) -> None:
        # Called by lib.__init__ (cpdef, so this override is honoured).
        self.module = Module(self.so)
        self.module.initialize()

    def close(self) -> None:
        self.module.finalize()


def load(path: str) -> ThreadSafeLib:
    """Load and initialise the module at ``path``, safely for many threads."""
    return ThreadSafeLib(path)


def missing_module(path: str) -> str | None:
    """Why ``path``, a PKCS#11 module, cannot be loaded before dlopen tries:
    ``"PKCS#11 module PATH does not exist"`` (or ``is not a file``); None
    when it is a file, or a bare name left to the loader's search path."""
    if "/" not in path:
        return None
    if not os.path.exists(path):
        return f"PKCS#11 module {path} does not exist"
    return None if os.path.isfile(path) else f"PKCS#11 module {path} is not a file"


def load_error(path: str, e: Exception) -> str:
    """What dlopen said when it could not load ``path`` (python-pkcs11 wraps
    it as ``OS exception while loading PATH: PATH: REASON``), else the
    failure's CK_RV name; for tpm2-pkcs11, with the TCTI it tried to reach
    the TPM through (its C_Initialize fails CKR_GENERAL_ERROR when the TCTI
    cannot be opened: tpm2-abrmd not on the system D-Bus, no /dev/tpmrm0)."""
    text = str(e)
    prefix = f"OS exception while loading {path}: "
    if isinstance(e, OSError) or text.startswith(prefix):
        return text.removeprefix(prefix).removeprefix(f"{path}: ")
    name = failure_name(e)
    if "tpm2_pkcs11" in os.path.basename(path) and name == "CKR_GENERAL_ERROR":
        tcti = os.environ.get("TPM2_PKCS11_TCTI")
        which = (f'TCTI "{tcti}" (TPM2_PKCS11_TCTI)' if tcti
                 else "the default TCTI (TPM2_PKCS11_TCTI unset)")
        return (f"{name}: tpm2-pkcs11 could not reach the TPM through {which}; \"tabrmd\" "
                "needs tpm2-abrmd on the system D-Bus (\"tabrmd:bus_type=session\" for a "
                "session bus), a real TPM is \"device:/dev/tpmrm0\"")
    return name
