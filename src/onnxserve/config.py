"""Model configuration: the config file's pydantic models and the loaders that read them.

Server settings (ports, limits, timeouts) live in ``onnxserve.server.settings``.

The seed document's file is accepted verbatim::

    {"model_config_list": [
      {"name": "my_model", "base_path": "/path/to/my/model", "model_platform": "onnxruntime",
       "max_batch_size": 32}]}

Extensions live beside those keys (``model_version_policy``, ``version_labels``,
``execution_providers``, ``session_options``). Unknown keys are errors that name the key and the
file. JSON and YAML files are accepted. Relative ``base_path``s resolve against the config file.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Annotated, Any, Literal

import orjson
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from onnxserve.core.client_text import logged
from onnxserve.errors import ConfigError

MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$"
PLATFORMS = ("onnxruntime", "onnxruntime_onnx", "onnx")
"""Accepted ``model_platform`` values; Triton names ONNX models ``onnxruntime_onnx``."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SessionOptions(_Strict):
    """ONNX Runtime session options for one model."""

    intra_op_num_threads: Annotated[int, Field(ge=0)] = 0  # 0: ONNX Runtime's default
    inter_op_num_threads: Annotated[int, Field(ge=0)] = 0
    graph_optimization_level: Literal["disable", "basic", "extended", "all"] = "all"
    execution_mode: Literal["sequential", "parallel"] = "sequential"
    # ONNX Runtime's thread pools spin-wait for work by default (fast alone, slow next to other busy
    # processes); False turns it off, None keeps ONNX Runtime's default.
    intra_op_allow_spinning: Annotated[bool, Field(strict=True)] | None = None
    inter_op_allow_spinning: Annotated[bool, Field(strict=True)] | None = None
    # ONNX Runtime's CPU memory arena keeps the peak of every run and can be left inconsistent by an
    # allocation that fails inside a Loop (the next run aborts the process): off by default, so each run
    # allocates from and returns to the system. True turns it on (shrunk after every run).
    enable_cpu_mem_arena: Annotated[bool, Field(strict=True)] = False


class ExecutionProvider(_Strict):
    """An execution provider and its options, e.g. ``{"name": "CUDAExecutionProvider"}``."""

    name: str
    options: dict[str, str | int | float | bool] = Field(default_factory=dict)


class LatestVersions(_Strict):
    num_versions: Annotated[int, Field(ge=1)] = 1


class SpecificVersions(_Strict):
    versions: Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=1)]


class VersionPolicy(_Strict):
    """TF Serving's version policy: exactly one of ``latest``, ``all`` or ``specific``."""

    latest: LatestVersions | None = None
    all: dict[str, Any] | None = None
    specific: SpecificVersions | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> VersionPolicy:
        chosen = [k for k in ("latest", "all", "specific") if getattr(self, k) is not None]
        if len(chosen) != 1:
            raise ValueError("give exactly one of 'latest', 'all' or 'specific'")
        if self.all:
            raise ValueError("'all' takes no keys: write {\"all\": {}}")
        return self

    def select(self, available: list[int]) -> list[int]:
        """The versions this policy serves out of those on disk, highest first."""
        ordered = sorted(available, reverse=True)
        if self.latest is not None:
            return ordered[: self.latest.num_versions]
        if self.specific is not None:
            return [v for v in ordered if v in self.specific.versions]
        return ordered


class DynamicBatching(_Strict):
    """How requests are merged into batches (on whenever ``max_batch_size`` > 0)."""

    max_queue_delay_us: Annotated[int, Field(ge=0)] = 0  # 0: batch what is queued when an instance frees up
    preferred_batch_sizes: list[Annotated[int, Field(ge=1)]] = Field(default_factory=list)
    max_queue_size: Annotated[int, Field(ge=0)] = 0  # 0: unbounded; else requests beyond it are refused at once
    max_batch_tokens: Annotated[int, Field(ge=0)] = 0  # text models: rows x longest sequence per batch; 0: no limit
    # text models: estimated bytes of one execution's memory (attention grows with rows x tokens²), for merged
    # requests and a large request's chunks; 0: 256 MiB (core.attention_memory)
    max_execution_bytes: Annotated[int, Field(ge=0)] = 0


