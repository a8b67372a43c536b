from __future__ import annotations

import gc
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trustme
from rich.console import Console

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))

import models
from onnxserve.config import ServerConfig, parse_config
from onnxserve.server.lifecycle import RunningServer, start_in_background
from onnxserve.server.settings import ServerSettings

StartServer = Callable[[ServerConfig], RunningServer]


SERIAL_MODULES = {
    "test_adaptive_layout",
    "test_batch_forming",
    "test_batching",
    "test_deploy_replicas",
    "test_fair_clients",
    "test_inline_runs_served",
    "test_lifecycle",
    "test_openai_embeddings",
    "test_overload",
    "test_perf_analyzer",
    "test_request_limits",
    "test_text_drain",
    "test_text_room",
    "test_waiting_progress",
}
"""Test modules outside tests/adversarial/ whose tests measure time (probes, timeouts, batching delays, a load
generator's stable measurement) and so run alone (marker ``serial``): beside another worker's test on a 2-core
machine, probes under attack, drain timings, fair-share checks and perf_analyzer's stability failed that pass
alone."""

PARALLEL_ADVERSARIAL = {
    "test_chunks",
    "test_class_answers",
    "test_dense_numbers",
    "test_embedding_texts",
    "test_encoded_answers",
    "test_estimate_architectures",
    "test_execution_memory",
    "test_external_data_overwrite",
    "test_grpc_refusals",
    "test_outputs",
    "test_string_outputs",
    "test_texts",
    "test_web_removed_files",
}
"""Modules of tests/adversarial/ that bound what an attack costs in memory (the server's own RSS) and what it is
answered, not how long anything takes: they run on the two workers. Every other attack module is serial."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        module = item.path.stem
        adversarial = item.path.parent.name == "adversarial"
        if (adversarial and module not in PARALLEL_ADVERSARIAL) or module in SERIAL_MODULES:
            item.add_marker(pytest.mark.serial)


@pytest.fixture(scope="module", autouse=True)
def freeze_what_outlives_the_module() -> None:
    """Before each module's own fixtures: what is alive now lives on past this module (the imports of
    torch, transformers, onnx, onnxscript, ... some 600,000 objects; the exporter's registries, the
    session's fixtures), and ``gc.freeze`` takes it out of the cyclic collector's view. A full collection
    (``collect_tritonclients`` runs two per test; Python runs its own) then scans only what this module
    made: 0.2-0.4 s of CPU each, otherwise. Garbage is collected first, so none is frozen; whatever a
    module makes is collected as before."""
    gc.collect()
    gc.freeze()


@pytest.fixture
def start_server() -> Iterator[StartServer]:
    """Start real servers on ephemeral loopback ports; every one is stopped after the test."""
    running: list[RunningServer] = []

    def start(config: ServerConfig) -> RunningServer:
        server = start_in_background(
            config, ServerSettings(http_port=0, grpc_port=0, inference_threads=4, log_level="warning")
        )
        running.append(server)
        return server

    yield start
    for server in running:
        server.stop()


@pytest.fixture(scope="session")
def numeric_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository with the small numeric models from tests/models.py."""
    repo = tmp_path_factory.mktemp("repo")
    for name, build in models.NUMERIC_MODELS.items():
        models.write_version(repo, name, 1, build())
    return repo


@pytest.fixture(scope="session")
def numeric_config(numeric_repository: Path) -> ServerConfig:
    """The numeric repository with batching declared for the models whose first dim is a batch."""
    document = {
        "model_config_list": [
            {"name": "add", "base_path": "add", "max_batch_size": 8},
            {"name": "mixed", "base_path": "mixed"},
            {"name": "fixed", "base_path": "fixed", "max_batch_size": 4},
            {"name": "strings", "base_path": "strings"},
            {"name": "slow", "base_path": "slow"},
        ]
    }
    return parse_config(document, "test config", numeric_repository)


@pytest.fixture(scope="session")
def numeric_server(numeric_config: ServerConfig) -> Iterator[RunningServer]:
    server = start_in_background(numeric_config, ServerSettings(http_port=0, grpc_port=0, log_level="warning"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def demo_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo model repository, prepared exactly as ``make serve`` prepares it (exported once per run)."""
    import prepare_demo

    models_dir = tmp_path_factory.mktemp("demo")
    prepare_demo.prepare(models_dir, Console(quiet=True))
    return models_dir


@pytest.fixture(scope="session")
def demo_server(demo_repository: Path) -> Iterator[RunningServer]:
    from onnxserve.config import load_config

    server = start_in_background(
        load_config(demo_repository / "config.json"), ServerSettings(http_port=0, grpc_port=0, log_level="warning")
    )
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tiny_text_version(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BERT exported as a feature-extraction version folder (tests/tiny_text_models.py)."""
    import tiny_text_models

    return tiny_text_models.tiny_bert_version(tmp_path_factory.mktemp("tiny-text"))


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    """A throw-away certificate authority."""
    return trustme.CA()


@pytest.fixture(scope="module")
def tls_files(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``ca``'s server certificate for 127.0.0.1 and localhost, as files: ``cert`` (the chain), ``key``, ``ca``."""
    folder = tmp_path_factory.mktemp("tls")
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    files = {"cert": folder / "server.pem", "key": folder / "server.key", "ca": folder / "ca.pem"}
    leaf.cert_chain_pems[0].write_to_path(str(files["cert"]))
    for blob in leaf.cert_chain_pems[1:]:
        blob.write_to_path(str(files["cert"]), append=True)
    leaf.private_key_pem.write_to_path(str(files["key"]))
    ca.cert_pem.write_to_path(str(files["ca"]))
    return files


@pytest.fixture
def collect_tritonclients() -> Iterator[None]:
    """A dropped ``tritonclient.http`` client sits in a reference cycle; collected on another thread (a
    server's), its gevent ``__del__`` raises InvalidThreadUseError. Collect dropped ones on this (their
    hub's) thread, before each test (pytest drops a test's fixture values after its teardown) and after
    it. Modules that use tritonclient.http apply it with ``pytestmark``."""
    gc.collect()
    yield
    gc.collect()


CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="session")
def chromium_executable() -> str:
    """Debian's chromium, which Playwright drives (its own browser download does not work here)."""
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (make system-deps installs it when run as root)")
    return str(CHROMIUM)
