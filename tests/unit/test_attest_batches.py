"""The alliance's pure parts: document normalisation, the fingerprint input and batch verification, with
a software P-256 key standing in for a member's HSM key (the real HSM path is tests/security/test_attestations.py)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from datetime import date
from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils

from gateway.attest.batches import BatchEntry, MemberKey, batch_payload, member_key, verify_batch
from gateway.attest.documents import DocumentType, Party, Purpose, claims, fingerprint_input, normalise
from gateway.errors import AllianceBatchRefused, ConfigError, InvalidTradeDocument
from gateway.schemes import cose
from gateway.signing import Algorithm, SignerHealth

NOW = 1_800_000_000_000
NONCE = bytes(range(16))


class SoftwareSigner:
    """A P-256 key in memory (unit tests only): signs the digest the COSE layer hands it, raw r‖s."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())

    async def sign(self, key_id: str, algorithm: str, data: bytes) -> bytes:
        r, s = utils.decode_dss_signature(self.key.sign(data, ec.ECDSA(utils.Prehashed(hashes.SHA256()))))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")

    async def sign_many(self, key_id: str, algorithm: str, items: Sequence[bytes]) -> list[bytes]:
        return [await self.sign(key_id, algorithm, item) for item in items]

    async def generate(self, key_id: str, label: str, algorithm: str) -> bytes:
        raise NotImplementedError

    async def public_key(self, key_id: str, algorithm: str) -> bytes:
        raise NotImplementedError

    async def key_attributes(self, key_id: str) -> dict[str, bool]:
        raise NotImplementedError

    def health(self) -> SignerHealth:
        return SignerHealth(True, 1, 1)

    def member(self, member_id: str) -> MemberKey:
        pem = self.key.public_key().public_bytes(serialization.Encoding.PEM,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo).decode()
        return member_key(member_id, pem)


def signed(signer: SoftwareSigner, payload: bytes) -> bytes:
    return asyncio.run(cose.sign1(signer, -7, "k", Algorithm.ECDSA_P256, payload))


def batch(signer: SoftwareSigner, member: str = "BANK-A", after: int = 0, nonce: bytes = NONCE,
          issued_at: int = NOW, head: int | None = None, seqs: Sequence[int] | None = None) -> bytes:
    seqs = list(seqs if seqs is not None else range(after + 1, after + 3))
    entries = [BatchEntry(seq, bytes([seq]) * 32, NOW - 1000) for seq in seqs]
    return signed(signer, batch_payload(member, after, nonce, issued_at, head if head is not None else
                                        (seqs[-1] if seqs else after), entries))


def check(envelope: bytes, key: MemberKey, cursor: int = 0, last_issued: int = 0) -> Any:
    return verify_batch(envelope, key, cursor, NONCE, NOW, 120_000, last_issued, frozenset({"BANK-A", "BANK-C"}))


@pytest.fixture(scope="module")
def bank_a() -> SoftwareSigner:
    return SoftwareSigner()


def test_a_genuine_batch_verifies(bank_a: SoftwareSigner) -> None:
    result = check(batch(bank_a, after=5, seqs=[6, 7, 8]), bank_a.member("BANK-A"), cursor=5)
    assert [entry.seq for entry in result.entries] == [6, 7, 8] and result.head == 8


@pytest.mark.parametrize(("why", "make", "cursor", "last_issued", "message"), [
    ("replayed (old nonce)", lambda s: batch(s, nonce=b"\x01" * 16), 0, 0, "replayed"),
    ("rewinds the cursor", lambda s: batch(s, after=0), 3, 0, "not at the cursor"),
    ("stale", lambda s: batch(s, issued_at=NOW - 10 * 60_000), 0, 0, "stale"),
    ("from the future", lambda s: batch(s, issued_at=NOW + 10 * 60_000), 0, 0, "future"),
    ("older than the last accepted", lambda s: batch(s), 0, NOW + 1, "before the last batch"),
    ("a gap in the seqs", lambda s: batch(s, seqs=[1, 3]), 0, 0, "gap"),
    ("head below its own entries", lambda s: batch(s, head=1), 0, 0, "head"),
    ("names another member", lambda s: batch(s, member="BANK-C"), 0, 0, "a configured peer"),
    ("names an unknown member", lambda s: batch(s, member="BANK-Z"), 0, 0, "an unknown member"),
])
def test_batch_checks(bank_a: SoftwareSigner, why: str, make: Any, cursor: int, last_issued: int,
                      message: str) -> None:
    """Each way a batch can be wrong is refused, naming the check (a gap, a replay, a rewind, a stale batch)."""
    with pytest.raises(AllianceBatchRefused) as refused:
        check(make(bank_a), bank_a.member("BANK-A"), cursor, last_issued)
    assert message in refused.value.detail, (why, refused.value.detail)


def test_batch_with_a_gap_is_refused(bank_a: SoftwareSigner) -> None:
    """Fingerprint skipped in a batch (seqs 1, 3): refused, so a hidden entry cannot slip past the cursor."""
    with pytest.raises(AllianceBatchRefused, match="gap"):
        check(batch(bank_a, seqs=[1, 3]), bank_a.member("BANK-A"))


def test_a_batch_signed_by_another_key_is_refused(bank_a: SoftwareSigner) -> None:
    """Batch from an unknown peer: signed by a key other than the one pinned for the member."""
    with pytest.raises(AllianceBatchRefused, match="signature does not verify"):
        check(batch(SoftwareSigner()), bank_a.member("BANK-A"))


