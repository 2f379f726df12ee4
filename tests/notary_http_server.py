"""A small notary-server for tests: same HTTP API, same minimal checks on upload.

Routes (notary's server/server.go):
  GET  /v2/                                   → 200 {}
  GET  /v2/GUN/_trust/tuf/{timestamp|snapshot}.key
  POST /v2/GUN/_trust/tuf/{timestamp|snapshot}.key   a new (pending) key, as RotateKeyHandler
  POST /v2/GUN/_trust/tuf/                    multipart, field "files", filename = role
  GET  /v2/GUN/_trust/tuf/ROLE.json | ROLE.<sha256>.json | N.ROLE.json

On upload it does what notary-server's validateUpdate does, in small: root
must be signed by its own keys (and by the previous root's when it changes),
and its version must be the current one or the next; every targets file must
be signed by the keys its parent lists; every stored version only goes up.
It then signs snapshot (unless uploaded) and timestamp with keys it gets from
``key_provider(gun, role)``, which returns a TrustSigner: a SoftwareSigner in
unit tests, a signer that goes through signerd in the end-to-end test. A
rotated key is pending until a root.json that lists it is accepted; from then
on the server signs with it.

Auth: basic, a fixed bearer token, or registry tokens (``token_auth``): a
request without a valid token is answered 401 with a Bearer challenge naming
the realm of a :class:`TokenServer`, and each route needs the actions
notary-server's router gives it (server/server.go): ``pull`` for metadata,
``push,pull`` for uploads and GET .key, ``*`` for POST .key.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import re
import secrets
import ssl
import threading
import urllib.parse
from collections.abc import Callable
from datetime import UTC, datetime
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

from signerd.trust import (
    Envelope,
    FileMeta,
    Root,
    Snapshot,
    Targets,
    Timestamp,
    TrustSigner,
    VerificationError,
    default_expires,
    sign_envelope,
    verify_role,
    verify_root,
)
from signerd.trust.repo import signer_key

KeyProvider = Callable[[str, str], TrustSigner]

_ROLE = r"root|targets(?:/[^/\s]+)*|snapshot|timestamp"
_META = re.compile(rf"^/v2/(?P<gun>[^*]+?)/_trust/tuf/(?:(?P<version>\d+)\.)?(?P<role>{_ROLE})"
                   r"(?:\.(?P<checksum>[0-9a-f]{64}))?\.json$")
_KEY = re.compile(r"^/v2/(?P<gun>[^*]+?)/_trust/tuf/(?P<role>snapshot|timestamp)\.key$")
_POST = re.compile(r"^/v2/(?P<gun>[^*]+?)/_trust/tuf/$")


class UpdateRejected(Exception):
    """An upload notary-server would refuse (HTTP 400)."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)


class _Serving:
    """An HTTP server (``httpd``) served by ``thread`` inside a ``with``."""

    httpd: ThreadingHTTPServer
    thread: threading.Thread

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


