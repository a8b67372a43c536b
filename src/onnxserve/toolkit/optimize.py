"""``onnxserve optimize``: composable transforms over an ONNX model, each checked before it is kept.

Steps, applied in this order when asked for:

1. ``simplify``: constant folding and dead-node removal (onnxscript's optimizer);
2. ``fuse``: transformer fusions for BERT-like encoders, see :mod:`onnxserve.toolkit.fusion` (the
   report compares what the source's layers call for with what the result has, and says why a
   fusion is missing);
3. ``fp16``: float16 weights and compute with float32 inputs and outputs kept (for GPUs);
4. ``int8`` / ``int8-static``: see :mod:`onnxserve.toolkit.quantize`;
5. ``level``: ONNX Runtime's offline graph optimization (basic, extended or all) saved to a file,
   so that the server's start-up skips it. ``extended`` and ``all`` may write operators for this
   machine's execution provider only.

The result is compared with the source on the held-out split of the evaluation set (see
:mod:`onnxserve.toolkit.samples` and :mod:`onnxserve.toolkit.evaluation`), timed at a few batch sizes,
and written -- a version folder keeps its tokenizer and pipeline spec -- only when it keeps the
accuracy budget. int8 is selective where a budget applies (the default budget of a quantized model,
or ``--max-accuracy-loss``): the most sensitive nodes stay in float until the worst case on the search
split keeps the budget (:mod:`onnxserve.toolkit.selective`). What was measured is written into the
model's metadata (``onnxserve.accuracy``) and the report. Writing goes through a temporary sibling and
a rename.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import orjson
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from onnxserve.config import SessionOptions
from onnxserve.core.cpu import cpu_budget
from onnxserve.core.pipeline import PipelineSpec, TextPipeline
from onnxserve.core.repository import MODEL_FILENAME
from onnxserve.core.runtime import create_session
from onnxserve.errors import ModelLoadError, OptimizeError
from onnxserve.toolkit.atomic_file import write_atomically
from onnxserve.toolkit.export.staging import staging_folder
from onnxserve.toolkit.fusion import fuse, quiet
from onnxserve.toolkit.hardware import detect
from onnxserve.toolkit.model_file import load_model
from onnxserve.toolkit.optimize_report import (
    REPORT_FILENAME,
    Accuracy,
    AccuracyBudget,
    Fusion,
    OptimizeReport,
    compare_models,
    interleaved_latency_ms,
    open_session,
)
from onnxserve.toolkit.quantize import QuantizeSettings, quantize_model, settings_for
from onnxserve.toolkit.samples import Samples, evaluation_sets, load_samples, text_pipeline
from onnxserve.toolkit.selective import PER_TENSOR, SCHEMES, Selection, check_schemes, select

ACCURACY_METADATA = "onnxserve.accuracy"
"""The metadata property of an optimized model holding what its accuracy was measured on, and how."""

LEVELS = ("basic", "extended", "all")
LATENCY_BATCHES = (1, 8)
SKIPPED_FILES = {MODEL_FILENAME, REPORT_FILENAME, "validation.json"}
"""Files of a source folder not copied: the model (rewritten) and reports about the source."""


@dataclass(frozen=True)
class OptimizeOptions:
    level: str | None = None  # offline graph optimization: basic, extended, all
    fuse: bool = False
    quantize: str | None = None  # int8 or int8-static
    calibration: Path | None = None
    fp16: bool = False
    simplify: bool = False
    budget: AccuracyBudget | None = None  # None: the default budget of a quantized model (none otherwise)
    evaluation: Path | None = None  # held-out inputs of the user's (--eval), besides the built-in ones
    selective: bool = True  # int8 keeps the most sensitive nodes in float to meet the budget
    int8_schemes: tuple[str, ...] = SCHEMES  # the int8 schemes selective int8 may give a MatMul
    latency_batches: tuple[int, ...] = LATENCY_BATCHES
    repeats: int = 10
    threads: int = 0  # 0: the CPUs this process may use
    reduce_range: bool | None = None  # None: unless the CPU has VNNI
    force: bool = False
    allow_slower: bool = False  # write the result even when it is slower at every measured batch size

    def check(self) -> None:
        if self.level is not None and self.level not in LEVELS:
            raise OptimizeError(f"--level {self.level!r}: choose one of {', '.join(LEVELS)}")
        if self.quantize is not None:
            settings_for(self.quantize)
        if self.quantize == "int8-static" and self.calibration is None:
            raise OptimizeError("--quantize int8-static needs --calibration FILE (text lines, .npy or .npz)")
        if self.fp16 and self.quantize:
            raise OptimizeError("--fp16 and --quantize cannot be combined: choose float16 (GPU) or int8 (CPU)")
        if self.repeats < 1 or any(b < 1 for b in self.latency_batches):
            raise OptimizeError("--repeats and every batch size must be at least 1")
        if self.threads < 0:
            raise OptimizeError("--threads must be >= 0")
        check_schemes(self.int8_schemes)
        if set(self.int8_schemes) != set(SCHEMES) and self.quantize is None:
            raise OptimizeError("--int8-schemes applies to --quantize int8 or int8-static")
        if PER_TENSOR not in self.int8_schemes and (
            not self.selective or (self.budget is not None and self.budget.empty)
        ):
            raise OptimizeError(
                f"--int8-schemes without {PER_TENSOR} needs selective int8 under an accuracy budget "
                "(without it every node is per-tensor int8): drop --no-selective / --max-accuracy-loss none"
            )

    def budget_for(self, task: str | None) -> AccuracyBudget:
        """The budget that applies: the given one, else the default budget when quantizing, else none."""
        if self.budget is not None:
            return self.budget
        return AccuracyBudget.default_for(task) if self.quantize else AccuracyBudget()

    @property
    def steps(self) -> list[str]:
        names = ["simplify"] if self.simplify else []
        names += ["fuse"] if self.fuse else []
        names += ["fp16"] if self.fp16 else []
        names += [self.quantize] if self.quantize else []
        names += [f"level={self.level}"] if self.level else []
        return names


@dataclass(frozen=True)
class Source:
    """The model to optimize: a file, or a version folder (with its tokenizer and pipeline spec), read
    once (``model``, external data included) with its bytes on disk (``size``)."""

    path: Path
    model_file: Path
    folder: Path | None
    spec: PipelineSpec | None
    text: TextPipeline | None
    model: onnx.ModelProto
    size: int

    @property
    def task(self) -> str | None:
        return self.spec.task if self.spec is not None else None


def resolve_source(src: Path) -> Source:
    """The model to optimize, read by the toolkit's one loader (a :class:`ModelLoadError` when it cannot be)."""
    proto = load_model(src)
    model_file, folder = (src / MODEL_FILENAME, src) if src.is_dir() else (src, None)
    size = file_size(model_file, proto)
    try:
        onnx.external_data_helper.load_external_data_for_model(proto, str(model_file.parent))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{model_file}: cannot read its external data ({e})") from None
    spec = PipelineSpec.read(folder) if folder is not None else None
    initializers = {t.name for t in proto.graph.initializer}
    names = [i.name for i in proto.graph.input if i.name not in initializers]
    return Source(src, model_file, folder, spec, text_pipeline(folder, names), proto, size)


