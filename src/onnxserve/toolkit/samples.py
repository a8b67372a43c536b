"""Sample inputs for checking (and calibrating) a transformed model.

They come from a calibration file -- text lines for a text model folder, ``.npy`` (one input) or
``.npz`` (one array per input name) for tensors -- or are generated: for a text folder, real
sentences tokenized by the folder's tokenizer; otherwise random tensors that respect the model's
dims, datatypes and token ranges (an integer input that indexes an embedding table stays below the
table's size; masks are ones, token types zeros).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx

from onnxserve.core.pipeline import PipelineSpec, TextBatch, TextPipeline
from onnxserve.errors import InvalidInputError, OptimizeError
from onnxserve.toolkit.sample_inputs import index_bounds, random_feeds, signature

Feeds = dict[str, npt.NDArray[Any]]

SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "How do I reset my password if I no longer have access to my email?",
    "Stocks fell sharply on Monday after the central bank raised interest rates.",
    "The restaurant was quiet, the food arrived warm and the staff were friendly.",
    "Please send the quarterly report to the finance team before Friday.",
    "A",
    "Heavy rain is expected across the north of the country this weekend.",
    "She finished the marathon in just under four hours.",
    "This phone's battery barely lasts half a day.",
    "Machine learning models can be exported to ONNX and served on many platforms.",
    "Where is the nearest train station?",
    "The museum reopens next month with a new exhibition on ancient Egypt.",
    "I loved the movie, although the ending felt a little rushed.",
    "Our team will review the pull request tomorrow morning.",
    "Add two cups of flour and stir until the batter is smooth.",
    "The patient reported mild headaches and trouble sleeping.",
)
"""Real-looking sentences of varied length and topic: a text model's default sample inputs."""

BATCH = 8
"""Rows per sample batch."""

GENERATED_BATCHES = 4
GENERATED_SEQUENCE = 16
"""Generated tensors: this many batches, and this length for a dynamic non-batch dim."""


@dataclass(frozen=True)
class Samples:
    batches: list[Feeds]
    source: str  # where they came from, for the report
    texts: list[str] | None = None  # the sentences, for a text model
    recipe: dict[str, Any] = field(default_factory=dict)  # how to make the same samples again (metadata)

    @property
    def rows(self) -> int:
        return sum(batch_rows(b) for b in self.batches if b)

    @property
    def labels(self) -> list[str]:
        """One name per row, in order: the sentence for a text model, else ``row N``."""
        if self.texts is not None and len(self.texts) == self.rows:
            return list(self.texts)
        return [f"row {i}" for i in range(self.rows)]


def batch_rows(feeds: Feeds) -> int:
    """The rows of a sample batch: the first axis of its first input (1 for scalars or no inputs)."""
    first = next(iter(feeds.values()), None)
    return len(first) if first is not None and first.ndim else 1


def text_pipeline(folder: Path | None, input_names: Sequence[str]) -> TextPipeline | None:
    """The folder's text pipeline, or None when ``folder`` is not a text model folder."""
    if folder is None:
        return None
    spec = PipelineSpec.read(folder)
    if spec is None or not (folder / "tokenizer.json").is_file():
        return None
    return TextPipeline(folder, spec, list(input_names))


def load_samples(model: onnx.ModelProto, text: TextPipeline | None, calibration: Path | None, seed: int = 0) -> Samples:
    """Sample batches for ``model``: from ``calibration`` when given, else generated."""
    if calibration is not None:
        return _from_file(model, text, calibration)
    if text is not None:
        return _texts(text, list(SENTENCES), "built-in sentences tokenized by the folder's tokenizer")
    return generate(model, seed)


def _texts(text: TextPipeline, lines: list[str], source: str, batch: int = BATCH) -> Samples:
    if text.is_qa:
        pairs = [(line, SENTENCES[i % len(SENTENCES)]) for i, line in enumerate(lines)]
        batches = [
            text.encode(TextBatch([q for q, _ in pairs[i : i + batch]], [c for _, c in pairs[i : i + batch]])).feeds
            for i in range(0, len(pairs), batch)
        ]
    else:
        batches = [text.encode(TextBatch(lines[i : i + batch])).feeds for i in range(0, len(lines), batch)]
    return Samples(batches, source, lines)


