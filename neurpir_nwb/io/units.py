"""Read an NWB Units table into a :class:`Recording`: spike trains, positions and labels.

Spike trains are read in bulk (the concatenated ``spike_times`` values and their
index, split in memory) and sanitised before any other stage reads them. A table with
more than :data:`CHUNK_SPIKES` spike times is read in blocks of whole units instead:
the reader scans it once to report problems and find the session span, and
:class:`SpikeTrainBlocks` reads each block again when the segments bin it, so memory
holds one block at a time. Region
columns such as ``electrodes`` are read through their raw row indices, never through
pynwb's row access, which returns DataFrames. Every irregularity found on the way is
reported to a :class:`~neurpir_nwb.io.problems.ProblemHandler`, which applies the
recipe's raise / warn / ignore policy.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from hdmf.common import DynamicTable, DynamicTableRegion, VectorIndex
from hdmf.container import AbstractContainer
from pynwb import NWBFile

from neurpir_nwb.errors import DataError, RecipeError
from neurpir_nwb.io.nwbfile import open_nwb
from neurpir_nwb.io.problems import UNREADABLE, Problem, ProblemHandler, format_ids, is_missing_label, setting
from neurpir_nwb.io.recording import Recording
from neurpir_nwb.recipe import ProblemPolicy

logger = logging.getLogger(__name__)

# Per-unit warnings beyond this many units are summarised in one line.
MAX_LOGGED_UNITS = 20

#: Spike times later than this, in seconds (24 h), look like milliseconds or sample indices.
#: NOTE: a chosen bound; a longer session stored in seconds needs problems.spike_times_not_seconds: ignore.
MAX_SESSION_S = 86_400.0

#: Minimum number of spikes for "all spike times are whole numbers" to mean sample indices rather than chance.
MIN_SPIKES_FOR_SAMPLE_CHECK = 20

#: Divisors that turn each spike_times unit into seconds; samples divide by the sampling rate instead.
SECONDS_PER_UNIT = {"s": 1.0, "ms": 1000.0}

#: Spike times read at once (80 MB of float64); a larger Units table is read in blocks of units.
CHUNK_SPIKES = 10_000_000


@dataclass(frozen=True)
class LabelSpec:
    """Source of one label of each unit: a units column, or an electrodes column through the unit's links.

    Attributes
    ----------
    source
        ``"units.<column>"`` names a column of the Units table. ``"electrodes.<column>"``
        names a column of the electrodes that each unit's ``electrodes`` column links to.
        ``"units.<region column>.<column>"`` names a column of the table that another
        region column (DynamicTableRegion) of the Units table links to, for example
        ``"units.max_electrode.location"``.
    field
        For structured strings such as ``"brain_region: ALM; cortical_layer: 5"``, the
        key whose value becomes the label. ``None`` takes the whole string.
    """

    source: str
    field: str | None = None

    def __post_init__(self) -> None:
        _parse_label_source(self.source)

    @property
    def region_column(self) -> str | None:
        """Units column that links to the table holding the label, or None for a units column."""
        return _parse_label_source(self.source)[0]

    @property
    def column(self) -> str:
        """Column holding the label, in the Units table or in the linked table."""
        return _parse_label_source(self.source)[1]


def read_units(
    path: str | Path,
    *,
    labels: Mapping[str, LabelSpec] | None = None,
    sort_spikes: bool = False,
    problems: ProblemPolicy | None = None,
    spike_times_unit: str = "s",
    sampling_rate_hz: float | None = None,
    chunk_spikes: int = CHUNK_SPIKES,
) -> Recording:
    """Read the Units table of an NWB file, with sanitised spike trains, positions and labels.

    What the reader repairs, and whether it raises, warns or stays silent first, is set
    by ``problems``. By default NaN, infinite and negative spike times are dropped,
    equal consecutive times and units without spikes are kept, spikes outside a
    unit's ``obs_intervals`` are dropped, each with a warning per unit, and descending
    trains and spike times that look like sample indices or milliseconds raise.
    Repairs are counted in ``Recording.repairs``.

    Parameters
    ----------
    path
        Local path of the NWB file. It is opened read-only.
    labels
        Label name to the place each unit's label is read from.
    sort_spikes
        Sort spike trains that descend, with a warning: the same as
        ``problems.descending_spike_times = "warn"``.
    problems
        Action per data problem; see :class:`~neurpir_nwb.recipe.ProblemPolicy`.
    spike_times_unit
        Unit of the stored spike times and obs_intervals: ``"s"``, ``"ms"`` or
        ``"samples"`` (with ``sampling_rate_hz``). They are converted to seconds.
    sampling_rate_hz
        Sampling rate in Hz of spike times stored as sample indices.
    chunk_spikes
        Most spike times held in memory at once. A table with more spike times gets
        a :class:`SpikeTrainBlocks` as ``spike_times``, which reads blocks of whole
        units from the file when they are needed. Problems are then found and
        reported block by block.

    Returns
    -------
    Recording
        One neuron per row of the Units table, in table order.

    Raises
    ------
    SourceError
        When the file cannot be read as an NWB 2.x file.
    DataError
        When the file has no Units table or no ``spike_times``, when an index is
        inconsistent, when a label source names a missing column, or when the policy
        raises for a data problem.
    RecipeError
        When ``spike_times_unit`` is unknown, or ``"samples"`` without a sampling rate.
    """
    path = Path(path)
    handler = ProblemHandler(units_policy(problems, sort_spikes), log=logger)

    with open_nwb(path, handler=handler) as (io, nwbfile):
        return units_recording(
            path,
            nwbfile,
            handler,
            nwb_version=io.nwb_version[0] or "",
            labels=labels,
            spike_times_unit=spike_times_unit,
            sampling_rate_hz=sampling_rate_hz,
            chunk_spikes=chunk_spikes,
        )


def units_policy(problems: ProblemPolicy | None, sort_spikes: bool) -> ProblemPolicy:
    """Return the problem policy with ``sort_spikes`` applied: it turns ``descending_spike_times: raise`` into ``warn``."""
    policy = problems if problems is not None else ProblemPolicy()
    if sort_spikes and policy.descending_spike_times == "raise":
        policy = policy.model_copy(update={"descending_spike_times": "warn"})
    return policy


def units_recording(
    path: str | Path,
    nwbfile: NWBFile,
    handler: ProblemHandler,
    *,
    nwb_version: str = "",
    labels: Mapping[str, LabelSpec] | None = None,
    spike_times_unit: str = "s",
    sampling_rate_hz: float | None = None,
    max_spikes: int | None = None,
    chunk_spikes: int | None = None,
) -> Recording:
    """Build the Recording of an NWB file's Units table that pynwb has read.

    This is the body of :func:`read_units`; ``neurpir-nwb inspect`` calls it with a
    handler that collects the problems. With ``max_spikes``, only the first units
    whose spike trains fit in that many spike times are read. With ``chunk_spikes``,
    a local file with more spike times than that is read in blocks of units, and its
    Recording holds a :class:`SpikeTrainBlocks`.
    """
    path = Path(str(path))
    labels = labels or {}
    divisor = _seconds_divisor(spike_times_unit, sampling_rate_hz)

    units = _units_table(path, nwbfile)
    unit_ids = np.asarray(units.id.data[:], dtype=np.int64)

    blocks = None
    if max_spikes is None and chunk_spikes is not None:
        blocks = _spike_train_blocks(path, units, unit_ids, handler, divisor, spike_times_unit, chunk_spikes)
    if blocks is not None:
        unit_ids = blocks.unit_ids
        obs_intervals = blocks.obs_intervals
        counts, spans, repairs = blocks.scan(handler)
        trains: SpikeTrainBlocks | list[np.ndarray] = blocks
    else:
        raw_trains, stored_dtype = _read_spike_trains(path, units, unit_ids, max_spikes)
        unit_ids = unit_ids[: len(raw_trains)]
        raw_trains = [train / divisor for train in raw_trains] if divisor != 1.0 else raw_trains
        obs_intervals = _read_obs_intervals(path, units, unit_ids, handler, divisor)
        trains, repairs = _sanitise_trains(
            path,
            unit_ids,
            raw_trains,
            handler,
            integer_stored=np.issubdtype(stored_dtype, np.integer) and spike_times_unit == "s",
            obs_intervals=obs_intervals,
        )
        counts = np.array([len(train) for train in trains], dtype=np.int64)
        spans = _train_spans(trains)

    positions, position_source = _unit_positions(path, units, unit_ids, handler)
    label_values = {name: _read_label(path, units, unit_ids, name, spec, handler) for name, spec in labels.items()}

    identifier = str(nwbfile.identifier)
    _report_empty_units(path, unit_ids, counts, handler)
    t_start_s, t_stop_s = _session_span_s(spans, counts)

    return Recording(
        path=path,
        identifier=identifier,
        session=str(nwbfile.session_id or identifier),
        subject=_subject_id(nwbfile),
        table="units",
        unit_ids=unit_ids,
        rows=np.arange(len(unit_ids), dtype=np.int64),
        spike_times=trains,
        positions=positions,
        position_source=position_source,
        labels=label_values,
        t_start_s=t_start_s,
        t_stop_s=t_stop_s,
        nwb_version=nwb_version,
        repairs=repairs,
        obs_intervals_s=obs_intervals,
    )


def label_sources(nwbfile: NWBFile) -> list[str]:
    """Return the label sources that the Units table offers: its text columns and those of linked tables.

    Text columns hold one string per row. Sources are given as
    ``units.<column>``, ``electrodes.<column>`` or ``units.<region column>.<column>``.
    """
    units = nwbfile.units
    if units is None:
        return []

    sources = [f"units.{name}" for name in units.colnames if _is_text_column(units, name)]
    for name in units.colnames:
        values = units[name]
        target = values.target if isinstance(values, VectorIndex) else values
        if not isinstance(target, DynamicTableRegion):
            continue
        prefix = "electrodes" if name == "electrodes" else f"units.{name}"
        sources.extend(f"{prefix}.{column}" for column in target.table.colnames if _is_text_column(target.table, column))
    return sources


def _is_text_column(table: DynamicTable, name: str) -> bool:
    """Tell whether a table column contains one string per row, from its shape and its first value."""
    values = table[name]
    if isinstance(values, (VectorIndex, DynamicTableRegion)):
        return False
    data = values.data
    if np.ndim(data) != 1 or len(data) == 0:
        return False
    return isinstance(data[0], (str, bytes, np.str_, np.bytes_))


def _seconds_divisor(spike_times_unit: str, sampling_rate_hz: float | None) -> float:
    """Return the number that divides stored spike times into seconds."""
    if spike_times_unit in SECONDS_PER_UNIT:
        return SECONDS_PER_UNIT[spike_times_unit]
    if spike_times_unit == "samples":
        if sampling_rate_hz is None or not sampling_rate_hz > 0:
            raise RecipeError(
                f"spike_times_unit 'samples' needs a positive sampling rate in Hz, got {sampling_rate_hz!r}; "
                "set units.sampling_rate_hz in the recipe"
            )
        return float(sampling_rate_hz)
    raise RecipeError(f"spike_times_unit {spike_times_unit!r} is invalid; use 's', 'ms' or 'samples'")


def parse_structured_location(text: str) -> dict[str, str]:
    """Split a structured location string into its keys and values.

    ``"brain_region: ALM; cortical_layer: 5"`` becomes
    ``{"brain_region": "ALM", "cortical_layer": "5"}``. Plain text, where any
    ``;``-separated part has no ``key: value`` form, returns ``{}``.
    """
    parsed: dict[str, str] = {}
    for part in text.split(";"):
        part = part.strip()
        if not part:
            continue

        key, separator, value = part.partition(":")
        key = key.strip()
        if not separator or not key:
            return {}
        parsed[key] = value.strip()

    return parsed


# --- the Units table ---------------------------------------------------------


def _units_table(path: Path, nwbfile: NWBFile) -> DynamicTable:
    """Return the file's Units table, or raise DataError when it has none or it is empty."""
    units = nwbfile.units
    if units is None:
        raise DataError(
            f"{path} has no Units table, so it contains no spike trains; "
            "read it with the reader for its data (ophys or TimeSeries) instead"
        )
    if len(units.id) == 0:
        raise DataError(f"{path} has a Units table with no units; there are no spike trains to read")
    return units


