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

A segment set lives in memory, or, when it is larger than memory, in a zarr folder
that :func:`write_segment_set` fills one block of units at a time. Training reads such
a set's activity lazily through :class:`LazyActivity`.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import xarray as xr
import zarr

from neurpir_nwb.errors import DataError, SourceError
from neurpir_nwb.io.recording import Recording
from neurpir_nwb.io.traces import TraceRecording
from neurpir_nwb.progress import count_noun

__all__ = [
    "LazyActivity",
    "SegmentSettings",
    "activity_bytes",
    "bin_spike_trains",
    "build_segment_set",
    "build_trace_segment_set",
    "save_segment_set",
    "load_segment_set",
    "lazy_activity",
    "neighbour_indices",
    "prepare_activity",
    "remove_segment_set",
    "write_segment_set",
]

logger = logging.getLogger(__name__)

#: Attributes of a segment set that a model needs to segment new files the same way.
SETTING_ATTRS = ("bin_size_s", "bins_per_patch", "patches", "neighbours", "distance_bins")

#: Memory for the spike counts of one block of units while binning: 256 MiB, at 12 bytes per bin (the float32 counts and a float64 copy).
BIN_BLOCK_BYTES = 256 * 2**20

#: Neurons and windows per zarr chunk of ``activity``: 16 x 8 windows of 16 x 16 bins is 128 KiB.
ZARR_CHUNK_NEURONS = 16
ZARR_CHUNK_WINDOWS = 8


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
    """Count spikes per bin for every neuron, vectorised over the spikes of many neurons at once.

    Bin ``j`` covers ``[t_start_s + j * bin_size_s, t_start_s + (j + 1) * bin_size_s)``.
    The counting makes no assumption about the order of the spike times, and spikes
    outside the binned span are left out. Neurons are counted in groups of about
    :data:`BIN_GROUP_SPIKES` spikes, so that the temporary arrays stay small.

    Returns
    -------
    numpy.ndarray
        (n_neurons, n_bins) float32 spike counts.
    """
    n_neurons = len(spike_times)
    counts = np.zeros((n_neurons, n_bins), dtype=np.float32)
    lengths = np.array([len(train) for train in spike_times], dtype=np.int64)
    if n_neurons == 0 or lengths.sum() == 0:
        return counts

    ends = np.cumsum(lengths)
    start = 0
    while start < n_neurons:
        first_spike = ends[start - 1] if start else 0
        stop = max(start + 1, int(np.searchsorted(ends, first_spike + BIN_GROUP_SPIKES, side="right")))
        _count_group(spike_times[start:stop], lengths[start:stop], t_start_s, bin_size_s, counts[start:stop])
        start = stop
    return counts


#: Spike times counted in one vectorised pass of :func:`bin_spike_trains`.
BIN_GROUP_SPIKES = 1_000_000


def _count_group(
    spike_times: Sequence[np.ndarray], lengths: np.ndarray, t_start_s: float, bin_size_s: float, out: np.ndarray
) -> None:
    """Add the spike counts of some neurons to ``out``, (their neurons, n_bins), in one pass over their spikes."""
    n_neurons, n_bins = out.shape
    times = np.concatenate([np.asarray(train, dtype=np.float64) for train in spike_times])
    neuron = np.repeat(np.arange(n_neurons, dtype=np.int64), lengths)
    bins = np.floor((times - t_start_s) / bin_size_s)
    inside = np.isfinite(bins) & (bins >= 0) & (bins < n_bins)
    flat = neuron[inside] * n_bins + bins[inside].astype(np.int64)
    if flat.size == 0:
        return

    # Ascending trains give ascending flat indices, so equal indices form runs whose
    # lengths are the counts; this avoids an int64 array of every bin.
    if flat.size > 1 and np.any(flat[1:] < flat[:-1]):
        flat.sort()
    starts = np.flatnonzero(np.concatenate(([True], flat[1:] != flat[:-1])))
    out.reshape(-1)[flat[starts]] = np.diff(np.append(starts, flat.size))


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

    layouts = [_recording_layout(recording, settings) for recording in recordings]
    n_windows = max(layout["n_windows"] for layout in layouts)

    activity = np.full((sum(r.n_neurons for r in recordings), n_windows, settings.patches, settings.bins_per_patch), np.nan, dtype=np.float32)
    offset = 0
    for recording, layout in zip(recordings, layouts):
        for start, stop, counts in _binned_blocks(recording, layout["n_windows"], settings):
            activity[offset + start : offset + stop, : layout["n_windows"]] = counts
        offset += recording.n_neurons

    dataset = _stack_layouts(recordings, layouts, settings, edges, coords=_neuron_coords(recordings))
    dataset["activity"] = (("neuron", "window", "patch", "bin"), activity, {"units": "spikes/bin"})
    _log_segment_set(dataset, len(recordings), settings)
    return dataset