class ModelConfig(_Strict):
    """One entry of ``model_config_list``."""

    name: Annotated[str, Field(pattern=MODEL_NAME_PATTERN)]
    base_path: Path
    model_platform: str = "onnxruntime"
    # 0 set by hand: no batching. Left unset, with instance_count, dynamic_batching and
    # session_options.intra_op_num_threads unset too: the default layout (one session, runs side by side,
    # requests merged when the graph has a batch dimension; see serving.md, "The default layout").
    max_batch_size: Annotated[int, Field(ge=0)] = 0
    model_version_policy: VersionPolicy = Field(default_factory=lambda: VersionPolicy(latest=LatestVersions()))
    version_labels: dict[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_.\-]*$")], int] = Field(
        default_factory=dict
    )
    dynamic_batching: DynamicBatching = Field(default_factory=DynamicBatching)
    # Sessions per version. Left unset with the other layout keys: the default layout (see max_batch_size).
    instance_count: Annotated[int, Field(ge=1)] = 1
    execution_providers: list[str | ExecutionProvider] = Field(
        default_factory=lambda: list[str | ExecutionProvider](["CPUExecutionProvider"])
    )
    session_options: SessionOptions = Field(default_factory=SessionOptions)
    allow_hardlinks: bool = False  # serve files with several hard links (refused by default: core.confinement)
    # Runs of a graph whose cost is bounded by its input shapes, for input shapes whose recent runs took at
    # most this many microseconds of CPU time (their median), run on the event loop when nothing else of the
    # model runs or waits (no thread hand-off; core.inline_runs, serving.md "Tiny models run on the event
    # loop"). 0: always on the instance threads.
    inline_run_us: Annotated[int, Field(ge=0, le=1000)] = 100

    @field_validator("model_platform")
    @classmethod
    def _known_platform(cls, value: str) -> str:
        if value not in PLATFORMS:
            raise ValueError(f"unsupported model_platform {value!r}; onnxserve serves {', '.join(PLATFORMS)}")
        return value

    @model_validator(mode="after")
    def _preferred_sizes_fit(self) -> ModelConfig:
        # As Triton: a preferred size the batcher could never form is a config mistake, not a silent no-op.
        preferred = self.dynamic_batching.preferred_batch_sizes
        if preferred and self.max_batch_size == 0:
            raise ValueError("dynamic_batching.preferred_batch_sizes needs batching: set max_batch_size > 0")
        too_big = [size for size in preferred if size > self.max_batch_size]
        if too_big:
            raise ValueError(
                f"dynamic_batching.preferred_batch_sizes {too_big} exceed max_batch_size {self.max_batch_size}; "
                "a batch never grows beyond max_batch_size"
            )
        return self

    @property
    def adaptive(self) -> bool:
        """Whether the config leaves the layout to the server: it sets none of ``max_batch_size``,
        ``instance_count``, ``dynamic_batching`` and ``session_options.intra_op_num_threads`` (an explicit
        value, even the default one, is a choice the server keeps)."""
        chosen = {"max_batch_size", "instance_count", "dynamic_batching"} & self.model_fields_set
        return not chosen and "intra_op_num_threads" not in self.session_options.model_fields_set

    def providers(self) -> list[ExecutionProvider]:
        return [ExecutionProvider(name=p) if isinstance(p, str) else p for p in self.execution_providers]


class ServerConfig(_Strict):
    """The whole server config file."""

    model_config_list: list[ModelConfig]

    @field_validator("model_config_list")
    @classmethod
    def _unique_names(cls, models: list[ModelConfig]) -> list[ModelConfig]:
        seen: set[str] = set()
        for m in models:
            if m.name in seen:
                raise ValueError(f"model name {m.name!r} appears more than once")
            seen.add(m.name)
        return models


_FRIENDLY = {
    "extra_forbidden": "unknown key",
    "missing": "required key is missing",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
}


MAX_CONFIG_ERRORS = 20
"""The most validation errors a refused config's message lists (each cut to 300 characters)."""