def _subject_id(nwbfile: NWBFile) -> str:
    """Return ``subject.subject_id``, or ``""`` when the file records none."""
    subject = nwbfile.subject
    if subject is None or subject.subject_id is None:
        return ""
    return str(subject.subject_id)


def _check_index(path: Path, column: str, ends: np.ndarray, n_values: int, unit_ids: np.ndarray) -> None:
    """Raise DataError unless a ragged column's index splits its values into one row per unit."""
    if len(ends) != len(unit_ids):
        raise DataError(
            f"{path}: {column}_index has {len(ends)} rows but the Units table has {len(unit_ids)} units; "
            "the file is damaged, so export or download it again"
        )

    starts = np.concatenate(([0], ends[:-1]))
    bad = np.flatnonzero((ends < starts) | (ends > n_values))
    if bad.size:
        row = int(bad[0])
        raise DataError(
            f"{path}: {column}_index of unit {unit_ids[row]} ends at element {ends[row]}, outside "
            f"elements {starts[row]} to {n_values} of {column}; "
            "the file is damaged or was cut, so export or download it again"
        )
    if ends[-1] != n_values:
        raise DataError(
            f"{path}: {column}_index ends at element {ends[-1]} but {column} has {n_values} elements; "
            "the file is damaged or was cut, so export or download it again"
        )


