"""The ``dosegym`` command. One module per verb group; this file only assembles them."""

from __future__ import annotations

import typer

from dosegym._version import __version__
from dosegym.cli import align as align_cli
from dosegym.cli import data as data_cli
from dosegym.cli import demo as demo_cli
from dosegym.cli import model as model_cli
from dosegym.cli import report as report_cli
from dosegym.cli import score as score_cli
from dosegym.cli._common import set_debug

app = typer.Typer(
    name="dosegym",
    help="Align radiotherapy dose-prediction diffusion models with RL against clinical scorecards.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(data_cli.app, name="data")
app.command("pretrain")(model_cli.pretrain)
app.command("train-refiner")(model_cli.train_refiner)
app.command("predict")(model_cli.predict)
app.command("score")(score_cli.score)
app.command("align")(align_cli.align)
app.command("demo")(demo_cli.demo)
app.command("report")(report_cli.report)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dosegym {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
    debug: bool = typer.Option(
        False, "--debug", help="Show the Python traceback of an error instead of the one-line message."
    ),
) -> None:
    """dosegym: data, scorecards, the pretrained dose model and Gymnasium environments.

    Exit status: 0 done, 1 a check found problems (score --validate), 2 a dosegym error
    (bad input, option or file), 3 an unexpected error (see --debug), 130 interrupted.
    """
    set_debug(debug)
