"""The typer application, its global options and the mapping of errors to one line."""

from __future__ import annotations

import errno
import sys
from typing import Annotated

import typer

from neurpir_nwb._version import __version__
from neurpir_nwb.cli import embed as embed_command
from neurpir_nwb.cli import fetch as fetch_command
from neurpir_nwb.cli import inspect as inspect_command
from neurpir_nwb.cli import simulate as simulate_command
from neurpir_nwb.cli import train as train_command
from neurpir_nwb.cli.base import configure_logging, console
from neurpir_nwb.errors import NeurpirError

app = typer.Typer(
    name="neurpir-nwb",
    help="Learn one time-invariant embedding per neuron from NWB recordings, and predict cell type and brain region.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

#: Error numbers of a full disk, an exhausted quota and a file over the size limit.
_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})

#: Whether a failure prints its full traceback; set by --debug.
_state = {"debug": False}


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"neurpir-nwb {__version__}")
        raise typer.Exit()


@app.callback()
def _global_options(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug messages too.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Log warnings and errors only.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show the full traceback when a command fails.")] = False,
) -> None:
    """Learn one time-invariant embedding per neuron from NWB recordings."""
    _state["debug"] = debug
    configure_logging(verbose=verbose, quiet=quiet)


app.command("train")(train_command.train)
app.command("simulate")(simulate_command.simulate)
app.command("fetch")(fetch_command.fetch)
app.command("embed")(embed_command.embed)
app.command("inspect")(inspect_command.inspect)


def main(argv: list[str] | None = None) -> None:
    """Run the program, turning a known error into one line on standard error and exit status 2.

    Usage errors (an unknown option or command, a missing argument) are reported by
    click itself, also with exit status 2.
    """
    try:
        app(args=argv, prog_name="neurpir-nwb", standalone_mode=True)
    except NeurpirError as error:
        if _state["debug"]:
            console.print_exception()
        console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except OSError as error:
        if error.errno not in _DISK_FULL:
            raise
        if _state["debug"]:
            console.print_exception()
        where = f" while writing {error.filename}" if error.filename else ""
        console.print(
            f"[bold red]error:[/] the disk is full or the file size limit was reached{where} ({error.strerror}); "
            "no output was left half-written at its final path. Free space and run the command again",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(2)
