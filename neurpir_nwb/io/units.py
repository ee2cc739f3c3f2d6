"""Read an NWB Units table into a :class:`Recording`: spike trains, positions and labels.

Spike trains are read in bulk (the concatenated ``spike_times`` values and their
index, split in memory) and sanitised before any other stage reads them. Region
columns such as ``electrodes`` are read through their raw row indices, never through
pynwb's row access, which returns DataFrames.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from hdmf.common import DynamicTable, DynamicTableRegion, VectorIndex
from hdmf.container import AbstractContainer
from pynwb import NWBFile

from neurpir_nwb.errors import DataError, RecipeError
from neurpir_nwb.io.nwbfile import open_nwb
from neurpir_nwb.io.recording import Recording

logger = logging.getLogger(__name__)

# Per-unit warnings beyond this many units are summarised in one line.
MAX_LOGGED_UNITS = 20


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
) -> Recording:
    """Read the Units table of an NWB file, with sanitised spike trains, positions and labels.

    Non-finite and negative spike times are dropped, and equal consecutive times are
    kept. Each of these is logged per unit and counted in ``Recording.repairs``.
    Units left with no spikes are kept and listed in one warning.

    Parameters
    ----------
    path
        Local path of the NWB file. It is opened read-only.
    labels
        Label name to the place each unit's label is read from.
    sort_spikes
        Sort spike trains that descend, with a warning. When false, a descending
        train raises DataError.

    Returns
    -------
    Recording
        One neuron per row of the Units table, in table order.

    Raises
    ------
    SourceError
        When the file cannot be read as an NWB 2.x file.
    DataError
        When the file has no Units table or no ``spike_times``, when an index or
        region column is inconsistent, when a train descends and ``sort_spikes`` is
        false, or when a label source names a missing column.
    """
    path = Path(path)
    labels = labels or {}

    with open_nwb(path) as (io, nwbfile):
        units = _units_table(path, nwbfile)
        unit_ids = np.asarray(units.id.data[:], dtype=np.int64)

        raw_trains = _read_spike_trains(path, units, unit_ids)
        trains, repairs = _sanitise_trains(path, unit_ids, raw_trains, sort_spikes)

        positions, position_source = _unit_positions(path, units, unit_ids)
        label_values = {name: _read_label(path, units, unit_ids, name, spec) for name, spec in labels.items()}

        version = io.nwb_version[0] or ""
        identifier = str(nwbfile.identifier)
        session = str(nwbfile.session_id or identifier)
        subject = _subject_id(nwbfile)

    _warn_empty_units(path, unit_ids, trains)
    t_start_s, t_stop_s = _session_span_s(trains)

    return Recording(
        path=path,
        identifier=identifier,
        session=session,
        subject=subject,
        table="units",
        unit_ids=unit_ids,
        rows=np.arange(len(unit_ids), dtype=np.int64),
        spike_times=trains,
        positions=positions,
        position_source=position_source,
        labels=label_values,
        t_start_s=t_start_s,
        t_stop_s=t_stop_s,
        nwb_version=version,
        repairs=repairs,
    )


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


def _read_spike_trains(path: Path, units: DynamicTable, unit_ids: np.ndarray) -> list[np.ndarray]:
    """Read all spike trains with one read of the values and one of the index."""
    if "spike_times" not in units.colnames:
        raise DataError(f"{path}: the Units table has no spike_times column, so there are no spike trains to read")

    index = units["spike_times"]
    if not isinstance(index, VectorIndex):
        raise DataError(
            f"{path}: the Units table's spike_times has no spike_times_index, so it cannot be split into units"
        )

    times = np.asarray(index.target.data[:], dtype=np.float64)
    ends = np.asarray(index.data[:], dtype=np.int64)
    _check_index(path, "spike_times", ends, len(times), unit_ids)

    return np.split(times, ends[:-1])


def _sanitise_trains(
    path: Path,
    unit_ids: np.ndarray,
    trains: list[np.ndarray],
    sort_spikes: bool,
) -> tuple[list[np.ndarray], dict[str, int]]:
    """Drop non-finite and negative spike times, then check or sort the order of each train.

    Returns the trains and the counts of what changed, keyed ``nan_dropped`` (NaN and
    infinite values), ``negative_dropped``, ``units_sorted`` and ``equal_times_kept``.
    Counts that are zero are left out.
    """
    # Position of every kept value in its raw train, so that errors point at the stored data.
    positions = [np.arange(len(train)) for train in trains]

    trains, positions, nan_counts = _drop_spikes(trains, positions, [~np.isfinite(t) for t in trains], unit_ids)
    _warn_per_unit(path, "dropped %d non-finite spike times (NaN or inf)", nan_counts)

    trains, positions, negative_counts = _drop_spikes(trains, positions, [t < 0 for t in trains], unit_ids)
    _warn_per_unit(path, "dropped %d negative spike times, which look like sentinel values", negative_counts)

    trains, sorted_counts = _ascending_trains(path, unit_ids, trains, positions, sort_spikes)
    _warn_per_unit(path, "sorted its spike times, which descended %d times (sort_spikes is on)", sorted_counts)

    equal_counts = _count_per_unit(unit_ids, [np.count_nonzero(np.diff(t) == 0) for t in trains])
    _warn_per_unit(path, "kept %d duplicate spike times, each equal to the time before it", equal_counts)

    repairs = {
        "nan_dropped": sum(nan_counts.values()),
        "negative_dropped": sum(negative_counts.values()),
        "units_sorted": len(sorted_counts),
        "equal_times_kept": sum(equal_counts.values()),
    }
    return trains, {key: count for key, count in repairs.items() if count}


def _drop_spikes(
    trains: list[np.ndarray],
    positions: list[np.ndarray],
    drop_masks: list[np.ndarray],
    unit_ids: np.ndarray,
) -> tuple[list[np.ndarray], list[np.ndarray], dict[int, int]]:
    """Remove the masked spike times; return the trains, their raw positions and counts per unit."""
    kept_trains = [train[~mask] for train, mask in zip(trains, drop_masks)]
    kept_positions = [position[~mask] for position, mask in zip(positions, drop_masks)]
    counts = _count_per_unit(unit_ids, [np.count_nonzero(mask) for mask in drop_masks])
    return kept_trains, kept_positions, counts


def _ascending_trains(
    path: Path,
    unit_ids: np.ndarray,
    trains: list[np.ndarray],
    positions: list[np.ndarray],
    sort_spikes: bool,
) -> tuple[list[np.ndarray], dict[int, int]]:
    """Return the trains in ascending order and, per sorted unit, how many descents it had.

    Raises DataError at the first descending train when ``sort_spikes`` is false.
    """
    ordered: list[np.ndarray] = []
    descents_per_unit: dict[int, int] = {}

    for unit_id, train, position in zip(unit_ids, trains, positions):
        descents = np.flatnonzero(np.diff(train) < 0) + 1
        if descents.size == 0:
            ordered.append(train)
            continue

        if not sort_spikes:
            first = int(descents[0])
            raise DataError(
                f"{path}: spike times of unit {unit_id} descend at index {position[first]}, "
                f"from {float(train[first - 1])!r} to {float(train[first])!r} s, so they look trial-relative "
                "rather than session-relative. Store session-relative times, or opt in to sorting "
                "with sort_spikes: true in the recipe"
            )

        descents_per_unit[int(unit_id)] = int(descents.size)
        ordered.append(np.sort(train, kind="stable"))

    return ordered, descents_per_unit


def _warn_empty_units(path: Path, unit_ids: np.ndarray, trains: list[np.ndarray]) -> None:
    """Log one warning listing the units that have no spikes left."""
    empty_ids = [int(unit_id) for unit_id, train in zip(unit_ids, trains) if len(train) == 0]
    if not empty_ids:
        return

    logger.warning(
        "%s: %d of %d units have no spike times (unit ids %s); they are kept with all-zero activity",
        path,
        len(empty_ids),
        len(unit_ids),
        _format_ids(empty_ids),
    )


def _session_span_s(trains: list[np.ndarray]) -> tuple[float, float]:
    """Return the first and last spike time in seconds over the non-empty trains, or (0, 0)."""
    non_empty = [train for train in trains if len(train)]
    if not non_empty:
        return 0.0, 0.0
    return float(min(train[0] for train in non_empty)), float(max(train[-1] for train in non_empty))


# --- region columns --------------------------------------------------------------


@dataclass(frozen=True)
class _Region:
    """Rows that one region column of the Units table links each unit to."""

    table: DynamicTable
    rows: list[np.ndarray]


def _read_region(path: Path, units: DynamicTable, column: str, unit_ids: np.ndarray) -> _Region:
    """Read a region column (ragged or one row per unit) through its raw row indices."""
    if column not in units.colnames:
        raise DataError(
            f"{path}: the Units table has no column {column!r}; its columns are {_format_names(units.colnames)}"
        )

    values = units[column]
    if isinstance(values, VectorIndex) and isinstance(values.target, DynamicTableRegion):
        region = values.target
        flat_rows = np.asarray(region.data[:], dtype=np.int64)
        ends = np.asarray(values.data[:], dtype=np.int64)
        _check_index(path, column, ends, len(flat_rows), unit_ids)
        rows = np.split(flat_rows, ends[:-1])
    elif isinstance(values, DynamicTableRegion):
        region = values
        flat_rows = np.asarray(region.data[:], dtype=np.int64)
        if flat_rows.shape != unit_ids.shape:
            raise DataError(
                f"{path}: units column {column!r} has shape {flat_rows.shape}, expected one row index per unit "
                f"({len(unit_ids)})"
            )
        rows = [flat_rows[i : i + 1] for i in range(len(flat_rows))]
    else:
        raise DataError(
            f"{path}: units column {column!r} does not link to another table (it is not a DynamicTableRegion); "
            f"use units.{column} as the label source"
        )

    _check_region_rows(path, column, region.table, rows, unit_ids)
    return _Region(table=region.table, rows=rows)


def _check_region_rows(
    path: Path,
    column: str,
    table: DynamicTable,
    rows: list[np.ndarray],
    unit_ids: np.ndarray,
) -> None:
    """Raise DataError naming the first unit that links to a row outside the linked table."""
    n_rows = len(table)
    for unit_id, unit_rows in zip(unit_ids, rows):
        outside = unit_rows[(unit_rows < 0) | (unit_rows >= n_rows)]
        if outside.size:
            raise DataError(
                f"{path}: unit {unit_id} links through {column!r} to row {outside[0]} of {table.name}, "
                f"which has rows 0 to {n_rows - 1}; the file is damaged, so export or download it again"
            )


# --- positions ---------------------------------------------------------------------


def _unit_positions(path: Path, units: DynamicTable, unit_ids: np.ndarray) -> tuple[np.ndarray, str]:
    """Return (n_units, 3) finite positions and where they came from.

    Tried in order: the ``unit_x/unit_y/unit_z`` columns ("unit_xyz"), the mean ``x/y/z``
    of each unit's electrodes ("electrode_xyz"), the row of each unit's first electrode
    ("electrode_row"), and the unit's own row ("unit_row"). One source serves all units,
    so that positions stay comparable: when any unit links to no electrode, every unit
    gets its own row.
    """
    positions = _unit_xyz(path, units)
    if positions is not None:
        return positions, "unit_xyz"

    n_units = len(unit_ids)
    if "electrodes" not in units.colnames:
        logger.warning(
            "%s: units have no unit_x/y/z columns and no electrodes column, so positions are unit row numbers",
            path,
        )
        return _row_positions(np.arange(n_units)), "unit_row"

    region = _read_region(path, units, "electrodes", unit_ids)
    unlinked = [int(unit_id) for unit_id, rows in zip(unit_ids, region.rows) if rows.size == 0]
    if unlinked:
        logger.warning(
            "%s: units %s link to no electrode, so positions of all units are unit row numbers",
            path,
            _format_ids(unlinked),
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


def _unit_xyz(path: Path, units: DynamicTable) -> np.ndarray | None:
    """Return the ``unit_x/unit_y/unit_z`` columns as (n_units, 3), or None when absent or not finite."""
    names = ("unit_x", "unit_y", "unit_z")
    if not all(name in units.colnames for name in names):
        return None

    positions = np.column_stack([np.asarray(units[name].data[:], dtype=np.float64) for name in names])
    if not np.isfinite(positions).all():
        logger.warning("%s: unit_x/y/z contain non-finite values, so positions come from the electrodes", path)
        return None
    return positions


def _electrode_xyz(path: Path, region: _Region) -> np.ndarray | None:
    """Return the mean ``x/y/z`` of each unit's electrodes, or None when absent or not finite."""
    names = ("x", "y", "z")
    if not all(name in region.table.colnames for name in names):
        return None

    electrode_xyz = np.column_stack([np.asarray(region.table[name].data[:], dtype=np.float64) for name in names])
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


