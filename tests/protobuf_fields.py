"""Protobuf wire bytes made by hand, for messages protobuf itself will not write (a map's key sent many times)."""

from __future__ import annotations


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited field ``number`` (under 16) holding ``payload``: its tag, its length, the bytes."""
    size = len(payload)
    length = bytearray()
    while True:
        length.append(size & 0x7F | (0x80 if size > 0x7F else 0))
        size >>= 7
        if not size:
            break
    return bytes([number << 3 | 2]) + bytes(length) + payload
