"""What a model version may make the server read: files inside its own version folder, nothing else.

Checked before ONNX Runtime (or the tokenizer) opens anything:

- the version folder resolves inside the model's ``base_path`` (a symlinked version folder that leads
  elsewhere, including a sibling whose name merely starts the same, ``m_evil`` beside ``m``, is refused:
  paths are compared by their components, never as strings);
- a model file served without a version folder (``base_path`` is the file, or a folder holding one
  model file) reads only its own files: the model, the files named after it (``model.onnx.data``),
  the tokenizer and pipeline files beside it; each of those obeys the rules below, the rest of the
  folder is not read and not checked;
- every entry of the version folder is a regular file or a folder, or a symbolic link that resolves
  inside the folder; FIFOs, sockets and devices are refused (opening one could block the loader);
- regular files with more than one hard link are refused unless the model allows them
  (``allow_hardlinks``): a hard link is the same file as its other names, wherever they are, so there
  is no way to tell from inside the folder whether it "leads outside"; refusing them is the only
  check that holds (``cp -l`` or a deduplicating store make them legitimately; allow them per model);
- the ONNX file is parsed without its external data, and every tensor that names external data
  (initializers, Constant attributes, subgraphs and functions included) must name a relative path
  without ``..`` that resolves to a regular file inside the version folder, holding at least the bytes
  the tensor declares (CVE-2024-27318: external data read from anywhere on the disk);
- every tensor's declared size is checked against the bytes it carries, so a model that declares
  ``dims [2**40]`` and carries nothing is refused before anything is allocated for it.

What this does not cover: someone who can write to the repository while a version loads can swap a
file between the check and the read. The repository must be writable only by those trusted to deploy
models; these checks stop hostile *layouts* (and load-API names), not a concurrent writer.
"""

from __future__ import annotations

import math
import os
import stat
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path, PurePosixPath, PureWindowsPath

import onnx
from onnx import AttributeProto, GraphProto, TensorProto

from onnxserve.errors import ModelLoadError

MIN_IR_VERSION = 3
"""The first IR version with opset imports (ONNX 1.0); earlier ones were never released as a format."""

_BITS: dict[int, int] = {
    TensorProto.FLOAT: 32,
    TensorProto.UINT8: 8,
    TensorProto.INT8: 8,
    TensorProto.UINT16: 16,
    TensorProto.INT16: 16,
    TensorProto.INT32: 32,
    TensorProto.INT64: 64,
    TensorProto.BOOL: 8,
    TensorProto.FLOAT16: 16,
    TensorProto.DOUBLE: 64,
    TensorProto.UINT32: 32,
    TensorProto.UINT64: 64,
    TensorProto.COMPLEX64: 64,
    TensorProto.COMPLEX128: 128,
    TensorProto.BFLOAT16: 16,
    TensorProto.FLOAT8E4M3FN: 8,
    TensorProto.FLOAT8E4M3FNUZ: 8,
    TensorProto.FLOAT8E5M2: 8,
    TensorProto.FLOAT8E5M2FNUZ: 8,
    TensorProto.UINT4: 4,
    TensorProto.INT4: 4,
}
"""Bits per element of the fixed-size element types (raw and external data are packed)."""

_TYPED_FIELDS: dict[int, tuple[str, int]] = {
    TensorProto.FLOAT: ("float_data", 1),
    TensorProto.COMPLEX64: ("float_data", 2),
    TensorProto.DOUBLE: ("double_data", 1),
    TensorProto.COMPLEX128: ("double_data", 2),
    TensorProto.INT64: ("int64_data", 1),
    TensorProto.UINT32: ("uint64_data", 1),
    TensorProto.UINT64: ("uint64_data", 1),
    TensorProto.STRING: ("string_data", 1),
}
"""Where a tensor's values live when not in raw_data, and how many values one element takes
(every other fixed-size type keeps one element per int32_data value, or two for 4-bit types)."""


def _inside(path: Path, root: Path) -> bool:
    """Whether ``path`` is ``root`` or below it, by path components (``/m_evil`` is not inside ``/m``)."""
    return path == root or root in path.parents


MAX_FOLDER_DEPTH = 32
"""How deep folders may nest inside a version folder; a deeper tree is refused, not walked."""


def resolved(path: Path) -> Path | None:
    """Where ``path`` leads, or None when it cannot be resolved (a symbolic link loop)."""
    try:
        return path.resolve()
    except (RuntimeError, OSError):  # Python 3.11 raises RuntimeError for a loop, later versions OSError
        return None


def leads_outside(folder: Path, base_path: Path) -> bool:
    """Whether a version folder (a symlink, perhaps) resolves anywhere but strictly inside ``base_path``
    (or cannot be resolved at all): such a folder is never walked, by the loader or by the repository poll."""
    real_base = resolved(base_path)
    real = resolved(folder)
    return real is None or real_base is None or not _inside(real, real_base) or real == real_base


