"""Parts shared by every command: logging handlers, the per-run log file and progress bars.

Logging handlers are set here and nowhere in the library.
"""

from __future__ import annotations

import logging
import shlex
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress as RichBars,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from neurpir_nwb._version import __version__
from neurpir_nwb.progress import Advance, Progress

#: Logs and progress bars go to standard error, so standard output stays for results.
console = Console(stderr=True)
if not console.is_terminal:
    # Redirected output is read in files and CI logs, where rich's default of 80 columns wraps paths.
    console.width = 160

LOGGER_NAME = "neurpir_nwb"

#: Python warnings, such as pynwb's about a source file's content, are logged through this logger.
WARNINGS_LOGGER_NAME = "py.warnings"


def configure_logging(*, verbose: bool = False, quiet: bool = False) -> None:
    """Send the package's log records to the terminal."""
    level = logging.INFO
    if verbose:
        level = logging.DEBUG
    elif quiet:
        level = logging.WARNING
    handler = RichHandler(console=console, show_path=False, rich_tracebacks=False, markup=False)
    handler.setLevel(level)

    logging.captureWarnings(True)
    for name in (LOGGER_NAME, WARNINGS_LOGGER_NAME):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
        logger.propagate = False


@contextmanager
def run_log(path: Path) -> Iterator[Path]:
    """Also write every log record of the package to ``path``, starting with the versions and the command line."""
    from neurpir_nwb.pipeline import software_versions

    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    handler.setLevel(logging.DEBUG)
    logger = logging.getLogger(LOGGER_NAME)
    logger.addHandler(handler)
    logging.getLogger(WARNINGS_LOGGER_NAME).addHandler(handler)
    try:
        logger.debug("neurpir-nwb %s", __version__)
        logger.debug("versions: %s", ", ".join(f"{name} {version}" for name, version in software_versions().items()))
        logger.debug("command line: %s", shlex.join(sys.argv))
        yield path
    finally:
        logger.removeHandler(handler)
        logging.getLogger(WARNINGS_LOGGER_NAME).removeHandler(handler)
        handler.close()


class ProgressBars(Progress):
    """Rich progress bars on standard error, one per stage.

    With ``count_bytes``, the bars count bytes and show the transfer rate, for downloads.
    """

    def __init__(self, enabled: bool = True, *, count_bytes: bool = False):
        self.enabled = enabled
        self.count_bytes = count_bytes

    @contextmanager
    def stage(self, description: str, total: int | None) -> Iterator[Advance]:
        if not self.enabled:
            yield lambda completed: None
            return

        if self.count_bytes:
            counters = [DownloadColumn(), TransferSpeedColumn()]
        else:
            counters = [MofNCompleteColumn(), TimeElapsedColumn()]
        columns = [TextColumn("{task.description}"), BarColumn(), *counters, TimeRemainingColumn()]
        with RichBars(*columns, console=console, transient=False) as bars:
            task = bars.add_task(description, total=total)

            def advance(completed: int) -> None:
                bars.update(task, completed=completed)

            yield advance
