"""Data problems that the readers detect, and the recipe's raise / warn / ignore policy for them.

Each reader reports what it finds to a :class:`ProblemHandler`. The handler raises a
:class:`~neurpir_nwb.errors.DataError` for a problem set to ``raise``, logs the
problem for ``warn`` and only records it for ``ignore``. Unless it raised, the reader
then applies the repair that :class:`~neurpir_nwb.recipe.ProblemPolicy` describes. ``neurpir-nwb
inspect`` runs the same detection with a handler that collects every problem instead.

Problems that no repair can fix, such as a Units table without ``spike_times``, are
raised as DataError whatever the policy.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from neurpir_nwb.errors import DataError
from neurpir_nwb.recipe import ProblemPolicy

logger = logging.getLogger(__name__)

#: Neuron ids listed in one message; the rest are counted.
MAX_LISTED_NEURONS = 20

#: Label values that mean "no label", compared after stripping and case-folding.
MISSING_LABEL_VALUES = frozenset({"", "unknown", "none", "n/a", "nan", "null"})

#: Kind of the problems that no policy repairs, such as a damaged index.
UNREADABLE = "unreadable"


@dataclass
class Problem:
    """One data problem found in a file.

    Attributes
    ----------
    kind
        Name of the problem: a field of :class:`~neurpir_nwb.recipe.ProblemPolicy`, or
        ``"unreadable"`` for a problem that no policy repairs.
    description
        What was found, in one sentence that names the file, the neurons and the values.
    repair
        What the reader does when the policy is ``warn`` or ``ignore``.
    fix
        What the user can change, in the file or in the recipe.
    neurons
        Ids of the neurons affected (unit ids, ROI ids or series names), as text.
    count
        Number of values (spike times, samples, links) or neurons affected.
    table
        The table or series the problem is in, such as ``"units"``.
    """

    kind: str
    description: str
    repair: str = ""
    fix: str = ""
    neurons: list[str] = field(default_factory=list)
    count: int = 0
    table: str = ""

    @property
    def error_message(self) -> str:
        """The message of the DataError raised for this problem: what was found and the fix."""
        return f"{self.description}; {self.fix}" if self.fix else self.description

    @property
    def warning_message(self) -> str:
        """The message logged for this problem under ``warn``: what was found and the repair."""
        return f"{self.description}; {self.repair}" if self.repair else self.description

    def action(self, policy: ProblemPolicy) -> str:
        """Return ``"raise"``, ``"warn"`` or ``"ignore"`` for this problem under ``policy``."""
        if self.kind not in ProblemPolicy.model_fields:
            return "raise"
        return str(getattr(policy, self.kind))

    def to_dict(self, policy: ProblemPolicy) -> dict[str, Any]:
        """Return the problem as plain values, with the action ``policy`` takes."""
        return {
            "kind": self.kind,
            "action": self.action(policy),
            "table": self.table,
            "count": self.count,
            "neurons": list(self.neurons),
            "description": self.description,
            "repair": self.repair,
            "fix": self.fix,
        }


class ProblemHandler:
    """Apply a problem policy to what a reader finds, or collect every problem for a report.

    Parameters
    ----------
    policy
        Action per problem; the defaults of :class:`~neurpir_nwb.recipe.ProblemPolicy` when None.
    log
        Logger of the reader, so that warnings carry the reader's name.
    collect
        Record problems without raising or logging, as ``neurpir-nwb inspect`` does.
        Problems that no policy repairs still raise DataError.
    """

    def __init__(self, policy: ProblemPolicy | None = None, *, log: logging.Logger | None = None, collect: bool = False):
        self.policy = policy if policy is not None else ProblemPolicy()
        self.log = log if log is not None else logger
        self.collect = collect
        self.found: list[Problem] = []

    def action(self, kind: str) -> str:
        """Return the policy's action for a kind of problem."""
        return str(getattr(self.policy, kind))

    def report(self, problem: Problem, warnings: Sequence[str] | None = None) -> str:
        """Record a problem and act on it; return the action, so that the caller applies the repair.

        Parameters
        ----------
        problem
            The problem found.
        warnings
            Lines to log under ``warn`` in place of the problem's own warning message,
            such as one line per unit.

        Raises
        ------
        DataError
            When the policy for the problem is ``raise`` and the handler does not collect,
            or when no policy repairs the problem.
        """
        self.found.append(problem)
        action = problem.action(self.policy)
        if problem.kind not in ProblemPolicy.model_fields:
            raise DataError(problem.error_message)
        if self.collect:
            return action

        if action == "raise":
            raise DataError(problem.error_message)
        if action == "warn":
            for line in warnings if warnings is not None else [problem.warning_message]:
                self.log.warning("%s", line)
        else:
            self.log.debug("ignored by the problem policy: %s", problem.warning_message)
        return action


def format_ids(ids: Sequence[object]) -> str:
    """Return ids as ``"0, 2, 3"``, cut after MAX_LISTED_NEURONS with a count of the rest."""
    ids = list(ids)
    shown = ", ".join(str(value) for value in ids[:MAX_LISTED_NEURONS])
    if len(ids) > MAX_LISTED_NEURONS:
        shown += f" and {len(ids) - MAX_LISTED_NEURONS} more"
    return shown


