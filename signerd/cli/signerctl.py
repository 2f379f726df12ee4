"""``signerctl``: the command-line client.

Every command takes --json for machine-readable output; tables are for
people. On failure it prints one line on stderr and exits non-zero.
"""

from __future__ import annotations

import os

# gRPC's core logs to stderr by itself (a failed TLS handshake gave a raw line
# before signerctl's own), and reads this when grpc is first imported:
# signerctl prints only its one line.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

import argparse  # noqa: E402
import base64  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, BinaryIO, cast  # noqa: E402

import grpc  # noqa: E402
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm

from signerd import add_version_flag, one_line, signing
from signerd.certs import MAX_DAYS
from signerd.cli import _interrupt, _payload, _state
from signerd.cli import trust as trust_cli
from signerd.cli._util import (
    CliError,
    CliParser,
    UsageError,
    add_client_options,
    client_config,
    connect,
    emit,
    rpc_error_line,
    whole_number,
)
from signerd.client import Client
from signerd.errors import ConfigError, InvalidArgument, SignerdError
from signerd.keys import (
    ALGORITHMS,
    PURPOSES,
    Algorithm,
    load_public_key,
    parse_algorithm,
    public_key_algorithm,
    validate_gun,
)
from signerd.v1 import signer_pb2 as pb


def key_dict(k: pb.Key) -> dict[str, Any]:
    return {
        "key_id": k.key_id,
        "algorithm": k.algorithm,
        "gun": k.gun,
        "role": k.role,
        "token": k.token,
        "keytype": k.keytype,
        "used": k.used,
        "purpose": _state.purpose_name(k),
        "public_key_pem": k.public_key_pem,
    }


