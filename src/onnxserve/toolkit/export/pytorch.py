"""Export a PyTorch module to an ONNX version folder, validated against the module itself.

The module comes from a factory in a Python file the user names (``path/to/model.py:build``), with
optional weights from a state-dict file, or from a TorchScript file. Loading never unpickles
arbitrary objects unless the user says they trust the file: a state dict is read with
``torch.load(weights_only=True)``, and a TorchScript archive holds TorchScript code and tensors
only. (The factory file itself is Python code the user chose to run.)

Inputs are given as specs (``image:batch,3,32,32:float32``); symbolic dims become
``torch.export.Dim`` objects shared by name across inputs, so they stay dynamic in the ONNX graph.
The model is exported with symbolic dims of size 2 and validated at sizes 1, 3 and 8. The version
folder receives ``model.onnx`` and ``validation.json``, and only if validation passes.
"""

from __future__ import annotations

import hashlib
import importlib.util
import pickle
import re
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from rich.console import Console

from onnxserve.core.repository import MODEL_FILENAME
from onnxserve.core.runtime import ModelSession
from onnxserve.errors import ExportError, OnnxServeError
from onnxserve.toolkit.export.environment import require
from onnxserve.toolkit.export.inputs import InputSpec, check_unique, random_inputs
from onnxserve.toolkit.export.staging import staging_folder
from onnxserve.toolkit.sample_inputs import index_bounds
from onnxserve.toolkit.validate import Arrays, ValidationReport, compare

EXPORT_SIZE = 2
"""The size every symbolic dim has in the example inputs of the export (torch.export specializes 0 and 1)."""

VALIDATION_SIZES = (1, 3, 8)
"""The sizes every symbolic dim takes in validation."""

STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model")
"""Keys under which a training checkpoint commonly keeps the model's state dict."""

_TWO_GIB = 2 * 1024**3


@dataclass(frozen=True)
class TorchExportOptions:
    inputs: tuple[InputSpec, ...]
    weights: Path | None = None  # a state dict (or a checkpoint holding one) for a factory's module
    trust_pickle: bool = False  # allow the weights file to unpickle arbitrary Python objects
    output_names: tuple[str, ...] = ()  # default: a dict's keys, else "output" or "output_0", "output_1", ...
    opset: int = 18
    force: bool = False
    atol: float = 1e-4
    rtol: float = 1e-5


def export_torch(
    src: str, output: Path, options: TorchExportOptions, progress: Console | None = None
) -> ValidationReport:
    """Export ``src`` (``FILE.py:FACTORY`` or a TorchScript file), validate, and only then write ``output``."""
    console = progress or Console(stderr=True, quiet=True)
    require("torch", "onnxscript")
    if not options.inputs:
        raise ExportError("give at least one --input NAME:SHAPE:DTYPE, e.g. image:batch,3,32,32:float32")
    check_unique(options.inputs)
    file, factory = _split_source(src)

    with staging_folder(output, options.force) as staging:
        with console.status(f"loading {src}"):
            module = _load_factory(file, factory) if factory else _load_torchscript(file)
            if options.weights is not None:
                _load_weights(module, options.weights, options.trust_pickle)
            module.eval()
        reference = _Flat(module)
        sample = _sample_args(options.inputs)
        output_names, exact = reference.discover_outputs(sample, options.output_names)
        with console.status(f"exporting to ONNX (opset {options.opset})"):
            exported = _torchscript_as_module(module, sample) if factory is None else module
            _export(_Flat(exported), sample, options.inputs, output_names, options.opset, staging / MODEL_FILENAME)
        with console.status("validating the ONNX model against PyTorch"):
            report = _validate(reference, staging / MODEL_FILENAME, output_names, exact, options)
        report.write(staging)
        if not report.passed:
            raise ExportError(
                f"the ONNX model does not match the original; nothing was written to {output}\n{report.summary()}"
            )
    return report