# --- spike trains --------------------------------------------------------------


def _read_spike_trains(
    path: Path, units: DynamicTable, unit_ids: np.ndarray, max_spikes: int | None = None
) -> tuple[list[np.ndarray], np.dtype]:
    """Read the spike trains with one read of the values and one of the index; return them and the stored dtype.

    With ``max_spikes``, only the first units whose trains end within that many
    values are read (at least one unit).
    """
    if "spike_times" not in units.colnames:
        raise DataError(
            f"{path}: the Units table has no spike_times column, so there are no spike trains to read; "
            "read the file's ROI traces or TimeSeries instead, or add spike_times to the file"
        )

    index = units["spike_times"]
    if not isinstance(index, VectorIndex):
        raise DataError(
            f"{path}: the Units table's spike_times has no spike_times_index, so it cannot be split into units"
        )

    dataset = index.target.data
    ends = np.asarray(index.data[:], dtype=np.int64)
    _check_index(path, "spike_times", ends, len(dataset), unit_ids)
    stored_dtype = np.dtype(getattr(dataset, "dtype", np.float64))

    n_units = len(ends)
    if max_spikes is not None and ends[-1] > max_spikes:
        n_units = max(1, int(np.searchsorted(ends, max_spikes, side="right")))
        ends = ends[:n_units]
    times = np.asarray(dataset[: ends[-1]], dtype=np.float64)
    return np.split(times, ends[:-1]), stored_dtype


def _read_obs_intervals(
    path: Path, units: DynamicTable, unit_ids: np.ndarray, handler: ProblemHandler, divisor: float = 1.0
) -> list[np.ndarray] | None:
    """Return each unit's (n, 2) obs_intervals divided by ``divisor`` (into seconds), or None when the table has none.

    A unit with no intervals gets an empty (0, 2) array, which the segments treat as
    observed throughout.
    """
    if "obs_intervals" not in units.colnames:
        return None

    index = units["obs_intervals"]
    if not isinstance(index, VectorIndex):
        raise DataError(f"{path}: the Units table's obs_intervals has no obs_intervals_index, so it cannot be split into units")
    values = np.asarray(index.target.data[:], dtype=np.float64).reshape(-1, 2)
    ends = np.asarray(index.data[:], dtype=np.int64)
    _check_index(path, "obs_intervals", ends, len(values), np.asarray(units.id.data[:]))
    intervals = np.split(values, ends[:-1])[: len(unit_ids)]

    for unit_id, unit_intervals in zip(unit_ids, intervals):
        bad = np.flatnonzero(~np.isfinite(unit_intervals).all(axis=1) | (unit_intervals[:, 1] < unit_intervals[:, 0]))
        if bad.size:
            start, stop = (float(value) for value in unit_intervals[bad[0]])
            handler.report(
                Problem(
                    kind=UNREADABLE,
                    description=f"{path}: obs_intervals of unit {unit_id} has the interval [{start!r}, {stop!r}] s, "
                    "which is not finite or ends before it starts",
                    fix="store each interval as [start, stop] with start <= stop in the file, or remove obs_intervals",
                    neurons=[str(unit_id)],
                    count=int(bad.size),
                    table="units",
                )
            )
    return [unit_intervals / divisor for unit_intervals in intervals] if divisor != 1.0 else intervals