def check_destination(source: Source, dst: Path, force: bool) -> None:
    if source.folder is None and dst.suffix != ".onnx":
        raise OptimizeError(f"--output {dst}: a model file optimizes to a .onnx file")
    if source.folder is not None and dst.suffix == ".onnx":
        raise OptimizeError(f"--output {dst}: a version folder optimizes to a folder, not a .onnx file")
    if dst.resolve() == source.path.resolve():
        raise OptimizeError(f"--output {dst} is the source; write the optimized model elsewhere")
    if dst.exists() and not force:
        raise OptimizeError(f"{dst} already exists; pass --force to replace it")


# -- the transforms: each takes a model and returns a new one (its input left as it was) ---------------------


def simplify(model: onnx.ModelProto) -> onnx.ModelProto:
    """Constant folding and removal of unused nodes (onnxscript's optimizer)."""
    try:
        import onnx_ir as ir
        import onnxscript.optimizer
    except ImportError:
        raise OptimizeError("--simplify needs onnxscript: pip install 'onnxserve[export]'") from None
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # the IR may share the proto's tensors, and the optimizer rewrites in place
    graph = ir.from_proto(copy)
    onnxscript.optimizer.optimize(graph)
    simplified: onnx.ModelProto = ir.to_proto(graph)
    return simplified


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Float16 weights and compute; inputs and outputs keep their float32 types."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # the converter rewrites the model it is given
    with quiet():
        converted: onnx.ModelProto = convert_float_to_float16(copy, keep_io_types=True)
    return converted


def offline_level(model: onnx.ModelProto, level: str) -> onnx.ModelProto:
    """ONNX Runtime's graph optimizations at ``level``, as the session saves them
    (SessionOptions.optimized_model_filepath: a file, written in a temporary folder of the pass's own)."""
    with tempfile.TemporaryDirectory(prefix="onnxserve-level-") as work:
        saved = Path(work) / f"level-{level}.onnx"
        try:
            create_session(model, options=SessionOptions(graph_optimization_level=level), save_optimized=saved)  # type: ignore[arg-type]
        except ModelLoadError as e:
            raise OptimizeError(f"ONNX Runtime could not optimize the graph at level {level}: {e.__cause__}") from e
        return onnx.load(str(saved))


