"""Checks that a request fits the model version it is sent to, before anything runs.

Every protocol's requests pass through here, so a bad input gets the same message whatever the
wire format.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy.typing as npt

from onnxserve.core.registry import ModelVersion
from onnxserve.core.types import InferenceRequest, TensorSpec
from onnxserve.core.wire import describe, format_shape, text_inputs_hint, unknown_input_error
from onnxserve.errors import InvalidInputError


def _check_shape(given: tuple[int, ...], spec: TensorSpec, model: str) -> None:
    if len(given) != len(spec.shape) or any(e >= 0 and g != e for g, e in zip(given, spec.shape, strict=True)):
        raise InvalidInputError(
            f"input {spec.name!r} has shape {format_shape(given)} but model {model!r} expects "
            f"{format_shape(spec.shape)} (-1 is any size)"
        )


SEQUENCE_PARAMETERS = ("sequence_id", "sequence_start", "sequence_end")
"""Triton's sequence batching parameters: onnxserve keeps no state between requests."""


def check_request(request: InferenceRequest) -> None:
    """What a request asks for on every model and every protocol, checked before the model is looked up:
    each input and each requested output named once (else the last one would win, silently), and
    Triton's request parameters of the right type (``priority``: accepted, with one priority level;
    a sequence: refused; ``timeout`` is checked with the time limit)."""
    if (twice := _first_repeated(tensor.name for tensor in request.inputs)) is not None:
        raise InvalidInputError(f"input {twice!r} is given more than once")
    if request.outputs is not None and (twice := _first_repeated(request.outputs)) is not None:
        raise InvalidInputError(f"output {twice!r} is requested more than once")
    params = request.parameters
    priority = params.get("priority")
    if priority is not None and (isinstance(priority, bool) or not isinstance(priority, int) or priority < 0):
        raise InvalidInputError(f"parameter 'priority' must be a non-negative integer, got {priority!r}")
    for key in SEQUENCE_PARAMETERS:
        value = params.get(key)
        if value is None:
            continue
        if not _no_sequence(key, value):
            raise InvalidInputError(
                f"parameter {key!r} ({value!r}): sequence batching is not supported; onnxserve keeps no "
                "state between requests (send each request on its own, without sequence parameters)"
            )


def _first_repeated(names: Iterable[str]) -> str | None:
    """The first name given again, in one pass (a search of the names before each took minutes for 65,536
    outputs with the repeated one last, on the event loop: outside attack rt55)."""
    seen: set[str] = set()
    for name in names:
        if name in seen:
            return name
        seen.add(name)
    return None


def _no_sequence(key: str, value: Any) -> bool:
    """The value tritonclient sends for "no sequence": sequence_id 0 (or ""), sequence_start/end false."""
    if key == "sequence_id":
        return (type(value) is int and value == 0) or value == ""
    return value is False


def prepare_feeds(request: InferenceRequest, model: ModelVersion) -> tuple[dict[str, npt.NDArray[Any]], list[str]]:
    """The arrays to feed and the output names to fetch, or InvalidInputError naming what is wrong."""
    specs = {s.name: s for s in model.inputs}
    feeds: dict[str, npt.NDArray[Any]] = {}
    symbolic: dict[str, tuple[str, int]] = {}  # symbolic dim name -> (first input that fixed it, size)
    for tensor in request.inputs:
        if tensor.name in feeds:
            raise InvalidInputError(f"input {tensor.name!r} is given more than once")
        spec = specs.get(tensor.name)
        if spec is None:
            raise unknown_input_error(tensor.name, model.name, model.inputs, _text_inputs(model))
        if tensor.datatype != spec.datatype:
            raise InvalidInputError(
                f"input {tensor.name!r} has datatype {tensor.datatype.v2} but model {model.name!r} "
                f"expects {spec.datatype.v2}" + _text_hint(tensor.datatype.is_bytes, spec, model)
            )
        _check_shape(tensor.shape, spec, model.name)
        for size, dim_name in zip(tensor.shape, spec.dim_names, strict=False):
            if dim_name is None:
                continue
            first = symbolic.setdefault(dim_name, (tensor.name, size))
            if first[1] != size:
                raise InvalidInputError(
                    f"input {tensor.name!r} has {dim_name}={size} but input {first[0]!r} has "
                    f"{dim_name}={first[1]}; they must agree"
                )
        feeds[tensor.name] = tensor.data
    missing = [s for s in model.inputs if s.name not in feeds]
    if missing:
        raise InvalidInputError(
            f"model {model.name!r} is missing input{'s' if len(missing) > 1 else ''} "
            + ", ".join(describe(s) for s in missing)
            + text_inputs_hint(_text_inputs(model))
        )
    if model.max_batch_size > 0:
        _check_batch(request, model.max_batch_size)
    return feeds, _output_names(request, model)


def _text_inputs(model: ModelVersion) -> tuple[str, ...]:
    """The text inputs of a model that takes text (listed beside the graph's own); () otherwise."""
    return () if model.pipeline is None else model.pipeline.text_inputs()


TEXT_FIX = (
    "to send text to this model, put its tokenizer.json beside the model file (the server then tokenizes "
    "strings sent for its token inputs), or export it with 'onnxserve export hf MODEL --task TASK "
    "--output model.onnx', which writes one file that carries its tokenizer"
)
"""The two ways to make a model take text, for a string sent where it expects token ids."""


def _text_hint(sent_bytes: bool, spec: TensorSpec, model: ModelVersion) -> str:
    if not sent_bytes or model.pipeline is not None or spec.datatype.v2 not in ("INT64", "INT32"):
        return ""
    return f" (token ids); {TEXT_FIX}"


def _check_batch(request: InferenceRequest, max_batch_size: int) -> None:
    sizes = {t.name: t.shape[0] for t in request.inputs}
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{n}={b}" for n, b in sizes.items())
        raise InvalidInputError(f"inputs disagree on the batch size (first dimension): {listed}")
    for name, size in sizes.items():
        if size > max_batch_size:
            raise InvalidInputError(
                f"input {name!r} has batch size {size}, more than the model's max_batch_size {max_batch_size}"
            )


def _output_names(request: InferenceRequest, model: ModelVersion) -> list[str]:
    known = [s.name for s in model.outputs]
    if request.outputs is None or len(request.outputs) == 0:
        return known
    seen: set[str] = set()
    for name in request.outputs:
        if name not in known:
            raise InvalidInputError(
                f"unknown output {name!r} for model {model.name!r}; outputs are: {', '.join(known)}"
            )
        if name in seen:
            raise InvalidInputError(f"output {name!r} is requested more than once")
        seen.add(name)
    return list(request.outputs)
