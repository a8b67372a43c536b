"""``onnxserve optimize``, ``tune`` and ``env`` as a user runs them (real processes), on a tiny BERT."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from typer.testing import CliRunner

from onnxserve.cli.main import app
from onnxserve.config import parse_config
from onnxserve.predict import Pipeline
from onnxserve.server.lifecycle import RunningServer
from onnxserve.toolkit.samples import SENTENCES, eval_sentences

ONNXSERVE = [sys.executable, "-m", "onnxserve.cli"]


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*ONNXSERVE, *args], capture_output=True, text=True, timeout=timeout, check=False)


def lowest_cosine(a: npt.NDArray[Any], b: npt.NDArray[Any]) -> float:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return float(((a64 * b64).sum(1) / (np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1))).min())


def test_optimize_a_text_folder_and_check_the_report(tiny_text_version: Path, tmp_path: Path) -> None:
    dst = tmp_path / "opt" / "1"
    done = run_cli(
        "optimize", str(tiny_text_version), "--output", str(dst), "--fuse", "--quantize", "int8",
        "--max-accuracy-loss", "cosine=0.99", "--batch-sizes", "1,4", "--repeats", "3", "--json", "--allow-slower",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    saved = json.loads((dst / "optimize_report.json").read_text())
    assert printed["accuracy"] == saved["accuracy"]
    assert saved["passed"] is True
    assert saved["steps"] == ["fuse", "int8"]
    assert saved["size_bytes"]["before"] == (tiny_text_version / "model.onnx").stat().st_size
    assert saved["size_bytes"]["after"] == (dst / "model.onnx").stat().st_size
    assert set(saved["latency_ms"]["after"]) == {"1", "4"}
    # the cosine the report gives is the one the served pipelines give on the held-out evaluation
    # sentences, each alone (issue 19), computed here independently
    assert saved["accuracy"]["samples"] == "39 built-in evaluation sentences (held-out split)"
    before, after = Pipeline(tiny_text_version), Pipeline(dst)
    held_out = eval_sentences("held-out")
    ours = min(lowest_cosine(np.asarray(before([s])), np.asarray(after([s]))) for s in held_out)
    assert saved["accuracy"]["cosine"] == ours or abs(saved["accuracy"]["cosine"] - ours) < 1e-6
    assert {f["name"]: f["achieved"] for f in saved["fusions"]}["Attention"] == 2
    assert "wrote" in done.stderr


def test_a_budget_violation_exits_2_and_writes_nothing(tiny_text_version: Path, tmp_path: Path) -> None:
    dst = tmp_path / "bad" / "1"
    done = run_cli(
        "optimize", str(tiny_text_version), "--output", str(dst), "--quantize", "int8",
        "--max-accuracy-loss", "max_abs=0", "--repeats", "1", "--batch-sizes", "1",
    )  # fmt: skip
    assert done.returncode == 2
    assert "breaks the accuracy budget (max abs diff" in done.stderr
    assert "was not written" in done.stderr
    assert not dst.exists()
    assert list(dst.parent.iterdir()) == []


def test_bad_arguments_are_refused_with_a_message(tiny_text_version: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    done = runner.invoke(
        app, ["optimize", str(tiny_text_version), "--output", str(tmp_path / "x"), "--max-accuracy-loss", "cos=1"]
    )
    assert done.exit_code == 2
    assert "KEY one of cosine, agreement, max_abs" in done.output
    done = runner.invoke(
        app, ["optimize", str(tiny_text_version), "--output", str(tmp_path / "x"), "--quantize", "int8",
              "--int8-schemes", "outlier-channels"]
    )  # fmt: skip
    assert done.exit_code == 2
    assert "--int8-schemes outlier-channels needs per-tensor" in done.output
    done = runner.invoke(app, ["tune", str(tiny_text_version), "--output", str(tmp_path / "y"), "--providers", "NoGPU"])
    assert done.exit_code == 2
    assert "NoGPU not available here" in done.output
    done = runner.invoke(app, ["tune", str(tiny_text_version), "--output", str(tmp_path / "y"), "--fuse", "maybe"])
    assert done.exit_code == 2
    assert "use yes, no or yes,no" in done.output
    assert not (tmp_path / "x").exists()
    assert not (tmp_path / "y").exists()


def test_env_lists_providers_and_cpu_features() -> None:
    done = run_cli("env", "--json")
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert found["providers"] == ort.get_available_providers()
    assert set(found["features"]) == {"avx2", "avx512", "vnni", "amx"}
    table = CliRunner().invoke(app, ["env"])
    assert table.exit_code == 0
    assert "CPUExecutionProvider" in table.output
    assert "VNNI" in table.output


def test_tune_writes_the_fastest_and_its_config_serves_it(
    tiny_text_version: Path, tmp_path: Path, start_server: Any
) -> None:
    dst = tmp_path / "tuned" / "1"
    done = run_cli(
        "tune", str(tiny_text_version), "--output", str(dst), "--target", "throughput", "--batch-size", "4",
        "--repeats", "3", "--emit-config",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    snippet = json.loads(done.stdout)
    saved = json.loads((dst / "optimize_report.json").read_text())
    assert saved["config"] == snippet
    within = [c for c in saved["cells"] if c["within_budget"]]
    assert saved["best"] == min(within, key=lambda c: c["latency_ms"])
    assert len(saved["cells"]) == len(saved["variants"]) * 2 * len({1, *snippet_threads(saved)})
    server: RunningServer = start_server(
        parse_config({"model_config_list": [{"name": "tuned", "base_path": "tuned", **snippet}]}, "test", tmp_path)
    )
    response = httpx.post(
        f"{server.http_url}/v2/models/tuned/infer",
        json={"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": list(SENTENCES[:2])}]},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    (out,) = response.json()["outputs"]
    served = np.array(out["data"], dtype=np.float32).reshape(out["shape"])
    np.testing.assert_allclose(served, Pipeline(dst)(list(SENTENCES[:2])), atol=1e-5)


def snippet_threads(report: dict[str, Any]) -> set[int]:
    return {c["threads"] for c in report["cells"]}
