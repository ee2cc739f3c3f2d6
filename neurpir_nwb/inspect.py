"""Inspect NWB files before a run: what a recipe would load, and every data problem in them.

:func:`inspect_sources` takes local files, folders and DANDI references (streamed, never
downloaded) and returns one :class:`FileReport` per file. A report gives the
modality, the neurons of each table with their time span and rate, and the labels
and positions found. It also lists every data problem with its count, the neurons it
affects and the action that the recipe's problem policy takes.

Reading is lazy. The readers' own checks run on the values that inspection needs,
which are the spike times, the trace timestamps, small label columns and region
indices, and on the shapes of the rest. Spike times are checked on the first
MAX_INSPECT_SPIKES values, timestamps on the first MAX_INSPECT_TIMESTAMPS samples and
traces on their first MAX_INSPECT_SAMPLES values. Image masks are never read.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from hdmf.common import VectorIndex
from pynwb import NWBHDF5IO, NWBFile, TimeSeries
from pynwb.ophys import PlaneSegmentation, RoiResponseSeries

from neurpir_nwb.errors import DataError, SourceError
from neurpir_nwb.io import ophys as ophys_reader
from neurpir_nwb.io import units as units_reader
from neurpir_nwb.io.nwbfile import check_nwb_root, file_problems, open_hdf5, read_nwbfile
from neurpir_nwb.io.problems import UNREADABLE, Problem, ProblemHandler, format_ids, is_missing_label
from neurpir_nwb.io.timeseries import (
    check_same_time_base,
    checked_timestamps,
    nonfinite_samples_problem,
    raw_integer_problem,
    series_rate_hz,
    series_timestamps_s,
)
from neurpir_nwb.progress import count_noun
from neurpir_nwb.recipe import ProblemPolicy, Recipe, Source

__all__ = ["FileReport", "TableReport", "exit_status", "inspect_file", "inspect_recipe_sources", "inspect_sources", "inspect_stream"]

logger = logging.getLogger(__name__)

#: Spike times read per Units table; the trains of the units beyond are not checked.
MAX_INSPECT_SPIKES = 20_000_000

#: Trace values (frames times neurons) read per table to count NaN and infinite samples.
MAX_INSPECT_SAMPLES = 5_000_000

#: Sample times per series that are checked for NaN, order, regularity and a shared time base.
MAX_INSPECT_TIMESTAMPS = 5_000_000

#: Label columns with more distinct values than this are not listed as labels.
MAX_LABEL_CLASSES = 50

#: Values shown per label in the text report.
SHOWN_LABEL_VALUES = 6

_DANDI_PREFIX = re.compile(r"^\s*dandi:", re.IGNORECASE)


@dataclass
class TableReport:
    """Summary of the neurons that a reader would load from one table, and the problems found in it.

    Attributes
    ----------
    reader
        ``"units"``, ``"ophys"`` or ``"timeseries"``.
    table
        The Units table (``"units"``), the ophys series read, or the TimeSeries name glob.
    neurons
        Neurons in the table.
    checked_neurons
        Neurons whose spike trains or traces were checked; fewer than ``neurons``
        when the table is larger than the inspection budget.
    t_start_s, t_stop_s
        First and last spike, or first and last sample time, in seconds.
    rate_hz
        Mean firing rate per unit (Units tables), or the sampling rate of the traces;
        None for irregular samples.
    events
        Spike times (Units tables) or samples per trace (traces) that the reader would keep.
    positions
        Where the neurons' positions come from, such as ``"electrode_xyz"``.
    labels
        Label source to ``{"values": {value: count}, "missing": count}``.
    problems
        Data problems found in this table.
    details
        Further facts, such as the series names or the data shape.
    """

    reader: str
    table: str
    neurons: int = 0
    checked_neurons: int = 0
    t_start_s: float | None = None
    t_stop_s: float | None = None
    rate_hz: float | None = None
    events: int = 0
    positions: str = ""
    labels: dict[str, dict[str, Any]] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def modality(self) -> str:
        """``"ecephys"`` for Units tables, ``"ophys"`` for traces."""
        return "ecephys" if self.reader == "units" else "ophys"


@dataclass
class FileReport:
    """The inspection of one NWB file: its identity, its tables of neurons and its problems.

    ``error`` is set, and the rest is mostly empty, when the file cannot be loaded.
    """

    source: str
    policy: ProblemPolicy = field(default_factory=ProblemPolicy)
    nwb_version: str = ""
    identifier: str = ""
    session: str = ""
    subject: str = ""
    tables: list[TableReport] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    error: str | None = None

    @property
    def loadable(self) -> bool:
        """Whether pynwb reads the file as NWB 2.x."""
        return self.error is None

    @property
    def modality(self) -> str | None:
        """Modality of the first table of neurons, or None when the file has none."""
        return self.tables[0].modality if self.tables else None

    @property
    def all_problems(self) -> list[Problem]:
        """File-level problems first, then those of every table."""
        return self.problems + [problem for table in self.tables for problem in table.problems]

    @property
    def raised_problems(self) -> list[Problem]:
        """Problems that the policy raises for, so a run of the recipe would stop on them."""
        return [problem for problem in self.all_problems if problem.action(self.policy) == "raise"]

    @property
    def exit_status(self) -> int:
        """2 when the file cannot be loaded, 1 when the policy raises for one of its problems, else 0."""
        if not self.loadable:
            return 2
        return 1 if self.raised_problems else 0

    def to_dict(self) -> dict[str, Any]:
        """Return the report as plain values for JSON."""
        return {
            "source": self.source,
            "loadable": self.loadable,
            "error": self.error,
            "exit_status": self.exit_status,
            "nwb_version": self.nwb_version,
            "identifier": self.identifier,
            "session": self.session,
            "subject": self.subject,
            "modality": self.modality,
            "tables": [_table_dict(table, self.policy) for table in self.tables],
            "problems": [problem.to_dict(self.policy) for problem in self.problems],
            "raised_problems": len(self.raised_problems),
        }


def exit_status(reports: Sequence[FileReport]) -> int:
    """Return the exit status of ``neurpir-nwb inspect``: the highest of the reports' statuses."""
    return max((report.exit_status for report in reports), default=0)


