"""onnxserve: convert, optimize, inspect and serve ONNX models.

The public Python API is listed in ``__all__``; everything else is internal.
"""

from __future__ import annotations

import typing as _typing
from importlib import import_module as _import_module

from onnxserve.errors import (
    ConfigError,
    ErrorKind,
    ExportError,
    InferenceError,
    InvalidInputError,
    ModelLoadError,
    ModelNotFoundError,
    OnnxServeError,
    OptimizeError,
    UnavailableError,
)
from onnxserve.version import __version__

if _typing.TYPE_CHECKING:
    from onnxserve.config import ModelConfig, ServerConfig, load_config
    from onnxserve.core.registry import ModelRegistry
    from onnxserve.core.repository import scan_repository
    from onnxserve.core.runtime import ModelSession
    from onnxserve.core.service import InferenceService
    from onnxserve.core.types import InferenceRequest, InferenceResponse, Tensor, TensorSpec
    from onnxserve.predict import Pipeline
    from onnxserve.server.settings import ServerSettings

_LAZY: dict[str, str] = {
    "ModelConfig": "onnxserve.config",
    "ServerConfig": "onnxserve.config",
    "ServerSettings": "onnxserve.server.settings",
    "load_config": "onnxserve.config",
    "ModelRegistry": "onnxserve.core.registry",
    "scan_repository": "onnxserve.core.repository",
    "ModelSession": "onnxserve.core.runtime",
    "InferenceService": "onnxserve.core.service",
    "InferenceRequest": "onnxserve.core.types",
    "InferenceResponse": "onnxserve.core.types",
    "Tensor": "onnxserve.core.types",
    "TensorSpec": "onnxserve.core.types",
    "Pipeline": "onnxserve.predict",
}
"""Public names imported on first use, so ``import onnxserve.protocols...`` does not load ONNX Runtime."""


def __getattr__(name: str) -> _typing.Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'onnxserve' has no attribute {name!r}")
    value = getattr(_import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "ConfigError",
    "ErrorKind",
    "ExportError",
    "InferenceError",
    "InferenceRequest",
    "InferenceResponse",
    "InferenceService",
    "InvalidInputError",
    "ModelConfig",
    "ModelLoadError",
    "ModelNotFoundError",
    "ModelRegistry",
    "ModelSession",
    "OnnxServeError",
    "OptimizeError",
    "Pipeline",
    "ServerConfig",
    "ServerSettings",
    "Tensor",
    "TensorSpec",
    "UnavailableError",
    "__version__",
    "load_config",
    "scan_repository",
]
