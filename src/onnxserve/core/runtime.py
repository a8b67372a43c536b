"""ONNX Runtime sessions: providers, session options, metadata and warm-up.

One :class:`ModelSession` wraps one ``onnxruntime.InferenceSession`` for one model version. It turns
graph inputs and outputs into :class:`~onnxserve.core.types.TensorSpec` and converts BYTES tensors
between onnxserve's ``bytes`` objects and the ``str`` objects that ONNX Runtime expects.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
from google.protobuf.message import EncodeError

from onnxserve.config import ExecutionProvider, SessionOptions
from onnxserve.core import datatypes
from onnxserve.core.attention_memory import attention_shape
from onnxserve.core.confinement import check_model
from onnxserve.core.division_guard import guard_division
from onnxserve.core.external_data import (
    Initializer,
    folder_identity,
    has_external_data,
    private_copy,
    take_external_data,
)
from onnxserve.core.inline_runs import why_not_shape_bounded
from onnxserve.core.memory import give_back_free_memory, short_of_memory
from onnxserve.core.ort_strings import known_strings_model, layout_holds, string_bytes
from onnxserve.core.types import BYTES_ELEMENT_OVERHEAD, TensorSpec, empty_like
from onnxserve.core.wire import MAX_BYTES_ELEMENTS, MAX_ELEMENTS, response_too_large, too_many_bytes_elements
from onnxserve.errors import InferenceError, InvalidInputError, ModelLoadError, ResourceExhaustedError, TooLargeError

log = logging.getLogger(__name__)

WARMUP_SECONDS = 60.0
"""A warm-up run still running after this long is stopped (ONNX Runtime's terminate flag)."""

WARMUP_LIMIT_BYTES = 256 * 1024 * 1024
"""Warm-up runs only on inputs up to this size (fixed dims taken as declared, dynamic ones as 1)."""

_ALLOCATION_FAILURE = re.compile(
    r"Failed to allocate memory|std::bad_alloc|Integer overflow|size overflowed|exceeds the supported maximum"
)
"""How ONNX Runtime says a run could not get the memory its input values ask for. Its exceptions carry no
type for that (``Fail``, ``RuntimeException`` or ``InvalidArgument`` with one of these texts), so this one
pattern is the only place onnxserve reads an ONNX Runtime message to decide anything."""

_ORT_VALUE: Any = ort.capi.onnxruntime_pybind11_state.OrtValue
_CPU: Any = ort.OrtDevice.make("cpu", 0)._get_c_device()

EXTERNAL_DATA_FOLDER = "session.model_external_initializers_file_folder_path"
"""Session config entry: the folder a model given as bytes reads its external data from."""

ARENA_SHRINKAGE = "memory.enable_memory_arena_shrinkage"
"""Run config entry: give the CPU arena's unused memory back to the system at the end of the run."""

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

_SPINNING_ENTRIES = {
    "intra_op_allow_spinning": "session.intra_op.allow_spinning",
    "inter_op_allow_spinning": "session.inter_op.allow_spinning",
}
"""Config fields that set ONNX Runtime session config entries ("1" or "0")."""


def session_options(options: SessionOptions) -> ort.SessionOptions:
    """ONNX Runtime session options from onnxserve's config model."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = options.intra_op_num_threads
    so.inter_op_num_threads = options.inter_op_num_threads
    so.graph_optimization_level = _OPT_LEVELS[options.graph_optimization_level]
    so.execution_mode = _EXEC_MODES[options.execution_mode]
    for key, allow in _SPINNING_ENTRIES.items():
        value = getattr(options, key)
        if value is not None:
            so.add_session_config_entry(allow, "1" if value else "0")
    so.enable_cpu_mem_arena = options.enable_cpu_mem_arena
    # Nothing but fatal errors: ONNX Runtime writes its own lines to stderr, past onnxserve's log format
    # (colour codes, continuation lines, values a client chose), and every error it reports there also
    # reaches onnxserve as an exception, which is logged and answered. Its process-wide logger (allocator
    # failures) likewise.
    so.log_severity_level = ORT_LOG_SEVERITY
    ort.set_default_logger_severity(ORT_LOG_SEVERITY)
    return so


ORT_LOG_SEVERITY = 4
"""ONNX Runtime's own log lines: fatal only (its errors come back to onnxserve as exceptions)."""


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


@functools.cache
def string_layout_holds() -> bool:
    """Whether string outputs can be counted in ONNX Runtime's memory (core/ort_strings.py), checked once."""

    def known() -> Any:
        session = create_session(known_strings_model(), where="the string layout check")
        return session._sess.run_with_ort_values({}, ["y"], ort.RunOptions())[0]

    return layout_holds(known)


def create_session(
    model: Path | bytes | onnx.ModelProto,
    *,
    providers: Sequence[ExecutionProvider] = (),
    options: SessionOptions | None = None,
    where: str = "",
    save_optimized: Path | None = None,
    external_data: Path | None = None,
    initializers: Mapping[str, Initializer] | None = None,
) -> ort.InferenceSession:
    """An ONNX Runtime session: the one place onnxserve creates ``onnxruntime.InferenceSession``.

    ``model`` is a file, serialized bytes or a ``ModelProto`` (in memory, e.g. one with added outputs);
    ``providers`` and ``options`` go through :func:`available_providers` and :func:`session_options`.
    ``save_optimized`` asks ONNX Runtime to write the graph it optimized at ``options``' level to that
    file (offline optimization). ``external_data`` is the folder a model given in memory reads its external
    data from (the folder of the file it was read from). ``initializers`` are values of the main graph's
    initializers with external data, read by ``core.external_data``: ONNX Runtime copies them into the
    session instead of reading (mapping) their files, and they may be freed once the session is made. A
    model ONNX Runtime refuses is a :class:`ModelLoadError` naming ``where``.
    """
    where = where or (str(model) if isinstance(model, Path) else "the model")
    payload: str | bytes
    if isinstance(model, onnx.ModelProto):
        try:
            payload = model.SerializeToString()
        except ValueError as e:  # protobuf's 2 GB limit
            raise ModelLoadError(f"{where}: too large to run from memory ({e})") from None
        except (MemoryError, EncodeError):  # protobuf (upb) reports a failed allocation as an EncodeError
            raise ModelLoadError(f"{where}: {NO_MEMORY_TO_SERIALIZE}") from None
    else:
        payload = str(model) if isinstance(model, Path) else model
    so = session_options(options or SessionOptions())
    if save_optimized is not None:
        so.optimized_model_filepath = str(save_optimized)
    if external_data is not None:
        so.add_session_config_entry(EXTERNAL_DATA_FOLDER, str(external_data))
    values = [
        ort.OrtValue.ortvalue_from_numpy_with_onnx_type(i.array, i.element_type) for i in (initializers or {}).values()
    ]
    if values:
        so.add_external_initializers(list(initializers or {}), values)
    try:
        session = ort.InferenceSession(payload, sess_options=so, providers=available_providers(providers, where))
    except Exception as e:  # ONNX Runtime raises several unrelated types for a bad model
        raise ModelLoadError(f"{where}: ONNX Runtime cannot load the model: {e}") from e
    finally:
        values.clear()
    if initializers:
        # ONNX Runtime's Python session would make itself again from ``so`` on a provider failure, and ``so``
        # still points at the initializers' arrays, freed once this returns: never.
        session.disable_fallback()
    return session


def guarded_session(
    model: Path | onnx.ModelProto,
    *,
    providers: Sequence[ExecutionProvider] = (),
    options: SessionOptions | None = None,
    where: str = "",
    read: Callable[[onnx.ModelProto], None] | None = None,
) -> ort.InferenceSession:
    """A session of ``model`` whose integer divisions no input can make trap (``core.division_guard``): how
    the server's process runs a model of the repository, for serving and for its web page alike (a trap
    ends the whole process). A model without such divisions is loaded from its file, as it is; one with
    them from a guarded copy in memory. ``read`` is given the graph that is served (the guarded copy, or
    the parsed file) first: what a caller learns from it, without parsing the file twice.

    A model file with external data is served from its parse (or guarded copy) and a private copy of its
    external data that ONNX Runtime maps, removed once the session is made (``core.external_data``;
    where none can be made, memory the server owns): ONNX Runtime keeps no file of the version folder
    mapped, so a file overwritten in place later changes nothing the session serves (outside attack rt25
    F1). Otherwise the parsed model is dropped before the session is made."""
    where = where or (str(model) if isinstance(model, Path) else "the model")
    folder_id = folder_identity(model.parent) if isinstance(model, Path) else None  # before the model is read
    parsed = check_onnx_file(model) if isinstance(model, Path) else model
    guarded = guard_division(parsed, where)
    if read is not None:
        read(guarded if guarded is not None else parsed)
    folder = model.parent.absolute() if isinstance(model, Path) else None
    if folder is not None and has_external_data(parsed):
        served = guarded if guarded is not None else parsed  # the file's own parse, or a copy of it: ours to change
        del parsed, guarded
        with private_copy(served, folder, where, folder_id) as private:
            if private is not None:
                return create_session(served, providers=providers, options=options, where=where, external_data=private)
        initializers = take_external_data(served, folder, where, folder_id)
        try:
            return create_session(
                served,
                providers=providers,
                options=options,
                where=where,
                external_data=folder,
                initializers=initializers,
            )
        finally:
            initializers.clear()  # a refusal's traceback keeps this frame: it must not keep the weights
            give_back_free_memory()  # what ONNX Runtime held while it copied them
    del parsed
    if guarded is None:
        return create_session(model, providers=providers, options=options, where=where)
    return create_session(guarded, providers=providers, options=options, where=where, external_data=folder)


def _spec(arg: Any, where: str) -> TensorSpec:
    dtype = datatypes.from_ort(arg.type, f"{where} tensor {arg.name!r}")
    dims = list(arg.shape) if arg.shape is not None else []
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in dims)
    names = tuple(d if isinstance(d, str) else None for d in dims)
    return TensorSpec(arg.name, dtype, shape, names)