def inspect_sources(
    sources: Sequence[str | Path],
    *,
    recipe: Recipe | None = None,
    globs: Sequence[str] = (),
    api_url: str | None = None,
) -> list[FileReport]:
    """Inspect local NWB files, folders of them (searched recursively) and DANDI references.

    Parameters
    ----------
    sources
        Paths, or references such as ``DANDI:000021/0.210913.1639`` whose assets are
        streamed over HTTP.
    recipe
        Recipe whose problem policy, reader options and labels apply; the defaults when None.
    globs
        Asset path globs that select the assets of DANDI references; all assets when empty.
    api_url
        REST API URL of the DANDI instance; see :func:`neurpir_nwb.dandi.resolve_api_url`.

    Returns
    -------
    list of FileReport
        One per file, in the order given (folders sorted by path).

    Raises
    ------
    SourceError
        When a path is missing or a folder holds no NWB file, or a DANDI reference is
        invalid or cannot be listed.
    """
    reports = []
    for source in sources:
        text = str(source)
        if _DANDI_PREFIX.match(text):
            reports.extend(_inspect_dandi(text, recipe=recipe, globs=globs, api_url=api_url))
            continue

        path = Path(source)
        if path.is_dir():
            files = sorted(path.rglob("*.nwb"))
            if not files:
                raise SourceError(f"folder {path} contains no .nwb file; give NWB files or a folder that contains them")
            reports.extend(inspect_file(one, recipe=recipe) for one in files)
        else:
            reports.append(inspect_file(path, recipe=recipe))
    return reports


def inspect_recipe_sources(recipe: Recipe) -> list[FileReport]:
    """Inspect the sources of a recipe: its local files, and the assets of its DANDI sources (streamed).

    Each source is read with its own reader options. Simulated sources are left out,
    since their files do not exist before a run.
    """
    reports = []
    for source in recipe.sources:
        if source.dandi is not None:
            globs = [str(source.path)] if source.path is not None else []
            reports.extend(_inspect_dandi(source.dandi, recipe=recipe, globs=globs, api_url=source.api_url, source=source))
        elif source.path is not None:
            reports.append(inspect_file((recipe.base_dir / source.path).resolve(), recipe=recipe, source=source))
    return reports


