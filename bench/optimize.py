"""``make bench-optimize``: the demo model as exported, fused, int8 and fused + int8, side by side on
this machine, plus what ``onnxserve tune`` picks; against issue #7's targets.

Throughput is measured at batch 8, sequence 32 (the bench's 12-word sentences padded to 32 tokens),
every variant taking turns within each round (``BENCH_OPTIMIZE_ROUNDS`` rounds, median kept) so that
a busy neighbour slows all alike. Cosine is the sentence embedding against the plain export's, on
real sentences, through ``onnxserve.Pipeline``. Markdown goes to stdout, the numbers to
``bench/results/optimize.json``.

    .venv/bin/python -m bench.optimize     # BENCH_OPTIMIZE_MODEL=models/minilm/1, BENCH_OPTIMIZE_ROUNDS=40
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from rich.console import Console
from tokenizers import Tokenizer

from bench.data import SENTENCES
from onnxserve.core.cpu import cpu_budget
from onnxserve.predict import Pipeline
from onnxserve.toolkit.hardware import detect
from onnxserve.toolkit.optimize import OptimizeOptions, file_size, optimize, resolve_source
from onnxserve.toolkit.optimize_report import interleaved_latency_ms, open_session
from onnxserve.toolkit.tune import TuneOptions, tune

RESULTS = Path(__file__).parent / "results" / "optimize.json"
BATCH, SEQUENCE = 8, 32
QUICK = (BATCH,)  # the optimizer's own timing, kept short: the bench times the variants side by side
VARIANTS = {
    "plain export": OptimizeOptions(latency_batches=QUICK, repeats=3),
    "fusion": OptimizeOptions(fuse=True, latency_batches=QUICK, repeats=3),
    "int8": OptimizeOptions(quantize="int8", latency_batches=QUICK, repeats=3),
    "fusion + int8": OptimizeOptions(fuse=True, quantize="int8", latency_batches=QUICK, repeats=3),
}
TARGETS = {"throughput": 1.3, "smaller": 3.5, "cosine": 0.99}


def token_feeds(folder: Path, names: list[str]) -> dict[str, np.ndarray[Any, Any]]:
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=SEQUENCE)
    tokenizer.enable_padding(length=SEQUENCE)
    encodings = tokenizer.encode_batch(list(SENTENCES[:BATCH]))
    available = {
        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
    }
    return {n: available[n] for n in names}


def cosine(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any]) -> float:
    return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min())


def main() -> int:
    model = Path(os.environ.get("BENCH_OPTIMIZE_MODEL", "models/minilm/1"))
    rounds = int(os.environ.get("BENCH_OPTIMIZE_ROUNDS", "40"))
    console = Console(stderr=True)
    if not (model / "model.onnx").is_file():
        console.print(f"no demo model at {model}; run `make demo` first")
        return 2
    source = resolve_source(model)
    threads = cpu_budget()
    with tempfile.TemporaryDirectory(prefix="bench-optimize-") as tmp:
        folders: dict[str, Path] = {}
        for name, options in VARIANTS.items():
            console.print(f"onnxserve optimize: {name}")
            folders[name] = Path(tmp) / f"v{len(folders)}" / "1"
            optimize(model, folders[name], options)
        console.print("running onnxserve tune (throughput, batch 8)")
        tuned_dir = Path(tmp) / "tuned" / "1"
        tuned = tune(model, tuned_dir, TuneOptions(target="throughput", batch_size=BATCH), console)
        best = tuned.best
        console.print(f"tune picked {best.variant}, level {best.level}, {best.threads} threads")

        names = list(source.spec.inputs) if source.spec else ["input_ids", "attention_mask", "token_type_ids"]
        feeds = token_feeds(model, names)
        sessions = {name: open_session(folder / "model.onnx", threads) for name, folder in folders.items()}
        sessions["tune's pick"] = open_session(tuned_dir / "model.onnx", best.threads, best.level, best.provider)
        console.print(f"timing {len(sessions)} models in turn, {rounds} rounds, batch {BATCH} x {SEQUENCE} tokens")
        ms = interleaved_latency_ms(sessions, feeds, BATCH, rounds)
        reference = np.asarray(Pipeline(folders["plain export"])(list(SENTENCES)))
        folders["tune's pick"] = tuned_dir
        rows: dict[str, dict[str, float]] = {}
        for name, folder in folders.items():
            embedding = np.asarray(Pipeline(folder)(list(SENTENCES)))
            rows[name] = {
                "ms_per_batch": ms[name],
                "rows_per_s": 1000 * BATCH / ms[name],
                "throughput_ratio": ms["plain export"] / ms[name],
                "size_mb": file_size(folder / "model.onnx") / 1e6,
                "size_ratio": file_size(folders["plain export"] / "model.onnx") / file_size(folder / "model.onnx"),
                "cosine": cosine(reference, embedding),
            }
    hw = detect()
    settings = {
        "model": str(model),
        "batch": BATCH,
        "sequence": SEQUENCE,
        "rounds": rounds,
        "intra_op_threads": threads,
        "tune_pick": {"variant": best.variant, "level": best.level, "threads": best.threads, "provider": best.provider},
        "cpu": hw.cpu,
        "features": hw.to_dict()["features"],
        "onnxruntime": hw.onnxruntime,
    }
    both = rows["fusion + int8"]
    singles = max(rows[n]["rows_per_s"] for n in ("fusion", "int8", "fusion + int8"))
    targets = {
        "fusion + int8 throughput >= 1.3x": both["throughput_ratio"] >= TARGETS["throughput"],
        "fusion + int8 >= 3.5x smaller": both["size_ratio"] >= TARGETS["smaller"],
        "fusion + int8 cosine >= 0.99": both["cosine"] >= TARGETS["cosine"],
        "tune's pick at least as fast as the best step": rows["tune's pick"]["rows_per_s"] >= 0.97 * singles,
    }
    lines = [
        f"Demo model {model}, batch {BATCH} x {SEQUENCE} tokens, {threads} intra-op threads, median of {rounds} "
        f"interleaved rounds; {hw.cpu}; onnxruntime {hw.onnxruntime}.",
        "",
        "| variant | ms / batch | rows / s | throughput | size (MB) | smaller | cosine (lowest) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['ms_per_batch']:.1f} | {r['rows_per_s']:.0f} | {r['throughput_ratio']:.2f}x "
            f"| {r['size_mb']:.1f} | {r['size_ratio']:.2f}x | {r['cosine']:.4f} |"
        )
    lines += [
        "",
        f"tune's pick: {best.variant}, session level {best.level}, {best.threads} threads, {best.provider}",
        "",
    ]
    lines += [f"- {'met' if ok else 'NOT met'}: {name}" for name, ok in targets.items()]
    print("\n".join(lines))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    document = {"settings": settings, "rows": rows, "targets": targets}
    RESULTS.write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
