"""Tests of the seeded NWB builders: what they write is exactly what they were given."""

import h5py
import numpy as np
import pytest
from pynwb import NWBHDF5IO

from neurpir_nwb.testing import poisson_spike_trains, write_units_nwb


def test_poisson_trains_seeded():
    first = poisson_spike_trains(3, rate_hz=20.0, duration_s=2.0, seed=7)
    again = poisson_spike_trains(3, rate_hz=20.0, duration_s=2.0, seed=7)
    other = poisson_spike_trains(3, rate_hz=20.0, duration_s=2.0, seed=8)

    assert len(first) == 3
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(len(a) == len(b) and np.array_equal(a, b) for a, b in zip(first, other))
    for train in first:
        assert np.all(np.diff(train) >= 0)
        assert train.min() >= 0.0
        assert train.max() < 2.0


def test_write_units_raw_contents(tmp_path):
    trains = [[], [0.9, 0.1, np.nan], [1.0, 1.0]]

    path = write_units_nwb(tmp_path / "units.nwb", trains)

    with h5py.File(path, "r") as h5file:
        values = h5file["units/spike_times"][:]
        assert h5file["units/spike_times_index"][:].tolist() == [0, 3, 5]
        assert h5file["units/id"][:].tolist() == [0, 1, 2]
    assert values[:2].tolist() == [0.9, 0.1]
    assert np.isnan(values[2])
    assert values[3:].tolist() == [1.0, 1.0]


def test_write_units_metadata_and_columns(tmp_path):
    path = write_units_nwb(
        tmp_path / "units.nwb",
        [[0.1], [0.2]],
        identifier="ident",
        session_id="ses-3",
        subject_id="mouse9",
        unit_xyz=[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]],
        electrode_locations=["CA1", "DG"],
        electrode_xyz=[[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]],
        unit_electrodes=[[0, 1], [1]],
        unit_columns={"cell_type": ["pyramidal", "PV"]},
    )

    with NWBHDF5IO(str(path), "r") as io:
        nwbfile = io.read()
        assert nwbfile.identifier == "ident"
        assert nwbfile.session_id == "ses-3"
        assert nwbfile.subject.subject_id == "mouse9"
        assert nwbfile.session_start_time.tzinfo is not None
        assert nwbfile.units["unit_y"].data[:].tolist() == [2.0, 5.0]
        assert nwbfile.units["cell_type"].data[:].tolist() == ["pyramidal", "PV"]
        assert nwbfile.units["electrodes"].target.data[:].tolist() == [0, 1, 1]
        assert nwbfile.electrodes["location"].data[:].tolist() == ["CA1", "DG"]
        assert nwbfile.electrodes["z"].data[:].tolist() == [0.0, 1.0]


def test_write_units_without_subject(tmp_path):
    path = write_units_nwb(tmp_path / "units.nwb", [[0.1]], subject_id=None)

    with NWBHDF5IO(str(path), "r") as io:
        nwbfile = io.read()
        assert nwbfile.subject is None
        assert nwbfile.electrodes is None


def test_write_units_wrong_lengths(tmp_path):
    with pytest.raises(ValueError, match="cell_type has 1 entries, expected one per unit"):
        write_units_nwb(tmp_path / "a.nwb", [[0.1], [0.2]], unit_columns={"cell_type": ["PV"]})

    with pytest.raises(ValueError, match="electrode_xyz has 1 entries"):
        write_units_nwb(tmp_path / "b.nwb", [[0.1]], electrode_locations=["CA1", "DG"], electrode_xyz=[[0, 0, 0]])

    with pytest.raises(ValueError, match="unit_electrodes needs electrodes"):
        write_units_nwb(tmp_path / "c.nwb", [[0.1]], unit_electrodes=[[0]])