class NotaryTestServer(_Serving):
    """Threaded HTTP(S) server on 127.0.0.1 and an ephemeral port. Use as a context manager."""

    def __init__(
        self,
        key_provider: KeyProvider,
        *,
        tls: tuple[str, str] | None = None,
        basic_auth: tuple[str, str] | None = None,
        bearer_token: str | None = None,
        token_auth: TokenServer | None = None,
    ) -> None:
        self.key_provider = key_provider
        self.basic_auth = basic_auth
        self.bearer_token = bearer_token
        self.token_auth = token_auth
        self.pending_keys: dict[tuple[str, str], list[TrustSigner]] = {}
        # gun → role → list of (version, bytes), oldest first
        self.store: dict[str, dict[str, list[tuple[int, bytes]]]] = {}
        self.keys: dict[tuple[str, str], TrustSigner] = {}
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.httpd.daemon_threads = True
        self.scheme = "http"
        if tls is not None:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(*tls)
            self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
            self.scheme = "https"
        # A short poll interval keeps shutdown (and so each test) fast.
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.httpd.server_address[1]}"

    # --- storage -------------------------------------------------------------

    def current(self, gun: str, role: str) -> bytes | None:
        versions = self.store.get(gun, {}).get(role)
        return versions[-1][1] if versions else None

    def current_version(self, gun: str, role: str) -> int:
        versions = self.store.get(gun, {}).get(role)
        return versions[-1][0] if versions else 0

    def key(self, gun: str, role: str) -> TrustSigner:
        with self.lock:
            if (gun, role) not in self.keys:
                self.keys[(gun, role)] = self.key_provider(gun, role)
            return self.keys[(gun, role)]

    def rotate_key(self, gun: str, role: str) -> TrustSigner:
        """A new key for ``role``, used once a published root.json lists it."""
        with self.lock:
            signer = self.key_provider(gun, role)
            self.pending_keys.setdefault((gun, role), []).append(signer)
            return signer

    # --- update validation (notary's server/handlers/validation.go) -----------

    def apply_update(self, gun: str, uploads: dict[str, bytes]) -> None:
        now = datetime.now(UTC)
        with self.lock:
            updates: dict[str, tuple[int, bytes]] = {}
            prev_root = self.current(gun, "root")
            if "root" in uploads:
                current = self.current_version(gun, "root")
                root = self._check(lambda: verify_root(gun, uploads["root"], trusted_root=prev_root,
                                                        now=now), "bad_root")
                if prev_root is not None and root.version not in (current, current + 1):
                    raise UpdateRejected("bad_root", f"root version must be {current + 1}")
                updates["root"] = (root.version, uploads["root"])
            elif prev_root is None:
                raise UpdateRejected("validation", "no pre-existing root and no root provided")
            else:
                root = Root.from_dict(Envelope.from_bytes(prev_root, "root").signed)

            loaded: dict[str, Targets] = {}

            def parent_of(role: str) -> Targets:
                name = role.rsplit("/", 1)[0]
                if name not in loaded:
                    data = self.current(gun, name)
                    if data is None:
                        raise UpdateRejected("bad_hierarchy", f"{name} must exist before {role}")
                    loaded[name] = Targets.from_dict(Envelope.from_bytes(data, name).signed, name)
                return loaded[name]

            for role in sorted(r for r in uploads if r == "targets" or r.startswith("targets/")):
                if role == "targets":
                    keys, threshold = root.role_keys("targets"), root.roles["targets"].threshold
                else:
                    parent = parent_of(role)
                    entry = parent.delegation(role)
                    if entry is None:
                        raise UpdateRejected("bad_targets", f"{role} is not delegated")
                    keys, threshold = parent.delegation_role_keys(role), entry.threshold
                signed = self._check(
                    functools.partial(verify_role, role, uploads[role], keys, threshold, now=now),
                    "bad_targets")
                assert isinstance(signed, Targets)
                loaded[role] = signed
                updates[role] = (signed.version, uploads[role])

            if "snapshot" in uploads:
                snap = self._check(lambda: verify_role(
                    "snapshot", uploads["snapshot"], root.role_keys("snapshot"),
                    root.roles["snapshot"].threshold, now=now), "bad_snapshot")
                updates["snapshot"] = (snap.version, uploads["snapshot"])
            else:
                updates["snapshot"] = self._make_snapshot(gun, root, updates, now)
            updates["timestamp"] = self._make_timestamp(gun, root, updates["snapshot"][1], now)

            for role, (version, _) in updates.items():
                if version <= self.current_version(gun, role):
                    raise UpdateRejected("old_version", f"{role} version {version} is not new")
            space = self.store.setdefault(gun, {})
            for role, update in updates.items():
                space.setdefault(role, []).append(update)

    @staticmethod
    def _check(fn: Callable[[], Any], code: str) -> Any:
        try:
            return fn()
        except VerificationError as e:
            raise UpdateRejected(code, str(e)) from None

    def _server_signer(self, gun: str, root: Root, role: str) -> tuple[str, TrustSigner]:
        signer = self.keys.get((gun, role))
        keys = root.role_keys(role)
        for pending in self.pending_keys.get((gun, role), []):
            if signer_key(pending).key_id in keys:  # the new root adopts a rotated key
                signer = self.keys[(gun, role)] = pending
                self.pending_keys[(gun, role)].remove(pending)
                break
        if signer is None or signer_key(signer).key_id not in keys:
            raise UpdateRejected(
                "bad_hierarchy",
                f"no {role} was included in update and server does not hold current {role} key",
            )
        return signer_key(signer).key_id, signer

    def _make_snapshot(self, gun: str, root: Root, updates: dict[str, tuple[int, bytes]],
                       now: datetime) -> tuple[int, bytes]:
        kid, signer = self._server_signer(gun, root, "snapshot")
        roles = set(self.store.get(gun, {})) | set(updates)
        meta = {}
        for role in sorted(roles - {"snapshot", "timestamp"}):
            data = updates[role][1] if role in updates else self.current(gun, role)
            assert data is not None
            meta[role] = FileMeta.for_bytes(data)
        version = self.current_version(gun, "snapshot") + 1
        body = Snapshot(version=version, expires=default_expires("snapshot", now), meta=meta)
        return version, sign_envelope(body, {kid: signer}).to_bytes()

    def _make_timestamp(self, gun: str, root: Root, snapshot: bytes,
                        now: datetime) -> tuple[int, bytes]:
        kid, signer = self._server_signer(gun, root, "timestamp")
        version = self.current_version(gun, "timestamp") + 1
        body = Timestamp(version=version, expires=default_expires("timestamp", now),
                         meta={"snapshot": FileMeta.for_bytes(snapshot)})
        return version, sign_envelope(body, {kid: signer}).to_bytes()


