"""The documentation cannot rot: the site builds strictly, every link and anchor resolves (between pages
and from the README), the generated references match the code, and the examples marked runnable run.

The runnable convention (also in docs/architecture.md): a fenced ``bash`` block whose preceding line is
``<!-- runnable -->`` is run by bash against a real server started here on ephemeral loopback ports
(``127.0.0.1:8000`` / ``localhost:8000`` and ``:8001`` in the block are rewritten to that server's
HTTP and gRPC ports), in a folder whose ``models/`` mirrors the demo repository: a tiny random BERT
text model served as ``minilm`` and ``huggingface_model`` (the real MiniLM export takes minutes). It must
exit 0. When the block is followed by ``<!-- output -->`` and a fenced block, the output must contain
that block's text, whitespace runs compared as one space and ``...`` standing for anything. ``curl``
runs with ``--fail-with-body``, so an HTTP error fails the example. A runnable block may not start a
server (``onnxserve serve`` blocks).
"""

from __future__ import annotations

import html.parser
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from onnxserve.config import load_config
from onnxserve.server.lifecycle import RunningServer, start_in_background
from onnxserve.server.settings import ServerSettings

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
RUNNABLE = "<!-- runnable -->"
OUTPUT = "<!-- output -->"
FENCE = re.compile(r"^(`{3,})(\w*)")
MARKDOWN_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


# --- the site --------------------------------------------------------------------------------------


def build_site(config: Path, into: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config), "--site-dir", str(into)],
        cwd=config.parent,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        check=False,
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    into = tmp_path_factory.mktemp("site")
    built = build_site(ROOT / "mkdocs.yml", into)
    assert built.returncode == 0, built.stderr
    assert "WARNING" not in built.stderr, built.stderr
    return into


def test_the_site_builds_strictly(site: Path) -> None:
    pages = {p.relative_to(DOCS).with_suffix("").as_posix() for p in DOCS.rglob("*.md")}
    for page in pages:
        built = site / ("index.html" if page == "index" else f"{page}/index.html")
        assert built.is_file(), f"docs/{page}.md was not built"


