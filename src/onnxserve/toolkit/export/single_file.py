"""One self-contained ``.onnx`` file from an exported version folder: the graph with its weights
inlined, and the tokenizer and pipeline spec in the model's ``metadata_props`` (the keys the server
reads, see ``core.pipeline``), so the file alone is served as a text model.

Protocol buffers cannot hold more than 2 GB, so a model that large is refused with a message that
says to export to a folder instead.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from onnxserve.core.pipeline import PIPELINE_METADATA, TOKENIZER_FILENAME, TOKENIZER_METADATA, PipelineSpec
from onnxserve.core.repository import MODEL_FILENAME
from onnxserve.errors import ExportError
from onnxserve.toolkit.atomic_file import write_atomically

MAX_FILE_BYTES = 2**31 - 1
"""The largest protocol buffer message, hence the largest self-contained ONNX file."""


def write_single_file(folder: Path, output: Path) -> None:
    """Write ``folder``'s model, tokenizer and spec as one file at ``output`` (whole or not at all)."""
    size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file() and f.name.startswith(MODEL_FILENAME))
    if size >= MAX_FILE_BYTES:
        raise ExportError(
            f"the model's weights take {size / 2**30:.1f} GiB, more than one ONNX file can hold (2 GB); "
            f"export to a folder instead: --output {output.with_suffix('')} (model.onnx and its external data)"
        )
    model = onnx.load(str(folder / MODEL_FILENAME))
    if model.ByteSize() >= MAX_FILE_BYTES:
        raise ExportError("the model is larger than one ONNX file can hold (2 GB); export to a folder instead")
    spec = PipelineSpec.read(folder)
    tokenizer = folder / TOKENIZER_FILENAME
    if spec is None or not tokenizer.is_file():
        raise ExportError(f"{folder}: the export wrote no tokenizer.json or pipeline spec to embed")
    entries = {PIPELINE_METADATA: spec.to_json(), TOKENIZER_METADATA: tokenizer.read_text(encoding="utf-8")}
    kept = [p for p in model.metadata_props if p.key not in entries]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in entries.items():
        model.metadata_props.add(key=key, value=value)
    write_atomically(output, model.SerializeToString())
