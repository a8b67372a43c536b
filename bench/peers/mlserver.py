"""MLServer 1.7.1 at its best here: adaptive batching (``max_batch_size`` 8, ``max_batch_time`` 5 ms),
one parallel inference worker running bench/peers/mlserver_runtime.py (tokenizers + ONNX Runtime on
the demo model's ``model.onnx``), on loopback.

Facts (/work/shared/PEERS.md): its inference worker dies with uvloop >= 0.22, so ``uvloop<0.22`` lies
in bench/.venv-mlserver/overlay, first on its PYTHONPATH; with adaptive batching it hangs on SIGTERM,
so it is killed after the grace period (peer.STOP_GRACE_S).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import orjson

from bench import workloads
from bench.data import v2_text_body
from bench.peers.peer import Peer, PeerProcess, peer_env, venv_missing
from bench.server import HOST, free_port
from bench.settings import BENCH_DIR

VENV = BENCH_DIR / ".venv-mlserver"
OVERLAY = VENV / "overlay"
PIP_LOG = BENCH_DIR / "results" / "pip-mlserver.log"
RUNTIME = Path(__file__).resolve().parent / "mlserver_runtime.py"
MODEL_NAME = "minilm"
MAX_BATCH_SIZE = 8
MAX_BATCH_TIME_S = 0.005
PARALLEL_WORKERS = 1
START_TIMEOUT_S = 180.0
SIDE = "MLServer"
PROTOCOL = "MLServer V2 HTTP JSON (text)"


def server_settings(http_port: int, grpc_port: int, metrics_port: int) -> dict[str, Any]:
    """MLServer's settings.json: loopback only, one inference worker."""
    return {
        "debug": False,
        "host": HOST,
        "http_port": http_port,
        "grpc_port": grpc_port,
        "metrics_port": metrics_port,
        "parallel_workers": PARALLEL_WORKERS,
        "load_models_at_startup": True,
    }


def model_settings(model_folder: Path, threads: int = 0) -> dict[str, Any]:
    """The model's model-settings.json: the runtime, adaptive batching, the ONNX model's folder."""
    return {
        "name": MODEL_NAME,
        "implementation": "mlserver_runtime.MiniLMRuntime",
        "max_batch_size": MAX_BATCH_SIZE,
        "max_batch_time": MAX_BATCH_TIME_S,
        "parameters": {"uri": str(model_folder), "extra": {"threads": threads, "max_length": 256}},
    }


class MLServer(Peer):
    side = SIDE
    protocol = PROTOCOL

    def __init__(self, model_folder: Path) -> None:
        self.model_folder = model_folder
        self.http_port, self.grpc_port, self.metrics_port = free_port(), free_port(), free_port()

    def missing(self) -> str | None:
        gone = venv_missing(VENV, PIP_LOG)
        if gone is None and not OVERLAY.is_dir():
            return f"{OVERLAY} (uvloop<0.22 for MLServer's inference worker) is missing"
        return gone

    def settings_label(self) -> str:
        return (
            f"MLServer 1.7.1, adaptive batching max_batch_size {MAX_BATCH_SIZE} / max_batch_time "
            f"{MAX_BATCH_TIME_S * 1000:g} ms, {PARALLEL_WORKERS} inference worker, runtime: tokenizers + ONNX Runtime "
            "(default threads) + mean pooling"
        )

    def start(self, workdir: Path, log: workloads.Log) -> PeerProcess:
        repository = workdir / "repository"
        shutil.rmtree(repository, ignore_errors=True)
        (repository / MODEL_NAME).mkdir(parents=True)
        ports = (self.http_port, self.grpc_port, self.metrics_port)
        (repository / "settings.json").write_bytes(orjson.dumps(server_settings(*ports), option=orjson.OPT_INDENT_2))
        (repository / MODEL_NAME / "model-settings.json").write_bytes(
            orjson.dumps(model_settings(self.model_folder), option=orjson.OPT_INDENT_2)
        )
        runtime_dir = workdir / "runtime"
        runtime_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(RUNTIME, runtime_dir / RUNTIME.name)
        process = PeerProcess(
            SIDE,
            [str(VENV / "bin" / "mlserver"), "start", str(repository)],
            workdir,
            peer_env({"PYTHONPATH": f"{OVERLAY}:{runtime_dir}", "PATH": f"{VENV / 'bin'}:/usr/bin:/bin"}),
            workdir / "mlserver.log",
            f"http://{HOST}:{self.http_port}/v2/models/{MODEL_NAME}/ready",
            START_TIMEOUT_S,
        )
        process.start()
        return process

    def url(self) -> str:
        return f"http://{HOST}:{self.http_port}/v2/models/{MODEL_NAME}/infer"

    def body(self, sentence: str) -> bytes:
        return v2_text_body(sentence)

    def embeddings(self, answer: Any) -> list[list[float]]:
        output = answer["outputs"][0]
        shape = [int(x) for x in output["shape"]]
        data = [float(x) for x in output["data"]]
        width = shape[-1]
        return [data[i : i + width] for i in range(0, len(data), width)]
