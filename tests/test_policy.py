"""Tests for signerd.policy: decisions, root over TCP, malformed files, reloads."""

from __future__ import annotations

import logging
import re
import textwrap
from pathlib import Path

import pytest

from signerd.errors import ConfigError
from signerd.policy import Identity, Policy, PolicyStore, Request

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "policy.toml"

POLICY = """
[[rule]]
name = "ci"
identities = ["spiffe://ci/*", "runner-1.ci.example"]
operations = ["sign", "read"]
guns = ["docker.io/acme/*"]
roles = ["targets", "targets/ci-*"]
tokens = ["online"]

[[rule]]
name = "admins-everything"
identities = ["spiffe://corp/admin"]
operations = ["*"]

[[rule]]
name = "root-ceremony"
identities = ["ceremony.sec.example"]
operations = ["sign"]
roles = ["root"]
transports = ["tcp"]

[[rule]]
name = "local-ops"
identities = ["uid:1000"]
operations = ["read", "sign"]
transports = ["unix"]

[[rule]]
identities = ["CN=builder"]
operations = ["create"]
guns = ["docker.io/acme/app"]
roles = ["r*"]
"""


def write(tmp_path: Path, text: str, name: str = "policy.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> Policy:
    return Policy.load(write(tmp_path_factory.mktemp("p"), POLICY))


# "token" is a PKCS#11 token's name, not a secret.
def req(identity: str, operation: str = "sign", gun: str = "docker.io/acme/app",
        role: str = "targets", token: str = "online",  # noqa: S107
        transport: str = "tcp") -> Request:
    """A Request from ``identity`` written kind:name ("" for an empty CN)."""
    typed = Identity.parse(identity) if identity else Identity("cn", "")
    return Request(identity=typed, transport=transport, operation=operation, gun=gun,
                   role=role, token=token)


DECISIONS = [
    # (request, allowed, granting rule)
    pytest.param(req("uri:spiffe://ci/runner-1"), True, "ci", id="glob-identity-allowed"),
    pytest.param(req("dns:runner-1.ci.example"), True, "ci", id="exact-identity-allowed"),
    pytest.param(req("dns:runner-2.ci.example"), False,
                 None, id="exact-identity-other-name-denied"),
    pytest.param(req("uri:spiffe://cd/runner-1"), False, None, id="unknown-identity-denied"),
    pytest.param(req("uri:SPIFFE://ci/runner-1"), False,
                 None, id="identity-match-is-case-sensitive"),
    pytest.param(req("uri:spiffe://ci/runner-1", "delete"), False, None,
                 id="operation-not-granted-denied"),
    pytest.param(req("uri:spiffe://ci/runner-1", "read"), True,
                 "ci", id="second-operation-allowed"),
    pytest.param(req("uri:spiffe://ci/runner-1", gun="docker.io/acme/web/api"), True, "ci",
                 id="gun-glob-star-crosses-slash"),
    pytest.param(req("uri:spiffe://ci/runner-1", gun="docker.io/other/app"), False, None,
                 id="gun-b-denied"),
    pytest.param(req("uri:spiffe://ci/runner-1", role="targets/ci-linux"), True, "ci",
                 id="role-glob-allowed"),
    pytest.param(req("uri:spiffe://ci/runner-1", role="snapshot"), False, None,
                 id="role-not-granted-denied"),
    pytest.param(req("uri:spiffe://ci/runner-1", token="offline"), False, None,
                 id="token-not-granted-denied"),
    pytest.param(req("uri:spiffe://ci/runner-1", role="root"), False, None,
                 id="root-over-tcp-denied-by-role-list-without-root"),
    pytest.param(req("uri:spiffe://corp/admin", "delete", role="targets"), True,
                 "admins-everything",
                 id="star-rule-allows-non-root-over-tcp"),
    pytest.param(req("uri:spiffe://corp/admin", role="root"), False, None,
                 id="star-role-rule-does-not-grant-root-over-tcp"),
    pytest.param(req("uri:spiffe://corp/admin", role="root", transport="unix"), True,
                 "admins-everything", id="star-role-rule-grants-root-over-unix"),
    pytest.param(req("dns:ceremony.sec.example", role="root", token="offline"), True,
                 "root-ceremony", id="rule-naming-root-allows-root-over-tcp"),
    pytest.param(req("dns:ceremony.sec.example", role="targets"), False, None,
                 id="root-rule-grants-only-root"),
    pytest.param(req("dns:ceremony.sec.example", role="root", transport="unix"), False, None,
                 id="transports-tcp-only-rule-denied-over-unix"),
    pytest.param(req("uid:1000", role="root", transport="unix"), True, "local-ops",
                 id="unix-rule-allows-root-by-glob"),
    pytest.param(req("uid:1000", transport="tcp"), False, None,
                 id="uid-identity-over-tcp-always-denied"),
    pytest.param(req("uid:1001", transport="unix"), False, None, id="other-uid-denied"),
    pytest.param(req("cn:CN=builder", "create", role="release"), True, "rule[4]",
                 id="unnamed-rule-named-by-index"),
    pytest.param(req("cn:CN=builder", "create", role="root"), False, None,
                 id="role-glob-r-star-does-not-reach-root-over-tcp"),
    pytest.param(req("cn:CN=builder", "create", role="root", transport="unix"), True, "rule[4]",
                 id="role-glob-r-star-reaches-root-over-unix"),
    pytest.param(req("uri:spiffe://corp/admin", "read", gun="", role="", token=""), True,
                 "admins-everything", id="empty-fields-match-star"),
    pytest.param(req("uri:spiffe://ci/runner-1", "read", gun="", role="", token=""), False, None,
                 id="empty-fields-do-not-match-narrow-globs"),
    pytest.param(req("uri:spiffe://corp/admin", "read", role="", transport="tcp"), True,
                 "admins-everything", id="empty-role-is-not-root"),
    pytest.param(req("dns:ceremony.sec.example", role="Root"), False, None,
                 id="root-look-alike-over-tcp-needs-a-match-too"),
    pytest.param(req("uri:spiffe://corp/admin", role=" root"), False, None,
                 id="root-look-alike-not-reached-by-star-over-tcp"),
    pytest.param(req(""), False, None, id="empty-identity-denied"),
    pytest.param(req("uri:spiffe://corp/admin", "write"), False,
                 None, id="unknown-operation-denied"),
    pytest.param(req("uri:spiffe://corp/admin", transport="quic"), False, None,
                 id="unknown-transport-denied"),
]


@pytest.mark.parametrize(("request_", "allowed", "rule"), DECISIONS)
def test_decide(policy: Policy, request_: Request, allowed: bool, rule: str | None) -> None:
    decision = policy.decide(request_)
    assert (decision.allowed, decision.rule) == (allowed, rule), decision.reason
    assert policy.allows(request_) is allowed
    assert decision.reason and "\n" not in decision.reason


@pytest.mark.parametrize("policy_", [
    pytest.param(Policy(), id="no-rules"),
    pytest.param(Policy.parse({}, "empty"), id="empty-document"),
    pytest.param(Policy.parse({"rule": []}, "empty-list"), id="empty-rule-list"),
])
@pytest.mark.parametrize("request_", [
    pytest.param(req("uri:spiffe://ci/runner-1"), id="tcp-sign"),
    pytest.param(req("uid:0", "read", "", "", "", "unix"), id="unix-root-uid-read-any"),
])
def test_deny_by_default(policy_: Policy, request_: Request) -> None:
    decision = policy_.decide(request_)
    assert (decision.allowed, decision.rule) == (False, None)
    assert decision.reason.startswith("no rule grants")


def test_root_denial_explains_the_explicit_root_requirement(policy: Policy) -> None:
    reason = policy.decide(req("uri:spiffe://corp/admin", role="root")).reason
    assert "'admins-everything' matches root only by a glob" in reason
    assert 'list the role "root" explicitly' in reason


def test_allow_reason_names_rule_and_identity(policy: Policy) -> None:
    decision = policy.decide(req("uri:spiffe://ci/runner-1"))
    assert decision.reason == "rule 'ci' grants sign to 'uri:spiffe://ci/runner-1' over tcp"


def test_example_policy_file_loads_and_behaves() -> None:
    policy = Policy.load(EXAMPLE)
    assert [r.name for r in policy.rules] == [
        "ci-runners", "notary-server", "release-admins", "root-ceremony", "local-root"]
    assert policy.allows(req("uri:spiffe://ci/r1", token="online"))
    assert not policy.allows(req("uri:spiffe://corp/release/alice", role="root", token="online"))
    assert policy.allows(req("dns:ceremony-1.sec.example", role="root", token="offline-root"))
    assert policy.allows(req("uid:0", "delete", role="root", token="offline-root",
                             transport="unix"))
    assert policy.sha256 is not None and len(policy.sha256) == 64


BROKEN = [
    # (file text, rule prefix expected in the message, the rest of the message)
    pytest.param("[[rule]\n", "", "not valid TOML: ", id="bad-toml"),
    pytest.param("version = 2\n", "",
                 "unknown top-level keys ['version']; only [[rule]] tables are accepted",
                 id="unknown-top-level-key"),
    pytest.param("rule = 'x'\n", "",
                 "'rule' must be an array of tables written [[rule]], got a string",
                 id="rule-not-array"),
    pytest.param("[rule]\nidentities = ['a']\noperations = ['sign']\n", "",
                 "'rule' must be an array of tables written [[rule]], got a table",
                 id="single-brackets"),
    pytest.param("rule = [1]\n", "rule[0]: ",
                 "expected a table written [[rule]], got an integer", id="rule-not-table"),
    pytest.param("[[rule]]\noperations = ['sign']\n", "rule[0]: ",
                 "field 'identities' is required", id="missing-identities"),
    pytest.param("[[rule]]\nidentities = ['a']\n", "rule[0]: ",
                 "field 'operations' is required", id="missing-operations"),
    pytest.param("[[rule]]\nidentities = []\noperations = ['sign']\n", "rule[0]: ",
                 "field 'identities' must not be empty", id="empty-identities"),
    pytest.param("[[rule]]\nidentities = ['']\noperations = ['sign']\n", "rule[0]: ",
                 "field 'identities' must be a list of identities (exact or glob), "
                 "got item a string ''", id="empty-identity-string"),
    pytest.param("[[rule]]\nidentities = 'a'\noperations = ['sign']\n", "rule[0]: ",
                 "field 'identities' must be a list of identities (exact or glob), "
                 "got a string 'a'", id="identities-not-list"),
    pytest.param("[[rule]]\nidentities = ['spiffe://ci/* ']\noperations = ['sign']\n",
                 "rule[0]: ", "field 'identities': 'spiffe://ci/* ' has leading or trailing "
                 "whitespace", id="identity-with-trailing-space"),
    pytest.param("[[rule]]\nidentities = ['a']\noperations = ['write']\n", "rule[0]: ",
                 "field 'operations': unknown value 'write'; accepted: sign, create, delete, "
                 'read, purpose, reset or "*"', id="unknown-operation"),
    pytest.param("[[rule]]\nidentities = ['a']\noperations = []\n", "rule[0]: ",
                 "field 'operations' must not be empty; omit the field", id="empty-operations"),
    pytest.param("[[rule]]\nidentities = ['a']\noperations = [1]\n", "rule[0]: ",
                 "field 'operations' must be a list of sign, create, delete, read, purpose, "
                 "reset or \"*\", got item an integer 1", id="operation-not-string"),
    pytest.param("[[rule]]\nidentities = ['a']\noperations = ['sign']\ntransports = ['udp']\n",
                 "rule[0]: ", "field 'transports': unknown value 'udp'; accepted: tcp, unix",
                 id="unknown-transport"),
    pytest.param("[[rule]]\nidentities = ['a']\noperations = ['sign']\nguns = []\n",
                 "rule[0]: ", "field 'guns' must not be empty; omit the field to mean [\"*\"]",
                 id="empty-guns"),
    pytest.param("[[rule]]\nidentities = ['a']\noperations = ['sign']\nroles = 'root'\n",
                 "rule[0]: ", "field 'roles' must be a list of role names or globs, "
                 "got a string 'root'", id="roles-not-list"),
    pytest.param("[[rule]]\nidentities = ['a']\noperations = ['sign']\ntokens = [true]\n",
                 "rule[0]: ", "field 'tokens' must be a list of token names or globs, "
                 "got item a boolean True", id="token-not-string"),
    pytest.param("[[rule]]\nidentities = ['a']\noperations = ['sign']\nidentity = ['b']\n",
                 "rule[0]: ", "unknown fields ['identity']; accepted: name, identities, "
                 "operations, guns, roles, tokens, transports", id="unknown-rule-key"),
    pytest.param("[[rule]]\nname = 3\nidentities = ['a']\noperations = ['sign']\n",
                 "rule[0]: ", "field 'name' must be a non-empty string, got an integer 3",
                 id="name-not-string"),
    pytest.param("[[rule]]\nidentities = ['a']\noperations = ['sign']\n"
                 "[[rule]]\nname = 'x'\nidentities = ['a']\noperations = ['sign']\n"
                 "[[rule]]\nname = 'x'\nidentities = ['b']\noperations = ['read']\n",
                 "rule[2]: ", "name 'x' is already used by rule[1]; names must be unique",
                 id="duplicate-name-names-later-rule"),
    pytest.param("[[rule]]\nname = 'ok'\nidentities = ['a']\noperations = ['sign']\n"
                 "[[rule]]\nname = 'ci'\nidentities = ['a']\noperations = ['sign', 'sing']\n",
                 "rule[1] ('ci'): ", "field 'operations': unknown value 'sing'",
                 id="second-rule-index-and-name"),
]


@pytest.mark.parametrize(("text", "where", "message"), BROKEN)
def test_malformed_policy_is_a_precise_one_line_config_error(
        tmp_path: Path, text: str, where: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        Policy.load(path)
    error = str(info.value)
    assert error.startswith(f"policy {path}: {where}{message}"), error
    assert "\n" not in error


@pytest.mark.parametrize(("content", "message"), [
    pytest.param(None, "policy {path}: cannot read: No such file or directory", id="missing-file"),
    pytest.param(b"\xff\xfe[[rule]]", "policy {path}: not UTF-8 text (byte 0)", id="not-utf8"),
])
def test_unreadable_policy_file(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "policy.toml"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=f"^{re.escape(message.format(path=path))}$"):
        Policy.load(path)


GOOD_V1 = """
[[rule]]
name = "v1"
identities = ["spiffe://ci/*"]
operations = ["read"]
"""
GOOD_V2 = GOOD_V1 + """
[[rule]]
name = "v2-signers"
identities = ["spiffe://ci/*"]
operations = ["sign"]
"""


def test_store_reload_applies_new_rule_and_keeps_taken_policy(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write(tmp_path, GOOD_V1)
    store = PolicyStore(path)
    taken = store.current  # an in-flight request's snapshot
    assert not taken.allows(req("uri:spiffe://ci/r"))
    write(tmp_path, GOOD_V2)
    with caplog.at_level(logging.INFO, logger="signerd.policy"):
        assert store.reload() is True
    assert store.current.decide(req("uri:spiffe://ci/r")).rule == "v2-signers"
    assert not taken.allows(req("uri:spiffe://ci/r")), "a taken Policy object never changes"
    record = next(r for r in caplog.records if r.getMessage() == "policy reloaded")
    assert record.fields["rules"] == 2  # type: ignore[attr-defined]


@pytest.mark.parametrize("broken", [
    pytest.param("[[rule]]\nidentities = ['a']\noperations = ['write']\n", id="bad-operation"),
    pytest.param("[[rule", id="bad-toml"),
    pytest.param(None, id="file-removed"),
])
def test_store_reload_failure_keeps_old_policy_and_warns(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, broken: str | None) -> None:
    path = write(tmp_path, GOOD_V2)
    store = PolicyStore(path)
    before = store.current
    if broken is None:
        path.unlink()
    else:
        path.write_text(broken)
    with caplog.at_level(logging.WARNING, logger="signerd.policy"):
        assert store.reload() is False
    assert store.current is before
    assert store.current.allows(req("uri:spiffe://ci/r"))
    warning = next(r for r in caplog.records if r.levelno == logging.WARNING)
    assert warning.getMessage() == "policy reload failed; keeping the previous policy"
    assert warning.fields["error"].startswith(f"policy {path}: ")  # type: ignore[attr-defined]


def test_store_raises_config_error_at_startup(tmp_path: Path) -> None:
    path = write(tmp_path, "[[rule]]\nidentities = ['a']\n")
    with pytest.raises(ConfigError, match=r"rule\[0\]: field 'operations' is required"):
        PolicyStore(path)


def test_a_denial_quotes_huge_values_in_short() -> None:
    """Issue 11 §6: a denial's reason quotes the caller's values (its
    identity, a token name it gave) up to 64 characters, whatever their size."""
    policy = Policy.parse({"rule": [{"identities": ["x"], "operations": ["read"]}]}, "<test>")
    huge = "spiffe://ci/" + "a" * 100_000
    decision = policy.decide(Request(Identity("uri", huge), "tcp", "create", "docker.io/a/b",
                                     "targets", huge))
    assert not decision.allowed and len(decision.reason) < 400
    assert decision.reason.count(f"…({len('uri:' + huge)} bytes)") == 1, decision.reason
    assert decision.reason.count(f"…({len(huge)} bytes)") == 1, decision.reason


def test_star_never_grants_the_admin_operations() -> None:
    """``purpose`` and ``reset`` weaken the content checks: a rule names them."""
    star = Policy.parse({"rule": [{"identities": ["ci"], "operations": ["*"]}]}, "star")
    named = Policy.parse({"rule": [{"identities": ["ops"], "operations": ["*", "reset"]}]},
                         "named")
    ci, ops = Identity("cn", "ci"), Identity("cn", "ops")
    for op in ("sign", "create", "delete", "read"):
        assert star.allows(Request(ci, "tcp", op, "docker.io/a/b", "targets", "online"))
    for op in ("purpose", "reset"):
        assert not star.allows(Request(ci, "tcp", op, "docker.io/a/b", "targets", "online"))
    assert named.allows(Request(ops, "tcp", "reset", "docker.io/a/b"))
    assert not named.allows(Request(ops, "tcp", "purpose", "docker.io/a/b", "targets", "x"))
