"""Write a version folder all at once or not at all.

An export (or an optimization) builds its output in a hidden sibling folder and renames it into
place only when everything, validation included, has succeeded; a failure leaves the previous
state untouched and removes the partial folder.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from onnxserve.errors import ExportError
from onnxserve.toolkit.atomic_file import ordinary_mode


@contextmanager
def staging_folder(output: Path, force: bool) -> Iterator[Path]:
    """A temporary sibling of ``output`` that replaces it only if the block succeeds."""
    if output.exists() and not force:
        raise ExportError(f"{output} already exists; pass --force to replace it")
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    staging.chmod(ordinary_mode(directory=True))  # mkdtemp makes it private; the version folder should not be
    try:
        yield staging
        old = None
        if output.exists():
            old = output.with_name(f".{output.name}.old-{staging.name}")
            output.rename(old)
        staging.rename(output)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