# protobuf's message when its arena cannot grow: the process is short of memory, the file may be fine
_PARSER_OUT_OF_MEMORY = "Arena alloc failed"

NO_MEMORY_TO_SERIALIZE = "the process has no memory to hand this model to ONNX Runtime now"
"""What :func:`create_session` says when the process ran out of memory serializing a model in memory."""

NO_MEMORY_TO_READ = "the process has no memory to read this model now"
"""What :func:`read_onnx`'s refusal says when the process ran out of memory parsing the file."""


def read_onnx(path: Path, *, load_external_data: bool = False) -> onnx.ModelProto:
    """The ONNX model in the file ``path``, parsed; what cannot be read is refused with a
    :class:`ModelLoadError` that names the path and says why: not an ONNX model, or no memory to parse it
    now (protobuf reports a failed allocation as a parse error, which must not call a good file corrupt)."""
    try:
        return onnx.load_model(str(path), load_external_data=load_external_data)
    except MemoryError:
        raise ModelLoadError(f"{path}: {NO_MEMORY_TO_READ}") from None
    except Exception as e:  # onnx raises protobuf's DecodeError, ValueError, OSError or its own errors
        if _PARSER_OUT_OF_MEMORY in str(e):
            raise ModelLoadError(f"{path}: {NO_MEMORY_TO_READ} ({e})") from None
        raise ModelLoadError(f"{path}: not an ONNX model ({type(e).__name__}: {e})") from None


