"""A pickle that runs code when loaded: the proof, for refused files, that nothing was unpickled."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


class Payload:
    """Unpickling this makes the directory ``marker``: if it exists, the file's code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.mkdir, (str(self.marker),)
