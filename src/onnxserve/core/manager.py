"""Model control: bring the served versions in line with a config, a repository, or an explicit request.

``ModelManager.apply`` compares what a config (re-read, or a rescanned repository) says should be
served with what is loaded:

- new versions are loaded and warmed on a worker thread, and only then receive traffic;
- versions no longer wanted (removed from disk, out of policy, their model removed) stop receiving
  new requests at once (state UNLOADING) and are unloaded when their in-flight requests have finished
  (or ``drain_seconds`` passed: requests still waiting for the version's room or an instance then fail,
  503 / UNAVAILABLE, its room goes with it, and runs still going are stopped and answered 503);
- a version that fails to load is recorded with its reason (the repository index shows it), is not
  retried until its folder changes, and never displaces the versions already serving: the policy
  chooses among the versions that loaded;
- in poll mode a new version folder is taken only once its contents (names, sizes, modification times)
  have not changed between two polls, so a version still being copied is not picked up half-written;
  that look never leaves the repository (a version folder that resolves outside its model's folder is
  not walked at all, and symlinks inside are not followed), looks at no more than
  ``MAX_SIGNATURE_ENTRIES`` entries, and, like every file-system read here, runs on a worker thread,
  never on the event loop;
- versions whose folders are gone leave the repository index (a failed one too);
- a served version whose files change on disk (names, sizes, modification times: a file rewritten in
  place, a new folder moved over the version's, a model file served without a version folder replaced)
  is loaded again once stable (in explicit mode: on its next load); the old one keeps serving until the
  new one is warm, then drains and is unloaded, and one that fails to load again leaves the old one serving;
- a model the config no longer names begins its drain and the rest of the config is applied at once; a
  model that comes back while it drains is applied once its drain has ended;
- a config error for one model leaves that model as it was; an invalid config as a whole is refused
  before anything changes.

Explicit control (``load`` / ``unload``) accepts only model names of the safe character set that
resolve inside the repository (or name an entry of the config file); symlinks that leave it are refused.
An unload answers once the model's drain is over, without holding the manager's lock meanwhile: other
models' loads and unloads go on, and control of the same model waits for the drain (``_control``). A
model leaving as a whole is in ``registry.retiring`` until it is dropped (strict readiness leaves it out).
Under explicit control a reload (SIGHUP) applies the catalog to the models loaded only.

An unloaded version is freed when its unload ends: nothing it leaves behind (the refusal its closed text
room keeps, the errors of its requests) refers to it, so no cycle waits for the garbage collector.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import re
import stat
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from onnxserve.config import MODEL_NAME_PATTERN, ModelConfig, ServerConfig
from onnxserve.core.client_text import shown
from onnxserve.core.confinement import resolved
from onnxserve.core.daemon_calls import call_in_daemon_thread
from onnxserve.core.memory import give_back_free_memory, release_frames
from onnxserve.core.observe import VersionRecord
from onnxserve.core.registry import ModelRegistry, ModelVersion, ServedModel, load_version
from onnxserve.core.repository import Signature, VersionFolder, discover_versions, scan_repository
from onnxserve.core.shared_scan import SharedScan
from onnxserve.core.types import ModelState
from onnxserve.errors import (
    ConfigError,
    FilesChangedError,
    InvalidInputError,
    ModelNotFoundError,
    OnnxServeError,
    UnavailableError,
)

log = logging.getLogger(__name__)

UNLOAD_POLL_SECONDS = 0.01

LOAD_WARNING_SECONDS = 60.0
"""How often a load that has not finished says so (a WARNING): reloads and model control wait for it."""

MODEL_KEYS = frozenset({"model_version_policy", "version_labels"})
"""Keys of a model's config entry that apply to the model as a whole; a change of any other key (its
layout, batching, session options, ...) loads each loaded version again with the new entry."""


class ControlMode(enum.Enum):
    NONE = "none"  # serve what start-up loaded; load/unload are refused
    POLL = "poll"  # re-read the config or rescan the repository every few seconds (and on SIGHUP)
    EXPLICIT = "explicit"  # load and unload on request (V2 repository extension)


@dataclass(frozen=True)
class Catalog:
    """Where models come from: a config file (re-read on reload) or a repository folder (rescanned)."""

    config_file: Path | None = None
    repository: Path | None = None
    # Repository folders already warned about as not model names (each is warned about once).
    warned: set[str] = field(default_factory=set, compare=False, repr=False)
    # Control requests' readings of the catalog, on a worker thread, one at a time and shared (rt25 F7).
    scans: SharedScan[ServerConfig] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "scans", SharedScan(self.read_for_control))

    def read(self) -> ServerConfig:
        from onnxserve.config import load_config

        if self.config_file is not None:
            return load_config(self.config_file)
        assert self.repository is not None
        return scan_repository(self.repository, self.warned)

    async def find(self, name: str) -> ModelConfig:
        """The config of one model, for an explicit load; the name and its path are confined. Read from the
        shared reading of the catalog (``scans``); a name it lacks is looked for in a reading that started
        after this call (a model folder copied in just before its load)."""
        if not re.fullmatch(MODEL_NAME_PATTERN, name):
            raise InvalidInputError(
                f"invalid model name {name!r}: use letters, digits, '_', '.', '-' (starting with a letter or digit)"
            )
        asked = time.monotonic()
        for since in (None, asked):
            # a name with no folder, or whose folder has not changed since the last reading began, is not looked
            # for again: a flood of loads of unknown names would otherwise read the repository over and over
            # (one core busy with 3,000 folders: rt26; a folder that holds no model: rt29)
            repository = self.repository if self.config_file is None else None
            if since is not None and repository is not None:
                changed = await asyncio.to_thread(_changed_since, repository, name, self.scans.result_started)
                if not changed:
                    break
            for model in (await self.scans.get(since)).model_config_list:
                if model.name == name:
                    self._confine(model)
                    return model
        raise ModelNotFoundError(f"no model {shown(name)} in the repository")

    def read_for_control(self) -> ServerConfig:
        """The catalog as it is now (blocking: control requests read it through ``scans``)."""
        if self.repository is not None and self.config_file is None:
            root = self.repository
            if not root.is_dir():
                raise ConfigError(f"{root}: the model repository is not a directory")
            try:
                return scan_repository(root, self.warned)
            except ConfigError:
                return ServerConfig(model_config_list=[])
        return self.read()

    def _confine(self, model: ModelConfig) -> None:
        if self.repository is None:
            return  # config files are the operator's own; their paths are trusted
        root = self.repository.resolve()
        target = resolved(model.base_path)
        if target is None or (target != root and root not in target.parents):
            raise InvalidInputError(f"model {model.name!r} resolves outside the model repository; refused")


FILE_TIME_SLACK_SECONDS = 1.0
"""File times come from a coarse clock (up to a tick behind the wall clock): a change this close before a
reading began counts as possibly after it."""


def _changed_since(repository: Path, name: str, started: float | None) -> bool:
    """Whether the repository has a folder ``name`` that may hold a model the reading begun at ``started``
    (``time.time()``; None: unknown, so possibly) did not see: the repository's entries changed since (a
    folder copied or moved in: a moved folder keeps its own times) or the folder's own did (a version added).
    Blocking: two stats."""
    try:
        folder, root = os.stat(repository / name), os.stat(repository)
    except OSError:
        return False
    if not stat.S_ISDIR(folder.st_mode):
        return False
    return started is None or max(folder.st_mtime, root.st_mtime) >= started - FILE_TIME_SLACK_SECONDS


MAX_LOGGED_VERSIONS = 10
"""The most version numbers one log line lists."""


def _without_model_file(folders: list[VersionFolder]) -> set[int]:
    """The versions among ``folders`` (version folders, not links: a link is confined first, by the loader)
    whose model file is not there: an lstat or two each. Blocking: called on a worker thread."""
    return {
        f.version
        for f in folders
        if not f.flat and not os.path.lexists(os.path.join(f.path, f.model_name)) and not os.path.islink(f.path)
    }


def _empty_reason(folder: VersionFolder) -> str:
    return f"{folder.model_file}: model file not found (expected {folder.model_name} in the version folder)"


def _signatures(folders: list[VersionFolder]) -> dict[Path, Signature | None]:
    return {f.model_file: f.signature() for f in folders}


def _unloaded(name: str, number: int) -> UnavailableError:
    """The error of a request that still waited for version ``number`` of model ``name`` when it was unloaded.

    Given by name and number, never by the version: a closed text room keeps its refusal
    (``partial(_unloaded, name, number)``), and a refusal holding the version made a cycle (version ->
    room -> refusal -> version) that kept every unloaded version, its ONNX Runtime session included, until
    a full garbage collection: 30 reloads of the demo model kept 1 GB (outside attack rt25 F2)."""
    return UnavailableError(
        f"model {name!r} version {number} was unloaded before this request could run; send it again"
    )


def _cut(name: str, number: int) -> UnavailableError:
    """The error of a request whose run was still going when its version's drain ended."""
    return UnavailableError(
        f"model {name!r} version {number} was unloaded while this request ran (its drain ended); "
        "its run was stopped; send it again"
    )


