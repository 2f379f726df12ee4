"""``signerctl trust``: Docker Content Trust with keys that never leave signerd's tokens.

Commands (each also takes ``--json``, ``--trust-dir DIR`` and ``--local``)::

    trust init GUN [--root-key KEYID] [--local-snapshot] [--server URL ...]
    trust sign GUN:TAG --digest sha256:HEX --size N [--role ROLE]
    trust unsign GUN:TAG [--role ROLE]
    trust delegation add GUN targets/NAME (--key KEYID | --pubkey FILE)... [--paths P...]
    trust delegation remove GUN targets/NAME
    trust rotate GUN ROLE [--key KEYID] [--server URL ...]
                          (ROLE: root, targets, targets/NAME, snapshot, timestamp)
    trust publish GUN [--server URL ...]
    trust pull GUN [--server URL ...] [--force] [--reset-trust]
    trust inspect GUN[:TAG] [--reset-trust]

Where the keys are. Every signature is made by signerd: through the daemon
(the client's mTLS identity and signerd's policy decide which keys it may
use), or with ``--local`` straight on the tokens of a signerd config, for
offline root ceremonies. The key for a role is found by matching the key IDs
that the metadata lists for the role (for root, the canonical ID of the
certificate's key) against the keys signerd lets the caller read. So a CI
runner whose policy covers only ``targets/releases`` can sign only that role,
and never needs the targets or root key.

Which role ``sign`` and ``unsign`` use without ``--role``: ``targets/releases``
if targets.json delegates it (what ``docker pull`` reads, and what ``docker
trust sign`` writes), else ``targets``.

Snapshot and timestamp. ``init --server`` takes the timestamp key, and the
snapshot key unless ``--local-snapshot``, from the Notary server, which then
signs those roles itself on every publish. ``rotate GUN timestamp|snapshot``
asks the server for a new key (``POST .../ROLE.key``), lists it in a new
root.json signed by the root key and publishes at once; where this directory
signs the role itself, the new key is made in signerd instead. Without a server (offline use and
tests) signerd holds all four keys, and each change re-signs snapshot and
timestamp. A trust directory remembers this in ``.signerctl.json``; one that
was pulled instead follows notary's client: it re-signs the snapshot if signerd
holds its key for the caller, and otherwise leaves it to the server.

``.trusted.json`` keeps what the last successful verification trusted (root
and versions), so that ``inspect`` and ``pull`` refuse rollbacks, and a root
that the trusted root's keys did not sign, whatever its version. A root that
really changed is re-trusted with ``pull --reset-trust`` (or ``inspect
--reset-trust`` offline), which prints the old and the new root key IDs.
A root change that clients could not follow (a second root key rotation
before the first was published or verified) is refused with what to do.

Notary credentials are never taken from argv: ``--password-file`` or
``$SIGNERD_NOTARY_PASSWORD`` (with ``--username`` or
``$SIGNERD_NOTARY_USERNAME``), or ``--token-file`` or ``$SIGNERD_NOTARY_TOKEN``.
Behind a registry's token auth, the basic credentials fetch the token.
``--server`` inside ``trust`` commands names the Notary server (as in notary's
own CLI); give signerd's address before ``trust``, in the client config, or
with ``--signerd``.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, TypeVar

from signerd import embedded
from signerd.cli._util import UsageError, add_client_options, connect, emit, whole_number
from signerd.config import load_config
from signerd.errors import InvalidArgument, SignerdError, quoted
from signerd.keys import validate_gun, validate_role, validate_tag
from signerd.trust import NotaryClient, workflows
from signerd.trust.keysource import DaemonKeys, KeySource, TokenKeys
from signerd.trust.keysource import RemoteSigner as RemoteSigner  # its old home; tests import it
from signerd.trust.results import Retrust
from signerd.trust.state import Settings
from signerd.trust.workflows import delegation_role, read_file

T = TypeVar("T")
_DIGEST_RE = re.compile(r"(?:sha256:)?([0-9a-f]{64})")
MAX_SIZE = (1 << 63) - 1  # bytes: a target's length is an int64 to Notary (Go)


# --- what the workflows are given ----------------------------------------------------


@contextmanager
def _key_source(args: argparse.Namespace) -> Iterator[KeySource]:
    if not args.local:
        with connect(args) as client:
            yield DaemonKeys(client)
        return
    # Imported here: it pulls in the token layer, which only --local needs (signerctl
    # --help went from 0.65 to 0.57 s at the median, 10 alternating runs).
    from signerd.service import KeyService

    path = args.daemon_config or embedded.state_dir() / "signerd.toml"
    config = load_config(path)
    os.environ.update(config.environment)  # e.g. SOFTHSM2_CONF, before the module loads
    service = KeyService.open(config)
    try:
        yield TokenKeys(service)
    finally:
        service.close()


def _keys(args: argparse.Namespace) -> Callable[[], AbstractContextManager[KeySource]]:
    """The key source opener: opened only when a workflow needs keys."""
    return functools.partial(_key_source, args)


def trust_dir(args: argparse.Namespace) -> Path:
    """``--trust-dir``, ``$SIGNERD_TRUST_DIR``, or ``$XDG_DATA_HOME/signerd/trust``."""
    if args.trust_dir is not None:
        return Path(args.trust_dir)
    if os.environ.get("SIGNERD_TRUST_DIR"):
        return Path(os.environ["SIGNERD_TRUST_DIR"])
    data = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path(data) / "signerd" / "trust"


def split_reference(ref: str, *, tag_required: bool) -> tuple[str, str | None]:
    """``GUN[:TAG]`` → (gun, tag); a registry port (``host:5000/app``) is not a tag."""
    head, sep, tail = ref.rpartition(":")
    if sep and head and "/" not in tail:
        gun, tag = head, validate_tag(tail)
    else:
        gun, tag = ref, None
    validate_gun(gun)
    if tag_required and tag is None:
        raise InvalidArgument(f"{ref!r} names no tag: use GUN:TAG, e.g. docker.io/acme/app:v1")
    return gun, tag


def _digest(text: str) -> bytes:
    m = _DIGEST_RE.fullmatch(text.strip().lower())
    if m is None:
        raise InvalidArgument(f"--digest must be sha256:<64 hex digits>, not {quoted(text)}")
    return bytes.fromhex(m[1])


def _usage(parse: Callable[[str], T]) -> Callable[[str], T]:
    """An argparse type from a validator that raises InvalidArgument: a value
    of the wrong form is a usage error, one line and exit 2 (issue 21 §6:
    'trust sign --digest 3f1c' exited 1, as a failure would)."""

    def convert(text: str) -> T:
        try:
            return parse(text)
        except InvalidArgument as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return convert


_TAGGED = _usage(functools.partial(split_reference, tag_required=True))
_MAYBE_TAGGED = _usage(functools.partial(split_reference, tag_required=False))
_GUN = _usage(validate_gun)
_ROLE = _usage(validate_role)
_DELEGATION = _usage(delegation_role)


def _secret(path: Path | None, env: str, what: str) -> str | None:
    if path is not None:
        return read_file(path, what).decode().rstrip("\r\n")
    return os.environ.get(env) or None


def _notary(args: argparse.Namespace, settings: Settings | None) -> NotaryClient:
    url = args.notary_url or (settings.server if settings else None)
    url = url or os.environ.get("SIGNERD_NOTARY_SERVER")
    if not url:
        raise InvalidArgument("no Notary server: pass --server https://notary.example.com")
    token = _secret(args.token_file, "SIGNERD_NOTARY_TOKEN", "token file")
    password = _secret(args.password_file, "SIGNERD_NOTARY_PASSWORD", "password file")
    username = args.username or os.environ.get("SIGNERD_NOTARY_USERNAME") or None
    if username is not None and password is None:
        raise InvalidArgument(
            "--username needs --password-file or $SIGNERD_NOTARY_PASSWORD "
            "(a password never goes on the command line)"
        )
    ca: str | None
    if args.ca is not None:
        read_file(args.ca, "CA file")  # say so now, not as a TLS failure later
        ca = str(args.ca.resolve())
    else:  # the recorded CA belongs to the recorded server only
        ca = settings.ca if settings is not None and url == settings.server else None
    return NotaryClient(url, ca_file=ca, username=username, password=password, token=token)


def _notary_opener(args: argparse.Namespace) -> Callable[[Settings | None], NotaryClient]:
    """The Notary client opener: made from the options, the environment and the
    directory's recorded settings, when a workflow needs the server."""
    return functools.partial(_notary, args)


