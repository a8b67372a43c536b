"""The on-disk layouts of a model, each read as a list of versions.

- ``base_path/<version>/model.onnx``: a version is a folder whose name is a positive integer. The
  folder is self-describing: the model file, any external-data files beside it, and (for exported
  text models) the tokenizer and pipeline spec.
- ``base_path`` is a ``.onnx`` file (the old tutorial's ``models/huggingface_model.onnx``): served as
  version 1, read from the file's folder (its external data and tokenizer beside it).
- ``base_path`` is a folder holding exactly one ``.onnx`` file and no version folders: version 1,
  read from that folder.

The last two are *flat* versions: replacing the file (atomically, by rename) is a new version 1,
which poll mode loads and swaps in once it is warm.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from onnxserve.config import MODEL_NAME_PATTERN, ModelConfig, ServerConfig, parse_config
from onnxserve.core.client_text import LOGGED_CHARACTERS, clipped
from onnxserve.core.confinement import folder_entries, leads_outside, resolved
from onnxserve.errors import ConfigError, ModelLoadError

MODEL_FILENAME = "model.onnx"
MODEL_SUFFIX = ".onnx"
FLAT_VERSION = 1
"""The version a model file outside a version folder is served as."""
TEXT_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "onnxserve.json",
)
"""Files beside a flat model file that its version reads (tokenizer and pipeline spec)."""

MAX_SIGNATURE_ENTRIES = 10_000
"""A version's signature looks at this many entries at most (a model is a handful of files)."""

Signature = tuple[tuple[str | int, ...], ...]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VersionFolder:
    """A version: the folder it is read from and its model file's name in it.

    ``flat`` versions are a model file outside any version folder (see the module): the folder is
    shared with other files, so only the files the version reads belong to it (``files``)."""

    version: int
    path: Path
    model_name: str = MODEL_FILENAME
    flat: bool = False

    @property
    def model_file(self) -> Path:
        return self.path / self.model_name

    def files(self) -> list[Path]:
        """A flat version's own files: the model, what is named after it (``model.onnx.data``) and the
        tokenizer and pipeline files beside it; every entry of the folder for a version folder."""
        if not self.flat:
            return sorted(folder_entries(self.path))
        own = [self.model_file]
        try:
            beside = sorted(self.path.iterdir())
        except OSError:
            return own  # a folder that cannot be listed: the load says why (its model file cannot be read)
        for entry in beside:
            if entry.name != self.model_name and (entry.name.startswith(self.model_name) or entry.name in TEXT_FILES):
                own.append(entry)
        return own

    def fingerprint(self) -> Signature | None:
        """:meth:`signature` with each file's inode and status change time too: what a load compares before
        and after it reads the version (a file renamed over another of the same size and modification
        time, as ``cp -p`` or ``rsync -a`` make them, changes its inode; a write, its ctime). Blocking."""
        return self.signature(identity=True)

    def signature(self, identity: bool = False) -> Signature | None:
        """Names, sizes and modification times of the version's files (to tell when they change); None
        for a version folder that leads outside its model's folder, which is never walked. Symlinks are
        not followed, and at most ``MAX_SIGNATURE_ENTRIES`` entries are read. Blocking: the server calls
        it on a worker thread."""
        if not self.flat and leads_outside(self.path, self.path.parent):
            return None
        entries = []
        try:
            for path in self.files() if self.flat else folder_entries(self.path):
                try:
                    info = path.lstat()
                except OSError:
                    continue
                entry = (str(path.relative_to(self.path)), info.st_size, info.st_mtime_ns)
                entries.append((*entry, info.st_ino, info.st_ctime_ns) if identity else entry)
                if len(entries) >= MAX_SIGNATURE_ENTRIES:
                    break
        except (ModelLoadError, OSError):
            pass  # a tree too deep or unreadable: what was read is the signature; loading it says why it is refused
        return tuple(sorted(entries))


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


def _is_folder(path: Path) -> bool:
    """Whether ``path`` is a folder (or a symbolic link to one); False when its type cannot be read (a
    symbolic link loop, a target the server may not search), as pathlib's ``is_dir`` answers for a loop or
    a missing target but not for every error (``PermissionError`` it raises)."""
    try:
        return path.is_dir()
    except OSError:
        return False


def _is_version_folder(entry: os.DirEntry[str]) -> bool:
    """Whether a version-named entry of a model's folder is a version folder: a folder, or a symbolic link
    to one. A symbolic link whose target's type cannot be read (a loop such as ``8 -> 9``, ``9 -> 8``, or
    a target the server may not search) is one too, as a symbolic link that leads outside the model's
    folder is: the loader refuses it before reading anything, with the reason, and the repository index
    shows it UNAVAILABLE (``os.DirEntry.is_dir`` raised ``OSError`` for such an entry, and the whole poll
    round failed: outside attack rt43 F1). Any other entry whose type cannot be read is not a version."""
    try:
        return entry.is_dir()
    except OSError:
        try:
            return entry.is_symlink()
        except OSError:
            return False