@dataclass
class Built:
    """A transformed model, with what the steps reported."""

    model: onnx.ModelProto
    fusions: list[Fusion] = field(default_factory=list)
    fusers: dict[str, dict[str, int]] = field(default_factory=dict)
    quantization: QuantizeSettings | None = None
    selection: Selection | None = None
    tables: list[dict[str, Any]] = field(default_factory=list)  # int8: the embedding tables, quantized or not


def build(
    source: Source,
    options: OptimizeOptions,
    samples: Samples,
    step: Callable[[str], None],
    search: Samples | None = None,
) -> Built:
    """Apply ``options``' steps in order to the source's model, each a pass from model to model; int8 is
    selective (searched on ``search``) when ``search`` is given and a budget applies."""
    current = source.model
    built = Built(current)
    if options.simplify:
        step("simplify: constant folding")
        current = simplify(current)
    if options.fuse:
        step("fuse: transformer fusions")
        current, built.fusions, built.fusers = fuse(current, for_int8=options.quantize is not None)
    if options.fp16:
        step("fp16: float16 weights, float32 IO")
        current = to_fp16(current)
    if options.quantize:
        step(f"{options.quantize}: quantizing")
        built.quantization = settings_for(options.quantize, options.reduce_range)
        budget = options.budget_for(source.task)
        if options.selective and search is not None and not budget.empty:
            calibration = samples if options.quantize == "int8-static" else None
            built.selection = select(
                current, built.quantization, calibration, search, budget, source.task, step, options.int8_schemes
            )
            current, built.tables = built.selection.model, built.selection.tables
        else:
            current, built.tables = quantize_model(current, built.quantization, samples)
    if options.level:
        step(f"level {options.level}: ONNX Runtime graph optimization")
        current = offline_level(current, options.level)
    if current is source.model:  # no step: the result is a copy, so that stamping it leaves the source alone
        current = onnx.ModelProto()
        current.CopyFrom(source.model)
    built.model = current
    return built


def file_size(model_file: Path, proto: onnx.ModelProto | None = None) -> int:
    """The model's bytes on disk, external-data files included (``proto``: the file as read, without its
    external data, when the caller has it)."""
    total = model_file.stat().st_size
    if proto is None:
        proto = onnx.load_model(str(model_file), load_external_data=False)
    locations = {
        str(entry.value)
        for tensor in proto.graph.initializer
        for entry in tensor.external_data
        if entry.key == "location"
    }
    return total + sum((model_file.parent / loc).stat().st_size for loc in locations)


def serialized(model: onnx.ModelProto) -> bytes:
    """The model as one file's bytes (its external data inlined)."""
    if model.ByteSize() >= 2**31 - 1:
        raise OptimizeError("the optimized model is over 2 GiB; onnxserve optimize writes single-file models only")
    data: bytes = model.SerializeToString()
    return data


@contextlib.contextmanager
def _progress(console: Console | None) -> Iterator[Callable[[str], None]]:
    if console is None:
        yield lambda _text: None
        return
    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console, transient=True
    ) as bar:
        task = bar.add_task("starting")

        def step(text: str) -> None:
            bar.update(task, description=text)

        yield step


def optimize(src: Path, dst: Path, options: OptimizeOptions, console: Console | None = None) -> OptimizeReport:
    """Transform ``src`` into ``dst``, check it against ``src`` and write it only within the budget.

    The source is read once, the passes go from model to model in memory, and the result is written once,
    whole or not at all: a failure anywhere leaves ``dst`` as it was."""
    options.check()
    source = resolve_source(src)
    check_destination(source, dst, options.force)
    samples = load_samples(source.model, source.text, options.calibration)
    sets = evaluation_sets(source.model, source.text, options.calibration, options.evaluation)
    threads = options.threads or cpu_budget()
    _work_parent(dst)
    with _progress(console) as step:
        built = build(source, options, samples, step, sets.search)
        step("checking accuracy on the held-out evaluation inputs")
        accuracy = compare_models(source.model, built.model, sets.held_out, source.task)
        budget = options.budget_for(source.task)
        record = accuracy_record(src, options.steps, sets.held_out.recipe, budget, accuracy, built.selection)
        stamp_accuracy(built.model, record)
        step("timing before and after")
        sessions = {
            "before": open_session(source.model, threads, where=str(source.model_file)),
            "after": open_session(built.model, threads),
        }
        latency_before: dict[int, float] = {}
        latency_after: dict[int, float] = {}
        for batch in options.latency_batches:
            timed = interleaved_latency_ms(sessions, samples.batches[0], batch, options.repeats)
            latency_before[batch], latency_after[batch] = timed["before"], timed["after"]
        del sessions
        report = OptimizeReport(
            source=str(src),
            destination=str(dst),
            steps=options.steps,
            accuracy=accuracy,
            size_before=source.size,
            size_after=built.model.ByteSize(),
            latency_before_ms=latency_before,
            latency_after_ms=latency_after,
            threads=threads,
            budget=budget,
            fusions=built.fusions,
            fusers=built.fusers,
            quantization={**built.quantization.to_dict(), "embedding_tables": built.tables}
            if built.quantization
            else None,
            hardware=detect().to_dict(),
            evaluated_on=sets.held_out.recipe,
            selection=built.selection.to_dict() if built.selection else None,
            search_passed=built.selection.passed if built.selection else None,
        )
        if not report.passed:
            raise BudgetError(report)
        if not options.allow_slower and slower_everywhere(report):
            raise SlowerError(report)
        step(f"writing {dst}")
        write_result(source, built.model, dst, report, options.force)
    return report


