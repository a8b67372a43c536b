"""``make bench-optimize``: the demo model as exported (fp32), fused, fully int8 and selectively int8,
side by side on this machine; against issue #19's targets.

Throughput is measured at batch 8 x 32 tokens and at batch 1 x 8 tokens (the bench's sentences
truncated / padded to that length), every variant taking turns within each round
(``BENCH_OPTIMIZE_ROUNDS`` rounds, median kept) so that a busy neighbour slows all alike. Accuracy is
the toolkit's one comparer on the **held-out** split of the built-in evaluation sentences (each
sentence alone), against the fp32 export: the worst-case cosine of the sentence embedding and its
5th percentile. The int8 variants' embedding tables (per-row int8, or kept in float by the search)
are listed with their sizes. Markdown goes to stdout, the numbers to ``bench/results/optimize.json``.

    .venv/bin/python -m bench.optimize     # BENCH_OPTIMIZE_MODEL=models/minilm/1, BENCH_OPTIMIZE_ROUNDS=40
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import orjson
from rich.console import Console
from tokenizers import Tokenizer

from bench.data import SENTENCES
from onnxserve.core.cpu import cpu_budget
from onnxserve.toolkit.evaluation import AccuracyBudget, compare_models
from onnxserve.toolkit.hardware import detect
from onnxserve.toolkit.optimize import OptimizeOptions, file_size, optimize, resolve_source
from onnxserve.toolkit.optimize_report import interleaved_latency_ms, open_session
from onnxserve.toolkit.samples import evaluation_set

RESULTS = Path(__file__).parent / "results" / "optimize.json"
SHAPES = ((8, 32), (1, 8))  # (batch, tokens)
QUICK = {"latency_batches": (8,), "repeats": 3, "allow_slower": True}  # timing is the bench's job, below
NONE = AccuracyBudget()
VARIANTS = {
    "fusion": OptimizeOptions(fuse=True, **QUICK),  # type: ignore[arg-type]
    "fusion + full int8": OptimizeOptions(fuse=True, quantize="int8", selective=False, budget=NONE, **QUICK),  # type: ignore[arg-type]
    "fusion + selective int8": OptimizeOptions(fuse=True, quantize="int8", **QUICK),  # type: ignore[arg-type]
}
TARGETS = {"throughput": 1.3, "smaller": 3.0, "cosine": 0.99}


def token_feeds(folder: Path, names: list[str], batch: int, tokens: int) -> dict[str, np.ndarray[Any, Any]]:
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=tokens)
    tokenizer.enable_padding(length=tokens)
    encodings = tokenizer.encode_batch(list(SENTENCES[:batch]))
    available = {
        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
    }
    return {n: available[n] for n in names}


def main() -> int:
    model = Path(os.environ.get("BENCH_OPTIMIZE_MODEL", "models/minilm/1"))
    rounds = int(os.environ.get("BENCH_OPTIMIZE_ROUNDS", "40"))
    console = Console(stderr=True)
    if not (model / "model.onnx").is_file():
        console.print(f"no demo model at {model}; run `make demo` first")
        return 2
    source = resolve_source(model)
    threads = cpu_budget()
    proto = onnx.load_model(str(source.model_file), load_external_data=False)
    held_out = evaluation_set(proto, source.text, "held-out")
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-optimize-") as tmp:
        files: dict[str, Path] = {"fp32 export": source.model_file}
        float_nodes: dict[str, list[str]] = {}
        blockwise: dict[str, list[str]] = {}
        split: dict[str, dict[str, list[int]]] = {}
        tables: dict[str, list[dict[str, Any]]] = {}
        for name, options in VARIANTS.items():
            console.print(f"onnxserve optimize: {name}")
            folder = Path(tmp) / f"v{len(files)}" / "1"
            report = optimize(model, folder, options, console)
            files[name] = folder / "model.onnx"
            float_nodes[name] = report.selection["float_nodes"] if report.selection else []
            blockwise[name] = report.selection["blockwise_int8_nodes"] if report.selection else []
            split[name] = report.selection["outlier_channel_nodes"] if report.selection else {}
            tables[name] = (report.quantization or {}).get("embedding_tables", [])
        names = list(source.spec.inputs) if source.spec else ["input_ids", "attention_mask", "token_type_ids"]
        sessions = {name: open_session(path, threads) for name, path in files.items()}
        timings: dict[tuple[int, int], dict[str, float]] = {}
        for batch, tokens in SHAPES:
            console.print(f"timing {len(sessions)} models in turn, {rounds} rounds, batch {batch} x {tokens} tokens")
            feeds = token_feeds(model, names, batch, tokens)
            timings[(batch, tokens)] = interleaved_latency_ms(sessions, feeds, batch, rounds)
        del sessions
        base_size = file_size(files["fp32 export"])
        for name, path in files.items():
            accuracy = compare_models(files["fp32 export"], path, held_out, source.task)
            row: dict[str, Any] = {
                "size_mb": file_size(path) / 1e6,
                "size_ratio": base_size / file_size(path),
                "cosine_worst": accuracy.cosine,
                "cosine_p5": accuracy.percentiles.get("p5"),
                "worst_input": accuracy.worst[0].input if accuracy.worst else None,
                "float_nodes": float_nodes.get(name, []),
                "blockwise_int8_nodes": blockwise.get(name, []),
                "outlier_channel_nodes": split.get(name, {}),
                "embedding_tables": tables.get(name, []),
            }
            for (batch, tokens), ms in timings.items():
                key = f"{batch}x{tokens}"
                row[f"ms_{key}"] = ms[name]
                row[f"rows_per_s_{key}"] = 1000 * batch / ms[name]
                row[f"throughput_ratio_{key}"] = ms["fp32 export"] / ms[name]
            rows[name] = row
    hw = detect()
    settings = {
        "model": str(model),
        "shapes": [f"{b}x{t}" for b, t in SHAPES],
        "rounds": rounds,
        "intra_op_threads": threads,
        "held_out": held_out.source,
        "cpu": hw.cpu,
        "features": hw.to_dict()["features"],
        "onnxruntime": hw.onnxruntime,
    }
    chosen = rows["fusion + selective int8"]
    targets = {
        "selective int8 worst-case cosine >= 0.99 (held-out)": (chosen["cosine_worst"] or 0) >= TARGETS["cosine"],
        "selective int8 >= 1.3x fp32 throughput at 8x32": chosen["throughput_ratio_8x32"] >= TARGETS["throughput"],
        "selective int8 >= 1.3x fp32 throughput at 1x8": chosen["throughput_ratio_1x8"] >= TARGETS["throughput"],
        "selective int8 >= 3x smaller": chosen["size_ratio"] >= TARGETS["smaller"],
    }
    lines = [
        f"Demo model {model}, {threads} intra-op threads, median of {rounds} interleaved rounds; {hw.cpu}; "
        f"onnxruntime {hw.onnxruntime}. Accuracy: {held_out.source}, each alone, against the fp32 export.",
        "",
        "| variant | rows/s 8x32 | vs fp32 | rows/s 1x8 | vs fp32 | size (MB) | smaller | cosine worst | p5 "
        "| float nodes | block-wise int8 nodes | MatMuls with outlier channels in float |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['rows_per_s_8x32']:.0f} | {r['throughput_ratio_8x32']:.2f}x | {r['rows_per_s_1x8']:.0f} "
            f"| {r['throughput_ratio_1x8']:.2f}x | {r['size_mb']:.1f} | {r['size_ratio']:.2f}x "
            f"| {r['cosine_worst']:.4f} | {r['cosine_p5']:.4f} | {len(r['float_nodes'])} "
            f"| {len(r['blockwise_int8_nodes'])} | {len(r['outlier_channel_nodes'])} |"
        )
    lines += ["", f"worst held-out input of selective int8: {chosen['worst_input']!r}", ""]
    for name, r in rows.items():
        for t in r["embedding_tables"]:
            form = f"int8 per row, {t['bytes'] / 1e6:.1f} MB" if t["quantized"] else "kept in float"
            lines.append(
                f"- {name}: embedding table {t['table']} {t['shape']}, {t['float_bytes'] / 1e6:.1f} MB: {form}"
            )
    lines += [""]
    lines += [f"- {'met' if ok else 'NOT met'}: {name}" for name, ok in targets.items()]
    print("\n".join(lines))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    document = {"settings": settings, "rows": rows, "targets": targets}
    RESULTS.write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
