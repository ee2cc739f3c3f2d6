"""Read plain TimeSeries from ``acquisition`` as neurons, one series per neuron.

Some files store one activity trace per neuron as a plain TimeSeries (for example
``Activity_0000``, ``Activity_0001``, ...) instead of an ophys module. The helpers
for timing, scaling and non-finite samples are shared with the ophys reader.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pynwb import NWBFile, TimeSeries

from neurpir_nwb.errors import DataError
from neurpir_nwb.io.nwbfile import open_nwb
from neurpir_nwb.io.problems import (
    REGULAR_RATE_TOLERANCE,
    Problem,
    ProblemHandler,
    check_timestamps,
    format_ids,
    repair_timestamps,
    setting,
    timestamp_problems,
)
from neurpir_nwb.io.traces import TraceRecording
from neurpir_nwb.recipe import ProblemPolicy

logger = logging.getLogger(__name__)

# Per-neuron warnings beyond this many neurons are summarised in one line.
MAX_LOGGED_NEURONS = 20

# Two series share a time base when their sample times differ by at most this fraction
# of the median sample interval.
TIME_TOLERANCE = 0.01

def read_timeseries(path: str | Path, pattern: str, *, problems: ProblemPolicy | None = None) -> TraceRecording:
    """Read every TimeSeries in ``acquisition`` whose name matches a glob as one neuron.

    Parameters
    ----------
    path
        Local path of the NWB file. It is opened read-only.
    pattern
        ``fnmatch`` glob matched against the series names, for example ``"Activity_*"``.
    problems
        Action per data problem; see :class:`~neurpir_nwb.recipe.ProblemPolicy`.

    Returns
    -------
    TraceRecording
        One neuron per matching series, in name order, with ``position_source``
        ``"row"``. By default neurons whose samples are all NaN or infinite are
        dropped with a warning, and other non-finite samples become NaN and are
        counted per neuron.

    Raises
    ------
    SourceError
        When the file cannot be read as an NWB 2.x file.
    DataError
        When no series matches, when a series contains more than one trace, when the
        series do not share one time base, or when the policy raises for a data problem.
    """
    path = Path(path)
    handler = ProblemHandler(problems, log=logger)

    with open_nwb(path, handler=handler) as (io, nwbfile):
        series_list = _matching_series(path, nwbfile, pattern)

        names = [series.name for series in series_list]
        timestamps_s = [series_timestamps_s(path, series, _n_samples(series)) for series in series_list]
        check_same_time_base(path, names, timestamps_s)

        columns = [_single_trace(path, series, handler) for series in series_list]
        traces = np.stack(columns) if columns else np.empty((0, 0), dtype=np.float32)

        stored = series_list[0].timestamps is not None
        samples, times_s = checked_timestamps(path, names[0], timestamps_s[0], names, handler, stored=stored)
        if samples is not None:
            traces = traces[:, samples]
        rate_hz = series_rate_hz(series_list[0], times_s)

        version = io.nwb_version[0] or ""
        identifier, session, subject = file_identity(nwbfile)

    order = np.arange(len(names), dtype=np.int64)
    keep, traces, nan_counts, inf_counts, repairs = clean_traces(path, names, traces, handler)

    positions = np.zeros((int(keep.sum()), 3), dtype=np.float64)
    positions[:, 0] = np.arange(len(positions))

    return TraceRecording(
        path=path,
        identifier=identifier,
        session=session,
        subject=subject,
        table="acquisition",
        roi_ids=order[keep],
        rows=order[keep],
        series_names=np.asarray(names, dtype=str)[keep],
        traces=traces,
        timestamps_s=times_s,
        rate_hz=rate_hz,
        positions=positions,
        position_source="row",
        nwb_version=version,
        repairs=repairs,
        plane_tables=np.full(int(keep.sum()), "acquisition"),
        nan_counts=nan_counts,
        inf_counts=inf_counts,
        time_offsets_s=np.zeros(int(keep.sum()), dtype=np.float64),
    )


def _matching_series(path: Path, nwbfile: NWBFile, pattern: str) -> list[TimeSeries]:
    """Return the TimeSeries in ``acquisition`` whose names match ``pattern``, sorted by name."""
    acquisition = nwbfile.acquisition
    matched = [
        acquisition[name]
        for name in sorted(acquisition)
        if fnmatch.fnmatchcase(name, pattern) and isinstance(acquisition[name], TimeSeries)
    ]
    if not matched:
        available = ", ".join(sorted(acquisition)) or "none"
        raise DataError(
            f"{path}: no TimeSeries in acquisition matches {pattern!r}; the acquisition objects are {available}"
        )
    return matched


def _n_samples(series: TimeSeries) -> int:
    """Return the length of the time axis of a series' data."""
    return int(np.shape(series.data)[0])