def _text_lines(path: Path) -> list[str]:
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise OptimizeError(f"calibration file {path}: not UTF-8 text (give text lines, .npy or .npz)") from None
    if not lines:
        raise OptimizeError(f"calibration file {path} has no text lines")
    return lines


def _from_file(model: onnx.ModelProto, text: TextPipeline | None, path: Path) -> Samples:
    if not path.is_file():
        raise OptimizeError(f"calibration file {path} not found")
    suffix = path.suffix.lower()
    if suffix in (".npy", ".npz"):
        return _from_arrays(model, path)
    if text is None:
        raise OptimizeError(
            f"calibration file {path}: text lines need a text model folder (tokenizer.json + onnxserve.json); "
            "for a model file give .npy (one input) or .npz (one array per input name)"
        )
    lines = _text_lines(path)
    return _texts(text, lines, f"{len(lines)} lines of {path.name} tokenized by the folder's tokenizer")


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    initializers = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initializers]


def _from_arrays(model: onnx.ModelProto, path: Path) -> Samples:
    inputs = {i.name: i for i in _graph_inputs(model)}
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise OptimizeError(f"calibration file {path}: cannot read it as {path.suffix}: {e}") from None
    if isinstance(loaded, np.ndarray):
        if len(inputs) != 1:
            raise OptimizeError(
                f"calibration file {path}: a .npy holds one array but the model has {len(inputs)} inputs "
                f"({', '.join(inputs)}); give an .npz with one array per input name"
            )
        arrays = {next(iter(inputs)): loaded}
    else:
        with loaded:
            arrays = {name: loaded[name] for name in loaded.files}
        missing = sorted(set(inputs) - set(arrays))
        extra = sorted(set(arrays) - set(inputs))
        if missing or extra:
            raise OptimizeError(
                f"calibration file {path}: arrays must be named after the model's inputs ({', '.join(inputs)})"
                + (f"; missing {', '.join(missing)}" if missing else "")
                + (f"; unknown {', '.join(extra)}" if extra else "")
            )
    rows = {len(a) if a.ndim else 0 for a in arrays.values()}
    if len(rows) != 1 or 0 in rows:
        raise OptimizeError(f"calibration file {path}: every array needs the same number of rows (first axis), > 0")
    checked = {name: _conform(path, inputs[name], array) for name, array in arrays.items()}
    total = rows.pop()
    batches = [{n: a[i : i + BATCH] for n, a in checked.items()} for i in range(0, total, BATCH)]
    return Samples(batches, f"{total} rows of {path.name}")


def _conform(path: Path, info: onnx.ValueInfoProto, array: npt.NDArray[Any]) -> npt.NDArray[Any]:
    tensor = info.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
    if len(dims) != array.ndim:
        raise OptimizeError(
            f"calibration file {path}: input {info.name!r} has {len(dims)} dims but the array has {array.ndim} "
            f"(shape {list(array.shape)})"
        )
    for axis, (want, have) in enumerate(zip(dims, array.shape, strict=True)):
        if axis > 0 and want >= 0 and want != have:
            raise OptimizeError(
                f"calibration file {path}: input {info.name!r} needs size {want} on axis {axis}, got {have}"
            )
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)
    if array.dtype != dtype and not np.can_cast(array.dtype, dtype, casting="same_kind"):
        raise OptimizeError(f"calibration file {path}: input {info.name!r} needs {dtype}, got {array.dtype}")
    return array.astype(dtype, copy=False)


def token_ranges(model: onnx.ModelProto) -> dict[str, int]:
    """Integer inputs that index an embedding table (a Gather's indices, perhaps through a Cast),
    with the table's number of rows."""
    return index_bounds([model.graph])


def generate(model: onnx.ModelProto, seed: int = 0, batch: int = BATCH) -> Samples:
    """Random inputs by the toolkit's one generator (:func:`onnxserve.toolkit.sample_inputs.random_feeds`):
    the model's dims and datatypes, token ids below the embedding table's size, masks of ones."""
    rng = np.random.default_rng(seed)
    spec, ranges = signature(model.graph), token_ranges(model)
    try:
        batches = [random_feeds(spec, ranges, rng, batch, GENERATED_SEQUENCE) for _ in range(GENERATED_BATCHES)]
    except InvalidInputError as e:
        raise OptimizeError(f"{e.message.removesuffix('; give samples')}; give a calibration file") from None
    return Samples(batches, f"{GENERATED_BATCHES} batches of generated inputs (seed {seed})")