def inspect_file(path: str | Path, *, recipe: Recipe | None = None, source: Source | None = None) -> FileReport:
    """Inspect one local NWB file; a file that cannot be loaded gives a report with ``error`` set.

    ``source`` is the recipe entry whose reader options apply; by default the entry of
    this path, else the recipe's first file source.
    """
    path = Path(path)
    source = source if source is not None else _recipe_source(recipe, path)
    try:
        with open_hdf5(path) as h5file:
            return _inspect_hdf5(str(path), h5file, recipe=recipe, source=source)
    except SourceError as error:
        return FileReport(source=str(path), policy=_policy(recipe), error=str(error))


def inspect_stream(label: str, handle: Any, *, recipe: Recipe | None = None, source: Source | None = None) -> FileReport:
    """Inspect an NWB file from an open binary file object, such as a DANDI stream from :func:`neurpir_nwb.dandi.open_stream`."""
    source = source if source is not None else _recipe_source(recipe, None)
    try:
        h5file = h5py.File(handle, "r")
    except OSError as error:
        return FileReport(source=label, policy=_policy(recipe), error=f"{label} could not be read as an HDF5 file: {error}")

    try:
        return _inspect_hdf5(label, h5file, recipe=recipe, source=source)
    except SourceError as error:
        return FileReport(source=label, policy=_policy(recipe), error=str(error))
    finally:
        h5file.close()


def _inspect_dandi(
    text: str, *, recipe: Recipe | None, globs: Sequence[str], api_url: str | None, source: Source | None = None
) -> Iterator[FileReport]:
    """Stream and inspect each selected asset of a DANDI reference."""
    from neurpir_nwb import dandi

    ref = dandi.parse_dandi_ref(text)
    version, assets = dandi.list_assets(ref, globs, api_url=api_url, metadata=False)
    for asset in assets:
        label = f"DANDI:{ref.dandiset_id}/{version}/{asset.path}"
        if not asset.path.lower().endswith(".nwb"):
            logger.info("%s: skipped, not an .nwb asset", label)
            continue
        with dandi.open_stream(dandi.stream_url(asset)) as handle:
            yield inspect_stream(label, handle, recipe=recipe, source=source)


def _policy(recipe: Recipe | None) -> ProblemPolicy:
    """Return the recipe's problem policy with units.sort_spikes applied, or the default policy."""
    if recipe is None:
        return ProblemPolicy()
    return units_reader.units_policy(recipe.problems, recipe.units.sort_spikes)


def _recipe_source(recipe: Recipe | None, path: Path | None) -> Source | None:
    """Return the recipe's source entry for ``path``, else its first file source, else None."""
    if recipe is None:
        return None
    file_sources = [source for source in recipe.sources if source.path is not None and source.dandi is None]
    if path is not None:
        resolved = path.resolve()
        for source in file_sources:
            if (recipe.base_dir / source.path).resolve() == resolved:
                return source
    return file_sources[0] if file_sources else None


# --- one file ------------------------------------------------------------------------------------


def _inspect_hdf5(label: str, h5file: h5py.File, *, recipe: Recipe | None, source: Source | None) -> FileReport:
    """Inspect an open HDF5 file: the NWB checks, the file-level problems, then every table of neurons."""
    policy = _policy(recipe)
    report = FileReport(source=label, policy=policy)
    report.nwb_version = check_nwb_root(label, h5file)
    report.problems.extend(file_problems(label, h5file))

    try:
        io = NWBHDF5IO(file=h5file, mode="r")
    except Exception as error:  # pynwb and hdmf raise many types while building the type map.
        raise SourceError(f"{label} could not be opened by pynwb: {type(error).__name__}: {error}") from error
    with io:
        nwbfile = read_nwbfile(label, io)
        report.identifier = str(nwbfile.identifier)
        report.session = str(nwbfile.session_id or nwbfile.identifier)
        report.subject = "" if nwbfile.subject is None or nwbfile.subject.subject_id is None else str(nwbfile.subject.subject_id)
        report.tables.extend(_inspect_tables(label, nwbfile, recipe, source, policy))

    if not report.tables:
        report.problems.append(
            Problem(
                kind=UNREADABLE,
                description=f"{label} has no Units table, no RoiResponseSeries and no plain TimeSeries in acquisition",
                fix="a recipe has no neurons to load from it; choose a file with spike trains or ROI traces",
            )
        )
    return report