def write_segment_set(
    recordings: Sequence[Recording],
    settings: SegmentSettings,
    path: str | Path,
    *,
    edges: np.ndarray | None = None,
    attrs: dict | None = None,
) -> xr.Dataset:
    """Segment the recordings into a zarr folder one block of units at a time, and open it lazily.

    The result equals :func:`build_segment_set`'s, but memory holds only the spike
    trains and counts of one block of units (see :data:`BIN_BLOCK_BYTES` and
    :data:`~neurpir_nwb.io.units.CHUNK_SPIKES`), so sets larger than memory can be
    built. The folder is written under a temporary name and renamed when complete.

    Parameters
    ----------
    recordings, settings, edges
        As for :func:`build_segment_set`.
    path
        The ``.zarr`` folder to write; an earlier one is replaced.
    attrs
        Extra attributes of the set, such as the sha256 of its sources.

    Returns
    -------
    xarray.Dataset
        The set, opened with :func:`load_segment_set` ``(path, lazy=True)``.
    """
    path = Path(path)
    if path.suffix != ".zarr":
        raise ValueError(f"write_segment_set writes zarr folders; give a .zarr path, not {path}")
    if not recordings:
        raise SourceError("no recordings to segment; give at least one source file in the recipe")

    layouts = [_recording_layout(recording, settings) for recording in recordings]
    n_windows = max(layout["n_windows"] for layout in layouts)
    dataset = _stack_layouts(recordings, layouts, settings, edges, coords=_neuron_coords(recordings))
    dataset.attrs.update(attrs or {})

    # The small variables go first through xarray; the activity array is then filled block by block.
    temporary = path.with_name(f".{path.name}.partial")
    remove_segment_set(temporary)
    dataset.to_zarr(temporary, mode="w", consolidated=False)
    group = zarr.open_group(temporary, mode="r+")
    shape = (dataset.sizes["neuron"], n_windows, settings.patches, settings.bins_per_patch)
    dimensions = ("neuron", "window", "patch", "bin")
    array_attrs: dict = {"units": "spikes/bin"}
    extra: dict = {"dimension_names": dimensions}
    if group.metadata.zarr_format == 2:
        array_attrs["_ARRAY_DIMENSIONS"] = list(dimensions)
        extra = {}
    activity = group.create_array(
        "activity",
        shape=shape,
        chunks=(ZARR_CHUNK_NEURONS, ZARR_CHUNK_WINDOWS, settings.patches, settings.bins_per_patch),
        dtype="float32",
        fill_value=np.nan,
        attributes=array_attrs,
        **extra,
    )

    offset = 0
    for recording, layout in zip(recordings, layouts):
        for start, stop, counts in _binned_blocks(recording, layout["n_windows"], settings, align=ZARR_CHUNK_NEURONS):
            activity[offset + start : offset + stop, : layout["n_windows"]] = counts
        offset += recording.n_neurons
        logger.info("%s: %d units binned into %s", Path(recording.path).name, recording.n_neurons, path.name)

    remove_segment_set(path)
    temporary.rename(path)
    dataset = load_segment_set(path, lazy=True)
    _log_segment_set(dataset, len(recordings), settings)
    return dataset


def activity_bytes(recordings: Sequence[Recording], settings: SegmentSettings) -> int:
    """Return the bytes of the float32 ``activity`` array that segmenting the recordings gives."""
    windows = [_window_count(recording.t_stop_s - recording.t_start_s, settings) for recording in recordings]
    n_neurons = sum(recording.n_neurons for recording in recordings)
    return 4 * n_neurons * max(windows, default=0) * settings.window_bins


