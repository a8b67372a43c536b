"""Export a local Hugging Face Transformers folder to an ONNX version folder, validated against PyTorch.

The version folder receives ``model.onnx``, the tokenizer files, the pipeline spec
(``onnxserve.json``) and the validation report (``validation.json``). Nothing is written at the
output path unless validation passes: the export happens in a temporary sibling folder that is
renamed into place at the end.
"""

from __future__ import annotations

import json
import re
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import orjson
from rich.console import Console

from onnxserve.core.pipeline import PipelineSpec
from onnxserve.core.repository import MODEL_FILENAME
from onnxserve.core.runtime import ModelSession
from onnxserve.errors import ExportError
from onnxserve.toolkit.export.environment import require
from onnxserve.toolkit.export.single_file import write_single_file
from onnxserve.toolkit.export.staging import staging_folder
from onnxserve.toolkit.sample_inputs import Dim, random_feeds
from onnxserve.toolkit.validate import Arrays, CaseResult, ValidationReport, compare

TASKS: dict[str, tuple[str, tuple[str, ...]]] = {
    "feature-extraction": ("AutoModel", ("last_hidden_state",)),
    "text-classification": ("AutoModelForSequenceClassification", ("logits",)),
    "token-classification": ("AutoModelForTokenClassification", ("logits",)),
    "question-answering": ("AutoModelForQuestionAnswering", ("start_logits", "end_logits")),
    "fill-mask": ("AutoModelForMaskedLM", ("logits",)),
    "text-ranking": ("AutoModelForSequenceClassification", ("logits",)),  # cross-encoders: (query, text) pairs
}
"""Each task: the transformers auto class that loads it, and the graph outputs it exports."""

ARCHITECTURES = ("bert", "distilbert", "roberta", "xlm-roberta", "camembert", "electra", "mpnet", "albert")
"""``config.model_type`` values this exporter is tested or known to work with (encoder-only models)."""

OFFSET_POSITIONS = ("roberta", "xlm-roberta", "camembert")
"""Architectures whose position ids are offset by the padding index."""

TOKEN_LEVEL_OUTPUTS = {"last_hidden_state", "start_logits", "end_logits"}
"""Outputs with a sequence axis (plus ``logits`` for token-level tasks), compared at real tokens only."""

POOLINGS = ("mean", "cls", "none")
REPORT_FILENAME = "validation.json"
_TWO_GIB = 2 * 1024**3
_SAMPLE_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "ONNX Runtime serves this model.",
    "A",
    "Sentence embeddings map text to vectors so that similar meanings land close together, "
    "which makes them useful for search, clustering and deduplication.",
)
_SAMPLE_QUERIES = ("What serves this model?", "Which animal jumps over the dog?", "How are embeddings used?")
"""Queries that text-ranking validation ranks ``_SAMPLE_TEXTS`` for."""
RANKING_LABELS = (1, 2)
"""Cross-encoders give one relevance logit, or two classes whose second is "relevant"."""


@dataclass(frozen=True)
class HfExportOptions:
    task: str
    pooling: str | None = None  # None: from the sentence-transformers config, else "none"
    normalize: bool | None = None  # None: from the sentence-transformers config, else False
    opset: int = 18
    force: bool = False
    fp16: bool = False  # weights and compute in float16, inputs and outputs kept as they are (for GPUs)
    atol: float | None = None  # None: 1e-4, or 2e-2 with fp16
    min_cosine: float | None = None  # None: 0.9999, or 0.999 with fp16
    min_agreement: float = 1.0  # task measure: labels / tokens / spans / top-1 that must agree

    @property
    def tolerance(self) -> float:
        return self.atol if self.atol is not None else (2e-2 if self.fp16 else 1e-4)

    @property
    def cosine(self) -> float:
        return self.min_cosine if self.min_cosine is not None else (0.999 if self.fp16 else 0.9999)


