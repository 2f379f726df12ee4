"""Config values an operator can get wrong, each refused by
:func:`signerd.config.parse_config` (and the token URI and PIN readers) with
one ConfigError that names the setting and what it must be."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest

from signerd.config import (
    Pkcs11Uri,
    TokenConfig,
    parse_config,
)
from signerd.errors import ConfigError
from signerd.trusted_files import audit_location_problem

TOKEN = {"name": "t", "module": "/m.so", "uri": "pkcs11:token=t", "pin_env": "PIN"}


def _token(**changes: Any) -> dict[str, Any]:
    token = {**TOKEN, **changes}
    return {k: v for k, v in token.items() if v is not None}


@pytest.mark.parametrize(("data", "message"), [
    ({"tokens": [TOKEN], "tsl": {}}, "unknown config sections ['tsl']"),
    ({"tokens": [TOKEN], "server": "127.0.0.1:4443"}, "[server] must be a table"),
    ({"tokens": [TOKEN], "tls": ["cert.pem"]}, "[tls] must be a table"),
    ({"tokens": [TOKEN], "metrics": "127.0.0.1:9100"}, "[metrics] must be a table"),
    ({}, "at least one [[tokens]] entry is required"),
    ({"tokens": TOKEN}, "at least one [[tokens]] entry is required"),
    ({"tokens": [_token(uri=None)]}, "tokens[0].name and tokens[0].uri are required"),
    ({"tokens": [_token(module=None)]},
     "tokens[0].module (the PKCS#11 module path) is required"),
    ({"tokens": [_token(pin_file="t.pin")]}, "token t: set exactly one of pin_file or pin_env"),
    ({"tokens": [_token(pin_env=None)]}, "token t: set exactly one of pin_file or pin_env"),
    ({"tokens": [_token(pin="1234")]},
     "token t: a PIN never goes in the config; use pin_file or pin_env"),
    ({"tokens": [_token(module="")]},
     "tokens[0].module (the PKCS#11 module path) is required"),
    ({"tokens": [TOKEN], "server": {"engine": "gevent"}},
     "server.engine must be one of ['aio', 'threads'], not 'gevent'"),
    ({"tokens": [TOKEN], "policy": {"file": ""}}, "policy.file must be a non-empty string path"),
    ({"tokens": [TOKEN], "audit": {"file": 7}}, "audit.file must be a non-empty string path"),
    ({"tokens": [TOKEN], "metrics": {"listen": "9100"}},
     "metrics.listen must be HOST:PORT, got '9100'"),
    ({"tokens": [TOKEN], "metrics": {"listen": "127.0.0.1:9100", "path": "/m"}},
     "unknown keys in [metrics]: ['path']"),
])
def test_a_bad_config_is_refused_by_name(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(data, Path("/etc/signerd"))
    assert str(e.value) == message


def test_the_module_can_come_from_the_uri() -> None:
    """RFC 7512's module-path names the module when the table does not."""
    cfg = parse_config({"tokens": [_token(module=None, uri="pkcs11:token=t?module-path="
                                                          "/usr/lib/softhsm/libsofthsm2.so")]},
                       Path("/etc/signerd"))
    assert cfg.tokens[0].module == "/usr/lib/softhsm/libsofthsm2.so"
    assert cfg.tokens[0].uri.token == "t"


@pytest.mark.parametrize(("uri", "message"), [
    ("token=t", "token uri must start with 'pkcs11:', got 'token=t'"),
    ("pkcs11:token", "token uri attribute 'token' has no value"),
    ("pkcs11:token=t?pin-source=file:/etc/pin",
     "token uri must not carry a PIN: use pin_file or pin_env"),
    ("pkcs11:manufacturer=SoftHSM", "token uri must name the token by token=, serial= or slot-id="),
    ("pkcs11:slot-id=-1", "token uri slot-id must be a number from 0 to 18446744073709551615, "
                          "got '-1'"),
])
def test_a_bad_token_uri_is_refused(uri: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        Pkcs11Uri.parse(uri)
    assert str(e.value) == message


def test_a_token_uri_is_percent_decoded() -> None:
    uri = Pkcs11Uri.parse("pkcs11:token=my%20token;serial=42?slot-id=3")
    assert (uri.token, uri.serial, uri.slot_id) == ("my token", "42", 3)


def test_a_pin_from_the_environment_or_a_file(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    uri = Pkcs11Uri.parse("pkcs11:token=t")
    from_env = TokenConfig("t", "/m.so", uri, pin_env="SIGNERD_TEST_FAULTS_PIN")
    monkeypatch.delenv("SIGNERD_TEST_FAULTS_PIN", raising=False)
    with pytest.raises(ConfigError, match=re.escape(
            "token t: environment variable SIGNERD_TEST_FAULTS_PIN is not set")):
        from_env.read_pin()
    monkeypatch.setenv("SIGNERD_TEST_FAULTS_PIN", "0000")
    assert from_env.read_pin() == "0000"

    pin = tmp_path / "t.pin"
    fd = os.open(pin, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"1234\r\n")
    os.close(fd)
    from_file = TokenConfig("t", "/m.so", uri, pin_file=pin)
    assert from_file.read_pin() == "1234"  # a line ending is not part of it
    pin.write_bytes(b"\xff\xfe12")
    with pytest.raises(ConfigError) as e:
        from_file.read_pin()
    assert str(e.value) == f"token t: PIN file {pin} is not UTF-8 text"
    assert "12" not in str(e.value).replace(str(pin), "")


def test_an_audit_log_where_it_cannot_be(tmp_path: Path) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    assert audit_location_problem(a_file / "audit.log") == (
        f"{a_file / 'audit.log'} cannot be examined: Not a directory")
    missing = tmp_path / "missing"
    assert audit_location_problem(missing / "audit.log") == (
        f"directory {missing} cannot be examined: No such file or directory")
    assert audit_location_problem(tmp_path / "audit.log") is None


def test_an_audit_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    """Another user could put a link at the log's (or its head's) name."""
    if os.geteuid() == 0:
        theirs = tmp_path / "theirs"
        theirs.mkdir(mode=0o755)
        os.chown(theirs, 4321, 4321)
    else:
        theirs = Path("/")  # root's, which signerd is not here
    owner = theirs.stat().st_uid
    assert audit_location_problem(theirs / "audit.log") == (
        f"directory {theirs} is owned by uid {owner}, not by signerd's user (uid "
        f"{os.geteuid()}): the audit log's directory must be signerd's own")