def check_onnx_file(path: Path) -> onnx.ModelProto:
    """The model in ``path``, its external data not loaded; anything that is not a readable ONNX model is
    refused with a message that says why, and its external data must lie inside its folder (checked before
    ONNX Runtime opens anything, see ``core.confinement``)."""
    if not path.is_file():
        raise ModelLoadError(f"{path}: model file not found (expected model.onnx in the version folder)")
    model = read_onnx(path)
    try:
        check_model(model, path.parent)
    except ModelLoadError as e:
        raise ModelLoadError(f"{path}: {e.message}") from None
    return model


class RunControl:
    """One execution's run options: lets the event loop stop an execution no caller waits for any more."""

    def __init__(self) -> None:
        self.options = ort.RunOptions()
        self.options.log_severity_level = ORT_LOG_SEVERITY  # a terminated run is expected: no error line

    def terminate(self) -> None:
        """Make the running execution stop at its next node (ONNX Runtime's terminate flag)."""
        self.options.terminate = True

    @property
    def terminated(self) -> bool:
        return bool(self.options.terminate)


@contextlib.contextmanager
def stopped_after(seconds: float) -> Iterator[RunControl]:
    """The run options of an execution stopped once ``seconds`` have passed (ONNX Runtime's terminate flag,
    set from a timer thread): a run whose length a graph, not its caller, decides (a warm-up, a diff)."""
    control = RunControl()
    timer = threading.Timer(seconds, control.terminate)
    timer.daemon = True
    timer.start()
    try:
        yield control
    finally:
        timer.cancel()


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
        self._arena = (options or SessionOptions()).enable_cpu_mem_arena
        # An encoder's attention shape (heads, widest layer): its executions' memory (core.attention_memory).
        self.attention: tuple[int, int] | None = None
        # Why its runs' cost is not bounded by input shapes, if it is not (core.inline_runs).
        self.why_not_inline: str | None = None

        def read_graph(served: onnx.ModelProto) -> None:
            self.attention = attention_shape(served, self.name)
            self.why_not_inline = why_not_shape_bounded(served)

        try:
            self._session = guarded_session(
                path, providers=providers, options=options, where=self.name, read=read_graph
            )
        except ModelLoadError as e:
            if e.__cause__ is None:  # the file or the division guard refused it: the message names it already
                raise
            # ONNX Runtime refused it: named by its file, whatever the model's name
            raise ModelLoadError(f"{path}: ONNX Runtime cannot load the model: {e.__cause__}") from None
        self.inputs: tuple[TensorSpec, ...] = tuple(_spec(a, "input") for a in self._session.get_inputs())
        self.outputs: tuple[TensorSpec, ...] = tuple(_spec(a, "output") for a in self._session.get_outputs())
        self._itemsizes = {o.name: o.datatype.itemsize for o in self.outputs}
        self.providers: list[str] = list(self._session.get_providers())
        self.metadata: dict[str, str] = dict(self._session.get_modelmeta().custom_metadata_map)
        log.info("%s: loaded on %s", self.name, ", ".join(self.providers))

    @property
    def ort_options(self) -> ort.SessionOptions:
        """The options the live ONNX Runtime session was created with (config entries included)."""
        options: ort.SessionOptions = self._session.get_session_options()
        return options

    def run(
        self,
        feeds: Mapping[str, npt.NDArray[Any]],
        output_names: Sequence[str] | None = None,
        control: RunControl | None = None,
        max_output_bytes: int = 0,
        max_bytes_elements: int = MAX_BYTES_ELEMENTS,
    ) -> dict[str, npt.NDArray[Any]]:
        """Run the model; BYTES inputs and outputs are ``bytes`` objects in ``object`` arrays.

        The outputs' shapes are checked while they are still ONNX Runtime's values, before any becomes a
        numpy array or Python objects: more than ``max_output_bytes`` (0: no limit) in all, more than
        ``max_bytes_elements`` BYTES elements in all outputs, or a dimension no answer can have is a
        ``TooLargeError``."""
        names = list(output_names) if output_names else [o.name for o in self.outputs]
        ort_feeds = {name: _to_ort(name, array) for name, array in feeds.items()}
        options = control.options if control is not None else ort.RunOptions()
        if self._arena:
            # A run that needed a lot gives the arena's unused memory back when it ends.
            options.add_run_config_entry(ARENA_SHRINKAGE, "cpu:0")
        strings = any(array.dtype == np.object_ for array in ort_feeds.values())
        arrays: list[Any] = []
        values: list[Any] = []
        try:
            if strings:
                # ONNX Runtime's Python API makes no OrtValue of strings: such a run answers numpy arrays,
                # checked right after the run, before any further conversion or encoding.
                arrays = self._session.run(names, ort_feeds, options)
                shapes = [_Shape(tuple(a.shape), a.dtype == np.object_, None) for a in arrays]
            else:
                # ONNX Runtime's own values: shapes known, nothing converted yet. The binding's call, not the
                # Python wrapper's, which costs several times the run of a small model.
                inputs = {n: _ORT_VALUE.ortvalue_from_numpy(_contiguous(a), _CPU) for n, a in ort_feeds.items()}
                values = _listed(self._session._sess.run_with_ort_values(inputs, names, options), len(names))
                shapes = [_shape(v, max_output_bytes > 0) for v in values]
        except Exception as e:  # ONNX Runtime's error types are not part of its public API
            error = _run_error(self.name, e, control)
            if isinstance(error, TooLargeError):
                give_back_free_memory()  # what the failed run took before it gave up
            raise error from e
        refusal, counted = self._refusal(names, shapes, max_output_bytes, max_bytes_elements)
        if refusal is not None:
            arrays = values = []  # the error's traceback keeps this frame: it must not keep the outputs
            give_back_free_memory()
            raise refusal
        try:
            if not strings:
                arrays = [v.numpy() for v in values]
                values = []
            # Strings whose length was not read from ONNX Runtime are counted as they are encoded, and the
            # encoding stops at the limit: at most one element beyond it is ever built.
            room = max_output_bytes - counted if max_output_bytes > 0 else -1
            outputs: dict[str, npt.NDArray[Any]] = {}
            for index, (name, shape) in enumerate(zip(names, shapes, strict=True)):
                exact = not shape.is_bytes or shape.text_bytes is not None
                output, used = _from_ort(arrays[index], -1 if exact else room)
                arrays[index] = None  # the text ONNX Runtime made goes as soon as its bytes are built
                if used < 0:
                    break
                outputs[name] = output
                if not exact:
                    room -= used
            else:
                return outputs
            # Nothing that holds the outputs may stay in this frame: the error's traceback keeps it.
            arrays = []
            outputs = {}
            give_back_free_memory()
            raise response_too_large(self.name, max_output_bytes + 1, max_output_bytes, at_least=True)
        except MemoryError as e:
            arrays = values = []
            give_back_free_memory()
            raise _run_error(self.name, e, control) from None
        except UnicodeDecodeError:
            arrays = values = []
            raise InferenceError(
                f"model {self.name}: a text output holds bytes that are not UTF-8, which ONNX Runtime's Python "
                "API cannot hand over; the model must output UTF-8 text (or numbers)"
            ) from None

    def _refusal(
        self,
        names: Sequence[str],
        shapes: Sequence[_Shape],
        max_output_bytes: int,
        max_bytes_elements: int,
    ) -> tuple[TooLargeError | None, int]:
        """Why outputs of these shapes may not become an answer (or None), and the bytes they were counted
        at: from shapes, and the exact text lengths where ONNX Runtime's strings could be read."""
        itemsizes = self._itemsizes
        total = 0
        elements = 0  # BYTES elements of all outputs: each becomes a Python object
        for name, (shape, is_bytes, text_bytes) in zip(names, shapes, strict=True):
            count = math.prod(shape)
            if any(d > MAX_ELEMENTS for d in shape) or count > MAX_ELEMENTS:
                return TooLargeError(
                    f"model {self.name}: output {name!r} has shape {list(shape)}, larger than any answer can be "
                    "(--max-response-bytes); ask for less (smaller input values, fewer outputs)"
                ), total
            elements += count if is_bytes else 0
            if is_bytes and elements > max_bytes_elements:
                held = f"output {name!r} has" if elements == count else f"the outputs up to {name!r} have"
                return too_many_bytes_elements(self.name, held, elements, max_bytes_elements), total
            total += count * (BYTES_ELEMENT_OVERHEAD if is_bytes else itemsizes.get(name) or 8) + (text_bytes or 0)
        if 0 < max_output_bytes < total:
            return response_too_large(self.name, total, max_output_bytes), total
        return None, total

    def warmup(self) -> None:
        """One run on zero inputs with dynamic dims set to 1, so the first request is not the slow one.

        Skipped when the inputs would be larger than ``WARMUP_LIMIT_BYTES`` (a model may declare fixed
        dims of any size: allocating them is not a warm-up)."""
        size = sum(math.prod(s.example_shape()) * (s.datatype.itemsize or 8) for s in self.inputs)
        if size > WARMUP_LIMIT_BYTES:
            log.warning("%s: warm-up run skipped: its inputs would take %d bytes", self.name, size)
            return
        with stopped_after(WARMUP_SECONDS) as control:
            try:
                self.run({spec.name: empty_like(spec) for spec in self.inputs}, control=control)
            except (InferenceError, InvalidInputError, TooLargeError) as e:
                if control.terminated:  # a Loop of 2^40 steps would hold the load, and every reload, for good
                    log.warning(
                        "%s: warm-up run stopped after %.0f s; the first requests may be slow",
                        self.name,
                        WARMUP_SECONDS,
                    )
                else:  # A graph can be valid and still refuse synthetic inputs (a reshape that needs real sizes).
                    log.warning("%s: warm-up run skipped: %s", self.name, e.message)


