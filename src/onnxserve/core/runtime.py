"""ONNX Runtime sessions: providers, session options, metadata and warm-up.

One :class:`ModelSession` wraps one ``onnxruntime.InferenceSession`` for one model version. It turns
graph inputs and outputs into :class:`~onnxserve.core.types.TensorSpec` and converts BYTES tensors
between onnxserve's ``bytes`` objects and the ``str`` objects that ONNX Runtime expects.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
from google.protobuf.message import DecodeError

from onnxserve.config import ExecutionProvider, SessionOptions
from onnxserve.core import datatypes
from onnxserve.core.types import TensorSpec, empty_like
from onnxserve.errors import InferenceError, InvalidInputError, ModelLoadError

log = logging.getLogger(__name__)

_ORT_INVALID_ARGUMENT: type[Exception] = ort.capi.onnxruntime_pybind11_state.InvalidArgument

_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
_EXEC_MODES = {
    "sequential": ort.ExecutionMode.ORT_SEQUENTIAL,
    "parallel": ort.ExecutionMode.ORT_PARALLEL,
}


def session_options(options: SessionOptions) -> ort.SessionOptions:
    """ONNX Runtime session options from onnxserve's config model."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = options.intra_op_num_threads
    so.inter_op_num_threads = options.inter_op_num_threads
    so.graph_optimization_level = _OPT_LEVELS[options.graph_optimization_level]
    so.execution_mode = _EXEC_MODES[options.execution_mode]
    so.log_severity_level = 3  # errors only: ONNX Runtime's warnings go to stderr, not our logs
    return so


def available_providers(requested: Sequence[ExecutionProvider], where: str) -> list[tuple[str, dict[str, Any]]]:
    """The requested providers this build of ONNX Runtime has, with CPU always last as the fallback."""
    have = set(ort.get_available_providers())
    chosen: list[tuple[str, dict[str, Any]]] = []
    for p in requested:
        if p.name in have:
            chosen.append((p.name, dict(p.options)))
        else:
            log.warning("%s: execution provider %s is not available here; falling back", where, p.name)
    if not any(name == "CPUExecutionProvider" for name, _ in chosen):
        chosen.append(("CPUExecutionProvider", {}))
    return chosen


def _spec(arg: Any, where: str) -> TensorSpec:
    dtype = datatypes.from_ort(arg.type, f"{where} tensor {arg.name!r}")
    dims = list(arg.shape) if arg.shape is not None else []
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in dims)
    names = tuple(d if isinstance(d, str) else None for d in dims)
    return TensorSpec(arg.name, dtype, shape, names)


def check_onnx_file(path: Path) -> None:
    """Refuse anything that is not a readable ONNX model, with a message that says why."""
    if not path.is_file():
        raise ModelLoadError(f"{path}: model file not found (expected model.onnx in the version folder)")
    try:
        onnx.load_model(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError) as e:
        raise ModelLoadError(f"{path}: not an ONNX model ({type(e).__name__}: {e})") from None


class ModelSession:
    """One ONNX Runtime session for one model version."""

    def __init__(
        self,
        path: Path,
        providers: Sequence[ExecutionProvider] = (),
        options: SessionOptions | None = None,
        name: str = "",
    ) -> None:
        self.path = path
        self.name = name or str(path)
        check_onnx_file(path)
        try:
            self._session = ort.InferenceSession(
                str(path),
                sess_options=session_options(options or SessionOptions()),
                providers=available_providers(providers, self.name),
            )
        except Exception as e:  # ONNX Runtime raises several unrelated types for a bad model
            raise ModelLoadError(f"{path}: ONNX Runtime cannot load the model: {e}") from None
        self.inputs: tuple[TensorSpec, ...] = tuple(_spec(a, "input") for a in self._session.get_inputs())
        self.outputs: tuple[TensorSpec, ...] = tuple(_spec(a, "output") for a in self._session.get_outputs())
        self.providers: list[str] = list(self._session.get_providers())
        log.info("%s: loaded on %s", self.name, ", ".join(self.providers))

    def run(
        self, feeds: Mapping[str, npt.NDArray[Any]], output_names: Sequence[str] | None = None
    ) -> dict[str, npt.NDArray[Any]]:
        """Run the model; BYTES inputs and outputs are ``bytes`` objects in ``object`` arrays."""
        names = list(output_names) if output_names else [o.name for o in self.outputs]
        ort_feeds = {name: _to_ort(name, array) for name, array in feeds.items()}
        try:
            results = self._session.run(names, ort_feeds)
        except _ORT_INVALID_ARGUMENT as e:
            # The graph refused these values (an index out of range, a reshape that cannot fit):
            # the request was well-formed but its data is not valid for this model.
            raise InvalidInputError(f"model {self.name} refused the input values: {_first_line(e)}") from e
        except Exception as e:  # ONNX Runtime's other error types are not part of its public API
            raise InferenceError(f"model {self.name} failed while running: {_first_line(e)}") from e
        return {name: _from_ort(value) for name, value in zip(names, results, strict=True)}

    def warmup(self) -> None:
        """One run on zero inputs with dynamic dims set to 1, so the first request is not the slow one."""
        try:
            self.run({spec.name: empty_like(spec) for spec in self.inputs})
        except InferenceError as e:
            # A graph can be valid and still refuse synthetic inputs (a reshape that needs real sizes).
            log.warning("%s: warm-up run skipped: %s", self.name, e.message)


def _to_ort(name: str, array: npt.NDArray[Any]) -> npt.NDArray[Any]:
    if array.dtype != np.object_:
        return array
    try:
        decoded: npt.NDArray[Any] = np.vectorize(
            lambda b: b.decode("utf-8") if isinstance(b, bytes) else str(b), otypes=[object]
        )(array)
        return decoded
    except UnicodeDecodeError:
        raise InvalidInputError(f"input {name!r}: BYTES elements must be UTF-8 text for this model") from None


def _from_ort(value: Any) -> npt.NDArray[Any]:
    array = np.asarray(value)
    if array.dtype == np.object_ or array.dtype.kind == "U":
        encoded: npt.NDArray[Any] = np.vectorize(
            lambda s: s.encode("utf-8") if isinstance(s, str) else bytes(s), otypes=[object]
        )(array)
        return encoded
    return array


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