def is_missing_label(value: str) -> bool:
    """Tell whether a label value means "no label": empty, ``unknown``, ``none``, ``n/a``, ``nan`` or ``null``."""
    return value.strip().casefold() in MISSING_LABEL_VALUES


def setting(kind: str, action: str) -> str:
    """Return the recipe line that sets a problem's action, such as ``problems.empty_units: ignore``."""
    return f"problems.{kind}: {action}"


# --- timestamps of traces -----------------------------------------------------------------------

#: Sample intervals within this fraction of their median count as one regular rate.
REGULAR_RATE_TOLERANCE = 0.01


@dataclass(frozen=True)
class TimestampFindings:
    """Findings about one series' timestamps: NaN values, steps back, repeats and irregular intervals."""

    nan_samples: np.ndarray
    backward_steps: np.ndarray
    repeated_steps: np.ndarray
    irregular: bool
    median_interval_s: float
    max_deviation_s: float

    @property
    def invalid(self) -> bool:
        """Whether any timestamp is NaN or does not increase."""
        return bool(self.nan_samples.size or self.backward_steps.size or self.repeated_steps.size)


def check_timestamps(timestamps_s: np.ndarray) -> TimestampFindings:
    """Find NaN timestamps, steps that go back or repeat a time, and irregular sample intervals.

    Irregularity is judged on the intervals between consecutive finite timestamps that increase.
    """
    timestamps_s = np.asarray(timestamps_s, dtype=np.float64)
    nan_samples = np.flatnonzero(~np.isfinite(timestamps_s))

    finite = timestamps_s[np.isfinite(timestamps_s)]
    finite_positions = np.flatnonzero(np.isfinite(timestamps_s))
    steps_s = np.diff(finite)
    backward_steps = finite_positions[1:][steps_s < 0]
    repeated_steps = finite_positions[1:][steps_s == 0]

    increasing = steps_s[steps_s > 0]
    irregular = False
    median_s = float(np.median(increasing)) if increasing.size else 0.0
    deviation_s = float(np.max(np.abs(increasing - median_s))) if increasing.size else 0.0
    if increasing.size and median_s > 0 and deviation_s > REGULAR_RATE_TOLERANCE * median_s:
        irregular = True

    return TimestampFindings(
        nan_samples=nan_samples,
        backward_steps=backward_steps,
        repeated_steps=repeated_steps,
        irregular=irregular,
        median_interval_s=median_s,
        max_deviation_s=deviation_s,
    )


def timestamp_problems(label: str, series: str, findings: TimestampFindings, neurons: Sequence[str]) -> list[Problem]:
    """Return the invalid_timestamps and irregular_timestamps problems of one series.

    Parameters
    ----------
    label
        The file, as it appears in messages.
    series
        Name of the series, such as ``"DfOverF/RoiResponseSeries"``.
    findings
        What :func:`check_timestamps` found.
    neurons
        Names of the neurons whose traces the series holds.
    """
    problems = []
    if findings.invalid:
        parts = []
        if findings.nan_samples.size:
            parts.append(f"{findings.nan_samples.size} NaN timestamps (first at sample {int(findings.nan_samples[0])})")
        if findings.backward_steps.size:
            parts.append(f"{findings.backward_steps.size} that go back in time (first at sample {int(findings.backward_steps[0])})")
        if findings.repeated_steps.size:
            parts.append(f"{findings.repeated_steps.size} that repeat the time before (first at sample {int(findings.repeated_steps[0])})")
        problems.append(
            Problem(
                kind="invalid_timestamps",
                description=f"{label}: series {series!r} has {', '.join(parts)}",
                repair="samples with NaN times are dropped, the others are sorted by time, and a repeated time keeps its first sample",
                fix=(
                    "store increasing timestamps in the file, or set "
                    f"{setting('invalid_timestamps', 'warn')} in the recipe to drop and sort them"
                ),
                neurons=list(neurons),
                count=int(findings.nan_samples.size + findings.backward_steps.size + findings.repeated_steps.size),
                table=series,
            )
        )
    if findings.irregular:
        problems.append(
            Problem(
                kind="irregular_timestamps",
                description=(
                    f"{label}: series {series!r} has irregular timestamps: intervals differ from their median "
                    f"{findings.median_interval_s:.6g} s by up to {findings.max_deviation_s:.6g} s"
                ),
                repair="traces are resampled onto a regular grid, and grid points inside gaps become NaN",
                fix=f"store a regular rate in the file, or set {setting('irregular_timestamps', 'warn')} in the recipe",
                neurons=list(neurons),
                count=len(neurons),
                table=series,
            )
        )
    return problems


def repair_timestamps(timestamps_s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return the sample positions to keep, in time order, and the kept timestamps.

    Samples with NaN or infinite times are dropped, the rest are sorted by time (stably),
    and a time that repeats keeps its first sample.
    """
    timestamps_s = np.asarray(timestamps_s, dtype=np.float64)
    finite = np.flatnonzero(np.isfinite(timestamps_s))
    order = finite[np.argsort(timestamps_s[finite], kind="stable")]
    times = timestamps_s[order]
    first = np.ones(len(times), dtype=bool)
    first[1:] = np.diff(times) > 0
    return order[first], times[first]
