"""``fedaqt profile``: per-client memory profile across bit-widths (filled in by the memory-profiling work)."""

from __future__ import annotations

import typer


def profile_command() -> None:
    """Profile one client round's memory (not implemented yet)."""
    raise typer.Exit(code=1)