def test_an_attestation_is_not_a_batch(bank_a: SoftwareSigner) -> None:
    """Record confusion: an attestation signed by the member's key cannot pass as a fingerprint batch."""
    fields = sample_fields()
    attestation = signed(bank_a, claims("x", DocumentType.INVOICE, Purpose.FINANCE, bytes(32), fields, "BANK-A", NOW))
    with pytest.raises(AllianceBatchRefused, match="not a fingerprint batch"):
        check(attestation, bank_a.member("BANK-A"))


def test_alg_confusion_is_refused(bank_a: SoftwareSigner) -> None:
    """A batch whose COSE alg is not the pinned key's (alg confusion)."""
    payload = batch_payload("BANK-A", 0, NONCE, NOW, 0, [])
    protected = cose.protected_header(-8, b"k")
    to_sign = cose.signing_input(Algorithm.ECDSA_P256, cose.sig_structure(protected, payload))
    envelope = cose.assemble(protected, payload, asyncio.run(bank_a.sign("k", "ecdsa-p256", to_sign)))
    with pytest.raises(AllianceBatchRefused, match="alg"):
        check(envelope, bank_a.member("BANK-A"))


def test_garbage_is_refused_not_raised(bank_a: SoftwareSigner) -> None:
    for garbage in (b"", b"\xff\x00", cbor2.dumps([1, 2, 3]), cbor2.dumps(cbor2.CBORTag(18, [b"", {}, b"", b""]))):
        with pytest.raises(AllianceBatchRefused):
            check(garbage, bank_a.member("BANK-A"))


def test_a_peer_key_must_be_p256_or_ed25519() -> None:
    other = ec.generate_private_key(ec.SECP256K1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    with pytest.raises(ConfigError):
        member_key("BANK-X", other)
    with pytest.raises(ConfigError):
        member_key("BANK-X", "not a key")


# --- documents -----------------------------------------------------------------------------------------

SELLER = Party("Shanghai Export Co.", "91310000MA1FL8XQ3X")
BUYER = Party("Rotterdam Import B.V.", "NL859412345B01")


def sample_fields(number: str = "INV-2026/0001", amount: int = 100, currency: str = "CNY",
                  tax_id: str = "91310000MA1FL8XQ3X") -> Any:
    return normalise(DocumentType.INVOICE, Party("Shanghai Export Co.", tax_id), number, "2026-11-30", amount,
                     currency, SELLER, BUYER, [], date(2026, 12, 5))


def test_cosmetic_differences_give_one_fingerprint() -> None:
    """Reformatted document number (separators, case, full-width characters) used to finance twice: the
    normalised fields and so the fingerprint input are the same."""
    base = fingerprint_input(DocumentType.INVOICE, sample_fields())
    for variant in ("inv 2026 0001", "INV.2026_0001", "ＩＮＶ－２０２６／０００１"):
        assert fingerprint_input(DocumentType.INVOICE, sample_fields(variant)) == base, variant
    assert fingerprint_input(DocumentType.INVOICE, sample_fields(tax_id="91310000ma1fl8xq3x")) == base


def test_identifying_fields_change_the_fingerprint() -> None:
    base = fingerprint_input(DocumentType.INVOICE, sample_fields())
    assert fingerprint_input(DocumentType.INVOICE, sample_fields(amount=101)) != base
    assert fingerprint_input(DocumentType.INVOICE, sample_fields(currency="USD")) != base
    assert fingerprint_input(DocumentType.LETTER_OF_CREDIT, sample_fields()) != base


@pytest.mark.parametrize(("document_type", "number", "references"), [
    (DocumentType.CUSTOMS_DECLARATION, "22012026I000123456", []),  # not 18 digits
    (DocumentType.BILL_OF_LADING, "12345678", []),  # no SCAC prefix
    (DocumentType.WAREHOUSE_RECEIPT, "WR-000123", []),  # cites nothing
])
def test_type_rules(document_type: DocumentType, number: str, references: list[str]) -> None:
    with pytest.raises(InvalidTradeDocument):
        normalise(document_type, SELLER, number, "2026-11-30", 100, "CNY", SELLER, BUYER, references,
                  date(2026, 12, 5))


def test_a_float_amount_is_refused_below_the_api_too() -> None:
    """Float amount: refused by the documents layer too, not only by the request model."""
    with pytest.raises(InvalidTradeDocument):
        normalise(DocumentType.INVOICE, SELLER, "INV0001", "2026-11-30", 100.0, "CNY",  # type: ignore[arg-type]
                  SELLER, BUYER, [], date(2026, 12, 5))


def test_a_peer_with_a_bad_key_is_refused_at_start(bank_a: SoftwareSigner) -> None:
    """Misconfigured peer key: refused when the settings load, naming the key, not at the first sync."""
    from gateway.config import load_settings

    good = bank_a.member("BANK-A").pem
    settings = load_settings(None, environ={"ECNY_ALLIANCE__PEERS": json.dumps(
        [{"member_id": "BANK-A", "url": "https://a.example", "public_key_pem": good}])})
    assert settings.alliance.peers[0].member_id == "BANK-A"
    for bad in ("not a key", ec.generate_private_key(ec.SECP256K1()).public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()):
        with pytest.raises(ConfigError, match=r"alliance\.peers\.0\.public_key_pem"):
            load_settings(None, environ={"ECNY_ALLIANCE__PEERS": json.dumps(
                [{"member_id": "BANK-A", "url": "https://a.example", "public_key_pem": bad}])})
    with pytest.raises(ConfigError, match="own member_id"):
        load_settings(None, environ={"ECNY_ALLIANCE__MEMBER_ID": "BANK-A", "ECNY_ALLIANCE__PEERS": json.dumps(
            [{"member_id": "BANK-A", "url": "https://a.example", "public_key_pem": good}])})