# --- commands ---------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> None:
    """Create root, targets (and local snapshot/timestamp) keys and the first metadata."""
    done = workflows.init(
        trust_dir(args),
        args.gun,
        _keys(args),
        _notary_opener(args) if args.notary_url else None,
        root_key=args.root_key,
        local_snapshot=args.local_snapshot,
    )
    data = {
        "gun": done.gun,
        "trust_dir": str(done.path),
        "root_key_id": done.root_key_id,
        "root_certificate_key_id": done.root_certificate_key_id,
        "targets_key_id": done.targets_key_id,
        "snapshot_key_id": done.snapshot_key_id,
        "timestamp_key_id": done.timestamp_key_id,
        "signed_locally": list(done.signed_locally),
        "server": done.server,
        "files": list(done.files),
    }
    where = ", ".join(done.signed_locally) if done.signed_locally else "none"
    emit(
        args,
        data,
        lambda: "\n".join(
            [
                f"initialised {done.gun} in {done.path}",
                f"root key:    {done.root_key_id} "
                f"(certificate key {done.root_certificate_key_id})",
                f"targets key: {done.targets_key_id}",
                f"snapshot and timestamp signed here: {where}",
                f"wrote: {', '.join(done.files)}",
            ]
        ),
    )


def cmd_sign(args: argparse.Namespace) -> None:
    """Add or replace a tag in a targets role, signed through signerd."""
    gun, tag = args.ref  # _TAGGED
    assert tag is not None
    digest = args.digest  # _digest, as the argument's type
    done = workflows.sign(trust_dir(args), gun, tag, digest, args.size, _keys(args),
                          role=args.role)
    data = {
        "gun": done.gun,
        "tag": done.tag,
        "digest": f"sha256:{done.digest.hex()}",  # as inspect writes it, and --digest takes it
        "size": done.size,
        "role": done.role,
        "key_id": done.key_id,
        "files": list(done.files),
    }
    if done.stale:
        data["warning"] = done.stale
        print(f"signerctl: warning: {done.stale}", file=sys.stderr)
    emit(
        args,
        data,
        lambda: (
            f"signed {done.gun}:{done.tag} (sha256:{done.digest.hex()}, {done.size} bytes) "
            f"in {done.role} with key {done.key_id}"
        ),
    )