def _inspect_tables(
    label: str, nwbfile: NWBFile, recipe: Recipe | None, source: Source | None, policy: ProblemPolicy
) -> list[TableReport]:
    """Inspect the tables that the recipe's reader would read, or every kind of table the file has."""
    if source is not None and source.ophys is not None:
        readers = ["ophys"]
    elif source is not None and source.timeseries is not None:
        readers = ["timeseries"]
    elif source is not None:
        readers = ["units"]
    else:
        readers = _readers_present(nwbfile)

    tables = []
    for reader in readers:
        if reader == "units":
            tables.append(_guarded(label, "units", "units", lambda handler: _inspect_units(label, nwbfile, recipe, handler, policy), policy))
        elif reader == "ophys":
            options = source.ophys if source is not None else None
            tables.append(_guarded(label, "ophys", "RoiResponseSeries", lambda handler: _inspect_ophys(label, nwbfile, recipe, options, handler), policy))
        else:
            pattern = source.timeseries.pattern if source is not None and source.timeseries is not None else _guess_pattern(nwbfile)
            tables.append(_guarded(label, "timeseries", pattern or "*", lambda handler: _inspect_timeseries(label, nwbfile, pattern or "*", handler), policy))
    return tables


def _readers_present(nwbfile: NWBFile) -> list[str]:
    """Return the readers that have something to read in the file, without a recipe to choose one."""
    readers = []
    if nwbfile.units is not None and len(nwbfile.units.id) > 0:
        readers.append("units")
    if any(isinstance(obj, RoiResponseSeries) for obj in nwbfile.objects.values()):
        readers.append("ophys")
    if not readers and _guess_pattern(nwbfile) is not None:
        readers.append("timeseries")
    return readers


def _guarded(label: str, reader: str, table: str, inspect_table, policy: ProblemPolicy) -> TableReport:
    """Run one table's inspection; a DataError that no policy repairs becomes an ``unreadable`` problem of the table."""
    handler = ProblemHandler(policy, log=logger, collect=True)
    try:
        report = inspect_table(handler)
    except DataError as error:
        report = TableReport(reader=reader, table=table)
        if not handler.found or handler.found[-1].error_message != str(error):
            handler.found.append(Problem(kind=UNREADABLE, description=str(error), table=table))
    report.problems = handler.found
    return report


# --- Units tables ------------------------------------------------------------------------------


def _inspect_units(label: str, nwbfile: NWBFile, recipe: Recipe | None, handler: ProblemHandler, policy: ProblemPolicy) -> TableReport:
    """Inspect the Units table with the Units reader's own checks, reading at most MAX_INSPECT_SPIKES spike times."""
    label_specs = {}
    if recipe is not None:
        label_specs = {
            name: units_reader.LabelSpec(source=spec.from_, field=spec.field)
            for name, spec in recipe.labels.items()
            if spec.from_.split(".")[0] in ("units", "electrodes")
        }
    options = recipe.units if recipe is not None else None

    n_units = len(nwbfile.units.id)
    recording = units_reader.units_recording(
        label,
        nwbfile,
        handler,
        labels=label_specs,
        spike_times_unit=options.spike_times_unit if options is not None else "s",
        sampling_rate_hz=options.sampling_rate_hz if options is not None else None,
        max_spikes=MAX_INSPECT_SPIKES,
    )

    counts = recording.spike_counts
    span_s = recording.t_stop_s - recording.t_start_s
    report = TableReport(
        reader="units",
        table="units",
        neurons=n_units,
        checked_neurons=recording.n_neurons,
        t_start_s=recording.t_start_s,
        t_stop_s=recording.t_stop_s,
        rate_hz=float(counts.mean() / span_s) if span_s > 0 else None,
        events=int(counts.sum()),
        positions=recording.position_source,
        details={"unit_ids": format_ids(recording.unit_ids.tolist()), "obs_intervals": recording.obs_intervals_s is not None},
    )

    for name, values in recording.labels.items():
        report.labels[f"{name} ({label_specs[name].source})"] = _label_summary(values)
    for source in units_reader.label_sources(nwbfile):
        summary = _units_label_summary(label, nwbfile, recording.unit_ids, source, handler, recipe is None)
        if summary is not None:
            report.labels[source] = summary
    return report


