"""What a model says about itself before its graph: producer and opsets, named one way everywhere."""

from __future__ import annotations

import onnx

DEFAULT_DOMAIN = "ai.onnx"
"""The name shown for the default ONNX domain (``""`` in the file)."""


def producer(model: onnx.ModelProto) -> str:
    """``producer_name producer_version``, either part left out when empty ("" when both are)."""
    return " ".join(p for p in (model.producer_name, model.producer_version) if p)


def opsets(model: onnx.ModelProto) -> dict[str, int]:
    """The opset version each imported domain is at, the default domain named ``ai.onnx``."""
    return {o.domain or DEFAULT_DOMAIN: int(o.version) for o in model.opset_import}