def is_allocation_failure(error: BaseException) -> bool:
    """Whether a failed run could not get the memory it asked for (see ``_ALLOCATION_FAILURE``)."""
    return isinstance(error, MemoryError) or _ALLOCATION_FAILURE.search(str(error)) is not None


SHORT_OF_MEMORY_PROBE = 64 * 1024 * 1024
"""What the process must still be able to map after a run failed to allocate memory of no stated size
(``std::bad_alloc``, MemoryError) for the failure to be the request's."""


def _short_of_memory_now(error: BaseException) -> bool:
    """Whether a run failed to allocate because the process is short of memory now (other requests hold it,
    and a retry may run), not because its values ask for too much: a failure of no stated size while the
    process cannot map :data:`SHORT_OF_MEMORY_PROBE` (the failed run's large blocks are mapped, so already
    returned; its small ones are trimmed after this check). A failure that
    states its size (``Failed to allocate memory for requested buffer of size N``) or a size that overflows
    is the request's: a run may need several such buffers, so one that fits now proves nothing, and a 503
    must not answer a request that can never run."""
    if not isinstance(error, MemoryError) and "std::bad_alloc" not in str(error):
        return False
    return short_of_memory(SHORT_OF_MEMORY_PROBE)


def _run_error(name: str, error: Exception, control: RunControl | None) -> Exception:
    """The domain error for a failed run."""
    reason = _first_line(error)
    if control is not None and control.terminated:
        return InferenceError(f"model {name}: the run was stopped (no caller waits for it)")
    if is_allocation_failure(error):
        if _short_of_memory_now(error):  # other requests hold the memory: this one may run later
            return ResourceExhaustedError(
                f"model {name}: the server is short of memory for this run now ({reason}); retry later"
            )
        # The input values ask the graph for more memory than there is (ConstantOfShape, Expand, Range, a
        # Loop's trip count...): the client's request, not the server, is at fault.
        return TooLargeError(f"model {name} could not allocate the memory these input values ask for: {reason}")
    # The model loaded and warmed up, and these inputs passed the type and shape checks: a kernel that
    # still fails (an index out of range, a negative size, shapes that do not broadcast) fails because of
    # the values it was given. The request, not the server, is at fault.
    return InvalidInputError(f"model {name} could not run on these input values: {reason}")