def discover_versions(base_path: Path) -> list[VersionFolder]:
    """Every version under ``base_path``, lowest version first (see the module for the layouts); a
    ConfigError when there is none to look at (no such folder or file, a folder that cannot be listed)."""
    try:
        is_file, is_dir = base_path.is_file(), base_path.is_dir()
    except OSError as e:  # pathlib answers False for a loop or a missing path, but raises for the rest
        raise ConfigError(f"{base_path}: base_path cannot be read ({e.strerror})") from None
    if is_file:
        if base_path.suffix != MODEL_SUFFIX:
            raise ConfigError(f"{base_path}: base_path is a file but not an ONNX model (expected a .onnx file)")
        return [VersionFolder(FLAT_VERSION, base_path.parent, base_path.name, flat=True)]
    if not is_dir:
        raise ConfigError(f"{base_path}: base_path is not a directory or a .onnx file (or does not exist)")
    found: dict[int, VersionFolder] = {}
    try:
        with os.scandir(base_path) as entries:  # an entry's type without a stat each: a poll reads it every time
            for entry in entries:
                number = version_number(entry.name)
                if number is None or not _is_version_folder(entry):
                    continue
                if number in found:
                    other = found[number].path.name
                    raise ConfigError(f"{base_path}: folders {other!r} and {entry.name!r} are both version {number}")
                found[number] = VersionFolder(number, base_path / entry.name)
        if not found:
            return _flat_folder(base_path)
    except OSError as e:  # listed as it is removed or made unreadable: this model's error, not the poll's
        raise ConfigError(f"{base_path}: the model's folder cannot be listed ({e.strerror})") from None
    return [found[n] for n in sorted(found)]


def _flat_folder(base_path: Path) -> list[VersionFolder]:
    """The one model file of a folder without version folders, as version 1; none if it holds none (an
    entry whose type cannot be read is taken as a file: the loader refuses it with the reason)."""
    candidates = sorted(
        child.name for child in base_path.iterdir() if child.suffix == MODEL_SUFFIX and not _is_folder(child)
    )
    if len(candidates) > 1:
        raise ConfigError(
            f"{base_path}: holds several model files ({', '.join(candidates)}) and no version folder; "
            "point base_path at one of the files, or put each version in its own folder (1/model.onnx)"
        )
    return [VersionFolder(FLAT_VERSION, base_path, candidates[0], flat=True)] if candidates else []


def versions_to_serve(config: ModelConfig) -> list[VersionFolder]:
    """The version folders the model's policy selects, highest first, or a ConfigError saying why none."""
    found = discover_versions(config.base_path)
    where = f"model {config.name!r} ({config.base_path})"
    if not found:
        raise ConfigError(
            f"{where}: no version folder and no .onnx file (expected a model file, or a positive "
            "integer version folder such as 1/ holding model.onnx)"
        )
    by_number = {v.version: v for v in found}
    chosen = config.model_version_policy.select(list(by_number))
    if not chosen:
        raise ConfigError(f"{where}: model_version_policy selects none of the versions on disk ({sorted(by_number)})")
    for label, version in config.version_labels.items():
        if version not in chosen:
            raise ConfigError(f"{where}: version_labels.{label} points to version {version}, which is not served")
    return [by_number[v] for v in chosen]


def scan_repository(directory: str | os.PathLike[str], warned: set[str] | None = None) -> ServerConfig:
    """A config serving every ``DIR/<name>/`` folder that holds at least one version folder.

    A folder whose name is not a model name (``my model``) is skipped with a warning that names it, so
    the others are served (and a polled repository keeps loading them); ``warned`` (the poll's) holds
    the names already warned about, so a poll warns about each folder once, and again only once it has
    been gone and is back. A folder the server may not list (``lost+found`` of another user) is skipped
    the same way, with one warning that says so."""
    root = Path(directory)
    if not _is_folder(root):
        raise ConfigError(f"{root}: the model repository is not a directory")
    models = []
    refused: set[str] = set()
    inside = root.resolve()
    try:
        children = sorted(root.iterdir())
    except OSError as e:
        raise ConfigError(f"{root}: the model repository cannot be listed ({e.strerror})") from None
    for child in children:
        if child.name.startswith(".") or not _is_folder(child):
            continue
        real = resolved(child)
        if real is None or inside not in real.parents:
            log.warning("%s: %s leads outside the model repository; skipped", root, child.name)
            continue
        try:
            holds_model = any(
                (version_number(v.name) is not None and _is_folder(v)) or v.suffix == MODEL_SUFFIX
                for v in child.iterdir()
            )
        except OSError as e:  # a folder the server may not list (lost+found): skipped, as a name is, once
            refused.add(child.name)
            if warned is None or child.name not in warned:
                log.warning(
                    "%s: folder %r cannot be listed (%s); it is not served",
                    root,
                    clipped(child.name, LOGGED_CHARACTERS),
                    e.strerror,
                )
            continue
        if not holds_model:
            continue
        if not re.fullmatch(MODEL_NAME_PATTERN, child.name):
            refused.add(child.name)
            if warned is None or child.name not in warned:
                log.warning(
                    "%s: folder %r is not served: a model name is letters, digits, '_', '.', '-' (starting with a "
                    "letter or digit, at most 128 characters); rename it",
                    root,
                    clipped(child.name, LOGGED_CHARACTERS),
                )
            continue
        models.append({"name": child.name, "base_path": child.name})
    if warned is not None:  # a folder renamed away and back is warned about again
        warned.clear()
        warned.update(refused)
    if not models:
        raise ConfigError(f"{root}: no model folders found (expected {root}/<name>/<version>/model.onnx)")
    return parse_config({"model_config_list": models}, str(root), root.resolve())
