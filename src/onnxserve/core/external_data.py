"""External data a session reads from a private copy the server made, never from the version folder's files.

Given a model file, ONNX Runtime maps (mmap) its external data files and reads the weights from the
mapping for as long as the session lives. A served version's file that the operator then overwrites in
place changes under the session: a shorter file (``cp`` truncates first) ends the whole process with
SIGBUS at the next run that reads a page past its new end, and a same-size one (``rsync --inplace``)
serves the new weights under the old graph, never loaded together (outside attack rt25 F1).

So the loader copies the byte ranges the tensors name, once each, into private files of its own
(:func:`private_copy`: a fresh ``0700`` folder under the temporary folder, ``TMPDIR``; the kernel copies,
no byte passes through the process), points every external tensor of the model in memory at them, lets
ONNX Runtime map them as it would the version's files, and removes them as soon as the session exists:
the session's mappings are then the only way to them, so nothing the operator does to the version
folder (or to the temporary folder) reaches the weights. Tensors that name the same bytes map the same
pages of the copy, as they mapped the same pages of the file before, and subgraph initializers are mapped
like the main graph's: a version costs what it cost mapped (pages of a file, in the page cache, that the
kernel reads back when they are dropped, or in memory when the temporary folder is a tmpfs), plus the
copy's room in the temporary folder for as long as the session lives.

Where no private copy can be made (no room, a read-only temporary folder, no ``sendfile``), the loader
falls back to reading each tensor's external data into arrays of its own (:func:`take_external_data`),
handed to ONNX Runtime, which copies them into the session while it is made
(``SessionOptions.add_external_initializers``). ONNX Runtime takes such arrays for the main graph's
initializers only: every other tensor with external data (a subgraph's initializers, attribute values,
sparse initializers, 4-bit element types) is embedded in the model in memory instead, at several times
its size while the session is made (outside attack rt26 F3).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from io import FileIO
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto

from onnxserve.core.confinement import model_tensors, packed_bytes
from onnxserve.errors import FilesChangedError, ModelLoadError

log = logging.getLogger(__name__)

PRIVATE_COPY_PREFIX = "onnxserve-weights-"
"""How the private folders of the loads under way are named in the temporary folder."""

LOCK_NAME = "lock"
"""The file of a private folder its load holds a lock on (``flock``) until the folder is removed: a folder
whose lock nobody holds was left by a process that ended mid-load, and the next load removes it."""

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


@contextlib.contextmanager
def private_copy(
    model: onnx.ModelProto, folder: Path, where: str, folder_id: FileId | None = None
) -> Iterator[Path | None]:
    """Copy the external data every tensor of ``model`` names (parsed without it; its locations checked by
    ``core.confinement``) from ``folder`` into private files, and point those tensors at them (``model`` is
    changed in place); yields the private folder, for ONNX Runtime to map the files from while the session
    is made, and removes it when the block ends. Each file's named byte ranges are copied once, at their own
    offsets (what no tensor names is a hole), so a copy never holds more than its file.

    Yields None, ``model`` unchanged, where no private copy can be made here (see the module docstring).
    A file that no longer holds the bytes a tensor names (changed since the check), and ``folder`` no longer
    the folder ``folder_id`` names (see :func:`check_same_folder`), are a :class:`ModelLoadError` naming
    ``where``."""
    tensors = [(label, t) for label, t in model_tensors(model) if t.data_location == TensorProto.EXTERNAL]
    lock = -1
    try:
        parent = Path(tempfile.gettempdir())
        remove_abandoned_copies(parent)
        private = Path(tempfile.mkdtemp(prefix=PRIVATE_COPY_PREFIX, dir=parent)).resolve()
    except OSError as e:
        log.warning("%s: no private copy of its external data (%s); reading it into memory instead", where, e)
        yield None
        return
    try:
        try:
            lock = _locked(private)
            names = _copy_ranges(tensors, folder, private, where)
            if names is not None:
                check_same_folder(folder, folder_id, where)
        except OSError as e:  # the lock, or the folder removed under it: not the model's fault
            log.warning("%s: no private copy of its external data (%s); reading it into memory instead", where, e)
            names = None
        if names is None:
            shutil.rmtree(private, ignore_errors=True)
            yield None
            return
        for _, tensor in tensors:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = names[entry.value]
        yield private
    finally:
        shutil.rmtree(private, ignore_errors=True)  # ONNX Runtime's mappings keep what the session uses
        if lock >= 0:
            os.close(lock)


def _locked(private: Path) -> int:
    """The lock file of ``private``, made and locked under another name, then renamed: another process's
    :func:`remove_abandoned_copies` never finds it unlocked (outside attack rt31: a sweeper beside 150
    loads took the lock between its creation and its ``flock`` and removed 3 loads' copies)."""
    making = private / f"{LOCK_NAME}.new"
    lock = os.open(making, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(making, private / LOCK_NAME)
    except OSError:
        os.close(lock)
        raise
    return lock


def remove_abandoned_copies(parent: Path) -> None:
    """Remove the private folders in ``parent`` that a process which ended mid-load left behind: this user's
    folders named so whose lock nobody holds (a load under way holds its own)."""
    with os.scandir(parent) as entries:
        found = [e for e in entries if e.name.startswith(PRIVATE_COPY_PREFIX) and e.is_dir(follow_symlinks=False)]
    for entry in found:
        try:
            if entry.stat(follow_symlinks=False).st_uid != os.getuid():
                continue
            lock = os.open(Path(entry.path) / LOCK_NAME, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:  # gone, or being made this instant (no lock yet): not ours to judge
            continue
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: a load under way
            continue
        finally:
            os.close(lock)
        log.info("removing %s, left by a load that never finished", entry.path)
        shutil.rmtree(entry.path, ignore_errors=True)


FileId = tuple[int, int]
"""A file as the system knows it, whatever path names it: its device and inode."""


def _file_id(fd: int) -> FileId:
    found = os.fstat(fd)
    return found.st_dev, found.st_ino


def folder_identity(folder: Path) -> FileId | None:
    """The folder ``folder`` names now (None: none): taken before a load reads its model file."""
    try:
        found = os.stat(folder)
    except OSError:
        return None
    return found.st_dev, found.st_ino


def check_same_folder(folder: Path, before: FileId | None, where: str) -> None:
    """Refuse a load during which ``folder`` came to name another folder than ``before``: the documented
    deploy, a new version folder moved over the old one, done while a load ran made a version of the old
    folder's model and first files and the new folder's later ones (outside attack rt35: load 200, served
    until the next load). Checked once every file the load reads is open."""
    if before is not None and folder_identity(folder) != before:
        raise FilesChangedError(
            f"{where}: the version folder was replaced while it loaded (the files changed during the load); "
            "load it again"
        )


FileState = tuple[int, int, int]
"""What changes when a file is written: its size, its modification and its status change times (ns)."""


def _state(fd: int) -> FileState:
    found = os.fstat(fd)
    return found.st_size, found.st_mtime_ns, found.st_ctime_ns


def _check_unchanged(before: FileState, fd: int, where: str, location: str) -> None:
    """Refuse a load whose external data file was written while it was copied or read: what was taken of
    it may mix the old and the new bytes (outside attack rt31: a same-size overwrite, ``dd conv=notrunc``,
    0.1 s into the copy of an 800 MB file served old values at some offsets and new at others)."""
    if _state(fd) != before:
        raise FilesChangedError(
            f"{where}: external data file {location!r} was written while the load read it (the file changed "
            "during the load); load it again once it is written"
        )


def _copy_ranges(
    tensors: list[tuple[str, TensorProto]], folder: Path, private: Path, where: str
) -> dict[str, str] | None:
    """Copy the ranges ``tensors`` name into ``private``, one file per file of ``folder``; the private
    names by location, or None (logged) where the copy cannot be made here. Files are told apart by what
    they are (device and inode), not by how a location spells them: ``w.bin``, ``./w.bin`` and a hard
    link to it are one file, copied once (outside attack rt31: 8 spellings of one 100 MB file took
    763 MB of the temporary folder, 16 filled it)."""
    names: dict[str, str] = {}
    files: dict[str, FileId] = {}
    private_names: dict[FileId, str] = {}
    states: dict[FileId, FileState] = {}
    done: set[tuple[FileId, int, int]] = set()
    sources: dict[FileId, int] = {}
    copies: dict[FileId, int] = {}
    try:
        for label, tensor in tensors:
            entries = {e.key: e.value for e in tensor.external_data}
            location = entries.get("location", "")
            if location not in files:
                try:
                    opened = os.open(folder / PurePosixPath(location), os.O_RDONLY | os.O_CLOEXEC)
                except OSError as e:
                    raise ModelLoadError(
                        f"{where}: {label}: external data file {location!r} cannot be read ({e.strerror})"
                    ) from None
                file = files[location] = _file_id(opened)
                if file in sources:  # another spelling of a file already opened
                    os.close(opened)
                else:
                    sources[file] = opened
                    states[file] = _state(opened)
                    private_names[file] = f"{len(private_names)}.bin"
                    copies[file] = os.open(
                        private / private_names[file], os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600
                    )
                    os.ftruncate(copies[file], os.fstat(opened).st_size)
                names[location] = private_names[file]
            file = files[location]
            offset = int(entries.get("offset", "0"))
            count = packed_bytes(tensor)
            if count is None:
                count = int(entries["length"]) if "length" in entries else os.fstat(sources[file]).st_size - offset
            if (file, offset, count) not in done:
                _copy_range(sources[file], copies[file], offset, count, f"{where}: {label}", location)
                done.add((file, offset, count))
        for location, file in files.items():
            _check_unchanged(states[file], sources[file], where, location)
        return names
    except (OSError, AttributeError) as e:  # no room, no sendfile to a file here: not the model's fault
        log.warning(
            "%s: no private copy of its external data (%s); reading it into memory instead",
            where,
            getattr(e, "strerror", None) or e,
        )
        return None
    finally:
        for fd in (*sources.values(), *copies.values()):
            os.close(fd)


def _copy_range(source: int, copy: int, offset: int, count: int, label: str, location: str) -> None:
    os.lseek(copy, offset, os.SEEK_SET)
    done = 0
    while done < count:
        try:
            sent = os.sendfile(copy, source, offset + done, count - done)
        except OSError as e:
            if e.errno == errno.EIO:
                raise ModelLoadError(
                    f"{label}: external data file {location!r} cannot be read ({e.strerror})"
                ) from None
            raise
        if not sent:
            raise FilesChangedError(
                f"{label}: external data file {location!r} ended at byte {offset + done}, "
                f"before the {count} bytes from {offset} it holds (the file changed during the load)"
            )
        done += sent


def take_external_data(
    model: onnx.ModelProto, folder: Path, where: str, folder_id: FileId | None = None
) -> dict[str, Initializer]:
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
        reader.check_unchanged()
        check_same_folder(folder, folder_id, where)
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
    """Reads tensors' external data from the files of one folder, each location opened once, each byte range
    of a file read once (tensors that share one range, under any spelling of the file, share the array)."""

    def __init__(self, folder: Path, where: str) -> None:
        self._folder = folder
        self._where = where
        self._files: dict[str, FileIO] = {}
        self._states: dict[str, FileState] = {}
        self._ranges: dict[tuple[FileId, int, int], npt.NDArray[np.uint8]] = {}

    def read(self, tensor: TensorProto, label: str) -> npt.NDArray[np.uint8]:
        entries = {e.key: e.value for e in tensor.external_data}
        location = entries.get("location", "")
        offset = int(entries.get("offset", "0"))
        file = self._file(location, label)
        count = packed_bytes(tensor)
        if count is None:
            count = int(entries["length"]) if "length" in entries else _size(file) - offset
        key = (_file_id(file.fileno()), offset, count)  # one file however its locations spell it
        found = self._ranges.get(key)
        if found is None:
            found = self._ranges[key] = self._read_range(file, offset, count, location, label)
        return found

    def _file(self, location: str, label: str) -> FileIO:
        file = self._files.get(location)
        if file is None:
            try:
                file = self._files[location] = FileIO(self._folder / PurePosixPath(location), "rb")
                self._states[location] = _state(file.fileno())
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
                    raise FilesChangedError(
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

    def check_unchanged(self) -> None:
        """Refuse the load when a file read was written meanwhile (:func:`_check_unchanged`)."""
        for location, file in self._files.items():
            _check_unchanged(self._states[location], file.fileno(), self._where, location)

    def close(self) -> None:
        for file in self._files.values():
            file.close()
        self._files.clear()
        self._ranges.clear()


def _size(file: FileIO) -> int:
    return file.seek(0, 2)
