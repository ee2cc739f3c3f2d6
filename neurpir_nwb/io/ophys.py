"""Read ROI response series (DfOverF or Fluorescence) into a :class:`TraceRecording`.

Series are found by type anywhere in the file, not by path. Each trace column is keyed
by its PlaneSegmentation and ROI id, so several imaging planes and series that cover a
subset of ROIs give one neuron per ROI. Positions are ROI centroids from the masks;
dense image masks are read a block of ROIs at a time, so memory stays bounded.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from hdmf.common import VectorIndex
from pynwb import NWBFile
from pynwb.ophys import DfOverF, Fluorescence, PlaneSegmentation, RoiResponseSeries

from neurpir_nwb.errors import DataError, RecipeError
from neurpir_nwb.io.nwbfile import open_nwb
from neurpir_nwb.io.problems import Problem, ProblemHandler, format_ids, is_missing_label, setting
from neurpir_nwb.io.timeseries import (
    check_same_time_base,
    checked_timestamps,
    clean_traces,
    file_identity,
    scaled_data,
    series_rate_hz,
    series_timestamps_s,
)
from neurpir_nwb.io.traces import TraceRecording
from neurpir_nwb.io.units import _to_text
from neurpir_nwb.recipe import ProblemPolicy

logger = logging.getLogger(__name__)

SOURCES = ("auto", "DfOverF", "Fluorescence")

# Series whose names contain these words hold neuropil or deconvolved signals, not the
# ROI traces; they are read only when named in ``series``.
SKIPPED_SERIES_WORDS = ("neuropil", "deconvolved")

# Number of ROIs per read of a dense image_mask column.
IMAGE_MASK_BLOCK_ROIS = 64


@dataclass
class _SeriesColumns:
    """The trace columns of one RoiResponseSeries and the ROIs they belong to."""

    series: RoiResponseSeries
    plane: PlaneSegmentation
    plane_path: str
    rows: np.ndarray
    roi_ids: np.ndarray
    traces: np.ndarray
    timestamps_s: np.ndarray


def read_ophys(
    path: str | Path,
    *,
    source: str = "auto",
    series: str | Sequence[str] | None = None,
    labels: Mapping[str, str] | None = None,
    problems: ProblemPolicy | None = None,
) -> TraceRecording:
    """Read ROI traces, ROI centroids and PlaneSegmentation labels from an NWB file.

    Parameters
    ----------
    path
        Local path of the NWB file. It is opened read-only.
    source
        ``"DfOverF"`` or ``"Fluorescence"`` reads the RoiResponseSeries inside that
        container. ``"auto"`` takes DfOverF when the file has it, else Fluorescence,
        else any RoiResponseSeries. Series named like neuropil or deconvolved signals
        are skipped unless named in ``series``.
    series
        Names of the RoiResponseSeries to read, as ``"<name>"`` or
        ``"<container>/<name>"`` (for example ``"Fluorescence/plane0"``). None selects
        them by ``source``.
    labels
        Label name to the PlaneSegmentation column that contains it, for example
        ``{"accepted": "Accepted"}``.
    problems
        Action per data problem; see :class:`~neurpir_nwb.recipe.ProblemPolicy`. By
        default traces stored as (ROIs, time) are transposed, NaN and infinite samples
        become NaN, and NaN or non-increasing timestamps raise.

    Returns
    -------
    TraceRecording
        One neuron per (PlaneSegmentation, ROI id) covered by the selected series.

    Raises
    ------
    SourceError
        When the file cannot be read as an NWB 2.x file.
    DataError
        When no series matches, or a series' data does not have one column per ROI in
        ``rois``, or its orientation is ambiguous. Also when two series cover the same
        ROI, the series do not share a time base, a label column is missing, or the
        policy raises for a data problem.
    RecipeError
        When ``source`` is not one of ``"auto"``, ``"DfOverF"``, ``"Fluorescence"``.
    """
    path = Path(path)
    labels = labels or {}
    if source not in SOURCES:
        raise RecipeError(f"ophys source {source!r} is invalid; use one of {', '.join(SOURCES)}")
    if isinstance(series, str):
        series = [series]

    handler = ProblemHandler(problems, log=logger)
    with open_nwb(path, handler=handler) as (io, nwbfile):
        selected = _select_series(path, nwbfile, source, series)
        columns = [_read_columns(path, one, handler) for one in selected]
        _check_unique_rois(path, columns)

        names = [_series_label(column.series) for column in columns]
        shifts_s = check_same_time_base(path, names, [c.timestamps_s for c in columns], allow_shift=True)
        _log_plane_shifts(path, names, shifts_s)

        roi_names = [f"ROI {roi_id} of {c.plane.name}" for c in columns for roi_id in c.roi_ids]
        stored = columns[0].series.timestamps is not None
        samples, timestamps_s = checked_timestamps(path, names[0], columns[0].timestamps_s, roi_names, handler, stored=stored)
        if samples is not None:
            for column in columns:
                column.traces = column.traces[:, samples]
        rate_hz = series_rate_hz(columns[0].series, timestamps_s)

        positions, position_source = _roi_positions(path, columns)
        label_values = {name: _read_label(path, columns, name, column, handler) for name, column in labels.items()}

        version = io.nwb_version[0] or ""
        identifier, session, subject = file_identity(nwbfile)

    traces = np.concatenate([column.traces for column in columns], axis=0)
    keep, traces, nan_counts, inf_counts, repairs = clean_traces(path, roi_names, traces, handler)

    plane_tables = np.concatenate([np.full(len(c.rows), c.plane_path) for c in columns])[keep]
    table = plane_tables[0] if len(set(plane_tables)) == 1 else _common_parent(plane_tables)

    return TraceRecording(
        path=path,
        identifier=identifier,
        session=session,
        subject=subject,
        table=str(table),
        roi_ids=np.concatenate([c.roi_ids for c in columns])[keep],
        rows=np.concatenate([c.rows for c in columns])[keep],
        series_names=np.concatenate([np.full(len(c.rows), c.series.name) for c in columns])[keep],
        traces=traces,
        timestamps_s=timestamps_s,
        rate_hz=rate_hz,
        positions=positions[keep],
        position_source=position_source,
        labels={name: values[keep] for name, values in label_values.items()},
        nwb_version=version,
        repairs=repairs,
        plane_tables=plane_tables,
        nan_counts=nan_counts,
        inf_counts=inf_counts,
        time_offsets_s=np.concatenate([np.full(len(c.rows), shift_s) for c, shift_s in zip(columns, shifts_s)])[keep],
    )


def _log_plane_shifts(path: Path, names: Sequence[str], shifts_s: np.ndarray) -> None:
    """Log each series whose samples are shifted from the first series' sample times."""
    for name, shift_s in zip(names, shifts_s):
        if shift_s:
            logger.info(
                "%s: series %r samples %.6g s after %r; its shift is kept in time_offsets_s",
                path,
                name,
                shift_s,
                names[0],
            )