def _sanitise_trains(
    path: Path,
    unit_ids: np.ndarray,
    trains: list[np.ndarray],
    handler: ProblemHandler,
    *,
    integer_stored: bool = False,
    obs_intervals: list[np.ndarray] | None = None,
) -> tuple[list[np.ndarray], dict[str, int]]:
    """Check and repair every spike train, reporting each problem to the handler.

    In order, NaN and infinite times are dropped, then negative times. Then the trains
    are checked for sample indices or milliseconds, descending trains are sorted, and
    equal consecutive times are counted and kept. Last, spikes outside the unit's
    obs_intervals are dropped. Returns the trains and the counts of what changed, keyed
    ``nan_dropped``, ``negative_dropped``, ``units_sorted``, ``equal_times_kept`` and
    ``outside_obs_intervals_dropped``, without the counts that are zero.

    Counts are kept per table row, so that units that share an id stay apart.
    """
    # Position of every kept value in its raw train, so that messages point at the stored data.
    positions = [np.arange(len(train)) for train in trains]

    masks = [~np.isfinite(train) for train in trains]
    nan_counts = _count_per_row([np.count_nonzero(mask) for mask in masks])
    if nan_counts:
        row = next(iter(nan_counts))
        first_index = int(np.flatnonzero(masks[row])[0])
        handler.report(
            _spike_problem(
                path,
                "nonfinite_spike_times",
                unit_ids,
                nan_counts,
                "NaN or infinite spike times",
                f"unit {unit_ids[row]} first at index {first_index}",
                repair="they are dropped",
                fix="remove them from the file, or set {setting} in the recipe to drop them",
            ),
            warnings=_per_unit_lines(path, "dropped %d non-finite spike times (NaN or inf)", unit_ids, nan_counts),
        )
    trains, positions = _drop_spikes(trains, positions, masks)

    masks = [train < 0 for train in trains]
    negative_counts = _count_per_row([np.count_nonzero(mask) for mask in masks])
    if negative_counts:
        row = next(iter(negative_counts))
        first = int(np.flatnonzero(masks[row])[0])
        handler.report(
            _spike_problem(
                path,
                "negative_spike_times",
                unit_ids,
                negative_counts,
                "negative spike times, which look like sentinel values",
                f"unit {unit_ids[row]} has {float(trains[row][first])!r} s at index {int(positions[row][first])}",
                repair="they are dropped",
                fix="remove them from the file, or set {setting} in the recipe to drop them",
            ),
            warnings=_per_unit_lines(path, "dropped %d negative spike times, which look like sentinel values", unit_ids, negative_counts),
        )
    trains, positions = _drop_spikes(trains, positions, masks)

    _check_time_unit(path, unit_ids, trains, handler, integer_stored)
    trains, sorted_counts = _ascending_trains(path, unit_ids, trains, positions, handler)

    equal_counts = _count_per_row([np.count_nonzero(np.diff(train) == 0) for train in trains])
    if equal_counts:
        row = next(iter(equal_counts))
        train = trains[row]
        repeated = float(train[1:][np.diff(train) == 0][0])
        handler.report(
            _spike_problem(
                path,
                "duplicate_spike_times",
                unit_ids,
                equal_counts,
                "spike times equal to the time before them",
                f"unit {unit_ids[row]} repeats {repeated!r} s",
                repair="they are kept",
                fix="remove the duplicates from the file, or set {setting} in the recipe to keep them",
            ),
            warnings=_per_unit_lines(path, "kept %d duplicate spike times, each equal to the time before it", unit_ids, equal_counts),
        )

    outside_counts: dict[int, int] = {}
    if obs_intervals is not None:
        trains, outside_counts = _inside_obs_intervals(path, unit_ids, trains, obs_intervals, handler)

    repairs = {
        "nan_dropped": sum(nan_counts.values()),
        "negative_dropped": sum(negative_counts.values()),
        "units_sorted": len(sorted_counts),
        "equal_times_kept": sum(equal_counts.values()),
        "outside_obs_intervals_dropped": sum(outside_counts.values()),
    }
    return trains, {key: count for key, count in repairs.items() if count}


def _spike_problem(
    path: Path,
    kind: str,
    unit_ids: np.ndarray,
    counts: dict[int, int],
    what: str,
    example: str,
    *,
    repair: str,
    fix: str,
) -> Problem:
    """Build the problem of spike times that some units have; ``counts`` maps table row to count."""
    total = sum(counts.values())
    ids = [int(unit_ids[row]) for row in counts]
    if len(ids) == 1:
        who = f"unit {ids[0]} has"
    else:
        who = f"{len(ids)} units (ids {format_ids(ids)}) have"
    return Problem(
        kind=kind,
        description=f"{path}: {who} {total} {what} ({example})",
        repair=repair,
        fix=fix.format(setting=setting(kind, "warn")),
        neurons=[str(unit_id) for unit_id in ids],
        count=total,
        table="units",
    )


