"""`ecny-gateway keys adopt --uri`: registering a key made outside the gateway (a key ceremony).

The ceremony is played here with python-pkcs11 on a SoftHSM token of its own: one key made as the
gateway requires (private, sensitive, not extractable), and keys that each break one rule. The
command is run as an operator runs it (a subprocess, PIN from a file); the adopted key then signs
through the API and its signature is checked with `cryptography` against the public key the token
holds.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature
from pydantic import SecretStr

from gateway.auth.roles import Role
from gateway.hsm.profile import load_named_profile
from gateway.hsm.uri import Pkcs11Uri, format_uri
from tests.conftest import ROOT, Token, make_settings, start_gateway
from tests.procs import GatewayProcess

pytestmark = [pytest.mark.softhsm, pytest.mark.slow]

CEREMONY_TOKEN = "ecny-ceremony"


@dataclass(frozen=True)
class CeremonyKey:
    label: str
    key_id: bytes
    point: bytes  # uncompressed, as the token's public key object holds it

    def uri(self, token: str = CEREMONY_TOKEN) -> str:
        return format_uri(Pkcs11Uri(path={"token": token, "object": self.label, "type": "private"},
                                    object_id=self.key_id))


@dataclass(frozen=True)
class Ceremony:
    pin_file: Path
    good: CeremonyKey
    extractable: CeremonyKey
    not_sensitive: CeremonyKey
    not_private: CeremonyKey
    short_id: CeremonyKey


@pytest.fixture(scope="module")
def ceremony(softhsm_token: Token) -> Iterator[Ceremony]:
    """A token of its own (same SoftHSM directory) and the keys a ceremony made in it, with python-pkcs11
    in a process of its own (``tests/ceremony.py``)."""
    subprocess.run([str(ROOT / "softhsm" / "init-token.sh"), str(softhsm_token.directory), CEREMONY_TOKEN],
                   check=True, capture_output=True, timeout=120)
    pin_file = softhsm_token.directory / f"{CEREMONY_TOKEN}.user-pin"
    stem = secrets.token_hex(3)
    spec = [
        {"label": f"ceremony-good-{stem}", "key_id": secrets.token_hex(16)},
        {"label": f"ceremony-extractable-{stem}", "key_id": secrets.token_hex(16), "private": {"extractable": True}},
        {"label": f"ceremony-plain-{stem}", "key_id": secrets.token_hex(16), "private": {"sensitive": False}},
        {"label": f"ceremony-public-{stem}", "key_id": secrets.token_hex(16), "private": {"private": False}},
        {"label": f"ceremony-short-{stem}", "key_id": secrets.token_hex(2)},
    ]
    done = subprocess.run(
        [sys.executable, "-m", "tests.ceremony", load_named_profile("softhsm").module.path, CEREMONY_TOKEN,
         str(pin_file), json.dumps(spec)],
        cwd=ROOT, env={**os.environ, "SOFTHSM2_CONF": str(softhsm_token.conf)}, capture_output=True, text=True,
        check=False, timeout=120)
    assert done.returncode == 0, done.stderr
    keys = [CeremonyKey(item["label"], bytes.fromhex(item["key_id"]), bytes.fromhex(item["point"]))
            for item in json.loads(done.stdout)]
    yield Ceremony(pin_file, *keys)


@pytest.fixture
def operator(softhsm_token: Token, ceremony: Ceremony, tmp_path: Path) -> GatewayProcess:
    return GatewayProcess(tmp_path / "var", softhsm_token.conf, CEREMONY_TOKEN, ceremony.pin_file,
                          f"sqlite:///{tmp_path / 'adopt.db'}")


def _refused(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and result.stdout == ""
    for word in words:
        assert word in result.stderr, result.stderr


def _registered(operator: GatewayProcess) -> str:
    listed = operator.cli("keys", "list")
    assert listed.returncode == 0, listed.stderr
    return listed.stdout


async def test_a_ceremony_key_is_adopted_and_signs(operator: GatewayProcess, ceremony: Ceremony,
                                                   softhsm_token: Token, tmp_path: Path) -> None:
    """Positive control: a key made as the gateway requires is registered, with the token's public key, and signs."""
    key = ceremony.good
    made = operator.cli("keys", "adopt", "--uri", key.uri(), "--usage", "raw")
    assert made.returncode == 0, made.stderr
    document = json.loads(made.stdout)
    assert (document["key_id"], document["label"], document["origin"]) == (key.key_id.hex(), key.label, "adopted")
    assert document["algorithm"] == "ecdsa-p256" and document["usage"] == ["raw"] and document["status"] == "active"
    public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), key.point)
    assert document["public_key_pem"] == public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    # Adopting it twice is refused.
    _refused(operator.cli("keys", "adopt", "--uri", key.uri(), "--usage", "raw"), "registered already")
    # The gateway signs with it; the signature verifies with the public key the ceremony's token holds.
    settings = make_settings(softhsm_token, operator_dsn(tmp_path))
    settings.hsm.token_label, settings.hsm.pin = CEREMONY_TOKEN, SecretStr(ceremony.pin_file.read_text().strip())
    gateway = await start_gateway(settings)
    try:
        digest = hashlib.sha256(b"signed by an adopted key").digest()
        response = await gateway.client.post(f"/v1/keys/{key.key_id.hex()}/sign", json={"digest": digest.hex()},
                                             headers=gateway.auth(Role.BACKEND))
        assert response.status == 200, await response.text()
        raw = bytes.fromhex((await response.json())["signature"])
        public.verify(encode_dss_signature(int.from_bytes(raw[:32]), int.from_bytes(raw[32:])), digest,
                      ec.ECDSA(Prehashed(hashes.SHA256())))
        audit = await (await gateway.client.get("/v1/audit", params={"after_seq": "0", "limit": "1000"},
                                                headers=gateway.auth(Role.AUDITOR))).json()
        adopted = [entry for entry in audit["entries"] if entry["action"] == "keys.adopt"]
        assert len(adopted) == 1 and adopted[0]["key_id"] == key.key_id.hex()
        assert adopted[0]["result"]["attributes"]["extractable"] is False
        assert "?" not in adopted[0]["result"]["uri"]
    finally:
        await gateway.client.close()


