"""Outputs for an input: run a model once and show its outputs and chosen intermediate tensors.

The input is text for a text model folder (``onnxserve.json``; the folder's tokenizer makes the token
tensors and :class:`onnxserve.Pipeline` gives the task's results), otherwise tensors: a ``.npy`` file
(for a one-input model), an ``.npz`` file, or JSON (a file, or inline) mapping input names to nested
lists. Intermediate tensors are exposed by adding them as graph outputs on a copy of the model (the
file on disk is never changed) and are summarized like weights (min, max, mean, std, sparsity, histogram).

``--intermediates`` takes comma-separated items, each a tensor name, a node name (its outputs) or a
shell pattern over both, matched regardless of case (``*attention*softmax*``).
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import orjson

from onnxserve.core.pipeline import PipelineSpec, TextBatch
from onnxserve.core.runtime import create_session
from onnxserve.errors import InvalidInputError
from onnxserve.toolkit.graph import WeightSummary, array_summary, summary_json
from onnxserve.toolkit.model_file import load_model, locate_model

PREVIEW_VALUES = 8
"""Values of each output shown in full (the first ones, flattened)."""


@dataclass(frozen=True)
class TensorResult:
    summary: WeightSummary
    preview: list[Any]


@dataclass(frozen=True)
class RunResult:
    inputs: dict[str, TensorResult]
    outputs: dict[str, TensorResult]
    intermediates: dict[str, TensorResult]
    task_result: Any | None
    """For a text model folder: what ``onnxserve.Pipeline`` returns for the text."""

    def to_json(self) -> dict[str, Any]:
        def tensors(group: Mapping[str, TensorResult]) -> dict[str, Any]:
            return {name: {**summary_json(t.summary), "preview": t.preview} for name, t in group.items()}

        return {
            "inputs": tensors(self.inputs),
            "outputs": tensors(self.outputs),
            "intermediates": tensors(self.intermediates),
            "task_result": _plain_json(self.task_result),
        }

    def summaries(self) -> dict[str, WeightSummary]:
        """Outputs and intermediates by tensor name (what the HTML view shows on the graph)."""
        return {name: t.summary for name, t in (*self.outputs.items(), *self.intermediates.items())}


def select_intermediates(model: onnx.ModelProto, selection: str) -> list[str]:
    """Tensor names for ``--intermediates`` items (names, node names or patterns), in graph order."""
    produced: list[str] = [o for n in model.graph.node for o in n.output if o]
    by_node: dict[str, list[str]] = {n.name: [o for o in n.output if o] for n in model.graph.node if n.name}
    chosen: dict[str, None] = {}
    for item in (part.strip() for part in selection.split(",")):
        if not item:
            continue
        if item in by_node or item in produced:
            chosen.update(dict.fromkeys(by_node.get(item, [item])))
            continue
        if any(ch in item for ch in "*?["):
            pattern = item.lower()
            hits = [t for t in produced if fnmatch.fnmatchcase(t.lower(), pattern)]
            hits += [o for name, outs in by_node.items() if fnmatch.fnmatchcase(name.lower(), pattern) for o in outs]
            if hits:
                chosen.update(dict.fromkeys(hits))
                continue
            raise InvalidInputError(f"--intermediates: pattern {item!r} matches no tensor or node")
        close = difflib.get_close_matches(item, [*produced, *by_node], n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise InvalidInputError(f"--intermediates: no tensor or node named {item!r}{hint}")
    order = {name: i for i, name in enumerate(produced)}
    return sorted(chosen, key=lambda name: order.get(name, len(order)))


def with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs ``names`` (their types left for the runtime to find)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    present = {o.name for o in copy.graph.output}
    for name in names:
        if name not in present:
            copy.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return copy


def run_model(path: Path, data: str, *, intermediates: str | None = None) -> RunResult:
    """Run MODEL on ``data`` (text for a text model folder; a .npy/.npz/.json file or inline JSON)."""
    location = locate_model(path)
    model = load_model(location.file, load_external_data=True)
    chosen = select_intermediates(model, intermediates) if intermediates else []
    spec = PipelineSpec.read(location.folder) if location.folder is not None else None
    task_result: Any = None
    graph_inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    if spec is not None and location.folder is not None:
        from onnxserve.predict import Pipeline

        pipeline = Pipeline(location.folder)
        feeds = pipeline.text.encode(TextBatch([data])).feeds
        task_result = pipeline(data)
    else:
        feeds = read_tensors(data, graph_inputs)
    outputs = [o.name for o in model.graph.output]
    session = _session(with_outputs(model, chosen), location.file)
    try:
        values = session.run([*outputs, *chosen], feeds)
    except Exception as e:  # ONNX Runtime reports bad feeds with several exception types
        raise InvalidInputError(f"the model refused the input: {e}") from None
    results = dict(zip([*outputs, *chosen], values, strict=True))
    return RunResult(
        inputs={name: _result(name, np.asarray(array)) for name, array in feeds.items()},
        outputs={name: _result(name, np.asarray(results[name])) for name in outputs},
        intermediates={name: _result(name, np.asarray(results[name])) for name in chosen if name not in outputs},
        task_result=task_result,
    )


def _session(model: onnx.ModelProto, file: Path) -> Any:
    return create_session(model, where=str(file))


def read_tensors(data: str, graph_inputs: Sequence[onnx.ValueInfoProto]) -> dict[str, npt.NDArray[Any]]:
    """Feeds from a .npy / .npz / .json file or inline JSON, cast to each input's element type."""
    names = [i.name for i in graph_inputs]
    types = {i.name: _np_type(i) for i in graph_inputs}
    path = Path(data)
    raw: dict[str, Any]
    stripped = data.lstrip()
    if stripped.startswith(("{", "[")):
        raw = _json_object(data.encode(), "the inline JSON", names)
    elif not path.is_file():
        raise InvalidInputError(f"--run {data!r}: no such file; give a .npy, .npz or .json file or inline JSON")
    elif path.suffix == ".npy":
        if len(names) != 1:
            raise InvalidInputError(
                f"{path}: a .npy file holds one tensor but the model has inputs {', '.join(names)}; use .npz or JSON"
            )
        raw = {names[0]: _load_npy(path)}
    elif path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as archive:
                raw = {key: archive[key] for key in archive.files}
        except (OSError, ValueError) as e:
            raise InvalidInputError(f"{path}: not a readable .npz file: {e}") from None
    elif path.suffix == ".json":
        raw = _json_object(path.read_bytes(), str(path), names)
    else:
        raise InvalidInputError(f"{path}: expected a .npy, .npz or .json file")
    missing = [n for n in names if n not in raw]
    extra = [n for n in raw if n not in names]
    if missing or extra:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + (
            [f"unknown {', '.join(extra)}"] if extra else []
        )
        raise InvalidInputError(f"the input does not match the model's inputs ({', '.join(names)}): {'; '.join(parts)}")
    feeds: dict[str, npt.NDArray[Any]] = {}
    for name in names:
        try:
            feeds[name] = np.asarray(raw[name], dtype=types[name])
        except (TypeError, ValueError) as e:
            raise InvalidInputError(f"input {name!r}: cannot make a {np.dtype(types[name]).name} tensor: {e}") from None
    return feeds


