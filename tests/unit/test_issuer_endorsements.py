"""The chain a hard wallet walks before it takes another issuer's certificate (``offline.endorsed``), with
real P-256 keys and COSE_Sign1 envelopes: every way a chain can fail to lead from the pinned key."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.errors import OfflineFormatError
from gateway.schemes import offline

Key = tuple[ec.EllipticCurvePrivateKey, bytes]


def key() -> Key:
    private = ec.generate_private_key(ec.SECP256R1())
    point = private.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    return private, point


def endorse(signer: Key, old: bytes, new: bytes) -> bytes:
    return offline.device_sign1(signer[0], b"kid", offline.Endorsement(old, new, 1_700_000_000_000).payload())


@pytest.fixture
def keys() -> tuple[Key, Key, Key]:
    return key(), key(), key()


def test_a_chain_leads_from_the_pinned_key_in_order(keys: tuple[Key, Key, Key]) -> None:
    a, b, c = keys
    ab, bc = endorse(a, a[1], b[1]), endorse(b, b[1], c[1])
    assert offline.endorsed(a[1], c[1], [ab, bc])
    assert offline.endorsed(a[1], b[1], [ab])
    assert offline.endorsed(a[1], a[1], [])  # the pinned key itself: nothing to walk
    assert not offline.endorsed(a[1], c[1], [bc, ab])  # out of order
    assert not offline.endorsed(a[1], c[1], [bc])  # a missing link
    assert not offline.endorsed(a[1], c[1], [ab])  # stops short
    assert not offline.endorsed(a[1], b[1], [ab, bc])  # walks past the issuer
    assert not offline.endorsed(b[1], c[1], [ab, bc])  # from another pinned key


def test_a_link_signed_or_worded_wrongly_leads_nowhere(keys: tuple[Key, Key, Key]) -> None:
    a, b, c = keys
    assert not offline.endorsed(a[1], c[1], [endorse(c, a[1], c[1])])  # signed by the successor, not by a
    assert not offline.endorsed(a[1], c[1], [endorse(a, b[1], c[1])])  # signed by a, but naming b as old
    genuine = endorse(a, a[1], c[1])
    tampered = genuine[:-1] + bytes([genuine[-1] ^ 1])  # one bit of the signature
    assert not offline.endorsed(a[1], c[1], [tampered])
    for garbage in (b"", b"\x00", b"not cbor at all", offline.device_sign1(a[0], b"kid", b"\xa0")):
        assert not offline.endorsed(a[1], c[1], [garbage])
    # Another record type signed by a (a certificate) is no endorsement.
    certificate = offline.Certificate("dev-1", "1234567812345670", c[1], 1, offline.Caps(1, 1, 1), 0, 1).payload()
    assert not offline.endorsed(a[1], c[1], [offline.device_sign1(a[0], b"kid", certificate)])


def test_an_endorsement_reads_back_exactly(keys: tuple[Key, Key, Key]) -> None:
    a, b, _ = keys
    made = offline.Endorsement(a[1], b[1], 42)
    assert offline.parse_endorsement(made.payload()) == made
    with pytest.raises(OfflineFormatError):
        offline.parse_endorsement(offline.Voucher("dev-1", 1, 1, 0, 1).payload())