class BudgetError(OptimizeError):
    """The transformed model broke the accuracy budget; nothing was written."""

    def __init__(self, report: OptimizeReport) -> None:
        super().__init__(
            f"the optimized model breaks the accuracy budget ({'; '.join(report.violations)}); "
            f"{report.destination} was not written"
        )
        self.report = report


SLOWER_MARGIN = 1.10
"""How much slower than its source (median latency) a result must be at a batch size to count as
slower there: timing noise on a busy machine is a few percent either way."""


def slower_everywhere(report: OptimizeReport) -> bool:
    """Whether the result is slower than its source at every measured batch size."""
    return bool(report.latency_before_ms) and all(
        report.latency_after_ms[batch] > before * SLOWER_MARGIN for batch, before in report.latency_before_ms.items()
    )


class SlowerError(BudgetError):
    """The transformed model is slower than its source at every measured batch size; nothing was written."""

    def __init__(self, report: OptimizeReport) -> None:
        timings = ", ".join(
            f"batch {batch}: {report.latency_after_ms[batch] / before:.2f}x slower"
            for batch, before in report.latency_before_ms.items()
        )
        OptimizeError.__init__(
            self,
            f"the optimized model is slower than its source at every measured batch size ({timings}); "
            f"{report.destination} was not written (pass --allow-slower to write it anyway, e.g. for its size)",
        )
        self.report = report


def accuracy_record(
    src: Path,
    steps: list[str],
    recipe: dict[str, Any],
    budget: AccuracyBudget,
    accuracy: Accuracy,
    selection: Selection | None,
) -> dict[str, Any]:
    """What the model's metadata says about its accuracy: enough for ``diff`` to measure it again."""
    return {
        "reference": src.name,
        "evaluated_on": recipe,
        "budget": budget.to_dict(),
        "accuracy": accuracy.to_dict(),
        "float_nodes": selection.float_nodes if selection else [],
        "blockwise_int8_nodes": selection.blockwise_nodes if selection else [],
        "outlier_channel_nodes": selection.split_nodes if selection else {},
        "steps": steps,
    }


def stamp_accuracy(model: onnx.ModelProto, record: dict[str, Any]) -> None:
    """Write an :func:`accuracy_record` into the model's metadata (``onnxserve.accuracy``)."""
    kept = [p for p in model.metadata_props if p.key != ACCURACY_METADATA]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    entry = model.metadata_props.add()
    entry.key, entry.value = ACCURACY_METADATA, orjson.dumps(record).decode()


def _work_parent(dst: Path) -> Path:
    """Work files go beside the destination (same file system as the final rename)."""
    parent = dst.parent if dst.parent != Path("") else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    return parent


def report_path(dst: Path, is_folder: bool) -> Path:
    return dst / REPORT_FILENAME if is_folder else dst.with_name(f"{dst.name}.report.json")


def write_result(source: Source, model: onnx.ModelProto, dst: Path, report: Any, force: bool) -> None:
    """Write the model (and, for a folder, the source's tokenizer and spec) and the report, all or nothing:
    a version folder through a staging folder, a file through a temporary sibling renamed into place."""
    data = serialized(model)
    if source.folder is not None:
        with staging_folder(dst, force) as staging:
            for item in source.folder.iterdir():
                if item.is_file() and item.name not in SKIPPED_FILES and item.suffix not in (".onnx", ".data"):
                    shutil.copy2(item, staging / item.name)
            (staging / MODEL_FILENAME).write_bytes(data)
            report.write(staging / REPORT_FILENAME)
        return
    if dst.exists() and not force:
        raise OptimizeError(f"{dst} already exists; pass --force to replace it")
    partial_report = dst.with_name(f".{dst.name}.report.partial-{os.getpid()}")
    try:
        report.write(partial_report)
        partial_report.replace(report_path(dst, False))
        write_atomically(dst, data)
    finally:
        partial_report.unlink(missing_ok=True)