def _units_label_summary(
    label: str, nwbfile: NWBFile, unit_ids: np.ndarray, source: str, handler: ProblemHandler, report_missing: bool
) -> dict[str, Any] | None:
    """Summarise one label source of the Units table; None when it has too many classes to be a label.

    Missing locations (sources whose column is ``location``) are reported as problems
    when no recipe names the labels.
    """
    spec = units_reader.LabelSpec(source=source)
    quiet = ProblemHandler(handler.policy, collect=True)
    try:
        values = units_reader._read_label(Path(label), nwbfile.units, unit_ids, source, spec, quiet)
    except DataError:
        return None

    summary = _label_summary(values)
    if len(summary["values"]) > MAX_LABEL_CLASSES:
        return None
    if report_missing and spec.column == "location":
        handler.found.extend(problem for problem in quiet.found if problem.kind == "missing_labels")

    # Structured strings such as "brain_region: ALM; cortical_layer: 5" are summarised per field.
    parsed = [units_reader.parse_structured_location(str(value)) for value in values if str(value)]
    if parsed and all(parsed):
        fields = list(dict.fromkeys(key for one in parsed for key in one))
        summary["fields"] = {
            key: _label_summary(np.array([one.get(key, "") if not is_missing_label(one.get(key, "")) else "" for one in parsed], dtype=object))
            for key in fields
        }
    return summary


def _label_summary(values: np.ndarray) -> dict[str, Any]:
    """Count each label value and the neurons without one."""
    counts = Counter(str(value) for value in values if str(value))
    return {"values": dict(counts.most_common()), "missing": int(sum(1 for value in values if not str(value)))}


# --- ophys -------------------------------------------------------------------------------------


def _inspect_ophys(label: str, nwbfile: NWBFile, recipe: Recipe | None, options, handler: ProblemHandler) -> TableReport:
    """Inspect the RoiResponseSeries the ophys reader would select, from their shapes, timestamps and a sample of values."""
    path = Path(label)
    selected = ophys_reader._select_series(path, nwbfile, options.source if options is not None else "auto", options.series if options is not None else None)
    available = sorted(ophys_reader._series_label(obj) for obj in nwbfile.objects.values() if isinstance(obj, RoiResponseSeries))

    columns = []
    layouts = []
    last_times_s = []
    shapes = {}
    for series in selected:
        series_label = ophys_reader._series_label(series)
        plane, rows, plane_ids = ophys_reader.series_rois(path, series)
        inside = ophys_reader.rois_inside(path, series_label, plane, rows, handler)

        shape = tuple(np.shape(series.data))
        if len(shape) == 1:
            shape = (shape[0], 1)
        n_timestamps = None if series.timestamps is None else len(series.timestamps)
        axis = ophys_reader.time_axis(path, series_label, shape, len(rows), n_timestamps, handler)
        n_frames = shape[axis]
        timestamps_s, last_s = _leading_times(path, series, n_frames)
        last_times_s.append(last_s)
        _check_integer_scale(label, series, handler)

        shapes[series_label] = list(shape)
        columns.append(
            ophys_reader._SeriesColumns(
                series=series,
                plane=plane,
                plane_path=ophys_reader._object_path(plane),
                rows=rows[inside],
                roi_ids=plane_ids[rows[inside]],
                traces=np.empty((0, 0), dtype=np.float32),
                timestamps_s=timestamps_s,
            )
        )
        layouts.append((axis, inside, n_frames))

    ophys_reader._check_unique_rois(path, columns)
    names = [ophys_reader._series_label(column.series) for column in columns]
    check_same_time_base(path, names, [column.timestamps_s for column in columns], allow_shift=True)

    roi_names = [f"ROI {roi_id} of {column.plane.name}" for column in columns for roi_id in column.roi_ids]
    stored = columns[0].series.timestamps is not None
    _, timestamps_s = checked_timestamps(path, names[0], columns[0].timestamps_s, roi_names, handler, stored=stored)
    n_frames = layouts[0][2]
    checked = _check_trace_samples(label, columns, layouts, roi_names, n_frames, handler)

    labels = {}
    if recipe is not None:
        for name, spec in recipe.labels.items():
            if spec.from_.startswith("rois."):
                values = ophys_reader._read_label(path, columns, name, spec.from_.split(".", 1)[1], handler)
                labels[f"{name} ({spec.from_})"] = _label_summary(values)
    planes = {id(column.plane): column.plane for column in columns}
    for plane in planes.values():
        labels.update(_plane_label_summaries(plane, columns))

    return TableReport(
        reader="ophys",
        table=", ".join(names),
        neurons=len(roi_names),
        checked_neurons=checked,
        t_start_s=float(timestamps_s[0]) if len(timestamps_s) else None,
        t_stop_s=last_times_s[0],
        rate_hz=series_rate_hz(columns[0].series, timestamps_s),
        events=n_frames,
        positions=", ".join(dict.fromkeys(_mask_kind(column.plane) for column in columns)),
        labels=labels,
        details={"series": names, "available_series": available, "shapes": shapes, "planes": sorted({column.plane.name for column in columns})},
    )


