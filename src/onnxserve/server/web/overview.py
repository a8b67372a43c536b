"""What the web page shows about the served models: versions, states, labels, signatures, ONNX metadata.

Everything here is read from the one :class:`InferenceService` the protocols also call, plus the
served version's ``model.onnx`` header (producer, opsets, metadata properties), read without weights
(``onnx_header``, kept by the document cache of ``documents``).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from onnxserve.core.pipeline import (
    OPTIONAL_OUTPUTS,
    PAIR_INPUTS,
    TASK_OUTPUTS,
    TEXT_INPUT,
)
from onnxserve.core.registry import PLATFORM, ModelVersion
from onnxserve.core.service import InferenceService
from onnxserve.core.types import IndexEntry, TensorSpec
from onnxserve.errors import ModelLoadError, ModelNotFoundError
from onnxserve.protocols.embeddings import embeds_sentences
from onnxserve.protocols.public_errors import redact_paths
from onnxserve.toolkit import model_header


@dataclass(frozen=True)
class VersionRow:
    """One line of the model list: a version, its state, the labels that name it."""

    version: str
    state: str
    reason: str = ""
    labels: tuple[str, ...] = ()
    task: str | None = None
    browsable: bool = False  # loaded (in any state): it has a page


@dataclass(frozen=True)
class ModelRow:
    name: str
    versions: tuple[VersionRow, ...]
    served: bool = True  # some version of it is loaded (in any state): it has a page

    @property
    def browsable_versions(self) -> list[str]:
        return [v.version for v in self.versions if v.browsable]


SHOWN_LABELS = 1000
"""Class labels a version page lists (the model's first ones; TEI's /info and the answers use all)."""

SHOWN_PROPERTIES = 200
"""ONNX metadata properties a version page lists."""

SHOWN_CHARACTERS = 1000
"""Characters of a label, a property key or value, a producer or graph name a version page shows."""

SHOWN_DOC_CHARACTERS = 10_000
"""Characters of a model's doc string a version page shows."""


def _cut(text: str, limit: int = SHOWN_CHARACTERS) -> str:
    """``text``, cut to ``limit`` characters with how long it was (a model's strings can be megabytes)."""
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text):,} characters)"


@dataclass(frozen=True)
class OnnxHeader:
    """What a model file says about itself, weights left out."""

    ir_version: int
    opsets: tuple[tuple[str, int], ...]
    producer: str
    graph_name: str
    doc_string: str
    properties: tuple[tuple[str, str], ...]  # the first SHOWN_PROPERTIES of them, each cut
    nodes: int
    contents: model_header.Contents  # its tensors, nodes, values and strings, counted
    properties_total: int = 0  # every metadata property the file has


@dataclass(frozen=True)
class TextInterface:
    """How a pipeline folder is called with text instead of token tensors."""

    task: str
    inputs: tuple[str, ...]  # the BYTES inputs a text request sends
    outputs: tuple[str, ...]  # what a text request gets back by default
    optional_outputs: tuple[str, ...]
    max_length: int
    class_labels: tuple[tuple[int, str], ...] = ()  # the first SHOWN_LABELS of them
    mask_token: str | None = None
    embeds: bool = False  # pooled feature-extraction: answers sentence embeddings (OpenAI, TEI /embed)
    labels_total: int = 0  # every class label the model has


@dataclass(frozen=True)
class VersionDetail:
    """Everything the page of one model version shows."""

    name: str
    version: str
    versions: tuple[str, ...]  # every loaded version of the model, highest first
    state: str
    labels: tuple[str, ...]
    platform: str
    max_batch_size: int
    load_seconds: float
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    model_file: Path
    text: TextInterface | None = None
    header: OnnxHeader | None = None
    on_disk: bool = True  # False: the version serves from memory, its file was removed (no header, no graph)


async def model_rows(service: InferenceService) -> list[ModelRow]:
    """Every model the server knows, with every version's state, labels and task, by name."""
    by_name: dict[str, list[IndexEntry]] = {}
    for entry in await service.repository_index():
        by_name.setdefault(entry.name, []).append(entry)
    rows = []
    for name in sorted(by_name):
        labels: Mapping[str, int] = {}
        loaded: dict[int, ModelVersion] = {}
        if name in service.registry.names():
            served = service.registry.get(name)
            labels = served.config.version_labels
            loaded = served.versions
        versions = []
        for entry in sorted(by_name[name], key=lambda e: int(e.version) if e.version.isdigit() else 0, reverse=True):
            number = int(entry.version) if entry.version.isdigit() else None
            model = loaded.get(number) if number is not None else None
            versions.append(
                VersionRow(
                    version=entry.version,
                    state=entry.state,
                    reason=redact_paths(entry.reason),  # what went wrong, never where (as error answers)
                    labels=tuple(sorted(label for label, v in labels.items() if v == number)),
                    task=model.pipeline.spec.task if model is not None and model.pipeline is not None else None,
                    browsable=model is not None,
                )
            )
        rows.append(ModelRow(name, tuple(versions), served=bool(loaded)))
    return rows