def cmd_unsign(args: argparse.Namespace) -> None:
    """Remove a tag from a targets role."""
    gun, tag = args.ref
    assert tag is not None
    done = workflows.unsign(trust_dir(args), gun, tag, _keys(args), role=args.role)
    data = {"gun": done.gun, "tag": done.tag, "role": done.role, "key_id": done.key_id,
            "files": list(done.files)}
    emit(args, data, lambda: f"removed {done.gun}:{done.tag} from {done.role}")


def cmd_delegation_add(args: argparse.Namespace) -> None:
    """Delegate targets/NAME to keys held by signerd (--key) or given as PEM (--pubkey)."""
    if not args.key and not args.pubkey:
        raise UsageError("give the delegation's key: --key KEYID or --pubkey FILE")
    done = workflows.add_delegation(
        trust_dir(args), args.gun, args.role, _keys(args),
        key_ids=args.key, pubkey_files=[Path(p) for p in args.pubkey], paths=args.paths,
    )
    data = {
        "gun": done.gun,
        "role": done.role,
        "key_ids": list(done.key_ids),
        "paths": list(done.paths),
        "files": list(done.files),
    }
    emit(args, data, lambda: f"delegated {done.role} of {done.gun} to {', '.join(done.key_ids)}")


def cmd_delegation_remove(args: argparse.Namespace) -> None:
    """Remove a delegation role (its tags become invisible)."""
    done = workflows.remove_delegation(trust_dir(args), args.gun, args.role, _keys(args))
    emit(
        args,
        {"gun": done.gun, "role": done.role, "files": list(done.files)},
        lambda: f"removed delegation {done.role} from {done.gun}",
    )


def cmd_rotate(args: argparse.Namespace) -> None:
    """Replace the key of root, targets, a delegation, or the snapshot or timestamp."""
    done = workflows.rotate(
        trust_dir(args), args.gun, args.role, _keys(args), _notary_opener(args), key_id=args.key
    )
    data: dict[str, Any] = {
        "gun": done.gun,
        "role": done.role,
        "old_key_ids": list(done.old_key_ids),
        "new_key_id": done.new_key_id,
        "files": list(done.files),
    }
    where = ""
    if done.published is not None:  # snapshot or timestamp
        data["published"] = list(done.published)
        where = f"; published {', '.join(done.published)}" if done.published else ""
    line = (f"rotated {done.role} of {done.gun}: {', '.join(done.old_key_ids)} -> "
            f"{done.new_key_id}{where}")
    emit(args, data, lambda: line)