# --- choosing the series -----------------------------------------------------------------------


def _container_kind(series: RoiResponseSeries) -> str:
    """Return ``"DfOverF"``, ``"Fluorescence"`` or ``"other"`` from the series' parent container."""
    if isinstance(series.parent, DfOverF):
        return "DfOverF"
    if isinstance(series.parent, Fluorescence):
        return "Fluorescence"
    return "other"


def _series_label(series: RoiResponseSeries) -> str:
    """Return ``"<container>/<name>"``, which distinguishes series of equal names."""
    parent = series.parent
    return f"{parent.name}/{series.name}" if parent is not None else series.name


def _select_series(
    path: Path,
    nwbfile: NWBFile,
    source: str,
    names: Sequence[str] | None,
) -> list[RoiResponseSeries]:
    """Return the RoiResponseSeries to read, by name or by ``source``."""
    found = [obj for obj in nwbfile.objects.values() if isinstance(obj, RoiResponseSeries)]
    found.sort(key=_series_label)
    if not found:
        raise DataError(
            f"{path} has no RoiResponseSeries, so it contains no ROI traces; "
            "read plain TimeSeries with the TimeSeries reader instead"
        )
    available = ", ".join(_series_label(one) for one in found)

    if source != "auto":
        found = [one for one in found if _container_kind(one) == source]

    if names is not None:
        return [_series_by_name(path, found, name, source, available) for name in names]

    usable = [one for one in found if not any(word in one.name.lower() for word in SKIPPED_SERIES_WORDS)]
    if source == "auto":
        for kind in ("DfOverF", "Fluorescence"):
            of_kind = [one for one in usable if _container_kind(one) == kind]
            if of_kind:
                return of_kind
    if not usable:
        raise DataError(
            f"{path} has no {'' if source == 'auto' else source + ' '}RoiResponseSeries of ROI traces "
            f"(the series are {available}); name the series to read with series"
        )
    return usable


