"""Export a fitted scikit-learn estimator or pipeline to an ONNX version folder with skl2onnx, validated.

The model comes from a joblib file. Joblib files are pickles: loading one runs whatever code it
holds, so the exporter refuses unless the user passes ``trust_pickle`` (``--trust-pickle``).

Validation runs scikit-learn and ONNX Runtime side by side on the same rows: a calibration file the
user gives (``.npy``, read without pickle), else random rows, 1, 3 and many at a time. Classifiers
must predict the same label for every row, and their probabilities (exported as a tensor, not a
ZipMap) must agree within tolerance; regressors' predictions and transformers' outputs must agree
within tolerance. The version folder receives ``model.onnx`` and ``validation.json``, and only if
validation passes.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from rich.console import Console

from onnxserve.core.repository import MODEL_FILENAME
from onnxserve.core.runtime import ModelSession
from onnxserve.errors import ExportError, OnnxServeError
from onnxserve.toolkit.export.environment import require
from onnxserve.toolkit.export.inputs import DTYPES, InputSpec, random_inputs
from onnxserve.toolkit.export.staging import staging_folder
from onnxserve.toolkit.validate import Arrays, ValidationReport, compare

Kind = Literal["classifier", "regressor", "transformer"]

RANDOM_ROWS = 100
"""Rows in the largest random validation case."""

_TENSOR_TYPES = {"float32": "FloatTensorType", "float64": "DoubleTensorType", "int64": "Int64TensorType"}
"""Input dtypes skl2onnx takes, and the skl2onnx type for each."""


@dataclass(frozen=True)
class SklearnExportOptions:
    trust_pickle: bool = False  # the joblib file is a pickle: loading it runs code, so the user must say so
    input_features: int | None = None  # default: the model's n_features_in_
    input: InputSpec | None = None  # NAME:ROWS,FEATURES:DTYPE; default: input:batch,N:float32
    calibration: Path | None = None  # a .npy array (rows, features) to validate on; default: random rows
    opset: int | None = None  # default: the newest opset skl2onnx supports
    force: bool = False
    atol: float = 1e-4
    rtol: float = 1e-5


def export_sklearn(
    src: str | Path, output: Path, options: SklearnExportOptions, progress: Console | None = None
) -> ValidationReport:
    """Convert, validate, and only then write ``output``; raise ExportError (writing nothing) otherwise."""
    console = progress or Console(stderr=True, quiet=True)
    require("sklearn", "skl2onnx", "joblib")
    path = Path(src)
    if not path.is_file():
        raise ExportError(f"{path}: no such file")
    if not options.trust_pickle:
        raise ExportError(
            f"{path} is a joblib file, and joblib files are pickles: loading one runs any code it holds. "
            "Pass --trust-pickle only if you trust where it came from"
        )
    if options.input is not None and options.input_features is not None:
        raise ExportError("give --input-features N or --input NAME:SHAPE:DTYPE, not both")
    calibration = _read_calibration(options.calibration) if options.calibration is not None else None

    with staging_folder(output, options.force) as staging:
        with console.status(f"loading {path}"):
            model = _load(path)
        kind = _kind(model, path)
        spec = _input_spec(model, options)
        if calibration is not None and calibration.shape[1] != spec.dims[1]:
            raise ExportError(
                f"{options.calibration}: has {calibration.shape[1]} features per row; the model takes {spec.dims[1]}"
            )
        with console.status("converting to ONNX with skl2onnx"):
            _convert(model, kind, spec, options.opset, staging / MODEL_FILENAME)
        with console.status("validating the ONNX model against scikit-learn"):
            report = _validate(model, kind, spec, staging / MODEL_FILENAME, calibration, options)
        report.write(staging)
        if not report.passed:
            raise ExportError(
                f"the ONNX model does not match the original; nothing was written to {output}\n{report.summary()}"
            )
    return report


def _load(path: Path) -> Any:
    import joblib

    try:
        return joblib.load(path)
    except Exception as e:  # unpickling can fail in any way: a missing class, a truncated file, ...
        raise ExportError(f"{path}: joblib cannot load it: {type(e).__name__}: {_first_line(e)}") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _kind(model: Any, path: Path) -> Kind:
    from sklearn.base import BaseEstimator, is_classifier, is_regressor
    from sklearn.exceptions import NotFittedError
    from sklearn.utils.validation import check_is_fitted

    if not isinstance(model, BaseEstimator):
        raise ExportError(f"{path} holds a {type(model).__name__}, not a scikit-learn estimator or pipeline")
    try:
        check_is_fitted(model)
    except NotFittedError:
        raise ExportError(f"{path} holds a {type(model).__name__} that is not fitted; fit it first") from None
    if is_classifier(model):
        return "classifier"
    if is_regressor(model):
        return "regressor"
    if hasattr(model, "transform"):
        return "transformer"
    raise ExportError(f"{path} holds a {type(model).__name__}; supported: classifiers, regressors, transformers")


def _input_spec(model: Any, options: SklearnExportOptions) -> InputSpec:
    """The one input: given, or ``input:batch,N:float32`` with N from the options or the model."""
    fitted = getattr(model, "n_features_in_", None)
    if options.input is not None:
        spec = options.input
        if len(spec.dims) != 2 or not isinstance(spec.dims[0], str) or not isinstance(spec.dims[1], int):
            raise ExportError(
                f"--input {spec}: expected NAME:ROWS,FEATURES:DTYPE with symbolic rows, e.g. input:batch,4:float32"
            )
        if spec.dtype not in _TENSOR_TYPES:
            raise ExportError(f"--input {spec}: skl2onnx takes {', '.join(_TENSOR_TYPES)}, not {spec.dtype}")
        features = spec.dims[1]
    elif options.input_features is not None or fitted is not None:
        features = int(options.input_features if options.input_features is not None else fitted)  # type: ignore[arg-type]
        spec = InputSpec("input", ("batch", features), "float32")
    else:
        raise ExportError(f"cannot tell how many features {type(model).__name__} takes; pass --input-features N")
    if features <= 0:
        raise ExportError(f"--input-features must be positive, not {features}")
    if fitted is not None and int(fitted) != features:
        raise ExportError(f"the model was fitted on {fitted} features, not {features}")
    return spec


def _read_calibration(path: Path) -> npt.NDArray[Any]:
    """A 2-D numeric array from a .npy file, read without pickle."""
    if not path.is_file():
        raise ExportError(f"{path}: no such file")
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise ExportError(f"{path}: not a numeric .npy array ({_first_line(e)}); save one with numpy.save") from None
    if not isinstance(data, np.ndarray):
        raise ExportError(f"{path}: holds several arrays (.npz); give one (rows, features) array saved with numpy.save")
    if data.ndim != 2 or data.shape[0] == 0 or data.dtype.kind not in "biuf":
        raise ExportError(
            f"{path}: expected a non-empty numeric array of shape (rows, features); got {data.dtype} {list(data.shape)}"
        )
    return data


def _convert(model: Any, kind: Kind, spec: InputSpec, opset: int | None, path: Path) -> None:
    import onnx
    from skl2onnx import convert_sklearn
    from skl2onnx.common import data_types

    tensor_type = getattr(data_types, _TENSOR_TYPES[spec.dtype])
    # Probabilities as one tensor rather than ZipMap's list of dicts: servable and comparable.
    converter_options = {id(model): {"zipmap": False}} if kind == "classifier" else None
    try:
        with warnings.catch_warnings():
            # skl2onnx's own deprecation noise must not turn into errors under strict warning filters.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            onx = convert_sklearn(
                model,
                initial_types=[(spec.name, tensor_type([None, spec.dims[1]]))],
                options=converter_options,
                target_opset=opset,
            )
    except Exception as e:  # skl2onnx raises many types for estimators or options it does not support
        raise ExportError(
            f"skl2onnx cannot convert {type(model).__name__}: {type(e).__name__}: {_first_line(e)}"
        ) from None
    rows = str(spec.dims[0])
    for value in [*onx.graph.input, *onx.graph.output]:  # name the rows dim, which skl2onnx leaves anonymous
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_param = rows
    onnx.save(onx, str(path))


def _cases(spec: InputSpec, calibration: npt.NDArray[Any] | None) -> tuple[list[tuple[str, Arrays]], str]:
    """Validation cases of 1, 3 and many rows, and a note of where the rows came from."""
    dtype = DTYPES[spec.dtype]
    if calibration is not None:
        rows = calibration.astype(dtype)
        counts = sorted({min(n, len(rows)) for n in (1, 3, len(rows))})
        cases: list[tuple[str, Arrays]] = [(f"calibration, {_rows(n)}", {spec.name: rows[:n]}) for n in counts]
        return cases, f"calibration file ({len(rows)} rows)"
    rng = np.random.default_rng(0)
    symbol = str(spec.dims[0])
    cases = [(f"random, {_rows(n)}", random_inputs([spec], {symbol: n}, rng)) for n in (1, 3, RANDOM_ROWS)]
    kind = "integers in [0, 10)" if dtype.kind == "i" else "values from N(0, 1)"
    return cases, f"random rows: {kind}, no calibration file given"


def _rows(n: int) -> str:
    return "1 row" if n == 1 else f"{n} rows"


def _served(labels: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """Labels as ONNX Runtime gives them back through onnxserve: text as UTF-8 bytes."""
    if labels.dtype.kind in "USO":
        encoded: npt.NDArray[Any] = np.array([str(x).encode("utf-8") for x in labels.ravel()], dtype=object)
        return encoded.reshape(labels.shape)
    return labels


def _validate(
    model: Any,
    kind: Kind,
    spec: InputSpec,
    model_file: Path,
    calibration: npt.NDArray[Any] | None,
    options: SklearnExportOptions,
) -> ValidationReport:
    try:
        session = ModelSession(model_file, name="exported model")
    except OnnxServeError as e:
        raise ExportError(
            f"skl2onnx made a model that ONNX Runtime cannot load ({e.message}); float32 inputs are the best supported"
        ) from None
    outputs = session.outputs
    exact: list[str] = []
    if kind == "classifier":
        exact.append(outputs[0].name)

    def original(feeds: Arrays) -> Arrays:
        x = feeds[spec.name]
        if kind == "classifier":
            expected = {outputs[0].name: _served(np.asarray(model.predict(x)))}
            if hasattr(model, "predict_proba") and len(outputs) > 1:
                expected[outputs[1].name] = np.asarray(model.predict_proba(x))
            return expected
        if kind == "regressor":
            predicted = np.asarray(model.predict(x))
            if predicted.ndim == 1 and len(outputs[0].shape) == 2:
                predicted = predicted.reshape(-1, 1)  # skl2onnx gives single-target predictions as (rows, 1)
            return {outputs[0].name: predicted}
        transformed = model.transform(x)
        dense = transformed.toarray() if hasattr(transformed, "toarray") else transformed
        return {outputs[0].name: np.asarray(dense)}

    def exported(feeds: Arrays) -> Arrays:
        try:
            return session.run(feeds)
        except OnnxServeError as e:
            raise ExportError(f"the exported model fails where the original does not: {e.message}") from e

    cases, samples = _cases(spec, calibration)
    return compare(
        cases,
        original,
        exported,
        atol=options.atol,
        min_cosine=0.0,
        exact_outputs=exact,
        rtol=options.rtol,
        samples=samples,
    )