def check_environment() -> None:
    """One clear error when an export dependency is missing."""
    require("torch", "transformers", "onnxscript")


HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def resolve_source(src: str | Path) -> Path:
    """A local folder as it is; an ``owner/name`` that is no local folder is fetched from the Hugging Face hub."""
    folder = Path(src)
    if folder.exists() or not HUB_ID.match(str(src)):
        return folder
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(src)))
    except Exception as e:  # the hub client raises many types (offline, not found, gated)
        raise ExportError(f"{src} is no local folder and cannot be fetched from the Hugging Face hub: {e}") from None


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / f).is_file() for f in ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model"))


def sentence_transformers_pooling(folder: Path) -> tuple[str, bool] | None:
    """(pooling, normalize) from a sentence-transformers folder's modules.json, or None."""
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return None
    modules = json.loads(modules_file.read_text())
    pooling, normalize = "none", False
    for module in modules:
        kind = module.get("type", "")
        if kind.endswith("Pooling"):
            config = json.loads((folder / module.get("path", "") / "config.json").read_text())
            if config.get("pooling_mode_mean_tokens"):
                pooling = "mean"
            elif config.get("pooling_mode_cls_token"):
                pooling = "cls"
            else:
                raise ExportError(f"{folder}: unsupported sentence-transformers pooling {config}")
        elif kind.endswith("Normalize"):
            normalize = True
    return pooling, normalize


def _max_length(folder: Path, tokenizer: Any, model_config: Any) -> int:
    st_config = folder / "sentence_bert_config.json"
    if st_config.is_file():
        length = json.loads(st_config.read_text()).get("max_seq_length")
        if isinstance(length, int) and length > 0:
            return length
    positions = getattr(model_config, "max_position_embeddings", None)
    if isinstance(positions, int) and getattr(model_config, "model_type", "") in OFFSET_POSITIONS:
        # RoBERTa-family position ids start after the padding index: that many fewer tokens fit.
        positions -= int(getattr(model_config, "pad_token_id", 1) or 0) + 1
    limits = [positions, getattr(tokenizer, "model_max_length", None)]
    usable = [int(x) for x in limits if isinstance(x, int) and 0 < x < 1_000_000]
    return min(usable) if usable else 512