def version_detail(
    service: InferenceService, name: str, version: str, header: OnnxHeader | None = None
) -> VersionDetail:
    """The version a number or label names, whatever its state; ModelNotFoundError if none is loaded.

    ``header``: its file's (``onnx_header``, which reads the file: the caller runs it off the event loop)."""
    served = service.registry.get(name)
    model = served.lookup(version)
    labels = served.config.version_labels
    return VersionDetail(
        name=name,
        version=str(model.version),
        versions=tuple(str(v) for v in served.version_numbers()),
        state=model.state.value,
        labels=tuple(sorted(label for label, v in labels.items() if v == model.version)),
        platform=PLATFORM,
        max_batch_size=model.max_batch_size,
        load_seconds=model.load_seconds,
        inputs=tuple(model.inputs),
        outputs=tuple(model.outputs),
        model_file=model.folder.model_file,
        text=_text_interface(model),
        header=header,
    )


def model_file(service: InferenceService, name: str, version: str) -> Path:
    """The ``model.onnx`` of a loaded version (named by number or label)."""
    return service.registry.get(name).lookup(version).folder.model_file


def loaded_versions(service: InferenceService, name: str) -> list[str]:
    """The loaded versions of a model, highest first (ModelNotFoundError for an unknown model)."""
    return [str(v) for v in service.registry.get(name).version_numbers()]


def require_version(service: InferenceService, name: str, version: str) -> str:
    """The version number a number or label names, as a string; a clear ModelNotFoundError otherwise."""
    if not version:
        raise ModelNotFoundError(f"model {name!r}: no version given")
    return str(service.registry.get(name).lookup(version).version)


def _text_interface(model: ModelVersion) -> TextInterface | None:
    if model.pipeline is None:
        return None
    spec = model.pipeline.spec
    inputs = PAIR_INPUTS.get(spec.task, (TEXT_INPUT,))
    return TextInterface(
        task=spec.task,
        inputs=inputs,
        outputs=TASK_OUTPUTS.get(spec.task, ()),
        optional_outputs=OPTIONAL_OUTPUTS.get(spec.task, ()),
        max_length=spec.max_length,
        class_labels=tuple(sorted((i, _cut(v)) for i, v in itertools.islice(spec.labels.items(), SHOWN_LABELS))),
        labels_total=len(spec.labels),
        mask_token=spec.mask_token,
        embeds=embeds_sentences(spec, model.outputs),
    )


def onnx_header(path: Path) -> OnnxHeader:
    """The model file's header, read without its weights (``model_header.read_header``: the cost of the
    header, not of the file); the web page's document cache keeps it per file version."""
    try:
        found = model_header.read_header(path)
    except (OSError, ValueError) as e:  # the file changed under the server, or is not a model
        raise ModelLoadError(f"{path}: cannot read the model file: {e}") from None
    model = found.model
    return OnnxHeader(
        ir_version=int(model.ir_version),
        opsets=tuple(model_header.opsets(model).items()),
        producer=_cut(model_header.producer(model)),
        graph_name=_cut(found.graph_name),
        doc_string=_cut(model.doc_string or found.graph_doc_string, SHOWN_DOC_CHARACTERS),
        properties=tuple((_cut(p.key), _cut(p.value)) for p in model.metadata_props[:SHOWN_PROPERTIES]),
        properties_total=len(model.metadata_props),
        nodes=found.nodes,
        contents=found.contents,
    )


def dims(spec: TensorSpec) -> Sequence[str]:
    """Each dimension as the page shows it: a size, a symbolic name, or ``?`` for an unnamed dynamic one."""
    names = [*spec.dim_names, *([None] * (len(spec.shape) - len(spec.dim_names)))]
    return [str(d) if d >= 0 else (n or "?") for d, n in zip(spec.shape, names, strict=False)]
