"""The CLI's error console and the one way a command fails (exit 2 with a message)."""

from __future__ import annotations

import typer
from rich.console import Console

from onnxserve.errors import OnnxServeError

err = Console(stderr=True)


def fail(error: OnnxServeError) -> typer.Exit:
    """Print ``error`` and return the Exit to raise (exit status 2)."""
    err.print(f"[bold red]error:[/] {error.message}", highlight=False, markup=True, soft_wrap=True)
    return typer.Exit(code=2)
