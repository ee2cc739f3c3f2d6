"""The segment set: binned activity cut into windows, with each neuron's neighbours.

A segment set is an :class:`xarray.Dataset` with these variables:

``activity`` (neuron, window, patch, bin), float32
    Spike counts per bin. Window ``w`` of a neuron is the ``w``-th window of its
    session, so neurons of one session share their windows. Windows past the end of
    a shorter session are NaN and marked invalid.
``valid`` (neuron, window), bool
    Whether the window lies inside the neuron's session.
``window_start_s`` (neuron, window), float64
    Start of each window on the session clock, in seconds.
``neighbour`` (neuron, neighbour), int64
    Index along ``neuron`` of the k nearest neurons of the same session, nearest
    first; -1 pads sessions with fewer than k + 1 neurons.
``neighbour_distance`` (neuron, neighbour), float64
    Distance to each neighbour, in the unit of the positions.
``distance_bin`` (neuron, neighbour), int64
    Distance bin of each neighbour, from 1 to ``distance_bins - 1``; bin 0 is kept for
    the neuron itself.

Coordinates along ``neuron`` carry the neuron id, the session, the subject, the
source file, the table row, the position and every label (``label_<name>``).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import xarray as xr

from neurpir_nwb.errors import DataError, SourceError
from neurpir_nwb.io.recording import Recording
from neurpir_nwb.io.traces import TraceRecording

__all__ = [
    "SegmentSettings",
    "bin_spike_trains",
    "build_segment_set",
    "build_trace_segment_set",
    "save_segment_set",
    "load_segment_set",
    "neighbour_indices",
]

logger = logging.getLogger(__name__)

#: Attributes of a segment set that a model needs to segment new files the same way.
SETTING_ATTRS = ("bin_size_s", "bins_per_patch", "patches", "neighbours", "distance_bins")


class SegmentSettings:
    """Binning, window and neighbourhood settings, in the units the recipe uses."""

    def __init__(self, bin_size_s: float, bins_per_patch: int, patches: int, neighbours: int, distance_bins: int):
        if bin_size_s <= 0:
            raise ValueError(f"bin_size_s must be positive, got {bin_size_s} s")
        if distance_bins < 2:
            raise ValueError(f"distance_bins must be at least 2 (bin 0 is the neuron itself), got {distance_bins}")
        self.bin_size_s = float(bin_size_s)
        self.bins_per_patch = int(bins_per_patch)
        self.patches = int(patches)
        self.neighbours = int(neighbours)
        self.distance_bins = int(distance_bins)

    @property
    def window_bins(self) -> int:
        """Bins per window."""
        return self.bins_per_patch * self.patches

    @property
    def window_s(self) -> float:
        """Length of one window, in seconds."""
        return self.bin_size_s * self.window_bins

    @classmethod
    def from_attrs(cls, attrs: dict) -> SegmentSettings:
        """Read the settings back from a segment set's attributes."""
        return cls(**{name: attrs[name] for name in SETTING_ATTRS})

    def to_dict(self) -> dict:
        """Return the settings as plain numbers."""
        return {name: getattr(self, name) for name in SETTING_ATTRS}


def bin_spike_trains(
    spike_times: Sequence[np.ndarray], t_start_s: float, n_bins: int, bin_size_s: float
) -> np.ndarray:
    """Count spikes per bin for every neuron at once.

    Bin ``j`` covers ``[t_start_s + j * bin_size_s, t_start_s + (j + 1) * bin_size_s)``.
    The counting makes no assumption about the order of the spike times, and spikes
    outside the binned span are left out.

    Returns
    -------
    numpy.ndarray
        (n_neurons, n_bins) float32 spike counts.
    """
    n_neurons = len(spike_times)
    lengths = np.array([len(train) for train in spike_times], dtype=np.int64)
    if n_neurons == 0 or lengths.sum() == 0:
        return np.zeros((n_neurons, n_bins), dtype=np.float32)

    # One pass over all spikes of all neurons: a flat index neuron * n_bins + bin.
    times = np.concatenate([np.asarray(train, dtype=np.float64) for train in spike_times])
    neuron = np.repeat(np.arange(n_neurons), lengths)
    bins = np.floor((times - t_start_s) / bin_size_s)
    inside = np.isfinite(bins) & (bins >= 0) & (bins < n_bins)
    flat = neuron[inside] * n_bins + bins[inside].astype(np.int64)

    counts = np.bincount(flat, minlength=n_neurons * n_bins)
    return counts.reshape(n_neurons, n_bins).astype(np.float32)