def _series_by_name(
    path: Path,
    found: list[RoiResponseSeries],
    name: str,
    source: str,
    available: str,
) -> RoiResponseSeries:
    """Return the one series called ``name`` or ``"<container>/<name>"``."""
    matches = [one for one in found if name in (one.name, _series_label(one))]
    if not matches:
        within = "" if source == "auto" else f" in {source}"
        raise DataError(f"{path}: no RoiResponseSeries {name!r}{within}; the series are {available}")
    if len(matches) > 1:
        raise DataError(
            f"{path}: several RoiResponseSeries are called {name!r} "
            f"({', '.join(_series_label(one) for one in matches)}); name one as <container>/<name>"
        )
    return matches[0]


# --- traces of one series ------------------------------------------------------------------------


def _read_columns(path: Path, series: RoiResponseSeries, handler: ProblemHandler) -> _SeriesColumns:
    """Read one series' traces (one row per ROI) and map each column to its PlaneSegmentation row and ROI id."""
    label = _series_label(series)
    plane, rows, plane_ids = series_rois(path, series)
    inside = rois_inside(path, label, plane, rows, handler)

    data = scaled_data(path, series, handler)
    if data.ndim == 1:
        data = data[:, np.newaxis]
    timestamps = None if series.timestamps is None else np.asarray(series.timestamps[:], dtype=np.float64)
    if time_axis(path, label, data.shape, len(rows), None if timestamps is None else len(timestamps), handler) == 1:
        data = data.T
    timestamps_s = series_timestamps_s(path, series, data.shape[0])

    return _SeriesColumns(
        series=series,
        plane=plane,
        plane_path=_object_path(plane),
        rows=rows[inside],
        roi_ids=plane_ids[rows[inside]],
        traces=np.ascontiguousarray(data[:, inside].T),
        timestamps_s=timestamps_s,
    )


def series_rois(path: Path, series: RoiResponseSeries) -> tuple[PlaneSegmentation, np.ndarray, np.ndarray]:
    """Return the PlaneSegmentation of a series, the row each trace column links to, and the plane's ROI ids."""
    region = series.rois
    if region is None or not isinstance(region.table, PlaneSegmentation):
        raise DataError(
            f"{path}: RoiResponseSeries {_series_label(series)!r} has no rois linking it to a PlaneSegmentation, "
            "so its columns cannot be matched to ROIs; choose another series"
        )
    plane = region.table
    rows = np.asarray(region.data[:], dtype=np.int64).reshape(-1)
    plane_ids = np.asarray(plane.id.data[:], dtype=np.int64)
    return plane, rows, plane_ids


