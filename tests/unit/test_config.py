"""The server config: the seed document verbatim, extensions, loaders and their precise errors."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

import models
from onnxserve.config import (
    MAX_CONFIG_BYTES,
    ModelConfig,
    ServerConfig,
    VersionPolicy,
    load_config,
    parse_config,
)
from onnxserve.core.repository import scan_repository
from onnxserve.errors import ConfigError
from onnxserve.server.settings import ServerSettings

SEED: dict[str, Any] = {
    "model_config_list": [
        {
            "name": "my_model",
            "base_path": "/path/to/my/model",
            "model_platform": "onnxruntime",
            "max_batch_size": 32,
        }
    ]
}


def _write_json(path: Path, document: Any) -> Path:
    path.write_text(json.dumps(document))
    return path


def _one_model(**entry: Any) -> dict[str, Any]:
    return {"model_config_list": [{"name": "m", "base_path": "m", **entry}]}


def _config_error(tmp_path: Path, document: Any, name: str = "config.json") -> str:
    file = _write_json(tmp_path / name, document)
    with pytest.raises(ConfigError) as caught:
        load_config(file)
    message = caught.value.message
    assert str(file) in message, f"the message does not name the file: {message}"
    return message


# --- the seed document ----------------------------------------------------------------------------


def test_seed_config_is_accepted_verbatim(tmp_path: Path) -> None:
    file = _write_json(tmp_path / "config.json", SEED)
    config = load_config(file)
    assert isinstance(config, ServerConfig)
    assert len(config.model_config_list) == 1
    model = config.model_config_list[0]
    assert model.name == "my_model"
    assert model.base_path == Path("/path/to/my/model")
    assert model.model_platform == "onnxruntime"
    assert model.max_batch_size == 32


def test_seed_config_defaults(tmp_path: Path) -> None:
    model = load_config(_write_json(tmp_path / "config.json", SEED)).model_config_list[0]
    # The default policy serves only the latest version; no labels; CPU provider.
    assert model.model_version_policy.select([1, 3, 2]) == [3]
    assert model.version_labels == {}
    assert [p.name for p in model.providers()] == ["CPUExecutionProvider"]


def test_relative_base_path_resolves_against_the_config_folder(tmp_path: Path) -> None:
    folder = tmp_path / "configs"
    folder.mkdir()
    document = {
        "model_config_list": [
            {"name": "a", "base_path": "models/a"},
            {"name": "b", "base_path": "../elsewhere/b"},
        ]
    }
    file = _write_json(folder / "config.json", document)
    config = load_config(file)
    paths = {m.name: m.base_path for m in config.model_config_list}
    assert paths["a"] == (folder / "models" / "a").resolve()
    assert paths["b"] == (tmp_path / "elsewhere" / "b").resolve()
    assert all(p.is_absolute() for p in paths.values())


def test_relative_base_path_does_not_depend_on_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "configs"
    folder.mkdir()
    _write_json(folder / "config.json", _one_model())
    other = tmp_path / "cwd"
    other.mkdir()
    monkeypatch.chdir(other)
    config = load_config(Path("..") / "configs" / "config.json")
    assert config.model_config_list[0].base_path == (folder / "m").resolve()


@pytest.mark.parametrize("suffix", [".yaml", ".yml"])
def test_yaml_config_is_accepted(tmp_path: Path, suffix: str) -> None:
    file = tmp_path / f"config{suffix}"
    file.write_text(
        "model_config_list:\n"
        "  - name: my_model\n"
        "    base_path: models/my_model\n"
        "    model_platform: onnxruntime\n"
        "    max_batch_size: 32\n"
        "    model_version_policy:\n"
        "      specific:\n"
        "        versions: [1, 3]\n"
        "    version_labels:\n"
        "      stable: 1\n"
    )
    model = load_config(file).model_config_list[0]
    assert model.name == "my_model"
    assert model.base_path == (tmp_path / "models" / "my_model").resolve()
    assert model.max_batch_size == 32
    assert model.version_labels == {"stable": 1}
    assert model.model_version_policy.select([1, 2, 3, 4]) == [3, 1]


def test_extensions_are_accepted(tmp_path: Path) -> None:
    document = _one_model(
        model_platform="onnxruntime_onnx",
        model_version_policy={"all": {}},
        version_labels={"stable": 1, "canary": 2},
        execution_providers=["CPUExecutionProvider", {"name": "CUDAExecutionProvider", "options": {"x": 1}}],
        session_options={"intra_op_num_threads": 2, "graph_optimization_level": "basic"},
    )
    model = load_config(_write_json(tmp_path / "config.json", document)).model_config_list[0]
    assert model.model_platform == "onnxruntime_onnx"
    assert model.version_labels == {"stable": 1, "canary": 2}
    assert [p.name for p in model.providers()] == ["CPUExecutionProvider", "CUDAExecutionProvider"]
    assert model.providers()[1].options == {"x": 1}
    assert model.session_options.intra_op_num_threads == 2
    assert model.session_options.graph_optimization_level == "basic"


# --- precise errors --------------------------------------------------------------------------------


def test_unknown_top_level_key(tmp_path: Path) -> None:
    message = _config_error(tmp_path, {**SEED, "model_confg_list_extra": []})
    assert "model_confg_list_extra" in message
    assert "unknown key" in message


def test_unknown_key_inside_a_model_entry(tmp_path: Path) -> None:
    message = _config_error(tmp_path, _one_model(max_batch=4))
    assert "max_batch" in message
    assert "unknown key" in message
    assert "model_config_list[0]" in message


def test_unknown_key_nested_in_an_extension(tmp_path: Path) -> None:
    message = _config_error(tmp_path, _one_model(session_options={"threads": 4}))
    assert "session_options" in message
    assert "threads" in message
    assert "unknown key" in message


def test_missing_base_path(tmp_path: Path) -> None:
    message = _config_error(tmp_path, {"model_config_list": [{"name": "m"}]})
    assert "base_path" in message
    assert "missing" in message


def test_missing_model_config_list(tmp_path: Path) -> None:
    message = _config_error(tmp_path, {})
    assert "model_config_list" in message
    assert "missing" in message


def test_document_that_is_not_an_object(tmp_path: Path) -> None:
    message = _config_error(tmp_path, [SEED])
    assert "model_config_list" in message


def test_unsupported_model_platform(tmp_path: Path) -> None:
    message = _config_error(tmp_path, _one_model(model_platform="tensorflow"))
    assert "model_platform" in message
    assert "tensorflow" in message
    assert "onnxruntime" in message  # says what would be accepted


def test_bad_json(tmp_path: Path) -> None:
    file = tmp_path / "config.json"
    file.write_text('{"model_config_list": [')
    with pytest.raises(ConfigError) as caught:
        load_config(file)
    assert str(file) in caught.value.message
    assert "JSON" in caught.value.message


def test_bad_yaml(tmp_path: Path) -> None:
    file = tmp_path / "config.yaml"
    file.write_text("model_config_list: [\n  - name: {\n")
    with pytest.raises(ConfigError) as caught:
        load_config(file)
    assert str(file) in caught.value.message
    assert "YAML" in caught.value.message


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("model_config_list: " + "[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ("model_config_list:\n  - name: m\n    base_path: m\n    max_batch_size: " + "9" * 5000, "digits"),
    ],
    ids=["deep", "huge-int"],
)
def test_yaml_that_pyyaml_fails_on_outside_its_errors_is_a_config_error(tmp_path: Path, text: str, said: str) -> None:
    """PyYAML raises RecursionError and ValueError of its own for these: a traceback at start-up (exit 1)
    and on every poll (outside attack rt12 F5)."""
    file = tmp_path / "config.yaml"
    file.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(file)
    assert said in caught.value.message
    assert len(caught.value.message) < 1000


def test_a_refused_config_does_not_repeat_a_huge_value_or_every_error(tmp_path: Path) -> None:
    """A 20 MB model_platform was repeated whole in the ERROR of every poll (rt12 F5)."""
    file = tmp_path / "config.json"
    entries = [{"name": f"m{i}", "base_path": "m", "model_platform": "x" * 1_000_000} for i in range(3)]
    entries += [{"name": f"n{i}", "base_path": "m", "bogus": i} for i in range(100)]
    file.write_text(json.dumps({"model_config_list": entries}))
    with pytest.raises(ConfigError) as caught:
        load_config(file)
    lines = caught.value.message.splitlines()
    assert len(lines) == 21
    assert "model_platform" in lines[0]
    assert all(len(line) < 400 for line in lines)
    assert lines[-1].endswith("... and 83 more errors")


def test_bad_yaml_with_upper_case_suffix_is_called_yaml(tmp_path: Path) -> None:
    # The file is parsed as YAML (the suffix check is case-insensitive); the message must agree.
    file = tmp_path / "config.YAML"
    file.write_text("model_config_list: [\n  - name: {\n")
    with pytest.raises(ConfigError) as caught:
        load_config(file)
    assert str(file) in caught.value.message
    assert "YAML" in caught.value.message
    assert "JSON" not in caught.value.message


def test_missing_file(tmp_path: Path) -> None:
    file = tmp_path / "absent.json"
    with pytest.raises(ConfigError) as caught:
        load_config(file)
    assert str(file) in caught.value.message
    assert "cannot read" in caught.value.message


def test_a_config_file_that_is_not_a_regular_file_is_refused_without_reading_it(tmp_path: Path) -> None:
    # Outside attack rt43: in poll mode a FIFO in the config file's place stalled every later poll (a
    # blocking open), and a symbolic link to /dev/zero was read until memory ran out (4.9 GB) each poll.
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)  # no writer: opening it for reading would wait for one
    zero = tmp_path / "zero.json"
    zero.symlink_to("/dev/zero")
    for file in (fifo, zero, tmp_path):
        with pytest.raises(ConfigError) as caught:
            load_config(file)
        said = f"{file}: the config file is not a regular file (a folder, FIFO, socket or device)"
        assert caught.value.message == said


def test_a_config_file_larger_than_the_bound_is_refused_by_its_size(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    with config.open("wb") as file:
        file.truncate(MAX_CONFIG_BYTES + 1)  # sparse: costs no disk
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    assert caught.value.message == (
        f"{config}: the config file holds {MAX_CONFIG_BYTES + 1:,} bytes; at most {MAX_CONFIG_BYTES:,} are read"
    )
    link = tmp_path / "link.json"  # a symbolic link to a regular file is followed, as before
    link.symlink_to(config)
    config.write_text(json.dumps({"model_config_list": [{"name": "m", "base_path": "m"}]}))
    assert load_config(link).model_config_list[0].name == "m"


def test_duplicate_model_names(tmp_path: Path) -> None:
    document = {
        "model_config_list": [
            {"name": "twin", "base_path": "a"},
            {"name": "twin", "base_path": "b"},
        ]
    }
    message = _config_error(tmp_path, document)
    assert "twin" in message
    assert "more than once" in message
    assert "model_config_list" in message


@pytest.mark.parametrize("name", ["../x", "a/b", "", "-lead", "with space", "x" * 129])
def test_bad_model_name_characters(tmp_path: Path, name: str) -> None:
    message = _config_error(tmp_path, {"model_config_list": [{"name": name, "base_path": "m"}]})
    assert "model_config_list[0].name" in message


@pytest.mark.parametrize("name", ["m", "My_Model-2.onnx", "0", "x" * 128])
def test_good_model_names(tmp_path: Path, name: str) -> None:
    file = _write_json(tmp_path / "config.json", {"model_config_list": [{"name": name, "base_path": "m"}]})
    assert load_config(file).model_config_list[0].name == name


def test_negative_max_batch_size(tmp_path: Path) -> None:
    message = _config_error(tmp_path, _one_model(max_batch_size=-1))
    assert "max_batch_size" in message
    assert "greater than or equal to 0" in message


@pytest.mark.parametrize(
    ("max_batch_size", "preferred", "words"),
    [
        (8, [4, 16], ["preferred_batch_sizes [16]", "exceed max_batch_size 8"]),
        (0, [4], ["preferred_batch_sizes", "max_batch_size > 0"]),
    ],
)
def test_preferred_batch_sizes_the_batcher_cannot_form(
    tmp_path: Path, max_batch_size: int, preferred: list[int], words: list[str]
) -> None:
    document = _one_model(max_batch_size=max_batch_size, dynamic_batching={"preferred_batch_sizes": preferred})
    message = _config_error(tmp_path, document)
    assert "model_config_list[0]" in message
    for word in words:
        assert word in message


def test_preferred_batch_sizes_up_to_max_batch_size_are_accepted(tmp_path: Path) -> None:
    file = _write_json(
        tmp_path / "config.json", _one_model(max_batch_size=8, dynamic_batching={"preferred_batch_sizes": [4, 8]})
    )
    assert load_config(file).model_config_list[0].dynamic_batching.preferred_batch_sizes == [4, 8]


def test_every_error_is_reported_at_once(tmp_path: Path) -> None:
    document = {
        "model_config_list": [
            {"name": "a", "base_path": "a", "max_batch_size": -3},
            {"name": "b", "model_platform": "tensorflow"},
        ]
    }
    message = _config_error(tmp_path, document)
    assert "model_config_list[0].max_batch_size" in message
    assert "model_config_list[1].base_path" in message
    assert "model_config_list[1].model_platform" in message


def test_parse_config_names_its_source() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"model_config_list": [{"name": "m", "base_path": "m", "oops": 1}]}, "my source", Path("/"))
    assert "my source" in caught.value.message
    assert "oops" in caught.value.message


# --- version policies ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "available", "expected"),
    [
        ({"latest": {}}, [1, 2, 3], [3]),
        ({"latest": {"num_versions": 2}}, [3, 1, 10, 2], [10, 3]),
        ({"latest": {"num_versions": 5}}, [2, 1], [2, 1]),
        ({"all": {}}, [2, 7, 1], [7, 2, 1]),
        ({"specific": {"versions": [1, 3]}}, [1, 2, 3, 4], [3, 1]),
        ({"specific": {"versions": [5, 9]}}, [1, 5], [5]),
        ({"specific": {"versions": [9]}}, [1, 2], []),
    ],
)
def test_version_policy_select(policy: dict[str, Any], available: list[int], expected: list[int]) -> None:
    assert VersionPolicy.model_validate(policy).select(available) == expected


@pytest.mark.parametrize(
    ("policy", "words"),
    [
        ({"latest": {"num_versions": 1}, "all": {}}, ["exactly one"]),
        ({"all": {}, "specific": {"versions": [1]}}, ["exactly one"]),
        ({}, ["exactly one"]),
        ({"all": {"x": 1}}, ["all"]),
        ({"latest": {"num_versions": 0}}, ["num_versions"]),
        ({"specific": {"versions": []}}, ["versions"]),
        ({"specific": {"versions": [0]}}, ["versions"]),
        ({"newest": {}}, ["newest", "unknown key"]),
    ],
)
def test_invalid_version_policy(tmp_path: Path, policy: dict[str, Any], words: list[str]) -> None:
    with pytest.raises(ValidationError):
        VersionPolicy.model_validate(policy)
    message = _config_error(tmp_path, _one_model(model_version_policy=policy))
    assert "model_version_policy" in message
    for word in words:
        assert word in message


def test_version_labels_must_be_names(tmp_path: Path) -> None:
    message = _config_error(tmp_path, _one_model(version_labels={"1st": 1}))
    assert "version_labels" in message


def test_model_config_direct_construction() -> None:
    config = ModelConfig(name="m", base_path=Path("/x"))
    assert config.max_batch_size == 0
    assert config.model_platform == "onnxruntime"
    with pytest.raises(ValidationError):
        ModelConfig(name="m", base_path=Path("/x"), model_platform="pytorch")


# --- scanning a model repository -------------------------------------------------------------------


def test_scan_repository(tmp_path: Path) -> None:
    models.write_version(tmp_path, "add", 1, models.add_model())
    models.write_version(tmp_path, "add", 2, models.add_model())
    models.write_version(tmp_path, "fixed", 3, models.fixed_model())
    (tmp_path / "notes").mkdir()  # a folder without versions is not a model
    (tmp_path / "notes" / "readme.txt").write_text("hello")
    (tmp_path / "README.md").write_text("not a model")
    (tmp_path / ".hidden" / "1").mkdir(parents=True)
    config = scan_repository(tmp_path)
    by_name = {m.name: m for m in config.model_config_list}
    assert sorted(by_name) == ["add", "fixed"]
    assert by_name["add"].base_path == (tmp_path / "add").resolve()
    assert by_name["fixed"].base_path == (tmp_path / "fixed").resolve()
    assert by_name["add"].max_batch_size == 0


def test_scan_repository_skips_folders_without_a_positive_version(tmp_path: Path) -> None:
    # "0" and "v1" are not version folders (see repository.version_number), so these are not models.
    models.write_version(tmp_path, "real", 1, models.add_model())
    (tmp_path / "zero" / "0").mkdir(parents=True)
    (tmp_path / "named" / "v1").mkdir(parents=True)
    config = scan_repository(tmp_path)
    assert [m.name for m in config.model_config_list] == ["real"]


def test_scan_empty_repository(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        scan_repository(tmp_path)
    assert str(tmp_path) in caught.value.message
    assert "no model folders" in caught.value.message


def test_scan_repository_that_is_not_a_directory(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError) as caught:
        scan_repository(missing)
    assert str(missing) in caught.value.message
    assert "not a directory" in caught.value.message


def test_scan_repository_refuses_a_folder_name_that_is_not_a_model_name(tmp_path: Path) -> None:
    (tmp_path / "bad name" / "1").mkdir(parents=True)
    with pytest.raises(ConfigError) as caught:
        scan_repository(tmp_path)
    assert "name" in caught.value.message


def test_server_limits_have_safe_defaults() -> None:
    settings = ServerSettings()
    assert settings.request_timeout == 60.0  # a run whose length is an input value ends
    assert settings.max_response_bytes == 64 * 1024 * 1024  # as large as the largest request
    assert ServerSettings(request_timeout=0, max_response_bytes=0).max_response_bytes == 0  # 0: no limit
