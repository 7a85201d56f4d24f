"""What `keys adopt` decides from what the token reports (pure: the facts are given, no token).

The end-to-end refusals, with keys made in a real SoftHSM token, are in
tests/security/test_key_adoption.py; these cover every rule and their combination.
"""

from __future__ import annotations

from typing import Any

import pytest

from gateway.errors import ValidationFailed
from gateway.hsm.profile import load_named_profile
from gateway.hsm.uri import parse
from gateway.key_lifecycle import adoption_refusals, adoption_uri

GOOD: dict[str, Any] = {
    "id": "11" * 16, "label": "ceremony", "key_type": 0x3, "curve_oid": "1.2.840.10045.3.1.7",
    "sensitive": True, "extractable": False, "private": True, "sign": True, "public_key": b"\x04" + b"\x01" * 64,
    "mechanisms": [0x1041], "token": {"token": "ecny", "serial": "0123", "manufacturer": "SoftHSM project",
                                      "library-version": "2.6"},
}


def test_a_key_made_as_required_has_no_refusal() -> None:
    """Positive control: a private, sensitive, non-extractable key on the gateway's token is adoptable."""
    profile = load_named_profile("softhsm")
    assert adoption_refusals(profile, parse("pkcs11:token=ecny;serial=0123;library-version=2;id=%11"), GOOD) == []


@pytest.mark.parametrize(("change", "reason"), [
    ({"private": False}, "CKA_PRIVATE"),
    ({"sensitive": False}, "CKA_SENSITIVE"),
    ({"sensitive": None}, "CKA_SENSITIVE"),  # the token does not say: not adopted
    ({"extractable": True}, "CKA_EXTRACTABLE"),
    ({"extractable": None}, "CKA_EXTRACTABLE"),
    ({"sign": False}, "CKA_SIGN"),
    ({"id": "01"}, "CKA_ID is 1 bytes"),
    ({"public_key": None}, "no public key object"),
])
def test_each_rule_refuses(change: dict[str, Any], reason: str) -> None:
    """Threat: a key that can leave the token, or cannot sign, is registered as an HSM key."""
    refusals = adoption_refusals(load_named_profile("softhsm"), parse("pkcs11:id=%11"), GOOD | change)
    assert len(refusals) == 1 and reason in refusals[0]


def test_every_reason_is_listed_at_once() -> None:
    """An operator sees every reason at once, not one per attempt."""
    facts = GOOD | {"private": False, "sensitive": False, "extractable": True}
    assert len(adoption_refusals(load_named_profile("softhsm"), parse("pkcs11:token=other"), facts)) == 4


@pytest.mark.parametrize(("uri", "message"), [
    ("pkcs11:token=ecny", "name the key"),
    ("pkcs11:object=k;type=public", "type=public"),
    ("pkcs11:object=k?pin-value=1234", "pin-value"),
    ("pkcs11:object=k;x-vendor=1", "unknown path attribute"),
    ("pkcs11:object=k%", "percent-encoding"),
])
def test_adoption_uris_that_are_refused(uri: str, message: str) -> None:
    """Threat: a URI names no single private key, or carries the PIN."""
    with pytest.raises(ValidationFailed, match=message):
        adoption_uri(uri)