def rois_inside(path: Path, label: str, plane: PlaneSegmentation, rows: np.ndarray, handler: ProblemHandler) -> np.ndarray:
    """Report trace columns whose rois row lies outside the PlaneSegmentation; return the mask of the others."""
    n_rois = len(plane.id)
    inside = (rows >= 0) & (rows < n_rois)
    bad = np.flatnonzero(~inside)
    if bad.size:
        handler.report(
            Problem(
                kind="region_out_of_bounds",
                description=(
                    f"{path}: rois of {label!r} points at row {int(rows[bad[0]])} of {plane.name}, which has "
                    f"{n_rois} ROIs ({bad.size} such trace columns: {format_ids(bad.tolist())})"
                ),
                repair="those trace columns are left out",
                fix=(
                    "the file is damaged, so export it again, or set "
                    f"{setting('region_out_of_bounds', 'warn')} in the recipe to leave those columns out"
                ),
                neurons=[f"column {int(column)} of {label}" for column in bad],
                count=int(bad.size),
                table=label,
            )
        )
    return inside


def time_axis(
    path: Path, label: str, shape: tuple[int, ...], n_rois: int, n_timestamps: int | None, handler: ProblemHandler
) -> int:
    """Return the axis of a series' data that is time: 0 as NWB stores it, or 1 for data stored as (ROIs, time).

    Data stored as (ROIs, time) is reported as the ``transposed_traces`` problem.
    Only the shape is used, so no data is read.
    """
    if len(shape) != 2:
        raise DataError(f"{path}: RoiResponseSeries {label!r} has data of shape {shape}; expected (time, ROIs)")

    n_first, n_second = shape
    fits_stored = n_second == n_rois and (n_timestamps is None or n_first == n_timestamps)
    fits_transposed = n_first == n_rois and (n_timestamps is None or n_second == n_timestamps)

    if fits_stored and fits_transposed:
        raise DataError(
            f"{path}: RoiResponseSeries {label!r} has data of shape {shape} with {n_rois} ROIs, so it "
            "cannot be told whether time is the first or the second axis; store timestamps of a different "
            "length than the number of ROIs, or read a series with more frames than ROIs"
        )
    if fits_stored:
        return 0
    if fits_transposed:
        handler.report(
            Problem(
                kind="transposed_traces",
                description=(
                    f"{path}: RoiResponseSeries {label!r} stores data as (ROIs, time) with shape {shape}; "
                    "NWB expects (time, ROIs)"
                ),
                repair="it is transposed",
                fix=f"store the data as (time, ROIs) in the file, or set {setting('transposed_traces', 'warn')} in the recipe to transpose it",
                neurons=[f"column {column} of {label}" for column in range(n_rois)],
                count=n_rois,
                table=label,
            )
        )
        return 1
    if n_second != n_rois:
        raise DataError(
            f"{path}: RoiResponseSeries {label!r} has {n_second} columns in data (shape {shape}) but "
            f"{n_rois} ROIs in rois; the series must have one column per ROI, so export it again"
        )
    raise DataError(
        f"{path}: RoiResponseSeries {label!r} has {n_first} frames in data but {n_timestamps} timestamps; "
        "the file is damaged, so export it again"
    )


def _check_unique_rois(path: Path, columns: list[_SeriesColumns]) -> None:
    """Raise DataError when two selected series cover the same ROI of one PlaneSegmentation."""
    seen: dict[tuple[str, int], str] = {}
    for column in columns:
        for roi_id in column.roi_ids:
            key = (column.plane_path, int(roi_id))
            label = _series_label(column.series)
            if key in seen:
                raise DataError(
                    f"{path}: ROI {roi_id} of {column.plane.name} has traces in both {seen[key]!r} and "
                    f"{label!r}; choose one of them with series"
                )
            seen[key] = label


def _object_path(container: PlaneSegmentation) -> str:
    """Return the path of a container inside the file, from the HDF5 dataset of its ids."""
    name = getattr(container.id.data, "name", None)
    if isinstance(name, str):
        return name.rsplit("/", 1)[0].lstrip("/")

    parts = []
    node = container
    while node is not None and not isinstance(node, NWBFile):
        parts.append(node.name)
        node = node.parent
    return "/".join(reversed(parts))


