"""How the teller UI writes and reads money, wallet ids and times. Pure functions, no I/O."""

from __future__ import annotations

import json
from decimal import Decimal, InvalidOperation
from typing import Any

MAX_FEN = 10**15


def money(fen: int | None) -> str:
    """``¥1,234.56`` (negative: ``-¥1,234.56``); ``—`` when unknown."""
    if fen is None:
        return "—"
    sign = "-" if fen < 0 else ""
    yuan, cents = divmod(abs(fen), 100)
    return f"{sign}¥{yuan:,}.{cents:02d}"


def parse_money(text: str) -> int:
    """Yuan as typed by a teller (``100``, ``1,234.5``, ``¥12.34``) to fen. Raises ValueError with a reason."""
    cleaned = text.strip().replace(",", "").replace("¥", "").replace(" ", "")
    if not cleaned:
        raise ValueError("enter an amount in yuan, e.g. 100.00")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        raise ValueError(f"{text.strip()!r} is not an amount") from None
    if not value.is_finite():
        raise ValueError(f"{text.strip()!r} is not an amount")
    fen = value * 100
    if fen != fen.to_integral_value():
        raise ValueError("at most two decimals (fen)")
    if fen <= 0:
        raise ValueError("the amount must be positive")
    if fen > MAX_FEN:
        raise ValueError("the amount is too large")
    return int(fen)


def luhn_check_digit(digits: str) -> str:
    """The digit that makes ``digits + digit`` pass the Luhn check (the gateway's wallet id rule)."""
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = int(char)
        if index % 2 == 0:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return str((10 - total % 10) % 10)


def normalise_wallet_id(text: str) -> str:
    """Digits only (tellers type ids in groups of four)."""
    return "".join(text.split())


def is_wallet_id(text: str) -> bool:
    digits = normalise_wallet_id(text)
    return len(digits) == 16 and digits.isascii() and digits.isdigit() and luhn_check_digit(digits[:15]) == digits[15]


def grouped(wallet_id: str) -> str:
    """``8123 4567 8901 2345`` — how tellers read ids aloud."""
    return " ".join(wallet_id[i : i + 4] for i in range(0, len(wallet_id), 4))


def short_time(iso: str | None) -> str:
    """``2025-01-31 14:05`` from an ISO-8601 timestamp; blank when missing."""
    if not iso:
        return ""
    return iso.replace("T", " ")[:16]


# Default tier limits (SPEC §7; the gateway's configuration may differ): balance, single, daily, annual — fen.
TIER_LIMITS: dict[int, tuple[int | None, int | None, int | None, int | None]] = {
    4: (1_000_000, 200_000, 500_000, 5_000_000),
    3: (2_000_000, 500_000, 1_000_000, 10_000_000),
    2: (50_000_000, 5_000_000, 10_000_000, None),
    1: (None, None, None, None),
}


def tier_summary(tier: int) -> str:
    limits = TIER_LIMITS.get(tier)
    if limits is None:
        return f"tier {tier}"
    if all(limit is None for limit in limits):
        return f"tier {tier}: no limits"
    names = ("balance", "single", "daily", "annual")
    parts = [f"{name} {money(limit) if limit is not None else 'none'}"
             for name, limit in zip(names, limits, strict=True)]
    return f"tier {tier}: " + ", ".join(parts)


