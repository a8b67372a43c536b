"""Export a local Hugging Face Transformers folder to an ONNX version folder, validated against PyTorch.

The version folder receives ``model.onnx``, the tokenizer files, the pipeline spec
(``onnxserve.json``) and the validation report (``validation.json``). Nothing is written at the
output path unless validation passes: the export happens in a temporary sibling folder that is
renamed into place at the end.
"""

from __future__ import annotations

import importlib
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
from rich.console import Console

from onnxserve.core.pipeline import PipelineSpec
from onnxserve.core.repository import MODEL_FILENAME
from onnxserve.core.runtime import ModelSession
from onnxserve.errors import ExportError
from onnxserve.toolkit.export.staging import staging_folder
from onnxserve.toolkit.validate import Arrays, ValidationReport, compare

TASKS = ("feature-extraction",)
"""Tasks this exporter supports today."""

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


@dataclass(frozen=True)
class HfExportOptions:
    task: str
    pooling: str | None = None  # None: from the sentence-transformers config, else "none"
    normalize: bool | None = None  # None: from the sentence-transformers config, else False
    opset: int = 18
    force: bool = False
    atol: float = 1e-4
    min_cosine: float = 0.9999


def check_environment() -> None:
    """One clear error when an export dependency is missing."""
    missing = []
    for module in ("torch", "transformers", "onnxscript"):
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ExportError(
            f"exporting needs {', '.join(missing)}; install the export extra: pip install 'onnxserve[export]'"
        )


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
    limits = [
        getattr(model_config, "max_position_embeddings", None),
        getattr(tokenizer, "model_max_length", None),
    ]
    usable = [int(x) for x in limits if isinstance(x, int) and 0 < x < 1_000_000]
    return min(usable) if usable else 512


def export_huggingface(
    src: str | Path, output: Path, options: HfExportOptions, progress: Console | None = None
) -> ValidationReport:
    """Export, validate, and only then write ``output``; raise ExportError (writing nothing) otherwise."""
    console = progress or Console(stderr=True, quiet=True)
    check_environment()
    if options.task not in TASKS:
        raise ExportError(f"unsupported task {options.task!r}; supported tasks: {', '.join(TASKS)}")
    folder = Path(src)
    if not (folder / "config.json").is_file():
        raise ExportError(f"{folder} is not a Hugging Face model folder (no config.json)")
    if not _has_tokenizer(folder):
        raise ExportError(f"{folder} has no tokenizer (tokenizer.json or vocab files); text models need one")
    st = sentence_transformers_pooling(folder)
    pooling = options.pooling or (st[0] if st else "none")
    if pooling not in POOLINGS:
        raise ExportError(f"unsupported pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
    normalize = options.normalize if options.normalize is not None else (st[1] if st else False)
    if normalize and pooling == "none":
        raise ExportError("--normalize needs a pooled embedding; choose --pooling mean or cls")

    with staging_folder(output, options.force) as staging:
        with console.status(f"loading {folder}"):
            model, tokenizer = _load(folder)
        input_names = _input_names(model, tokenizer)
        wrapper = _wrap(model, input_names, pooling, normalize)
        output_names = ["last_hidden_state"] + (["sentence_embedding"] if pooling != "none" else [])
        max_length = _max_length(folder, tokenizer, model.config)
        with console.status(f"exporting to ONNX (opset {options.opset})"):
            _export(wrapper, tokenizer, input_names, output_names, options.opset, staging / MODEL_FILENAME)
        tokenizer.save_pretrained(str(staging))
        PipelineSpec(
            task=options.task,
            inputs=input_names,
            outputs=output_names,
            max_length=max_length,
            pooling=pooling,  # type: ignore[arg-type]
            normalize=normalize,
            source=folder.name,
        ).write(staging)
        with console.status("validating the ONNX model against PyTorch"):
            report = _validate(wrapper, tokenizer, input_names, staging / MODEL_FILENAME, max_length, options)
        (staging / REPORT_FILENAME).write_bytes(orjson.dumps(report.to_dict(), option=orjson.OPT_INDENT_2))
        if not report.passed:
            raise ExportError(
                f"the ONNX model does not match the original; nothing was written to {output}\n{report.summary()}"
            )
    return report


def _load(folder: Path) -> tuple[Any, Any]:
    from transformers import AutoModel, AutoTokenizer

    try:
        model = AutoModel.from_pretrained(str(folder)).eval()
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


def _wrap(model: Any, input_names: list[str], pooling: str, normalize: bool) -> Any:
    import torch

    class FeatureExtraction(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
            kwargs = dict(zip(input_names, args, strict=True))
            hidden = self.model(**kwargs).last_hidden_state
            if pooling == "none":
                return (hidden,)
            if pooling == "cls":
                pooled = hidden[:, 0]
            else:
                mask = kwargs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            if normalize:
                pooled = torch.nn.functional.normalize(pooled, p=2.0, dim=1)
            return hidden, pooled

    if pooling == "mean" and "attention_mask" not in input_names:
        raise ExportError("mean pooling needs an attention_mask input, which this model does not take")
    return FeatureExtraction().eval()


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


def _validation_cases(tokenizer: Any, input_names: list[str], max_length: int) -> list[tuple[str, Arrays]]:
    rng = np.random.default_rng(0)
    vocab = int(getattr(tokenizer, "vocab_size", 1000))
    cases: list[tuple[str, Arrays]] = []
    for batch, sequence in ((1, 1), (1, 16), (3, 16), (3, max_length)):
        ids = rng.integers(low=0, high=vocab, size=(batch, sequence), dtype=np.int64)
        feeds: dict[str, npt.NDArray[Any]] = {"input_ids": ids}
        if "attention_mask" in input_names:
            feeds["attention_mask"] = np.ones_like(ids)
        if "token_type_ids" in input_names:
            feeds["token_type_ids"] = np.zeros_like(ids)
        cases.append((f"random ids batch {batch} sequence {sequence}", feeds))
    encoded = tokenizer(list(_SAMPLE_TEXTS), padding=True, truncation=True, max_length=max_length, return_tensors="np")
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

    def reference(feeds: Arrays) -> Arrays:
        with torch.no_grad():
            outs = wrapper(*(torch.from_numpy(feeds[n]) for n in input_names))
        return {name: out.numpy() for name, out in zip(output_names, outs, strict=True)}

    def masked(run: Callable[[Arrays], Arrays]) -> Callable[[Arrays], Arrays]:
        # Hidden states at padded positions are not meaningful; compare them as zeros on both sides.
        def call(feeds: Arrays) -> Arrays:
            outs = dict(run(feeds))
            if "attention_mask" in feeds:
                outs["last_hidden_state"] = outs["last_hidden_state"] * feeds["attention_mask"][..., None]
            return outs

        return call

    return compare(
        _validation_cases(tokenizer, input_names, max_length),
        masked(reference),
        masked(session.run),
        atol=options.atol,
        min_cosine=options.min_cosine,
        embedding_outputs=[n for n in output_names if n == "sentence_embedding"],
    )
