"""Progress reporting for long stages, kept apart from the terminal, and counts in messages.

Library code reports progress through a :class:`Progress`; the command-line program
passes one that draws rich progress bars, and the default draws nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["Progress", "SilentProgress", "count_noun"]


def count_noun(number: int, noun: str) -> str:
    """Return a count with its noun in the matching number: ``"1 file"`` or ``"3 files"``."""
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


#: Called with the amount of work done so far.
Advance = Callable[[int], None]


class Progress:
    """Interface of a progress reporter: one bar per stage."""

    @contextmanager
    def stage(self, description: str, total: int | None) -> Iterator[Advance]:
        """Open a bar for a stage of ``total`` units of work and yield a function that sets the work done."""
        raise NotImplementedError


class SilentProgress(Progress):
    """A reporter that draws nothing."""

    @contextmanager
    def stage(self, description: str, total: int | None) -> Iterator[Advance]:
        yield lambda completed: None