def _drop_spikes(
    trains: list[np.ndarray],
    positions: list[np.ndarray],
    drop_masks: list[np.ndarray],
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Remove the masked spike times; return the trains and their raw positions. Trains with nothing to drop are kept as they are."""
    kept_trains = [train[~mask] if mask.any() else train for train, mask in zip(trains, drop_masks)]
    kept_positions = [position[~mask] if mask.any() else position for position, mask in zip(positions, drop_masks)]
    return kept_trains, kept_positions


def _check_time_unit(
    path: Path, unit_ids: np.ndarray, trains: list[np.ndarray], handler: ProblemHandler, integer_stored: bool
) -> None:
    """Report spike times that look like sample indices (whole numbers) or milliseconds (past 24 h)."""
    non_empty = [train for train in trains if len(train)]
    if not non_empty:
        return
    times = np.concatenate(non_empty)
    last_s = float(times.max())
    fix = (
        "give their unit in the recipe with units.spike_times_unit: ms, or samples together with "
        "units.sampling_rate_hz (or store seconds in the file); set "
        f"{setting('spike_times_not_seconds', 'warn')} to read them as seconds"
    )

    whole = bool(np.all(times == np.round(times)))
    if whole and (integer_stored or times.size >= MIN_SPIKES_FOR_SAMPLE_CHECK):
        ids = [int(unit_id) for unit_id, train in zip(unit_ids, trains) if len(train)]
        stored = "are stored as integers" if integer_stored else "are all whole numbers"
        handler.report(
            Problem(
                kind="spike_times_not_seconds",
                description=(
                    f"{path}: the {times.size} spike times of units {format_ids(ids)} {stored}, from "
                    f"{float(times.min())!r} to {last_s!r}, so they look like sample indices rather than seconds"
                ),
                repair="they are read as seconds",
                fix=fix,
                neurons=[str(unit_id) for unit_id in ids],
                count=int(times.size),
                table="units",
            )
        )
        return

    if last_s > MAX_SESSION_S:
        late = [int(unit_id) for unit_id, train in zip(unit_ids, trains) if len(train) and train.max() > MAX_SESSION_S]
        handler.report(
            Problem(
                kind="spike_times_not_seconds",
                description=(
                    f"{path}: spike times of units {format_ids(late)} reach {last_s!r} s ({last_s / 3600:.1f} h), "
                    f"later than any session of up to {MAX_SESSION_S / 3600:.0f} h, so they look like milliseconds "
                    "or sample indices rather than seconds"
                ),
                repair="they are read as seconds",
                fix=fix,
                neurons=[str(unit_id) for unit_id in late],
                count=len(late),
                table="units",
            )
        )


def _ascending_trains(
    path: Path,
    unit_ids: np.ndarray,
    trains: list[np.ndarray],
    positions: list[np.ndarray],
    handler: ProblemHandler,
) -> tuple[list[np.ndarray], dict[int, int]]:
    """Return the trains in ascending order and, per sorted table row, how many descents it had.

    The first descending train is reported with its raw index and the two times.
    """
    descents_per_row = _count_per_row([np.count_nonzero(np.diff(train) < 0) for train in trains])
    if not descents_per_row:
        return trains, {}

    row = next(iter(descents_per_row))
    at = int(np.flatnonzero(np.diff(trains[row]) < 0)[0]) + 1
    index, before, after = int(positions[row][at]), float(trains[row][at - 1]), float(trains[row][at])
    ids = [int(unit_ids[one]) for one in descents_per_row]
    others = f" ({len(ids)} units descend: ids {format_ids(ids)})" if len(ids) > 1 else ""
    handler.report(
        Problem(
            kind="descending_spike_times",
            description=(
                f"{path}: spike times of unit {unit_ids[row]} descend at index {index}, from {before!r} to {after!r} s, "
                f"so they look trial-relative rather than session-relative{others}"
            ),
            repair="the trains are sorted",
            fix=(
                "Store session-relative times, or opt in to sorting with units.sort_spikes: true "
                f"(or {setting('descending_spike_times', 'warn')}) in the recipe"
            ),
            neurons=[str(unit_id) for unit_id in ids],
            count=sum(descents_per_row.values()),
            table="units",
        ),
        warnings=_per_unit_lines(path, "sorted its spike times, which descended %d times", unit_ids, descents_per_row),
    )

    ordered = [np.sort(train, kind="stable") if row in descents_per_row else train for row, train in enumerate(trains)]
    return ordered, descents_per_row


def _inside_obs_intervals(
    path: Path,
    unit_ids: np.ndarray,
    trains: list[np.ndarray],
    obs_intervals: list[np.ndarray],
    handler: ProblemHandler,
) -> tuple[list[np.ndarray], dict[int, int]]:
    """Drop the spikes outside each unit's obs_intervals; a unit with no intervals keeps all its spikes."""
    masks = []
    for train, intervals in zip(trains, obs_intervals):
        if len(intervals) == 0:
            masks.append(np.zeros(len(train), dtype=bool))
            continue
        inside = ((train[:, None] >= intervals[None, :, 0]) & (train[:, None] <= intervals[None, :, 1])).any(axis=1)
        masks.append(~inside)

    counts = _count_per_row([np.count_nonzero(mask) for mask in masks])
    if counts:
        row = next(iter(counts))
        example = float(trains[row][masks[row]][0])
        handler.report(
            _spike_problem(
                path,
                "spikes_outside_obs_intervals",
                unit_ids,
                counts,
                "spike times outside their obs_intervals",
                f"unit {unit_ids[row]} has {example!r} s",
                repair="they are dropped, and windows outside obs_intervals are left out",
                fix="correct obs_intervals or spike_times in the file, or set {setting} in the recipe to drop them",
            ),
            warnings=_per_unit_lines(path, "dropped %d spike times outside its obs_intervals", unit_ids, counts),
        )
    return [train[~mask] for train, mask in zip(trains, masks)], counts


def _report_empty_units(path: Path, unit_ids: np.ndarray, counts: np.ndarray, handler: ProblemHandler) -> None:
    """Report, in one problem, the units that have no spikes left; ``counts`` is the number of spikes kept per unit."""
    empty_ids = [int(unit_id) for unit_id, count in zip(unit_ids, counts) if count == 0]
    if not empty_ids:
        return

    handler.report(
        Problem(
            kind="empty_units",
            description=f"{path}: {len(empty_ids)} of {len(unit_ids)} units have no spike times (unit ids {format_ids(empty_ids)})",
            repair="they are kept with all-zero activity",
            fix=f"remove them from the file, or set {setting('empty_units', 'warn')} in the recipe to keep them",
            neurons=[str(unit_id) for unit_id in empty_ids],
            count=len(empty_ids),
            table="units",
        )
    )


def _train_spans(trains: Sequence[np.ndarray]) -> np.ndarray:
    """Return the (n_units, 2) first and last spike time of each ascending train; NaN for an empty one."""
    spans = np.full((len(trains), 2), np.nan)
    for row, train in enumerate(trains):
        if len(train):
            spans[row] = train[0], train[-1]
    return spans


def _session_span_s(spans: np.ndarray, counts: np.ndarray) -> tuple[float, float]:
    """Return the first and last spike time in seconds over the non-empty trains, or (0, 0)."""
    spans = spans[counts > 0]
    if not len(spans):
        return 0.0, 0.0
    return float(spans[:, 0].min()), float(spans[:, 1].max())


# --- spike trains read in blocks -------------------------------------------------


def _spike_train_blocks(
    path: Path,
    units: DynamicTable,
    unit_ids: np.ndarray,
    handler: ProblemHandler,
    divisor: float,
    spike_times_unit: str,
    chunk_spikes: int,
) -> SpikeTrainBlocks | None:
    """Return the table's spike trains as blocks when the file is local and holds more than ``chunk_spikes`` spike times."""
    index = units["spike_times"] if "spike_times" in units.colnames else None
    if not isinstance(index, VectorIndex) or not isinstance(index.target.data, h5py.Dataset):
        return None
    dataset = index.target.data
    if len(dataset) <= chunk_spikes or not path.is_file():
        return None

    ends = np.asarray(index.data[:], dtype=np.int64)
    _check_index(path, "spike_times", ends, len(dataset), unit_ids)
    obs_intervals = _read_obs_intervals(path, units, unit_ids, handler, divisor)
    return SpikeTrainBlocks(
        path=path,
        dataset_name=dataset.name,
        unit_ids=unit_ids,
        ends=ends,
        divisor=divisor,
        integer_stored=np.issubdtype(dataset.dtype, np.integer) and spike_times_unit == "s",
        obs_intervals=obs_intervals,
        policy=handler.policy,
        chunk_spikes=chunk_spikes,
    )


class SpikeTrainBlocks(Sequence[np.ndarray]):
    """Spike trains of a large Units table, read from the file in blocks of whole units.

    Each block is read with one slice of ``spike_times`` and sanitised as the reader
    sanitises a whole table, so every block gives the trains that an in-memory read
    gives. :meth:`scan` reads every block once, reporting problems; later reads
    apply the same repairs without reporting them again.

    NOTE: problems are reported per block, so one kind of problem in several
    blocks gives several messages, each naming its own units.

    Parameters
    ----------
    path
        The local NWB file.
    dataset_name
        HDF5 path of the ``spike_times`` values, such as ``"/units/spike_times"``.
    unit_ids
        Ids of the units, in table order.
    ends
        ``spike_times_index``: the end of each unit's values.
    divisor
        What the stored values are divided by to give seconds.
    integer_stored
        Whether the values are stored as integers while the recipe reads them as seconds.
    obs_intervals
        Each unit's obs_intervals in seconds, or None.
    policy
        The problem policy, whose repairs every read applies.
    chunk_spikes
        Most spike times in one block; a unit with more forms a block of its own.
    """

    def __init__(
        self,
        *,
        path: Path,
        dataset_name: str,
        unit_ids: np.ndarray,
        ends: np.ndarray,
        divisor: float,
        integer_stored: bool,
        obs_intervals: list[np.ndarray] | None,
        policy: ProblemPolicy,
        chunk_spikes: int,
    ) -> None:
        self.path = path
        self.dataset_name = dataset_name
        self.unit_ids = unit_ids
        self.ends = ends
        self.divisor = divisor
        self.integer_stored = integer_stored
        self.obs_intervals = obs_intervals
        self.policy = policy
        self.chunk_spikes = max(1, int(chunk_spikes))
        self.counts: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ends)

    def __getitem__(self, row):  # type: ignore[override]
        if isinstance(row, slice):
            start, stop, step = row.indices(len(self))
            if step == 1:
                return self.read(start, stop) if start < stop else []
            return [self[one] for one in range(start, stop, step)]
        row = int(row) + len(self) if int(row) < 0 else int(row)
        if not 0 <= row < len(self):
            raise IndexError(f"unit row {row} outside the {len(self)} units of {self.path}")
        return self.read(row, row + 1)[0]

    def __iter__(self) -> Iterator[np.ndarray]:
        for _, trains in self.blocks():
            yield from trains

    def block_rows(self, max_units: int | None = None, align: int = 1) -> list[tuple[int, int]]:
        """Split the table rows into consecutive blocks of at most ``chunk_spikes`` stored spike times and ``max_units`` units.

        Blocks end on multiples of ``align`` rows where their limits allow, so that
        a writer whose chunks hold ``align`` neurons fills whole chunks.
        """
        blocks = []
        start = 0
        while start < len(self.ends):
            first_value = self.ends[start - 1] if start else 0
            stop = int(np.searchsorted(self.ends, first_value + self.chunk_spikes, side="right"))
            if max_units is not None:
                stop = min(stop, start + max(1, max_units))
            aligned = stop // align * align
            stop = aligned if aligned > start and stop < len(self.ends) else stop
            stop = max(stop, start + 1)
            blocks.append((start, stop))
            start = stop
        return blocks

    def blocks(self, max_units: int | None = None, align: int = 1) -> Iterator[tuple[int, list[np.ndarray]]]:
        """Yield the first table row of each block and the block's sanitised trains, in seconds; see :meth:`block_rows`."""
        with h5py.File(self.path, "r") as file:
            dataset = file[self.dataset_name]
            for start, stop in self.block_rows(max_units, align):
                trains, _ = self._sanitised(dataset, start, stop, ProblemHandler(self.policy, collect=True))
                yield start, trains

    def read(self, start: int, stop: int) -> list[np.ndarray]:
        """Return the sanitised trains of table rows ``start`` to ``stop``."""
        with h5py.File(self.path, "r") as file:
            return self._sanitised(file[self.dataset_name], start, stop, ProblemHandler(self.policy, collect=True))[0]

    def scan(self, handler: ProblemHandler) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
        """Read every block once, reporting its problems to ``handler``.

        Returns
        -------
        counts, spans, repairs
            Spikes kept per unit, (n_units, 2) first and last spike time per unit in
            seconds (NaN for an empty unit), and the summed repair counts.
        """
        counts = np.zeros(len(self), dtype=np.int64)
        spans = np.full((len(self), 2), np.nan)
        repairs: Counter[str] = Counter()
        blocks = self.block_rows()
        logger.info("%s: reading %d spike times in %d blocks of units", self.path, int(self.ends[-1]), len(blocks))
        with h5py.File(self.path, "r") as file:
            dataset = file[self.dataset_name]
            for start, stop in blocks:
                trains, block_repairs = self._sanitised(dataset, start, stop, handler)
                counts[start:stop] = [len(train) for train in trains]
                spans[start:stop] = _train_spans(trains)
                repairs.update(block_repairs)
        self.counts = counts
        return counts, spans, dict(repairs)

    def _sanitised(
        self, dataset: h5py.Dataset, start: int, stop: int, handler: ProblemHandler
    ) -> tuple[list[np.ndarray], dict[str, int]]:
        """Read rows ``start`` to ``stop`` with one slice, convert them to seconds and sanitise them."""
        first = int(self.ends[start - 1]) if start else 0
        ends = self.ends[start:stop] - first
        values = np.asarray(dataset[first : int(self.ends[stop - 1])], dtype=np.float64)
        if self.divisor != 1.0:
            values /= self.divisor

        intervals = None if self.obs_intervals is None else self.obs_intervals[start:stop]
        return _sanitise_trains(
            self.path,
            self.unit_ids[start:stop],
            np.split(values, ends[:-1]),
            handler,
            integer_stored=self.integer_stored,
            obs_intervals=intervals,
        )