def export_huggingface(
    src: str | Path, output: Path, options: HfExportOptions, progress: Console | None = None
) -> ValidationReport:
    """Export, validate, and only then write ``output``; raise ExportError (writing nothing) otherwise.

    ``output`` is a version folder, or a ``.onnx`` file name: then one self-contained file carrying
    its tokenizer and pipeline spec in its metadata (see ``single_file``)."""
    console = progress or Console(stderr=True, quiet=True)
    if output.suffix == ".onnx":
        if output.is_dir():
            raise ExportError(f"{output} is a folder; give a new .onnx file name or a folder name")
        if output.exists() and not options.force:
            raise ExportError(f"{output} already exists; pass --force to replace it")
        output.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{output.name}.partial-", dir=output.parent) as work:
            report = export_huggingface(src, Path(work) / "version", replace(options, force=False), progress)
            with console.status(f"writing {output} (tokenizer and pipeline spec in its metadata)"):
                write_single_file(Path(work) / "version", output)
        return report
    check_environment()
    if options.task not in TASKS:
        raise ExportError(f"unsupported task {options.task!r}; supported tasks: {', '.join(TASKS)}")
    folder = resolve_source(src)
    if not (folder / "config.json").is_file():
        raise ExportError(f"{folder} is not a Hugging Face model folder (no config.json)")
    model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    if model_type not in ARCHITECTURES:
        raise ExportError(
            f"unsupported architecture {model_type!r}; supported: {', '.join(ARCHITECTURES)} (encoder models)"
        )
    if not _has_tokenizer(folder):
        raise ExportError(f"{folder} has no tokenizer (tokenizer.json or vocab files); text models need one")
    pooling, normalize = _pooling(folder, options)

    with staging_folder(output, options.force) as staging:
        with console.status(f"loading {folder}"):
            model, tokenizer = _load(folder, TASKS[options.task][0])
        input_names = _input_names(model, tokenizer)
        if options.task == "text-ranking" and model.config.num_labels not in RANKING_LABELS:
            raise ExportError(
                f"text-ranking needs a cross-encoder with one relevance logit or two classes; this model has "
                f"{model.config.num_labels} labels (use --task text-classification)"
            )
        output_names = list(TASKS[options.task][1])
        if pooling != "none":
            output_names.append("sentence_embedding")
        wrapper = _wrap(model, input_names, output_names, pooling, normalize)
        max_length = _max_length(folder, tokenizer, model.config)
        model_file = staging / MODEL_FILENAME
        with console.status(f"exporting to ONNX (opset {options.opset})"):
            _export(wrapper, tokenizer, input_names, output_names, options.opset, model_file)
        if options.fp16:
            with console.status("converting weights to float16"):
                _to_fp16(model_file)
        tokenizer.save_pretrained(str(staging))
        _spec(options.task, model, tokenizer, input_names, output_names, max_length, pooling, normalize, folder).write(
            staging
        )
        with console.status("validating the ONNX model against PyTorch"):
            try:
                report = _validate(wrapper, tokenizer, input_names, model_file, max_length, options)
                if options.task == "text-ranking":
                    report.cases += _validate_ranking(wrapper, tokenizer, input_names, model_file, max_length, options)
            except (RuntimeError, ValueError, IndexError) as e:  # PyTorch or the runtime refused a case
                raise ExportError(f"validation could not run: {type(e).__name__}: {str(e).splitlines()[0]}") from e
        (staging / REPORT_FILENAME).write_bytes(orjson.dumps(report.to_dict(), option=orjson.OPT_INDENT_2))
        if not report.passed:
            raise ExportError(
                f"the ONNX model does not match the original; nothing was written to {output}\n{report.summary()}"
            )
    return report


def _pooling(folder: Path, options: HfExportOptions) -> tuple[str, bool]:
    """Pooling and normalization for feature-extraction (sentence-transformers' own by default)."""
    if options.task != "feature-extraction":
        if options.pooling not in (None, "none") or options.normalize:
            raise ExportError(f"--pooling and --normalize apply to feature-extraction, not {options.task}")
        return "none", False
    st = sentence_transformers_pooling(folder)
    pooling = options.pooling or (st[0] if st else "none")
    if pooling not in POOLINGS:
        raise ExportError(f"unsupported pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
    normalize = options.normalize if options.normalize is not None else (st[1] if st else False)
    if normalize and pooling == "none":
        raise ExportError("--normalize needs a pooled embedding; choose --pooling mean or cls")
    return pooling, normalize


def _spec(
    task: str,
    model: Any,
    tokenizer: Any,
    input_names: list[str],
    output_names: list[str],
    max_length: int,
    pooling: str,
    normalize: bool,
    folder: Path,
) -> PipelineSpec:
    config = model.config
    labels = {int(k): str(v) for k, v in (config.id2label or {}).items()} if task.endswith("classification") else {}
    multi_label = getattr(config, "problem_type", None) == "multi_label_classification"
    return PipelineSpec(
        task=task,
        inputs=input_names,
        outputs=output_names,
        max_length=max_length,
        pooling=pooling,  # type: ignore[arg-type]
        normalize=normalize,
        labels=labels,
        score_function="sigmoid" if multi_label else "softmax",
        mask_token=getattr(tokenizer, "mask_token", None) if task == "fill-mask" else None,
        source=folder.name,
    )


def _to_fp16(model_file: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    converted = convert_float_to_float16(onnx.load(str(model_file)), keep_io_types=True)
    onnx.save(converted, str(model_file))


def _load(folder: Path, auto_class: str) -> tuple[Any, Any]:
    import transformers
    from transformers import AutoTokenizer

    try:
        model = getattr(transformers, auto_class).from_pretrained(str(folder)).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, KeyError) as e:
        raise ExportError(f"{folder}: transformers cannot load this model: {e}") from None
    return model, tokenizer


def _input_names(model: Any, tokenizer: Any) -> list[str]:
    import inspect

    accepted = set(inspect.signature(model.forward).parameters)
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in accepted]
    wanted = set(getattr(tokenizer, "model_input_names", names))
    return [n for n in names if n in wanted or n == "input_ids"]


