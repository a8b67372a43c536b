"""int8 quantization with ONNX Runtime's quantizer.

- **dynamic** (``--quantize int8``): weights become int8 ahead of time, activations are quantized
  on the fly per batch; no calibration needed. Per-channel weight scales (one per output column of
  a MatMul / Conv) keep far more accuracy than one scale per tensor on transformer weights.
- **static** (``--quantize int8-static --calibration FILE``): activation ranges are measured once on
  the calibration samples and written into the graph as QuantizeLinear / DequantizeLinear pairs.

On CPUs without VNNI, the 8-bit multiply-add (``vpmaddubsw``) can saturate; ``reduce_range``
(7-bit weights) avoids that at a small cost in accuracy, so it is used only there.

Large embedding tables (a Gather over a float table of a megabyte or more) are not left to ONNX
Runtime's quantizer, which gives a whole table one scale: they become int8 with one scale per row,
see :mod:`onnxserve.toolkit.embedding_quantization`. MatMuls named in ``blockwise`` (kept out of
per-tensor int8 by selective int8) become block-wise int8, see
:mod:`onnxserve.toolkit.blockwise_quantization`; MatMuls named in ``outliers`` take their few outlier
input channels through a float side product and the rest in per-tensor int8, see
:mod:`onnxserve.toolkit.outlier_channels`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static

from onnxserve.errors import OptimizeError
from onnxserve.toolkit.blockwise_quantization import BLOCKS, blockwise_int8
from onnxserve.toolkit.embedding_quantization import embedding_tables, quantize_tables
from onnxserve.toolkit.hardware import detect
from onnxserve.toolkit.outlier_channels import side_nodes, split_outliers
from onnxserve.toolkit.samples import Feeds, Samples

MODES = ("int8", "int8-static")


@dataclass(frozen=True)
class QuantizeSettings:
    mode: str  # "int8" (dynamic) or "int8-static"
    per_channel: bool
    reduce_range: bool

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "per_channel": self.per_channel, "reduce_range": self.reduce_range}


def settings_for(mode: str, reduce_range: bool | None = None) -> QuantizeSettings:
    """The settings for ``mode`` on this machine: per-channel, and reduce_range unless the CPU has VNNI."""
    if mode not in MODES:
        raise OptimizeError(f"--quantize {mode!r}: choose one of {', '.join(MODES)}")
    return QuantizeSettings(
        mode=mode,
        per_channel=True,
        reduce_range=(not detect().features.vnni) if reduce_range is None else reduce_range,
    )


class SampleReader(CalibrationDataReader):  # type: ignore[misc]  # onnxruntime ships no type hints
    """Feeds the calibration samples to ONNX Runtime's calibrator, one batch at a time."""

    def __init__(self, samples: Samples) -> None:
        self._batches: list[Feeds] = samples.batches
        self._next: Iterator[Feeds] = iter(self._batches)

    def get_next(self) -> Feeds | None:
        return next(self._next, None)

    def rewind(self) -> None:
        self._next = iter(self._batches)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """ONNX Runtime's quantizer logs advice on the root logger and prints; keep the CLI's output clean."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def quantize(
    src: Path,
    dst: Path,
    settings: QuantizeSettings,
    samples: Samples | None = None,
    exclude: Sequence[str] = (),
    blockwise: Sequence[str] = (),
    block: int = BLOCKS[-1],
    outliers: Mapping[str, Sequence[int]] | None = None,
) -> list[dict[str, Any]]:
    """Write ``src`` quantized to int8 as ``dst``, the nodes named in ``exclude`` kept in float but for
    the MatMuls also named in ``blockwise`` (block-wise int8, one scale per ``block`` values), the
    MatMuls in ``outliers`` with those input channels in float; the embedding tables (per-row int8
    unless a Gather reading one is in ``exclude``) are returned, each with its size and whether it was
    quantized."""
    tables = embedding_tables(onnx.load_model(str(src), load_external_data=False))
    readers = {node for table in tables for node in table.nodes}
    chosen = {t.name for t in tables if not set(t.nodes) & set(exclude)}
    exclude = [*exclude, *sorted(readers - set(exclude))]
    with tempfile.TemporaryDirectory(prefix="onnxserve-split-") as work:
        if outliers:
            split = Path(work) / "split.onnx"
            onnx.save(split_outliers(onnx.load(str(src)), outliers), str(split))
            src = split
            exclude = [*exclude, *(side for name in outliers for side in side_nodes(name))]
        _quantize(src, dst, settings, samples, exclude, blockwise, block, chosen)
    return [t.to_dict(t.name in chosen) for t in tables]


def _quantize(
    src: Path,
    dst: Path,
    settings: QuantizeSettings,
    samples: Samples | None,
    exclude: Sequence[str],
    blockwise: Sequence[str],
    block: int,
    chosen: set[str],
) -> None:
    try:
        with _quiet():
            if settings.mode == "int8":
                quantize_dynamic(
                    str(src),
                    str(dst),
                    per_channel=settings.per_channel,
                    reduce_range=settings.reduce_range,
                    weight_type=QuantType.QInt8,
                    nodes_to_exclude=list(exclude),
                )
            else:
                if samples is None:
                    raise OptimizeError("--quantize int8-static needs --calibration FILE")
                quantize_static(
                    str(src),
                    str(dst),
                    SampleReader(samples),
                    quant_format=QuantFormat.QDQ,
                    per_channel=settings.per_channel,
                    reduce_range=settings.reduce_range,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    nodes_to_exclude=list(exclude),
                )
        if chosen or blockwise:
            model = quantize_tables(onnx.load(str(dst)), chosen)
            onnx.save(blockwise_int8(model, set(blockwise) & set(exclude), block), str(dst))
    except OptimizeError:
        raise
    except Exception as e:  # the quantizer raises many unrelated types on graphs it cannot handle
        raise OptimizeError(f"int8 quantization failed: {type(e).__name__}: {str(e).splitlines()[0]}") from e


def quantize_model(
    model: onnx.ModelProto, settings: QuantizeSettings, samples: Samples | None = None, exclude: Sequence[str] = ()
) -> tuple[onnx.ModelProto, list[dict[str, Any]]]:
    """``model`` quantized to int8 (the pass ``optimize`` runs), and its embedding tables (see
    :func:`quantize`): ONNX Runtime's quantizer reads and writes files, so it works in a temporary folder
    of its own; ``model`` is left as it was."""
    with tempfile.TemporaryDirectory(prefix="onnxserve-int8-") as work:
        src, dst = Path(work) / "model.onnx", Path(work) / "int8.onnx"
        onnx.save(model, str(src))
        tables = quantize(src, dst, settings, samples, exclude)
        return onnx.load(str(dst)), tables
