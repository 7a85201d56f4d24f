"""Trade documents: their types, the fields an attestation names, how they are normalised, the input of
the alliance fingerprint and the claims an attestation signs. Pure: no store, no HSM, no HTTP.

Normalisation decides what "the same document" means across banks: two banks that write an invoice number
as ``INV-2026/001`` and ``inv 2026 001`` must compute the same fingerprint, or a second financing would
pass unseen. Identifying fields are therefore upper-cased (after Unicode NFKC) and stripped of spaces and
the separators ``-``, ``/``, ``.``, ``_``.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date
from enum import StrEnum
from typing import Any

import cbor2

from gateway.errors import InvalidTradeDocument

FINGERPRINT_CONTEXT = "ecny-alliance-fingerprint-v1"
ATTESTATION_TYPE = "ecny-trade-attestation"
MAX_AMOUNT_MINOR = 10**18  # above any real trade document, below every integer type the store has


class DocumentType(StrEnum):
    INVOICE = "invoice"
    BILL_OF_LADING = "bill_of_lading"
    CUSTOMS_DECLARATION = "customs_declaration"
    LETTER_OF_CREDIT = "letter_of_credit"
    WAREHOUSE_RECEIPT = "warehouse_receipt"


class Purpose(StrEnum):
    FINANCE = "finance"  # the bank lends against the document: at most once in the alliance
    NOTICE = "notice"  # the bank records having seen it (collection, verification): any number of times


@dataclass(frozen=True)
class TypeRules:
    """What a document type's number looks like once normalised, and whether it must cite references."""

    number: re.Pattern[str]
    number_text: str
    needs_references: bool = False


RULES: dict[DocumentType, TypeRules] = {
    # A VAT fapiao number: 8 digits (with a 10–12 digit code) or the 20-digit all-electronic number;
    # foreign commercial invoices are alphanumeric.
    DocumentType.INVOICE: TypeRules(re.compile(r"^[A-Z0-9]{6,40}$"), "6–40 letters and digits"),
    DocumentType.BILL_OF_LADING: TypeRules(re.compile(r"^[A-Z]{4}[A-Z0-9]{4,30}$"),
                                           "the carrier's 4-letter SCAC code and 4–30 letters and digits"),
    # The China Customs entry number is 18 digits.
    DocumentType.CUSTOMS_DECLARATION: TypeRules(re.compile(r"^[0-9]{18}$"), "18 digits"),
    DocumentType.LETTER_OF_CREDIT: TypeRules(re.compile(r"^[A-Z0-9]{6,35}$"), "6–35 letters and digits",
                                             needs_references=False),
    # A warehouse receipt finances goods already covered by a bill of lading or a customs entry: cite it.
    DocumentType.WAREHOUSE_RECEIPT: TypeRules(re.compile(r"^[A-Z0-9]{6,40}$"), "6–40 letters and digits",
                                              needs_references=True),
}

_SEPARATORS = re.compile(r"[\s\-/._]+")
_TAX_ID = re.compile(r"^[A-Z0-9]{8,32}$")  # China's unified social credit code is 18; foreign ones vary
_CURRENCY = re.compile(r"^[A-Z]{3}$")


@dataclass(frozen=True)
class Party:
    name: str
    tax_id: str


@dataclass(frozen=True)
class DocumentFields:
    """The fields of one document as attested: identifying ones normalised, names as given (trimmed)."""

    issuer: Party
    number: str
    issue_date: str  # ISO 8601 date
    amount_minor: int
    currency: str
    seller: Party
    buyer: Party
    references: tuple[str, ...] = ()

    def as_json(self) -> dict[str, Any]:
        return {
            "issuer": {"name": self.issuer.name, "tax_id": self.issuer.tax_id}, "number": self.number,
            "issue_date": self.issue_date, "amount_minor": self.amount_minor, "currency": self.currency,
            "seller": {"name": self.seller.name, "tax_id": self.seller.tax_id},
            "buyer": {"name": self.buyer.name, "tax_id": self.buyer.tax_id},
            "references": list(self.references),
        }