def _wrap(model: Any, input_names: list[str], output_names: list[str], pooling: str, normalize: bool) -> Any:
    """A module taking the token tensors positionally and returning the named outputs as a tuple."""
    import torch

    if pooling == "mean" and "attention_mask" not in input_names:
        raise ExportError("mean pooling needs an attention_mask input, which this model does not take")
    graph_outputs = [n for n in output_names if n != "sentence_embedding"]

    class Exported(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
            kwargs = dict(zip(input_names, args, strict=True))
            result = self.model(**kwargs)
            outs = [getattr(result, name) for name in graph_outputs]
            if pooling == "none":
                return tuple(outs)
            hidden = result.last_hidden_state
            if pooling == "cls":
                pooled = hidden[:, 0]
            else:
                mask = kwargs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            if normalize:
                pooled = torch.nn.functional.normalize(pooled, p=2.0, dim=1)
            return (*outs, pooled)

    return Exported().eval()


def _export(
    wrapper: Any, tokenizer: Any, input_names: list[str], output_names: list[str], opset: int, path: Path
) -> None:
    import torch

    sample = tokenizer(list(_SAMPLE_TEXTS[:2]), padding=True, return_tensors="pt")
    args = tuple(sample[n] if n in sample else torch.zeros_like(sample["input_ids"]) for n in input_names)
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    dynamic = {n: {0: batch, 1: sequence} for n in input_names}
    try:
        # The exporter's own deprecation noise must not turn into errors under strict warning filters.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                wrapper,
                args,
                None,
                input_names=input_names,
                output_names=output_names,
                dynamic_shapes=(tuple(dynamic[n] for n in input_names),),
                opset_version=opset,
                dynamo=True,
                verbose=False,
            )
        if program is None:
            raise ExportError("torch.onnx.export returned no program")
        size = sum(p.numel() * p.element_size() for p in wrapper.parameters())
        program.save(str(path), external_data=size >= _TWO_GIB)
    except Exception as e:  # the exporter raises many unrelated types
        cause = f" (caused by {type(e.__cause__).__name__}: {e.__cause__})" if e.__cause__ else ""
        raise ExportError(f"torch.onnx.export failed: {type(e).__name__}: {str(e).splitlines()[0]}{cause}") from e


def _ranking_logits(logits: npt.NDArray[Any]) -> npt.NDArray[Any]:
    from onnxserve.core.text_tasks import ranking_logit

    return ranking_logit(logits)


