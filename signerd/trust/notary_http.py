"""notary-server's HTTP API: publish, pull, fetch and rotate server-managed keys.

Endpoints as in notary's server/server.go and storage/httpstore.go:
``POST /v2/GUN/_trust/tuf/`` (multipart, field ``files``, filename = role),
``GET /v2/GUN/_trust/tuf/ROLE.json``, ``GET /v2/GUN/_trust/tuf/ROLE.key`` and
``POST /v2/GUN/_trust/tuf/ROLE.key`` (a new key; notary's RotateKeyHandler).

Registry token auth, as Docker's and notary's clients do it (notary's
cmd/notary/tuf.go getTransport): a request answered 401 with
``WWW-Authenticate: Bearer realm=...,service=...`` is retried once with a token
fetched from the realm for ``repository:GUN:ACTIONS``, with the basic
credentials if configured. Actions are ``pull`` to read metadata,
``push,pull`` to publish or read a key, ``*`` to rotate a key.

Against a hostile server (issue 22 §3):

- No redirect is followed. notary-server's API never redirects
  (server/server.go), and urllib would carry the ``Authorization`` header to
  wherever a 3xx points, over plain HTTP and outside the pinned CA.
- Every request has a deadline for the whole exchange (connect, TLS, headers,
  body), and every client a deadline for the whole command; ``timeout`` alone
  bounds one socket operation, which a server sending a byte at a time resets.
- :meth:`NotaryClient.pull` follows TUF's client workflow (TUF specification
  §5.3-5.6; :mod:`signerd.trust._pull`): root first, verified against what was trusted; then the
  timestamp (at most ``MAX_TIMESTAMP_SIZE``), verified with the root's keys;
  then the snapshot, at most the length the timestamp declares and with its
  hashes, verified; then each targets file at most the length the verified
  snapshot declares. Nothing unverified decides what else is downloaded.
"""

from __future__ import annotations

import base64
import http.client
import json
import re
import secrets
import socket
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from signerd.errors import InvalidArgument, NotFound, quoted
from signerd.keys import validate_gun, validate_role
from signerd.trust._key import TufKey
from signerd.trust._pull import MAX_METADATA_SIZE as MAX_METADATA_SIZE
from signerd.trust._pull import MAX_PULLED_ROLES as MAX_PULLED_ROLES
from signerd.trust._pull import MAX_ROOT_STEPS as MAX_ROOT_STEPS
from signerd.trust._pull import MAX_TIMESTAMP_SIZE as MAX_TIMESTAMP_SIZE
from signerd.trust._pull import pull_repository
from signerd.trust.errors import NotaryServerError
from signerd.trust.verify import TrustedState

# MAX_METADATA_SIZE, MAX_TIMESTAMP_SIZE, MAX_PULLED_ROLES and MAX_ROOT_STEPS,
# imported above from _pull (`as`: re-exported), stay public names here.
REQUEST_DEADLINE = 120.0  # seconds for one whole request: connect, TLS, headers, body
COMMAND_DEADLINE = 600.0  # seconds for every request of one client (one signerctl command)
MAX_KEY_SIZE = 256 << 10  # storage.MaxKeySize
MAX_ERROR_SIZE = 1 << 10  # storage.MaxErrorResponseSize


class MetadataNotFound(NotaryServerError, NotFound):
    """The server has no such file (HTTP 404): for root.json, no such repository."""


