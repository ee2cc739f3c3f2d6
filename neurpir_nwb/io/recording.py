"""The value every reader returns: one NWB table of neurons and their activity."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class Recording:
    """Neurons of one NWB table (a Units table) with spike trains, positions and labels.

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
        Path of the table inside the file, for example ``"units"``.
    unit_ids
        ``id`` column of the table, one per neuron, int64.
    rows
        Row index of each neuron in the table, int64. The output NWB links to these rows.
    spike_times
        One float64 array of spike times in seconds per neuron: finite, non-negative
        and ascending after sanitising. For a large table, a
        :class:`~neurpir_nwb.io.units.SpikeTrainBlocks` that reads them from the file in
        blocks of units.
    positions
        (n_neurons, 3) float64 positions, in the unit the file uses for ``unit_x/y/z``
        or electrode ``x/y/z``; row numbers for ``"electrode_row"`` and ``"unit_row"``.
    position_source
        ``"unit_xyz"``, ``"electrode_xyz"``, ``"electrode_row"`` or ``"unit_row"``.
    labels
        Label name to an array of str, one per neuron; ``""`` marks a missing label.
    t_start_s, t_stop_s
        Session span in seconds, taken from the non-empty spike trains.
    nwb_version
        The ``nwb_version`` attribute of the source file.
    repairs
        Counts of what sanitising changed, for example ``{"nan_dropped": 2}``.
    obs_intervals_s
        Per neuron, the (n, 2) ``obs_intervals`` in seconds from the Units table, or
        None when the table has none. Windows outside a neuron's intervals are left
        out of its segments; an empty (0, 2) array means observed throughout.
    """

    path: Path
    identifier: str
    session: str
    subject: str
    table: str
    unit_ids: np.ndarray
    rows: np.ndarray
    spike_times: Sequence[np.ndarray]
    positions: np.ndarray
    position_source: str
    labels: dict[str, np.ndarray] = field(default_factory=dict)
    t_start_s: float = 0.0
    t_stop_s: float = 0.0
    nwb_version: str = ""
    repairs: dict[str, int] = field(default_factory=dict)
    obs_intervals_s: list[np.ndarray] | None = None

    @property
    def n_neurons(self) -> int:
        """Number of neurons (rows of the table)."""
        return len(self.unit_ids)

    @property
    def neuron_ids(self) -> list[str]:
        """Stable neuron ids of the form ``<identifier>/<table>/<unit id>``."""
        return [f"{self.identifier}/{self.table}/{int(uid)}" for uid in self.unit_ids]

    @property
    def spike_counts(self) -> np.ndarray:
        """Number of spikes kept per neuron, int64."""
        counts = getattr(self.spike_times, "counts", None)
        if counts is not None:
            return np.asarray(counts, dtype=np.int64)
        return np.array([len(train) for train in self.spike_times], dtype=np.int64)

    @property
    def empty(self) -> np.ndarray:
        """Flag of the neurons with no spikes left after sanitising."""
        return self.spike_counts == 0