def _load_npy(path: Path) -> npt.NDArray[Any]:
    try:
        array: npt.NDArray[Any] = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise InvalidInputError(f"{path}: not a readable .npy file: {e}") from None
    return array


def _json_object(payload: bytes, what: str, names: Sequence[str]) -> dict[str, Any]:
    try:
        document = orjson.loads(payload)
    except orjson.JSONDecodeError as e:
        raise InvalidInputError(f"{what} is not valid JSON: {e}") from None
    if isinstance(document, list) and len(names) == 1:
        return {names[0]: document}
    if not isinstance(document, dict):
        raise InvalidInputError(f"{what}: expected an object mapping input names ({', '.join(names)}) to values")
    return document


def _np_type(info: onnx.ValueInfoProto) -> Any:
    elem = info.type.tensor_type.elem_type
    if elem == onnx.TensorProto.STRING:
        return np.object_
    return onnx.helper.tensor_dtype_to_np_dtype(elem)


def _result(name: str, array: npt.NDArray[Any]) -> TensorResult:
    flat = array.reshape(-1)[:PREVIEW_VALUES]
    preview = [v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in flat.tolist()]
    return TensorResult(array_summary(name, array), preview)


def _plain_json(value: Any) -> Any:
    return orjson.loads(orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY)) if value is not None else None
