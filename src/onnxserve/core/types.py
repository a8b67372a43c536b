"""The internal request and response types every protocol converts to and from.

A tensor is a name, a :class:`~onnxserve.core.datatypes.DataType` and a numpy array whose shape is
the tensor's shape. BYTES tensors hold ``bytes`` objects in an ``object`` array.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from onnxserve.core.datatypes import DataType
from onnxserve.core.statistics import StatisticsSnapshot

if TYPE_CHECKING:
    from onnxserve.core.pipeline import PipelineSpec

Parameters = Mapping[str, Any]
"""Request and response parameters: string keys to bool, int, float or str values."""


@dataclass(frozen=True)
class Tensor:
    """A named tensor with its element type and its values."""

    name: str
    datatype: DataType
    data: npt.NDArray[Any]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.data.shape)


@dataclass(frozen=True)
class InferenceRequest:
    """One inference call, as every protocol hands it to the service."""

    model_name: str
    inputs: Sequence[Tensor]
    model_version: str | None = None  # a version number, a version label, or None for the default
    id: str | None = None
    outputs: Sequence[str] | None = None  # None: every output of the model
    parameters: Parameters = field(default_factory=dict)
    protocol: str = ""  # the front end it came through ("v2_rest", "v2_grpc", "tfserving_rest", "openai", "tei")
    time_left: float | None = None  # seconds the transport still allows (a gRPC deadline); None: no limit


@dataclass(frozen=True)
class InferenceResponse:
    """The outputs of one inference call."""

    model_name: str
    model_version: str
    outputs: Sequence[Tensor]
    id: str | None = None
    parameters: Parameters = field(default_factory=dict)


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output: name, datatype and shape with -1 for dynamic dimensions."""

    name: str
    datatype: DataType
    shape: tuple[int, ...]
    dim_names: tuple[str | None, ...] = ()  # symbolic names of dynamic dims, where the graph has them

    @property
    def is_dynamic(self) -> bool:
        return any(d < 0 for d in self.shape)

    def example_shape(self, dynamic: int = 1) -> tuple[int, ...]:
        """A concrete shape that fits this spec, with every dynamic dim set to ``dynamic``."""
        return tuple(dynamic if d < 0 else d for d in self.shape)


@dataclass(frozen=True)
class ModelMetadata:
    """What a client may know about a served model version."""

    name: str
    version: str  # the version these inputs and outputs belong to
    versions: Sequence[str]  # every served version
    platform: str
    inputs: Sequence[TensorSpec]
    outputs: Sequence[TensorSpec]
    task: str | None = None  # the text pipeline's task, for models that carry a tokenizer
    pipeline: PipelineSpec | None = None  # the whole text pipeline spec (pooling, labels, max length, ...)
    vocabulary_size: int = 0  # the tokenizer's token ids are below this (0: no tokenizer)
    text_characters: int = 0  # each text is cut to this many characters before it is tokenized (0: no tokenizer)


@dataclass(frozen=True)
class ModelConfiguration:
    """The Triton-style model configuration that ``perf_analyzer`` and other clients read.

    With ``max_batch_size > 0`` the input and output dims leave out the batch dimension.
    """

    name: str
    platform: str
    max_batch_size: int
    inputs: Sequence[TensorSpec]
    outputs: Sequence[TensorSpec]


@dataclass(frozen=True)
class ServerMetadata:
    name: str
    version: str
    extensions: Sequence[str]


class ModelState(enum.Enum):
    LOADING = "LOADING"
    READY = "READY"
    UNLOADING = "UNLOADING"  # takes no new requests; unloaded once its in-flight requests finish
    UNAVAILABLE = "UNAVAILABLE"  # failed to load, or unloaded


@dataclass(frozen=True)
class VersionStatistics:
    name: str
    version: str
    statistics: StatisticsSnapshot


@dataclass(frozen=True)
class IndexEntry:
    """One model version in the repository index."""

    name: str
    version: str
    state: str
    reason: str = ""


def empty_like(spec: TensorSpec, dynamic: int = 1) -> npt.NDArray[Any]:
    """A zero (or empty-string) array that fits ``spec``; used for warm-up runs."""
    shape = spec.example_shape(dynamic)
    if spec.datatype.is_bytes:
        return np.full(shape, b"", dtype=object)
    return np.zeros(shape, dtype=spec.datatype.numpy)


BYTES_ELEMENT_OVERHEAD = 4
"""Bytes one BYTES element costs beside its own: its length prefix on the binary wire (and far more as a
Python object and a JSON string), so that many tiny elements are not free."""


def payload_bytes(array: npt.NDArray[Any]) -> int:
    """The bytes a tensor's values take on the wire before any encoding: numpy's ``nbytes``, or for BYTES
    (``object`` arrays of ``bytes``) the total length of the elements plus ``BYTES_ELEMENT_OVERHEAD`` each."""
    if array.dtype != np.object_:
        return int(array.nbytes)
    return sum(len(item) if isinstance(item, (bytes, str)) else 8 for item in array.flat) + (
        BYTES_ELEMENT_OVERHEAD * array.size
    )