def identifier(text: str) -> str:
    """A document number or reference as every member writes it: NFKC, upper case, no separators."""
    return _SEPARATORS.sub("", unicodedata.normalize("NFKC", text)).upper()


def _tax_id(text: str, where: str) -> str:
    value = identifier(text)
    if not _TAX_ID.match(value):
        raise InvalidTradeDocument(f"{where}: a tax id is 8–32 letters and digits, not {text[:40]!r}")
    return value


def _party(name: str, tax_id: str, where: str) -> Party:
    clean = " ".join(unicodedata.normalize("NFKC", name).split())
    if not clean:
        raise InvalidTradeDocument(f"{where}.name is empty")
    return Party(clean, _tax_id(tax_id, f"{where}.tax_id"))


def normalise(
    document_type: DocumentType, issuer: Party, number: str, issue_date: str, amount_minor: int, currency: str,
    seller: Party, buyer: Party, references: list[str], today: date,
) -> DocumentFields:
    """Check the fields against ``document_type``'s rules and normalise them.

    Raises:
        InvalidTradeDocument: a number, tax id, date, currency, amount or reference that does not fit.
    """
    rules = RULES[document_type]
    if type(amount_minor) is not int or not 0 < amount_minor <= MAX_AMOUNT_MINOR:
        raise InvalidTradeDocument(f"amount_minor must be an integer in 1..{MAX_AMOUNT_MINOR} (minor units)")
    normalised_number = identifier(number)
    if not rules.number.match(normalised_number):
        raise InvalidTradeDocument(
            f"number: a {document_type.value} number is {rules.number_text} (after removing separators)")
    try:
        issued = date.fromisoformat(issue_date)
    except ValueError:
        raise InvalidTradeDocument("issue_date must be a date, YYYY-MM-DD") from None
    if issued > today:
        raise InvalidTradeDocument("issue_date is in the future")
    if not _CURRENCY.match(currency):
        raise InvalidTradeDocument("currency must be an ISO 4217 code such as CNY or USD")
    cited = tuple(identifier(reference) for reference in references)
    if any(not reference or len(reference) > 40 for reference in cited):
        raise InvalidTradeDocument("references: each is 1–40 letters and digits")
    if rules.needs_references and not cited:
        raise InvalidTradeDocument(f"references: a {document_type.value} must cite the document it covers")
    return DocumentFields(
        issuer=_party(issuer.name, issuer.tax_id, "issuer"), number=normalised_number,
        issue_date=issued.isoformat(), amount_minor=amount_minor, currency=currency,
        seller=_party(seller.name, seller.tax_id, "seller"), buyer=_party(buyer.name, buyer.tax_id, "buyer"),
        references=cited,
    )


def fingerprint_input(document_type: DocumentType, fields: DocumentFields) -> bytes:
    """What the alliance key MACs: the identifying fields only (issuer's tax id, type, number, amount,
    currency), in canonical CBOR under a context string. Names, dates and parties are left out so that a
    cosmetic difference cannot make a second financing look new."""
    return cbor2.dumps([FINGERPRINT_CONTEXT, fields.issuer.tax_id, document_type.value, fields.number,
                        fields.amount_minor, fields.currency], canonical=True)


def claims(
    attestation_id: str, document_type: DocumentType, purpose: Purpose, document_sha256: bytes,
    fields: DocumentFields, member_id: str, issued_at_ms: int,
) -> bytes:
    """The canonical CBOR payload an attestation signs. ``type`` keeps it apart from every other record an
    ``attest`` key signs (a fingerprint batch)."""
    return cbor2.dumps({
        "v": 1, "type": ATTESTATION_TYPE, "id": attestation_id, "document_type": document_type.value,
        "purpose": purpose.value, "document_sha256": document_sha256, "fields": fields.as_json(),
        "member": member_id, "iat": issued_at_ms,
    }, canonical=True)


def claims_json(payload: Any) -> dict[str, Any]:
    """Decoded claims as JSON: byte strings as hex (the digest), everything else as it is."""
    def plain(value: Any) -> Any:
        if isinstance(value, bytes):
            return value.hex()
        if isinstance(value, Mapping):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        return value
    result = plain(payload)
    return result if isinstance(result, dict) else {"payload": result}
