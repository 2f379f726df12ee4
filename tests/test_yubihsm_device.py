"""The software YubiHSM 2 (tests/_yubihsm) checked by Yubico's own Python
client, python-yubihsm, apart from the PKCS#11 module: if the device and a
second, independent host implementation agree on SCP03, framing and the
commands, the conformance suite's findings on yubihsm_pkcs11.so are the
module's and signerd's, not the device's.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding
from yubihsm import YubiHsm
from yubihsm.defs import ALGORITHM, CAPABILITY, ERROR
from yubihsm.exceptions import YubiHsmAuthenticationError, YubiHsmDeviceError
from yubihsm.objects import AsymmetricKey, Opaque

from tests import _yubihsm


@pytest.fixture
def device(tmp_path: Path) -> Iterator[_yubihsm.YubiHsm]:
    y = _yubihsm.start(tmp_path / "device", idle=2.0)
    yield y
    y.stop()


def test_every_key_type_signs_and_verifies(device: _yubihsm.YubiHsm) -> None:
    hsm = YubiHsm.connect(device.url)
    info = hsm.get_device_info()
    assert info.version == (2, 4, 0) and ALGORITHM.EC_ED25519 in info.supported_algorithms
    with hsm.create_session_derived(_yubihsm.AUTH_KEY, _yubihsm.PASSWORD) as s:
        made = []
        for alg in (ALGORITHM.EC_P256, ALGORITHM.EC_P384):
            k = AsymmetricKey.generate(s, 0, "ec", 1, CAPABILITY.SIGN_ECDSA, alg)
            made.append(k.id)
            pub = k.get_public_key()
            assert isinstance(pub, ec.EllipticCurvePublicKey)
            pub.verify(k.sign_ecdsa(b"m", hashes.SHA384()), b"m", ec.ECDSA(hashes.SHA384()))
        ed = AsymmetricKey.generate(s, 0, "ed", 1, CAPABILITY.SIGN_EDDSA, ALGORITHM.EC_ED25519)
        ed.get_public_key().verify(ed.sign_eddsa(b"m"), b"m")  # type: ignore[call-arg]
        rsa = AsymmetricKey.generate(s, 0, "rsa", 1, CAPABILITY.SIGN_PSS | CAPABILITY.SIGN_PKCS,
                                     ALGORITHM.RSA_2048)
        pub = rsa.get_public_key()
        pub.verify(rsa.sign_pkcs1v1_5(b"m"), b"m", padding.PKCS1v15(),  # type: ignore[call-arg]
                   hashes.SHA256())
        pub.verify(rsa.sign_pss(b"m", 32), b"m",  # type: ignore[call-arg]
                   padding.PSS(padding.MGF1(hashes.SHA256()), 32), hashes.SHA256())
        with pytest.raises(YubiHsmDeviceError) as e:  # the key may only sign ECDSA
            k.sign_pkcs1v1_5(b"m")
        assert e.value.code == ERROR.INSUFFICIENT_PERMISSIONS
        blob = Opaque.put(s, 0, "blob", 1, CAPABILITY.NONE, ALGORITHM.OPAQUE_DATA, b"data")
        assert blob.get() == b"data" and blob.get_info().label == "blob"
        blob.delete()
        assert len(s.get_pseudo_random(64)) == 64
        assert {o.id for o in s.list_objects()} == {1, *made, ed.id, rsa.id}


def test_a_wrong_password_is_refused(device: _yubihsm.YubiHsm) -> None:
    hsm = YubiHsm.connect(device.url)
    with pytest.raises(YubiHsmAuthenticationError):
        hsm.create_session_derived(_yubihsm.AUTH_KEY, "not the password")


def test_sixteen_sessions_and_no_more_and_idle_ones_close(device: _yubihsm.YubiHsm) -> None:
    hsm = YubiHsm.connect(device.url)
    sessions = [hsm.create_session_derived(1, _yubihsm.PASSWORD) for _ in range(16)]
    with pytest.raises(YubiHsmDeviceError) as e:
        hsm.create_session_derived(1, _yubihsm.PASSWORD)
    assert e.value.code == ERROR.SESSIONS_FULL
    sessions[0].close()
    hsm.create_session_derived(1, _yubihsm.PASSWORD)  # a closed one frees its slot
    time.sleep(2.5)  # the fixture's device closes sessions idle for 2 s (30 s on a real one)
    with pytest.raises(YubiHsmDeviceError) as e:
        sessions[1].get_pseudo_random(8)
    assert e.value.code == ERROR.INVALID_SESSION


def test_256_objects_and_they_outlive_an_unplug(device: _yubihsm.YubiHsm) -> None:
    hsm = YubiHsm.connect(device.url)
    with hsm.create_session_derived(1, _yubihsm.PASSWORD) as s:
        for i in range(255):  # authentication key 1 is the 256th
            Opaque.put(s, 0, f"o{i}", 1, CAPABILITY.NONE, ALGORITHM.OPAQUE_DATA, b"x")
        with pytest.raises(YubiHsmDeviceError) as e:
            Opaque.put(s, 0, "one too many", 1, CAPABILITY.NONE, ALGORITHM.OPAQUE_DATA, b"x")
        assert e.value.code == ERROR.STORAGE_FAILED
    device.unplug()
    device.replug()
    hsm = YubiHsm.connect(device.url)
    with hsm.create_session_derived(1, _yubihsm.PASSWORD) as s:
        assert len(s.list_objects()) == 256