def describe_payload(kind: str, payload: dict[str, Any]) -> list[tuple[str, str]]:
    """An approval's payload as labelled lines a supervisor reads: wallets and amounts, or chain, token,
    recipient and amount — never a bare hash. Unknown kinds show every field."""
    rows: list[tuple[str, str]] = []
    if kind == "transfer":
        rows += [
            ("From wallet", grouped(str(payload.get("from_wallet", "")))),
            ("To wallet", grouped(str(payload.get("to_wallet", "")))),
            ("Amount", money(_as_int(payload.get("amount_fen"))) + " " + str(payload.get("ccy", "CNY"))),
            ("Memo", str(payload.get("memo", "")) or "—"),
            ("Transfer", str(payload.get("transfer_id", ""))),
        ]
        return rows
    if kind == "evm_typed_data":
        # An EIP-712 approval (gateway.evm.typed_data.record_in): the decoded permit or authorisation,
        # or — for a type the config lists without decoding — the message itself, beside the digest.
        intent = payload.get("intent") if isinstance(payload.get("intent"), dict) else None
        rows += [("Chain", f"{payload.get('chain', '?')} ({payload.get('chain_id', '?')})"),
                 ("Type", str(payload.get("primary_type", "?"))),
                 ("Contract", str(payload.get("verifying_contract", "?")))]
        if intent is not None:
            rows += [("Asset", f"{intent.get('symbol', '?')} (token {intent.get('asset', '?')})"),
                     ("Method", str(intent.get("method", "?"))),
                     ("Recipient", str(intent.get("recipient") or "—")),
                     ("Amount", token_amount(intent.get("amount"), intent.get("decimals"), intent.get("symbol")))]
        else:
            typed = payload.get("typed_data") if isinstance(payload.get("typed_data"), dict) else {}
            assert isinstance(typed, dict)
            message = typed.get("message")
            rows += [("Recipient", "—"), ("Amount", "not decoded: read the message"),
                     ("Message", json.dumps(message, sort_keys=True, ensure_ascii=False)[:2_000])]
        rows += [("Signer", str(payload.get("signer", "?"))), ("Key", str(payload.get("key_id", "?"))),
                 ("Digest", str(payload.get("digest", "?")))]
        return rows
    if kind.startswith("evm"):
        # What the gateway stores for an EVM approval (gateway.evm.transactions.record_in): the decoded
        # intent — what policy checked: asset, method, the real recipient (for ERC-20 the one in
        # the calldata, not the token contract the transaction goes to), amount — beside the
        # unsigned transaction and the signing hash the approval is bound to.
        intent = payload.get("intent") if isinstance(payload.get("intent"), dict) else {}
        tx = payload.get("transaction") if isinstance(payload.get("transaction"), dict) else {}
        assert isinstance(intent, dict) and isinstance(tx, dict)
        chain = payload.get("chain") or tx.get("chain_id") or intent.get("chain_id") or "?"
        rows.append(("Chain", f"{chain} ({payload.get('chain_id', tx.get('chain_id', '?'))})"))
        native = intent.get("asset") == "native"
        rows += [
            ("Asset", str(intent.get("symbol", "?")) + ("" if native else f" (token {intent.get('asset', '?')})")),
            ("Method", str(intent.get("method", "?"))),
            ("Recipient", str(intent.get("recipient") or "—")),
            ("Amount", token_amount(intent.get("amount"), intent.get("decimals"), intent.get("symbol"))),
            ("From", str(payload.get("from", "?"))),
        ]
        for name in ("nonce", "gas_limit", "max_fee_per_gas", "max_priority_fee_per_gas", "gas_price"):
            if tx.get(name) is not None:
                rows.append((name.replace("_", " ").capitalize(), str(tx[name])))
        if payload.get("max_fee") is not None:
            rows.append(("Max fee (wei)", str(payload["max_fee"])))
        rows += [("Key", str(payload.get("key_id", "?"))), ("Signing hash", str(payload.get("signing_hash", "?")))]
        return rows
    for name, value in sorted(payload.items()):
        if name == "kind":
            continue
        rows.append((name.replace("_", " ").capitalize(), str(value)))
    return rows


def token_amount(amount: Any, decimals: Any, symbol: Any) -> str:
    """``250,000.000000 USDC (250000000000 base units)``; base units alone when decimals are unknown."""
    text = str(amount if amount is not None else "?")
    if not (text.isascii() and text.isdigit()):
        return text
    if isinstance(decimals, int) and not isinstance(decimals, bool) and 0 <= decimals <= 36:
        whole, fraction = divmod(int(text), 10**decimals)
        shown = f"{whole:,}" + (f".{fraction:0{decimals}d}" if decimals else "")
        return f"{shown} {symbol or ''} ({text} base units)".replace("  ", " ")
    return f"{text} base units"


def payload_summary(kind: str, payload: dict[str, Any]) -> str:
    """One line for a table row."""
    if kind == "transfer":
        return (f"{money(_as_int(payload.get('amount_fen')))} {str(payload.get('from_wallet', ''))[:4]}… → "
                f"{str(payload.get('to_wallet', ''))[:4]}…")
    lines = describe_payload(kind, payload)
    if kind.startswith("evm"):
        shown = dict(lines)
        return f"{shown['Amount'].split(' (')[0]} → {shown['Recipient'][:10]}…"
    return " · ".join(value for _, value in lines[:3])


def _as_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


#: Risk severities, calm to alarming, with the colour each is shown in (the gateway's chart uses the same).
SEVERITY_STYLES = {"info": "dim", "low": "#4f83cc", "medium": "#e0b100", "high": "bold #ef6c00",
                   "critical": "bold white on #c62828"}


def severity_style(severity: str) -> str:
    """The Rich style of a risk severity (an unknown one is shown plain, never hidden)."""
    return SEVERITY_STYLES.get(severity, "")
