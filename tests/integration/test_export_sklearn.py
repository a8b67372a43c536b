"""``onnxserve export sklearn`` on a fitted pipeline (classifier) and a random forest (regressor)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import joblib
import numpy as np
import pytest
from sklearn.datasets import make_classification, make_regression
from sklearn.ensemble import RandomForestRegressor
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from hostile_pickle import Payload
from onnxserve.config import parse_config
from onnxserve.core.runtime import ModelSession
from onnxserve.errors import ExportError
from onnxserve.server.lifecycle import RunningServer
from onnxserve.toolkit.export.environment import require
from onnxserve.toolkit.export.inputs import parse_input_spec
from onnxserve.toolkit.export.sklearn import SklearnExportOptions, export_sklearn

TRUSTED = SklearnExportOptions(trust_pickle=True)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> tuple[Pipeline, Path]:
    x, y = make_classification(n_samples=300, n_features=6, n_informative=4, random_state=0)
    model = make_pipeline(StandardScaler(), LogisticRegression()).fit(x, y)
    path = tmp_path_factory.mktemp("sklearn") / "classifier.joblib"
    joblib.dump(model, path)
    return model, path


@pytest.fixture(scope="module")
def regressor(tmp_path_factory: pytest.TempPathFactory) -> tuple[RandomForestRegressor, Path, np.ndarray[Any, Any]]:
    x, y = make_regression(n_samples=300, n_features=4, noise=0.1, random_state=0)
    model = RandomForestRegressor(n_estimators=10, max_depth=5, random_state=0).fit(x, y)
    folder = tmp_path_factory.mktemp("sklearn")
    joblib.dump(model, folder / "regressor.joblib")
    return model, folder / "regressor.joblib", x


def infer(server: RunningServer, model: str, x: np.ndarray[Any, Any]) -> dict[str, np.ndarray[Any, Any]]:
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]}
    response = httpx.post(f"{server.http_url}/v2/models/{model}/infer", json=body)
    assert response.status_code == 200, response.text
    return {o["name"]: np.array(o["data"]).reshape(o["shape"]) for o in response.json()["outputs"]}


def no_partial_leftovers(parent: Path) -> bool:
    return not any(".partial-" in p.name or ".old-" in p.name for p in parent.iterdir())


def test_pipeline_and_regressor_are_validated_then_served(
    classifier: tuple[Pipeline, Path],
    regressor: tuple[RandomForestRegressor, Path, np.ndarray[Any, Any]],
    tmp_path: Path,
    start_server: Any,
) -> None:
    pipeline, pipeline_file = classifier
    report = export_sklearn(pipeline_file, tmp_path / "clf" / "1", TRUSTED)
    assert report.passed
    saved = json.loads((tmp_path / "clf" / "1" / "validation.json").read_text())
    assert saved["samples"].startswith("random rows")
    assert [c["input_shapes"]["input"][0] for c in saved["cases"]] == [1, 3, 100]
    assert all(c["agreement"] == {"label": 1.0} for c in saved["cases"])
    assert all(c["max_abs_diff"]["probabilities"] <= 1e-4 for c in saved["cases"])

    forest, forest_file, train = regressor
    calibration = tmp_path / "calibration.npy"
    np.save(calibration, train[:40])
    options = SklearnExportOptions(trust_pickle=True, calibration=calibration)
    report = export_sklearn(forest_file, tmp_path / "reg" / "1", options)
    assert report.passed
    assert report.samples == "calibration file (40 rows)"
    assert [c.input_shapes["input"][0] for c in report.cases] == [1, 3, 40]
    assert sorted(p.name for p in (tmp_path / "reg" / "1").iterdir()) == ["model.onnx", "validation.json"]

    server: RunningServer = start_server(
        parse_config(
            {"model_config_list": [{"name": "clf", "base_path": "clf"}, {"name": "reg", "base_path": "reg"}]},
            "test",
            tmp_path,
        )
    )
    new_x, _ = make_classification(n_samples=25, n_features=6, n_informative=4, random_state=42)
    new_x = new_x.astype(np.float32)
    served = infer(server, "clf", new_x)
    np.testing.assert_array_equal(served["label"], pipeline.predict(new_x))
    np.testing.assert_allclose(served["probabilities"], pipeline.predict_proba(new_x), atol=1e-5)

    new_r, _ = make_regression(n_samples=25, n_features=4, random_state=42)
    new_r = new_r.astype(np.float32)
    served = infer(server, "reg", new_r)
    np.testing.assert_allclose(served["variable"].ravel(), forest.predict(new_r), rtol=1e-5, atol=1e-4)


def test_string_labels_and_a_named_float64_input(tmp_path: Path) -> None:
    x, y = make_classification(n_samples=200, n_features=5, random_state=1)
    model = LogisticRegression().fit(x, np.array(["cat", "dog"])[y])
    joblib.dump(model, tmp_path / "animals.joblib")
    spec = parse_input_spec("features:rows,5:float64")
    options = SklearnExportOptions(trust_pickle=True, input=spec)
    report = export_sklearn(tmp_path / "animals.joblib", tmp_path / "animals" / "1", options)
    assert report.passed
    session = ModelSession(tmp_path / "animals" / "1" / "model.onnx")
    assert session.inputs[0].name == "features"
    assert session.inputs[0].datatype.v2 == "FP64"
    assert session.inputs[0].dim_names[0] == "rows"
    new_x = np.random.default_rng(5).standard_normal((7, 5))
    labels = session.run({"features": new_x})["label"]
    assert [b.decode() for b in labels] == list(model.predict(new_x))


def test_untrusted_joblib_is_refused_without_loading_it(tmp_path: Path) -> None:
    marker = tmp_path / "payload-ran"
    joblib.dump({"model": Payload(marker)}, tmp_path / "model.joblib")
    output = tmp_path / "out" / "1"
    with pytest.raises(ExportError, match=r"joblib files are pickles.*--trust-pickle"):
        export_sklearn(tmp_path / "model.joblib", output, SklearnExportOptions())
    assert not marker.exists()
    assert not output.exists()


def test_failed_validation_leaves_nothing_behind(
    regressor: tuple[RandomForestRegressor, Path, np.ndarray[Any, Any]], tmp_path: Path
) -> None:
    output = tmp_path / "reg" / "1"
    # An impossible tolerance injects a mismatch: real float32 differences exceed it.
    options = SklearnExportOptions(trust_pickle=True, atol=-1.0, rtol=0.0)
    with pytest.raises(ExportError, match="does not match the original") as caught:
        export_sklearn(regressor[1], output, options)
    assert "nothing was written" in caught.value.message
    assert not output.exists()
    assert no_partial_leftovers(output.parent)


def test_existing_output_needs_force(classifier: tuple[Pipeline, Path], tmp_path: Path) -> None:
    output = tmp_path / "v1"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="already exists; pass --force"):
        export_sklearn(classifier[1], output, TRUSTED)
    assert (output / "keep.txt").read_text() == "mine"
    export_sklearn(classifier[1], output, SklearnExportOptions(trust_pickle=True, force=True))
    assert (output / "model.onnx").is_file()
    assert not (output / "keep.txt").exists()


def test_calibration_with_the_wrong_number_of_features_is_refused(
    classifier: tuple[Pipeline, Path], tmp_path: Path
) -> None:
    np.save(tmp_path / "cal.npy", np.zeros((5, 3), dtype=np.float32))
    options = SklearnExportOptions(trust_pickle=True, calibration=tmp_path / "cal.npy")
    with pytest.raises(ExportError, match="has 3 features per row; the model takes 6"):
        export_sklearn(classifier[1], tmp_path / "out", options)
    assert not (tmp_path / "out").exists()


def test_missing_dependency_names_the_extra_to_install() -> None:
    require("json", "sklearn")
    with pytest.raises(ExportError, match=r"needs onnxserve_no_such_module; .*pip install 'onnxserve\[export\]'"):
        require("json", "onnxserve_no_such_module")


def test_cli_refuses_untrusted_joblib_with_exit_code_2(classifier: tuple[Pipeline, Path], tmp_path: Path) -> None:
    output = tmp_path / "out" / "1"
    command = [sys.executable, "-m", "onnxserve.cli", "export", "sklearn", str(classifier[1]), "--output", str(output)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2
    assert "joblib files are pickles" in result.stderr
    assert "--trust-pickle" in result.stderr
    assert "Traceback" not in result.stderr
    assert not output.exists()