def _describe(error: ValidationError, source: str) -> str:
    lines = []
    for e in error.errors():
        loc = ""
        for part in e["loc"]:
            loc += f"[{part}]" if isinstance(part, int) else (f".{part}" if loc else str(part))
        message = _FRIENDLY.get(e["type"], e["msg"].removeprefix("Value error, "))
        lines.append(logged(f"{source}: {logged(loc) or '(top level)'}: {message}"))
        if len(lines) == MAX_CONFIG_ERRORS and len(error.errors()) > MAX_CONFIG_ERRORS:
            lines.append(f"{source}: ... and {len(error.errors()) - MAX_CONFIG_ERRORS} more errors")
            break
    return "\n".join(lines)


def parse_config(document: Any, source: str, base_dir: Path) -> ServerConfig:
    """Validate an already-parsed config document; ``source`` names it in errors."""
    if not isinstance(document, dict):
        raise ConfigError(f"{source}: expected an object with the key 'model_config_list'")
    try:
        config = ServerConfig.model_validate(document)
    except ValidationError as e:
        raise ConfigError(_describe(e, source)) from None
    resolved = [m.model_copy(update={"base_path": _resolved(base_dir / m.base_path)}) for m in config.model_config_list]
    return ServerConfig(model_config_list=resolved)


def _resolved(path: Path) -> Path:
    """Where ``path`` leads, or the path itself (absolute) when it cannot be resolved (a symbolic link loop):
    the model's folder is then refused by name when its versions are looked for, not the whole config."""
    try:
        return path.resolve()
    except (RuntimeError, OSError):  # Python 3.11 raises RuntimeError for a loop, later versions OSError
        return path.absolute()


MAX_CONFIG_BYTES = 16 * 1024 * 1024
"""The largest config file read (16 MiB: a config of thousands of models is a few hundred KB). A larger
one, or one that grows past this as it is read, is refused by name, never read whole: in poll mode a
config file replaced by a symbolic link to ``/dev/zero`` was read until memory ran out (4.9 GB) on every
poll (outside attack rt43)."""


def _config_bytes(file: Path) -> bytes:
    """The bytes of a config file that is a regular file (symbolic links followed) of at most
    :data:`MAX_CONFIG_BYTES`; a ConfigError naming the file and why otherwise. Its type is checked before it
    is opened, and it is opened without blocking: a FIFO in its place stalled every later poll, with
    nothing logged (outside attack rt43)."""
    try:
        if not stat.S_ISREG(os.stat(file).st_mode):
            raise ConfigError(f"{file}: the config file is not a regular file (a folder, FIFO, socket or device)")
        fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise ConfigError(f"{file}: cannot read the config file: {e.strerror}") from None
    try:
        info = os.fstat(fd)  # the file opened, which may have been replaced since the check
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{file}: the config file is not a regular file (a folder, FIFO, socket or device)")
        if info.st_size > MAX_CONFIG_BYTES:
            raise ConfigError(
                f"{file}: the config file holds {info.st_size:,} bytes; at most {MAX_CONFIG_BYTES:,} are read"
            )
        chunks: list[bytes] = []
        size = 0
        while chunk := os.read(fd, min(1024 * 1024, MAX_CONFIG_BYTES + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_CONFIG_BYTES:
                raise ConfigError(f"{file}: the config file grew past {MAX_CONFIG_BYTES:,} bytes as it was read")
        return b"".join(chunks)
    except OSError as e:
        raise ConfigError(f"{file}: cannot read the config file: {e.strerror}") from None
    finally:
        os.close(fd)


def load_config(path: str | os.PathLike[str]) -> ServerConfig:
    """Read a JSON or YAML server config file (a regular file of at most :data:`MAX_CONFIG_BYTES`)."""
    file = Path(path)
    raw = _config_bytes(file)
    is_yaml = file.suffix.lower() in (".yaml", ".yml")
    try:
        document = yaml.safe_load(raw) if is_yaml else orjson.loads(raw)
    except (orjson.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(logged(f"{file}: not valid {'YAML' if is_yaml else 'JSON'}: {e}")) from None
    except RecursionError:  # PyYAML's parser recurses once per level of nesting
        raise ConfigError(f"{file}: not valid YAML: nested too deeply") from None
    except ValueError as e:  # PyYAML's int() of a number of thousands of digits
        raise ConfigError(logged(f"{file}: not valid YAML: {e}")) from None
    return parse_config(document, str(file), file.resolve().parent)