def _split_source(src: str) -> tuple[Path, str | None]:
    """``FILE.py:FACTORY`` -> (file, factory); anything else is a TorchScript file."""
    path, sep, factory = src.rpartition(":")
    if sep and path.endswith(".py"):
        if not factory.isidentifier():
            raise ExportError(f"{src}: {factory!r} is not a name; give FILE.py:FACTORY, e.g. model.py:build")
        return Path(path), factory
    if src.endswith(".py"):
        raise ExportError(f"{src}: name the function that builds the model, e.g. {src}:build")
    return Path(src), None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _load_factory(file: Path, name: str) -> Any:
    """Import ``file`` (the user named it: it is their code) and call ``name()``; it must give a Module."""
    import torch

    if not file.is_file():
        raise ExportError(f"{file}: no such file")
    digest = hashlib.sha256(str(file.resolve()).encode()).hexdigest()[:16]
    module_name = f"onnxserve_model_factory_{digest}"
    spec = importlib.util.spec_from_file_location(module_name, file)
    if spec is None or spec.loader is None:
        raise ExportError(f"{file}: cannot be imported as Python")
    code = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = code  # dataclasses and pickling look classes up by module name
    folder = str(file.resolve().parent)
    sys.path.insert(0, folder)  # so the file can import its neighbours
    try:
        spec.loader.exec_module(code)
    except Exception as e:  # the user's code can raise anything
        sys.modules.pop(module_name, None)
        raise ExportError(f"{file}: importing it failed: {type(e).__name__}: {_first_line(e)}") from e
    finally:
        sys.path.remove(folder)
    factory: Callable[[], Any] | None = getattr(code, name, None)
    if not callable(factory):
        found = sorted(n for n, v in vars(code).items() if callable(v) and not n.startswith("_"))
        raise ExportError(f"{file} has no function {name!r}; it defines: {', '.join(found) or 'nothing callable'}")
    try:
        model = factory()
    except Exception as e:
        raise ExportError(f"{file}:{name}() failed: {type(e).__name__}: {_first_line(e)}") from e
    if not isinstance(model, torch.nn.Module):
        raise ExportError(f"{file}:{name}() returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _load_torchscript(file: Path) -> Any:
    import torch

    if not file.is_file():
        raise ExportError(f"{file}: no such file")
    try:
        return torch.jit.load(str(file), map_location="cpu")  # type: ignore[no-untyped-call]
    except Exception as e:  # torch raises RuntimeError, ValueError, ... for files it cannot read
        raise ExportError(
            f"{file} is not a TorchScript file ({_first_line(e)}); for a model defined in Python give "
            "FILE.py:FACTORY, and --weights FILE for its state dict"
        ) from None


def _load_weights(module: Any, weights: Path, trust_pickle: bool) -> None:
    """Load a state dict into ``module``; only tensors and plain containers unless ``trust_pickle``."""
    import torch

    if not weights.is_file():
        raise ExportError(f"{weights}: no such file")
    try:
        loaded = torch.load(str(weights), map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as e:
        if trust_pickle:
            raise ExportError(f"{weights}: torch.load cannot read it: {_first_line(e)}") from None
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        holds = f" (it holds {found.group(1)})" if found else ""
        raise ExportError(
            f"{weights} is not a plain state dict of tensors{holds}; loading it would unpickle arbitrary "
            "Python objects, which can run any code. Pass --trust-pickle only if you trust where it came from"
        ) from None
    except Exception as e:  # a truncated or foreign file fails in many ways
        raise ExportError(f"{weights}: torch.load cannot read it: {type(e).__name__}: {_first_line(e)}") from None
    state = _state_dict(loaded, torch)
    if state is None:
        raise ExportError(
            f"{weights}: expected a state dict (parameter names -> tensors), or a checkpoint with one under "
            f"{' / '.join(repr(k) for k in STATE_DICT_KEYS)}; found {type(loaded).__name__}"
        )
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        detail = " ".join(line.strip() for line in str(e).splitlines()[:3])
        raise ExportError(f"{weights} does not fit the model: {detail}") from None


def _state_dict(loaded: Any, torch: Any) -> Mapping[str, Any] | None:
    if isinstance(loaded, torch.nn.Module):  # a whole pickled module (only with --trust-pickle)
        state: Mapping[str, Any] = loaded.state_dict()
        return state
    if not isinstance(loaded, Mapping):
        return None
    if loaded and all(isinstance(v, torch.Tensor) for v in loaded.values()):
        return loaded
    for key in STATE_DICT_KEYS:
        inner = loaded.get(key)
        if isinstance(inner, torch.nn.Module):
            nested: Mapping[str, Any] = inner.state_dict()
            return nested
        if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            return inner
    return None


def _sample_args(specs: Sequence[InputSpec]) -> tuple[Any, ...]:
    import torch

    rng = np.random.default_rng(1234)
    sizes = {s: EXPORT_SIZE for spec in specs for s in spec.symbols}
    arrays = random_inputs(specs, sizes, rng)
    return tuple(torch.from_numpy(arrays[spec.name]) for spec in specs)


class _Flat:
    """Calls a module with positional tensors and flattens what it returns into a tuple of tensors."""

    def __init__(self, module: Any) -> None:
        import torch

        self.module = module

        class Flat(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.inner = module

            def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
                return _flatten(self.inner(*args), torch)[1]

        self.wrapper = Flat()
        self.wrapper.training = False  # not .eval(): the inner module is already in eval mode, and some refuse it

    def __call__(self, args: Sequence[Any]) -> tuple[Any, ...]:
        import torch

        with torch.no_grad():
            return tuple(self.wrapper(*args))

    def discover_outputs(self, sample: Sequence[Any], names: Sequence[str]) -> tuple[list[str], list[str]]:
        """Run once on the export sample: the output names (given, a dict's keys, or numbered), and those
        of them that hold integers or booleans (indices, masks), which must agree exactly."""
        import torch

        try:
            with torch.no_grad():
                result = self.module(*sample)
        except Exception as e:  # the user's model can raise anything
            shapes = ", ".join(str(list(t.shape)) for t in sample)
            raise ExportError(
                f"the model fails on the export sample (shapes {shapes}; symbolic dims are {EXPORT_SIZE}): "
                f"{type(e).__name__}: {_first_line(e)}"
            ) from e
        keys, tensors = _flatten(result, torch)
        if names and len(names) != len(tensors):
            raise ExportError(f"--output-name is given {len(names)} times, but the model returns {len(tensors)}")
        if names:
            chosen = list(names)
        elif keys is not None:
            chosen = keys
        else:
            chosen = ["output"] if len(tensors) == 1 else [f"output_{i}" for i in range(len(tensors))]
        if len(set(chosen)) != len(chosen):
            raise ExportError(f"output names must differ from each other: {', '.join(chosen)}")
        exact = [n for n, t in zip(chosen, tensors, strict=True) if not (t.is_floating_point() or t.is_complex())]
        return chosen, exact


def _flatten(result: Any, torch: Any) -> tuple[list[str] | None, tuple[Any, ...]]:
    """(dict keys or None, tensors) for a tensor, a tuple or list of tensors, or a dict of tensors."""
    if isinstance(result, torch.Tensor):
        return None, (result,)
    if isinstance(result, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in result):
        return None, tuple(result)
    if isinstance(result, Mapping) and all(isinstance(t, torch.Tensor) for t in result.values()):
        return [str(k) for k in result], tuple(result.values())
    raise ExportError(
        f"the model returns {type(result).__name__}; it must return a tensor, a tuple or list of tensors, "
        "or a dict of tensors"
    )


def _torchscript_as_module(script: Any, sample: tuple[Any, ...]) -> Any:
    """TorchScript -> an ordinary module torch.export can trace (the ONNX exporter refuses ScriptModules)."""
    try:
        from torch._export.converter import TS2EPConverter
    except ImportError:
        raise ExportError("this version of torch cannot convert TorchScript for export (no TS2EPConverter)") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return TS2EPConverter(script, sample).convert().module()
    except Exception as e:  # the converter raises many unrelated types
        raise ExportError(f"converting TorchScript for export failed: {type(e).__name__}: {_first_line(e)}") from e


def _export(
    flat: _Flat, sample: tuple[Any, ...], specs: Sequence[InputSpec], output_names: list[str], opset: int, path: Path
) -> None:
    import torch

    dims = {s: torch.export.Dim(s) for spec in specs for s in spec.symbols}
    per_input = tuple(
        {axis: dims[d] for axis, d in enumerate(spec.dims) if isinstance(d, str)} or None for spec in specs
    )
    try:
        # The exporter's own deprecation noise must not turn into errors under strict warning filters.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                flat.wrapper,
                sample,
                None,
                input_names=[spec.name for spec in specs],
                output_names=output_names,
                dynamic_shapes=(per_input,) if dims else None,
                opset_version=opset,
                dynamo=True,
                verbose=False,
            )
        if program is None:
            raise ExportError("torch.onnx.export returned no program")
        size = sum(p.numel() * p.element_size() for p in flat.wrapper.parameters())
        program.save(str(path), external_data=size >= _TWO_GIB)
    except ExportError:
        raise
    except Exception as e:  # the exporter raises many unrelated types
        cause = f" (caused by {type(e.__cause__).__name__}: {_first_line(e.__cause__)})" if e.__cause__ else ""
        raise ExportError(f"torch.onnx.export failed: {type(e).__name__}: {_first_line(e)}{cause}") from e


def _validation_cases(specs: Sequence[InputSpec], bounds: Mapping[str, int]) -> list[tuple[str, Arrays]]:
    """Random inputs by the toolkit's one generator, integer inputs that index a table of the exported
    graph (``bounds``) below its size."""
    rng = np.random.default_rng(0)
    symbols = list(dict.fromkeys(s for spec in specs for s in spec.symbols))
    if not symbols:
        return [(f"random inputs #{i}", random_inputs(specs, {}, rng, bounds)) for i in (1, 2)]
    cases: list[tuple[str, Arrays]] = []
    for size in VALIDATION_SIZES:
        name = ", ".join(f"{s}={size}" for s in symbols)
        cases.append((name, random_inputs(specs, dict.fromkeys(symbols, size), rng, bounds)))
    return cases


def _validate(
    reference: _Flat, model_file: Path, output_names: list[str], exact: list[str], options: TorchExportOptions
) -> ValidationReport:
    import torch

    try:
        session = ModelSession(model_file, name="exported model")
    except OnnxServeError as e:
        raise ExportError(f"the exported model does not load: {e.message}") from None
    input_names = [spec.name for spec in options.inputs]

    def original(feeds: Arrays) -> Arrays:
        try:
            outs = reference([torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in input_names])
        except Exception as e:  # the user's model can raise anything
            shapes = ", ".join(f"{n}{list(feeds[n].shape)}" for n in input_names)
            raise ExportError(f"the original model fails on {shapes}: {type(e).__name__}: {_first_line(e)}") from e
        return {name: out.detach().cpu().numpy() for name, out in zip(output_names, outs, strict=True)}

    def exported(feeds: Arrays) -> Arrays:
        try:
            return session.run(feeds)
        except OnnxServeError as e:
            raise ExportError(f"the exported model fails where the original does not: {e.message}") from e

    bounds = index_bounds([onnx.load_model(str(model_file), load_external_data=False).graph])
    return compare(
        _validation_cases(options.inputs, bounds),
        original,
        exported,
        atol=options.atol,
        min_cosine=0.0,
        exact_outputs=exact,
        rtol=options.rtol,
        samples="random values: floats from N(0, 1), fair booleans, integers below the table they index "
        "(else type ids 0, masks 1, others in [0, 10))",
    )
