"""signerd.v1 over real mTLS against real SoftHSM tokens."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pkcs11
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import utils

from signerd import signing
from signerd.config import parse_config
from signerd.keys import ALGORITHMS, key_id, parse_algorithm
from signerd.service import KeyService
from signerd.token import MODULES, Token, _layout, _p11, _SharedLock
from signerd.v1 import signer_pb2 as pb
from tests.conftest import (
    Daemon,
    daemon_config,
    hsm_token,
    rpc_error,
    start_daemon,
    unique_gun,
)

MESSAGE = b"The quick brown fox signs the canonical JSON" * 7


@pytest.mark.parametrize("encoding", ["raw", "der"])
@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_every_algorithm_signs_and_verifies(daemon: Daemon, algorithm: str, encoding: str) -> None:
    with daemon.client() as c:
        key = c.create_key(unique_gun(), "targets", algorithm, purpose="raw")
        resp = c.sign(key.key_id, message=MESSAGE, encoding=encoding)
    alg = parse_algorithm(algorithm)
    assert resp.algorithm == algorithm
    options = signing.SignOptions(signing.Encoding(encoding))
    signing.verify(key.public_key_der, alg, resp.signature, MESSAGE, options)  # raises if bad
    if alg.keytype == "ecdsa" and encoding == "raw":
        assert len(resp.signature) == alg.signature_size  # r||s at fixed width (TUF, Notary)
    if alg.keytype == "ecdsa" and encoding == "der":
        r, s = utils.decode_dss_signature(resp.signature)
        assert r > 0 and s > 0
    with pytest.raises(InvalidSignature):
        signing.verify(key.public_key_der, alg, resp.signature, MESSAGE + b"!", options)


@pytest.mark.parametrize("algorithm", ["ecdsa-p256", "ecdsa-p384", "rsa-2048"])
def test_sign_precomputed_digest(daemon: Daemon, algorithm: str) -> None:
    alg = parse_algorithm(algorithm)
    assert alg.hash_name is not None
    digest = hashlib.new(alg.hash_name, MESSAGE).digest()
    with daemon.client() as c:
        key = c.create_key(unique_gun(), "targets", algorithm, purpose="raw")
        resp = c.sign(key.key_id, digest=digest)
    signing.verify(key.public_key_der, alg, resp.signature, MESSAGE, signing.SignOptions())


def test_p384_signs_a_sha256_digest_as_tuf_verifies_it(daemon: Daemon) -> None:
    digest = hashlib.sha256(MESSAGE).digest()
    with daemon.client() as c:
        key = c.create_key(unique_gun(), "targets", "ecdsa-p384", purpose="raw")
        resp = c.sign(key.key_id, digest=digest)
        too_long = rpc_error(
            lambda: c.sign(
                c.create_key(unique_gun(), "targets", purpose="raw").key_id,
                digest=hashlib.sha384(MESSAGE).digest(),
            )
        )
    options = signing.SignOptions(prehashed=True)
    signing.verify(
        key.public_key_der, parse_algorithm("ecdsa-p384"), resp.signature, digest, options
    )
    assert too_long.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "digest is 48 bytes" in too_long.details()


def test_rsa_pkcs1v15_on_request(daemon: Daemon) -> None:
    with daemon.client() as c:
        key = c.create_key(unique_gun(), "targets", "rsa-2048", purpose="raw")
        resp = c.sign(key.key_id, message=MESSAGE, rsa_padding="pkcs1v15")
        pss = c.sign(key.key_id, message=MESSAGE)
    assert resp.method == "rsa-pkcs1v15" and pss.method == "rsapss"
    options = signing.SignOptions(rsa_padding=signing.RsaPadding.PKCS1V15)
    signing.verify(
        key.public_key_der, parse_algorithm("rsa-2048"), resp.signature, MESSAGE, options
    )
    # PKCS#1 v1.5 is deterministic; PSS (random salt) is not.
    assert c is not None and resp.signature != pss.signature


def test_key_id_is_tuf_key_id(daemon: Daemon) -> None:
    with daemon.client() as c:
        for algorithm in ("ecdsa-p256", "ed25519", "rsa-2048"):
            k = c.create_key(unique_gun(), "targets", algorithm, purpose="raw")
            assert k.key_id == key_id(k.keytype, k.tuf_public)
            if k.keytype == "ed25519":
                assert len(k.tuf_public) == 32
            else:
                assert k.tuf_public == k.public_key_der
            assert k.public_key_pem.startswith("-----BEGIN PUBLIC KEY-----")


def test_get_list_delete_and_pagination(daemon: Daemon) -> None:
    gun = unique_gun()
    with daemon.client() as c:
        made = {
            c.create_key(gun, role).key_id
            for role in ("targets", "snapshot", "targets/releases", "targets/ci-1", "timestamp")
        }
        root = c.create_key(gun, "root")
        assert root.token == "root"  # root keys go to the root token by default
        listed = {k.key_id for k in c.list_keys(gun=gun)}
        assert listed == made | {root.key_id}
        assert {k.key_id for k in c.list_keys(gun=gun, role="targets/releases")} < made
        assert {k.key_id for k in c.list_keys(gun=gun, token="root")} == {root.key_id}
        pages, token, seen = 0, "", []
        while True:
            resp = c.stub.ListKeys(pb.ListKeysRequest(gun=gun, page_size=2, page_token=token))
            seen += [k.key_id for k in resp.keys]
            pages += 1
            token = resp.next_page_token
            if not token:
                break
        assert pages == 3 and seen == sorted(seen) and set(seen) == listed
        victim = sorted(made)[0]
        assert c.get_key(victim).gun == gun
        c.delete_key(victim)
        err = rpc_error(lambda: c.get_key(victim))
        assert err.code() == grpc.StatusCode.NOT_FOUND


def _bad_inputs(key_p256: str, key_ed: str) -> list[tuple[str, Any, grpc.StatusCode, str]]:
    huge = b"x" * (2 << 20)
    return [
        (
            "unknown-key",
            lambda c: c.sign("ab" * 32, message=b"m"),
            grpc.StatusCode.NOT_FOUND,
            "no key with ID",
        ),
        (
            "malformed-key-id",
            lambda c: c.sign("not-a-key", message=b"m"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "64 lowercase hex",
        ),
        (
            "unknown-algorithm",
            lambda c: c.create_key("docker.io/a/b", "targets", "dsa-1024"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "unknown algorithm 'dsa-1024'",
        ),
        (
            "digest-wrong-length",
            lambda c: c.sign(key_p256, digest=b"\x01" * 20),
            grpc.StatusCode.INVALID_ARGUMENT,
            "digest is 20 bytes, but ecdsa-p256 signs a digest of 32 (SHA256) bytes",
        ),
        (
            "ed25519-digest",
            lambda c: c.sign(key_ed, digest=b"\x01" * 32),
            grpc.StatusCode.INVALID_ARGUMENT,
            "pure EdDSA",
        ),
        (
            "empty-message",
            lambda c: c.sign(key_p256, message=b""),
            grpc.StatusCode.INVALID_ARGUMENT,
            "empty",
        ),
        (
            "no-payload",
            lambda c: c.stub.Sign(pb.SignRequest(key_id=key_p256)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "set either 'message'",
        ),
        (
            "oversized-message",
            lambda c: c.sign(key_p256, message=huge),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "larger than max",
        ),
        (
            "bad-gun",
            lambda c: c.create_key("Docker.io/UPPER CASE", "targets"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "invalid gun",
        ),
        (
            "empty-gun",
            lambda c: c.create_key("", "targets"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "gun is required",
        ),
        (
            "bad-role",
            lambda c: c.create_key("docker.io/a/b", "admin"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "invalid role 'admin'",
        ),
        (
            "bad-delegation",
            lambda c: c.create_key("docker.io/a/b", "targets/../root"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "invalid role",
        ),
        (
            "unknown-token",
            lambda c: c.create_key("docker.io/a/b", "targets", token="nope"),
            grpc.StatusCode.NOT_FOUND,
            "no token named 'nope'",
        ),
        (
            "bad-page-size",
            lambda c: list(c.stub.ListKeys(pb.ListKeysRequest(page_size=5000)).keys),
            grpc.StatusCode.INVALID_ARGUMENT,
            "page_size",
        ),
        (
            "bad-encoding",
            lambda c: c.stub.Sign(pb.SignRequest(key_id=key_p256, message=b"m", encoding=9)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "unknown encoding",
        ),
        (
            "delete-unknown",
            lambda c: c.delete_key("cd" * 32),
            grpc.StatusCode.NOT_FOUND,
            "no key with ID",
        ),
    ]


_CASES = [c[0] for c in _bad_inputs("", "")]


@pytest.mark.parametrize("case", _CASES)
def test_bad_input_gets_status_and_message(daemon: Daemon, case: str) -> None:
    with daemon.client() as c:
        p256 = c.create_key(unique_gun(), "targets", purpose="raw").key_id
        ed = c.create_key(unique_gun(), "targets", "ed25519", purpose="raw").key_id
        name, call, code, text = next(x for x in _bad_inputs(p256, ed) if x[0] == case)
        err = rpc_error(lambda: call(c))
    assert err.code() == code, err.details()
    assert text in err.details()
    assert "Traceback" not in err.details()


def test_private_key_attributes_and_unextractable(daemon: Daemon, hsm: Any) -> None:
    with daemon.client() as c:
        keys = [
            c.create_key(unique_gun(), "targets", a, purpose="raw")
            for a in ("ecdsa-p256", "rsa-2048", "ed25519")
        ]
    lib = MODULES.acquire(hsm.module)
    try:
        session = lib.get_token(token_label="test-online").open(
            rw=True
        )  # shares the daemon's login
        try:
            wrapping = session.generate_key(
                pkcs11.KeyType.AES,
                256,
                store=False,
                capabilities=0,
                template={pkcs11.Attribute.WRAP: True, pkcs11.Attribute.ENCRYPT: True},
            )
            for k in keys:
                object_id = daemon.servers.service.get_key(k.key_id).object_id
                # layout 2: 16 random bytes here (2 under the yubihsm profile)
                assert len(object_id) == daemon.servers.service.tokens["online"].profile.id_bytes
                priv = session.get_key(object_class=pkcs11.ObjectClass.PRIVATE_KEY, id=object_id)
                A = pkcs11.Attribute
                assert priv[A.TOKEN] is True and priv[A.PRIVATE] is True
                assert priv[A.SENSITIVE] is True and priv[A.EXTRACTABLE] is False
                assert priv[A.ALWAYS_SENSITIVE] is True and priv[A.NEVER_EXTRACTABLE] is True
                assert priv[A.SIGN] is True and priv[A.DECRYPT] is False
                secret_attr = A.PRIVATE_EXPONENT if k.keytype == "rsa" else A.VALUE
                with pytest.raises(pkcs11.exceptions.AttributeSensitive):
                    priv[secret_attr]
                with pytest.raises(
                    (pkcs11.exceptions.KeyUnextractable, pkcs11.exceptions.KeyNotWrappable)
                ):
                    wrapping.wrap_key(priv, mechanism=pkcs11.Mechanism.AES_KEY_WRAP_PAD)
        finally:
            session.close()
    finally:
        MODULES.release(hsm.module)


def _sign_concurrently(signers: list[Callable[[int], bytes]], n: int) -> list[list[bytes]]:
    """Each signer in a thread of its own, signing ``n`` times (message i = its
    number); every thread's signatures, after all have finished without error."""
    errors: list[BaseException] = []
    results: list[list[bytes]] = [[] for _ in signers]

    def run(sign: Callable[[int], bytes], out: list[bytes]) -> None:
        try:
            for i in range(n):
                out.append(sign(i))
        except BaseException as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(sign, out))
               for sign, out in zip(signers, results, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    return results


def test_eight_threads_sign_concurrently_on_the_token(daemon: Daemon) -> None:
    """Regression: with C_Initialize(NULL), SoftHSM crashed under concurrent signing."""
    svc = daemon.servers.service
    keys = [
        svc.create_key(unique_gun(), "targets", a, purpose="raw")
        for a in ("ecdsa-p256", "ed25519", "ecdsa-p384", "rsa-2048")
    ]
    def signer(k: Any) -> Callable[[int], bytes]:
        return lambda i: svc.sign(k.key_id, b"%d" % i, signing.SignOptions()).signature

    results = _sign_concurrently([signer(keys[t % len(keys)]) for t in range(8)], 150)
    for t in range(8):
        k = keys[t % len(keys)]
        assert len(results[t]) == 150
        for i in (0, 77, 149):
            signing.verify(k.spki_der, k.algorithm, results[t][i], b"%d" % i, signing.SignOptions())


def test_eight_grpc_callers_sign_concurrently(daemon: Daemon) -> None:
    with daemon.client() as c:
        key = c.create_key(unique_gun(), "targets", purpose="raw")
        results = _sign_concurrently(
            [lambda i: c.sign(key.key_id, message=b"%d" % i).signature] * 8, 100)
    assert all(len(r) == 100 for r in results)
    signing.verify(
        key.public_key_der,
        parse_algorithm(key.algorithm),
        results[3][42],
        b"42",
        signing.SignOptions(),
    )


def _while_running(background: Callable[[], None], fn: Callable[[], None]) -> None:
    """Run ``background`` in a loop in another thread while ``fn`` runs; both must
    finish without error."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def loop() -> None:
        try:
            while not stop.is_set():
                background()
        except BaseException as e:  # noqa: BLE001 - asserted below
            errors.append(e)

    t = threading.Thread(target=loop)
    t.start()
    try:
        fn()
    finally:
        stop.set()
        t.join()
    assert errors == []


@pytest.mark.parametrize("lister", ["same Token", "another Token"])
def test_keys_are_generated_while_another_thread_lists_them(
        daemon: Daemon, hsm: Any, lister: str) -> None:
    """Regression: SoftHSM 2.6.1 (its issue 573, fixed after the release) marks
    an object invalid when a search in one thread reads its file while another
    thread of the process writes it, and the key generation then fails with
    CKR_GENERAL_ERROR. This is what a daemon's first listing and a CreateKey
    at start do; a second Token object on the same token must wait too."""
    svc = daemon.servers.service
    token = svc.tokens["online"]
    other = token if lister == "same Token" else Token(hsm_token(hsm, "online"))
    gun = unique_gun()
    made = []
    try:
        _while_running(other.refresh, lambda: made.extend(
            svc.create_key(gun, f"targets/r{i}", purpose="raw") for i in range(40)))
    finally:
        if other is not token:
            other.close()
    token.refresh()
    assert {k.key_id for k in made} <= {k.key_id for k in token.keys()}


def test_shared_lock_lets_sharers_share_and_an_exclusive_holder_go_first() -> None:
    """Shared holders run together; an exclusive one waits for them and, once
    waiting, holds back new shared ones (so a stream of them cannot starve it)."""
    lock = _SharedLock()
    order: list[str] = []
    with lock.shared(), lock.shared():  # two at once: no deadlock
        writer = threading.Thread(target=lambda: _hold(lock.exclusive, order, "exclusive"))
        writer.start()
        while not lock._waiting:  # the exclusive holder waits for the two
            time.sleep(0.01)
        late = threading.Thread(target=lambda: _hold(lock.shared, order, "late shared"))
        late.start()
        time.sleep(0.2)
        assert order == []  # neither got in
        order.append("shared done")
    writer.join(10)
    late.join(10)
    assert order == ["shared done", "exclusive", "late shared"]


def _hold(guard: Callable[[], Any], order: list[str], name: str) -> None:
    with guard():
        order.append(name)
        time.sleep(0.05)


def test_a_key_is_marked_used_while_other_threads_sign_with_it(daemon: Daemon) -> None:
    """Relabelling rewrites the key's files while signing re-reads them. A
    sign that met a half-written file got CKR_OBJECT_HANDLE_INVALID and
    reconnected, closing the sessions other threads were using (once in
    ~10 full runs). Neither fails now, and nothing reconnects."""
    svc = daemon.servers.service
    token = svc.tokens["online"]
    keys = [svc.create_key(unique_gun(), "targets", purpose="raw") for _ in range(60)]
    generation = token._generation

    def sign_all() -> None:
        for k in keys:
            svc.sign(k.key_id, MESSAGE, signing.SignOptions())

    _while_running(sign_all, lambda: [svc.mark_used(k) for k in keys])
    assert all(token.get(k.key_id).used for k in keys)
    assert token._generation == generation


def test_a_keys_first_signatures_write_one_has_signed_object(daemon: Daemon) -> None:
    """Threads signing with a new key together record its first signature
    once (one metadata object on the token, rewritten with "used"), and a key
    whose cached entry says used writes nothing more, even after a listing
    re-read it."""
    svc = daemon.servers.service
    token = svc.tokens["online"]
    key = svc.create_key(unique_gun(), "targets", purpose="raw")
    assert not key.used

    def has_signed_objects() -> int:
        with token.session() as (_, s):
            metas = [_layout.parse_meta_value(o[pkcs11.Attribute.VALUE])
                     for o in s.get_objects({
                         pkcs11.Attribute.CLASS: pkcs11.ObjectClass.DATA,
                         pkcs11.Attribute.LABEL: _layout.meta_label(key.key_id).decode()})]
            assert len(metas) == 1  # the unused one was destroyed
            return sum(1 for m in metas if m is not None and m.used)

    threads = [threading.Thread(target=svc.sign_with, args=(key, MESSAGE, signing.SignOptions()))
               for _ in range(8)]  # each with the stale entry that says unused
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    # The unused metadata is destroyed in the background (signerd.token._retire):
    # until then it is the key's, and a listing takes the one that says used.
    other = Token(token.config)
    try:
        assert other.lookup(key.key_id).used  # type: ignore[union-attr]
    finally:
        other.close()
    assert token.wait_retired()
    assert token.get(key.key_id).used and has_signed_objects() == 1
    assert token.get(key.key_id).marks == ()  # its handle forgotten with the object
    token.refresh()
    svc.sign_with(key, MESSAGE, signing.SignOptions())
    assert token.wait_retired()
    assert token.get(key.key_id).used and has_signed_objects() == 1


class _Seen(logging.Handler):
    """Sets ``event`` when a record with ``message`` is logged."""

    def __init__(self, message: str) -> None:
        super().__init__()
        self.message, self.event = message, threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == self.message:
            self.event.set()


def test_tokens_open_once_another_process_has_written_the_token_file(
        hsm: Any, certs: Any, tmp_path: Path) -> None:
    """Regression: SoftHSM 2.6.1 rewrites the token's file on every login and
    flushes it only after unlocking, so a process starting meanwhile (two
    workers starting together) reads it empty and finds no token, or its login
    fails. Here the file is as such a writer leaves it (empty): the first
    attempt fails; once the file is whole again, the next attempt opens it."""
    config = parse_config(daemon_config(hsm, certs, tmp_path), tmp_path)
    token_file = token_dir(hsm, "test-online") / "token.object"
    whole = token_file.read_bytes()
    seen = _Seen("cannot open the tokens yet; trying again")
    logging.getLogger("signerd.service").addHandler(seen)
    opened: list[KeyService] = []
    opener = threading.Thread(target=lambda: opened.append(KeyService.open(config)))
    try:
        token_file.write_bytes(b"")
        opener.start()
        while opener.is_alive() and not seen.event.wait(0.01):
            pass
        assert seen.event.is_set(), "the first attempt did not fail and try again"
    finally:
        token_file.write_bytes(whole)
        logging.getLogger("signerd.service").removeHandler(seen)
        opener.join(30)
    assert len(opened) == 1
    opened[0].close()


def test_lost_sessions_are_reopened_and_the_sign_retried(daemon: Daemon) -> None:
    """The token drops every session (and so the login); the next sign still works."""
    svc = daemon.servers.service
    key = svc.create_key(unique_gun(), "targets", purpose="raw")
    token = svc.tokens["online"]
    token.module.close_all_sessions(token.slot_id)
    sig = svc.sign(key.key_id, MESSAGE, signing.SignOptions())
    signing.verify(key.spki_der, key.algorithm, sig.signature, MESSAGE, signing.SignOptions())
    assert token.healthy


def test_a_listing_after_a_logout_logs_in_again(daemon: Daemon) -> None:
    """Logged out, a search finds no private key: the listing must not
    conclude that the token has no keys."""
    svc = daemon.servers.service
    key = svc.create_key(unique_gun(), "targets", purpose="raw")
    token = svc.tokens["online"]
    with token.session() as (_, s):
        token.module.logout(s.handle)
    token.refresh()
    assert token.get(key.key_id) is not None
    assert token.check()


def test_closing_a_second_token_object_keeps_the_first_logged_in(
        daemon: Daemon, hsm: Any) -> None:
    """PKCS#11 logs in per application and token, so C_Logout from one Token
    object would log out every other one on the same token."""
    token = daemon.servers.service.tokens["online"]
    Token(hsm_token(hsm, "online")).close()
    with token.session() as (_, s):
        assert token.module.session_state(s.handle) == _p11.CKS_RW_USER_FUNCTIONS


def test_health_and_reflection_are_served(daemon: Daemon) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with daemon.client() as c:
        h = health_pb2_grpc.HealthStub(c.channel)
        resp = h.Check(health_pb2.HealthCheckRequest(service="signerd.v1.SignerService"))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        r = reflection_pb2_grpc.ServerReflectionStub(c.channel)
        answers = list(
            r.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        )
        names = {s.name for s in answers[0].list_services_response.service}
        assert {"signerd.v1.SignerService", "grpc.health.v1.Health"} <= names


def token_dir(hsm: Any, label: str) -> Path:
    """The SoftHSM directory that stores the token called ``label``."""
    for d in (hsm.dir / "tokens").iterdir():
        if label.encode() in (d / "token.object").read_bytes():
            return d
    raise AssertionError(f"no SoftHSM token {label}")


def test_token_gone_gives_unavailable_and_not_serving_then_recovers(
    daemon_factory: Any, hsm: Any, tmp_path: Path
) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    d = daemon_factory(tokens=("online",))
    serving = health_pb2.HealthCheckResponse.SERVING
    with d.client() as c:
        key = c.create_key(unique_gun(), "targets", purpose="raw")
        h = health_pb2_grpc.HealthStub(c.channel)
        req = health_pb2.HealthCheckRequest(service="signerd.v1.SignerService")
        assert h.Check(req).status == serving
        where = token_dir(hsm, "test-online")
        away = tmp_path / "unplugged"
        where.rename(away)  # the token is gone, as if the HSM were unplugged
        try:
            err = rpc_error(lambda: c.sign(key.key_id, message=b"m"))
            assert err.code() == grpc.StatusCode.UNAVAILABLE
            assert "token online" in err.details()
            assert h.Check(req).status == health_pb2.HealthCheckResponse.NOT_SERVING
        finally:
            away.rename(where)
        time.sleep(1.1)  # reconnect attempts are spaced by a second
        assert d.servers.service.check()  # what the periodic health probe runs
        d.servers.update_health()
        assert h.Check(req).status == serving
        sig = c.sign(key.key_id, message=b"m").signature
    signing.verify(
        key.public_key_der, parse_algorithm(key.algorithm), sig, b"m", signing.SignOptions()
    )


def test_a_token_away_during_ed25519_generation_keeps_offering_ed25519(
        daemon_factory: Any, hsm: Any, tmp_path: Path) -> None:
    """SoftHSM answers CKR_GENERAL_ERROR to a key generation once its token has gone: that
    is a token away (UNAVAILABLE), not a token that cannot make Ed25519 keys. Seen by an
    attack run: the token stopped offering ed25519 until a restart, and the audit
    checkpoint key chosen meanwhile became ECDSA for good."""
    d = daemon_factory(tokens=("online",), audit=False)
    token = d.servers.service.tokens["online"]
    assert "ed25519" in token.algorithms
    with d.client() as c:
        where = token_dir(hsm, "test-online")
        away = tmp_path / "unplugged"
        where.rename(away)
        try:
            err = rpc_error(lambda: c.create_key(unique_gun(), "targets", "ed25519"))
            assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
        finally:
            away.rename(where)
        assert "ed25519" in token.algorithms
        time.sleep(1.1)  # reconnect attempts are spaced by a second
        assert d.servers.service.check()
        assert c.create_key(unique_gun(), "targets", "ed25519").algorithm == "ed25519"


def test_refused_login_on_reconnect_is_never_retried(daemon_factory: Any, hsm: Any) -> None:
    """SoftHSM never locks a PIN, so a login retry loop would be a guessing oracle."""
    # No audit log: its final checkpoint would wait out the refused token at the stop
    # (signerd.service._checkpointkey.SIGN_PATIENCE), 30 s of this suite for nothing.
    d = daemon_factory(tokens=("online",), audit=False)
    svc = d.servers.service
    key = svc.create_key(unique_gun(), "targets", purpose="raw")
    token = svc.tokens["online"]
    pin = hsm.pins["online"].read_text()
    lib = MODULES.acquire(hsm.module)
    try:
        with token.session() as (_, s):
            s.set_pin(pin, pin + "-changed")  # someone changes the PIN under the daemon
        try:
            token.module.close_all_sessions(token.slot_id)  # and the login is lost
            err = rpc_error(lambda: d.client().sign(key.key_id, message=b"m"))
            assert err.code() == grpc.StatusCode.UNAVAILABLE
            assert "CKR_PIN_INCORRECT" in err.details() and pin not in err.details()
        finally:
            session = lib.get_token(token_label="test-online").open(
                rw=True, user_pin=pin + "-changed"
            )
            session.set_pin(pin + "-changed", pin)
            session.close()
        time.sleep(1.1)  # past the reconnect spacing: still no new login attempt
        err = rpc_error(lambda: d.client().sign(key.key_id, message=b"m"))
        assert err.code() == grpc.StatusCode.UNAVAILABLE
        assert "refused the configured PIN" in err.details()
        assert not svc.check()
    finally:
        MODULES.release(hsm.module)


def test_sign_batch_one_bad_item_fails_only_itself(daemon: Daemon) -> None:
    with daemon.client() as c:
        p256 = c.create_key(unique_gun(), "targets", purpose="raw")
        ed = c.create_key(unique_gun(), "targets/releases", "ed25519", purpose="raw")
        reqs = [
            pb.SignRequest(key_id=p256.key_id, message=b"one"),
            pb.SignRequest(key_id="ab" * 32, message=b"unknown key"),
            pb.SignRequest(key_id=ed.key_id, message=b"two"),
            pb.SignRequest(key_id=p256.key_id, digest=b"short"),
            pb.SignRequest(key_id="not hex", message=b"x"),
            pb.SignRequest(key_id=ed.key_id, digest=b"\x00" * 32),
            pb.SignRequest(key_id=p256.key_id, message=b"three", encoding=2),
        ]
        resp = c.stub.SignBatch(pb.SignBatchRequest(requests=reqs))
        empty = rpc_error(lambda: c.stub.SignBatch(pb.SignBatchRequest()))
    codes = [
        grpc.StatusCode(next(s for s in grpc.StatusCode if s.value[0] == i.code))
        for i in resp.items
    ]
    assert codes == [
        grpc.StatusCode.OK,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.OK,
    ]
    assert "no key with ID" in resp.items[1].error and "digest is 5 bytes" in resp.items[3].error
    ok = signing.SignOptions()
    signing.verify(
        p256.public_key_der,
        parse_algorithm("ecdsa-p256"),
        resp.items[0].response.signature,
        b"one",
        ok,
    )
    signing.verify(
        ed.public_key_der, parse_algorithm("ed25519"), resp.items[2].response.signature, b"two", ok
    )
    signing.verify(
        p256.public_key_der,
        parse_algorithm("ecdsa-p256"),
        resp.items[6].response.signature,
        b"three",
        signing.SignOptions(signing.Encoding.DER),
    )
    assert empty.code() == grpc.StatusCode.INVALID_ARGUMENT



def test_stop_waits_for_the_health_probe_before_closing_tokens(
    hsm: Any, certs: Any, tmp_path: Path
) -> None:
    """A probe still running when the tokens close would use a closed session."""
    d = start_daemon(daemon_config(hsm, certs, tmp_path, server={"health_interval": 0.05}),
                     certs, tmp_path)
    probe = d.servers._health_thread
    assert probe is not None and probe.is_alive()
    time.sleep(0.1)  # a few probes
    d.stop()
    assert not probe.is_alive()
    assert not any(t.connected for t in d.servers.service.tokens.values())


@pytest.mark.parametrize("value", [
    "AB" * 32,              # uppercase
    "ab" * 32 + "\n",       # a trailing newline ($ in a regex would let it through)
    "ab" * 31 + "a",        # 63 characters
    "ab" * 33,              # 66
    "g" * 64,               # not hex
    "\u0661" * 64,          # Arabic-Indic digits: Unicode \d, not hex
    "",
])
def test_a_key_id_is_exactly_64_lowercase_hex_characters(value: str) -> None:
    from signerd.errors import InvalidArgument
    from signerd.keys import validate_key_id
    with pytest.raises(InvalidArgument, match="64 lowercase hex"):
        validate_key_id(value)
    assert validate_key_id("0123456789abcdef" * 4) == "0123456789abcdef" * 4