def operator_dsn(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'adopt.db'}"


@pytest.mark.parametrize(("which", "attribute"), [
    ("extractable", "CKA_EXTRACTABLE"),
    ("not_sensitive", "CKA_SENSITIVE"),
    ("not_private", "CKA_PRIVATE"),
    ("short_id", "CKA_ID"),
])
def test_a_key_that_can_leave_the_token_is_not_adopted(operator: GatewayProcess, ceremony: Ceremony, which: str,
                                                        attribute: str) -> None:
    """Threat: an extractable, readable or unprotected ceremony key is registered as if it never left the HSM."""
    key: CeremonyKey = getattr(ceremony, which)
    _refused(operator.cli("keys", "adopt", "--uri", key.uri(), "--usage", "raw"), "cannot adopt", attribute)
    assert key.key_id.hex() not in _registered(operator)


def test_an_adoption_uri_with_a_pin_or_for_another_token_is_refused(operator: GatewayProcess,
                                                                   ceremony: Ceremony) -> None:
    """Threat: the PIN travels in argv (pin-value), or a URI naming another token adopts a key from this one."""
    key = ceremony.good
    _refused(operator.cli("keys", "adopt", "--uri", key.uri() + "?pin-value=1234", "--usage", "raw"), "pin-value")
    _refused(operator.cli("keys", "adopt", "--uri", key.uri(token="some-other-token"), "--usage", "raw"),
             "token", "some-other-token")
    _refused(operator.cli("keys", "adopt", "--uri", "pkcs11:token=x;vendor-x=1;object=k", "--usage", "raw"),
             "unknown path attribute")
    _refused(operator.cli("keys", "adopt", "--uri", f"pkcs11:object={key.label};type=cert", "--usage", "raw"),
             "type=cert")
    _refused(operator.cli("keys", "adopt", "--uri", "pkcs11:object=no-such-key", "--usage", "raw"), "no private key")
    _refused(operator.cli("keys", "adopt", "--uri", key.uri(), "--usage", "evm"), "evm")  # P-256 cannot sign EVM
    assert key.key_id.hex() not in _registered(operator)


def test_rotate_and_disable_from_the_command_line(operator: GatewayProcess) -> None:
    """Positive control of `keys rotate` and `keys disable`, and their errors: one line, exit 2, no traceback."""
    made = operator.cli("keys", "generate", "--label", "cli-lifecycle", "--algorithm", "ecdsa-p256", "--usage", "audit")
    assert made.returncode == 0, made.stderr
    first = json.loads(made.stdout)
    rotated = operator.cli("keys", "rotate", first["key_id"])
    assert rotated.returncode == 0, rotated.stderr
    second = json.loads(rotated.stdout)
    assert (second["family_id"], second["version"], second["label"]) == (first["key_id"], 2, "cli-lifecycle.v2")
    assert second["usage"] == ["audit"] and second["status"] == "active"
    disabled = operator.cli("keys", "disable", second["key_id"])
    assert disabled.returncode == 0, disabled.stderr
    assert json.loads(disabled.stdout)["status"] == "disabled"
    _refused(operator.cli("keys", "rotate", "0" * 32), "no key")
    _refused(operator.cli("keys", "disable", "0" * 32), "no key")