def resize_batch(feeds: Feeds, rows: int) -> Feeds:
    """``feeds`` with ``rows`` rows, repeating its rows in turn (latency at a given batch size)."""
    have = len(next(iter(feeds.values())))
    index = np.arange(rows) % have
    return {name: np.ascontiguousarray(array[index]) for name, array in feeds.items()}


# -- the evaluation set: what accuracy is measured on ------------------------------------------------------

EVAL_SENTENCES_FILE = Path(__file__).parent / "data" / "eval_sentences.txt"
"""Real sentences of every length (one word to a long paragraph), several languages and domains,
numbers, code and punctuation-only lines: a text model's built-in evaluation set."""

HELD_OUT_EVERY = 4
"""Every fourth line (the 4th, 8th, ...) of the built-in set is held out: never used to choose
anything, only to check the choice."""

SPLITS = ("search", "held-out")


def eval_sentences(split: str) -> list[str]:
    """The built-in evaluation sentences of ``split`` (``search`` or ``held-out``), in file order."""
    if split not in SPLITS:
        raise OptimizeError(f"unknown evaluation split {split!r}; choose search or held-out")
    lines = [line for line in EVAL_SENTENCES_FILE.read_text(encoding="utf-8").splitlines() if line.strip()]
    held = split == "held-out"
    return [line for i, line in enumerate(lines) if (i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1) == held]


@dataclass(frozen=True)
class EvaluationSets:
    """Where a transform is chosen (``search``) and where the choice is checked (``held_out``)."""

    search: Samples
    held_out: Samples


def evaluation_set(
    model: onnx.ModelProto, text: TextPipeline | None, split: str, extra: Path | None = None, seed: int = 0
) -> Samples:
    """One split of the evaluation set.

    A text model: the built-in sentences of ``split``, one input each (no padding shared between
    sentences), plus the lines of ``extra``. A tensor model: the arrays of ``extra`` (.npy / .npz),
    else generated inputs (seed ``seed`` for the search split, ``seed + 1`` held out).
    """
    if text is not None and (extra is None or extra.suffix.lower() not in (".npy", ".npz")):
        lines = eval_sentences(split)
        source = f"{len(lines)} built-in evaluation sentences ({split} split)"
        recipe: dict[str, Any] = {"kind": "builtin-sentences", "split": split, "rows": len(lines)}
        if extra is not None:
            if not extra.is_file():
                raise OptimizeError(f"evaluation file {extra} not found")
            added = _text_lines(extra)
            lines = lines + added
            source += f" + {len(added)} lines of {extra.name}"
            recipe["file"] = extra.name
        encoded = _texts(text, lines, source, batch=1)
        return Samples(encoded.batches, encoded.source, encoded.texts, recipe)
    if extra is not None:
        loaded = _from_file(model, text, extra)
        return Samples(loaded.batches, loaded.source, loaded.texts, {"kind": "file", "file": extra.name})
    generated = generate(model, seed if split == "search" else seed + 1)
    return Samples(generated.batches, generated.source, None, {"kind": "generated", "seed": seed + (split != "search")})


def evaluation_sets(
    model: onnx.ModelProto, text: TextPipeline | None, calibration: Path | None, held_out: Path | None
) -> EvaluationSets:
    """The search split (plus the user's ``--calibration``) and the held-out split (plus ``--eval``).

    A tensor model measured on the user's samples: without ``--eval`` the calibration samples are
    measured (the report names them); generated inputs would not represent the user's data.
    """
    if text is None and held_out is None:
        held_out = calibration
    return EvaluationSets(
        evaluation_set(model, text, "search", calibration), evaluation_set(model, text, "held-out", held_out)
    )


def remake(model: onnx.ModelProto, text: TextPipeline | None, recipe: dict[str, Any]) -> Samples | None:
    """The samples a recorded ``recipe`` describes, when they can be made again without the user's files."""
    kind = recipe.get("kind")
    if kind == "builtin-sentences" and text is not None and "file" not in recipe:
        return evaluation_set(model, text, str(recipe.get("split", "held-out")))
    if kind == "generated" and text is None:
        seed = int(recipe.get("seed", 1))
        made = generate(model, seed)
        return Samples(made.batches, made.source, None, {"kind": "generated", "seed": seed})
    return None