def _single_trace(path: Path, series: TimeSeries, handler: ProblemHandler) -> np.ndarray:
    """Read a series that contains one trace as float32, after conversion and offset."""
    shape = np.shape(series.data)
    if len(shape) > 2 or (len(shape) == 2 and shape[1] != 1):
        raise DataError(
            f"{path}: TimeSeries {series.name!r} has data of shape {shape}, but each matched series must "
            "hold one neuron's trace; narrow the name pattern to the per-neuron series"
        )
    return scaled_data(path, series, handler).reshape(-1)


def checked_timestamps(
    path: Path,
    series: str,
    timestamps_s: np.ndarray,
    neurons: Sequence[str],
    handler: ProblemHandler,
    *,
    stored: bool = True,
) -> tuple[np.ndarray | None, np.ndarray]:
    """Report NaN, non-increasing and irregular timestamps; return the samples to keep and their times.

    The samples are None when every sample is kept in stored order. Otherwise they
    are the sample positions, in time order, after the ``invalid_timestamps`` repair.
    Times computed from a rate (``stored`` false) are regular by construction and
    are not checked.
    """
    if not stored:
        return None, timestamps_s
    found = timestamp_problems(str(path), series, check_timestamps(timestamps_s), neurons)
    samples = None
    for problem in found:
        handler.report(problem)
        if problem.kind == "invalid_timestamps":
            samples, timestamps_s = repair_timestamps(timestamps_s)
    return samples, timestamps_s


# --- shared by the ophys reader ---------------------------------------------------------------


def file_identity(nwbfile: NWBFile) -> tuple[str, str, str]:
    """Return the file's identifier, session (``session_id`` or identifier) and subject id or ``""``."""
    identifier = str(nwbfile.identifier)
    session = str(nwbfile.session_id or identifier)
    subject = nwbfile.subject
    subject_id = "" if subject is None or subject.subject_id is None else str(subject.subject_id)
    return identifier, session, subject_id


def scaled_data(path: Path, series: TimeSeries, handler: ProblemHandler | None = None) -> np.ndarray:
    """Read a series' data as float32 computed as ``data * conversion + offset``.

    The cast to float comes before the scaling, so integer data cannot overflow.
    Integer data with the default conversion (1) and offset (0) is reported as the
    ``raw_integer_data`` problem, since its values may be raw counts.
    """
    handler = handler if handler is not None else ProblemHandler(log=logger)
    raw = np.asarray(series.data[:])
    if not (np.issubdtype(raw.dtype, np.number) or raw.dtype == np.bool_):
        raise DataError(
            f"{path}: series {series.name!r} stores {raw.dtype} data, not numbers; "
            "choose a series of numeric traces"
        )
    conversion = float(series.conversion if series.conversion is not None else 1.0)
    offset = float(getattr(series, "offset", 0.0) or 0.0)

    if np.issubdtype(raw.dtype, np.integer) and conversion == 1.0 and offset == 0.0:
        handler.report(raw_integer_problem(str(path), series.name, str(raw.dtype), str(series.unit)))

    values = raw.astype(np.float32)
    if conversion != 1.0:
        values *= np.float32(conversion)
    if offset != 0.0:
        values += np.float32(offset)
    return values


def raw_integer_problem(label: str, series: str, dtype: str, unit: str) -> Problem:
    """Build the ``raw_integer_data`` problem of a series of integers with the default scale."""
    return Problem(
        kind="raw_integer_data",
        description=(
            f"{label}: series {series!r} stores {dtype} data with the default conversion 1 and offset 0, "
            f"so its values may be raw counts rather than {unit!r}"
        ),
        repair="the values are read as stored",
        fix=(
            "set conversion and offset in the file if they are counts, or set "
            f"{setting('raw_integer_data', 'ignore')} in the recipe if they are not"
        ),
        table=series,
    )


