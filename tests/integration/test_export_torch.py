"""``onnxserve export torch`` on a small CNN written to a factory file, a TorchScript file and checkpoints."""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from hostile_pickle import Payload
from onnxserve.config import parse_config
from onnxserve.core.runtime import ModelSession
from onnxserve.errors import ExportError
from onnxserve.server.lifecycle import RunningServer
from onnxserve.toolkit.export.inputs import parse_input_spec
from onnxserve.toolkit.export.pytorch import TorchExportOptions, export_torch

CNN_SOURCE = '''
import torch


class SmallCNN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, kernel_size=3, padding=1)
        self.pool = torch.nn.MaxPool2d(2)
        self.fc = torch.nn.Linear(8 * 16 * 16, 10)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(torch.relu(self.conv(image))), 1))


def build() -> SmallCNN:
    torch.manual_seed(0)
    return SmallCNN()


class Sneaky(torch.nn.Module):
    """Computes one thing in eager mode and another while torch.export traces it."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = build()

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        logits = self.inner(image)
        return logits + 1.0 if torch.compiler.is_exporting() else logits


def sneaky() -> Sneaky:
    return Sneaky()


class Pair(torch.nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
        total = a + b
        return {"total": total, "best": total.argmax(dim=1)}


def pair() -> Pair:
    return Pair()
'''

IMAGE = parse_input_spec("image:batch,3,32,32:float32")


@pytest.fixture(scope="module")
def factory_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("factory") / "cnn.py"
    path.write_text(CNN_SOURCE)
    return path


