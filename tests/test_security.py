"""Mutual TLS, identity, policy, audit and limits, end to end over real TLS."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from signerd.client import Client, ClientConfig
from signerd.policy import Identity
from signerd.v1 import signer_pb2 as pb
from signerd.v1 import signer_pb2_grpc as pb_grpc
from tests.conftest import (
    ADMIN,
    ADMIN_POLICY,
    HSM,
    PKI,
    RUNNER,
    Daemon,
    anonymous_client_cert,
    daemon_config,
    rpc_error,
    spawn_daemon,
    unique_gun,
    write_toml,
)

RUNNER_POLICY = (
    ADMIN_POLICY
    + """
[[rule]]
name = "runner-acme"
identities = ["spiffe://ci/*"]
operations = ["sign", "read"]
guns = ["docker.io/acme/*"]
roles = ["targets/ci-*"]
"""
)


def audit_lines(d: Daemon) -> list[dict[str, Any]]:
    """The request lines of ``d``'s audit log: not the daemon's own records
    (``audit.*``: the tree's start, rotations), which name no caller's request."""
    lines = [json.loads(line) for line in (d.workdir / "audit.log").read_text().splitlines()]
    return [line for line in lines if not str(line.get("operation", "")).startswith("audit.")]


@pytest.mark.parametrize(
    "who,reason",
    [
        ("none", "no client certificate"),
        ("foreign", "certificate from another CA"),
        ("expired", "expired certificate"),
    ],
)
def test_tls_rejects_bad_clients(daemon: Daemon, certs: PKI, who: str, reason: str) -> None:
    if who == "none":
        creds = grpc.ssl_channel_credentials(certs.ca_file.read_bytes())
    else:
        cert, key = certs.files[who]
        creds = grpc.ssl_channel_credentials(
            certs.ca_file.read_bytes(), key.read_bytes(), cert.read_bytes()
        )
    channel = grpc.secure_channel(
        f"127.0.0.1:{daemon.port}", creds, options=[("grpc.ssl_target_name_override", "localhost")]
    )
    stub = pb_grpc.SignerServiceStub(channel)
    err = rpc_error(lambda: stub.ListKeys(pb.ListKeysRequest(), timeout=10))
    channel.close()
    assert err.code() == grpc.StatusCode.UNAVAILABLE, reason  # the handshake fails
    # a rejected handshake never reaches the service, so nothing is audited for it
    assert all(
        line["identity"] != f"uri:{ADMIN}" or line["operation"] != "read"
        for line in audit_lines(daemon)
    )


def test_plaintext_client_cannot_talk_to_the_tls_port(daemon: Daemon) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{daemon.port}") as ch:
        stub = pb_grpc.SignerServiceStub(ch)
        err = rpc_error(lambda: stub.ListKeys(pb.ListKeysRequest(), timeout=10))
    assert err.code() == grpc.StatusCode.UNAVAILABLE


HIDING_POLICY = ADMIN_POLICY + f"""
[[rule]]
name = "runner-acme"
identities = ["{RUNNER}"]
operations = ["create", "read", "sign"]
guns = ["docker.io/acme/*"]

[[rule]]
name = "runner-reads-team"
identities = ["{RUNNER}"]
operations = ["read"]
guns = ["docker.io/team/*"]
"""
_MISSING = "cd" * 32


def _key_id_calls(mine: str) -> dict[str, Any]:
    """Every RPC that names a key by its ID: id -> fn(v1 channel, key_id)."""
    from signerd.notary import signer_pb2 as npb
    from signerd.notary import signer_pb2_grpc as npb_grpc

    def v1(ch: grpc.Channel) -> Any:
        return pb_grpc.SignerServiceStub(ch)

    def batch(ch: grpc.Channel, kid: str) -> Any:
        reply = v1(ch).SignBatch(pb.SignBatchRequest(requests=[
            pb.SignRequest(key_id=mine, message=b"m"), pb.SignRequest(key_id=kid, message=b"m")]),
            timeout=20)
        return reply.items[1].code, reply.items[1].error  # as (code, details)

    return {
        "GetKey": lambda ch, kid: v1(ch).GetKey(pb.GetKeyRequest(key_id=kid), timeout=20),
        "Sign": lambda ch, kid: v1(ch).Sign(pb.SignRequest(key_id=kid, message=b"m"),
                                            timeout=20),
        "SignBatch-item": batch,
        "DeleteKey": lambda ch, kid: v1(ch).DeleteKey(pb.DeleteKeyRequest(key_id=kid),
                                                      timeout=20),
        "CertifyKey-subject": lambda ch, kid: v1(ch).CertifyKey(pb.CertifyKeyRequest(
            key_id=kid, subject="CN=x", issuer_key_id=mine), timeout=20),
        "CertifyKey-issuer": lambda ch, kid: v1(ch).CertifyKey(pb.CertifyKeyRequest(
            key_id=mine, subject="CN=x", issuer_key_id=kid), timeout=20),
        "GetCertificateChain": lambda ch, kid: v1(ch).GetCertificateChain(
            pb.GetCertificateChainRequest(key_id=kid), timeout=20),
        "notary-GetKeyInfo": lambda ch, kid: npb_grpc.KeyManagementStub(ch).GetKeyInfo(
            npb.KeyID(ID=kid), timeout=20),
        "notary-DeleteKey": lambda ch, kid: npb_grpc.KeyManagementStub(ch).DeleteKey(
            npb.KeyID(ID=kid), timeout=20),
        "notary-Sign": lambda ch, kid: npb_grpc.SignerStub(ch).Sign(npb.SignatureRequest(
            keyID=npb.KeyID(ID=kid), content=b"{}"), timeout=20),
    }


def _answer(call: Any, channel: grpc.Channel, key_id: str) -> tuple[int, str]:
    """(status code, message) of a call that must be refused."""
    try:
        result = call(channel, key_id)
    except grpc.RpcError as e:
        return e.code().value[0], e.details()
    assert isinstance(result, tuple), f"expected a refusal, got {result}"
    return result


@pytest.mark.parametrize("who", ["nobody", "runner"])
def test_a_caller_that_may_not_read_a_key_cannot_tell_it_from_a_missing_one(
        daemon_factory: Any, who: str) -> None:
    """Regression (issue 11 §6): an identity no rule names got PERMISSION_DENIED,
    naming the key's GUN and role, for a key that exists and NOT_FOUND for
    one that does not. Now every RPC that takes a key ID answers both alike."""
    d = daemon_factory(policy=HIDING_POLICY)
    with d.client("admin") as admin:
        hidden = admin.create_key("docker.io/secret/app", "targets/releases", token="root",
                                  purpose="raw")
        mine = admin.create_key("docker.io/acme/app", "targets", purpose="raw")
        admin.certify_key(mine.key_id, "CN=acme ca")  # an issuer the runner may sign with
    calls = _key_id_calls(mine.key_id)
    with d.client(who) as c:
        for name, call in calls.items():
            there = _answer(call, c.channel, hidden.key_id)
            gone = _answer(call, c.channel, _MISSING)
            assert there[0] == gone[0] == grpc.StatusCode.NOT_FOUND.value[0], (name, there, gone)
            assert there[1].replace(hidden.key_id, "KEY") == gone[1].replace(_MISSING, "KEY"), (
                name, there, gone)
            assert there[1].startswith("no key with ID "), name
            assert not {"secret", "releases", "root"} & set(there[1].split()), name
    with d.client("admin") as admin:
        assert admin.get_key(hidden.key_id).key_id == hidden.key_id  # still there
    # The audit log still says which key was asked for, and that it was a denial.
    lines = [line for line in audit_lines(d)
             if line["identity"] != f"uri:{ADMIN}" and hidden.key_id in line["key_id"]]
    assert {line["operation"] for line in lines} == {"read", "sign", "delete"}
    for line in lines:
        assert (line["gun"], line["role"], line["token"]) == (
            "docker.io/secret/app", "targets/releases", "root"), line
        # A line naming two keys is a batch's (answered OK, item by item) or a
        # certification's (its issuer and subject).
        if "," not in line["key_id"]:
            assert (line["decision"], line["status"]) == ("deny", "NOT_FOUND"), line


def test_a_request_for_a_missing_key_is_audited_with_its_id_and_outcome(
        daemon_factory: Any) -> None:
    """Regression (issue 21 §7): a Sign for a key ID that does not exist was
    audited with "key_id":"" and "decision":"allow", so a probe for an ID left
    no trace of which ID it was. Every RPC that takes a key ID (SignStream's
    items too) now records the ID as requested, malformed or not, and the
    outcome: decision "none" (the policy was never asked) and the status."""
    d = daemon_factory(policy=HIDING_POLICY)
    with d.client("admin") as admin:
        mine = admin.create_key("docker.io/acme/app", "targets", purpose="raw")
        admin.certify_key(mine.key_id, "CN=acme ca")
    calls = _key_id_calls(mine.key_id)
    malformed = "not-a-key-id"
    with d.client("runner") as c:
        for call in calls.values():
            _answer(call, c.channel, _MISSING)
        _answer(calls["Sign"], c.channel, malformed)
        _answer(calls["notary-Sign"], c.channel, malformed)
        [item] = list(c.sign_stream([pb.SignRequest(key_id=_MISSING, message=b"m")], timeout=20))
        assert item.code == grpc.StatusCode.NOT_FOUND.value[0]
    with d.client("nobody") as c:
        err = rpc_error(lambda: list(c.list_keys(token="root")))  # exists; not nobody's
        assert err.code() == grpc.StatusCode.NOT_FOUND
        err = rpc_error(lambda: list(c.list_keys(token="nope")))  # does not exist
        assert err.code() == grpc.StatusCode.NOT_FOUND
    everything = audit_lines(d)
    lines = [line for line in everything if line["identity"] == f"uri:{RUNNER}"]
    missing = [line for line in lines if _MISSING in line["key_id"].split(",")]
    # one line per call (SignBatch: its line names both keys), plus the stream's item
    assert len(missing) == len(calls) + 1, missing
    for line in missing:
        if "," in line["key_id"]:  # a batch (answered OK, item by item) or a certification
            assert line["key_id"] in (f"{mine.key_id},{_MISSING}", f"{_MISSING},{mine.key_id}")
            continue
        assert (line["decision"], line["status"]) == ("none", "NOT_FOUND"), line
        assert (line["gun"], line["role"], line["token"]) == ("", "", ""), line
    bad = {line["operation"]: line for line in lines if line["key_id"] == malformed}
    assert len([line for line in lines if line["key_id"] == malformed]) == 2
    assert (bad["sign"]["decision"], {line["status"] for line in lines
                                      if line["key_id"] == malformed}) == (
        "none", {"INVALID_ARGUMENT", "NOT_FOUND"})  # v1 says malformed; notary, not found
    listings = [line for line in everything if line["operation"] == "read" and line["token"]
                in ("root", "nope") and line["status"] == "NOT_FOUND"]
    assert sorted((line["token"], line["decision"]) for line in listings) == [
        ("nope", "none"), ("root", "deny")]


def test_listings_give_nothing_away(daemon_factory: Any) -> None:
    """Regression (issue 11 §6): ListKeys paged over every key and filtered
    afterwards, so a stranger got empty pages whose page tokens were the IDs
    of keys it may not read; and an unknown token name was answered with the
    names of every configured token."""
    d = daemon_factory(policy=HIDING_POLICY)
    with d.client("admin") as admin:
        hidden = [admin.create_key("docker.io/secret/app", "targets",
                                   purpose="raw") for _ in range(3)]
        team = admin.create_key("docker.io/team/app", "targets", purpose="raw")
    with d.client("nobody") as c:
        page = c.stub.ListKeys(pb.ListKeysRequest(page_size=1), timeout=20)
        assert (list(page.keys), page.next_page_token) == ([], "")
        err = rpc_error(lambda: list(c.list_keys(token="nope")))
        assert (err.code(), err.details()) == (grpc.StatusCode.NOT_FOUND,
                                               "no token named 'nope'; you may use none")
        err = rpc_error(lambda: c.create_key("docker.io/secret/app", "targets", token="nope",
                                             purpose="raw"))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED  # before the token is looked up
    with d.client("runner") as runner:
        listed = list(runner.list_keys())  # page by page (the tokens hold other tests' keys)
        assert team.key_id in {k.key_id for k in listed}
        assert all(k.gun.startswith(("docker.io/acme/", "docker.io/team/")) for k in listed)
        page = runner.stub.ListKeys(pb.ListKeysRequest(page_size=1), timeout=20)
        assert len(page.keys) == 1 and page.next_page_token in ("", page.keys[0].key_id)
        err = rpc_error(lambda: list(runner.list_keys(token="nope")))
        assert err.details() == "no token named 'nope'; yours: root, online"
    shown = {k.key_id for k in hidden}
    assert not shown & {line["key_id"] for line in audit_lines(d)
                        if line["identity"] != f"uri:{ADMIN}"}


ONLINE_ONLY_POLICY = ADMIN_POLICY + """
[[rule]]
name = "builder-online"
identities = ["builder.ci.example"]
operations = ["create", "read"]
guns = ["docker.io/acme/*"]
tokens = ["online"]
"""


def _token_answer(call: Any, *args: Any) -> tuple[Any, str]:
    err = rpc_error(lambda: call(*args))
    return err.code(), err.details()


def test_a_token_the_caller_may_not_use_is_a_token_that_does_not_exist(
        daemon_factory: Any) -> None:
    """Regression (new-user trial): ListKeys of an existing token the caller
    may not use answered an empty page, and of an unknown one NOT_FOUND, so
    a caller could probe which token names exist. Now both are NOT_FOUND,
    word for word (but the name), for every RPC that takes a token name."""
    d = daemon_factory(policy=ONLINE_ONLY_POLICY)
    for who, yours in (("nobody", "you may use none"), ("dns-only", "yours: online")):
        with d.client(who) as c:
            for name, call in (
                ("ListKeys", lambda t: list(c.list_keys(token=t))),
                ("ListKeys-gun", lambda t: list(c.list_keys(gun="docker.io/acme/app", token=t))),
                ("CreateKey", lambda t: c.create_key("docker.io/acme/app", "targets", token=t,
                                                     purpose="raw")),
            ):
                there, gone = _token_answer(call, "root"), _token_answer(call, "nope")
                assert there[0] == gone[0], (who, name, there, gone)
                assert there[1].replace("'root'", "X") == gone[1].replace("'nope'", "X"), (
                    who, name, there, gone)
                if name.startswith("ListKeys"):
                    assert there == (grpc.StatusCode.NOT_FOUND, f"no token named 'root'; {yours}")
    with d.client("dns-only") as c:  # its own token still answers
        c.create_key("docker.io/acme/app", "targets", token="online", purpose="raw")
        assert list(c.list_keys(token="online"))


def test_a_refused_create_names_the_role_token_only_to_those_who_may_use_it(
        daemon_factory: Any) -> None:
    """Regression (new-user trial): CreateKey without a token name was
    refused with the policy's reason, which names the token signerd chose
    for the role ('root', 'online') even to a caller that may use no token."""
    from signerd.notary import signer_pb2 as npb
    from signerd.notary import signer_pb2_grpc as npb_grpc
    d = daemon_factory(policy=ONLINE_ONLY_POLICY)
    with d.client("nobody") as c:
        for role in ("root", "targets"):
            v1 = rpc_error(lambda role=role: c.create_key("docker.io/acme/app", role,
                                                          purpose="raw"))
            notary = rpc_error(lambda role=role: npb_grpc.KeyManagementStub(c.channel).CreateKey(
                npb.CreateKeyRequest(gun="docker.io/acme/app", role=role, algorithm="ecdsa"),
                timeout=20))
            for err in (v1, notary):
                assert err.code() == grpc.StatusCode.PERMISSION_DENIED
                assert "token 'root'" not in err.details()
                assert "token 'online'" not in err.details()
                assert f"the token for {role} keys" in err.details()
    with d.client("dns-only") as c:  # may use 'online': it is told which token was meant
        err = rpc_error(lambda: c.create_key("docker.io/other/app", "targets", purpose="raw"))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "token 'online'" in err.details()


def test_tokens_list_counts_only_the_keys_the_caller_may_read(daemon_factory: Any) -> None:
    """Regression (new-user trial): ListTokens' key_count counted every key on
    the token, including those the caller may not read."""
    d = daemon_factory(policy=ONLINE_ONLY_POLICY)
    with d.client("admin") as admin:
        admin.create_key("docker.io/secret/app", "targets", token="online", purpose="raw")
        admin.create_key("docker.io/acme/app", "targets", token="online", purpose="raw")
        everything = len(list(admin.list_keys(token="online")))
        [whole] = [t for t in admin.list_tokens() if t.name == "online"]
    with d.client("dns-only") as c:
        readable = len(list(c.list_keys(token="online")))
        assert [t.name for t in c.list_tokens()] == ["online"]
        [seen] = c.list_tokens()
    assert whole.key_count == everything > readable == seen.key_count > 0
    with d.client("nobody") as c:  # may read keys on no token: refused, as the proto says
        assert _token_answer(c.list_tokens) == (
            grpc.StatusCode.PERMISSION_DENIED,
            "identity 'uri:spiffe://test/nobody' may read keys on no token")


_HUGE = "a" * (100 * 1024)  # 100 KB


def _huge_value_calls() -> list[Any]:
    """(id, who, value, fn(channel, value), status): a refused call that
    quotes ``value``, for each kind of value a caller sends."""
    from signerd.notary import signer_pb2 as npb
    from signerd.notary import signer_pb2_grpc as npb_grpc

    def v1(ch: grpc.Channel) -> Any:
        return pb_grpc.SignerServiceStub(ch)

    def create(field: str) -> Any:
        def call(ch: grpc.Channel, value: str) -> Any:
            request = {"gun": "docker.io/acme/app", "role": "targets", field: value}
            return v1(ch).CreateKey(pb.CreateKeyRequest(**request), timeout=20)
        return call

    def notary_create(field: str) -> Any:
        def call(ch: grpc.Channel, value: str) -> Any:
            request = {"gun": "docker.io/acme/app", "role": "timestamp", "algorithm": "ecdsa",
                       field: value}
            return npb_grpc.KeyManagementStub(ch).CreateKey(npb.CreateKeyRequest(**request),
                                                            timeout=20)
        return call

    def certify(ch: grpc.Channel, value: str) -> Any:
        mine = v1(ch).CreateKey(pb.CreateKeyRequest(gun="docker.io/acme/app", role="targets"),
                                timeout=20).key_id
        return v1(ch).CertifyKey(pb.CertifyKeyRequest(key_id=mine, subject=value), timeout=20)

    invalid, not_found = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
    return [
        ("key-id", "admin", _HUGE, lambda ch, v: v1(ch).GetKey(
            pb.GetKeyRequest(key_id=v), timeout=20), invalid),
        ("page-token", "admin", _HUGE, lambda ch, v: v1(ch).ListKeys(
            pb.ListKeysRequest(page_token=v), timeout=20), invalid),
        ("gun", "admin", _HUGE, create("gun"), invalid),
        ("role", "admin", _HUGE, create("role"), invalid),
        ("delegation", "admin", "targets/" + _HUGE, create("role"), invalid),
        ("algorithm", "admin", _HUGE, create("algorithm"), invalid),
        ("token", "admin", _HUGE, create("token"), not_found),
        ("token-denied", "nobody", _HUGE, create("token"), grpc.StatusCode.PERMISSION_DENIED),
        ("list-token", "admin", _HUGE, lambda ch, v: v1(ch).ListKeys(
            pb.ListKeysRequest(token=v), timeout=20), not_found),
        ("subject", "admin", "CN=" + _HUGE, certify, invalid),
        ("notary-key-id", "admin", _HUGE, lambda ch, v: npb_grpc.KeyManagementStub(ch).GetKeyInfo(
            npb.KeyID(ID=v), timeout=20), not_found),
        ("notary-algorithm", "admin", _HUGE, notary_create("algorithm"), invalid),
        ("notary-gun", "admin", _HUGE, notary_create("gun"), invalid),
        ("notary-role", "admin", "targets/" + _HUGE, notary_create("role"), invalid),
    ]


@pytest.mark.parametrize(("who", "value", "call", "status"),
                         [pytest.param(*c[1:], id=c[0]) for c in _huge_value_calls()])
def test_a_huge_value_is_quoted_in_short(daemon: Daemon, who: str, value: str, call: Any,
                                         status: grpc.StatusCode) -> None:
    """Regression (issue 11 §6): an unknown algorithm or token name came back
    whole in the error message, however large."""
    with daemon.client(who) as c:
        err = rpc_error(lambda: call(c.channel, value))
    assert err.code() == status, err.details()[:300]
    assert len(err.details()) < 400, err.details()[:300]
    assert f"{value[:64]!r}…({len(value)} bytes)" in err.details(), err.details()


def test_a_caller_that_may_read_a_key_is_told_what_it_may_not_do(daemon_factory: Any) -> None:
    d = daemon_factory(policy=HIDING_POLICY)
    with d.client("admin") as admin:
        team = admin.create_key("docker.io/team/app", "targets", purpose="raw")
    with d.client("runner") as runner:
        assert runner.get_key(team.key_id).gun == "docker.io/team/app"
        err = rpc_error(lambda: runner.sign(team.key_id, message=b"payload"))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert err.details().startswith(
        f"identity 'uri:{RUNNER}' may not sign targets keys of docker.io/team/app over tcp: ")
    denial = audit_lines(d)[-1]
    assert (denial["identity"], denial["operation"], denial["key_id"], denial["gun"]) == (
        f"uri:{RUNNER}", "sign", team.key_id, "docker.io/team/app")
    assert (denial["decision"], denial["status"]) == ("deny", "PERMISSION_DENIED")
    import hashlib

    assert denial["payload_sha256"] == hashlib.sha256(b"payload").hexdigest()


@pytest.mark.parametrize(
    "who,identity",
    [
        ("runner", f"uri:{RUNNER}"),
        ("dns-only", "dns:builder.ci.example"),
        ("cn-only", "cn:plain-cn"),
    ],
)
def test_identity_comes_from_uri_then_dns_then_cn(daemon: Daemon, who: str, identity: str) -> None:
    with daemon.client(who) as c:
        rpc_error(lambda: c.get_key("ab" * 32))
    assert audit_lines(daemon)[-1]["identity"] == identity


def test_runner_allowed_for_gun_a_cannot_sign_gun_b(daemon_factory: Any) -> None:
    d = daemon_factory(policy=RUNNER_POLICY)
    with d.client("admin") as admin:
        a = admin.create_key("docker.io/acme/app", "targets/ci-1", purpose="raw")
        b = admin.create_key("docker.io/other/app", "targets/ci-1", purpose="raw")
        a_targets = admin.create_key("docker.io/acme/app", "targets", purpose="raw")
    with d.client("runner") as runner:
        assert runner.sign(a.key_id, message=b"m").signature
        for key in (b, a_targets):  # it may not even read them: as if they did not exist
            err = rpc_error(lambda k=key: runner.sign(k.key_id, message=b"m"))
            assert err.code() == grpc.StatusCode.NOT_FOUND
        err = rpc_error(lambda: runner.create_key("docker.io/acme/app", "targets/ci-2",
                                                  purpose="raw"))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        batch = runner.stub.SignBatch(
            pb.SignBatchRequest(
                requests=[pb.SignRequest(key_id=k.key_id, message=b"m") for k in (a, b, a)]
            )
        )
        assert [i.code for i in batch.items] == [0, grpc.StatusCode.NOT_FOUND.value[0], 0]
        # listing shows only what the runner may read
        assert {k.key_id for k in runner.list_keys()} == {a.key_id}


def test_root_key_refused_over_tcp_but_allowed_over_unix(
    daemon_factory: Any, tmp_path: Path
) -> None:
    policy = f"""
[[rule]]
name = "admin-all-but-root"
identities = ["{ADMIN}"]
operations = ["*"]

[[rule]]
name = "local-root-ceremony"
identities = ["uid:{os.getuid()}"]
operations = ["*"]
transports = ["unix"]
"""
    d = daemon_factory(policy=policy, server={"unix_socket": str(tmp_path / "s.sock")})
    with d.client("admin") as tcp:
        err = rpc_error(lambda: tcp.create_key("docker.io/acme/app", "root", purpose="raw"))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        targets = tcp.create_key("docker.io/acme/app", "targets",
                                 purpose="raw")  # a "*" role rule still works
    with d.unix_client() as local:
        root = local.create_key("docker.io/acme/app", "root", purpose="raw")
        assert root.token == "root"
        assert local.sign(root.key_id, message=b"root.json").signature
        assert local.get_key(targets.key_id).key_id == targets.key_id
    with d.client("admin") as tcp:  # not even readable over tcp: as if it did not exist
        err = rpc_error(lambda: tcp.sign(root.key_id, message=b"root.json"))
        assert err.code() == grpc.StatusCode.NOT_FOUND
        assert root.key_id not in {k.key_id for k in tcp.list_keys()}
    unix_lines = [line for line in audit_lines(d) if line["transport"] == "unix"]
    assert unix_lines and all(line["identity"] == f"uid:{os.getuid()}" for line in unix_lines)


def test_stray_connection_to_the_relay_listener_is_unauthenticated(
    daemon_factory: Any, tmp_path: Path
) -> None:
    """Only root can reach the relay's private listener (test_listeners checks
    that others cannot); a connection that did not come through the relay
    still has no identity."""
    d = daemon_factory(server={"unix_socket": str(tmp_path / "s.sock")})
    assert d.servers.relay is not None
    with Client(ClientConfig(f"unix:{tmp_path / 's.sock'}")) as ok:
        assert list(ok.list_keys()) is not None
    with grpc.insecure_channel(d.servers.relay.internal) as ch:
        stub = pb_grpc.SignerServiceStub(ch)
        err = rpc_error(lambda: stub.ListKeys(pb.ListKeysRequest(), timeout=10))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED


def test_dev_plaintext_on_loopback_only(daemon_factory: Any) -> None:
    d = daemon_factory(
        policy='[[rule]]\nidentities = ["dev:loopback"]\noperations = ["*"]\n',
        server={"dev_plaintext": True},
    )
    with Client(ClientConfig(f"127.0.0.1:{d.port}", plaintext=True)) as c:
        key = c.create_key(unique_gun(), "targets", purpose="raw")
        assert c.sign(key.key_id, message=b"m").signature
    assert audit_lines(d)[-1]["identity"] == "dev:loopback"
    # signerctl with plaintext = true in its client config (it was checked, then dropped)
    config = d.workdir / "plaintext-client.toml"
    config.write_text(f'server = "127.0.0.1:{d.port}"\nplaintext = true\n')
    out = subprocess.run([sys.executable, "-m", "signerd.cli", "--config", str(config),
                          "--json", "tokens", "list"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert {t["name"] for t in json.loads(out.stdout)} >= {"online"}


def test_audit_log_replaced_by_a_symlink_is_never_followed(daemon: Daemon,
                                                           tmp_path: Path) -> None:
    """Regression (issue 22 §5): with audit.log replaced by a symbolic link
    while the daemon ran, the next line was appended to the link's target
    (as root: any file on the host). The link is refused; requests fail
    closed until a real file is back. (A full disk: tests/test_readiness.py.)"""
    victim = tmp_path / "victim"
    victim.write_bytes(b"not the audit log's\n")
    with daemon.client() as c:
        key = c.create_key(unique_gun(), "targets", purpose="raw")
        log = daemon.workdir / "audit.log"
        log.rename(daemon.workdir / "audit.log.moved")
        log.symlink_to(victim)
        try:
            err = rpc_error(lambda: c.sign(key.key_id, message=b"m"))
            assert err.code() == grpc.StatusCode.UNAVAILABLE
            assert "audit log cannot be written" in err.details()
            assert "symbolic link" in err.details()
            err = rpc_error(lambda: c.get_key(key.key_id))
            assert err.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            log.unlink()
        assert victim.read_bytes() == b"not the audit log's\n"
        assert c.sign(key.key_id, message=b"m").signature  # a file again: served again
    assert not log.is_symlink()


def test_a_request_past_the_identity_limit_waits_its_turn(daemon_factory: Any) -> None:
    """With max_inflight_per_identity = 1 and a long SignBatch in flight, the
    identity's next Sign waits (it was refused RESOURCE_EXHAUSTED at once
    before): it is signed once the batch is done, or, if its deadline comes
    first, ends DEADLINE_EXCEEDED, audited as such."""
    d = daemon_factory(server={"max_inflight_per_identity": 1})
    with d.client("admin") as c:
        key = c.create_key(unique_gun(), "targets", "rsa-4096", purpose="raw")
        batch = pb.SignBatchRequest(
            requests=[pb.SignRequest(key_id=key.key_id, message=b"%d" % i) for i in range(150)]
        )
        result: dict[str, Any] = {}

        def long_batch() -> None:
            result["batch"] = c.stub.SignBatch(batch, timeout=120)

        t = threading.Thread(target=long_batch)
        t.start()
        admission = d.servers.gate.admission
        deadline = time.monotonic() + 30
        while admission.running(Identity("uri", ADMIN)) == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        err = rpc_error(lambda: c.stub.Sign(pb.SignRequest(key_id=key.key_id, message=b"m"),
                                            timeout=0.3))
        assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert t.is_alive(), "the batch ended before the deadline: make it longer"
        waited = c.sign(key.key_id, message=b"waits")  # waits for the batch, then signs
        assert not t.is_alive() and waited.signature
        t.join()
    assert all(item.code == 0 for item in result["batch"].items)
    statuses = [line["status"] for line in audit_lines(d) if line["operation"] == "sign"]
    assert statuses.count("DEADLINE_EXCEEDED") == 1 and statuses[-1] == "OK"
    assert "RESOURCE_EXHAUSTED" not in statuses


def test_policy_reload_on_sighup_good_and_broken(hsm: HSM, certs: PKI, tmp_path: Path) -> None:
    cfg = write_toml(tmp_path / "signerd.toml", daemon_config(hsm, certs, tmp_path))
    proc = spawn_daemon(cfg, tmp_path)
    cert, key = certs.files["admin"]
    rcert, rkey = certs.files["runner"]
    port = proc.info["tcp"]
    admin = Client(ClientConfig(f"127.0.0.1:{port}", certs.ca_file, cert, key, "localhost", 20))
    runner = Client(ClientConfig(f"127.0.0.1:{port}", certs.ca_file, rcert, rkey, "localhost", 20))
    stop = threading.Event()
    errors: list[BaseException] = []
    signed = [0]
    try:
        k = admin.create_key("docker.io/acme/app", "targets/ci-1", purpose="raw")

        def hammer() -> None:  # in-flight traffic across both reloads
            while not stop.is_set():
                try:
                    admin.sign(k.key_id, message=b"x")
                    signed[0] += 1
                except grpc.RpcError as e:
                    errors.append(e)

        t = threading.Thread(target=hammer)
        t.start()
        assert (  # no rule names the runner yet: the key is not there for it
            rpc_error(lambda: runner.sign(k.key_id, message=b"m")).code()
            == grpc.StatusCode.NOT_FOUND
        )
        (tmp_path / "policy.toml").write_text(RUNNER_POLICY)
        proc.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while True:
            try:
                assert runner.sign(k.key_id, message=b"m").signature
                break
            except grpc.RpcError:
                assert time.monotonic() < deadline, "the new policy never took effect"
                time.sleep(0.05)
        (tmp_path / "policy.toml").write_text(
            "[[rule]]\nidentities = ['x']\noperations = ['fly']\n"
        )
        proc.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "policy reload failed" not in proc.log():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert runner.sign(k.key_id, message=b"m").signature  # the old (good) policy is kept
        stop.set()
        t.join()
    finally:
        stop.set()
        admin.close()
        runner.close()
        assert proc.stop() == 0
    assert errors == [] and signed[0] > 0
    failure = [json.loads(x) for x in proc.log().splitlines() if "policy reload failed" in x][0]
    assert "fly" in json.dumps(failure)


def test_world_readable_pin_file_is_refused(hsm: HSM, certs: PKI, tmp_path: Path) -> None:
    """Regression (issue 22 §5): a PIN file readable by others got only a
    warning. serve refuses it (exit 2), in one line naming file and mode."""
    data = daemon_config(hsm, certs, tmp_path, tokens=("online",))
    loose = tmp_path / "loose.pin"
    loose.write_bytes(hsm.pins["online"].read_bytes())
    loose.chmod(0o644)
    data["tokens"][0]["pin_file"] = str(loose)
    run = subprocess.run([sys.executable, "-m", "signerd.daemon", "serve", "--config",
                          str(write_toml(tmp_path / "signerd.toml", data))],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.splitlines()[-1] == (
        f"signerd: PIN file of token online {loose}: is accessible by group or others "
        "(mode 0644); chmod 600 it")
    assert loose.read_text() not in run.stdout + run.stderr


def test_audit_verify_cli_names_the_tampered_line(daemon: Daemon, tmp_path: Path) -> None:
    import subprocess
    import sys

    with daemon.client() as c:
        key = c.create_key(unique_gun(), "targets", purpose="raw")
        for i in range(5):
            c.sign(key.key_id, message=b"%d" % i)
    daemon.stop()  # closes the log (final head)
    log = daemon.workdir / "audit.log"
    lines = log.read_text().splitlines(keepends=True)
    cases = {
        "intact": (lines, 0, None),
        "edited": (lines[:2] + [lines[2].replace('"sign"', '"read"')] + lines[3:], 1, 3),
        "deleted": (lines[:3] + lines[4:], 1, 4),
        "reordered": (lines[:2] + [lines[3], lines[2]] + lines[4:], 1, 3),
        "truncated": (lines[:-2], 1, len(lines) - 1),
    }
    for name, (content, rc, first_bad) in cases.items():
        copy = tmp_path / f"{name}.log"
        copy.write_text("".join(content))
        head = Path(str(log) + ".head")
        Path(str(copy) + ".head").write_bytes(head.read_bytes())
        r = subprocess.run(
            [sys.executable, "-m", "signerd.cli", "--json", "audit", "verify", str(copy)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == rc, (name, r.stdout, r.stderr)
        assert json.loads(r.stdout)["first_bad_line"] == first_bad, name


def test_connections_that_never_speak_are_closed(daemon_factory: Any) -> None:
    """Regression: TCP connections that never sent a ClientHello stayed open
    for more than 90 s (gRPC's handshake timeout is 120 s by default)."""
    import socket
    import time

    d = daemon_factory(server={"handshake_timeout": 1.0, "max_connections": 4})
    silent = socket.create_connection(("127.0.0.1", d.port))
    silent.settimeout(15)
    start = time.monotonic()
    assert silent.recv(1) == b""  # closed by the daemon
    assert time.monotonic() - start < 10
    silent.close()
    # past max_connections, new connections are closed at once; the held ones stay
    held = [socket.create_connection(("127.0.0.1", d.port)) for _ in range(4)]
    extra = socket.create_connection(("127.0.0.1", d.port))
    extra.settimeout(5)
    assert extra.recv(1) == b""
    for s in (*held, extra):
        s.close()
    time.sleep(0.5)  # the daemon notices the closed ones
    with d.client() as c:  # and serves again
        assert c.create_key(unique_gun(), "targets", purpose="raw").key_id


def test_a_certificate_with_no_identity_is_refused_and_audited(
        daemon: Daemon, certs: Any, tmp_path: Path) -> None:
    """Regression: a client certificate from the right CA with no URI SAN, DNS
    SAN or CN was refused UNAUTHENTICATED but never audited."""
    cert, key = anonymous_client_cert(certs, tmp_path)
    with Client(ClientConfig(f"127.0.0.1:{daemon.port}", certs.ca_file, cert, key,
                             "localhost", 20)) as c:
        err = rpc_error(lambda: c.get_key("ab" * 32))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    [line] = [entry for entry in audit_lines(daemon) if entry["status"] == "UNAUTHENTICATED"]
    assert line["operation"] == "read" and line["decision"] == "deny"
    assert line["peer"].startswith("ipv4:127.0.0.1:")


BAD_MESSAGE = bytes.fromhex("0a02fffe")  # field 1, length 2, not UTF-8


@pytest.mark.parametrize("method", [
    "/signerd.v1.SignerService/Sign",
    "/signerd.v1.SignerService/GetKey",
    "/proto.Signer/Sign",
    "/proto.KeyManagement/GetKeyInfo",
    "/grpc.health.v1.Health/Check",
])
def test_undecodable_requests_are_invalid_argument_and_audited(
        daemon: Daemon, method: str) -> None:
    with daemon.client() as c:
        call = c.channel.unary_unary(method)
        err = rpc_error(lambda: call(BAD_MESSAGE, timeout=10))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith("the request is not a valid ")
    line = audit_lines(daemon)[-1]
    assert (line["status"], line["operation"]) == ("INVALID_ARGUMENT", method.rpartition("/")[2])


def test_undecodable_requests_cost_nothing(hsm: Any, certs: PKI, tmp_path: Path) -> None:
    """Regression: grpcio's own deserializer answered INTERNAL and leaked an
    HTTP/2 stream slot and ~19 KB per request: after 1,024 the connection
    refused every call, and 5,000 took RSS from 243 to 338 MB."""
    from bench import _proc
    from tests.conftest import daemon_config, spawn_daemon, write_toml

    proc = spawn_daemon(write_toml(tmp_path / "signerd.toml",
                                   daemon_config(hsm, certs, tmp_path)), tmp_path)
    cert, key = certs.files["admin"]
    try:
        with Client(ClientConfig(f"127.0.0.1:{proc.info['tcp']}", certs.ca_file, cert, key,
                                 "localhost", 20)) as c:
            made = c.create_key(unique_gun(), "targets", purpose="raw")
            call = c.channel.unary_unary("/signerd.v1.SignerService/Sign")
            for _ in range(100):  # warm up allocator and audit file
                rpc_error(lambda: call(BAD_MESSAGE, timeout=10))
            before = _proc.memory_kib(proc.proc.pid)["VmRSS"]
            for _ in range(5000):
                with pytest.raises(grpc.RpcError) as info:
                    call(BAD_MESSAGE, timeout=10)
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            after = _proc.memory_kib(proc.proc.pid)["VmRSS"]
            assert c.sign(made.key_id, message=b"m").signature  # the same connection
    finally:
        proc.stop()
    assert after - before < 5 * 1024, f"RSS grew {after - before} KiB"


# One identity's callers, in a process of their own (so that their Python
# threads do not share a GIL with the caller being measured). Each keeps one
# Sign in flight; should one fail, it tries again 0.1 s later, as gRPC retry
# policies back off. Prints "started" once every caller runs; stops when
# stdin closes, then prints the count of each status code as JSON.
_FLOOD = """
import json, sys, threading, time
from pathlib import Path
import grpc
from signerd.client import Client, ClientConfig
port, ca, cert, key, key_id, callers = sys.argv[1:]
cfg = ClientConfig("127.0.0.1:" + port, Path(ca), Path(cert), Path(key), "localhost", 60)
counts, lock, stop = {}, threading.Lock(), threading.Event()

def caller() -> None:
    with Client(cfg) as c:
        while not stop.is_set():
            try:
                c.sign(key_id, message=b"flood")
                code = "OK"
            except grpc.RpcError as e:
                code = e.code().name
            with lock:
                counts[code] = counts.get(code, 0) + 1
            if code != "OK":
                time.sleep(0.1)

threads = [threading.Thread(target=caller) for _ in range(int(callers))]
for t in threads:
    t.start()
print("started", flush=True)
sys.stdin.read()
stop.set()
for t in threads:
    t.join()
print(json.dumps(counts), flush=True)
"""


def _median_seconds(fn: Any, n: int = 21) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[n // 2]


def test_one_identity_flooding_leaves_threads_for_the_others(daemon_factory: Any) -> None:
    """Regression (issue 11 §4): with threads = 8 and max_inflight_per_identity
    = 256, one identity's slow calls held every handler thread and another
    identity's calls queued behind them. Now an identity keeping 32 slow
    calls in flight holds 7 of the 8 slots (threads less the reserve), the
    other 25 wait their turn (none refused: "Newcomer round 3" §2), and
    another identity signs about as fast as on an idle daemon."""
    import select
    import subprocess
    import sys
    from contextlib import ExitStack

    policy = ADMIN_POLICY + f"""
[[rule]]
name = "runner"
identities = ["{RUNNER}"]
operations = ["sign", "read"]
guns = ["docker.io/victim/*"]
"""
    d = daemon_factory(policy=policy, server={"threads": 8})
    assert d.config.inflight_limit == 7
    with d.client("admin") as admin:
        slow = admin.create_key(unique_gun(), "targets", purpose="raw")
        mine = admin.create_key("docker.io/victim/app", "targets", token="root", purpose="raw")
    online = d.servers.service.tokens["online"]
    cert, key = d.certs.files["admin"]
    with d.client("runner") as runner, ExitStack() as busy:
        def sign() -> None:
            try:
                runner.stub.Sign(pb.SignRequest(key_id=mine.key_id, message=b"m"), timeout=5)
            except grpc.RpcError as e:
                pytest.fail(f"the other identity's call failed: {e.code()} {e.details()}")

        sign()
        idle = _median_seconds(sign)
        # Every session of the flooded key's token is taken, as by a slow
        # device: each of the flood's signatures then holds a handler thread
        # (waiting for a session) and no CPU.
        for _ in range(online.config.sessions):
            busy.enter_context(online.session())
        flood = subprocess.Popen(
            [sys.executable, "-c", _FLOOD, str(d.port), str(d.certs.ca_file), str(cert),
             str(key), slow.key_id, "32"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert flood.stdout is not None
            ready, _, _ = select.select([flood.stdout], [], [], 30)
            assert ready and flood.stdout.readline() == "started\n"
            admission, admin_id = d.servers.gate.admission, Identity("uri", ADMIN)
            deadline = time.monotonic() + 30
            while admission.running(admin_id) != 7 or admission.waiting() != 25:
                assert time.monotonic() < deadline, "the flood never filled its share"
                time.sleep(0.01)
            loaded = _median_seconds(sign)
        finally:
            busy.close()  # the flood's calls get their sessions
            out, _ = flood.communicate("", timeout=120)
    counts = json.loads(out)
    assert counts.get("OK", 0) >= 32 and set(counts) == {"OK"}, counts
    assert loaded < 10 * idle, f"idle {idle * 1000:.1f} ms, during the flood {loaded * 1000:.1f} ms"


def _files_gone(d: Daemon, hsm: HSM) -> Any:
    """SoftHSM's token files vanish (a lost volume): its calls fail."""
    import shutil

    dirs = sorted((hsm.dir / "tokens").iterdir())
    for p in dirs:
        shutil.move(p, f"{p}.away")

    def restore() -> None:
        for p in dirs:
            shutil.move(f"{p}.away", p)
    return restore


def _module_finalised(d: Daemon, hsm: HSM) -> Any:
    """The module is finalised under the daemon: python-pkcs11 then raises
    its base error with its own sentence ("... Should never see this.")."""
    module = d.servers.service.tokens["online"].module
    module.finalize()
    return module.initialize


@pytest.mark.parametrize("fault", [_files_gone, _module_finalised],
                         ids=["token-files-gone", "module-finalised"])
def test_token_failures_reach_clients_in_signerds_words(
        daemon: Daemon, hsm: HSM, fault: Any, caplog: pytest.LogCaptureFixture) -> None:
    """Regression (issue 11 §6): a token's failure reached clients in the
    PKCS#11 library's words: python-pkcs11's class names ("token online is
    unavailable (GeneralError)", "(PKCS11Error)") or its sentences
    ("... Should never see this."). Clients now get signerd's sentence and
    the CK_RV's name; the library's words are logged."""
    import logging

    import pkcs11.exceptions

    library_words = {name for name, kind in vars(pkcs11.exceptions).items()
                     if isinstance(kind, type) and issubclass(kind, pkcs11.exceptions.PKCS11Error)}
    library_words.add("Should never see this")
    caplog.set_level(logging.INFO, logger="signerd.token")
    with daemon.client() as c:
        key = c.create_key(unique_gun(), "targets", purpose="raw")
        restore = fault(daemon, hsm)
        try:
            said = [rpc_error(call).details() for call in (
                lambda: c.sign(key.key_id, message=b"m"),
                lambda: c.create_key(unique_gun(), "targets", purpose="raw"),
                lambda: c.delete_key(key.key_id),
                lambda: c.certify_key(key.key_id, "CN=x"),
            )]
            said += [t.error for t in c.list_tokens() if t.name == "online"]
        finally:
            restore()
        for message in said:
            assert message.startswith("token online") or message.startswith("CKR_"), said
            assert "CKR_" in message, said
            assert not [w for w in library_words if w in message], said
        logged = " ".join(str(getattr(r, "fields", {}).get("detail", "")) for r in caplog.records)
        assert [w for w in library_words if w in logged], logged  # the detail is kept
        deadline = time.monotonic() + 20
        while not daemon.servers.service.check():  # as the health probe does
            assert time.monotonic() < deadline, "the token never came back"
            time.sleep(0.2)
        assert c.sign(key.key_id, message=b"m").signature
