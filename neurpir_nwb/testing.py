"""Seeded builders of small NWB files, for tests and for trying the package without real data.

The files are written with pynwb exactly as given: spike trains may be unsorted, hold
NaN or be empty, so the builders also reproduce the data problems that readers must
handle.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from pynwb import NWBHDF5IO, NWBFile
from pynwb.file import Subject

# Session start time of every built file, fixed so that times derived from it do not change between runs.
SESSION_START_TIME = datetime(2024, 1, 1, 12, 0, 0, tzinfo=timezone.utc)


def poisson_spike_trains(
    n_units: int,
    *,
    rate_hz: float = 5.0,
    duration_s: float = 10.0,
    seed: int = 0,
) -> list[np.ndarray]:
    """Draw sorted Poisson spike trains, in seconds, from a seeded generator.

    Parameters
    ----------
    n_units
        Number of trains.
    rate_hz
        Mean firing rate of every unit in spikes per second.
    duration_s
        Length of the session in seconds; spike times lie in ``[0, duration_s)``.
    seed
        Seed of ``numpy.random.default_rng``.
    """
    rng = np.random.default_rng(seed)
    counts = rng.poisson(rate_hz * duration_s, size=n_units)
    return [np.sort(rng.uniform(0.0, duration_s, size=count)) for count in counts]


def write_units_nwb(
    path: str | Path,
    spike_trains: Sequence[Sequence[float]],
    *,
    identifier: str = "test",
    session_id: str | None = None,
    subject_id: str | None = "mouse0",
    unit_xyz: Sequence[Sequence[float]] | None = None,
    electrode_locations: Sequence[str] | None = None,
    electrode_xyz: Sequence[Sequence[float]] | None = None,
    unit_electrodes: Sequence[Sequence[int]] | None = None,
    unit_columns: Mapping[str, Sequence[object]] | None = None,
    obs_intervals: Sequence[Sequence[Sequence[float]]] | None = None,
) -> Path:
    """Write an NWB file with a Units table and, optionally, an electrodes table.

    Parameters
    ----------
    path
        Output file; it is overwritten.
    spike_trains
        One sequence of spike times in seconds per unit, written as given (unsorted,
        NaN and empty trains included). Unit ids are 0, 1, 2, ...
    identifier, session_id
        ``NWBFile.identifier`` and ``NWBFile.session_id``.
    subject_id
        ``Subject.subject_id``; None writes no subject.
    unit_xyz
        One (x, y, z) per unit, written as the ``unit_x``, ``unit_y``, ``unit_z`` columns.
    electrode_locations
        One ``location`` per electrode. All electrodes belong to one electrode group.
    electrode_xyz
        One (x, y, z) per electrode, written as the electrodes' ``x``, ``y``, ``z``.
    unit_electrodes
        Per unit, the electrode rows it links to through the ``electrodes`` column;
        an empty sequence links a unit to none.
    unit_columns
        Extra units columns, column name to one value per unit.
    obs_intervals
        Per unit, its observed intervals as [start, stop] pairs in seconds.

    Returns
    -------
    Path
        The written file.

    Raises
    ------
    ValueError
        When a per-unit or per-electrode argument has the wrong length, or electrode
        links are given without electrodes.
    """
    path = Path(path)
    n_units = len(spike_trains)
    unit_columns = dict(unit_columns or {})
    if unit_xyz is not None:
        xyz = np.asarray(unit_xyz, dtype=np.float64).reshape(-1, 3)
        unit_columns.update({"unit_x": xyz[:, 0], "unit_y": xyz[:, 1], "unit_z": xyz[:, 2]})

    for name, values in unit_columns.items():
        _check_length(name, values, n_units, "unit")
    if unit_electrodes is not None:
        _check_length("unit_electrodes", unit_electrodes, n_units, "unit")
    if obs_intervals is not None:
        _check_length("obs_intervals", obs_intervals, n_units, "unit")

    nwbfile = NWBFile(
        session_description="units written by neurpir_nwb.testing",
        identifier=identifier,
        session_start_time=SESSION_START_TIME,
        session_id=session_id,
    )
    if subject_id is not None:
        nwbfile.subject = Subject(subject_id=subject_id, species="Mus musculus")

    n_electrodes = _add_electrodes(nwbfile, electrode_locations, electrode_xyz)
    if unit_electrodes is not None and n_electrodes == 0:
        raise ValueError("unit_electrodes needs electrodes; give electrode_locations or electrode_xyz")

    for name in unit_columns:
        nwbfile.add_unit_column(name=name, description=f"{name} of each unit")

    for row, train in enumerate(spike_trains):
        columns = {name: values[row] for name, values in unit_columns.items()}
        if unit_electrodes is not None:
            columns["electrodes"] = list(unit_electrodes[row])
        if obs_intervals is not None:
            columns["obs_intervals"] = np.asarray(obs_intervals[row], dtype=np.float64).reshape(-1, 2)
        nwbfile.add_unit(id=row, spike_times=np.asarray(train, dtype=np.float64), **columns)

    with NWBHDF5IO(str(path), "w") as io:
        io.write(nwbfile)
    return path


def _add_electrodes(
    nwbfile: NWBFile,
    locations: Sequence[str] | None,
    xyz: Sequence[Sequence[float]] | None,
) -> int:
    """Add one device, one electrode group and its electrodes; return the number of electrodes."""
    if locations is None and xyz is None:
        return 0

    n_electrodes = len(locations) if locations is not None else len(xyz)
    locations = list(locations) if locations is not None else ["unknown"] * n_electrodes
    if xyz is not None:
        _check_length("electrode_xyz", xyz, n_electrodes, "electrode")

    device = nwbfile.create_device(name="probe0", description="test probe")
    group = nwbfile.create_electrode_group(name="shank0", description="test shank", location="unknown", device=device)

    for row, location in enumerate(locations):
        position = {}
        if xyz is not None:
            x, y, z = (float(value) for value in xyz[row])
            position = {"x": x, "y": y, "z": z}
        nwbfile.add_electrode(location=location, group=group, **position)

    return n_electrodes


def _check_length(name: str, values: Sequence[object], expected: int, per: str) -> None:
    """Raise ValueError unless ``values`` has one entry per unit or electrode."""
    if len(values) != expected:
        raise ValueError(f"{name} has {len(values)} entries, expected one per {per} ({expected})")
