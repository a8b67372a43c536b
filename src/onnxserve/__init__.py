"""onnxserve: convert, optimize, inspect and serve ONNX models.

The public Python API is listed in ``__all__``; everything else is internal.
"""

from __future__ import annotations

__version__ = "0.1.0"

from onnxserve.config import ModelConfig, ServerConfig, load_config
from onnxserve.core.registry import ModelRegistry
from onnxserve.core.repository import scan_repository
from onnxserve.core.runtime import ModelSession
from onnxserve.core.service import InferenceService
from onnxserve.core.types import InferenceRequest, InferenceResponse, Tensor, TensorSpec
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
from onnxserve.predict import Pipeline
from onnxserve.server.settings import ServerSettings

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