def cmd_publish(args: argparse.Namespace) -> None:
    """Upload changed metadata, then fetch back and verify what the server now serves."""
    done = workflows.publish(trust_dir(args), args.gun, _notary_opener(args))
    if done.versions is None:
        emit(args, {"gun": done.gun, "published": []}, lambda: f"{done.gun}: nothing to publish")
        return
    data = {"gun": done.gun, "published": list(done.published), "versions": done.versions}
    emit(args, data, lambda: f"published {', '.join(done.published)} for {done.gun}")


def _retrust_line(gun: str, retrust: Retrust, data: dict[str, Any]) -> str:
    """Record and describe a re-trust: the old and the new root key IDs."""
    old, new = list(retrust.old_root_key_ids), list(retrust.new_root_key_ids)
    data["old_root_key_ids"], data["new_root_key_ids"] = old, new
    return f"re-trusted {gun}: root keys {', '.join(old) or 'none'} -> {', '.join(new)}"


def cmd_pull(args: argparse.Namespace) -> None:
    """Fetch and verify a repository's trust data into the trust directory."""
    done = workflows.pull(trust_dir(args), args.gun, _notary_opener(args), force=args.force,
                          reset_trust=args.reset_trust)
    result = done.verified
    data: dict[str, Any] = {
        "gun": done.gun,
        "tags": [t.to_dict() for t in result.tags],
        "versions": dict(result.state.versions),
    }
    lines = [f"pulled {done.gun}: {len(result.tags)} signed tag(s), "
             f"root version {result.root.version}"]
    if done.retrust is not None:
        lines.insert(0, _retrust_line(done.gun, done.retrust, data))
    emit(args, data, lambda: "\n".join(lines))


def _tag_table(tags: Sequence[dict[str, Any]]) -> str:
    rows = [("TAG", "DIGEST", "SIZE", "SIGNED BY")]
    rows += [(t["name"], t["digest"], str(t["size"]), t["role"]) for t in tags]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(
        "  ".join([*(c.ljust(w) for c, w in zip(r[:3], widths, strict=True)), r[3]]) for r in rows
    )


def cmd_inspect(args: argparse.Namespace) -> None:
    """Verify as a Content Trust client does and list the signed tags (or one tag)."""
    gun, tag = args.ref  # _MAYBE_TAGGED
    done = workflows.inspect(trust_dir(args), gun, tag, reset_trust=args.reset_trust)
    rows = [t.to_dict() for t in done.tags]
    data: dict[str, Any] = {"gun": done.gun, "tags": rows, "versions": done.versions,
                            "signers": done.signers}
    report = ""
    if done.retrust is not None:
        report = _retrust_line(done.gun, done.retrust, data) + "\n"
    emit(args, data,
         lambda: report + (_tag_table(rows) if rows else f"{done.gun}: no signed tags"))


# --- argv ----------------------------------------------------------------------------------


def _parents() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser, argparse.ArgumentParser]:
    # signerctl's global options, accepted after the command too (SUPPRESS, so
    # that they do not overwrite a value given before it). --server is the
    # Notary server inside trust commands; signerd's address is --signerd here.
    common = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    add_client_options(common, "--signerd")

    trust = argparse.ArgumentParser(add_help=False)
    trust.add_argument(
        "--trust-dir",
        type=Path,
        help="trust data directory (default: $SIGNERD_TRUST_DIR or ~/.local/share/signerd/trust)",
    )
    trust.add_argument(
        "--local",
        action="store_true",
        help="use the tokens directly (no daemon), for offline root ceremonies",
    )
    trust.add_argument(
        "--daemon-config",
        type=Path,
        help="signerd.toml naming the tokens, with --local (default: the embedded daemon's)",
    )

    notary = argparse.ArgumentParser(add_help=False)
    notary.add_argument(
        "--server",
        dest="notary_url",
        metavar="URL",
        help="Notary server, e.g. https://notary.example.com:4443",
    )
    notary.add_argument("--ca", type=Path, help="CA file for the Notary server's TLS certificate")
    notary.add_argument("--username", help="basic auth user ($SIGNERD_NOTARY_USERNAME)")
    notary.add_argument(
        "--password-file", type=Path, help="basic auth password file ($SIGNERD_NOTARY_PASSWORD)"
    )
    notary.add_argument("--token-file", type=Path, help="bearer token file ($SIGNERD_NOTARY_TOKEN)")
    return common, trust, notary


def _one_line(func: Callable[[argparse.Namespace], None]) -> Callable[[argparse.Namespace], None]:
    """Report file system errors (unwritable trust dir, missing file) as one line."""

    @functools.wraps(func)
    def run(args: argparse.Namespace) -> None:
        try:
            func(args)
        except BrokenPipeError:
            raise  # signerctl's main() handles a closed stdout
        except OSError as e:
            where = f"{e.filename}: " if e.filename else ""
            raise SignerdError(f"{where}{e.strerror or e}") from None

    return run


