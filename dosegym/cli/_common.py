"""Shared CLI machinery: error reporting and the rich console."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console

from dosegym.errors import DosegymError

console = Console()
err_console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])


def friendly_errors(func: F) -> F:
    """Turn a ``DosegymError`` into a one-line message and exit status 2 (no traceback)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except DosegymError as exc:
            err_console.print(f"[bold red]error:[/] {exc}")
            raise typer.Exit(2) from exc

    return wrapper  # type: ignore[return-value]


def write_json(obj: Any, path: Path) -> None:
    """Write JSON atomically."""
    from dosegym.data.atomic import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")