def _read_label(path: Path, units: DynamicTable, unit_ids: np.ndarray, name: str, spec: LabelSpec) -> np.ndarray:
    """Return one label string per unit, ``""`` where the unit has no value."""
    if spec.region_column is None:
        values = _column_text(path, units, spec.column)
    else:
        if spec.region_column not in units.colnames:
            raise DataError(
                f"{path}: label {name!r} comes from {spec.source}, but the Units table has no "
                f"{spec.region_column!r} column to link units to another table; "
                "use a units.<column> source or an annotation table instead"
            )
        region = _read_region(path, units, spec.region_column, unit_ids)
        table_values = _column_text(path, region.table, spec.column)
        values = [_most_common([table_values[row] for row in rows]) for rows in region.rows]

    if spec.field is not None:
        values = _structured_field(path, name, spec, values)

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
    """Return the most common non-empty value; ties go to the value that comes first."""
    counts = Counter(value for value in values if value)
    if not counts:
        return ""

    top = max(counts.values())
    return next(value for value in values if counts[value] == top)


def _structured_field(path: Path, name: str, spec: LabelSpec, values: list[str]) -> list[str]:
    """Replace each structured string with the value of ``spec.field``; warn when it is missing."""
    extracted = [parse_structured_location(value).get(spec.field, "") for value in values]

    missing = sum(1 for value, field_value in zip(values, extracted) if value and not field_value)
    if missing:
        logger.warning(
            "%s: label %r is empty for %d of %d units because their %s value has no %r field",
            path,
            name,
            missing,
            len(values),
            spec.source,
            spec.field,
        )
    return extracted


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


