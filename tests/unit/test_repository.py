"""On-disk version discovery, loading into the registry, resolution of versions and labels."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.helper
import onnx.numpy_helper
import pytest

import models
from onnxserve.config import ModelConfig, VersionPolicy, parse_config
from onnxserve.core.registry import ModelRegistry, effective_max_batch_size
from onnxserve.core.repository import discover_versions, version_number, versions_to_serve
from onnxserve.errors import ConfigError, ModelNotFoundError, OnnxServeError


def _config(base_path: Path, **extra: Any) -> ModelConfig:
    return ModelConfig(name="m", base_path=base_path, **extra)


def _load(repository: Path, *entries: dict[str, Any]) -> ModelRegistry:
    return ModelRegistry.load(parse_config({"model_config_list": list(entries)}, "test config", repository))


# --- discovery -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [("1", 1), ("12", 12), ("0", None), ("00", None), ("v1", None), ("-1", None), ("1.5", None), ("", None)],
)
def test_version_number(name: str, expected: int | None) -> None:
    assert version_number(name) == expected


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (str(2**63 - 1), 2**63 - 1),
        ("0" * 5000 + "7", 7),  # leading zeros never reach int()
        (str(2**63), None),
        ("9" * 20, None),
        ("9" * 5000, None),  # Python's int() would raise "Exceeds the limit (4300 digits)"
    ],
)
def test_version_number_is_bounded(name: str, expected: int | None) -> None:
    assert version_number(name) == expected


def test_version_number_refuses_non_ascii_digits() -> None:
    assert version_number("\u0661") is None  # ARABIC-INDIC DIGIT ONE: isdigit() but not a version


def test_discover_versions_ignores_non_versions(tmp_path: Path) -> None:
    for name in ("3", "1", "10", "0", "v2", "latest", "1.5", ".1"):
        (tmp_path / name).mkdir()
    (tmp_path / "7").write_text("a file named like a version is not a version folder")
    found = discover_versions(tmp_path)
    assert [v.version for v in found] == [1, 3, 10]
    assert [v.path for v in found] == [tmp_path / "1", tmp_path / "3", tmp_path / "10"]
    assert found[0].model_file == tmp_path / "1" / "model.onnx"


def test_discover_versions_base_path_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        discover_versions(tmp_path / "absent")
    assert str(tmp_path / "absent") in caught.value.message
    assert "not a directory" in caught.value.message


def test_a_version_named_symlink_loop_is_a_version_the_loader_refuses_with_its_reason(tmp_path: Path) -> None:
    # Outside attack rt43 F1: ``8 -> 9``, ``9 -> 8`` made os.DirEntry.is_dir() raise ELOOP out of discovery:
    # every poll round failed, start-up ended in a traceback and an explicit load answered 500.
    models.write_version(tmp_path, "m", 1, models.add_model())
    (tmp_path / "m" / "8").symlink_to("9")
    (tmp_path / "m" / "9").symlink_to("8")
    (tmp_path / "m" / "5").symlink_to("absent")  # a dangling link is no version, as before
    found = discover_versions(tmp_path / "m")
    assert [v.version for v in found] == [1, 8, 9]
    assert found[2].signature() is None  # never walked
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, {"name": "m", "base_path": "m"})
    assert "version folder '9' is a symbolic link that cannot be resolved (a loop); refused" in caught.value.message
    served = _load(tmp_path, {"name": "m", "base_path": "m", "model_version_policy": {"specific": {"versions": [1]}}})
    assert list(served.get("m").versions) == [1]


def test_a_model_folder_or_base_path_that_is_a_symlink_loop_is_named_not_raised(tmp_path: Path) -> None:
    (tmp_path / "a").symlink_to("b")
    (tmp_path / "b").symlink_to("a")
    with pytest.raises(ConfigError) as caught:
        discover_versions(tmp_path / "a")
    assert "not a directory or a .onnx file" in caught.value.message
    config = parse_config({"model_config_list": [{"name": "m", "base_path": "a"}]}, "test config", tmp_path)
    assert config.model_config_list[0].base_path == tmp_path / "a"  # refused when its versions are looked for
    with pytest.raises(ConfigError) as caught:
        ModelRegistry.load(config)
    assert "not a directory or a .onnx file" in caught.value.message


def test_no_version_folder(tmp_path: Path) -> None:
    (tmp_path / "0").mkdir()
    (tmp_path / "v1").mkdir()
    with pytest.raises(ConfigError) as caught:
        versions_to_serve(_config(tmp_path))
    assert "no version folder" in caught.value.message
    assert str(tmp_path) in caught.value.message
    assert "'m'" in caught.value.message


def test_default_policy_picks_the_highest(tmp_path: Path) -> None:
    for name in ("1", "2", "10", "9"):
        (tmp_path / name).mkdir()
    chosen = versions_to_serve(_config(tmp_path))
    assert [v.version for v in chosen] == [10]
    assert chosen[0].path == tmp_path / "10"


def test_latest_and_all_policies(tmp_path: Path) -> None:
    for name in ("1", "2", "3"):
        (tmp_path / name).mkdir()
    latest2 = _config(tmp_path, model_version_policy=VersionPolicy.model_validate({"latest": {"num_versions": 2}}))
    assert [v.version for v in versions_to_serve(latest2)] == [3, 2]
    every = _config(tmp_path, model_version_policy=VersionPolicy.model_validate({"all": {}}))
    assert [v.version for v in versions_to_serve(every)] == [3, 2, 1]


def test_specific_policy_selecting_nothing_on_disk(tmp_path: Path) -> None:
    (tmp_path / "1").mkdir()
    config = _config(tmp_path, model_version_policy=VersionPolicy.model_validate({"specific": {"versions": [4]}}))
    with pytest.raises(ConfigError) as caught:
        versions_to_serve(config)
    assert "model_version_policy" in caught.value.message
    assert "[1]" in caught.value.message


def test_version_label_to_a_version_not_served(tmp_path: Path) -> None:
    for name in ("1", "2"):
        (tmp_path / name).mkdir()
    config = _config(tmp_path, version_labels={"stable": 1})  # default policy serves only 2
    with pytest.raises(ConfigError) as caught:
        versions_to_serve(config)
    assert "version_labels.stable" in caught.value.message
    assert "1" in caught.value.message
    assert "not served" in caught.value.message


def test_version_label_to_a_served_version(tmp_path: Path) -> None:
    for name in ("1", "2"):
        (tmp_path / name).mkdir()
    config = _config(
        tmp_path,
        version_labels={"stable": 1, "canary": 2},
        model_version_policy=VersionPolicy.model_validate({"all": {}}),
    )
    assert [v.version for v in versions_to_serve(config)] == [2, 1]


# --- loading ---------------------------------------------------------------------------------------


def test_load_version_without_model_file(tmp_path: Path) -> None:
    (tmp_path / "empty" / "1").mkdir(parents=True)
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, {"name": "empty", "base_path": "empty"})
    message = caught.value.message
    assert str((tmp_path / "empty" / "1" / "model.onnx").resolve()) in message
    assert "not found" in message
    assert "model.onnx" in message


def test_load_garbage_model_file(tmp_path: Path) -> None:
    folder = tmp_path / "junk" / "1"
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(b"this is not an onnx model\x00\xff\x10\x01")
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, {"name": "junk", "base_path": "junk"})
    message = caught.value.message
    assert str((folder / "model.onnx").resolve()) in message
    assert "not an ONNX model" in message


def test_load_reports_every_failing_model_at_once(tmp_path: Path) -> None:
    models.write_version(tmp_path, "good", 1, models.add_model())
    (tmp_path / "empty" / "1").mkdir(parents=True)
    (tmp_path / "noversions").mkdir()
    with pytest.raises(ConfigError) as caught:
        _load(
            tmp_path,
            {"name": "good", "base_path": "good"},
            {"name": "empty", "base_path": "empty"},
            {"name": "noversions", "base_path": "noversions"},
        )
    message = caught.value.message
    assert "'noversions'" in message
    assert str((tmp_path / "empty" / "1" / "model.onnx").resolve()) in message
    assert "good" not in message.replace(str(tmp_path), "")  # the good model is not blamed


def _matmul_model(weights: np.ndarray) -> onnx.ModelProto:
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "W"], ["y"])],
        "matmul",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 4])],
        initializer=[onnx.numpy_helper.from_array(weights, name="W")],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model, full_check=True)
    return model


def test_model_with_external_data_loads_and_runs(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    weights = rng.standard_normal((4, 4)).astype(np.float32)
    folder = tmp_path / "ext" / "1"
    folder.mkdir(parents=True)
    onnx.save_model(
        _matmul_model(weights),
        str(folder / "model.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=0,
    )
    assert (folder / "weights.bin").stat().st_size == weights.nbytes
    stored = onnx.load_model(str(folder / "model.onnx"), load_external_data=False)
    assert stored.graph.initializer[0].data_location == onnx.TensorProto.EXTERNAL

    registry = _load(tmp_path, {"name": "ext", "base_path": "ext", "max_batch_size": 4})
    version = registry.resolve("ext", None)
    assert version.max_batch_size == 4
    x = rng.standard_normal((3, 4)).astype(np.float32)
    result = version.session.run({"x": x})
    np.testing.assert_allclose(result["y"], x @ weights, rtol=1e-5, atol=1e-6)


def test_model_with_missing_external_data_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "ext" / "1"
    folder.mkdir(parents=True)
    onnx.save_model(
        _matmul_model(np.eye(4, dtype=np.float32)),
        str(folder / "model.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=0,
    )
    (folder / "weights.bin").unlink()
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, {"name": "ext", "base_path": "ext"})
    assert str((folder / "model.onnx").resolve()) in caught.value.message


# --- resolution ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> ModelRegistry:
    repo = tmp_path_factory.mktemp("repo")
    for version in (1, 2, 3):
        models.write_version(repo, "add", version, models.add_model())
    models.write_version(repo, "fixed", 1, models.fixed_model())
    models.write_version(repo, "mixed", 1, models.mixed_model())
    models.write_version(repo, "anon", 1, models.parse("anon (float[?, 3] x) => (float[?, 3] y) { y = Identity(x) }"))
    return _load(
        repo,
        {
            "name": "add",
            "base_path": "add",
            "max_batch_size": 8,
            "model_version_policy": {"all": {}},
            "version_labels": {"stable": 2, "oldest": 1},
        },
        {"name": "fixed", "base_path": "fixed", "max_batch_size": 4},
        {"name": "mixed", "base_path": "mixed"},
        {"name": "anon", "base_path": "anon", "max_batch_size": 2},
    )


def test_registry_lists_models(registry: ModelRegistry) -> None:
    assert sorted(m.name for m in registry) == ["add", "anon", "fixed", "mixed"]
    assert len(registry) == 4
    assert registry.get("add").version_numbers() == [3, 2, 1]
    assert registry.all_ready()


@pytest.mark.parametrize(("requested", "expected"), [("1", 1), ("2", 2), ("3", 3), ("stable", 2), ("oldest", 1)])
def test_resolve_by_number_and_label(registry: ModelRegistry, requested: str, expected: int) -> None:
    version = registry.resolve("add", requested)
    assert version.version == expected
    assert version.name == "add"
    assert version.folder.path.name == str(expected)
    assert version.session.path == version.folder.model_file


@pytest.mark.parametrize("requested", [None, ""])
def test_resolve_default_is_the_highest(registry: ModelRegistry, requested: str | None) -> None:
    assert registry.resolve("add", requested).version == 3


def test_resolve_unknown_version(registry: ModelRegistry) -> None:
    with pytest.raises(ModelNotFoundError) as caught:
        registry.resolve("add", "7")
    assert "7" in caught.value.message
    assert "'add'" in caught.value.message
    assert "3, 2, 1" in caught.value.message  # says what is served


def test_resolve_unknown_label(registry: ModelRegistry) -> None:
    with pytest.raises(ModelNotFoundError) as caught:
        registry.resolve("add", "canary")
    assert "canary" in caught.value.message


def test_resolve_unknown_model(registry: ModelRegistry) -> None:
    with pytest.raises(ModelNotFoundError) as caught:
        registry.resolve("nope", None)
    assert "nope" in caught.value.message
    assert isinstance(caught.value, OnnxServeError)


def test_effective_max_batch_size(registry: ModelRegistry) -> None:
    assert registry.resolve("fixed", None).max_batch_size == 0  # [2, 3] has no dynamic first dim
    assert registry.resolve("add", None).max_batch_size == 8
    assert registry.resolve("mixed", None).max_batch_size == 0  # not asked for
    assert registry.resolve("anon", None).max_batch_size == 2  # unnamed dynamic dim is still dynamic


def test_effective_max_batch_size_logs_why_it_is_off(registry: ModelRegistry, caplog: pytest.LogCaptureFixture) -> None:
    fixed = registry.resolve("fixed", None)
    with caplog.at_level(logging.WARNING, logger="onnxserve.core.registry"):
        assert effective_max_batch_size(fixed.config, fixed.session) == 0
    assert "'x'" in caplog.text
    assert "max_batch_size 4" in caplog.text
    config = fixed.config.model_copy(update={"max_batch_size": 0})
    assert effective_max_batch_size(config, fixed.session) == 0


def test_tensor_specs(registry: ModelRegistry) -> None:
    add = registry.resolve("add", None)
    assert [s.name for s in add.inputs] == ["a", "b"]
    assert [s.name for s in add.outputs] == ["sum", "diff"]
    for spec in (*add.inputs, *add.outputs):
        assert spec.shape == (-1, 16)
        assert spec.dim_names == ("batch", None)
        assert spec.datatype.v2 == "FP32"
        assert spec.is_dynamic

    fixed = registry.resolve("fixed", None)
    assert fixed.inputs[0].shape == (2, 3)
    assert not fixed.inputs[0].is_dynamic

    anon = registry.resolve("anon", None)
    assert anon.inputs[0].shape == (-1, 3)
    assert anon.inputs[0].dim_names == (None, None)


def test_tensor_spec_datatypes_follow_the_graph(registry: ModelRegistry) -> None:
    mixed = registry.resolve("mixed", None)
    graph = onnx.load_model(str(mixed.folder.model_file)).graph
    for specs, infos in ((mixed.inputs, graph.input), (mixed.outputs, graph.output)):
        assert [s.name for s in specs] == [i.name for i in infos]
        for spec, info in zip(specs, infos, strict=True):
            assert spec.datatype.onnx == info.type.tensor_type.elem_type
            dims = info.type.tensor_type.shape.dim
            assert spec.shape == tuple(d.dim_value if d.HasField("dim_value") else -1 for d in dims)


def test_registry_runs_the_model(registry: ModelRegistry) -> None:
    add = registry.resolve("add", "stable")
    rng = np.random.default_rng(1)
    a = rng.standard_normal((2, 16)).astype(np.float32)
    b = rng.standard_normal((2, 16)).astype(np.float32)
    out = add.session.run({"a": a, "b": b}, ["diff"])
    assert list(out) == ["diff"]
    np.testing.assert_array_equal(out["diff"], a - b)
