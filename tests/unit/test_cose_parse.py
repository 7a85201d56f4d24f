"""`gateway.schemes.cose.parse` on what cbor2 (and other encoders) produce: tagged and untagged,
and garbage — which gives the scheme's own error, never another exception."""

from __future__ import annotations

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.schemes.cose import CoseError, assemble, parse, protected_header


def test_tagged_envelope_parses() -> None:
    envelope = assemble(protected_header(-7, b"kid-1"), cbor2.dumps({"a": 1}), b"\x01" * 64)
    message = parse(envelope)
    assert (message.alg, message.kid, message.claims(), message.signature) == (-7, b"kid-1", {"a": 1}, b"\x01" * 64)
    untagged = cbor2.dumps([protected_header(-8, b"k"), {}, b"payload", b"sig"])
    assert parse(untagged).alg == -8


@given(st.binary(max_size=200))
def test_garbage_gives_only_cose_errors(data: bytes) -> None:
    try:
        parse(data)
    except CoseError:
        pass


def test_wrong_tag_is_refused() -> None:
    with pytest.raises(CoseError):
        parse(cbor2.dumps(cbor2.CBORTag(98, [b"", {}, b"", b""])))