def _validate_ranking(
    wrapper: Any, tokenizer: Any, input_names: list[str], model_file: Path, max_length: int, options: HfExportOptions
) -> list[CaseResult]:
    """Real (query, text) pairs: the relevance logits within tolerance, and each query's ranking of the
    texts the same as PyTorch's (by the logit sentence-transformers' CrossEncoder scores with)."""
    import torch

    queries = [q for q in _SAMPLE_QUERIES for _ in _SAMPLE_TEXTS]
    texts = [t for _ in _SAMPLE_QUERIES for t in _SAMPLE_TEXTS]
    encoded = tokenizer(queries, texts, padding=True, truncation=True, max_length=max_length, return_tensors="np")
    feeds = {n: encoded[n].astype(np.int64) for n in input_names}
    session = ModelSession(model_file, name="exported model")
    with torch.no_grad():
        (logits,) = wrapper(*(torch.from_numpy(feeds[n]) for n in input_names))
    want = _ranking_logits(logits.numpy()).astype(np.float64)
    have = _ranking_logits(session.run(feeds, ["logits"])["logits"]).astype(np.float64)
    shape = (len(_SAMPLE_QUERIES), len(_SAMPLE_TEXTS))
    ref, cand = want.reshape(shape), have.reshape(shape)
    # every pair of texts a query's reference scores tell apart (by more than 10 atol) must keep its order
    decided = np.abs(ref[:, :, None] - ref[:, None, :]) > 10 * options.tolerance
    same = np.sign(ref[:, :, None] - ref[:, None, :]) == np.sign(cand[:, :, None] - cand[:, None, :])
    agreement = float(same[decided].mean()) if decided.any() else 1.0
    difference = float(np.max(np.abs(have - want)))
    passed = difference <= options.tolerance and agreement >= 1.0
    shapes = {k: list(v.shape) for k, v in feeds.items()}
    name = "real (query, text) pairs: relevance logits, and each query's ranking of the texts"
    return [CaseResult(name, shapes, {"relevance": difference}, {}, passed, {"ranking": agreement})]


def _validation_cases(tokenizer: Any, input_names: list[str], max_length: int) -> list[tuple[str, Arrays]]:
    rng = np.random.default_rng(0)
    vocab = int(getattr(tokenizer, "vocab_size", 1000))
    # the toolkit's one generator: ids below the vocabulary, masks ones, type ids zeros
    spec = {n: (onnx.TensorProto.INT64, list[Dim](["batch", "sequence"])) for n in ["input_ids", *input_names]}
    cases: list[tuple[str, Arrays]] = []
    for batch, sequence in ((1, 1), (1, 16), (3, 16), (3, max_length)):
        feeds = random_feeds(spec, {"input_ids": vocab}, rng, sizes={"batch": batch, "sequence": sequence})
        cases.append((f"random ids batch {batch} sequence {sequence}", feeds))
    texts = list(_SAMPLE_TEXTS)
    mask = getattr(tokenizer, "mask_token", None)
    if mask:
        texts[1] = f"ONNX Runtime {mask} this model."
    encoded = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="np")
    cases.append(("real text, padded batch", {n: encoded[n].astype(np.int64) for n in input_names}))
    return cases


def _validate(
    wrapper: Any,
    tokenizer: Any,
    input_names: list[str],
    model_file: Path,
    max_length: int,
    options: HfExportOptions,
) -> ValidationReport:
    import torch

    session = ModelSession(model_file, name="exported model")
    output_names = [o.name for o in session.outputs]
    token_level = set(TOKEN_LEVEL_OUTPUTS)
    if options.task in ("token-classification", "fill-mask"):
        token_level.add("logits")

    def reference(feeds: Arrays) -> Arrays:
        with torch.no_grad():
            outs = wrapper(*(torch.from_numpy(feeds[n]) for n in input_names))
        return {name: out.numpy() for name, out in zip(output_names, outs, strict=True)}

    def masked(run: Callable[[Arrays], Arrays]) -> Callable[[Arrays], Arrays]:
        # Outputs at padded positions are not meaningful; compare them as zeros on both sides.
        def call(feeds: Arrays) -> Arrays:
            outs = dict(run(feeds))
            if "attention_mask" in feeds:
                for name in token_level & set(outs):
                    mask = feeds["attention_mask"].astype(outs[name].dtype)
                    outs[name] = outs[name] * mask.reshape(mask.shape + (1,) * (outs[name].ndim - 2))
            return outs

        return call

    return compare(
        _validation_cases(tokenizer, input_names, max_length),
        masked(reference),
        masked(session.run),
        atol=options.tolerance,
        min_cosine=options.cosine,
        embedding_outputs=[n for n in output_names if n == "sentence_embedding"],
        agreement_outputs=[] if options.task == "feature-extraction" else list(TASKS[options.task][1]),
        min_agreement=options.min_agreement,
    )