def _common_parent(paths: Sequence[str]) -> str:
    """Return the longest folder path that all paths start with."""
    split = [str(one).split("/") for one in paths]
    common = []
    for parts in zip(*split):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    return "/".join(common)


# --- positions ---------------------------------------------------------------------------------


def _roi_positions(path: Path, columns: list[_SeriesColumns]) -> tuple[np.ndarray, str]:
    """Return the ROI centroids of every neuron and their source, or row positions when masks are missing.

    Pixel and image masks give ``(x, y, 0)`` in pixels; voxel masks and 3-D image
    masks give ``(x, y, z)`` in voxels.
    """
    centroids = []
    sources = set()
    centroid_cache: dict[str, tuple[np.ndarray, str] | None] = {}

    for column in columns:
        if column.plane_path not in centroid_cache:
            centroid_cache[column.plane_path] = _plane_centroids(path, column.plane)
        plane_centroids = centroid_cache[column.plane_path]
        if plane_centroids is None:
            sources.add("row")
            break
        centroids.append(plane_centroids[0][column.rows])
        sources.add(plane_centroids[1])

    n_neurons = sum(len(column.rows) for column in columns)
    if len(sources) == 1 and "row" not in sources:
        # NOTE: centroids of different imaging planes share one pixel grid here; the plane's depth is not added to z.
        return np.concatenate(centroids, axis=0), sources.pop()

    if len(sources) > 1 and "row" not in sources:
        logger.warning(
            "%s: some PlaneSegmentations have pixel masks and others voxel masks, so positions are neuron order",
            path,
        )
    positions = np.zeros((n_neurons, 3), dtype=np.float64)
    positions[:, 0] = np.arange(n_neurons)
    return positions, "row"


def _plane_centroids(path: Path, plane: PlaneSegmentation) -> tuple[np.ndarray, str] | None:
    """Return (n_rois, 3) weighted centroids of every ROI of a plane and their source, or None."""
    if "pixel_mask" in plane.colnames:
        centroids, source = _ragged_mask_centroids(plane, "pixel_mask", ("x", "y")), "roi_centroid_px"
    elif "voxel_mask" in plane.colnames:
        centroids, source = _ragged_mask_centroids(plane, "voxel_mask", ("x", "y", "z")), "roi_centroid_voxels"
    elif "image_mask" in plane.colnames:
        centroids, source = _image_mask_centroids(plane)
    else:
        logger.warning("%s: %s has no ROI masks, so positions are neuron order", path, plane.name)
        return None

    empty = np.flatnonzero(~np.isfinite(centroids).all(axis=1))
    if empty.size:
        ids = np.asarray(plane.id.data[:], dtype=np.int64)[empty]
        logger.warning(
            "%s: %s has ROIs with empty masks (ROI ids %s), so positions are neuron order",
            path,
            plane.name,
            ", ".join(str(roi_id) for roi_id in ids[:20]),
        )
        return None
    return centroids, source