def import_file(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"test_factory_{path.stem}", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def eager(model: torch.nn.Module, x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    with torch.no_grad():
        out: np.ndarray[Any, Any] = model(torch.from_numpy(x)).numpy()
    return out


def onnx_run(folder: Path, x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    return ModelSession(folder / "model.onnx").run({"image": x})["output"]


def no_partial_leftovers(parent: Path) -> bool:
    return not any(".partial-" in p.name or ".old-" in p.name for p in parent.iterdir())


def test_factory_export_is_validated_on_several_batch_sizes_and_served(
    factory_file: Path, tmp_path: Path, start_server: Any
) -> None:
    output = tmp_path / "cnn" / "1"
    report = export_torch(f"{factory_file}:build", output, TorchExportOptions(inputs=(IMAGE,)))
    assert report.passed
    assert sorted(p.name for p in output.iterdir()) == ["model.onnx", "validation.json"]
    saved = json.loads((output / "validation.json").read_text())
    assert saved["passed"] is True
    batches = [c["input_shapes"]["image"][0] for c in saved["cases"]]
    assert {1, 3} <= set(batches)
    assert all(c["max_abs_diff"]["output"] <= 1e-4 for c in saved["cases"])
    assert no_partial_leftovers(output.parent)
    session = ModelSession(output / "model.onnx")
    assert session.inputs[0].shape == (-1, 3, 32, 32)
    assert session.inputs[0].dim_names[0] == "batch"

    server: RunningServer = start_server(
        parse_config({"model_config_list": [{"name": "cnn", "base_path": "cnn"}]}, "test", tmp_path)
    )
    model = import_file(factory_file).build().eval()
    for batch in (2, 5):
        x = np.random.default_rng(batch).standard_normal((batch, 3, 32, 32)).astype(np.float32)
        body = {"inputs": [{"name": "image", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]}
        response = httpx.post(f"{server.http_url}/v2/models/cnn/infer", json=body)
        assert response.status_code == 200, response.text
        out = response.json()["outputs"][0]
        assert out["name"] == "output"
        served = np.array(out["data"], dtype=np.float32).reshape(out["shape"])
        np.testing.assert_allclose(served, eager(model, x), atol=1e-4)


def test_torchscript_file_exports_like_the_module(factory_file: Path, tmp_path: Path) -> None:
    model = import_file(factory_file).build().eval()
    scripted = tmp_path / "cnn.pt"
    torch.jit.script(model).save(str(scripted))
    output = tmp_path / "ts" / "1"
    report = export_torch(str(scripted), output, TorchExportOptions(inputs=(IMAGE,)))
    assert report.passed
    x = np.random.default_rng(7).standard_normal((4, 3, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(onnx_run(output, x), eager(model, x), atol=1e-4)


def test_weights_are_loaded_with_weights_only(factory_file: Path, tmp_path: Path) -> None:
    trained = import_file(factory_file).build()
    with torch.no_grad():
        for p in trained.parameters():
            p.mul_(-0.5)  # unlike the factory's own initialization
    weights = tmp_path / "weights.pt"
    torch.save({"state_dict": trained.state_dict(), "epoch": 3}, weights)
    output = tmp_path / "trained" / "1"
    export_torch(f"{factory_file}:build", output, TorchExportOptions(inputs=(IMAGE,), weights=weights))
    x = np.random.default_rng(3).standard_normal((2, 3, 32, 32)).astype(np.float32)
    got = onnx_run(output, x)
    np.testing.assert_allclose(got, eager(trained.eval(), x), atol=1e-4)
    assert not np.allclose(got, eager(import_file(factory_file).build().eval(), x), atol=1e-3)


def test_checkpoint_with_an_arbitrary_object_is_refused_and_never_run(factory_file: Path, tmp_path: Path) -> None:
    marker = tmp_path / "payload-ran"
    weights = tmp_path / "evil.pt"
    torch.save({"state_dict": import_file(factory_file).build().state_dict(), "extra": Payload(marker)}, weights)
    output = tmp_path / "evil" / "1"
    with pytest.raises(ExportError, match=r"not a plain state dict.*posix\.mkdir.*--trust-pickle"):
        export_torch(f"{factory_file}:build", output, TorchExportOptions(inputs=(IMAGE,), weights=weights))
    assert not marker.exists()
    assert not output.exists()
    assert no_partial_leftovers(output.parent)


def test_trust_pickle_loads_a_checkpoint_with_python_objects(factory_file: Path, tmp_path: Path) -> None:
    weights = tmp_path / "with-args.pt"
    state = import_file(factory_file).build().state_dict()
    torch.save({"model_state_dict": state, "args": argparse.Namespace(lr=0.1)}, weights)
    options = TorchExportOptions(inputs=(IMAGE,), weights=weights)
    with pytest.raises(ExportError, match=r"argparse\.Namespace"):
        export_torch(f"{factory_file}:build", tmp_path / "out" / "1", options)
    trusted = TorchExportOptions(inputs=(IMAGE,), weights=weights, trust_pickle=True)
    assert export_torch(f"{factory_file}:build", tmp_path / "out" / "1", trusted).passed


def test_symbolic_dims_are_shared_by_name_and_integer_outputs_must_agree_exactly(
    factory_file: Path, tmp_path: Path
) -> None:
    specs = (parse_input_spec("a:batch,4:float32"), parse_input_spec("b:batch,4:float32"))
    output = tmp_path / "pair" / "1"
    report = export_torch(f"{factory_file}:pair", output, TorchExportOptions(inputs=specs))
    assert report.passed
    assert all(c.agreement == {"best": 1.0} for c in report.cases)
    session = ModelSession(output / "model.onnx")
    assert [o.name for o in session.outputs] == ["total", "best"]
    assert session.inputs[0].dim_names[0] == session.inputs[1].dim_names[0] == "batch"
    a = np.ones((3, 4), dtype=np.float32)
    got = session.run({"a": a, "b": a})
    np.testing.assert_array_equal(got["total"], a + a)


def test_export_that_differs_from_eager_fails_and_leaves_nothing(factory_file: Path, tmp_path: Path) -> None:
    output = tmp_path / "sneaky" / "1"
    with pytest.raises(ExportError, match="does not match the original") as caught:
        export_torch(f"{factory_file}:sneaky", output, TorchExportOptions(inputs=(IMAGE,)))
    assert "nothing was written" in caught.value.message
    assert "BAD batch=1" in caught.value.message
    assert not output.exists()
    assert no_partial_leftovers(output.parent)


def test_existing_output_needs_force(factory_file: Path, tmp_path: Path) -> None:
    output = tmp_path / "v1"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="already exists; pass --force"):
        export_torch(f"{factory_file}:build", output, TorchExportOptions(inputs=(IMAGE,)))
    assert (output / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("image:batch,3,32,32", "expected NAME:SHAPE:DTYPE"),
        ("image:batch,-3:float32", "dim '-3' is neither a positive size nor a symbolic name"),
        ("image:batch,3:complex64", "unknown dtype 'complex64'"),
    ],
)
def test_bad_input_specs_say_what_is_expected(text: str, message: str) -> None:
    with pytest.raises(ExportError, match=message):
        parse_input_spec(text)


def test_cli_refuses_a_pickle_checkpoint_with_exit_code_2(factory_file: Path, tmp_path: Path) -> None:
    weights = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "extra": Payload(tmp_path / "payload-ran")}, weights)
    output = tmp_path / "out" / "1"
    command = [sys.executable, "-m", "onnxserve.cli", "export", "torch", f"{factory_file}:build"]
    command += ["--input", "image:batch,3,32,32:float32", "--weights", str(weights), "--output", str(output)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2
    assert "pass --trust-pickle only if you trust where it came from" in result.stderr.lower()
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "payload-ran").exists()
    assert not output.exists()