def _leading_times(path: Path, series: TimeSeries, n_samples: int) -> tuple[np.ndarray, float | None]:
    """Return the times in seconds of a series' first MAX_INSPECT_TIMESTAMPS samples, and the time of its last sample.

    The checks of the trace readers apply: stored timestamps must have one value per
    sample, and a series without them needs a positive rate.
    """
    if n_samples == 0:
        return np.zeros(0, dtype=np.float64), None
    if series.timestamps is None:
        leading_s = series_timestamps_s(path, series, min(n_samples, MAX_INSPECT_TIMESTAMPS))
        return leading_s, float(series.starting_time or 0.0) + (n_samples - 1) / float(series.rate)

    if len(series.timestamps) != n_samples:
        raise DataError(
            f"{path}: series {series.name!r} has {n_samples} samples but {len(series.timestamps)} timestamps; "
            "the file is damaged, so export it again"
        )
    leading_s = np.asarray(series.timestamps[:MAX_INSPECT_TIMESTAMPS], dtype=np.float64)
    return leading_s, float(series.timestamps[n_samples - 1])


def _check_integer_scale(label: str, series: TimeSeries, handler: ProblemHandler) -> None:
    """Report integer data with the default scale from the dtype alone."""
    dtype = np.dtype(getattr(series.data, "dtype", np.float64))
    conversion = float(series.conversion if series.conversion is not None else 1.0)
    offset = float(getattr(series, "offset", 0.0) or 0.0)
    if np.issubdtype(dtype, np.integer) and conversion == 1.0 and offset == 0.0:
        handler.report(raw_integer_problem(label, series.name, str(dtype), str(series.unit)))