def folder_entries(folder: Path) -> Iterator[Path]:
    """Every entry below ``folder``, folders before what they hold, symbolic links not followed.

    Walked with a stack of its own (no recursion, so no depth makes it fail midway); a folder nested
    more than :data:`MAX_FOLDER_DEPTH` deep, or one that cannot be listed, is a :class:`ModelLoadError`."""
    pending = [(folder, 0)]
    while pending:
        current, depth = pending.pop()
        try:
            with os.scandir(current) as listing:
                entries = sorted(listing, key=lambda entry: entry.name)
        except OSError as e:
            shown = str(current.relative_to(folder)) or "."
            raise ModelLoadError(f"{shown!r} cannot be listed ({e.strerror})") from None
        for entry in entries:
            path = Path(entry.path)
            yield path
            if entry.is_dir(follow_symlinks=False):
                if depth >= MAX_FOLDER_DEPTH:
                    raise ModelLoadError(f"folders nest more than {MAX_FOLDER_DEPTH} deep; refused")
                pending.append((path, depth + 1))


def check_version_folder(
    folder: Path, base_path: Path, allow_hardlinks: bool = False, files: Sequence[Path] | None = None
) -> None:
    """Refuse a version folder that leads outside ``base_path`` or holds anything that could (see module).

    With ``files`` (a model file served without a version folder), only those files of ``folder`` are
    checked, and ``folder`` is the model's own folder."""
    try:
        if files is None:
            _check_version_folder(folder, base_path, allow_hardlinks)
        else:
            real = folder.resolve()
            for entry in files:
                _check_entry(entry, folder, real, allow_hardlinks)
    except ModelLoadError as e:
        raise ModelLoadError(f"{folder}: {e.message}") from None


def _check_version_folder(folder: Path, base_path: Path, allow_hardlinks: bool) -> None:
    if leads_outside(folder, base_path):
        if resolved(folder) is None:
            raise ModelLoadError(
                f"version folder {folder.name!r} is a symbolic link that cannot be resolved (a loop); refused"
            )
        raise ModelLoadError(f"version folder {folder.name!r} leads outside the model's base_path; refused")
    real = folder.resolve()
    for entry in folder_entries(folder):
        _check_entry(entry, folder, real, allow_hardlinks)


def _check_entry(entry: Path, folder: Path, real: Path, allow_hardlinks: bool) -> None:
    shown = str(entry.relative_to(folder))
    try:
        info = entry.lstat()
    except OSError:
        raise ModelLoadError(f"{shown!r} is missing") from None
    if stat.S_ISLNK(info.st_mode):
        target = resolved(entry)
        if target is None:
            raise ModelLoadError(f"{shown!r} is a symbolic link that cannot be resolved (a loop); refused")
        if not _inside(target, real):
            raise ModelLoadError(f"{shown!r} is a symbolic link that leads outside the version folder; refused")
        info = entry.stat()  # what it points to, inside the folder (checked as its own entry too)
    if stat.S_ISDIR(info.st_mode):
        return
    if not stat.S_ISREG(info.st_mode):
        raise ModelLoadError(f"{shown!r} is not a regular file (a FIFO, socket or device); refused")
    if info.st_nlink > 1 and not allow_hardlinks:
        raise ModelLoadError(
            f"{shown!r} has {info.st_nlink} hard links: its other names may lie outside the repository, "
            "so it is refused (copy the file, or set allow_hardlinks in the model's config)"
        )


def check_model(model: onnx.ModelProto, folder: Path) -> None:
    """Refuse a parsed model (external data not loaded) that is malformed or names data outside ``folder``."""
    if model.ByteSize() == 0:
        raise ModelLoadError("the file is empty: it holds no ONNX model")
    if model.ir_version < MIN_IR_VERSION:
        raise ModelLoadError(
            f"IR version {model.ir_version} is not a valid ONNX IR version (expected {MIN_IR_VERSION} or later)"
        )
    newest = onnx.defs.onnx_opset_version()
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version > newest:
            raise ModelLoadError(
                f"the model needs opset {opset.version} of the ONNX domain; this server knows opsets up to {newest}"
            )
    if not model.graph.output:
        raise ModelLoadError("the graph has no outputs: there is nothing to serve")
    real = folder.resolve()
    for where, tensor in model_tensors(model):
        _check_tensor(tensor, where, folder, real)


def model_tensors(model: onnx.ModelProto, *, main_initializers: bool = True) -> Iterator[tuple[str, TensorProto]]:
    """Every tensor a model carries, with where it is: initializers, attribute values, subgraphs, functions
    (all but the main graph's initializers when ``main_initializers`` is False)."""
    yield from _graph_tensors(model.graph, initializers=main_initializers)
    for function in model.functions:
        for node in function.node:
            yield from _attribute_tensors(node.attribute, f"function {function.name!r}")