def series_timestamps_s(path: Path, series: TimeSeries, n_samples: int) -> np.ndarray:
    """Return the sample times of a series in seconds, from ``timestamps`` or ``rate`` and ``starting_time``."""
    if series.timestamps is not None:
        timestamps_s = np.asarray(series.timestamps[:], dtype=np.float64)
        if len(timestamps_s) != n_samples:
            raise DataError(
                f"{path}: series {series.name!r} has {n_samples} samples but {len(timestamps_s)} timestamps; "
                "the file is damaged, so export it again"
            )
        return timestamps_s

    if series.rate is None or not series.rate > 0:
        raise DataError(
            f"{path}: series {series.name!r} has neither timestamps nor a positive rate "
            f"(rate is {series.rate!r}), so its samples have no times; store timestamps or a rate in Hz"
        )
    starting_time_s = float(series.starting_time or 0.0)
    return starting_time_s + np.arange(n_samples, dtype=np.float64) / float(series.rate)


def series_rate_hz(series: TimeSeries, timestamps_s: np.ndarray) -> float | None:
    """Return the series' ``rate``, or the rate of regular timestamps, or None when they are irregular."""
    if series.timestamps is None and series.rate:
        return float(series.rate)

    intervals_s = np.diff(timestamps_s)
    if len(intervals_s) == 0:
        return None
    median_s = float(np.median(intervals_s))
    if median_s <= 0 or np.max(np.abs(intervals_s - median_s)) > REGULAR_RATE_TOLERANCE * median_s:
        return None
    return 1.0 / median_s


def check_same_time_base(
    path: Path,
    names: Sequence[str],
    timestamps_s: Sequence[np.ndarray],
    *,
    allow_shift: bool = False,
) -> np.ndarray:
    """Raise DataError unless every series has the sample times of the first one.

    Sample times match when they differ by at most TIME_TOLERANCE of the median
    sample interval. With ``allow_shift``, a series whose times are all shifted by
    the same amount, less than one sample interval, also matches: the imaging planes
    of one volume are scanned in turn, so their frames start at slightly different times.

    Returns
    -------
    numpy.ndarray
        The shift of each series in seconds, relative to the first one, float64.
    """
    reference = timestamps_s[0]
    intervals_s = np.diff(reference)
    interval_s = float(np.median(intervals_s)) if len(intervals_s) else 0.0
    tolerance_s = TIME_TOLERANCE * interval_s if interval_s > 0 else 1e-9
    shifts_s = np.zeros(len(names), dtype=np.float64)

    for position, (name, times) in enumerate(zip(names, timestamps_s)):
        if len(times) != len(reference):
            raise DataError(
                f"{path}: series {name!r} has {len(times)} samples but {names[0]!r} has {len(reference)}, "
                "so they do not share a time base; read them separately or resample them in the file"
            )
        if not len(times):
            continue

        differences_s = times - reference
        shift_s = float(np.median(differences_s)) if allow_shift else 0.0
        if allow_shift and abs(shift_s) >= interval_s:
            shift_s = 0.0
        residuals_s = np.abs(differences_s - shift_s)
        if np.max(residuals_s) > tolerance_s:
            worst = int(np.argmax(residuals_s))
            raise DataError(
                f"{path}: sample {worst} of series {name!r} is at {float(times[worst])!r} s but that of "
                f"{names[0]!r} is at {float(reference[worst])!r} s, so they do not share a time base; "
                "read them separately"
            )
        shifts_s[position] = shift_s

    return shifts_s


