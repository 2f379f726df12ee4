"""The device: one frame in, one frame out, one command at a time.

A frame is command (1 byte) || length (2 bytes, big-endian) || payload; the
answer carries command | 0x80, or ERROR (0x7F) with one error byte. Outside a
session the device answers ECHO, DEVICE INFO, CREATE SESSION, AUTHENTICATE
SESSION and SESSION MESSAGE; everything else travels inside a session
(tests/_yubihsm/_scp03.py, _commands.py).

Limits as on the device: 16 sessions, a session idle for 30 s is gone (its
next message gets INVALID_SESSION), 256 objects.
"""

from __future__ import annotations

import struct
import threading
import time
from pathlib import Path

from tests._yubihsm._commands import HANDLERS
from tests._yubihsm._defs import (
    FIRMWARE,
    MAX_MESSAGE,
    MAX_SESSIONS,
    RESPONSE,
    SESSION_IDLE_SECONDS,
    Algorithm,
    Command,
    Error,
    ObjectType,
)
from tests._yubihsm._scp03 import CHALLENGE, Session, SessionError, keys_from_password
from tests._yubihsm._store import Store

FACTORY_PASSWORD = "password"  # noqa: S105 - authentication key 1's, on every new device
LOG_SIZE = 62  # audit log entries the device holds (none are written here)


def frame(command: int, payload: bytes = b"") -> bytes:
    """A frame: command, big-endian length, payload."""
    return struct.pack(">BH", command, len(payload)) + payload


def error(code: Error) -> bytes:
    return frame(Command.ERROR, bytes([code]))


class Device:
    """A software YubiHSM 2 whose objects live in ``state`` (a JSON file).

    ``password`` is the factory authentication key 1's ("password"); ``idle``
    seconds close an unused session (30 on the device)."""

    def __init__(self, state: Path, serial: int = 12345678, password: str = FACTORY_PASSWORD,
                 idle: float = SESSION_IDLE_SECONDS) -> None:
        self.store = Store(state)
        self.store.ensure_default_auth_key(*keys_from_password(password))
        self.serial = serial
        self.idle = idle
        self.sessions: dict[int, Session] = {}
        self.lock = threading.Lock()  # the device runs one command at a time
        self.commands = 0

    def handle(self, request: bytes) -> bytes:
        """Answer one request frame."""
        with self.lock:
            self.commands += 1
            self._expire()
            if len(request) < 3 or struct.unpack(">H", request[1:3])[0] != len(request) - 3:
                return error(Error.WRONG_LENGTH)
            if len(request) > MAX_MESSAGE:
                return error(Error.WRONG_LENGTH)
            command, payload = request[0], request[3:]
            try:
                if command == Command.ECHO:
                    return frame(command | RESPONSE, payload)
                if command == Command.DEVICE_INFO:
                    return frame(command | RESPONSE, self._device_info(payload))
                if command == Command.CREATE_SESSION:
                    return frame(command | RESPONSE, self._create_session(payload))
                if command == Command.AUTHENTICATE_SESSION:
                    self._session(payload, authenticated=False).authenticate(request)
                    return frame(command | RESPONSE)
                if command == Command.SESSION_MESSAGE:
                    return self._session_message(request)
                return error(Error.INVALID_COMMAND)
            except SessionError as e:
                return error(e.code)

    def _expire(self) -> None:
        now = time.monotonic()
        for sid in [s.sid for s in self.sessions.values() if now - s.used > self.idle]:
            del self.sessions[sid]

    def _device_info(self, payload: bytes) -> bytes:
        if payload == b"\x01":  # the second page: the part number
            return b"SOFTWARE-YUBIHSM2"
        if payload:
            raise SessionError(Error.INVALID_DATA)
        return struct.pack(">BBBIBB", *FIRMWARE, self.serial, LOG_SIZE, 0) + bytes(
            sorted(Algorithm))

    def _create_session(self, payload: bytes) -> bytes:
        if len(payload) != 2 + CHALLENGE:
            raise SessionError(Error.WRONG_LENGTH)
        (key_id,) = struct.unpack(">H", payload[:2])
        key = self.store.objects.get((key_id, ObjectType.AUTHENTICATION_KEY))
        if key is None:
            raise SessionError(Error.OBJECT_NOT_FOUND)
        free = [sid for sid in range(MAX_SESSIONS) if sid not in self.sessions]
        if not free:
            raise SessionError(Error.SESSIONS_FULL)
        session, answer = Session.create(free[0], key_id, key.value[:16], key.value[16:],
                                         key.domains, key.capabilities, payload[2:])
        self.sessions[session.sid] = session
        return bytes([session.sid]) + answer

    def _session(self, payload: bytes, authenticated: bool) -> Session:
        session = self.sessions.get(payload[0]) if payload else None
        if session is None or session.authenticated != authenticated:
            raise SessionError(Error.INVALID_SESSION)
        return session

    def _session_message(self, request: bytes) -> bytes:
        session = self._session(request[3:], authenticated=True)
        try:
            inner = session.unwrap(request)
        except SessionError:
            # A message that fails its MAC ends the session, as on the device.
            del self.sessions[session.sid]
            raise
        command, payload = inner[0], inner[3:]
        handler = HANDLERS.get(command)
        if command == Command.CLOSE_SESSION:
            answer = session.wrap(frame(command | RESPONSE))
            del self.sessions[session.sid]
            return answer
        try:
            if handler is None:
                raise SessionError(Error.INVALID_COMMAND)
            result = frame(command | RESPONSE, handler(session, self.store, payload))
        except SessionError as e:
            result = error(e.code)
        return session.wrap(result)
