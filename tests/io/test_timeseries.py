"""Tests of the plain TimeSeries reader on a real whole-brain file and files built with pynwb."""

import logging

import h5py
import numpy as np
import pytest
from pynwb import NWBHDF5IO, TimeSeries
from pynwb.testing.mock.file import mock_NWBFile

from neurpir_nwb.errors import DataError
from neurpir_nwb.io.timeseries import read_timeseries


def write_timeseries_nwb(path, series: dict[str, dict]) -> str:
    """Write an NWB file with one TimeSeries in acquisition per entry of ``series`` (name to keyword arguments)."""
    nwbfile = mock_NWBFile(identifier="built")
    for name, kwargs in series.items():
        nwbfile.add_acquisition(TimeSeries(name=name, unit="a.u.", **kwargs))

    with NWBHDF5IO(str(path), "w") as io:
        io.write(nwbfile)
    return path


def test_celegans_real_file(shared_data):
    path = shared_data / "nwb" / "real" / "celegans_wholebrain_timeseries.nwb"
    with h5py.File(path, "r") as h5file:
        names = sorted(name for name in h5file["acquisition"] if name.startswith("Activity_"))
        first = h5file["acquisition/Activity_0000/data"][:]
        timestamps = h5file["acquisition/Activity_0000/timestamps"][:]

    recording = read_timeseries(path, "Activity_*")

    assert recording.n_neurons == 62
    assert recording.traces.shape == (62, 2244)
    assert recording.series_names.tolist() == names
    assert recording.neuron_ids[0] == "BrainScanner20180223_141721/acquisition/Activity_0000"
    assert recording.position_source == "row"
    assert recording.positions[:, 0].tolist() == list(range(62))
    assert recording.rows.tolist() == list(range(62))
    assert recording.table == "acquisition"
    assert np.allclose(recording.traces[0], first.astype(np.float32))
    assert recording.timestamps_s.tolist() == timestamps.tolist()
    # One long pause in the recording makes the sample times irregular.
    assert recording.rate_hz is None
    assert recording.repairs == {}


def test_no_series_matches(shared_data):
    path = shared_data / "nwb" / "real" / "celegans_wholebrain_timeseries.nwb"

    with pytest.raises(DataError, match="no TimeSeries in acquisition matches 'Calcium_\\*'"):
        read_timeseries(path, "Calcium_*")


def test_conversion_offset_applied(tmp_path):
    data = np.array([100, 200, -32768, 32767], dtype=np.int16)
    path = write_timeseries_nwb(
        tmp_path / "scaled.nwb",
        {
            "cell_a": {"data": data, "rate": 4.0, "conversion": 0.5, "offset": -10.0},
            "cell_b": {"data": data.astype(np.float64), "rate": 4.0},
            "other": {"data": data, "rate": 4.0},
        },
    )

    recording = read_timeseries(path, "cell_*")

    assert recording.series_names.tolist() == ["cell_a", "cell_b"]
    assert recording.traces[0].tolist() == [40.0, 90.0, -16394.0, 16373.5]
    assert recording.traces[1].tolist() == [100.0, 200.0, -32768.0, 32767.0]
    assert recording.rate_hz == 4.0
    assert recording.timestamps_s.tolist() == [0.0, 0.25, 0.5, 0.75]


def test_int_default_scale_warns(tmp_path, caplog):
    path = write_timeseries_nwb(tmp_path / "raw.nwb", {"cell": {"data": np.arange(5, dtype=np.int32), "rate": 2.0}})

    with caplog.at_level(logging.WARNING, logger="neurpir_nwb.io.timeseries"):
        read_timeseries(path, "cell")

    assert any("'cell'" in record.getMessage() and "raw counts" in record.getMessage() for record in caplog.records)


def test_lengths_differ(tmp_path):
    path = write_timeseries_nwb(
        tmp_path / "lengths.nwb",
        {"cell_a": {"data": np.zeros(10), "rate": 5.0}, "cell_b": {"data": np.zeros(12), "rate": 5.0}},
    )

    with pytest.raises(DataError, match="'cell_b' has 12 samples but 'cell_a' has 10"):
        read_timeseries(path, "cell_*")


def test_rates_differ(tmp_path):
    path = write_timeseries_nwb(
        tmp_path / "rates.nwb",
        {"cell_a": {"data": np.zeros(10), "rate": 5.0}, "cell_b": {"data": np.zeros(10), "rate": 6.0}},
    )

    with pytest.raises(DataError, match="'cell_b'.*do not share a time base"):
        read_timeseries(path, "cell_*")


def test_timestamps_and_rate_agree(tmp_path):
    path = write_timeseries_nwb(
        tmp_path / "mixed.nwb",
        {
            "cell_a": {"data": np.zeros(4), "rate": 10.0, "starting_time": 1.0},
            "cell_b": {"data": np.ones(4), "timestamps": [1.0, 1.1, 1.2, 1.3]},
        },
    )

    recording = read_timeseries(path, "cell_*")

    assert recording.n_neurons == 2
    assert recording.rate_hz == 10.0


def test_all_nan_series_dropped(tmp_path, caplog):
    trace = np.arange(6, dtype=np.float64)
    trace[2] = np.inf
    path = write_timeseries_nwb(
        tmp_path / "nan.nwb",
        {"cell_a": {"data": np.full(6, np.nan), "rate": 1.0}, "cell_b": {"data": trace, "rate": 1.0}},
    )

    with caplog.at_level(logging.WARNING, logger="neurpir_nwb.io.timeseries"):
        recording = read_timeseries(path, "cell_*")

    assert recording.series_names.tolist() == ["cell_b"]
    assert recording.neuron_ids == ["built/acquisition/cell_b"]
    assert recording.inf_counts.tolist() == [1]
    assert np.isnan(recording.traces[0, 2])
    assert recording.repairs == {"neurons_dropped_all_nan": 1, "inf_samples": 1}
    assert any("cell_a" in record.getMessage() and "dropped 1 of 2" in record.getMessage() for record in caplog.records)


def test_multichannel_series_rejected(tmp_path):
    path = write_timeseries_nwb(tmp_path / "wide.nwb", {"cells": {"data": np.zeros((10, 3)), "rate": 1.0}})

    with pytest.raises(DataError, match="shape \\(10, 3\\)"):
        read_timeseries(path, "cells")
