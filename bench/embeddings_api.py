"""The OpenAI-compatible embeddings route against V2 text on the same server, model, batching and
texts, at the same concurrency: ``python -m bench.embeddings_api`` (BENCH_* settings as ``make bench``).

Both run against one onnxserve process (bench/configs/batching_on.json), alternating round after
round so a noisy moment lands on both; the table gives each one's median throughput and p50, and the
ratio /v1/embeddings : V2. ``make bench`` measures the same point among the others (bench/run.py).
"""

from __future__ import annotations

import sys

from bench import loadgen, workloads
from bench.data import SENTENCES
from bench.run import effective_config
from bench.server import OnnxServer
from bench.settings import from_env
from bench.stats import Sample, summarize


def main() -> int:
    settings = from_env()
    settings.results_dir.mkdir(parents=True, exist_ok=True)
    config, _ = effective_config("batching_on", settings)
    lines = [
        "| concurrency | V2 text texts/s | /v1/embeddings texts/s | ratio | V2 p50 ms | /v1/embeddings p50 ms |",
        "|---|---|---|---|---|---|",
    ]
    with OnnxServer(config, settings.results_dir / "server-embeddings-api.log", "embeddings_api") as server:
        targets = {
            "v2": workloads.onnxserve_text_target(server, SENTENCES),
            "openai": workloads.onnxserve_embeddings_target(server, SENTENCES),
        }
        for concurrency in settings.concurrency:
            samples: dict[str, list[Sample]] = {name: [] for name in targets}
            for _ in range(settings.repeats):
                for name, target in targets.items():
                    samples[name].append(
                        loadgen.closed_loop(target, concurrency, settings.warmup_s, settings.duration_s)
                    )
            v2, openai = summarize(samples["v2"]), summarize(samples["openai"])
            ratio = openai.throughput / v2.throughput if v2.throughput > 0 else float("nan")
            lines.append(
                f"| {concurrency} | {v2.throughput:.0f} | {openai.throughput:.0f} | {ratio:.3f} x | "
                f"{v2.p50_ms:.2f} | {openai.p50_ms:.2f} |"
            )
            print(lines[-1], file=sys.stderr, flush=True)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