# --- region columns --------------------------------------------------------------


@dataclass(frozen=True)
class _Region:
    """Rows that one region column of the Units table links each unit to."""

    table: DynamicTable
    rows: list[np.ndarray]


def _read_region(path: Path, units: DynamicTable, column: str, unit_ids: np.ndarray, handler: ProblemHandler) -> _Region:
    """Read a region column (ragged or one row per unit) through its raw row indices."""
    if column not in units.colnames:
        raise DataError(
            f"{path}: the Units table has no column {column!r}; its columns are {_format_names(units.colnames)}"
        )

    values = units[column]
    all_ids = np.asarray(units.id.data[:], dtype=np.int64)
    if isinstance(values, VectorIndex) and isinstance(values.target, DynamicTableRegion):
        region = values.target
        flat_rows = np.asarray(region.data[:], dtype=np.int64)
        ends = np.asarray(values.data[:], dtype=np.int64)
        _check_index(path, column, ends, len(flat_rows), all_ids)
        rows = np.split(flat_rows, ends[:-1])
    elif isinstance(values, DynamicTableRegion):
        region = values
        flat_rows = np.asarray(region.data[:], dtype=np.int64)
        if flat_rows.shape != all_ids.shape:
            raise DataError(
                f"{path}: units column {column!r} has shape {flat_rows.shape}, expected one row index per unit "
                f"({len(all_ids)})"
            )
        rows = [flat_rows[i : i + 1] for i in range(len(flat_rows))]
    else:
        raise DataError(
            f"{path}: units column {column!r} does not link to another table (it is not a DynamicTableRegion); "
            f"use units.{column} as the label source"
        )

    rows = _rows_inside(path, column, region.table, rows[: len(unit_ids)], unit_ids, handler)
    return _Region(table=region.table, rows=rows)


