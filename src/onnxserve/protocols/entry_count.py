"""How many entries one part of a request may hold: inputs, outputs, parameters, named inputs.

A request is a handful of tensors with a few parameters each; a body that lists a million one-element
tensors or three million parameter keys costs the decoder seconds and a gigabyte for nothing a model
takes. Every protocol refuses more than :data:`MAX_ENTRIES` in any one list or object it walks (gRPC
before parsing, in ``v2_grpc.element_count``; the JSON codecs right after parsing, in the decoding
worker for large bodies), so the refusal costs no more than the parse and nothing travels back.
"""

from __future__ import annotations

from collections.abc import Sized

from onnxserve.errors import InvalidInputError

MAX_ENTRIES = 65536
"""The most entries a request or one of its tensors may hold in one list or object."""


def check_entries(items: Sized, what: str) -> None:
    """InvalidInputError when ``items`` (a list or object of the request called ``what``) holds too many."""
    if len(items) > MAX_ENTRIES:
        raise InvalidInputError(
            f"{what} holds {len(items)} entries; a request may hold at most {MAX_ENTRIES} in any list or "
            "object of tensors or parameters"
        )