def test_a_broken_anchor_fails_the_strict_build(tmp_path: Path) -> None:
    """The control: the build above would fail on a dangling link or anchor."""
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    shutil.copytree(DOCS, tmp_path / "docs")
    with (tmp_path / "docs" / "index.md").open("a") as index:
        index.write("\nSee [nothing](serving.md#no-such-section).\n")
    built = build_site(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert built.returncode != 0
    assert "no-such-section" in built.stderr


def test_every_page_is_in_the_nav_or_reserved() -> None:
    config = (ROOT / "mkdocs.yml").read_text()
    for page in DOCS.rglob("*.md"):
        assert page.relative_to(DOCS).as_posix() in config, f"{page} is not in mkdocs.yml's nav"


class _Ids(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.ids.update(value for name, value in attrs if name == "id" and value)


def anchors_of(built_page: Path) -> set[str]:
    parser = _Ids()
    parser.feed(built_page.read_text())
    return parser.ids


def links_outside_code(text: str) -> Iterator[tuple[int, str]]:
    fence = ""
    for number, line in enumerate(text.splitlines(), start=1):
        opened = FENCE.match(line.strip())
        if opened and (not fence or opened.group(1) == fence):
            fence = "" if fence else opened.group(1)
            continue
        if fence:
            continue
        for match in MARKDOWN_LINK.finditer(re.sub(r"`[^`]*`", "", line)):
            yield number, match.group(1)


def test_the_readme_links_resolve(site: Path) -> None:
    broken = []
    links = list(links_outside_code(README.read_text()))
    assert any(target.startswith("docs/") for _, target in links), "the README links into docs/"
    for number, target in links:
        if re.match(r"^[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (ROOT / path).resolve() if path else README
        if not file.exists():
            broken.append(f"README.md:{number}: {target} (no such file)")
            continue
        if not anchor:
            continue
        if file.suffix != ".md" or not file.is_relative_to(DOCS):
            broken.append(f"README.md:{number}: {target} (anchors are checked in docs/ pages only)")
            continue
        page = file.relative_to(DOCS).with_suffix("").as_posix()
        built = site / ("index.html" if page == "index" else f"{page}/index.html")
        if anchor not in anchors_of(built):
            broken.append(f"README.md:{number}: {target} (no anchor #{anchor} in docs/{page}.md)")
    assert broken == []


def test_the_readme_keeps_its_two_commands() -> None:
    text = README.read_text()
    for command in ("make serve", "make test"):
        assert command in text
    assert len(text.splitlines()) <= 250


def test_the_generated_references_are_current() -> None:
    checked = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "generate_reference.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_reference_check_notices_a_stale_page(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import generate_reference
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    pages = generate_reference.pages()
    assert pages == generate_reference.pages(), "the output must not change between runs"
    cli, config = pages[generate_reference.CLI_PAGE], pages[generate_reference.CONFIG_PAGE]
    assert "## onnxserve serve" in cli
    assert "`--http-port`" in cli
    assert "`max_batch_size`" in config
    assert "`http_port`" in config
    monkeypatch.setattr(generate_reference, "ROOT", tmp_path)
    assert generate_reference.main([]) == 0
    assert generate_reference.main(["--check"]) == 0
    stale = tmp_path / generate_reference.CONFIG_PAGE
    stale.write_text(stale.read_text().replace("`max_batch_size`", "`max_batch`"))
    assert generate_reference.main(["--check"]) == 1


# --- runnable examples -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    source: str
    line: int
    script: str
    expected: str | None

    def __str__(self) -> str:
        return f"{self.source}:{self.line}"


def _fenced_block(lines: list[str], start: int) -> tuple[str, str, int]:
    """The info string, the body and the index after the closing fence of the block opened at ``start``."""
    opened = FENCE.match(lines[start].strip())
    assert opened, f"line {start + 1}: a marker must be followed by a fenced block"
    end = start + 1
    while end < len(lines) and lines[end].strip() != opened.group(1):
        end += 1
    return opened.group(2), "\n".join(lines[start + 1 : end]), end + 1


def runnable_examples(path: Path) -> list[Example]:
    lines = path.read_text().splitlines()
    found = []
    for index, line in enumerate(lines):
        if line.strip() != RUNNABLE:
            continue
        info, script, after = _fenced_block(lines, index + 1)
        assert info in ("bash", "sh", "shell", "console"), f"{path.name}:{index + 2}: runnable blocks are shell"
        expected = None
        following = after
        while following < len(lines) and not lines[following].strip():
            following += 1
        if following < len(lines) and lines[following].strip() == OUTPUT:
            _, expected, _ = _fenced_block(lines, following + 1)
        found.append(Example(path.relative_to(ROOT).as_posix(), index + 2, script, expected))
    return found


EXAMPLES = [example for page in [README, *sorted(DOCS.rglob("*.md"))] for example in runnable_examples(page)]


def output_matches(expected: str, output: str) -> bool:
    """``expected`` appears in ``output``, whitespace runs compared as one space, ``...`` matching anything."""
    squeeze = lambda text: " ".join(text.split())  # noqa: E731
    pattern = ".*?".join(re.escape(part) for part in squeeze(expected).split("..."))
    return re.search(pattern, squeeze(output), flags=re.DOTALL) is not None


def test_the_output_comparison_can_fail() -> None:
    shown = '{"name":"embedding","shape":[2,...],"data":[...]}'
    assert output_matches(shown, '{"model_name":"m","outputs":[{"name":"embedding","shape":[2,32],"data":[0.1]}]}')
    assert not output_matches(shown, '{"outputs":[{"name":"label","shape":[2,32],"data":[0.1]}]}')


def test_there_are_runnable_examples() -> None:
    sources = {example.source for example in EXAMPLES}
    assert "README.md" in sources
    assert len(EXAMPLES) >= 4


@pytest.fixture(scope="module")
def docs_server(
    tmp_path_factory: pytest.TempPathFactory, tiny_text_version: Path
) -> Iterator[tuple[RunningServer, Path]]:
    """A folder whose models/ mirrors `make serve`'s demo repository, served on ephemeral ports."""
    workdir = tmp_path_factory.mktemp("docs-examples")
    shutil.copytree(tiny_text_version, workdir / "models" / "minilm" / "1")
    (workdir / "models" / "config.json").write_text(
        '{"model_config_list": ['
        '{"name": "minilm", "base_path": "minilm", "model_platform": "onnxruntime", "max_batch_size": 32}, '
        '{"name": "huggingface_model", "base_path": "minilm", "model_platform": "onnxruntime", "max_batch_size": 32}'
        "]}"
    )
    server = start_in_background(
        load_config(workdir / "models" / "config.json"),
        ServerSettings(http_port=0, grpc_port=0, log_level="warning"),
    )
    yield server, workdir
    server.stop()


def run_example(example: Example, http_port: int, grpc_port: int, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert "onnxserve serve" not in example.script, f"{example}: a runnable example may not start a server"
    script = example.script
    for host in ("127.0.0.1", "localhost"):
        script = script.replace(f"{host}:8000", f"127.0.0.1:{http_port}")
        script = script.replace(f"{host}:8001", f"127.0.0.1:{grpc_port}")
    environment = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    # curl fails on an HTTP error status too, so that an example answered 4xx / 5xx fails.
    script = 'curl() { command curl --fail-with-body "$@"; }\n' + script
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env=environment,
        check=False,
    )


def test_a_failing_example_fails(tmp_path: Path) -> None:
    failing = Example("control", 1, "true\nfalse\n", None)
    assert run_example(failing, 1, 2, tmp_path).returncode != 0


@pytest.mark.parametrize("example", EXAMPLES, ids=str)
def test_runnable_example(example: Example, docs_server: tuple[RunningServer, Path]) -> None:
    server, workdir = docs_server
    done = run_example(example, server.http_port, server.grpc_port, workdir)
    assert done.returncode == 0, f"{example} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    if example.expected is not None:
        assert output_matches(example.expected, done.stdout), (
            f"{example}: the output does not match what the docs show:\n{done.stdout}"
        )