def _graph_tensors(graph: GraphProto, initializers: bool = True) -> Iterator[tuple[str, TensorProto]]:
    for tensor in graph.initializer if initializers else ():
        yield f"initializer {tensor.name!r}", tensor
    for sparse in graph.sparse_initializer:
        yield f"sparse initializer {sparse.values.name!r}", sparse.values
        yield f"sparse initializer {sparse.values.name!r} indices", sparse.indices
    for node in graph.node:
        yield from _attribute_tensors(node.attribute, f"node {node.name or node.op_type!r}")


def _attribute_tensors(attributes: Iterable[AttributeProto], where: str) -> Iterator[tuple[str, TensorProto]]:
    for attribute in attributes:
        label = f"{where} attribute {attribute.name!r}"
        if attribute.type == AttributeProto.TENSOR:
            yield label, attribute.t
        elif attribute.type == AttributeProto.TENSORS:
            for tensor in attribute.tensors:
                yield label, tensor
        elif attribute.type == AttributeProto.SPARSE_TENSOR:
            yield label, attribute.sparse_tensor.values
        elif attribute.type == AttributeProto.GRAPH:
            yield from _graph_tensors(attribute.g)
        elif attribute.type == AttributeProto.GRAPHS:
            for graph in attribute.graphs:
                yield from _graph_tensors(graph)


def packed_bytes(tensor: TensorProto) -> int | None:
    """The bytes a tensor's values take packed (raw or external data), by its dims and element type; None
    for a type of no fixed size (strings, unknown types)."""
    bits = _BITS.get(tensor.data_type)
    return None if bits is None else math.ceil(math.prod(tensor.dims) * bits / 8)


def _check_tensor(tensor: TensorProto, where: str, folder: Path, real: Path) -> None:
    if any(d < 0 for d in tensor.dims):
        raise ModelLoadError(f"{where} declares a negative dimension {list(tensor.dims)}")
    elements = math.prod(tensor.dims)
    needed = packed_bytes(tensor)
    if tensor.data_location == TensorProto.EXTERNAL:
        _check_external(tensor, where, folder, real, needed)
        return
    if tensor.HasField("raw_data") or not elements:
        have = len(tensor.raw_data)
        if needed is not None and have < needed:
            raise ModelLoadError(f"{where} declares dims {list(tensor.dims)} ({needed} bytes) but carries {have} bytes")
        return
    field, per_element = _TYPED_FIELDS.get(tensor.data_type, ("int32_data", 1))
    values = len(getattr(tensor, field))
    expected = elements * per_element
    if tensor.data_type in (TensorProto.INT4, TensorProto.UINT4):
        expected = math.ceil(elements / 2)
    if values < expected:
        raise ModelLoadError(
            f"{where} declares dims {list(tensor.dims)} ({elements} elements) but carries {values} values"
        )


def _check_external(tensor: TensorProto, where: str, folder: Path, real: Path, needed: int | None) -> None:
    entries = {e.key: e.value for e in tensor.external_data}
    location = entries.get("location", "")
    if not location:
        raise ModelLoadError(f"{where} has external data without a location")
    posix, windows = PurePosixPath(location), PureWindowsPath(location)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or location.startswith(("/", "\\")):
        raise ModelLoadError(f"{where}: external data location {location!r} is an absolute path; refused")
    if ".." in posix.parts or ".." in windows.parts:
        raise ModelLoadError(f"{where}: external data location {location!r} leads out of the version folder; refused")
    target = folder / posix
    if not _inside(target.resolve(), real):
        raise ModelLoadError(
            f"{where}: external data location {location!r} resolves outside the version folder; refused"
        )
    try:
        info = target.stat()
    except OSError:
        raise ModelLoadError(f"{where}: external data file {location!r} is missing from the version folder") from None
    if not stat.S_ISREG(info.st_mode):
        raise ModelLoadError(f"{where}: external data {location!r} is not a regular file; refused")
    try:
        offset = int(entries.get("offset", "0"))
        length = int(entries["length"]) if "length" in entries else info.st_size - offset
    except ValueError:
        raise ModelLoadError(f"{where}: external data offset and length must be integers") from None
    if offset < 0 or length < 0 or offset + length > info.st_size:
        raise ModelLoadError(
            f"{where}: external data {location!r} asks for bytes {offset} to {offset + length}, "
            f"but the file holds {info.st_size}"
        )
    if needed is not None and length < needed:
        raise ModelLoadError(
            f"{where} declares dims {list(tensor.dims)} ({needed} bytes) but its external data holds {length}"
        )
