"""Canonical CBOR maps with one value left open, for payloads a database finishes.

A payload fixed at posting may hold a number only the database knows when it posts (a transfer's
``seq``, a voucher's ``load_seq``: one more than the row it locks). To post in one server-side
statement, the gateway sends the canonical encoding of everything around that value, and the server
puts ``head || CBOR(n) || tail`` (``ecny_cbor_uint``, migration 0016 for PostgreSQL).
"""

from __future__ import annotations

from typing import Any

import cbor2


def map_around(claims: dict[str, Any], key: str) -> tuple[bytes, bytes]:
    """The canonical CBOR of ``claims`` (fewer than 24 entries) before and after the value of ``key``
    (whose value in ``claims`` is ignored): ``head + cbor2.dumps(value) + tail`` equals
    ``cbor2.dumps({**claims, key: value}, canonical=True)`` for any unsigned integer ``value``.

    Canonical CBOR (RFC 7049 §3.9, what ``cbor2`` writes) orders a map's keys by the length of their
    encoding, then bytewise.
    """
    if len(claims) >= 24 or key not in claims:
        raise ValueError("a map of fewer than 24 entries that holds the open key")
    pairs = sorted(((cbor2.dumps(name), name) for name in claims), key=lambda pair: (len(pair[0]), pair[0]))
    head, tail = bytearray([0xA0 + len(claims)]), bytearray()
    out = head
    for encoded_key, name in pairs:
        out += encoded_key
        if name == key:
            out = tail
        else:
            out += cbor2.dumps(claims[name], canonical=True)
    return bytes(head), bytes(tail)