def _count_per_unit(unit_ids: np.ndarray, counts: Sequence[int]) -> dict[int, int]:
    """Map unit id to count, for the units whose count is not zero."""
    return {int(unit_id): int(count) for unit_id, count in zip(unit_ids, counts) if count}


def _warn_per_unit(path: Path, message: str, counts: dict[int, int]) -> None:
    """Log ``message % count`` for each unit, up to MAX_LOGGED_UNITS, then one summary line."""
    items = list(counts.items())
    for unit_id, count in items[:MAX_LOGGED_UNITS]:
        logger.warning("%s: unit %d: " + message, path, unit_id, count)

    if len(items) > MAX_LOGGED_UNITS:
        rest = items[MAX_LOGGED_UNITS:]
        logger.warning("%s: %d more units: " + message, path, len(rest), sum(count for _, count in rest))


def _format_ids(ids: Sequence[int]) -> str:
    """Return ids as ``"0, 2, 3"``, cut after MAX_LOGGED_UNITS with a count of the rest."""
    shown = ", ".join(str(unit_id) for unit_id in ids[:MAX_LOGGED_UNITS])
    if len(ids) > MAX_LOGGED_UNITS:
        shown += f" and {len(ids) - MAX_LOGGED_UNITS} more"
    return shown


def _format_names(names: Sequence[str]) -> str:
    """Return column names as ``"a, b, c"``."""
    return ", ".join(str(name) for name in names)
