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
"""

from __future__ import annotations

import base64
import http.client
import json
import re
import secrets
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from signerd.errors import InvalidArgument, NotFound, quoted
from signerd.keys import validate_gun, validate_role
from signerd.trust._key import TufKey
from signerd.trust.errors import NotaryServerError, VerificationError
from signerd.trust.metadata import Envelope

MAX_METADATA_SIZE = 100 << 20  # notary.MaxDownloadSize
MAX_KEY_SIZE = 256 << 10  # storage.MaxKeySize
MAX_ERROR_SIZE = 1 << 10  # storage.MaxErrorResponseSize
MAX_ROOT_STEPS = 1000  # intermediate roots fetched to follow rotations (signerd's bound)


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
    timeout: float = 30.0
    # Registry tokens fetched after a Bearer challenge, by scope (not part of equality).
    _tokens: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        parsed = urllib.parse.urlsplit(self.url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise InvalidArgument(
                f"notary server URL must be http(s)://host[:port], not {self.url!r}"
            )
        if self.token and self.username:
            raise InvalidArgument("use either basic auth or a bearer token, not both")

    # --- requests ------------------------------------------------------------

    def _base(self, gun: str) -> str:
        return f"{self.url.rstrip('/')}/v2/{validate_gun(gun)}/_trust/tuf/"

    def _context(self, url: str) -> ssl.SSLContext | None:
        if not url.startswith("https:"):
            return None
        return ssl.create_default_context(cafile=self.ca_file)

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
        context = self._context(url)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout, context=context) as resp:  # noqa: S310
                length = resp.headers.get("Content-Length")
                if length is not None and (not length.isdigit() or int(length) > limit):
                    raise NotaryServerError(f"{what}: server response larger than {limit} bytes")
                data: bytes = resp.read(limit + 1)
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
        context = self._context(url)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout, context=context) as resp:  # noqa: S310
                data = resp.read(MAX_KEY_SIZE + 1)
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

    def get(self, gun: str, name: str) -> bytes:
        """Fetch ``name``.json: a role (``targets/releases``), ``N.root`` or ``ROLE.<sha256>``."""
        path = urllib.parse.quote(name, safe="/.")
        url = self._base(gun) + f"{path}.json"
        return self._request(
            "GET", url, f"GET {name}.json", MAX_METADATA_SIZE, scope=_scope(gun, "pull")
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

    def pull(self, gun: str, *, trusted_root_version: int | None = None) -> dict[str, bytes]:
        """Fetch root, timestamp, snapshot, targets and every delegation the snapshot lists.

        With ``trusted_root_version``, also fetch the intermediate roots
        ``N.root`` needed to follow rotations since then. The result is not
        verified: pass it to ``verify_repository``.
        """
        files = {name: self.get(gun, name) for name in ("root", "timestamp", "snapshot")}
        snapshot = Envelope.from_bytes(files["snapshot"], "snapshot").signed
        meta = snapshot.get("meta", {})
        for role in sorted(meta if isinstance(meta, dict) else {}):
            if role == "targets" or role.startswith("targets/"):
                try:
                    validate_role(role)  # a hostile snapshot must not steer paths
                except InvalidArgument:
                    raise VerificationError(
                        "snapshot", f"lists {quoted(role)}, not a valid Notary role name"
                    ) from None
                files[role] = self.get(gun, role)
        if "targets" not in files:
            files["targets"] = self.get(gun, "targets")
        if trusted_root_version is not None:
            current = Envelope.from_bytes(files["root"], "root").signed.get("version")
            if isinstance(current, int) and not isinstance(current, bool):
                if current - trusted_root_version > MAX_ROOT_STEPS:
                    # Each step is one request: a hostile version must not make millions.
                    raise VerificationError(
                        "root",
                        f"version {current} is more than {MAX_ROOT_STEPS} rotations ahead "
                        f"of the trusted version {trusted_root_version}",
                    )
                for v in range(trusted_root_version + 1, current):
                    files[f"{v}.root"] = self.get(gun, f"{v}.root")
        return files


_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')


def _scope(gun: str, actions: str) -> str:
    return f"repository:{gun}:{actions}"


class _Challenge(Exception):  # noqa: N818 - internal control flow, never escapes
    """A 401 with a Bearer challenge: ``header`` is WWW-Authenticate, ``error`` the failure."""

    def __init__(self, header: str, error: NotaryServerError) -> None:
        self.header = header
        self.error = error
        super().__init__(header)


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
    if e.code == 401:
        return NotaryServerError(f"{what}: not authorized (HTTP 401){suffix}", e.code)
    if e.code == 404:
        return MetadataNotFound(f"{what}: not found on the server (HTTP 404){suffix}", e.code)
    if e.code == 400:
        return NotaryServerError(f"{what}: server rejected the update (HTTP 400){suffix}", e.code)
    return NotaryServerError(f"{what}: server error (HTTP {e.code}){suffix}", e.code)


def _error_detail(body: bytes) -> str:
    """One line from notary's ``{"errors":[{"message":..., "detail":...}]}``, if present."""
    try:
        doc: Any = json.loads(body)
        err = doc["errors"][0]
        parts = [str(err.get("message") or ""), str(err.get("detail") or "")]
        text = ": ".join(p for p in parts if p)
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        text = body.decode("utf-8", "replace")
    return " ".join(text.split())[:300]
