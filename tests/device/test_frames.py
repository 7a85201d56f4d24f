"""Frames and protocol messages: round trips, and fuzzing of the decoder with random bytes,
truncation and bit flips — only the protocol's own errors, resynchronisation at the next 0x00,
no crash and no hang."""

from __future__ import annotations

import zlib

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.errors import FrameError
from gateway.hardwallet.frames import (
    DELIMITER,
    MAX_FRAME_BYTES,
    FrameDecoder,
    decode_frame,
    encode_frame,
    encoded_limit,
)
from gateway.hardwallet.protocol import (
    answer_message,
    parse_request,
    parse_response,
    refusal_message,
    request_message,
)
from gateway.hardwallet.simulator import SimulatedDevice

FUZZ = settings(max_examples=400, deadline=1000, suppress_health_check=[HealthCheck.too_slow])

cbor_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=40) | st.binary(max_size=200),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20,
)
messages = st.dictionaries(st.text(min_size=1, max_size=12), cbor_values, max_size=6)


def test_frame_layout() -> None:
    frame = encode_frame({"v": 1, "id": 7, "op": "info"})
    assert frame.endswith(DELIMITER) and DELIMITER not in frame[:-1]
    body = cbor2.dumps({"v": 1, "id": 7, "op": "info"})
    from cobs import cobs  # type: ignore[import-untyped]

    assert cobs.decode(frame[:-1]) == body + zlib.crc32(body).to_bytes(4, "big")
    assert decode_frame(frame[:-1]) == {"v": 1, "id": 7, "op": "info"}


def test_oversized_messages_are_refused_both_ways() -> None:
    with pytest.raises(FrameError):
        encode_frame({"blob": b"x" * MAX_FRAME_BYTES})
    with pytest.raises(FrameError):
        decode_frame(b"\x01" * (encoded_limit() + 1))
    decoder = FrameDecoder()
    results = decoder.feed(b"\x01" * (encoded_limit() + 10))
    assert len(results) == 1 and not results[0].ok and decoder.pending == 0
    assert decoder.feed(b"\x01" * 100) == []  # still dropping up to the next delimiter
    frames = decoder.feed(DELIMITER + encode_frame({"after": True}))
    assert [f.message for f in frames if f.ok] == [{"after": True}]


@FUZZ
@given(st.binary(max_size=2048))
def test_decode_frame_raises_only_frame_errors(data: bytes) -> None:
    try:
        decode_frame(data)
    except FrameError:
        pass


@FUZZ
@given(st.lists(st.binary(max_size=700), max_size=12))
def test_decoder_never_raises_on_random_chunks(chunks: list[bytes]) -> None:
    decoder = FrameDecoder()
    for chunk in chunks:
        for frame in decoder.feed(chunk):
            assert frame.ok or isinstance(frame.error, FrameError)
    assert decoder.pending <= encoded_limit()


@FUZZ
@given(st.lists(messages, min_size=1, max_size=5), st.binary(max_size=300), st.integers(1, 64))
def test_resynchronises_after_noise(batch: list[dict[str, object]], noise: bytes, piece: int) -> None:
    """Whatever noise came before, every frame after the next delimiter decodes — fed in any pieces."""
    stream = noise + DELIMITER + b"".join(encode_frame(m) for m in batch)
    decoder = FrameDecoder()
    decoded = []
    for start in range(0, len(stream), piece):
        decoded += [f.message for f in decoder.feed(stream[start:start + piece]) if f.ok]
    assert decoded[-len(batch):] == batch


@FUZZ
@given(messages, messages, st.data())
def test_torn_frame_is_dropped_and_the_next_one_decodes(torn: dict[str, object], whole: dict[str, object],
                                                        data: st.DataObject) -> None:
    frame = encode_frame(torn)
    cut = data.draw(st.integers(1, len(frame) - 2))
    decoder = FrameDecoder()
    results = decoder.feed(frame[:cut] + DELIMITER + encode_frame(whole))
    assert [r.message for r in results if r.ok] == [whole]
    assert all(isinstance(r.error, FrameError) for r in results if not r.ok)


@FUZZ
@given(messages, st.data())
def test_bit_flips_are_detected(message: dict[str, object], data: st.DataObject) -> None:
    encoded = bytearray(encode_frame(message)[:-1])
    position = data.draw(st.integers(0, len(encoded) - 1))
    encoded[position] ^= 1 << data.draw(st.integers(0, 7))
    if 0 in encoded:  # the flip made a delimiter: two frames, neither whole
        results = FrameDecoder().feed(bytes(encoded) + DELIMITER)
        assert all(r.message == message or not r.ok for r in results)
        return
    with pytest.raises(FrameError):
        decode_frame(bytes(encoded))


@FUZZ
@given(cbor_values)
def test_protocol_parsers_raise_only_frame_errors(value: object) -> None:
    for parser in (parse_request, parse_response):
        try:
            parser(value)
        except FrameError:
            pass


def test_messages_round_trip() -> None:
    request = parse_request(request_message(5, "pay", {"payee": "dev-b", "amount": 10}))
    assert (request.id, request.op, request.arguments) == (5, "pay", {"payee": "dev-b", "amount": 10})
    response = parse_response(answer_message(5, {"counter": 1}))
    assert response.ok and response.result == {"counter": 1}
    refusal = parse_response(refusal_message(5, "cap", "too much"))
    assert not refusal.ok and (refusal.error_code, refusal.error_message) == ("cap", "too much")
    with pytest.raises(FrameError):
        request_message(1, "info", {"id": 2})


@settings(max_examples=150, deadline=2000)
@given(cbor_values)
def test_simulator_answers_any_message_without_raising(value: object) -> None:
    device = SIMULATOR
    answer = device.handle(value)
    assert answer is None or isinstance(answer, dict)
    if isinstance(value, dict) and isinstance(value.get("op"), str) and isinstance(value.get("id"), int):
        assert answer is None or answer["id"] == value["id"]


SIMULATOR = SimulatedDevice.create()


def test_simulator_refuses_other_versions_and_unknown_ops() -> None:
    answer = SIMULATOR.handle({"v": 2, "id": 1, "op": "info"})
    assert answer is not None and answer["ok"] is False and answer["error"]["code"] == "unsupported-version"
    answer = SIMULATOR.handle({"v": 1, "id": 2, "op": "format-disk"})
    assert answer is not None and answer["error"]["code"] == "unknown-op"
    answer = SIMULATOR.handle({"v": 1, "id": 3, "op": "pay", "payee": "x", "amount": "1"})
    assert answer is not None and answer["error"]["code"] == "bad-request"