def _rows_inside(
    path: Path,
    column: str,
    table: DynamicTable,
    rows: list[np.ndarray],
    unit_ids: np.ndarray,
    handler: ProblemHandler,
) -> list[np.ndarray]:
    """Report links to rows outside the linked table, and return each unit's rows without them."""
    n_rows = len(table)
    outside = [(unit_rows < 0) | (unit_rows >= n_rows) for unit_rows in rows]
    counts = _count_per_row([np.count_nonzero(mask) for mask in outside])
    if not counts:
        return rows

    row = next(iter(counts))
    bad_row = int(rows[row][outside[row]][0])
    ids = [int(unit_ids[one]) for one in counts]
    handler.report(
        Problem(
            kind="region_out_of_bounds",
            description=(
                f"{path}: unit {unit_ids[row]} links through {column!r} to row {bad_row} of {table.name}, which has rows "
                f"0 to {n_rows - 1} ({sum(counts.values())} such links in units {format_ids(ids)})"
            ),
            repair="those links are dropped",
            fix=(
                "the file is damaged, so export or download it again, or set "
                f"{setting('region_out_of_bounds', 'warn')} in the recipe to drop those links"
            ),
            neurons=[str(unit_id) for unit_id in ids],
            count=sum(counts.values()),
            table=f"units.{column}",
        )
    )
    return [unit_rows[~mask] for unit_rows, mask in zip(rows, outside)]


# --- positions ---------------------------------------------------------------------


def _unit_positions(path: Path, units: DynamicTable, unit_ids: np.ndarray, handler: ProblemHandler) -> tuple[np.ndarray, str]:
    """Return (n_units, 3) finite positions and where they came from.

    Tried in order: the ``unit_x/unit_y/unit_z`` columns ("unit_xyz"), the mean ``x/y/z``
    of each unit's electrodes ("electrode_xyz"), the row of each unit's first electrode
    ("electrode_row"), and the unit's own row ("unit_row"). One source serves all units,
    so that positions stay comparable: when any unit links to no electrode, every unit
    gets its own row.
    """
    positions = _unit_xyz(path, units, len(unit_ids))
    if positions is not None:
        return positions, "unit_xyz"

    n_units = len(unit_ids)
    if "electrodes" not in units.colnames:
        warning = f"{path}: units have no unit_x/y/z columns and no electrodes column, so positions are unit row numbers"
        handler.report(
            Problem(
                kind="unlinked_units",
                description=f"{path}: the Units table has no electrodes column and no unit_x/y/z columns",
                repair="positions are unit row numbers",
                fix=(
                    "add the electrodes column or unit_x/y/z to the file, or set "
                    f"{setting('unlinked_units', 'warn')} in the recipe to use unit row numbers"
                ),
                neurons=[str(int(unit_id)) for unit_id in unit_ids],
                count=n_units,
                table="units",
            ),
            warnings=[warning],
        )
        return _row_positions(np.arange(n_units)), "unit_row"

    region = _read_region(path, units, "electrodes", unit_ids, handler)
    unlinked = [int(unit_id) for unit_id, rows in zip(unit_ids, region.rows) if rows.size == 0]
    if unlinked:
        warning = f"{path}: units {format_ids(unlinked)} link to no electrode, so positions of all units are unit row numbers"
        handler.report(
            Problem(
                kind="unlinked_units",
                description=f"{path}: {len(unlinked)} of {n_units} units link to no electrode (unit ids {format_ids(unlinked)})",
                repair="positions of all units are unit row numbers, and their electrode labels are empty",
                fix=(
                    "link every unit to its electrodes in the file, or set "
                    f"{setting('unlinked_units', 'warn')} in the recipe to use unit row numbers"
                ),
                neurons=[str(unit_id) for unit_id in unlinked],
                count=len(unlinked),
                table="units",
            ),
            warnings=[warning],
        )
        return _row_positions(np.arange(n_units)), "unit_row"

    positions = _electrode_xyz(path, region)
    if positions is not None:
        return positions, "electrode_xyz"

    logger.warning(
        "%s: electrodes have no x/y/z columns with finite values, "
        "so positions are the row numbers of each unit's first electrode",
        path,
    )
    return _row_positions(np.array([rows[0] for rows in region.rows])), "electrode_row"


def _unit_xyz(path: Path, units: DynamicTable, n_units: int) -> np.ndarray | None:
    """Return the ``unit_x/unit_y/unit_z`` columns of the first units as (n_units, 3), or None when absent or not finite."""
    names = ("unit_x", "unit_y", "unit_z")
    if not all(name in units.colnames for name in names):
        return None

    try:
        positions = np.column_stack([np.asarray(units[name].data[:n_units], dtype=np.float64) for name in names])
    except (TypeError, ValueError):
        logger.warning("%s: unit_x/y/z are not numbers, so positions come from the electrodes", path)
        return None
    if not np.isfinite(positions).all():
        logger.warning("%s: unit_x/y/z contain non-finite values, so positions come from the electrodes", path)
        return None
    return positions


