"""Frames on the serial link to a hard wallet (docs/spec.md §9, docs/device-protocol.md).

One frame carries one protocol message::

    frame   = COBS(body) 0x00
    body    = message-cbor crc32-be(message-cbor)      (at most MAX_FRAME_BYTES)

COBS (Consistent Overhead Byte Stuffing) removes every 0x00 from the body, so 0x00 never occurs
inside a frame and always ends one: a receiver that starts mid-frame, or meets line noise or a torn
frame, loses at most the frame it is in and is back in step at the next 0x00. Senders may put an
extra 0x00 before a frame to flush noise; empty frames are ignored.

Everything that can go wrong decoding a frame is a :class:`gateway.errors.FrameError`: the
:class:`FrameDecoder` never raises at all (it reports bad frames next to good ones), and
:func:`decode_frame` raises nothing else.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import cbor2
from cobs import cobs  # type: ignore[import-untyped]

from gateway.errors import FrameError

DELIMITER = b"\x00"
CRC_BYTES = 4
MAX_FRAME_BYTES = 64 * 1024
"""Largest body (CBOR message + CRC) a frame may carry; larger frames are refused, not buffered."""


def encoded_limit(max_frame: int = MAX_FRAME_BYTES) -> int:
    """Longest COBS encoding of a body of ``max_frame`` bytes (one code byte per 254 data bytes)."""
    return max_frame + max_frame // 254 + 1


def crc32(data: bytes) -> bytes:
    return zlib.crc32(data).to_bytes(CRC_BYTES, "big")


def encode_frame(message: Any, max_frame: int = MAX_FRAME_BYTES) -> bytes:
    """The bytes to put on the line for ``message`` (any CBOR-encodable value), delimiter included.

    Raises:
        FrameError: the message does not encode as CBOR, or its body exceeds ``max_frame``.
    """
    try:
        body = cbor2.dumps(message)
    except Exception as exc:  # cbor2 raises CBOREncodeError, TypeError, ValueError...
        raise FrameError(f"message does not encode as CBOR: {exc}") from None
    if len(body) + CRC_BYTES > max_frame:
        raise FrameError(f"message of {len(body)} bytes exceeds the {max_frame}-byte frame limit")
    return bytes(cobs.encode(body + crc32(body))) + DELIMITER


def decode_frame(encoded: bytes, max_frame: int = MAX_FRAME_BYTES) -> Any:
    """Decode one frame given without its delimiter.

    Returns:
        The CBOR message.
    Raises:
        FrameError: too long, bad COBS, too short, CRC mismatch, or not CBOR — never anything else.
    """
    if len(encoded) > encoded_limit(max_frame):
        raise FrameError(f"frame of {len(encoded)} encoded bytes exceeds the limit")
    if DELIMITER in encoded:
        raise FrameError("frame contains the delimiter")
    try:
        body = bytes(cobs.decode(encoded))
    except Exception as exc:  # cobs.DecodeError, and anything its C code might raise
        raise FrameError(f"bad COBS encoding: {exc}") from None
    if len(body) <= CRC_BYTES:
        raise FrameError(f"frame of {len(body)} bytes is too short")
    message, checksum = body[:-CRC_BYTES], body[-CRC_BYTES:]
    if crc32(message) != checksum:
        raise FrameError("CRC mismatch")
    try:
        return cbor2.loads(message)
    except Exception as exc:  # garbage with a valid CRC (a buggy peer): CBORDecodeError, ValueError, ...
        raise FrameError(f"frame is not CBOR: {exc}") from None


@dataclass(frozen=True)
class Frame:
    """One delimited frame as the decoder saw it: a message, or the reason it was dropped."""

    message: Any = None
    error: FrameError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class FrameDecoder:
    """Splits a byte stream into frames, incrementally; resynchronises on 0x00.

    Bytes may arrive in pieces of any size; :meth:`feed` returns the frames they complete. A frame
    that does not decode is returned as a :class:`Frame` with its error (the next frame is decoded
    normally). Bytes that run past the longest possible frame without a delimiter are dropped up to
    the next 0x00, so noise or a peer that never sends a delimiter cannot grow the buffer.
    """

    def __init__(self, max_frame: int = MAX_FRAME_BYTES) -> None:
        self.max_frame = max_frame
        self._limit = encoded_limit(max_frame)
        self._buffer = bytearray()
        self._discarding = False
        self.dropped = 0
        """Frames dropped so far (bad or oversized): a link-quality figure."""

    def feed(self, data: bytes) -> list[Frame]:
        frames: list[Frame] = []
        start = 0
        while start <= len(data):
            end = data.find(DELIMITER, start)
            piece = data[start:] if end < 0 else data[start:end]
            if not self._discarding:
                self._buffer += piece
                if len(self._buffer) > self._limit:
                    self._buffer.clear()
                    self._discarding = True
                    self.dropped += 1
                    frames.append(Frame(error=FrameError(f"no delimiter within {self._limit} bytes")))
            if end < 0:
                break
            if self._discarding:
                self._discarding = False  # back in step at this delimiter
            elif self._buffer:
                frames.append(self._decode(bytes(self._buffer)))
                self._buffer.clear()
            start = end + 1
        return frames

    def _decode(self, encoded: bytes) -> Frame:
        try:
            return Frame(message=decode_frame(encoded, self.max_frame))
        except FrameError as error:
            self.dropped += 1
            return Frame(error=error)

    @property
    def pending(self) -> int:
        """Bytes buffered towards the next frame."""
        return len(self._buffer)
