"""Sliced tokenization of large text requests (``core.text_slices``) against one tokenizer call, in-process.

A larger text request is tokenized a few thousand texts (or about 64 Ki characters) per call, its kept
tokens built slice by slice, so that a cancel or an ended drain waits for one slice. This measures what the
slicing costs: the demo model's tokenizer on two requests, each tokenized whole (one ``encode_batch`` of
every text, then its kept tokens) and sliced (``tokenize_slice`` until done), alternating, and prints the
median of each and the ratio sliced / whole; also the longest slice (how long a stop may wait).

    PYTHONPATH=src .venv/bin/python -m bench.tokenize_slices [--rounds 5] [--model models/minilm/1]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from onnxserve.core.pipeline import PipelineSpec, TextBatch, TextPipeline
from onnxserve.core.text_slices import tokenize_slice
from onnxserve.core.tokens import KeptBuilder

REQUESTS = {
    "32 x 2,000 characters": TextBatch(["word, " * 333 + "end."] * 32),
    "1 M x 1 character": TextBatch(["!"] * 1_000_000),
}


def _pipeline(folder: Path) -> TextPipeline:
    spec = PipelineSpec.read(folder)
    assert spec is not None, f"{folder} holds no text model"
    return TextPipeline(folder, spec, list(spec.inputs))


def whole(pipeline: TextPipeline, text: TextBatch) -> float:
    """One tokenizer call of every text, then their kept tokens: the longest stop is all of it."""
    began = time.perf_counter()
    builder = KeptBuilder(pipeline.reads_positions)
    builder.add(pipeline.tokenize(text))
    builder.build()
    return time.perf_counter() - began


def sliced(pipeline: TextPipeline, text: TextBatch, longest: list[float]) -> float:
    began = time.perf_counter()
    builder = KeptBuilder(pipeline.reads_positions)
    start = 0
    while start < len(text.texts):
        start, ns = tokenize_slice(pipeline, text, builder, start)
        longest.append(ns / 1e9)
    builder.build()
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--model", type=Path, default=Path("models/minilm/1"))
    args = parser.parse_args()
    pipeline = _pipeline(args.model)
    print(f"{'request':<24} {'whole s':>9} {'sliced s':>9} {'sliced/whole':>13} {'longest slice s':>16}")
    for name, text in REQUESTS.items():
        times: dict[str, list[float]] = {"whole": [], "sliced": []}
        slices: list[float] = []
        runs: dict[str, Callable[[], float]] = {
            "whole": partial(whole, pipeline, text),
            "sliced": partial(sliced, pipeline, text, slices),
        }
        for _ in range(args.rounds):
            for side, run in runs.items():
                times[side].append(run())
        a, b = statistics.median(times["whole"]), statistics.median(times["sliced"])
        print(f"{name:<24} {a:>9.3f} {b:>9.3f} {b / a:>13.2f} {max(slices):>16.3f}")


if __name__ == "__main__":
    main()
