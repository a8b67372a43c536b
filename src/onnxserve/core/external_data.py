"""External data a session reads from memory the server owns, never from the version folder's files.

Given a model file, ONNX Runtime maps (mmap) its external data files and reads the weights from the
mapping for as long as the session lives. A served version's file that the operator then overwrites in
place changes under the session: a shorter file (``cp`` truncates first) ends the whole process with
SIGBUS at the next run that reads a page past its new end, and a same-size one (``rsync --inplace``)
serves the new weights under the old graph, never loaded together (outside attack rt25 F1).

So the loader reads each tensor's external data once, at load, into arrays of its own
(:func:`take_external_data`), and hands them to ONNX Runtime, which copies them into the session while
it is made (``SessionOptions.add_external_initializers``); the arrays are freed as soon as the session
exists, and nothing of the version folder stays mapped. ONNX Runtime takes such arrays for the main
graph's initializers only: every other tensor with external data (a subgraph's initializers, attribute
values, sparse initializers, 4-bit element types) is embedded in the model in memory instead.

The cost: while the session is made, the weights are held twice (these arrays and ONNX Runtime's copy);
once it is made, once, in the process's own memory rather than in the page cache.
"""

from __future__ import annotations

from io import FileIO
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto

from onnxserve.core.confinement import model_tensors, packed_bytes
from onnxserve.errors import ModelLoadError

_HANDED_TYPES: dict[int, type[np.generic]] = {
    TensorProto.FLOAT: np.float32,
    TensorProto.DOUBLE: np.float64,
    TensorProto.FLOAT16: np.float16,
    TensorProto.BFLOAT16: np.uint16,
    TensorProto.INT8: np.int8,
    TensorProto.UINT8: np.uint8,
    TensorProto.INT16: np.int16,
    TensorProto.UINT16: np.uint16,
    TensorProto.INT32: np.int32,
    TensorProto.UINT32: np.uint32,
    TensorProto.INT64: np.int64,
    TensorProto.UINT64: np.uint64,
    TensorProto.BOOL: np.bool_,
    TensorProto.COMPLEX64: np.complex64,
    TensorProto.COMPLEX128: np.complex128,
    TensorProto.FLOAT8E4M3FN: np.uint8,
    TensorProto.FLOAT8E4M3FNUZ: np.uint8,
    TensorProto.FLOAT8E5M2: np.uint8,
    TensorProto.FLOAT8E5M2FNUZ: np.uint8,
}
"""Element types handed to ONNX Runtime as arrays, each with a numpy type of its size (ONNX Runtime takes
the ONNX type beside the array: bfloat16 and float8 have no numpy type). Others are embedded."""


class Initializer(NamedTuple):
    """A main-graph initializer's values, read from its external data file."""

    array: npt.NDArray[Any]
    element_type: int  # TensorProto.DataType


def has_external_data(model: onnx.ModelProto) -> bool:
    """Whether any tensor of ``model`` keeps its values in an external data file."""
    return any(tensor.data_location == TensorProto.EXTERNAL for _, tensor in model_tensors(model))


def take_external_data(model: onnx.ModelProto, folder: Path, where: str) -> dict[str, Initializer]:
    """Read every external tensor of ``model`` (parsed without its external data; its locations checked by
    ``core.confinement``) from ``folder``, once: the main graph's initializers are returned as arrays, by
    name, for ONNX Runtime to copy; every other one is embedded in ``model``, which is changed in place.

    A file that no longer holds the bytes a tensor names (changed since the check) is a
    :class:`ModelLoadError` naming ``where``."""
    reader = _Reader(folder, where)
    taken: dict[str, Initializer] = {}
    try:
        for tensor in model.graph.initializer:
            numpy_type = _HANDED_TYPES.get(tensor.data_type)
            if tensor.data_location != TensorProto.EXTERNAL or numpy_type is None:
                continue
            data = reader.read(tensor, f"initializer {tensor.name!r}")
            taken[tensor.name] = Initializer(data.view(numpy_type).reshape(tuple(tensor.dims)), tensor.data_type)
        for label, tensor in model_tensors(model, main_initializers=False):
            if tensor.data_location == TensorProto.EXTERNAL:
                _embed(tensor, reader.read(tensor, label))
        for tensor in model.graph.initializer:
            if tensor.data_location == TensorProto.EXTERNAL and tensor.name not in taken:
                _embed(tensor, reader.read(tensor, f"initializer {tensor.name!r}"))
        return taken
    except BaseException:
        taken.clear()  # a refusal's traceback keeps this frame: it must not keep what was read
        raise
    finally:
        reader.close()


def _embed(tensor: TensorProto, data: npt.NDArray[np.uint8]) -> None:
    tensor.raw_data = data.tobytes()
    del tensor.external_data[:]
    tensor.data_location = TensorProto.DEFAULT


class _Reader:
    """Reads tensors' external data from the files of one folder, each file opened once, each byte range
    read once (tensors that share one range share the array)."""

    def __init__(self, folder: Path, where: str) -> None:
        self._folder = folder
        self._where = where
        self._files: dict[str, FileIO] = {}
        self._ranges: dict[tuple[str, int, int], npt.NDArray[np.uint8]] = {}

    def read(self, tensor: TensorProto, label: str) -> npt.NDArray[np.uint8]:
        entries = {e.key: e.value for e in tensor.external_data}
        location = entries.get("location", "")
        offset = int(entries.get("offset", "0"))
        file = self._file(location, label)
        count = packed_bytes(tensor)
        if count is None:
            count = int(entries["length"]) if "length" in entries else _size(file) - offset
        key = (location, offset, count)
        found = self._ranges.get(key)
        if found is None:
            found = self._ranges[key] = self._read_range(file, offset, count, location, label)
        return found

    def _file(self, location: str, label: str) -> FileIO:
        file = self._files.get(location)
        if file is None:
            try:
                file = self._files[location] = FileIO(self._folder / PurePosixPath(location), "rb")
            except OSError as e:
                raise ModelLoadError(
                    f"{self._where}: {label}: external data file {location!r} cannot be read ({e.strerror})"
                ) from None
        return file

    def _read_range(self, file: FileIO, offset: int, count: int, location: str, label: str) -> npt.NDArray[np.uint8]:
        try:
            data = np.empty(count, dtype=np.uint8)
        except MemoryError:
            raise ModelLoadError(
                f"{self._where}: {label}: the process has no memory to read its {count} bytes of external data now"
            ) from None
        view = data.data
        done = 0
        try:
            file.seek(offset)
            while done < count:
                got = file.readinto(view[done:])
                if not got:
                    raise ModelLoadError(
                        f"{self._where}: {label}: external data file {location!r} ended at byte {offset + done}, "
                        f"before the {count} bytes from {offset} it holds (the file changed during the load)"
                    )
                done += got
        except OSError as e:
            raise ModelLoadError(
                f"{self._where}: {label}: external data file {location!r} cannot be read ({e.strerror})"
            ) from None
        finally:
            view.release()
        return data

    def close(self) -> None:
        for file in self._files.values():
            file.close()
        self._files.clear()
        self._ranges.clear()


def _size(file: FileIO) -> int:
    return file.seek(0, 2)
