"""Compressed request bytes (gzip, deflate) inflated within the server's limits, off the event loop.

Both an HTTP body (``Content-Encoding``) and a gRPC message (``grpc-encoding``) may come compressed, and a
few KB of gzip may inflate to the whole limit: 61 KB make 60 MiB. :func:`inflate` makes at most
``INLINE`` bytes on the event loop, then ``STEP_BYTES`` at a time in the codec threads (two at once), and
hands each piece to its caller, which counts it (in-flight budget, size limit) before the next is made;
at most one byte past the room is ever made. (Outside attack rt33: 16 HTTP bodies of 61 KB inflated whole
on the event loop held probes 3.1 s; 32 gRPC messages inflated by grpc itself, 6.6 s.)
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

from onnxserve.errors import InvalidInputError
from onnxserve.protocols import offload
from onnxserve.protocols.inflight import no_memory

ENCODINGS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
"""Accepted encodings and the zlib window bits that read them (gzip header; zlib header)."""

INLINE = offload.INLINE_BYTES
"""Bytes made on the event loop before the rest goes to the codec threads."""

STEP_BYTES = 4 * 1024 * 1024
"""Bytes made at a time in a codec thread, each piece counted by the caller before the next."""

GZIP_MEMBERS = 64
"""The most gzip members one body may hold (gzip and tritonclient write one): each is decoded with a fresh
decoder, and the rest of the input is copied after each, so a body of 20-byte empty members cost time by the
square of its size (outside attack rt33: eight 32 MiB bodies of them took 43 s each, probes 0.9 s)."""


class Inflater:
    """A streaming gzip/deflate decoder that makes at most as many bytes as it is asked for at a time,
    keeping the rest of its input for the next call."""

    def __init__(self, encoding: str, what: str) -> None:
        self.encoding = encoding
        self.what = what  # "request body", "gRPC message": named in refusals
        self._decoder = zlib.decompressobj(wbits=ENCODINGS[encoding])
        self._pending = b""  # compressed bytes not decoded yet
        self._members = 1

    @property
    def pending(self) -> bool:
        """Whether some of the input is not decoded yet."""
        return bool(self._pending)

    def feed(self, data: bytes, most: int) -> bytes:
        """Decode what is pending and then ``data``, at most ``most`` bytes of output."""
        data = self._pending + data if self._pending else data
        out: list[bytes] = []
        produced = 0
        try:
            while data and produced < most:
                if self._decoder.eof:
                    if self.encoding != "gzip":
                        raise InvalidInputError(f"the deflate {self.what} has data after its end")
                    self._members += 1  # gzip may hold several members
                    if self._members > GZIP_MEMBERS:
                        raise InvalidInputError(
                            f"the gzip {self.what} holds more than {GZIP_MEMBERS} members; compress it as one"
                        )
                    self._decoder = zlib.decompressobj(wbits=ENCODINGS["gzip"])
                piece = self._decoder.decompress(data, most - produced)
                out.append(piece)
                produced += len(piece)
                data = self._decoder.unused_data if self._decoder.eof else self._decoder.unconsumed_tail
            joined = b"".join(out)
        except zlib.error:
            raise InvalidInputError(f"the {self.what} is not valid {self.encoding} data") from None
        except MemoryError:  # zlib's output buffer, under a memory limit: UNKNOWN / 500 before (outside attack rt57)
            out.clear()
            raise no_memory(f"to inflate this {self.what}") from None
        self._pending = data
        return joined

    def finish(self) -> None:
        if not self._decoder.eof:
            raise InvalidInputError(f"the {self.encoding} {self.what} ends before its compressed data does")


async def inflate(inflater: Inflater, data: bytes, room: int, counted: Callable[[bytes], None]) -> None:
    """Decode ``data`` (and what ``inflater`` kept of earlier input), handing each piece to ``counted``, which
    may refuse (raise); at most ``room`` + 1 bytes are made in all, so a caller refuses past its room."""
    made = 0
    piece = inflater.feed(data, min(INLINE, room + 1))
    while True:
        made += len(piece)
        counted(piece)
        if not inflater.pending or made > room:
            return
        piece = await offload.convert(STEP_BYTES, inflater.feed, b"", min(STEP_BYTES, room + 1 - made))


def message_encoding(raw: bytes) -> str | None:
    """How a gRPC request message was compressed by its client, or None: sent plain (a protobuf message).

    grpc tells a handler neither the message's compressed flag nor its call's ``grpc-encoding`` once the
    server has turned grpc's own inflation off (``grpc.per_message_decompression``), so the message's first
    bytes say: gzip's begin 1f 8b, which no protobuf message does (its first byte would name a field of wire
    type 7, which does not exist); deflate's (the zlib format) with a header naming method 8 whose two bytes
    are a multiple of 31. A protobuf message may look like that; it will not inflate cleanly (the zlib
    stream ends with a checksum of what it holds), and is then read as sent."""
    if raw[:2] == b"\x1f\x8b":
        return "gzip"
    zlib_header = len(raw) >= 2 and raw[0] & 0x0F == 8 and raw[0] >> 4 <= 7 and not raw[1] & 0x20
    return "deflate" if zlib_header and ((raw[0] << 8) | raw[1]) % 31 == 0 else None