def _electrode_xyz(path: Path, region: _Region) -> np.ndarray | None:
    """Return the mean ``x/y/z`` of each unit's electrodes, or None when absent or not finite."""
    names = ("x", "y", "z")
    if not all(name in region.table.colnames for name in names):
        return None

    try:
        electrode_xyz = np.column_stack([np.asarray(region.table[name].data[:], dtype=np.float64) for name in names])
    except (TypeError, ValueError):
        logger.info("%s: electrode x/y/z are not numbers", path)
        return None
    positions = np.array([electrode_xyz[rows].mean(axis=0) for rows in region.rows])
    if not np.isfinite(positions).all():
        logger.info("%s: electrode x/y/z contain non-finite values for some units", path)
        return None
    return positions


def _row_positions(rows: np.ndarray) -> np.ndarray:
    """Return positions ``(row, 0, 0)`` for table row numbers."""
    positions = np.zeros((len(rows), 3), dtype=np.float64)
    positions[:, 0] = rows
    return positions


# --- labels ----------------------------------------------------------------------------


def _read_label(
    path: Path,
    units: DynamicTable,
    unit_ids: np.ndarray,
    name: str,
    spec: LabelSpec,
    handler: ProblemHandler,
) -> np.ndarray:
    """Return one label string per unit, ``""`` where the unit has no value.

    Missing, empty and ``unknown`` values (see :func:`~neurpir_nwb.io.problems.is_missing_label`)
    become ``""`` and are reported as one ``missing_labels`` problem.
    """
    if spec.region_column is None:
        values = _column_text(path, units, spec.column)[: len(unit_ids)]
    else:
        if spec.region_column not in units.colnames:
            raise DataError(
                f"{path}: label {name!r} comes from {spec.source}, but the Units table has no "
                f"{spec.region_column!r} column to link units to another table; "
                "use a units.<column> source or an annotation table instead"
            )
        region = _read_region(path, units, spec.region_column, unit_ids, handler)
        table_values = _column_text(path, region.table, spec.column)
        values = [_most_common([table_values[row] for row in rows]) for rows in region.rows]

    if spec.field is not None:
        values = [parse_structured_location(value).get(spec.field, "") for value in values]
    values = ["" if is_missing_label(value) else value for value in values]

    missing = [int(unit_id) for unit_id, value in zip(unit_ids, values) if not value]
    if missing:
        where = spec.source if spec.field is None else f"the {spec.field!r} field of {spec.source}"
        handler.report(
            Problem(
                kind="missing_labels",
                description=(
                    f"{path}: label {name!r} is empty for {len(missing)} of {len(values)} units "
                    f"(unit ids {format_ids(missing)}) because {where} is missing, empty or 'unknown' there"
                ),
                repair="they stay unlabelled; they train, and the probe leaves them out",
                fix=(
                    f"fill in {spec.source} in the file or give the label in an annotation table, or set "
                    f"{setting('missing_labels', 'warn')} in the recipe to leave them unlabelled"
                ),
                neurons=[str(unit_id) for unit_id in missing],
                count=len(missing),
                table="units",
            )
        )

    return np.asarray(values, dtype=str)


def _column_text(path: Path, table: DynamicTable, column: str) -> list[str]:
    """Read one value per row of a table column as stripped text."""
    if column not in table.colnames:
        raise DataError(
            f"{path}: the {table.name} table has no column {column!r}; "
            f"its columns are {_format_names(table.colnames)}"
        )

    values = table[column]
    target = values.target if isinstance(values, VectorIndex) else values
    if isinstance(target, DynamicTableRegion):
        raise DataError(
            f"{path}: column {column!r} of {table.name} links to rows of {target.table.name}; "
            f"name a column of that table, for example units.{column}.location"
        )
    if isinstance(values, VectorIndex) or np.ndim(values.data) != 1:
        raise DataError(
            f"{path}: column {column!r} of {table.name} contains several values per row; "
            "a label needs one value per row"
        )

    return [_to_text(value) for value in values.data[:]]


def _to_text(value: object) -> str:
    """Turn one stored value into stripped text, decoding bytes; missing numbers become ``""``."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace").strip()
    if isinstance(value, AbstractContainer):
        return str(value.name).strip()
    if isinstance(value, (float, np.floating)) and not np.isfinite(value):
        return ""
    return str(value).strip()


def _most_common(values: Sequence[str]) -> str:
    """Return the most common value that is not missing; ties go to the value that comes first."""
    counts = Counter(value for value in values if not is_missing_label(value))
    if not counts:
        return ""

    top = max(counts.values())
    return next(value for value in values if counts.get(value) == top)


def _parse_label_source(source: str) -> tuple[str | None, str]:
    """Split a label source into (region column or None, column)."""
    parts = source.split(".")
    if any(not part for part in parts):
        parts = []

    if len(parts) == 2 and parts[0] == "units":
        return None, parts[1]
    if len(parts) == 2 and parts[0] == "electrodes":
        return "electrodes", parts[1]
    if len(parts) == 3 and parts[0] == "units":
        return parts[1], parts[2]

    raise RecipeError(
        f"label source {source!r} is invalid; use units.<column>, electrodes.<column> "
        "or units.<region column>.<column>"
    )


# --- log helpers -------------------------------------------------------------------


def _count_per_row(counts: Sequence[int]) -> dict[int, int]:
    """Map table row to count, for the rows whose count is not zero."""
    return {row: int(count) for row, count in enumerate(counts) if count}


def _per_unit_lines(path: Path, message: str, unit_ids: np.ndarray, counts: dict[int, int]) -> list[str]:
    """Return ``message % count`` for each unit (by table row), up to MAX_LOGGED_UNITS, then one summary line."""
    items = list(counts.items())
    lines = [f"{path}: unit {unit_ids[row]}: " + message % count for row, count in items[:MAX_LOGGED_UNITS]]

    if len(items) > MAX_LOGGED_UNITS:
        rest = items[MAX_LOGGED_UNITS:]
        lines.append(f"{path}: {len(rest)} more units: " + message % sum(count for _, count in rest))
    return lines


def _format_names(names: Sequence[str]) -> str:
    """Return column names as ``"a, b, c"``."""
    return ", ".join(str(name) for name in names)
