"""The value the trace readers return: continuous activity traces of neurons from one NWB file."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class TraceRecording:
    """Neurons with continuous traces (ROI responses or plain TimeSeries), positions and labels.

    Attributes
    ----------
    path
        The NWB file the neurons were read from.
    identifier
        ``NWBFile.identifier`` of that file.
    session
        ``session_id`` when the file has one, else the identifier.
    subject
        ``subject.subject_id`` when the file has one, else ``""``.
    table
        Path of the PlaneSegmentation inside the file, for example
        ``"processing/ophys/ImageSegmentation/PlaneSegmentation"``. When the neurons
        come from several PlaneSegmentations it is the path of their common parent,
        and ``plane_tables`` gives each neuron's table. ``"acquisition"`` for plain
        TimeSeries.
    roi_ids
        ``id`` of each neuron's ROI in its PlaneSegmentation, int64; for plain
        TimeSeries the series' order.
    rows
        Row index of each neuron's ROI in its PlaneSegmentation, int64; for plain
        TimeSeries the series' order. The output NWB links to these rows.
    series_names
        Name of the RoiResponseSeries or TimeSeries each neuron's trace came from.
    traces
        (n_neurons, n_samples) float32 traces in the series' unit after ``conversion``
        and ``offset``. NaN marks the samples the file stores as NaN or infinite.
    timestamps_s
        (n_samples,) float64 sample times in seconds.
    rate_hz
        Sampling rate in Hz, or None when the samples are irregular.
    positions
        (n_neurons, 3) float64 positions: ROI centroids in pixels (x, y, 0) or voxels
        (x, y, z), or the neuron's order in the first column for ``"row"``.
    position_source
        ``"roi_centroid_px"``, ``"roi_centroid_voxels"`` or ``"row"``.
    labels
        Label name to an array of str, one per neuron; ``""`` marks a missing label.
    nwb_version
        The ``nwb_version`` attribute of the source file.
    repairs
        Counts of what reading changed, for example ``{"nan_samples": 10}``.
    plane_tables
        Path of each neuron's PlaneSegmentation, or ``"acquisition"`` for plain TimeSeries.
    nan_counts, inf_counts
        Number of NaN and of infinite samples the file stores for each kept neuron, int64.
    time_offsets_s
        Shift in seconds of each neuron's samples after ``timestamps_s``, float64. It is
        not zero for imaging planes of one volume, which are scanned one after another.
    """

    path: Path
    identifier: str
    session: str
    subject: str
    table: str
    roi_ids: np.ndarray
    rows: np.ndarray
    series_names: np.ndarray
    traces: np.ndarray
    timestamps_s: np.ndarray
    rate_hz: float | None
    positions: np.ndarray
    position_source: str
    labels: dict[str, np.ndarray] = field(default_factory=dict)
    nwb_version: str = ""
    repairs: dict[str, int] = field(default_factory=dict)
    plane_tables: np.ndarray = field(default_factory=lambda: np.array([], dtype=str))
    nan_counts: np.ndarray = field(default_factory=lambda: np.array([], dtype=np.int64))
    inf_counts: np.ndarray = field(default_factory=lambda: np.array([], dtype=np.int64))
    time_offsets_s: np.ndarray = field(default_factory=lambda: np.array([], dtype=np.float64))

    @property
    def n_neurons(self) -> int:
        """Number of neurons (rows of ``traces``)."""
        return len(self.roi_ids)

    @property
    def n_samples(self) -> int:
        """Number of samples per trace."""
        return len(self.timestamps_s)

    @property
    def neuron_ids(self) -> list[str]:
        """Stable neuron ids: ``<identifier>/<plane segmentation name>/<roi id>`` or
        ``<identifier>/acquisition/<series name>`` for plain TimeSeries."""
        ids = []
        for table, roi_id, series in zip(self.plane_tables, self.roi_ids, self.series_names):
            if table == "acquisition":
                ids.append(f"{self.identifier}/acquisition/{series}")
            else:
                ids.append(f"{self.identifier}/{str(table).rsplit('/', 1)[-1]}/{int(roi_id)}")
        return ids