def _handler(server: NotaryTestServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        _challenge: str | None = None  # the Bearer challenge for this request's 401

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib name
            pass  # keep test output clean

        def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            if status == 401:
                challenge = self._challenge or 'Basic realm="notary"'
                self.send_header("WWW-Authenticate", challenge)
            self.end_headers()
            self.wfile.write(body)

        def _error(self, status: int, code: str, message: str) -> None:
            doc = {"errors": [{"code": code.upper(), "message": message, "detail": None}]}
            self._send(status, json.dumps(doc).encode())

        def _authorized(self, actions: str = "pull", gun: str = "") -> bool:
            header = self.headers.get("Authorization", "")
            if server.token_auth is not None:
                if server.token_auth.allows(header, gun, actions):
                    return True
                self._challenge = server.token_auth.challenge(gun, actions)
                return False
            if server.bearer_token is not None:
                return header == f"Bearer {server.bearer_token}"
            if server.basic_auth is not None:
                pair = base64.b64encode(":".join(server.basic_auth).encode()).decode()
                return header == f"Basic {pair}"
            return True

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            server.requests.append(("GET", self.path))
            m = _KEY.match(self.path) or _META.match(self.path)
            actions = "push,pull" if _KEY.match(self.path) else "pull"
            if not self._authorized(actions, m["gun"] if m else ""):
                return self._error(401, "unauthorized", "authentication required")
            if self.path == "/v2/":
                return self._send(200, b"{}")
            if m := _KEY.match(self.path):
                key = signer_key(server.key(m["gun"], m["role"]))
                return self._send(200, json.dumps(key.to_dict()).encode())
            if m := _META.match(self.path):
                versions = server.store.get(m["gun"], {}).get(m["role"], [])
                for version, data in reversed(versions):
                    if m["version"] is not None and int(m["version"]) != version:
                        continue
                    if m["checksum"] and hashlib.sha256(data).hexdigest() != m["checksum"]:
                        continue
                    return self._send(200, data)
                return self._error(404, "metadata_not_found", "metadata not found")
            return self._error(404, "not_found", "not found")

        def do_POST(self) -> None:  # noqa: N802
            server.requests.append(("POST", self.path))
            if k := _KEY.match(self.path):
                if not self._authorized("*", k["gun"]):
                    return self._error(401, "unauthorized", "authentication required")
                key = signer_key(server.rotate_key(k["gun"], k["role"]))
                return self._send(200, json.dumps(key.to_dict()).encode())
            m = _POST.match(self.path)
            if not self._authorized("push,pull", m["gun"] if m else ""):
                return self._error(401, "unauthorized", "authentication required")
            if not m:
                return self._error(404, "not_found", "not found")
            length = int(self.headers.get("Content-Length", "0"))
            body = self.rfile.read(length)
            try:
                uploads = _parse_multipart(self.headers.get("Content-Type", ""), body)
                server.apply_update(m["gun"], uploads)
            except UpdateRejected as e:
                return self._error(400, e.code, str(e))
            except (ValueError, VerificationError) as e:
                return self._error(400, "malformed_upload", str(e))
            return self._send(200, b"{}")

    return Handler


def _parse_multipart(content_type: str, body: bytes) -> dict[str, bytes]:
    if not content_type.startswith("multipart/form-data"):
        raise ValueError("expected multipart/form-data")
    msg = BytesParser(policy=HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body
    )
    files: dict[str, bytes] = {}
    for part in msg.iter_parts():
        if part.get_param("name", header="content-disposition") != "files":
            raise ValueError("every part must be a 'files' field")
        role = part.get_filename()
        payload = part.get_payload(decode=True)
        if not role or not re.fullmatch(_ROLE, role) or not isinstance(payload, bytes):
            raise ValueError(f"bad part for role {role!r}")
        files[role] = payload
    return files


class TokenServer(_Serving):
    """A registry token server (Docker's token auth), started by the test.

    ``GET /token?service=S&scope=repository:GUN:ACTIONS`` with the basic
    credentials (if set) returns ``{"token": ...}`` granting those actions.
    ``requests`` records each (scope, Authorization header).
    """

    def __init__(self, service: str = "notary.test", basic_auth: tuple[str, str] | None = None
                 ) -> None:
        self.service = service
        self.basic_auth = basic_auth
        self.grants: dict[str, tuple[str, frozenset[str]]] = {}  # token → (gun, actions)
        self.requests: list[tuple[str, str]] = []
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _token_handler(self))
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/token"

    def challenge(self, gun: str, actions: str) -> str:
        scope = f"repository:{gun}:{actions}"
        return f'Bearer realm="{self.realm}",service="{self.service}",scope="{scope}"'

    def allows(self, header: str, gun: str, actions: str) -> bool:
        if not header.startswith("Bearer "):
            return False
        granted = self.grants.get(header[len("Bearer "):])
        if granted is None or granted[0] != gun:
            return False
        return "*" in granted[1] or set(actions.split(",")) <= granted[1]

    def issue(self, scope: str) -> str | None:
        parts = scope.split(":")
        if len(parts) != 3 or parts[0] != "repository":
            return None
        token = secrets.token_hex(16)
        self.grants[token] = (parts[1], frozenset(parts[2].split(",")))
        return token


def _token_handler(server: TokenServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib name
            pass

        def _send(self, status: int, doc: dict[str, Any]) -> None:
            body = json.dumps(doc).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            url = urllib.parse.urlsplit(self.path)
            query = urllib.parse.parse_qs(url.query)
            scope = query.get("scope", [""])[0]
            header = self.headers.get("Authorization", "")
            server.requests.append((scope, header))
            if server.basic_auth is not None:
                pair = base64.b64encode(":".join(server.basic_auth).encode()).decode()
                if header != f"Basic {pair}":
                    return self._send(401, {"errors": [{"message": "bad credentials"}]})
            if url.path != "/token" or query.get("service", [""])[0] != server.service:
                return self._send(400, {"errors": [{"message": "bad request"}]})
            token = server.issue(scope)
            if token is None:
                return self._send(400, {"errors": [{"message": "bad scope"}]})
            return self._send(200, {"token": token, "expires_in": 300})

    return Handler
