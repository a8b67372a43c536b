"""The on-disk layout of a model: ``base_path/<version>/model.onnx``.

A version is a folder whose name is a positive integer. The folder is self-describing: the model
file, any external-data files beside it, and (for exported text models) the tokenizer and pipeline
spec.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from onnxserve.config import ModelConfig, ServerConfig, parse_config
from onnxserve.errors import ConfigError

MODEL_FILENAME = "model.onnx"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VersionFolder:
    version: int
    path: Path

    @property
    def model_file(self) -> Path:
        return self.path / MODEL_FILENAME


MAX_VERSION = 2**63 - 1
"""The highest version number: TF Serving's and Triton's versions are int64."""


def version_number(name: str) -> int | None:
    """The version a folder name or a client's version string denotes, or None (``"1"`` and ``"01"`` are
    version 1; ``"0"``, ``"v1"``, ``"-1"`` and numbers above ``MAX_VERSION`` are not).

    The one parser of version strings: every route and RPC that takes a version goes through it (via
    ``ServedModel.lookup``), so a 5,000-digit "version" is an unknown version, never Python's own
    "Exceeds the limit (4300 digits)" error."""
    if not name.isascii() or not name.isdigit():
        return None
    digits = name.lstrip("0")
    if not digits or len(digits) > len(str(MAX_VERSION)):
        return None
    number = int(digits)
    return number if number <= MAX_VERSION else None


def discover_versions(base_path: Path) -> list[VersionFolder]:
    """Every version folder under ``base_path``, lowest version first."""
    if not base_path.is_dir():
        raise ConfigError(f"{base_path}: base_path is not a directory")
    found: dict[int, VersionFolder] = {}
    for child in base_path.iterdir():
        number = version_number(child.name)
        if number is None or not child.is_dir():
            continue
        if number in found:
            other = found[number].path.name
            raise ConfigError(f"{base_path}: folders {other!r} and {child.name!r} are both version {number}")
        found[number] = VersionFolder(number, child)
    return [found[n] for n in sorted(found)]


def versions_to_serve(config: ModelConfig) -> list[VersionFolder]:
    """The version folders the model's policy selects, highest first, or a ConfigError saying why none."""
    found = discover_versions(config.base_path)
    where = f"model {config.name!r} ({config.base_path})"
    if not found:
        raise ConfigError(f"{where}: no version folder (expected a positive integer folder such as 1/)")
    by_number = {v.version: v for v in found}
    chosen = config.model_version_policy.select(list(by_number))
    if not chosen:
        raise ConfigError(f"{where}: model_version_policy selects none of the versions on disk ({sorted(by_number)})")
    for label, version in config.version_labels.items():
        if version not in chosen:
            raise ConfigError(f"{where}: version_labels.{label} points to version {version}, which is not served")
    return [by_number[v] for v in chosen]


def scan_repository(directory: str | os.PathLike[str]) -> ServerConfig:
    """A config serving every ``DIR/<name>/`` folder that holds at least one version folder."""
    root = Path(directory)
    if not root.is_dir():
        raise ConfigError(f"{root}: the model repository is not a directory")
    models = []
    inside = root.resolve()
    for child in sorted(root.iterdir()):
        if child.name.startswith(".") or not child.is_dir():
            continue
        if inside not in child.resolve().parents:
            log.warning("%s: %s leads outside the model repository; skipped", root, child.name)
            continue
        if not any(v.is_dir() and version_number(v.name) is not None for v in child.iterdir()):
            continue
        models.append({"name": child.name, "base_path": child.name})
    if not models:
        raise ConfigError(f"{root}: no model folders found (expected {root}/<name>/<version>/model.onnx)")
    return parse_config({"model_config_list": models}, str(root), root.resolve())