def _stack_layouts(recordings, layouts: list[dict], settings: SegmentSettings, edges: np.ndarray | None, *, coords: dict) -> xr.Dataset:
    """Pad every recording's windows to the longest one, stack them along `neuron` and bin the neighbour distances.

    The result contains every variable but ``activity``.
    """
    n_windows = max(layout["n_windows"] for layout in layouts)
    valid = np.concatenate([_pad(layout["valid"], n_windows, False) for layout in layouts])
    window_start = np.concatenate([_pad(layout["window_start_s"], n_windows, np.nan) for layout in layouts])

    # Neighbour indices are local to each recording; shift them to the stacked `neuron` axis.
    offsets = np.cumsum([0] + [recording.n_neurons for recording in recordings[:-1]])
    neighbour = np.concatenate(
        [np.where(layout["neighbour"] >= 0, layout["neighbour"] + offset, -1) for layout, offset in zip(layouts, offsets)]
    )
    distance = np.concatenate([layout["distance"] for layout in layouts])
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

    return xr.Dataset(
        data_vars={
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


def _log_segment_set(dataset: xr.Dataset, n_recordings: int, settings: SegmentSettings) -> None:
    logger.info(
        "segment set: %d neurons from %s, %d windows of %.2f s (%d patches x %d bins of %.3f s), %d neighbours",
        dataset.sizes["neuron"],
        count_noun(n_recordings, "recording"),
        int(dataset["valid"].values.sum()),
        settings.window_s,
        settings.patches,
        settings.bins_per_patch,
        settings.bin_size_s,
        settings.neighbours,
    )


#: Most windows of one recording: 10 million windows of 1 s would span 116 days.
MAX_WINDOWS_PER_RECORDING = 10_000_000


def _window_count(span_s: float, settings: SegmentSettings) -> int:
    """Return the whole windows in a session span of ``span_s`` seconds, or 0 when the span is not finite."""
    if not np.isfinite(span_s):
        return 0
    return int(np.floor(span_s / settings.window_s + 1e-9))


def _recording_layout(recording: Recording, settings: SegmentSettings) -> dict:
    """Return the windows of one recording, whole windows from the first spike on, and each neuron's neighbours."""
    span_s = recording.t_stop_s - recording.t_start_s
    if not np.isfinite(span_s) or span_s / settings.window_s > MAX_WINDOWS_PER_RECORDING:
        raise DataError(
            f"{recording.path}: the session spans {span_s:.6g} s ({recording.t_start_s:.6g} to {recording.t_stop_s:.6g} s), "
            f"more than {MAX_WINDOWS_PER_RECORDING:,} windows of {settings.window_s:.3f} s; the spike times are probably "
            "not in seconds, so set units.spike_times_unit (and units.sampling_rate_hz) in the recipe"
        )
    n_windows = _window_count(span_s, settings)
    if n_windows < 2:
        raise DataError(
            f"{recording.path}: the session spans {span_s:.3f} s ({recording.t_start_s:.3f} to "
            f"{recording.t_stop_s:.3f} s), shorter than two windows of {settings.window_s:.3f} s; "
            "lower segments.bin_size_s, bins_per_patch or patches in the recipe"
        )

    window_start = recording.t_start_s + settings.window_s * np.arange(n_windows)
    neighbour, distance = neighbour_indices(recording.positions, settings.neighbours)
    return {
        "n_windows": n_windows,
        "valid": _observed_windows(recording, window_start, settings.window_s),
        "window_start_s": np.broadcast_to(window_start, (recording.n_neurons, n_windows)).copy(),
        "neighbour": neighbour,
        "distance": distance,
    }


def _binned_blocks(
    recording: Recording, n_windows: int, settings: SegmentSettings, align: int = 1
) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield the rows ``start`` and ``stop`` of each block of units and its (units, windows, patches, bins) spike counts.

    A block holds at most :data:`BIN_BLOCK_BYTES` of counts (and a float64 copy while
    binning), and at least ``align`` units, a multiple of which it holds where it
    can. Spike trains that a :class:`~neurpir_nwb.io.units.SpikeTrainBlocks` reads from
    the file come in its own blocks, cut further where needed.
    """
    n_bins = n_windows * settings.window_bins
    max_units = max(align, BIN_BLOCK_BYTES // (12 * n_bins) // align * align)
    trains = recording.spike_times
    if hasattr(trains, "blocks"):
        blocks = trains.blocks(max_units=max_units, align=align)
    else:
        blocks = ((start, trains[start : start + max_units]) for start in range(0, recording.n_neurons, max_units))

    for start, block in blocks:
        counts = bin_spike_trains(block, recording.t_start_s, n_bins, settings.bin_size_s)
        yield start, start + len(block), counts.reshape(len(block), n_windows, settings.patches, settings.bins_per_patch)


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
    remove_segment_set(temporary)

    if path.suffix == ".zarr":
        dataset.to_zarr(temporary, mode="w", consolidated=False)
    elif path.suffix == ".nc":
        dataset.to_netcdf(temporary, engine="h5netcdf")
    else:
        raise ValueError(f"unknown segment set format {path.suffix!r} for {path}; use a .nc or .zarr path")

    remove_segment_set(path)
    temporary.rename(path)
    return path


def load_segment_set(path: str | Path, *, lazy: bool = False) -> xr.Dataset:
    """Read a segment set written by :func:`save_segment_set` or :func:`write_segment_set`.

    By default every variable is read into memory. With ``lazy``, a zarr set's
    ``activity`` stays on disk, to be read through :class:`LazyActivity`, and the
    smaller variables are read into memory.
    """
    path = Path(path)
    if not path.exists():
        raise SourceError(f"segment set {path} not found")
    if path.suffix == ".zarr":
        dataset = xr.open_zarr(path, consolidated=False, chunks=None)
        if not lazy:
            return _object_strings(dataset.load())
        small = [name for name in dataset.variables if name != "activity"]
        for name in small:
            dataset[name].load()
        dataset = _object_strings(dataset)
        dataset.encoding["lazy_activity"] = str(path)
        return dataset
    with xr.open_dataset(path, engine="h5netcdf") as dataset:
        return dataset.load()


def _object_strings(dataset: xr.Dataset) -> xr.Dataset:
    """Turn the variable-width strings that zarr gives back into object arrays of str, as netCDF and the builders give."""
    for name, variable in dataset.variables.items():
        if variable.dtype.kind == "T":
            dataset[name] = variable.copy(data=np.asarray(variable.values, dtype=object))
    return dataset


def lazy_activity(dataset: xr.Dataset) -> LazyActivity | None:
    """Return the on-disk activity of a set that :func:`load_segment_set` opened lazily, else None."""
    path = dataset.encoding.get("lazy_activity")
    if path is None:
        return None
    return LazyActivity(path, transform=dataset.attrs.get("activity_transform"))


class LazyActivity:
    """The ``activity`` of a zarr segment set, read from disk for the neurons and windows a batch needs.

    Indexing with a neuron index and a window index, integers or arrays that
    broadcast against each other, returns the transformed activity of those
    (neuron, window) pairs, as the in-memory array of
    :class:`~neurpir_nwb.train.WindowData` gives it (see :func:`prepare_activity`).
    A slice of neurons returns all their windows.

    Parameters
    ----------
    path
        The segment set's ``.zarr`` folder.
    transform
        ``"log1p"``, or None for the stored values.

    NOTE: reads are not prefetched. A per-target step of 64 targets with 8
    neighbours reads about 1,000 chunks, about 0.3 s on 2 CPU cores; population
    batching reads fewer.
    """

    def __init__(self, path: str | Path, transform: str | None = None) -> None:
        self.path = Path(path)
        self.array = zarr.open_array(self.path / "activity", mode="r")
        self.transform = transform
        self.shape = tuple(self.array.shape)
        self.dtype = np.dtype(np.float32)
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, slice):
            return self._prepared(np.asarray(self.array[key]))
        neurons, windows = key
        neurons, windows = np.broadcast_arrays(np.asarray(neurons, dtype=np.int64), np.asarray(windows, dtype=np.int64))
        patches, bins = self.shape[2:]

        # One coordinate selection reads every chunk the pairs touch, in parallel.
        selection = (
            neurons[..., None, None],
            windows[..., None, None],
            np.arange(patches)[:, None],
            np.arange(bins)[None, :],
        )
        if neurons.size == 0:
            return np.zeros((*neurons.shape, patches, bins), dtype=np.float32)
        return self._prepared(np.asarray(self.array.vindex[selection]))

    def _prepared(self, values: np.ndarray) -> np.ndarray:
        return prepare_activity(values, self.transform)


def prepare_activity(values: np.ndarray, transform: str | None) -> np.ndarray:
    """Return stored activity as the encoder reads it: float32, ``log1p`` of the counts when ``transform`` is ``"log1p"``, and zeros in place of NaN and infinities."""
    values = np.asarray(values).astype(np.float32, copy=False)
    if transform == "log1p":
        values = np.log1p(values)
    return np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)


def remove_segment_set(path: Path) -> None:
    """Delete a segment set, a netCDF file or a zarr folder, if it exists."""
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
                "n_windows": n_windows,
                "activity": activity,
                "valid": valid,
                "window_start_s": np.broadcast_to(window_start, valid.shape).copy(),
                "neighbour": neighbour,
                "distance": distance,
                "t_start_s": float(grid_s[0]),
                "t_stop_s": float(grid_s[-1]),
            }
        )

    n_windows = max(part["n_windows"] for part in parts)
    activity = np.concatenate([_pad(part["activity"], n_windows, np.nan) for part in parts])
    dataset = _stack_layouts(recordings, parts, settings, edges, coords=_trace_coords(recordings, parts))
    dataset["activity"] = (("neuron", "window", "patch", "bin"), activity, {"units": f"{normalise}-normalised trace"})
    _log_segment_set(dataset, len(recordings), settings)
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
