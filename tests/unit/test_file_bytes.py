"""FileBytes: a file's bytes by position without a memory map; a file cut short under it is an error, not a
SIGBUS (the web page reads a served model's header in the server's process: outside attack rt25 F1's path
through ``toolkit.model_header``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from onnxserve.toolkit import file_bytes
from onnxserve.toolkit.file_bytes import FileBytes, FileChanged


def test_indexes_and_slices_are_the_files_bytes(tmp_path: Path) -> None:
    content = os.urandom(3 * file_bytes.PAGE_BYTES + 123)
    path = tmp_path / "f"
    path.write_bytes(content)
    with path.open("rb") as file:
        data = FileBytes(file)
        assert len(data) == len(content)
        for index in (0, 1, file_bytes.PAGE_BYTES - 1, file_bytes.PAGE_BYTES, len(content) - 1, -1):
            assert data[index] == content[index]
        assert data[10 : 2 * file_bytes.PAGE_BYTES + 7] == content[10 : 2 * file_bytes.PAGE_BYTES + 7]
        assert data[len(content) - 5 : len(content) + 100] == content[-5:]
        with pytest.raises(IndexError):
            data[len(content)]


def test_a_file_cut_short_while_read_is_an_error_and_the_process_lives(tmp_path: Path) -> None:
    """Over a memory map (how the header was read before), the same access ends the process with SIGBUS:
    the subprocess below shows it."""
    path = tmp_path / "f"
    path.write_bytes(b"x" * (4 * file_bytes.PAGE_BYTES))
    with path.open("rb") as file:
        data = FileBytes(file)
        assert data[0] == ord("x")
        os.truncate(path, 100)  # what `cp` does to a file it overwrites, before it writes
        with pytest.raises(FileChanged, match="changed while it was read"):
            data[3 * file_bytes.PAGE_BYTES]
        with pytest.raises(FileChanged):
            data[200:300]
    path.write_bytes(b"x" * (4 * file_bytes.PAGE_BYTES))
    mapped = (
        "import mmap, os, sys\n"
        "f = open(sys.argv[1], 'rb'); m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)\n"
        f"os.truncate(sys.argv[1], 100); m[{3 * file_bytes.PAGE_BYTES}]\n"
    )
    ended = subprocess.run([sys.executable, "-c", mapped, str(path)], capture_output=True, timeout=60)
    assert ended.returncode < 0, ended  # killed by a signal (SIGBUS)