def _check_trace_samples(
    label: str,
    columns: list,
    layouts: list[tuple[int, np.ndarray, int]],
    roi_names: list[str],
    n_frames: int,
    handler: ProblemHandler,
) -> int:
    """Count NaN and infinite samples in the first frames of every series that fit MAX_INSPECT_SAMPLES; return the neurons checked.

    ``layouts`` gives, per series, its time axis, the mask of the trace columns that
    link to a ROI, and its number of frames.
    """
    n_neurons = max(len(roi_names), 1)
    frames = max(1, min(n_frames, MAX_INSPECT_SAMPLES // n_neurons))
    nan_counts, inf_counts = [], []
    for column, (axis, inside, _) in zip(columns, layouts):
        data = column.series.data
        if np.ndim(data) == 1:
            block = np.asarray(data[:frames], dtype=np.float64)[:, np.newaxis]
        elif axis == 0:
            block = np.asarray(data[:frames], dtype=np.float64)
        else:
            block = np.asarray(data[:, :frames], dtype=np.float64).T
        block = block[:, inside]
        nan_counts.append(np.count_nonzero(np.isnan(block), axis=0))
        inf_counts.append(np.count_nonzero(np.isinf(block), axis=0))

    nan = np.concatenate(nan_counts) if nan_counts else np.zeros(0, dtype=np.int64)
    inf = np.concatenate(inf_counts) if inf_counts else np.zeros(0, dtype=np.int64)
    if np.any(nan + inf):
        handler.report(nonfinite_samples_problem(label, roi_names, nan, inf, frames))
    return len(roi_names)


def _plane_label_summaries(plane: PlaneSegmentation, columns: list) -> dict[str, dict[str, Any]]:
    """Summarise the PlaneSegmentation columns that could be labels, over the ROIs the series cover.

    A label column contains one text, bool or integer value per ROI, with at most
    MAX_LABEL_CLASSES distinct values. Mask columns are never read.
    """
    rows = np.concatenate([column.rows for column in columns if column.plane is plane])
    summaries = {}
    for name in plane.colnames:
        if name in ("image_mask", "pixel_mask", "voxel_mask"):
            continue
        values = plane[name]
        if isinstance(values, VectorIndex) or np.ndim(values.data) != 1 or len(values.data) == 0:
            continue
        if not isinstance(values.data[0], (str, bytes, bool, int, np.str_, np.bytes_, np.bool_, np.integer)):
            continue
        texts = np.array([units_reader._to_text(value) for value in values.data[:]], dtype=object)[rows]
        texts = np.array(["" if is_missing_label(text) else text for text in texts], dtype=object)
        summary = _label_summary(texts)
        if 0 < len(summary["values"]) <= MAX_LABEL_CLASSES:
            summaries[f"rois.{name} ({plane.name})"] = summary
    return summaries


def _mask_kind(plane: PlaneSegmentation) -> str:
    """Describe where the ROI positions come from, from the mask columns' shapes only."""
    for name, source in (("pixel_mask", "roi_centroid_px"), ("voxel_mask", "roi_centroid_voxels")):
        if name in plane.colnames:
            return f"{source} ({name})"
    if "image_mask" in plane.colnames:
        shape = tuple(np.shape(plane["image_mask"].data))
        source = "roi_centroid_voxels" if len(shape) == 4 else "roi_centroid_px"
        return f"{source} (image_mask of shape {shape})"
    return "row (no ROI masks)"


# --- plain TimeSeries -----------------------------------------------------------------------------


def _guess_pattern(nwbfile: NWBFile) -> str | None:
    """Return a glob over the acquisition TimeSeries that hold one trace each, such as ``"Activity_*"``.

    Names are grouped by their text before trailing digits; the largest group wins. A
    single series without digits is matched by its own name.
    """
    names = [
        name
        for name, obj in nwbfile.acquisition.items()
        if isinstance(obj, TimeSeries) and obj.data is not None and _single_trace_shape(np.shape(obj.data))
    ]
    if not names:
        return None

    groups = Counter(re.sub(r"\d+$", "", name) for name in names)
    prefix, count = groups.most_common(1)[0]
    if count == 1 and prefix in names:
        return prefix
    return f"{prefix}*"


def _single_trace_shape(shape: tuple[int, ...]) -> bool:
    """Tell whether a data shape fits one trace: (n,) or (n, 1), with n > 0."""
    return len(shape) in (1, 2) and shape[0] > 0 and (len(shape) == 1 or shape[1] == 1)


def _inspect_timeseries(label: str, nwbfile: NWBFile, pattern: str, handler: ProblemHandler) -> TableReport:
    """Inspect the acquisition TimeSeries whose names match ``pattern``, as the TimeSeries reader would read them."""
    path = Path(label)
    series_list = [
        nwbfile.acquisition[name]
        for name in sorted(nwbfile.acquisition)
        if fnmatch.fnmatchcase(name, pattern) and isinstance(nwbfile.acquisition[name], TimeSeries)
    ]
    if not series_list:
        available = ", ".join(sorted(nwbfile.acquisition)) or "none"
        raise DataError(f"{label}: no TimeSeries in acquisition matches {pattern!r}; the acquisition objects are {available}")

    names = [series.name for series in series_list]
    for series in series_list:
        shape = tuple(np.shape(series.data))
        if not _single_trace_shape(shape):
            raise DataError(
                f"{label}: TimeSeries {series.name!r} has data of shape {shape}, but each matched series must "
                "hold one neuron's trace; narrow the name pattern to the per-neuron series"
            )
        _check_integer_scale(label, series, handler)

    n_frames = int(np.shape(series_list[0].data)[0])
    leading = [_leading_times(path, series, int(np.shape(series.data)[0])) for series in series_list]
    timestamps_s = [times_s for times_s, _ in leading]
    check_same_time_base(path, names, timestamps_s)
    stored = series_list[0].timestamps is not None
    _, times_s = checked_timestamps(path, names[0], timestamps_s[0], names, handler, stored=stored)

    frames = max(1, min(n_frames, MAX_INSPECT_SAMPLES // len(names)))
    block = np.stack([np.asarray(series.data[:frames], dtype=np.float64).reshape(-1) for series in series_list], axis=1)
    nan = np.count_nonzero(np.isnan(block), axis=0)
    inf = np.count_nonzero(np.isinf(block), axis=0)
    if np.any(nan + inf):
        handler.report(nonfinite_samples_problem(label, names, nan, inf, frames))

    return TableReport(
        reader="timeseries",
        table=pattern,
        neurons=len(names),
        checked_neurons=len(names),
        t_start_s=float(times_s[0]) if len(times_s) else None,
        t_stop_s=leading[0][1],
        rate_hz=series_rate_hz(series_list[0], times_s),
        events=n_frames,
        positions="row (plain TimeSeries have no positions)",
        details={"series": format_ids(names), "pattern": pattern},
    )


# --- output ----------------------------------------------------------------------------------


def _table_dict(table: TableReport, policy: ProblemPolicy) -> dict[str, Any]:
    """Return a table report as plain values for JSON."""
    return {
        "reader": table.reader,
        "modality": table.modality,
        "table": table.table,
        "neurons": table.neurons,
        "checked_neurons": table.checked_neurons,
        "t_start_s": table.t_start_s,
        "t_stop_s": table.t_stop_s,
        "rate_hz": table.rate_hz,
        "events": table.events,
        "positions": table.positions,
        "labels": table.labels,
        "details": table.details,
        "problems": [problem.to_dict(policy) for problem in table.problems],
    }


def format_report(report: FileReport) -> list[str]:
    """Return the text report of one file, one line per fact and per problem."""
    lines = [report.source]
    if not report.loadable:
        lines.append(f"  not loadable: {report.error}")
        return lines

    lines.append(
        f"  NWB {report.nwb_version}, identifier {report.identifier}, session {report.session}, "
        f"subject {report.subject or '(none)'}"
    )
    lines.append(f"  modality: {report.modality or 'none (no table of neurons)'}")
    for table in report.tables:
        lines.extend(_format_table(table))

    problems = report.all_problems
    if not problems:
        lines.append("  problems: none")
    else:
        lines.append(f"  problems: {len(problems)}, of which {len(report.raised_problems)} stop a run under the policy")
        for problem in problems:
            action = problem.action(report.policy)
            text = problem.error_message if action == "raise" else problem.warning_message
            affected = f" ({count_noun(len(problem.neurons), 'neuron')})" if problem.neurons else ""
            lines.append(f"    [{action}] {problem.kind}{affected}: {text}")

    verdict = {0: "loadable", 1: "loadable, but the policy stops a run on the problems marked [raise]"}
    lines.append(f"  status: {verdict[report.exit_status]}")
    return lines


def _format_table(table: TableReport) -> list[str]:
    """Return the lines that describe one table of neurons."""
    span = ""
    if table.t_start_s is not None and table.t_stop_s is not None:
        span = f" from {table.t_start_s:.3f} to {table.t_stop_s:.3f} s"
    if table.reader == "units":
        rate = f", mean rate {table.rate_hz:.3g} Hz" if table.rate_hz is not None else ""
        summary = f"{count_noun(table.neurons, 'unit')}, {count_noun(table.events, 'spike')}{span}{rate}"
        if table.checked_neurons < table.neurons:
            summary += f" (spike trains of the first {table.checked_neurons} units checked)"
    else:
        rate = f" at {table.rate_hz:.4g} Hz" if table.rate_hz is not None else " at irregular times"
        summary = f"{count_noun(table.neurons, 'neuron')}, {table.events} samples per neuron{span}{rate}"

    lines = [f"  {table.reader} {table.table}: {summary}" if table.neurons else f"  {table.reader} {table.table}: not readable"]
    other_series = [name for name in table.details.get("available_series", []) if name not in table.details.get("series", [])]
    if other_series:
        lines.append(f"    other series (select them with ophys.series): {', '.join(other_series)}")
    if table.positions:
        lines.append(f"    positions: {table.positions}")
    if not table.labels:
        lines.append("    labels: none found")
    for source, summary in table.labels.items():
        if "fields" in summary:
            for key, field_summary in summary["fields"].items():
                lines.append(f"    label {source} field {key}: {_format_values(field_summary)}")
        else:
            lines.append(f"    label {source}: {_format_values(summary)}")
    return lines


def _format_values(summary: dict[str, Any]) -> str:
    """Return the most common values of a label with their counts, and the count of neurons without one."""
    shown = ", ".join(f"{value} {count}" for value, count in list(summary["values"].items())[:SHOWN_LABEL_VALUES])
    more = len(summary["values"]) - SHOWN_LABEL_VALUES
    if more > 0:
        shown += f" and {more} more"
    missing = f"; {summary['missing']} without a value" if summary["missing"] else ""
    return f"{shown or 'no values'}{missing}"