def _contiguous(array: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """``array`` in C order (``np.ascontiguousarray`` would make a scalar one-dimensional)."""
    return array if array.flags.c_contiguous else np.ascontiguousarray(array)


def _listed(vector: Any, count: int) -> list[Any]:
    """An OrtValueVector's values, by index: iterating one ends in a costly IndexError."""
    return [vector[i] for i in range(count)]


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


class _Shape(NamedTuple):
    """What is known of one output before it is converted."""

    shape: tuple[int, ...]
    is_bytes: bool
    text_bytes: int | None  # a string output's exact UTF-8 bytes, where they could be read; None otherwise


def _shape(value: Any, count_text: bool) -> _Shape:
    """An ONNX Runtime output's shape, and with ``count_text`` a string output's bytes (read in place)."""
    shape = tuple(value.shape())
    if value.data_type() != "tensor(string)":
        return _Shape(shape, False, None)
    if not count_text or any(d > MAX_ELEMENTS for d in shape) or math.prod(shape) > MAX_ELEMENTS:
        return _Shape(shape, True, None)
    return _Shape(shape, True, string_bytes(value, string_layout_holds()))


def _from_ort(value: Any, room: int = -1) -> tuple[npt.NDArray[Any], int]:
    """``value`` as a numpy array (text as ``bytes`` objects), and the text bytes it holds. With ``room`` of
    0 or more, encoding stops as soon as the text passes it: then the array is empty and the bytes -1."""
    array = np.asarray(value)
    if array.dtype != np.object_ and array.dtype.kind != "U":
        return array, 0
    encoded = np.empty(array.size, dtype=object)
    used = 0
    for i, item in enumerate(array.flat):
        data = item.encode("utf-8") if isinstance(item, str) else bytes(item)
        used += len(data)
        if 0 <= room < used:
            return np.empty(0, dtype=object), -1
        encoded[i] = data
    return encoded.reshape(array.shape), used


_SOURCE_LOCATION = re.compile(r"\S+\.(?:h|hpp|cc|cpp|c):\d+ (?:[^\s(]+(?: [^\s(]+){0,3}\([^)]*\)(?: const)?|\w+) ")
"""ONNX Runtime's ``file.h:123 void onnxruntime::Class::Method(args)`` prefix, or ``file.cc:703 Compute``
(a bare function name, as its kernels' errors carry it): where, not what."""


def _first_line(error: BaseException) -> str:
    text = _SOURCE_LOCATION.sub("", str(error).strip())
    return text.splitlines()[0] if text else "the runtime reported no reason"
