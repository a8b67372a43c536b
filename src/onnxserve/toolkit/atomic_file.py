"""Files the toolkit writes for a user (reports, single-file exports): whole or not at all, with
ordinary permissions.

The data goes to a temporary sibling that is renamed over the target, so a reader never sees half a
file and a failure leaves the previous file untouched. ``mkstemp`` makes that sibling private
(0600); it is given the mode an ordinary ``open()`` would have (0666 less the umask) before the
rename, so that what users get is readable as any file they write themselves.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def ordinary_mode(directory: bool = False) -> int:
    """The mode ``open()`` (or ``mkdir``) would give: 0666 (0777 for folders) less the process umask."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def write_atomically(path: Path, data: bytes | str) -> None:
    """Write ``data`` to ``path`` whole (a temporary sibling renamed into place), mode as ``open()``'s."""
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.partial-", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.chmod(temporary, ordinary_mode())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