def clean_traces(
    path: Path,
    names: Sequence[str],
    traces: np.ndarray,
    handler: ProblemHandler | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, int]]:
    """Drop all-non-finite neurons and turn other non-finite samples into NaN.

    Both are reported as one ``nonfinite_samples`` problem.

    Parameters
    ----------
    names
        Name of each neuron in messages, for example ``"ROI 3 of PlaneSegmentation"``.
    traces
        (n_neurons, n_samples) float32 traces.
    handler
        Applies the problem policy; the default policy when None.

    Returns
    -------
    tuple
        The kept-neuron mask, the kept traces, and the NaN and infinite sample counts
        per kept neuron. Last come the repair counts ``neurons_dropped_all_nan``,
        ``nan_samples`` and ``inf_samples``, without the counts that are zero.
    """
    handler = handler if handler is not None else ProblemHandler(log=logger)
    all_nan_counts = np.count_nonzero(np.isnan(traces), axis=1).astype(np.int64)
    all_inf_counts = np.count_nonzero(np.isinf(traces), axis=1).astype(np.int64)
    n_samples = traces.shape[1]
    keep = (all_nan_counts + all_inf_counts) < n_samples if n_samples else np.ones(len(traces), dtype=bool)

    dropped = [name for name, kept in zip(names, keep) if not kept]
    affected = [name for name, n_nan, n_inf in zip(names, all_nan_counts, all_inf_counts) if n_nan or n_inf]
    if affected:
        handler.report(
            nonfinite_samples_problem(str(path), names, all_nan_counts, all_inf_counts, n_samples),
            warnings=_nonfinite_lines(path, names, keep, all_nan_counts, all_inf_counts, n_samples),
        )

    traces = traces[keep]
    nan_counts, inf_counts = all_nan_counts[keep], all_inf_counts[keep]
    traces[~np.isfinite(traces)] = np.nan

    repairs = {
        "neurons_dropped_all_nan": len(dropped),
        "nan_samples": int(nan_counts.sum()),
        "inf_samples": int(inf_counts.sum()),
    }
    return keep, traces, nan_counts, inf_counts, {key: count for key, count in repairs.items() if count}


def nonfinite_samples_problem(
    label: str, names: Sequence[str], nan_counts: np.ndarray, inf_counts: np.ndarray, n_samples: int
) -> Problem:
    """Build the ``nonfinite_samples`` problem from the NaN and infinite sample counts of each neuron."""
    affected = [name for name, n_nan, n_inf in zip(names, nan_counts, inf_counts) if n_nan or n_inf]
    all_bad = [name for name, n_nan, n_inf in zip(names, nan_counts, inf_counts) if n_samples and n_nan + n_inf == n_samples]
    description = (
        f"{label}: {len(affected)} of {len(names)} neurons have NaN or infinite samples "
        f"({int(np.sum(nan_counts))} NaN, {int(np.sum(inf_counts))} infinite; {format_ids(affected)})"
    )
    if all_bad:
        description += f", and {len(all_bad)} of them have no finite sample ({format_ids(all_bad)})"
    return Problem(
        kind="nonfinite_samples",
        description=description,
        repair="neurons without a finite sample are dropped, other such samples become NaN, and windows that contain them are left out",
        fix=f"replace them in the file, or set {setting('nonfinite_samples', 'warn')} in the recipe to leave them out",
        neurons=list(affected),
        count=int(np.sum(nan_counts) + np.sum(inf_counts)),
    )


def _nonfinite_lines(
    path: Path,
    names: Sequence[str],
    keep: np.ndarray,
    nan_counts: np.ndarray,
    inf_counts: np.ndarray,
    n_samples: int,
) -> list[str]:
    """Return the warning lines of non-finite samples: one for the dropped neurons, then one per kept neuron."""
    lines = []
    dropped = [name for name, kept in zip(names, keep) if not kept]
    if dropped:
        listed = ", ".join(dropped[:MAX_LOGGED_NEURONS])
        if len(dropped) > MAX_LOGGED_NEURONS:
            listed += f" and {len(dropped) - MAX_LOGGED_NEURONS} more"
        lines.append(f"{path}: dropped {len(dropped)} of {len(names)} neurons whose samples are all NaN or infinite: {listed}")

    kept = [(name, n_nan, n_inf) for name, kept, n_nan, n_inf in zip(names, keep, nan_counts, inf_counts) if kept and (n_nan or n_inf)]
    for name, n_nan, n_inf in kept[:MAX_LOGGED_NEURONS]:
        lines.append(f"{path}: {name} has {n_nan} NaN and {n_inf} infinite samples of {n_samples}; they are kept as NaN")
    if len(kept) > MAX_LOGGED_NEURONS:
        lines.append(f"{path}: {len(kept) - MAX_LOGGED_NEURONS} more neurons have NaN or infinite samples")
    return lines