def _shown(value: object) -> str:
    """A value as the text output writes it: yes/no for a flag, as in the key table."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def _table(keys: Sequence[pb.Key]) -> str:
    # USED: whether the key has made a signature (issue 21 §4: an unused key
    # is one that nothing may trust yet, such as one a Ctrl-C left behind).
    rows = [("KEY ID", "ALGORITHM", "TOKEN", "PURPOSE", "ROLE", "USED", "GUN")]
    rows += [(k.key_id, k.algorithm, k.token, _state.purpose_name(k), k.role,
              "yes" if k.used else "no", k.gun)
             for k in keys]
    last = len(rows[0]) - 1  # the GUN, unpadded
    widths = [max(len(r[i]) for r in rows) for i in range(last)]
    return "\n".join(
        "  ".join([*(c.ljust(w) for c, w in zip(r[:last], widths, strict=True)), r[last]])
        for r in rows
    )


def token_dict(t: pb.TokenInfo) -> dict[str, Any]:
    def memory(v: int) -> int | None:
        return None if v < 0 else v

    return {
        "name": t.name, "module": t.module, "profile": t.profile,
        "manufacturer": t.manufacturer, "model": t.model, "serial": t.serial,
        "label": t.label, "healthy": t.healthy, "error": t.error,
        "algorithms": list(t.algorithms), "key_count": t.key_count, "sessions": t.sessions,
        "free_public_memory": memory(t.free_public_memory),
        "free_private_memory": memory(t.free_private_memory),
    }


def _token_lines(tokens: Sequence[pb.TokenInfo]) -> str:
    out = []
    for t in tokens:
        d = token_dict(t)
        health = "healthy" if t.healthy else f"UNUSABLE ({t.error})"
        free = ", ".join(f"{k.split('_')[1]} {v} bytes" for k, v in d.items()
                         if k.startswith("free_") and v is not None)
        out += [
            f"{t.name}: {health}",
            f"  {t.manufacturer} {t.model}, serial {t.serial}, label {t.label!r}",
            f"  module {t.module}, profile {t.profile}, {t.sessions} sessions",
            f"  keys {t.key_count}; can create {', '.join(t.algorithms) or 'nothing'}",
        ] + ([f"  free memory: {free}"] if free else [])
    return "\n".join(out)


def cmd_tokens_list(args: argparse.Namespace) -> None:
    with connect(args) as c:
        tokens = c.list_tokens()
    emit(args, [token_dict(t) for t in tokens], lambda: _token_lines(tokens))


def cmd_keys_create(args: argparse.Namespace) -> None:
    with connect(args) as c:
        k = c.create_key(args.gun, args.role, args.algorithm, args.token or "", args.purpose)
    emit(
        args,
        key_dict(k),
        lambda: f"created {k.algorithm} {_state.purpose_name(k)} key {k.key_id} for {k.role} "
                f"of {k.gun} on token {k.token}",
    )


def cmd_keys_list(args: argparse.Namespace) -> None:
    if args.gun:  # as keys create and state show refuse it, not an empty table
        try:
            validate_gun(args.gun)
        except InvalidArgument as e:
            raise CliError(str(e)) from None
    with connect(args) as c:
        keys = list(c.list_keys(args.gun or "", args.role or "", args.token or ""))
    emit(args, [key_dict(k) for k in keys], lambda: _table(keys))


def cmd_keys_show(args: argparse.Namespace) -> None:
    with connect(args) as c:
        k = c.get_key(args.key_id)
    emit(
        args,
        key_dict(k),
        lambda: (
            "\n".join(
                f"{name}: {_shown(value)}"
                for name, value in key_dict(k).items()
                if name != "public_key_pem"
            )
            + "\n"
            + k.public_key_pem.rstrip()
        ),
    )


def _confirmed(question: str) -> bool:
    """Ask on the terminal (stderr, stdin); only "y" or "yes" is a yes."""
    print(question, end="", file=sys.stderr, flush=True)
    return sys.stdin.readline().strip().lower() in ("y", "yes")


def cmd_keys_delete(args: argparse.Namespace) -> None:
    with connect(args) as c:
        # A key that has signed may still be what verifiers trust: destroying
        # it takes --yes, or a yes at the terminal.
        k = c.get_key(args.key_id)
        if k.used and not args.yes:
            what = f"key {k.key_id} ({k.role} of {k.gun}) has made signatures"
            if not sys.stdin.isatty():
                raise CliError(f"{what}; destroying it cannot be undone: pass --yes to delete it")
            if not _confirmed(f"{what}; destroy it for good? [y/N] "):
                raise CliError(f"key {k.key_id} not deleted")
        c.delete_key(k.key_id)
    emit(args, {"deleted": args.key_id}, lambda: f"deleted key {args.key_id}")


def cmd_keys_export(args: argparse.Namespace) -> None:
    if args.certificate:
        _export_chain(args)
        return
    with connect(args) as c:
        k = c.get_key(args.key_id)
    if args.format == "der":
        sys.stdout.buffer.write(k.public_key_der)
    else:
        sys.stdout.write(k.public_key_pem)


def _pem_chain(chain: Sequence[bytes]) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    return "".join(x509.load_der_x509_certificate(der).public_bytes(
        serialization.Encoding.PEM).decode() for der in chain)


def _export_chain(args: argparse.Namespace) -> None:
    if args.format != "pem":
        raise CliError("--certificate writes the chain as PEM; --format der is for public keys")
    with connect(args) as c:
        chain = c.certificate_chain(args.key_id)
    sys.stdout.write(_pem_chain(chain))


def _cert_dict(der: bytes) -> dict[str, Any]:
    from cryptography import x509

    cert = x509.load_der_x509_certificate(der)
    try:
        ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        ca = False
    return {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "serial": f"{cert.serial_number:x}",
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "ca": ca,
    }


def cmd_keys_certify(args: argparse.Namespace) -> None:
    with connect(args) as c:
        chain = c.certify_key(args.key_id, args.subject, args.issuer_key or "", args.days,
                              args.profile or "")
    leaf = _cert_dict(chain[0])
    data = {"key_id": args.key_id, **leaf,
            "chain": [_cert_dict(der) for der in chain], "chain_pem": _pem_chain(chain)}
    emit(args, data, lambda: "\n".join([
        f"certified key {args.key_id}: {'CA' if leaf['ca'] else 'code-signing'} certificate",
        f"  subject {leaf['subject']}",
        f"  issuer  {leaf['issuer']}",
        f"  valid   {leaf['not_before']} to {leaf['not_after']}",
        f"  chain of {len(chain)}; 'signerctl keys export {args.key_id} --certificate' "
        "prints it",
    ]))


def _read_input(name: str) -> bytes:
    """The whole of a small file (a signature, a public key); ``-`` is stdin."""
    if name == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(name).read_bytes()
    except OSError as e:
        raise CliError(f"cannot read {name}: {e.strerror}") from None


def cmd_sign(args: argparse.Namespace) -> None:
    stream = None if args.digest else _payload.open_input(args.input)
    out = None
    if args.out:  # opened before signing: a signature must not be made, then lost
        try:
            out = open(args.out, "wb")  # noqa: SIM115 - closed below, after the signature
        except OSError as e:
            raise CliError(f"cannot write the signature to {args.out}: {e.strerror}") from None
    try:
        with connect(args) as c:
            payload = (_payload.Payload(_payload.read_digest(args.input), True) if stream is None
                       else _sign_payload(args, c, stream))
            resp = c.sign(
                args.key_id,
                digest=payload.data if payload.prehashed else None,
                message=None if payload.prehashed else payload.data,
                encoding=args.encoding,
                rsa_padding=args.rsa_padding,
            )
        if out is not None:
            out.write(resp.signature)
    except BaseException:
        if out is not None:  # no empty file where a signature was expected
            out.close()
            Path(args.out).unlink(missing_ok=True)
        raise
    finally:
        if stream is not None and stream is not sys.stdin.buffer:
            stream.close()
    if out is not None:
        out.close()
    data = {
        "key_id": resp.key_id,
        "algorithm": resp.algorithm,
        "method": resp.method,
        "encoding": args.encoding,
        "signature": base64.b64encode(resp.signature).decode(),
    }
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
    elif not args.out:
        print(data["signature"])


def _sign_payload(args: argparse.Namespace, c: Client, stream: BinaryIO) -> _payload.Payload:
    """The message in ``stream``, whole if it fits in one request to the
    daemon, else its digest (see signerd.cli._payload). Raises CliError."""
    limit = c.cfg.max_message_bytes
    room = limit - _payload.request_overhead(args.key_id, limit)
    size = _payload.size_of(stream)
    first = b""
    if size is None or size <= room:
        first = _payload.read_at_most(stream, args.input, room)
        if len(first) <= room:
            return _payload.Payload(first, False)
    try:
        alg = parse_algorithm(c.get_key(args.key_id).algorithm)
    except grpc.RpcError as e:
        code = e.code().name if hasattr(e, "code") else "ERROR"
        raise CliError(
            f"{args.input} is more than {room} bytes, too big for one request to signerd at "
            f"{c.cfg.server} (max_message_bytes {limit}), so it is signed by its digest, "
            f"which takes the key's algorithm; reading key {args.key_id} failed: "
            f"{code}: {e.details() if hasattr(e, 'details') else e} (the policy must grant "
            "'read' as well as 'sign')") from None
    if alg.keytype == "ed25519":
        raise _payload.too_big_for_ed25519(
            args.input, size if size is not None else f"more than {room}", limit,
            f"signerd at {c.cfg.server}")
    return _payload.Payload(_payload.digest(alg, _payload.chunks(stream, args.input, first)),
                            True)


def _public_key_file(name: str) -> tuple[bytes, Algorithm]:
    """The DER SubjectPublicKeyInfo in file ``name`` (PEM or DER) and the
    algorithm signerd signs with for it. Raises CliError."""
    from cryptography.hazmat.primitives import serialization

    data = _read_input(name)
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(data)
        else:
            key = serialization.load_der_public_key(data)
        spki = key.public_bytes(serialization.Encoding.DER,
                                serialization.PublicFormat.SubjectPublicKeyInfo)
        return spki, public_key_algorithm(load_public_key(spki))
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise CliError(f"{name} holds no public key signerd can use: expected a PEM or DER "
                       "SubjectPublicKeyInfo (as 'signerctl keys export' writes)") from None
    except InvalidArgument as e:
        raise CliError(f"{name}: {e}") from None


def cmd_verify(args: argparse.Namespace) -> None:
    stream = None if args.digest else _payload.open_input(args.input)
    try:
        _verify(args, stream)
    finally:
        if stream is not None and stream is not sys.stdin.buffer:
            stream.close()


def _verify(args: argparse.Namespace, stream: BinaryIO | None) -> None:
    digest = _payload.read_digest(args.input) if stream is None else None
    raw_sig = _read_input(args.signature)
    try:  # signatures may be stored raw or as base64 text (what `sign` prints)
        sig = base64.b64decode(raw_sig.strip(), validate=True)
    except ValueError:
        sig = raw_sig
    if args.pubkey is not None:  # checked here alone: no daemon needed
        spki, alg = _public_key_file(args.pubkey)
        which: dict[str, Any] = {"pubkey": args.pubkey}
        named = f"the public key in {args.pubkey}"
    else:
        with connect(args) as c:
            k = c.get_key(args.key_id)
        spki, alg = k.public_key_der, parse_algorithm(k.algorithm)
        which, named = {"key_id": k.key_id}, f"key {k.key_id}"
    if args.digest and alg.keytype == "ed25519":
        raise CliError("ed25519 signs whole messages (pure EdDSA): verify the message, "
                       "not a digest")
    if stream is None:
        assert digest is not None
        payload: bytes = digest
    elif alg.keytype == "ed25519":
        # mmap is bytes-like, which is all Ed25519PublicKey.verify reads
        payload = cast(bytes, _payload.whole_message(stream, args.input))
    else:  # hashed here in chunks, as the daemon hashes a whole message
        payload = _payload.digest(alg, _payload.chunks(stream, args.input))
    options = signing.SignOptions(
        signing.Encoding(args.encoding), signing.RsaPadding(args.rsa_padding),
        prehashed=stream is None or alg.keytype != "ed25519"
    )
    try:
        signing.verify(spki, alg, sig, payload, options)
    except InvalidSignature:
        raise CliError(f"signature does NOT verify with {named}"
                       f"{_encoding_hint(alg, sig, args.encoding)}") from None
    emit(args, {**which, "algorithm": alg.name, "valid": True},
         lambda: f"signature OK ({named})")


def _encoding_hint(alg: Algorithm, sig: bytes, encoding: str) -> str:
    """For an ECDSA signature that failed: a hint when it looks like the
    other encoding (a DER SEQUENCE of two INTEGERs, or raw r||s of the
    curve's size), else nothing."""
    if alg.keytype != "ecdsa":
        return ""
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    if encoding == "raw":
        try:
            decode_dss_signature(sig)
        except ValueError:
            return ""
        return "; the signature looks DER-encoded: try --encoding der"
    if len(sig) == alg.signature_size:
        try:
            decode_dss_signature(sig)
        except ValueError:
            return "; the signature looks raw (r||s): try --encoding raw"
    return ""


def cmd_audit_verify(args: argparse.Namespace) -> None:
    from signerd import audit

    # Several files: rotated files oldest first, as one chain (audit.log.2* audit.log).
    result = audit.verify_files([Path(f) for f in args.file])
    data = {
        "ok": result.ok,
        "lines": result.lines,
        "first_bad_line": result.first_bad_line,
        "reason": result.reason,
        "problem": result.problem,
        "file": result.path,
        "files": list(result.files),
    }
    if result.ok and args.checkpoint:  # and the lines are the signed tree's (issue 25)
        from signerd.cli import _audit

        if not args.vkey:
            raise CliError("--checkpoint needs --vkey (the log's verifier key)")
        checked = _audit.check_checkpoint([Path(f) for f in args.file],
                                          Path(args.checkpoint),
                                          _audit.vkey_argument(args.vkey))
        data["checkpoint"] = checked
        emit(args, data, lambda: f"{audit.format_result(result)}; {checked}")
        return
    if result.ok:
        emit(args, data, lambda: audit.format_result(result))
        return
    if args.json:  # the result document, as on success; the failure's line goes to stderr
        print(json.dumps(data, indent=2, sort_keys=True))
    raise CliError(audit.format_result(result))


def build_parser() -> argparse.ArgumentParser:
    # Global options are accepted before or after the command. Sub-parsers
    # use SUPPRESS so that they do not overwrite a value given earlier.
    parser: argparse.ArgumentParser = CliParser(prog="signerctl", description="signerd client")
    add_version_flag(parser)
    common = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    for p in (parser, common):
        add_client_options(p)
    sub = parser.add_subparsers(dest="command", required=True)
    keys = sub.add_parser("keys", help="manage keys").add_subparsers(dest="keys_cmd", required=True)

    p = keys.add_parser("create", parents=[common], help="generate a key on a token")
    p.add_argument("--gun", required=True)
    p.add_argument("--role", required=True)
    p.add_argument("--algorithm", default="ecdsa-p256", choices=sorted(ALGORITHMS))
    p.add_argument("--token", help="token name (default: the token for the role)")
    p.add_argument("--purpose", choices=PURPOSES, default="metadata",
                   help="metadata: signs only checked TUF/Notary metadata of its role "
                        "(default); raw: opaque messages and digests (cosign, Notation, CA)")
    p.set_defaults(func=cmd_keys_create, creates_keys=True)

    p = keys.add_parser("list", parents=[common], help="list keys")
    p.add_argument("--gun")
    p.add_argument("--role")
    p.add_argument("--token")
    p.set_defaults(func=cmd_keys_list)

    p = keys.add_parser("show", parents=[common], help="show a key")
    p.add_argument("key_id")
    p.set_defaults(func=cmd_keys_show)

    p = keys.add_parser("delete", parents=[common], help="destroy a key on its token")
    p.add_argument("key_id")
    p.add_argument("--yes", action="store_true",
                   help="destroy it even if it has made signatures, without asking")
    p.set_defaults(func=cmd_keys_delete)

    tokens = sub.add_parser("tokens", help="the daemon's tokens").add_subparsers(
        dest="tokens_cmd", required=True)
    p = tokens.add_parser("list", parents=[common],
                          help="each token: what it is, its health, what it can create")
    p.set_defaults(func=cmd_tokens_list)

    p = keys.add_parser("export", parents=[common], help="print the public key")
    p.add_argument("key_id")
    p.add_argument("--format", choices=("pem", "der"), default="pem")
    p.add_argument("--certificate", action="store_true",
                   help="print the key's certificate chain instead (PEM, leaf first)")
    p.set_defaults(func=cmd_keys_export)

    p = keys.add_parser("certify", parents=[common],
                        help="issue an X.509 certificate for a key, signed on the token")
    p.add_argument("key_id")
    p.add_argument("--subject", required=True,
                   help="RFC 4514 name, e.g. 'CN=acme signer,O=Acme,ST=WA,C=US'")
    p.add_argument("--issuer-key", metavar="KEYID",
                   help="the CA key that signs it (default: the key itself, a self-signed root)")
    # Left out, it is 0 on the wire: the RPC's default (CertifyKeyRequest.validity_days).
    p.add_argument("--days", default=0,
                   type=whole_number(1, MAX_DAYS, "days",
                                     "; leave --days out for the default: 3650 for a CA, "
                                     "365 otherwise"),
                   help=f"validity in days, 1 to {MAX_DAYS} "
                   "(default: 3650 for a CA, 365 otherwise)")
    p.add_argument("--profile", choices=("ca", "code-signing"),
                   help="default: ca when self-signed, code-signing when another key issues it")
    p.set_defaults(func=cmd_keys_certify)

    def sign_flags(p: argparse.ArgumentParser, verb: str) -> None:
        p.add_argument(
            "--digest",
            action="store_true",
            help="the input is a precomputed digest (hex or raw), not the message",
        )
        p.add_argument("--encoding", choices=("raw", "der"), default="raw")
        p.add_argument("--rsa-padding", choices=("pss", "pkcs1v15"), default="pss")
        p.add_argument("input", help=f"file to {verb}, or - for standard input (with --digest: "
                       "a file holding the digest)")

    p = sub.add_parser("sign", parents=[common], help="sign a file")
    p.add_argument("--key", dest="key_id", required=True, metavar="KEYID")
    p.add_argument("--out", help="write the raw signature here (default: print base64)")
    sign_flags(p, "sign")
    p.set_defaults(func=cmd_sign)

    p = sub.add_parser("verify", parents=[common], help="verify a signature locally")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--key", dest="key_id", metavar="KEYID",
                       help="a key of signerd's (its public key is read from the daemon)")
    which.add_argument("--pubkey", metavar="FILE",
                       help="a public key file, PEM or DER SubjectPublicKeyInfo: no daemon needed")
    p.add_argument("--signature", required=True, help="signature file (raw or base64)")
    sign_flags(p, "verify")
    p.set_defaults(func=cmd_verify)

    audit = sub.add_parser("audit", help="audit log tools").add_subparsers(
        dest="audit_cmd", required=True
    )
    p = audit.add_parser("verify", parents=[common], help="check an audit log's hash chain")
    p.add_argument("file", nargs="+", help="the log, or rotated files oldest first then the log")
    p.add_argument("--checkpoint", metavar="FILE",
                   help="also check the lines against this signed checkpoint")
    p.add_argument("--vkey", help="the checkpoint's verifier key, or a file holding it "
                                  "(what signerctl audit vkey prints)")
    p.set_defaults(func=cmd_audit_verify)
    from signerd.cli import _audit

    _audit.register(audit, common)

    _state.register(sub, keys, common)
    trust_cli.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run signerctl. Every failure is one line on stderr and a non-zero
    exit: 1, or 2 for a usage error; an unexpected one shows its traceback
    only with --debug."""
    parser = build_parser()
    args = parser.parse_args(argv)
    creates_keys = getattr(args, "creates_keys", False)
    try:
        if not creates_keys:
            return _run(args)
        with _interrupt.FinishFirst() as guard:  # see signerd.cli._interrupt
            code = _run(args)
        if guard.interrupted and code == 0:  # (a failure has said its own line)
            print(_interrupt.finished_line(), file=sys.stderr)
            return 130
        return code
    except KeyboardInterrupt:
        if creates_keys:
            print(_interrupt.abandoned_line(getattr(args, "gun", None),
                                            getattr(args, "role", None)), file=sys.stderr)
        else:
            print("signerctl: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug, or a failure no command expects
        if getattr(args, "debug", False):
            raise
        print(f"signerctl: unexpected error: {type(e).__name__}: {one_line(str(e))} "
              "(--debug shows where)", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    try:
        args.func(args)
    except grpc.RpcError as e:
        code = e.code() if hasattr(e, "code") else None
        name = code.name if code is not None else "ERROR"
        detail = e.details() if hasattr(e, "details") else str(e)
        server = getattr(args, "server", None)
        if server is None:
            try:
                server = client_config(args).server
            except (CliError, ConfigError):
                server = None
        print(f"signerctl: {one_line(rpc_error_line(name, detail or '', server))}",
              file=sys.stderr)
        return 1
    except UsageError as e:  # as signerd.ArgumentParser.error words one
        prog = getattr(args, "usage_prog", "signerctl")
        print(f"{prog}: {one_line(str(e))} (see '{prog} --help')", file=sys.stderr)
        return 2
    except (CliError, SignerdError, ConfigError) as e:
        print(f"signerctl: {one_line(str(e))}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 1
    return 0