def neighbour_indices(positions: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Find each neuron's k nearest other neurons.

    Ties are broken by row order, so units on one electrode (distance 0) keep a fixed
    order.

    Returns
    -------
    (indices, distances)
        Both (n_neurons, k). Missing neighbours, in groups of k or fewer neurons, have
        index -1 and distance NaN.
    """
    n_neurons = len(positions)
    indices = np.full((n_neurons, k), -1, dtype=np.int64)
    distances = np.full((n_neurons, k), np.nan, dtype=np.float64)
    if k == 0 or n_neurons < 2:
        return indices, distances

    # (n, n) pairwise distances; a neuron is never its own neighbour.
    diff = positions[:, None, :] - positions[None, :, :]
    pairwise = np.sqrt((diff**2).sum(-1))
    np.fill_diagonal(pairwise, np.inf)

    available = min(k, n_neurons - 1)
    order = np.argsort(pairwise, axis=1, kind="stable")[:, :available]
    indices[:, :available] = order
    distances[:, :available] = np.take_along_axis(pairwise, order, axis=1)
    return indices, distances


def distance_bin_edges(distances: np.ndarray, distance_bins: int) -> np.ndarray:
    """Choose the edges of the neighbour distance bins as quantiles of the observed distances.

    Bins 1 to ``distance_bins - 1`` then hold about equal numbers of neighbours.
    """
    observed = distances[np.isfinite(distances)]
    if observed.size == 0:
        return np.zeros(0, dtype=np.float64)
    quantiles = np.linspace(0, 1, distance_bins)[1:-1]
    return np.quantile(observed, quantiles)


def assign_distance_bins(distances: np.ndarray, edges: np.ndarray, distance_bins: int) -> np.ndarray:
    """Map neighbour distances to bins 1 to ``distance_bins - 1``; padding gets bin 0."""
    bins = 1 + np.searchsorted(edges, np.nan_to_num(distances, nan=0.0), side="right")
    bins = np.minimum(bins, distance_bins - 1)
    return np.where(np.isfinite(distances), bins, 0).astype(np.int64)


def build_segment_set(
    recordings: Sequence[Recording],
    settings: SegmentSettings,
    *,
    edges: np.ndarray | None = None,
) -> xr.Dataset:
    """Bin every recording, cut it into windows and find each neuron's neighbours.

    Parameters
    ----------
    recordings
        Readers' output, one per NWB table.
    settings
        Bin size, patch and window sizes, neighbours and distance bins.
    edges
        Distance-bin edges to reuse, for example a trained model's. By default they
        are computed from these recordings.

    Raises
    ------
    DataError
        When a recording is shorter than two windows, since a positive pair needs two
        windows of the same neuron.
    """
    if not recordings:
        raise SourceError("no recordings to segment; give at least one source file in the recipe")

    parts = [_segment_recording(recording, settings) for recording in recordings]
    return _stack_parts(recordings, parts, settings, edges, coords=_neuron_coords(recordings))


def _stack_parts(recordings, parts: list[dict], settings: SegmentSettings, edges: np.ndarray | None, *, coords: dict) -> xr.Dataset:
    """Pad every recording's windows to the longest one, stack them along `neuron` and bin the neighbour distances."""
    n_windows = max(part["activity"].shape[1] for part in parts)
    activity = np.concatenate([_pad(part["activity"], n_windows, np.nan) for part in parts])
    valid = np.concatenate([_pad(part["valid"], n_windows, False) for part in parts])
    window_start = np.concatenate([_pad(part["window_start_s"], n_windows, np.nan) for part in parts])

    # Neighbour indices are local to each recording; shift them to the stacked `neuron` axis.
    offsets = np.cumsum([0] + [recording.n_neurons for recording in recordings[:-1]])
    neighbour = np.concatenate(
        [np.where(part["neighbour"] >= 0, part["neighbour"] + offset, -1) for part, offset in zip(parts, offsets)]
    )
    distance = np.concatenate([part["distance"] for part in parts])
    if edges is None:
        edges = distance_bin_edges(distance, settings.distance_bins)
        distinct = np.unique(np.asarray(edges))
        if settings.neighbours and distinct.size < len(edges):
            logger.warning(
                "neighbour distances take few distinct values (bin edges %s), so %d of %d distance bins stay empty; "
                "positions may come from few electrodes",
                np.round(distinct, 3).tolist(),
                len(edges) - distinct.size,
                settings.distance_bins - 1,
            )
    distance_bin = assign_distance_bins(distance, np.asarray(edges, dtype=np.float64), settings.distance_bins)

    dataset = xr.Dataset(
        data_vars={
            "activity": (("neuron", "window", "patch", "bin"), activity, {"units": "spikes/bin"}),
            "valid": (("neuron", "window"), valid),
            "window_start_s": (("neuron", "window"), window_start, {"units": "s"}),
            "neighbour": (("neuron", "neighbour_rank"), neighbour),
            "neighbour_distance": (("neuron", "neighbour_rank"), distance),
            "distance_bin": (("neuron", "neighbour_rank"), distance_bin),
        },
        coords=coords,
        attrs={
            **settings.to_dict(),
            "window_s": settings.window_s,
            "distance_bin_edges": np.asarray(edges, dtype=np.float64),
            "modality": "ecephys",
            "activity_transform": "log1p",
        },
    )

    logger.info(
        "segment set: %d neurons from %d recordings, %d windows of %.2f s (%d patches x %d bins of %.3f s), %d neighbours",
        dataset.sizes["neuron"],
        len(recordings),
        int(valid.sum()),
        settings.window_s,
        settings.patches,
        settings.bins_per_patch,
        settings.bin_size_s,
        settings.neighbours,
    )
    return dataset


#: Most windows of one recording: 10 million windows of 1 s would span 116 days.
MAX_WINDOWS_PER_RECORDING = 10_000_000


def _segment_recording(recording: Recording, settings: SegmentSettings) -> dict[str, np.ndarray]:
    """Bin one recording and cut it into whole windows from the first spike on."""
    span_s = recording.t_stop_s - recording.t_start_s
    if not np.isfinite(span_s) or span_s / settings.window_s > MAX_WINDOWS_PER_RECORDING:
        raise DataError(
            f"{recording.path}: the session spans {span_s:.6g} s ({recording.t_start_s:.6g} to {recording.t_stop_s:.6g} s), "
            f"more than {MAX_WINDOWS_PER_RECORDING:,} windows of {settings.window_s:.3f} s; the spike times are probably "
            "not in seconds, so set units.spike_times_unit (and units.sampling_rate_hz) in the recipe"
        )
    n_windows = int(np.floor(span_s / settings.window_s + 1e-9))
    if n_windows < 2:
        raise DataError(
            f"{recording.path}: the session spans {span_s:.3f} s ({recording.t_start_s:.3f} to "
            f"{recording.t_stop_s:.3f} s), shorter than two windows of {settings.window_s:.3f} s; "
            "lower segments.bin_size_s, bins_per_patch or patches in the recipe"
        )

    n_bins = n_windows * settings.window_bins
    counts = bin_spike_trains(recording.spike_times, recording.t_start_s, n_bins, settings.bin_size_s)
    activity = counts.reshape(recording.n_neurons, n_windows, settings.patches, settings.bins_per_patch)

    window_start = recording.t_start_s + settings.window_s * np.arange(n_windows)
    neighbour, distance = neighbour_indices(recording.positions, settings.neighbours)
    return {
        "activity": activity,
        "valid": _observed_windows(recording, window_start, settings.window_s),
        "window_start_s": np.broadcast_to(window_start, (recording.n_neurons, n_windows)).copy(),
        "neighbour": neighbour,
        "distance": distance,
    }


def _observed_windows(recording: Recording, window_start_s: np.ndarray, window_s: float) -> np.ndarray:
    """Flag, per neuron and window, the windows that lie inside one of the neuron's obs_intervals.

    Every window is valid when the recording has no obs_intervals, and for a neuron
    whose interval list is empty.
    """
    valid = np.ones((recording.n_neurons, len(window_start_s)), dtype=bool)
    intervals_per_neuron = getattr(recording, "obs_intervals_s", None)
    if intervals_per_neuron is None:
        return valid

    window_stop_s = window_start_s + window_s
    for neuron, intervals in enumerate(intervals_per_neuron):
        if len(intervals) == 0:
            continue
        inside = (window_start_s[:, None] >= intervals[None, :, 0]) & (window_stop_s[:, None] <= intervals[None, :, 1])
        valid[neuron] = inside.any(axis=1)
    return valid


def _pad(array: np.ndarray, n_windows: int, fill) -> np.ndarray:
    """Pad axis 1 (windows) of ``array`` to ``n_windows`` with ``fill``."""
    missing = n_windows - array.shape[1]
    if missing == 0:
        return array
    widths = [(0, 0), (0, missing)] + [(0, 0)] * (array.ndim - 2)
    return np.pad(array, widths, constant_values=fill)


def _neuron_coords(recordings: Sequence[Recording]) -> dict[str, tuple]:
    """Collect the per-neuron coordinates of all recordings."""

    def stack(values_of) -> np.ndarray:
        return np.concatenate([np.asarray(values_of(recording)) for recording in recordings])

    def strings(values_of) -> np.ndarray:
        return np.array([str(value) for recording in recordings for value in values_of(recording)], dtype=object)

    label_names = sorted({name for recording in recordings for name in recording.labels})
    coords = {
        "neuron_id": ("neuron", strings(lambda r: r.neuron_ids)),
        "unit_id": ("neuron", stack(lambda r: r.unit_ids).astype(np.int64)),
        "table_row": ("neuron", stack(lambda r: r.rows).astype(np.int64)),
        "table": ("neuron", strings(lambda r: [r.table] * r.n_neurons)),
        "source": ("neuron", strings(lambda r: [str(r.path)] * r.n_neurons)),
        "identifier": ("neuron", strings(lambda r: [r.identifier] * r.n_neurons)),
        "session": ("neuron", strings(lambda r: [r.session] * r.n_neurons)),
        "subject": ("neuron", strings(lambda r: [r.subject] * r.n_neurons)),
        "x": ("neuron", stack(lambda r: r.positions[:, 0]).astype(np.float64)),
        "y": ("neuron", stack(lambda r: r.positions[:, 1]).astype(np.float64)),
        "z": ("neuron", stack(lambda r: r.positions[:, 2]).astype(np.float64)),
        "position_source": ("neuron", strings(lambda r: [r.position_source] * r.n_neurons)),
        "n_spikes": ("neuron", stack(lambda r: r.spike_counts).astype(np.int64)),
        "empty": ("neuron", stack(lambda r: r.empty).astype(bool)),
        "t_start_s": ("neuron", stack(lambda r: [r.t_start_s] * r.n_neurons).astype(np.float64)),
        "t_stop_s": ("neuron", stack(lambda r: [r.t_stop_s] * r.n_neurons).astype(np.float64)),
    }
    for name in label_names:
        coords[f"label_{name}"] = (
            "neuron",
            strings(lambda r, name=name: r.labels.get(name, np.full(r.n_neurons, "", dtype=object))),
        )
    return coords


def label_names(dataset: xr.Dataset) -> list[str]:
    """Return the names of the labels a segment set carries."""
    return [str(name)[len("label_") :] for name in dataset.coords if str(name).startswith("label_")]


def save_segment_set(dataset: xr.Dataset, path: str | Path) -> Path:
    """Write a segment set to netCDF (``.nc``) or zarr (``.zarr``), through a temporary name."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.partial")
    _remove(temporary)

    if path.suffix == ".zarr":
        dataset.to_zarr(temporary, mode="w", consolidated=False)
    elif path.suffix == ".nc":
        dataset.to_netcdf(temporary, engine="h5netcdf")
    else:
        raise ValueError(f"unknown segment set format {path.suffix!r} for {path}; use a .nc or .zarr path")

    _remove(path)
    temporary.rename(path)
    return path


def load_segment_set(path: str | Path) -> xr.Dataset:
    """Read a segment set written by :func:`save_segment_set` into memory."""
    path = Path(path)
    if not path.exists():
        raise SourceError(f"segment set {path} not found")
    if path.suffix == ".zarr":
        with xr.open_zarr(path, consolidated=False) as dataset:
            return dataset.load()
    with xr.open_dataset(path, engine="h5netcdf") as dataset:
        return dataset.load()


def _remove(path: Path) -> None:
    """Delete a file or a zarr folder if it exists."""
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def resample_traces(traces: np.ndarray, timestamps_s: np.ndarray, rate_hz: float) -> tuple[np.ndarray, np.ndarray]:
    """Resample traces onto a regular grid by linear interpolation, for all neurons at once.

    Grid points inside a gap longer than twice the median sampling interval become NaN,
    so no window is built from invented samples. NaN samples stay NaN.

    Returns
    -------
    (values, grid_s)
        (n_neurons, n_grid) float32 values and the (n_grid,) grid times in seconds.
    """
    if timestamps_s.size < 2:
        raise DataError(f"traces with {timestamps_s.size} sample(s) cannot be resampled; at least 2 are needed")

    step_s = 1.0 / rate_hz
    n_grid = int(np.floor((timestamps_s[-1] - timestamps_s[0]) / step_s + 1e-9)) + 1
    grid_s = timestamps_s[0] + step_s * np.arange(n_grid)

    # One set of interpolation indices and weights serves every neuron, since they share timestamps.
    right = np.clip(np.searchsorted(timestamps_s, grid_s, side="right"), 1, timestamps_s.size - 1)
    left = right - 1
    span = timestamps_s[right] - timestamps_s[left]
    weight = np.clip((grid_s - timestamps_s[left]) / np.where(span > 0, span, 1.0), 0.0, 1.0)

    # A grid point on a sample takes that sample alone, so a NaN next to it does not spread.
    on_left = weight < 1e-6
    on_right = weight > 1.0 - 1e-6
    with np.errstate(invalid="ignore"):
        mixed = traces[:, left] * (1.0 - weight) + traces[:, right] * weight
    values = np.where(on_left, traces[:, left], np.where(on_right, traces[:, right], mixed))

    gap_s = 2.0 * np.median(np.diff(timestamps_s))
    values[:, (span > gap_s) & ~on_left & ~on_right] = np.nan
    return values.astype(np.float32), grid_s


def normalise_traces(values: np.ndarray, method: str) -> np.ndarray:
    """Normalise each neuron's trace: ``"zscore"`` (mean and SD) or ``"robust"`` (median and scaled MAD)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        if method == "zscore":
            centre = np.nanmean(values, axis=1, keepdims=True)
            scale = np.nanstd(values, axis=1, keepdims=True)
        elif method == "robust":
            centre = np.nanmedian(values, axis=1, keepdims=True)
            scale = 1.4826 * np.nanmedian(np.abs(values - centre), axis=1, keepdims=True)
        else:
            raise ValueError(f"unknown normalisation {method!r}; use 'zscore' or 'robust'")
    scale = np.where(np.isfinite(scale) & (scale > 0), scale, 1.0)
    return ((values - centre) / scale).astype(np.float32)


def build_trace_segment_set(
    recordings: Sequence[TraceRecording],
    settings: SegmentSettings,
    *,
    normalise: str = "zscore",
    edges: np.ndarray | None = None,
) -> xr.Dataset:
    """Resample and normalise calcium or other continuous traces, then cut them into windows.

    The grid rate is ``1 / settings.bin_size_s``. A window that contains a NaN sample
    (a NaN in the file, or a gap in its timestamps) is marked invalid. Invalid windows
    are never trained on nor embedded, and their counts are logged per recording.
    """
    if not recordings:
        raise SourceError("no recordings to segment; give at least one source file in the recipe")

    rate_hz = 1.0 / settings.bin_size_s
    parts = []
    for recording in recordings:
        values, grid_s = resample_traces(recording.traces, recording.timestamps_s, rate_hz)
        values = normalise_traces(values, normalise)
        n_windows = values.shape[1] // settings.window_bins
        if n_windows < 2:
            raise DataError(
                f"{recording.path}: the traces span {grid_s[-1] - grid_s[0]:.3f} s, shorter than two windows of "
                f"{settings.window_s:.3f} s; lower segments.bin_size_s, bins_per_patch or patches in the recipe"
            )

        activity = values[:, : n_windows * settings.window_bins].reshape(
            recording.n_neurons, n_windows, settings.patches, settings.bins_per_patch
        )
        valid = np.isfinite(activity).all(axis=(2, 3))
        if not valid.all():
            logger.warning(
                "%s: %d of %d windows contain NaN samples or gaps and are left out (neurons affected: %d)",
                recording.path.name,
                int((~valid).sum()),
                valid.size,
                int((~valid).any(axis=1).sum()),
            )
        window_start = grid_s[0] + settings.window_s * np.arange(n_windows)
        neighbour, distance = neighbour_indices(recording.positions, settings.neighbours)
        parts.append(
            {
                "activity": activity,
                "valid": valid,
                "window_start_s": np.broadcast_to(window_start, valid.shape).copy(),
                "neighbour": neighbour,
                "distance": distance,
                "t_start_s": float(grid_s[0]),
                "t_stop_s": float(grid_s[-1]),
            }
        )

    dataset = _stack_parts(recordings, parts, settings, edges, coords=_trace_coords(recordings, parts))
    dataset["activity"].attrs["units"] = f"{normalise}-normalised trace"
    dataset.attrs.update({"modality": "ophys", "activity_transform": "none", "normalise": normalise, "rate_hz": rate_hz})
    return dataset


def _trace_coords(recordings: Sequence[TraceRecording], parts: list[dict]) -> dict[str, tuple]:
    """Collect the per-neuron coordinates of trace recordings."""

    def strings(values_of) -> np.ndarray:
        return np.array([str(value) for recording in recordings for value in values_of(recording)], dtype=object)

    def numbers(values_of, dtype) -> np.ndarray:
        return np.concatenate([np.asarray(values_of(recording, part), dtype=dtype) for recording, part in zip(recordings, parts)])

    coords = {
        "neuron_id": ("neuron", strings(lambda r: r.neuron_ids)),
        "unit_id": ("neuron", numbers(lambda r, p: r.roi_ids, np.int64)),
        "table_row": ("neuron", numbers(lambda r, p: r.rows, np.int64)),
        "table": ("neuron", strings(lambda r: r.plane_tables)),
        "series": ("neuron", strings(lambda r: r.series_names)),
        "source": ("neuron", strings(lambda r: [str(r.path)] * r.n_neurons)),
        "identifier": ("neuron", strings(lambda r: [r.identifier] * r.n_neurons)),
        "session": ("neuron", strings(lambda r: [r.session] * r.n_neurons)),
        "subject": ("neuron", strings(lambda r: [r.subject] * r.n_neurons)),
        "x": ("neuron", numbers(lambda r, p: r.positions[:, 0], np.float64)),
        "y": ("neuron", numbers(lambda r, p: r.positions[:, 1], np.float64)),
        "z": ("neuron", numbers(lambda r, p: r.positions[:, 2], np.float64)),
        "position_source": ("neuron", strings(lambda r: [r.position_source] * r.n_neurons)),
        "empty": ("neuron", numbers(lambda r, p: ~p["valid"].any(axis=1), bool)),
        "t_start_s": ("neuron", numbers(lambda r, p: [p["t_start_s"]] * r.n_neurons, np.float64)),
        "t_stop_s": ("neuron", numbers(lambda r, p: [p["t_stop_s"]] * r.n_neurons, np.float64)),
    }
    for name in sorted({name for recording in recordings for name in recording.labels}):
        coords[f"label_{name}"] = (
            "neuron",
            strings(lambda r, name=name: r.labels.get(name, np.full(r.n_neurons, "", dtype=object))),
        )
    return coords