@dataclass(frozen=True)
class NotaryClient:
    """A client for one notary-server.

    ``ca_file`` pins the CA for HTTPS; give either ``username``/``password``
    (basic auth) or ``token`` (bearer), or neither.
    """

    url: str
    ca_file: str | None = None
    username: str | None = None
    password: str | None = None
    token: str | None = None
    timeout: float = 30.0  # seconds for one socket operation (connect, one read)
    request_deadline: float = REQUEST_DEADLINE  # seconds for one whole request
    command_deadline: float = COMMAND_DEADLINE  # seconds for all requests of this client
    # Registry tokens fetched after a Bearer challenge, by scope (not part of equality).
    _tokens: dict[str, str] = field(default_factory=dict, compare=False, repr=False)
    _started: float = field(default_factory=time.monotonic, compare=False, repr=False)

    def __post_init__(self) -> None:
        parsed = urllib.parse.urlsplit(self.url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise InvalidArgument(
                f"notary server URL must be http(s)://host[:port], not {self.url!r}"
            )
        if self.token and self.username:
            raise InvalidArgument("use either basic auth or a bearer token, not both")
        for name in ("timeout", "request_deadline", "command_deadline"):
            value = getattr(self, name)
            if not 0 < value <= 86400:  # NaN fails too
                raise InvalidArgument(f"{name} must be in (0, 86400] seconds, not {value!r}")

    # --- requests ------------------------------------------------------------

    def _base(self, gun: str) -> str:
        return f"{self.url.rstrip('/')}/v2/{validate_gun(gun)}/_trust/tuf/"

    def _context(self, url: str) -> ssl.SSLContext | None:
        if not url.startswith("https:"):
            return None
        return ssl.create_default_context(cafile=self.ca_file)

    def _open(self, req: urllib.request.Request, what: str,
              read: Callable[[http.client.HTTPResponse], bytes]) -> bytes:
        """Send ``req`` through an opener that follows no redirect, under this
        request's deadline; ``read`` takes the body. A deadline that passes
        shuts the connection down and is reported as such, whatever failed."""
        left = self._started + self.command_deadline - time.monotonic()
        if left <= 0:
            raise NotaryServerError(
                f"{what}: not sent: this command ran past its {self.command_deadline:g} s "
                "deadline for the notary server")
        seconds = min(self.request_deadline, left)
        with _Deadline(seconds) as deadline:
            opener = urllib.request.build_opener(
                _NoRedirect(), _WatchedHTTP(deadline),
                _WatchedHTTPS(deadline, self._context(req.full_url)))
            try:
                with opener.open(req, timeout=self.timeout) as resp:
                    return read(resp)
            except (OSError, http.client.HTTPException) as e:
                if deadline.expired and not isinstance(e, urllib.error.HTTPError):
                    raise self._too_slow(what, seconds) from None
                raise
            finally:
                if deadline.expired:
                    raise self._too_slow(what, seconds) from None

    def _too_slow(self, what: str, seconds: float) -> NotaryServerError:
        return NotaryServerError(
            f"{what}: notary server {self.url} sent no complete answer within {seconds:g} s")

    def _request(
        self, method: str, url: str, what: str, limit: int,
        body: bytes | None = None, headers: Mapping[str, str] | None = None,
        *, scope: str | None = None,
    ) -> bytes:
        """One request; on a Bearer challenge, fetch a token for ``scope`` and retry once."""
        bearer = self._tokens.get(scope) if scope else None
        try:
            return self._send(method, url, what, limit, body, headers, bearer)
        except _Challenge as challenge:
            if scope is None or bearer is not None:
                raise challenge.error from None
            token = self._fetch_token(challenge.header, scope, what)
            self._tokens[scope] = token
            try:
                return self._send(method, url, what, limit, body, headers, token)
            except _Challenge as again:
                raise again.error from None

    def _send(
        self, method: str, url: str, what: str, limit: int, body: bytes | None,
        headers: Mapping[str, str] | None, bearer: str | None,
    ) -> bytes:
        # Only http(s) URLs reach here: the scheme is checked in __post_init__
        # (and in _fetch_token for a realm).
        req = urllib.request.Request(  # noqa: S310
            url, data=body, method=method, headers=dict(headers or {})
        )
        if bearer is not None:
            req.add_header("Authorization", f"Bearer {bearer}")
        elif self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        elif self.username is not None:
            req.add_header("Authorization", self._basic())
        def read(resp: http.client.HTTPResponse) -> bytes:
            length = resp.headers.get("Content-Length")
            if length is not None and (not length.isdigit() or int(length) > limit):
                raise NotaryServerError(f"{what}: server response larger than {limit} bytes")
            return resp.read(limit + 1)

        try:
            data = self._open(req, what, read)
        except _Redirected as e:
            raise e.error(what, self.url) from None
        except urllib.error.HTTPError as e:
            challenge = e.headers.get("WWW-Authenticate", "") if e.headers else ""
            error = _http_error(e, what)
            if e.code == 401 and challenge.lower().startswith("bearer "):
                raise _Challenge(challenge, error) from None
            raise error from None
        except urllib.error.URLError as e:
            raise self._unreachable(what, e.reason) from None
        except (TimeoutError, ConnectionError, ssl.SSLError, http.client.HTTPException) as e:
            raise self._unreachable(what, e) from None
        if len(data) > limit:
            raise NotaryServerError(f"{what}: server response larger than {limit} bytes")
        return data

    def _basic(self) -> str:
        pair = f"{self.username}:{self.password or ''}".encode()
        return "Basic " + base64.b64encode(pair).decode()

    def _fetch_token(self, challenge: str, scope: str, what: str) -> str:
        """A registry token for ``scope`` from the challenge's realm (Docker's token flow)."""
        params = dict(_CHALLENGE_PARAM.findall(challenge[len("bearer "):]))
        realm = params.get("realm", "")
        parsed = urllib.parse.urlsplit(realm)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise NotaryServerError(f"{what}: unusable token realm {quoted(realm)} (HTTP 401)",
                                    401)
        if parsed.scheme == "http" and self.url.startswith("https:"):
            # Credentials and tokens must not fall back to plain HTTP.
            raise NotaryServerError(f"{what}: token realm {quoted(realm)} is not https", 401)
        query = {"scope": scope}
        if params.get("service"):
            query["service"] = params["service"]
        sep = "&" if parsed.query else "?"
        url = realm + sep + urllib.parse.urlencode(query)
        req = urllib.request.Request(url, method="GET")  # noqa: S310 - scheme checked above
        if self.username is not None:
            req.add_header("Authorization", self._basic())
        fetch = f"{what}: token for {scope} from {parsed.netloc}"
        try:
            data = self._open(req, fetch, lambda resp: resp.read(MAX_KEY_SIZE + 1))
        except _Redirected as e:
            raise e.error(fetch, realm) from None
        except urllib.error.HTTPError as e:
            raise _http_error(e, fetch) from None
        except urllib.error.URLError as e:
            raise self._unreachable(fetch, e.reason) from None
        except (TimeoutError, ConnectionError, ssl.SSLError, http.client.HTTPException) as e:
            raise self._unreachable(fetch, e) from None
        try:
            doc = json.loads(data)
            token = doc.get("token") or doc.get("access_token")
        except (ValueError, AttributeError, RecursionError):
            token = None
        if not isinstance(token, str) or not token or len(data) > MAX_KEY_SIZE:
            raise NotaryServerError(f"{fetch}: the token server sent no token")
        return token

    def _unreachable(self, what: str, reason: object) -> NotaryServerError:
        return NotaryServerError(f"{what}: cannot reach notary server {self.url}: {reason}")

    # --- API -------------------------------------------------------------------

    def get(self, gun: str, name: str, limit: int = MAX_METADATA_SIZE) -> bytes:
        """Fetch ``name``.json: a role (``targets/releases``), ``N.root`` or ``ROLE.<sha256>``.

        Raises NotaryServerError for a body over ``limit`` bytes (default
        notary's MaxDownloadSize), MetadataNotFound for HTTP 404.
        """
        path = urllib.parse.quote(name, safe="/.")
        url = self._base(gun) + f"{path}.json"
        return self._request(
            "GET", url, f"GET {name}.json", limit, scope=_scope(gun, "pull")
        )

    def get_key(self, gun: str, role: str) -> TufKey:
        """The server-managed public key for ``timestamp`` or ``snapshot`` (created if needed)."""
        return self._key("GET", gun, role, "push,pull")

    def rotate_key(self, gun: str, role: str) -> TufKey:
        """Ask the server for a new ``timestamp`` or ``snapshot`` key (notary's RotateKey).

        The server signs with it once a root.json that lists it is published.
        """
        return self._key("POST", gun, role, "*")

    def _key(self, method: str, gun: str, role: str, actions: str) -> TufKey:
        if role not in ("timestamp", "snapshot"):
            raise InvalidArgument(
                f"the server manages only timestamp and snapshot keys, not {role!r}"
            )
        url = self._base(gun) + f"{role}.key"
        what = f"{method} {role}.key"
        data = self._request(method, url, what, MAX_KEY_SIZE, scope=_scope(gun, actions))
        try:
            return TufKey.from_dict(json.loads(data))
        except (ValueError, InvalidArgument, RecursionError) as e:
            raise NotaryServerError(f"{what}: invalid key from server: {e}") from None

    def publish(self, gun: str, files: Mapping[str, bytes]) -> None:
        """Upload metadata files in one atomic update (one multipart part per role)."""
        if not files:
            raise InvalidArgument("nothing to publish")
        for role in files:
            validate_role(role)
        boundary = secrets.token_hex(16)
        body, content_type = encode_multipart(files, boundary)
        self._request(
            "POST", self._base(gun), f"publish {gun}", MAX_ERROR_SIZE,
            body=body, headers={"Content-Type": content_type}, scope=_scope(gun, "push,pull"),
        )

    def pull(self, gun: str, *, trusted_root_version: int | None = None,
             trusted: TrustedState | None = None) -> dict[str, bytes]:
        """Fetch root, timestamp, snapshot, targets and every delegation the snapshot lists,
        in TUF's client order (see the module docstring), and return them by role name.

        ``trusted`` (or only ``trusted_root_version``) is what the caller trusted before:
        intermediate roots ``N.root`` are fetched to follow rotations since then, and
        the new root must chain to the trusted one (with neither: trust on first use).
        The timestamp and snapshot are verified here before they steer any download;
        the caller still verifies the whole set (``verify_repository``), delegations
        included. Raises VerificationError, NotaryServerError, MetadataNotFound.
        """
        return pull_repository(self.get, gun, trusted_root_version=trusted_root_version,
                               trusted=trusted)


_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')


def _scope(gun: str, actions: str) -> str:
    return f"repository:{gun}:{actions}"


class _Challenge(Exception):  # noqa: N818 - internal control flow, never escapes
    """A 401 with a Bearer challenge: ``header`` is WWW-Authenticate, ``error`` the failure."""

    def __init__(self, header: str, error: NotaryServerError) -> None:
        self.header = header
        self.error = error
        super().__init__(header)


class _Redirected(Exception):  # noqa: N818 - internal control flow, never escapes
    """A 3xx answer: where it pointed. Never followed (see the module docstring)."""

    def __init__(self, code: int, target: str) -> None:
        self.code = code
        self.target = target
        super().__init__(target)

    def error(self, what: str, origin: str) -> NotaryServerError:
        return NotaryServerError(
            f"{what}: the server redirected (HTTP {self.code}) to {quoted(self.target)}; "
            f"signerctl follows no redirects, so credentials stay with {origin}", self.code)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Refuse every redirect before a request to its target is even built."""

    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str,
                         headers: Any, newurl: str) -> urllib.request.Request | None:
        raise _Redirected(code, newurl)


class _Deadline:
    """Shut a request's sockets down once ``seconds`` have passed, whatever phase the
    request is in. urllib's ``timeout`` bounds each socket operation only, so a server
    that sends one byte just inside it holds a request (and the command) forever."""

    def __init__(self, seconds: float) -> None:
        self.expired = False
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> _Deadline:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()

    def watch(self, sock: socket.socket) -> socket.socket:
        """Track ``sock``; shut it down at once if the deadline has passed."""
        with self._lock:
            self._sockets.append(sock)
            if self.expired:
                _shutdown(sock)
        return sock

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                _shutdown(sock)


def _shutdown(sock: socket.socket) -> None:
    try:  # shutdown, unlike close, wakes a thread blocked in recv on it
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _watched_connection(cls: type[http.client.HTTPConnection], deadline: _Deadline
                        ) -> Callable[..., http.client.HTTPConnection]:
    """A factory of ``cls`` connections whose TCP socket ``deadline`` watches from
    before the TLS handshake. ``_create_connection`` is the hook http.client itself
    sets per instance (socket.create_connection) and calls in ``connect``."""
    def make(host: str, **kwargs: Any) -> http.client.HTTPConnection:
        conn = cls(host, **kwargs)
        create = conn._create_connection  # type: ignore[attr-defined]
        conn._create_connection = (  # type: ignore[attr-defined]
            lambda *a, **k: deadline.watch(create(*a, **k)))
        return conn
    return make


class _WatchedHTTP(urllib.request.HTTPHandler):
    def __init__(self, deadline: _Deadline) -> None:
        super().__init__()
        self._make = _watched_connection(http.client.HTTPConnection, deadline)

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(self._make, req)


class _WatchedHTTPS(urllib.request.HTTPSHandler):
    def __init__(self, deadline: _Deadline, context: ssl.SSLContext | None) -> None:
        super().__init__(context=context)
        self._make = _watched_connection(http.client.HTTPSConnection, deadline)
        self._ctx = context

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(self._make, req, context=self._ctx)


def encode_multipart(files: Mapping[str, bytes], boundary: str) -> tuple[bytes, str]:
    """multipart/form-data as Go's multipart.Writer.CreateFormFile("files", role) writes it."""
    out = bytearray()
    for role, data in files.items():
        # Go escapes backslashes and quotes in the filename; role names have neither.
        filename = role.replace("\\", "\\\\").replace('"', '\\"')
        out += (
            f"--{boundary}\r\n"
            f'Content-Disposition: form-data; name="files"; filename="{filename}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        out += data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out), f"multipart/form-data; boundary={boundary}"


def _http_error(e: urllib.error.HTTPError, what: str) -> NotaryServerError:
    detail = _error_detail(e.read(MAX_ERROR_SIZE))
    suffix = f": {detail}" if detail else ""
    if what.startswith("publish") and any(sign in detail for sign in _COULD_NOT_SIGN):
        suffix += _SIGNER_HINT
    if e.code == 401:
        return NotaryServerError(f"{what}: not authorized (HTTP 401){suffix}", e.code)
    if e.code == 404:
        return MetadataNotFound(f"{what}: not found on the server (HTTP 404){suffix}", e.code)
    if e.code == 400:
        return NotaryServerError(f"{what}: server rejected the update (HTTP 400){suffix}", e.code)
    return NotaryServerError(f"{what}: server error (HTTP {e.code}){suffix}", e.code)


# What notary-server answers a publish whose snapshot or timestamp it could not
# sign (server/handlers/validation.go): its signer's failure surfaces only as
# "insufficient signatures", turned into these validation errors.
_COULD_NOT_SIGN = ("server does not hold current snapshot key",
                   "timestamp keys exist on the server")
_SIGNER_HINT = ("; the Notary server could not sign the snapshot or timestamp: check that "
                "its signer (signerd, notary-server's trust_service) runs and that "
                "notary-server reaches it, then publish again")


def _error_detail(body: bytes) -> str:
    """One line from notary's ``{"errors":[{"message":..., "detail":...}]}``, if present.

    ``detail`` is whatever notary-server attached: a string, null, or an
    object, such as a validation error (``{"Name":"ErrBadRoot","Error":
    {"Msg":"..."}}``, notary's tuf/validation SerializableError); an object is
    written as text (:func:`_detail_text`), never as a Python dict."""
    try:
        doc: Any = json.loads(body)
        err = doc["errors"][0]
        parts = [_detail_text(err.get("message")), _detail_text(err.get("detail"))]
        text = ": ".join(p for p in parts if p)
    except (ValueError, KeyError, IndexError, TypeError, AttributeError, RecursionError):
        text = body.decode("utf-8", "replace")
    return " ".join(text.split())[:300]


def _detail_text(value: Any, depth: int = 0) -> str:
    """A JSON value of an error body as words: ``Name: Msg`` for notary's
    SerializableError, ``key value`` pairs for another object, items joined by
    "; " for a list; nothing for null or an empty object (a Go error that
    marshals to ``{}``)."""
    if value is None or depth > 4:
        return ""
    if isinstance(value, dict):
        error = value.get("Error")
        if isinstance(value.get("Name"), str) and isinstance(error, dict):
            msg = _detail_text(error.get("Msg"), depth + 1)
            return f"{value['Name']}: {msg}" if msg else str(value["Name"])
        parts = ((str(k), _detail_text(v, depth + 1)) for k, v in value.items())
        return "; ".join(f"{k} {v}" for k, v in parts if v)
    if isinstance(value, list):
        return "; ".join(t for t in (_detail_text(v, depth + 1) for v in value) if t)
    return str(value)
