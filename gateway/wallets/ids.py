"""Wallet ids: 16 digits, the last a Luhn check digit over the first 15."""

from __future__ import annotations

import secrets


def luhn_check_digit(digits: str) -> str:
    """The digit that makes ``digits + digit`` pass the Luhn check."""
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = int(char)
        if index % 2 == 0:  # these positions are doubled once the check digit is appended
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return str((10 - total % 10) % 10)


def is_valid_wallet_id(text: str) -> bool:
    return len(text) == 16 and text.isascii() and text.isdigit() and luhn_check_digit(text[:15]) == text[15]


def new_wallet_id(prefix: str = "8") -> str:
    """A random wallet id starting with ``prefix`` (the institution's digit range)."""
    body = prefix + "".join(str(secrets.randbelow(10)) for _ in range(15 - len(prefix)))
    return body + luhn_check_digit(body)


def grouped(wallet_id: str) -> str:
    """``8123 4567 8901 2345`` — how tellers read ids aloud."""
    return " ".join(wallet_id[i : i + 4] for i in range(0, len(wallet_id), 4))
