"""How the OpenAI-compatible and TEI routes name a model: one string that may pick a version or a label.

``name`` is the model's default version (its highest ready one), ``name:3`` version 3 and
``name@stable`` the version labelled ``stable`` (labels come from the server config's
``version_labels``). A TF Serving or V2 client names versions in the path instead.
"""

from __future__ import annotations

from onnxserve.errors import InvalidInputError


def parse_model_id(model: str) -> tuple[str, str | None]:
    """(name, version number or label or None) of a model id such as ``minilm``, ``minilm:2``, ``minilm@prod``."""
    name, version = model, None
    if "@" in model:
        name, _, version = model.rpartition("@")
    elif ":" in model:
        name, _, version = model.rpartition(":")
        if not version.isdigit():
            raise InvalidInputError(
                f"model {model!r}: a version after ':' is a number (name:3); a label goes after '@'"
            )
    if not name or version == "":
        raise InvalidInputError(f"model {model!r} is not a model id: use NAME, NAME:VERSION or NAME@LABEL")
    return name, version