def _ragged_mask_centroids(plane: PlaneSegmentation, column: str, axes: Sequence[str]) -> np.ndarray:
    """Return weighted centroids from a pixel or voxel mask, with one read of the values and the index."""
    index = plane[column]
    if not isinstance(index, VectorIndex):
        raise DataError(f"{plane.name}: {column} has no {column}_index, so it cannot be split into ROIs")

    values = np.asarray(index.target.data[:])
    ends = np.asarray(index.data[:], dtype=np.int64)
    n_rois = len(ends)
    roi_of_value = np.repeat(np.arange(n_rois), np.diff(np.concatenate(([0], ends))))

    weights = np.asarray(values["weight"], dtype=np.float64)
    total = np.bincount(roi_of_value, weights=weights, minlength=n_rois)
    centroids = np.zeros((n_rois, 3), dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        for axis, name in enumerate(axes):
            coordinate = np.asarray(values[name], dtype=np.float64)
            centroids[:, axis] = np.bincount(roi_of_value, weights=weights * coordinate, minlength=n_rois) / total
    centroids[total == 0] = np.nan
    return centroids


def _image_mask_centroids(plane: PlaneSegmentation) -> tuple[np.ndarray, str]:
    """Return weighted centroids from dense image masks, reading IMAGE_MASK_BLOCK_ROIS ROIs at a time.

    The NWB schema stores image_mask as (n_rois, num_x, num_y) or (n_rois, num_x,
    num_y, num_z), so x is axis 1 of the stored array, y axis 2 and z axis 3.
    """
    data = plane["image_mask"].data
    shape = np.shape(data)
    n_rois, grid = shape[0], shape[1:]
    centroids = np.zeros((n_rois, 3), dtype=np.float64)
    coordinates = [np.arange(size, dtype=np.float64) for size in grid]

    for start in range(0, n_rois, IMAGE_MASK_BLOCK_ROIS):
        block = np.asarray(data[start : start + IMAGE_MASK_BLOCK_ROIS])
        all_axes = tuple(range(1, block.ndim))
        total = block.sum(axis=all_axes, dtype=np.float64)

        with np.errstate(invalid="ignore", divide="ignore"):
            for axis, coordinate in enumerate(coordinates):
                other_axes = tuple(a for a in all_axes if a != axis + 1)
                profile = block.sum(axis=other_axes, dtype=np.float64)
                centroids[start : start + len(block), axis] = profile @ coordinate / total
        centroids[start : start + len(block)][total == 0] = np.nan

    source = "roi_centroid_voxels" if len(grid) == 3 else "roi_centroid_px"
    return centroids, source


# --- labels --------------------------------------------------------------------------------


def _read_label(path: Path, columns: list[_SeriesColumns], name: str, column_name: str, handler: ProblemHandler) -> np.ndarray:
    """Read one label per neuron from a PlaneSegmentation column; ``""`` where a plane lacks it or the value is missing."""
    values: list[str] = []
    lacking = []

    for column in columns:
        plane = column.plane
        if column_name not in plane.colnames:
            lacking.append(plane.name)
            values.extend([""] * len(column.rows))
            continue

        stored = plane[column_name]
        if isinstance(stored, VectorIndex) or np.ndim(stored.data) != 1:
            raise DataError(
                f"{path}: column {column_name!r} of {plane.name} contains several values per ROI; "
                f"label {name!r} needs one value per ROI"
            )
        texts = [_to_text(value) for value in stored.data[:]]
        values.extend(texts[row] for row in column.rows)

    if len(lacking) == len(columns):
        planes = ", ".join(dict.fromkeys(column.plane.name for column in columns))
        raise DataError(
            f"{path}: label {name!r} names column {column_name!r}, which {planes} does not have; "
            f"its columns are {', '.join(columns[0].plane.colnames)}"
        )
    if lacking:
        logger.warning(
            "%s: label %r is empty for the ROIs of %s, which have no column %r",
            path,
            name,
            ", ".join(dict.fromkeys(lacking)),
            column_name,
        )

    values = ["" if is_missing_label(value) else value for value in values]
    names = [f"ROI {roi_id} of {column.plane.name}" for column in columns for roi_id in column.roi_ids]
    missing = [neuron for neuron, value in zip(names, values) if not value]
    if missing:
        handler.report(
            Problem(
                kind="missing_labels",
                description=(
                    f"{path}: label {name!r} is empty for {len(missing)} of {len(values)} ROIs ({format_ids(missing)}) "
                    f"because column {column_name!r} is missing, empty or 'unknown' there"
                ),
                repair="they stay unlabelled; they train, and the probe leaves them out",
                fix=(
                    f"fill in {column_name!r} in the file or give the label in an annotation table, or set "
                    f"{setting('missing_labels', 'warn')} in the recipe to leave them unlabelled"
                ),
                neurons=missing,
                count=len(missing),
                table=column_name,
            )
        )
    return np.asarray(values, dtype=str)
