"""Shared CLI machinery: error reporting, exit statuses and the rich console.

Exit statuses: 0 done; 1 a check found problems (``score --validate``); 2 a dosegym error
(bad input, option or file; usage errors too); 3 an unexpected error (a bug: the one-line
message names its type; ``--debug`` shows the traceback); 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from dosegym.errors import DosegymError

EXIT_PROBLEMS = 1
EXIT_ERROR = 2
EXIT_UNEXPECTED = 3
EXIT_INTERRUPTED = 130

console = Console()
err_console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])
_debug = {"on": False}
# What the CLI framework raises to exit or report a usage error (typer vendors click in newer
# releases): these pass through untouched.
_CLI_SIGNALS = (typer.Exit, typer.Abort) + tuple(
    c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException"
)


def set_debug(on: bool) -> None:
    """``--debug``: let every error raise with its traceback instead of the one-line message."""
    _debug["on"] = bool(on)


def _say(text: str) -> None:
    err_console.print(f"[bold red]error:[/] {escape(text)}", soft_wrap=True, highlight=False)


def friendly_errors(func: F) -> F:
    """Run a command so that no traceback reaches the user (unless ``--debug``): a
    ``DosegymError`` prints its message and exits 2, any other exception one line naming its
    type and exits 3, Ctrl-C exits 130."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except _CLI_SIGNALS:
            raise
        except KeyboardInterrupt:
            if _debug["on"]:
                raise
            _say("interrupted")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except DosegymError as exc:
            if _debug["on"]:
                raise
            _say(str(exc))
            raise typer.Exit(EXIT_ERROR) from exc
        except Exception as exc:  # noqa: BLE001 - the last resort: one line, never a traceback
            if _debug["on"]:
                raise
            message = " ".join(str(exc).split()) or "(no message)"
            _say(f"{type(exc).__name__}: {message} (run with --debug for the traceback)")
            raise typer.Exit(EXIT_UNEXPECTED) from exc

    return wrapper  # type: ignore[return-value]