def register(sub: Any) -> None:
    """Add ``trust`` and its commands to signerctl's sub-parsers."""
    common, trust, notary = _parents()

    def command(
        parent: Any,
        name: str,
        func: Callable[[argparse.Namespace], None],
        helptext: str,
        *extra: argparse.ArgumentParser,
    ) -> argparse.ArgumentParser:
        # allow_abbrev=False: "--password x" must not pass as "--password-file x".
        p: argparse.ArgumentParser = parent.add_parser(
            name, help=helptext, parents=[common, trust, *extra], allow_abbrev=False
        )
        p.set_defaults(func=_one_line(func), usage_prog=p.prog)
        return p

    group = sub.add_parser("trust", help="Docker Content Trust: sign tags, delegate, publish")
    cmds = group.add_subparsers(dest="trust_cmd", required=True)

    p = command(cmds, "init", cmd_init, "create a repository's trust data", notary)
    p.set_defaults(creates_keys=True)  # a Ctrl-C finishes first: signerd.cli._interrupt
    p.add_argument("gun", type=_GUN)
    p.add_argument("--root-key", metavar="KEYID", help="use this root key instead of a new one")
    p.add_argument(
        "--local-snapshot",
        action="store_true",
        help="keep the snapshot key in signerd instead of the Notary server",
    )

    p = command(cmds, "sign", cmd_sign, "sign a tag")
    p.add_argument("ref", metavar="GUN:TAG", type=_TAGGED)
    p.add_argument("--digest", required=True, type=_usage(_digest),
                   help="manifest digest, sha256:HEX")
    p.add_argument("--size", required=True, type=whole_number(0, MAX_SIZE, "bytes"),
                   help="manifest size in bytes")
    p.add_argument(
        "--role", type=_ROLE,
        help="targets role (default: targets/releases if delegated, else targets)"
    )

    p = command(cmds, "unsign", cmd_unsign, "remove a tag's signature")
    p.add_argument("ref", metavar="GUN:TAG", type=_TAGGED)
    p.add_argument("--role", type=_ROLE, help="targets role (default as for sign)")

    delegation = cmds.add_parser("delegation", help="manage delegation roles")
    dcmds = delegation.add_subparsers(dest="delegation_cmd", required=True)
    p = command(dcmds, "add", cmd_delegation_add, "delegate targets/NAME to keys")
    p.add_argument("gun", type=_GUN)
    p.add_argument("role", metavar="targets/NAME", type=_DELEGATION)
    p.add_argument(
        "--key",
        action="append",
        default=[],
        metavar="KEYID",
        help="a key signerd holds (repeatable)",
    )
    p.add_argument(
        "--pubkey",
        action="append",
        default=[],
        metavar="FILE",
        help="a PEM public key or certificate (repeatable)",
    )
    p.add_argument(
        "--paths",
        nargs="+",
        metavar="PREFIX",
        help='tag prefixes the role may sign (default: "", every tag)',
    )
    p = command(dcmds, "remove", cmd_delegation_remove, "remove a delegation role")
    p.add_argument("gun", type=_GUN)
    p.add_argument("role", metavar="targets/NAME", type=_DELEGATION)

    p = command(cmds, "rotate", cmd_rotate, "replace the key of a role", notary)
    p.set_defaults(creates_keys=True)
    p.add_argument("gun", type=_GUN)
    p.add_argument(
        "role", metavar="ROLE", type=_ROLE,
        help="root, targets, targets/NAME, snapshot or timestamp"
    )
    p.add_argument("--key", metavar="KEYID", help="the new key (default: create one)")

    p = command(cmds, "publish", cmd_publish, "upload to the Notary server", notary)
    p.add_argument("gun", type=_GUN)

    p = command(cmds, "pull", cmd_pull, "fetch and verify from the Notary server", notary)
    p.add_argument("gun", type=_GUN)
    p.add_argument("--force", action="store_true", help="discard unpublished local changes")
    p.add_argument(
        "--reset-trust",
        action="store_true",
        help="forget the pinned root and trust the server's (prints old and new root key IDs)",
    )

    p = command(cmds, "inspect", cmd_inspect, "verify and list signed tags")
    p.add_argument("ref", metavar="GUN[:TAG]", type=_MAYBE_TAGGED)
    p.add_argument(
        "--reset-trust",
        action="store_true",
        help="forget the pinned root and trust the local one (prints old and new root key IDs)",
    )