class ModelManager:
    """Changes what the registry serves; every change runs on the event loop, loads on a thread."""

    def __init__(
        self,
        registry: ModelRegistry,
        catalog: Catalog,
        mode: ControlMode = ControlMode.NONE,
        drain_seconds: float = 30.0,
        wait_for_stable_folders: bool = False,
    ) -> None:
        self.registry = registry
        self.catalog = catalog
        self.mode = mode
        self.drain_seconds = drain_seconds
        self.wait_for_stable_folders = wait_for_stable_folders
        # Keyed by model file: flat versions of several models may share a folder.
        self._signatures: dict[Path, Signature | None] = {}
        # By model and file: one model's entry failing with a file says nothing of another's.
        self._failed_signatures: dict[tuple[str, Path], Signature | None] = {}
        self._empty: dict[str, set[int]] = {}  # by model: version folders seen without their model file
        # (model, version): the entry a version failed to load again with, not retried until it changes
        self._failed_entries: dict[tuple[str, int], dict[str, object]] = {}
        self._said: dict[str, str] = {}  # by topic: the last error logged, so a poll does not repeat it
        self._lock = asyncio.Lock()
        self._unloading: dict[asyncio.Task[None], ModelVersion] = {}  # each version's unload, until it is done
        # By model: the task that drains a model leaving as a whole and then drops it. The lock is not held
        # meanwhile (other models' loads and unloads go on); control of that model waits for it to end.
        self._retiring: dict[str, asyncio.Task[None]] = {}
        # By model: the config of a model that came back (a reload) while it drained, applied after the drain
        # by the task in ``_returns``
        self._returning: dict[str, ModelConfig] = {}
        self._returns: dict[str, asyncio.Task[None]] = {}

    # --- reconciling with a whole config ---------------------------------------------------------

    async def reload(self) -> None:
        """Re-read the catalog and apply it; an invalid config is logged and changes nothing.

        Under explicit control only the models loaded now are applied (their changed entries and files
        load again, a model the catalog no longer names is unloaded): which models are loaded is the
        control API's choice (and ``--load-model``'s), which a SIGHUP does not undo, as Triton's explicit
        mode loads nothing by itself."""
        try:
            config = await asyncio.to_thread(self.catalog.read)
        except OnnxServeError as e:
            self._error_once("reload", "reload refused; the running configuration keeps serving: %s", e.message)
            return
        if self._said.pop("reload", None) is not None:
            log.info("the config file is valid again; applying it")
        await self.apply(config, loaded_only=self.mode is ControlMode.EXPLICIT)

    def _error_once(self, topic: str, message: str, *args: object) -> None:
        """Log an ERROR, or a DEBUG line when the last one of ``topic`` said the same (each poll meets
        the same mistake until an operator mends it: one line says it)."""
        said = message % args
        repeated = self._said.get(topic) == said
        self._said[topic] = said
        log.log(logging.DEBUG if repeated else logging.ERROR, "%s%s", said, " (still)" if repeated else "")

    async def apply(self, config: ServerConfig, loaded_only: bool = False) -> None:
        """Bring the served models in line with ``config``. A model the config no longer names begins its
        retirement (no new traffic; unloaded once its requests have finished) and the rest of the config is
        applied at once, without waiting for that drain: a busy removed model held every other change up to
        ``drain_seconds`` each, one after the other (outside attack rt25 F6). A model that comes back while
        it still drains is applied once its drain has ended (``_return_after_drain``).

        ``loaded_only``: the config applies to the models loaded now (and not being unloaded) only."""
        async with self._lock:
            if loaded_only:
                loaded = set(self.registry.names()) - set(self._retiring)
                config = ServerConfig(model_config_list=[m for m in config.model_config_list if m.name in loaded])
                wanted = {m.name: m for m in config.model_config_list}
                for name in loaded - set(wanted):
                    self._begin_retirement(name)
                for model in config.model_config_list:
                    await self._apply_model(model)
                return
            wanted = {m.name: m for m in config.model_config_list}
            for name in self.registry.names():
                if name not in wanted and name not in self._retiring:
                    self._begin_retirement(name)
            for name in [n for n in self._returning if n not in wanted]:
                del self._returning[name]  # removed again before its drain ended: it stays away
            for key in [k for k in self.registry.failures if k[0] not in wanted]:
                del self.registry.failures[key]  # a model that is gone leaves the index
            for model in config.model_config_list:
                if model.name in self._retiring:
                    self._return_after_drain(model)
                    continue
                self._returning.pop(model.name, None)  # applied here: a return waiting for a drain has nothing to do
                await self._apply_model(model)

    def _return_after_drain(self, config: ModelConfig) -> None:
        """Apply ``config`` (the latest one wanted) to a model that still drains, once its drain has ended."""
        self._returning[config.name] = config
        if config.name not in self._returns:
            task = asyncio.get_running_loop().create_task(self._returned(config.name))
            self._returns[config.name] = task

    async def _returned(self, name: str) -> None:
        try:
            async with self._control(name):  # after its drain
                config = self._returning.pop(name, None)
                if config is not None:
                    log.info("model %s: its drain ended; it loads again, as the configuration says", name)
                    await self._apply_model(config)
        finally:
            self._returns.pop(name, None)

    async def _apply_model(self, config: ModelConfig, retry_failed: bool = False) -> list[int]:
        """Bring one model in line with its config entry and its folder; the served versions that failed
        to load again (their files or their entry changed), which keep serving as they were."""
        failed: list[int] = []
        try:
            on_disk = {f.version: f for f in await asyncio.to_thread(discover_versions, config.base_path)}
        except ConfigError as e:
            log.error("model %s: %s; it keeps its current versions", config.name, e.message)
            return failed
        self._forget_removed(config, on_disk)
        served = self.registry.get(config.name) if config.name in self.registry.names() else None
        model = ServedModel(config, served.versions if served is not None else {})
        current = {n: v for n, v in model.versions.items() if v.state is not ModelState.UNLOADING}
        present = {n: v for n, v in current.items() if n in on_disk}
        candidates = [f for n, f in on_disk.items() if n not in current]
        empty = await asyncio.to_thread(_without_model_file, candidates)
        self._note_empty(config.name, empty, on_disk)
        if empty:
            candidates = [f for f in candidates if f.version not in empty]
        # every served version's files are looked at too: a version whose files changed (replaced in place,
        # or a new folder moved over it) loads again, as a flat version's file always did
        present_folders = [f for n, f in on_disk.items() if n in present]
        signatures = await asyncio.to_thread(_signatures, [*candidates, *present_folders])
        new = [f for f in candidates if self._takeable(config.name, f, signatures[f.model_file], retry_failed)]
        chosen = set(config.model_version_policy.select([*present, *(f.version for f in new)]))
        for folder in present_folders:
            number = folder.version
            if self._replaced(config.name, present[number], folder, signatures[folder.model_file], retry_failed):
                version = await self._load(config, folder)
                if version is not None:
                    old = present[number]
                    present[number] = version
                    model.versions[number] = version
                    self.registry.put(model)  # the new one takes traffic; the old one drains
                    self._retire(model, old, replaced=True)
                else:
                    failed.append(number)
        for number, loaded in list(present.items()):
            if self._entry_changed(config, loaded):
                version = await self._load(config, on_disk[number])
                if version is None:
                    self._failed_entries[(config.name, number)] = _version_entry(config)
                    failed.append(number)
                    continue
                present[number] = version
                model.versions[number] = version
                self.registry.put(model)  # the new one takes traffic; the old one drains
                self._retire(model, loaded, replaced=True)
        for folder in sorted(new, key=lambda f: -f.version):
            if folder.version in chosen:
                version = await self._load(config, folder)
                if version is not None:
                    present[folder.version] = version
                    model.versions[folder.version] = version
                    self.registry.put(model)  # from here on it takes traffic
        # The policy chooses among what actually loaded, so a failed new version displaces nothing.
        keep = set(config.model_version_policy.select(list(present)))
        if not keep and current:
            self._error_once(
                f"none:{config.name}",
                "model %s: no version on disk can be served; the loaded versions keep serving",
                config.name,
            )
            return failed
        self._said.pop(f"none:{config.name}", None)
        stale = [label for label, number in config.version_labels.items() if number not in keep]
        if stale:
            labels = served.config.version_labels if served is not None else {}
            self._error_once(
                f"labels:{config.name}",
                "model %s: version_labels %s point to versions that are not served; keeping labels %s",
                config.name,
                ", ".join(stale),
                labels,
            )
            model = ServedModel(config.model_copy(update={"version_labels": labels}), model.versions)
        else:
            self._said.pop(f"labels:{config.name}", None)
        if keep or served is not None:
            self.registry.put(model)
        for number, version in current.items():
            if number not in keep:
                self._retire(model, version)
        return failed

    def _entry_changed(self, config: ModelConfig, loaded: ModelVersion) -> bool:
        """Whether a loaded version was loaded with another config entry than ``config`` (keys beyond
        :data:`MODEL_KEYS`), and has not failed to load with this one already (logged then)."""
        key = (config.name, loaded.version)
        wanted, had = _version_entry(config), _version_entry(loaded.config)
        changed = sorted(name for name in wanted if wanted[name] != had.get(name))
        if not changed:
            if self._failed_entries.pop(key, None) is not None:
                self.registry.failures.pop(key, None)  # the entry it failed with is gone
            return False
        if self._failed_entries.get(key) == wanted:
            return False
        log.info(
            "model %s: version %d loads again: its config entry changed (%s); it serves as it is meanwhile",
            config.name,
            loaded.version,
            ", ".join(changed),
        )
        return True

    def _note_empty(self, name: str, empty: set[int], on_disk: dict[int, VersionFolder]) -> None:
        """Version folders without their model file are unavailable, and cost one look per poll (no walk,
        no load) until the file appears; those new in a poll are logged once, in one line."""
        known = self._empty.get(name, set())
        new = sorted(empty - known)
        for number in new:
            self.registry.failures[(name, number)] = _empty_reason(on_disk[number])
        if empty:
            self._empty[name] = empty
        else:
            self._empty.pop(name, None)
        if new:
            shown = ", ".join(map(str, new[:MAX_LOGGED_VERSIONS])) + (" ..." if len(new) > MAX_LOGGED_VERSIONS else "")
            log.error(
                "model %s: %d version folder(s) hold no model file (versions %s); each is skipped until it has one",
                name,
                len(new),
                shown,
            )

    def _forget_removed(self, config: ModelConfig, on_disk: dict[int, VersionFolder]) -> None:
        """Versions whose folders are gone leave the index (failures) and the poll's memory."""
        for key in [k for k in self.registry.failures if k[0] == config.name and k[1] not in on_disk]:
            del self.registry.failures[key]
        base = config.base_path
        signatures = [p for p in self._signatures if p == base or base in p.parents]
        failed = [(n, p) for n, p in self._failed_signatures if n == config.name]
        if signatures or failed:  # (the model files of thousands of empty folders are not built for nothing)
            files = {f.model_file for f in on_disk.values()}
            for path in signatures:
                if path not in files:
                    del self._signatures[path]
            for model_file in failed:
                if model_file[1] not in files:
                    del self._failed_signatures[model_file]

    def _replaced(
        self, name: str, loaded: ModelVersion, folder: VersionFolder, signature: Signature | None, retry_failed: bool
    ) -> bool:
        """Whether a loaded version's files changed (and are stable), so it must load again."""
        if loaded.signature == signature:
            return False
        if not self._takeable(name, folder, signature, retry_failed):
            return False
        log.info(
            "model %s: version %d's files changed; it loads again and serves as it is meanwhile", name, loaded.version
        )
        return True

    def _takeable(
        self, name: str, folder: VersionFolder, signature: Signature | None, retry_failed: bool = False
    ) -> bool:
        """Whether a version folder not loaded yet may be loaded now (stable, and not failed as it is).

        A folder that leads outside (no signature) is tried once, without waiting for it to be stable:
        the loader refuses it before reading anything, and the index shows why."""
        key = (name, folder.model_file)
        if key in self._failed_signatures and not retry_failed and self._failed_signatures[key] == signature:
            return False
        if signature is None:
            return True
        if not self.wait_for_stable_folders:
            return True
        previous = self._signatures.get(folder.model_file)
        self._signatures[folder.model_file] = signature
        if previous != signature:
            log.info("model %s: version %d is new or still changing; taking it once it is stable", name, folder.version)
            return False
        return True

    async def _load(self, config: ModelConfig, folder: VersionFolder) -> ModelVersion | None:
        log.info("model %s: loading version %d", config.name, folder.version)
        try:
            version = await self._loaded(config, folder)
        except Exception as e:  # whatever a version's files make the loader raise is that version's failure
            message = e.message if isinstance(e, OnnxServeError) else f"{type(e).__name__}: {e}"
            release_frames(e)
            again = self.registry.failures.get((config.name, folder.version)) == message
            self.registry.failures[(config.name, folder.version)] = message
            if isinstance(e, FilesChangedError):  # not the files' fault: the next stable look loads them again
                self._failed_signatures.pop((config.name, folder.model_file), None)  # (outside attack rt37)
            else:
                self._failed_signatures[(config.name, folder.model_file)] = await asyncio.to_thread(folder.signature)
            # once per distinct reason: a control client that retries a broken model cannot flood the log
            log.log(
                logging.INFO if again else logging.ERROR,
                "model %s: version %d failed to load%s: %s",
                config.name,
                folder.version,
                " again, for the same reason" if again else "",
                message,
            )
            # what the failed load took (a parsed model, weights half copied) goes back to the system: a model
            # that ran out of memory as it loaded kept 670 MB a try (outside attack rt18); recorded first, so
            # the index never shows the version neither loading nor failed
            await asyncio.to_thread(give_back_free_memory)
            return None
        self.registry.failures.pop((config.name, folder.version), None)
        self._failed_signatures.pop((config.name, folder.model_file), None)
        log.info("model %s: version %d ready (%.2f s)", config.name, folder.version, version.load_seconds)
        return version

    async def _loaded(self, config: ModelConfig, folder: VersionFolder) -> ModelVersion:
        """``load_version`` on a daemon thread (a load that never returns cannot keep the process from
        exiting), with a WARNING every ``LOAD_WARNING_SECONDS`` while it runs: reloads wait for it."""
        call = partial(load_version, config, folder, self.registry.observers)
        loading = asyncio.ensure_future(call_in_daemon_thread(call, f"onnxserve-load-{config.name}"))
        key = (config.name, folder.version)
        self.registry.loading[key] = time.monotonic()  # the repository index shows it LOADING meanwhile
        try:
            return await self._awaited(config, folder, loading)
        finally:
            self.registry.loading.pop(key, None)

    async def _awaited(
        self, config: ModelConfig, folder: VersionFolder, loading: asyncio.Future[ModelVersion]
    ) -> ModelVersion:
        waited = 0.0
        while True:
            done, _ = await asyncio.wait({loading}, timeout=LOAD_WARNING_SECONDS)
            if done:
                return loading.result()
            waited += LOAD_WARNING_SECONDS
            log.warning(
                "model %s: version %d is still loading after %.0f s; reloads and model control wait for it",
                config.name,
                folder.version,
                waited,
            )

    # --- retiring ---------------------------------------------------------------------------------

    def _begin_retirement(self, name: str) -> asyncio.Task[None]:
        """Stop new traffic to every version of a model now; the task that drops the model once they are
        unloaded. Meanwhile the model leaves strict readiness (it is going on purpose) and control of it
        waits (:meth:`_control`); the lock is not needed for the drain."""
        served = self.registry.get(name)
        unloads = [self._retire(served, version) for version in list(served.versions.values())]
        self.registry.retiring.add(name)
        task = asyncio.get_running_loop().create_task(self._retirement(name, served, unloads))
        self._retiring[name] = task
        return task

    async def _retirement(self, name: str, served: ServedModel, unloads: list[asyncio.Task[None]]) -> None:
        try:
            await asyncio.gather(*unloads, return_exceptions=True)
            if name in self.registry.names() and self.registry.get(name) is served:
                self.registry.drop(name)
        finally:
            self.registry.retiring.discard(name)
            del self._retiring[name]

    @contextlib.asynccontextmanager
    async def _control(self, name: str) -> AsyncIterator[None]:
        """The manager's lock, taken once model ``name`` is not leaving as a whole: a load or unload of a
        model being unloaded waits for its drain to end, as it did when the unload held the lock
        throughout; other models' control does not."""
        while True:
            leaving = self._retiring.get(name)
            if leaving is not None:
                await asyncio.wait({leaving})
                continue
            await self._lock.acquire()
            if name not in self._retiring:
                break
            self._lock.release()
        try:
            yield
        finally:
            self._lock.release()

    def _retire(self, served: ServedModel, version: ModelVersion, replaced: bool = False) -> asyncio.Task[None]:
        """Stop new traffic to a version now; unload it once its in-flight requests have finished. The
        task that unloads it (the one already doing so for a version unloading already).

        ``replaced``: a new load of the same version serves already, so observers hear nothing of this."""
        if version.state is ModelState.UNLOADING:
            running = next((t for t, v in self._unloading.items() if v is version), None)
            if running is not None:
                return running
        version.state = ModelState.UNLOADING
        if not replaced:
            self.registry.observers.version(VersionRecord(version.name, str(version.version), version.state.value))
        task = asyncio.get_running_loop().create_task(self._unload(served, version, replaced))
        self._unloading[task] = version
        task.add_done_callback(self._forget_unload)
        return task

    def _forget_unload(self, task: asyncio.Task[None]) -> None:
        self._unloading.pop(task, None)

    async def _unload(self, served: ServedModel, version: ModelVersion, replaced: bool = False) -> None:
        deadline = asyncio.get_running_loop().time() + self.drain_seconds
        while version.active > 0 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(UNLOAD_POLL_SECONDS)
        if version.active > 0:
            log.warning(
                "model %s: unloading version %d with %d requests still open",
                version.name,
                version.version,
                version.active,
            )
        # text requests still waiting for room fail (the room keeps its refusal: name and number only)
        version.text_room.close(partial(_unloaded, version.name, version.version))
        # and those still waiting for an instance; runs still going are stopped (ONNX Runtime's terminate
        # flag), so a version's unload, like the server's drain, ends within its drain time
        await version.scheduler.stop(_unloaded(version.name, version.version), _cut(version.name, version.version))
        await asyncio.to_thread(version.scheduler.close)
        if served.versions.get(version.version) is version:
            del served.versions[version.version]
        version.state = ModelState.UNAVAILABLE
        if replaced:
            log.info("model %s: the replaced load of version %d unloaded", version.name, version.version)
            return
        self.registry.observers.version(VersionRecord(version.name, str(version.version), "UNLOADED"))
        log.info("model %s: version %d unloaded", version.name, version.version)

    async def _settle(self) -> None:
        """Wait for every unload in progress, and every model leaving to be dropped."""
        while self._unloading or self._retiring:
            await asyncio.gather(*self._unloading, *self._retiring.values(), return_exceptions=True)

    # --- explicit control -------------------------------------------------------------------------

    def _require_explicit(self, verb: str) -> None:
        if self.mode is not ControlMode.EXPLICIT:
            raise InvalidInputError(
                f"model {verb} is not allowed: model control mode is {self.mode.value!r}; "
                "start the server with --model-control-mode explicit to load and unload models"
            )

    async def load(self, name: str) -> None:
        """Load (or reload) a model from the catalog by name."""
        self._require_explicit("load")
        config = await self.catalog.find(name)
        async with self._control(name):
            again = sorted(set(await self._apply_model(config, retry_failed=True)))
            # every version's reason, also one that failed as before (a retry answered only "no version")
            failed = [
                f"version {number}: {reason}"
                for (model, number), reason in sorted(self.registry.failures.items())
                if model == name
            ]
            reasons = {n: self.registry.failures.get((name, n), "") for n in again}
        if name not in self.registry.names() or not any(v.ready for v in self.registry.get(name).versions.values()):
            raise InvalidInputError(f"model {name!r} failed to load: {'; '.join(failed) or 'no version to serve'}")
        if again:
            # a served version whose files (or entry) changed did not load again: it serves as it was
            said = "; ".join(f"version {n}: {reason}" for n, reason in reasons.items())
            raise InvalidInputError(
                f"model {name!r} failed to load again: {said}; the version(s) loaded before keep serving"
            )

    async def unload(self, name: str) -> None:
        self._require_explicit("unload")
        if not re.fullmatch(MODEL_NAME_PATTERN, name):
            raise InvalidInputError(f"invalid model name {name!r}")
        async with self._control(name):
            if name not in self.registry.names():
                raise ModelNotFoundError(f"model {name!r} is not loaded")
            retirement = self._begin_retirement(name)
        # answered once the model is unloaded (its drain, at most drain_seconds), without holding the
        # lock meanwhile: loads and unloads of other models go on; a cancelled answer leaves it going
        await asyncio.shield(retirement)

    async def known_models(self) -> list[str]:
        """Every model the catalog names, loaded or not (explicit mode's repository index), from the shared
        reading of the catalog (``Catalog.scans``)."""
        try:
            return sorted(m.name for m in (await self.catalog.scans.get()).model_config_list)
        except OnnxServeError:
            return []

    async def poll(self, seconds: float, stop: Callable[[], bool]) -> None:
        """Reload every ``seconds`` until ``stop()`` (poll mode)."""
        while not stop():
            await asyncio.sleep(seconds)
            if not stop():
                try:
                    await self.reload()
                except Exception:  # the poll outlives any one bad round; the next one tries again
                    log.exception("repository poll: this round failed; polling goes on")

    async def close(self) -> None:
        for task in list(self._returns.values()):
            task.cancel()  # no load of a returning model after a shutdown began
        await asyncio.gather(*self._returns.values(), return_exceptions=True)
        self._returns.clear()
        self._returning.clear()
        await self._settle()


def _version_entry(config: ModelConfig) -> dict[str, object]:
    """The keys of a model's config entry that a loaded version was made with (all but :data:`MODEL_KEYS`)."""
    return config.model_dump(exclude=set(MODEL_KEYS))
