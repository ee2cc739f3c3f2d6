"""Binning, windows, neighbours and the segment set's round trip through netCDF and zarr."""

from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from neurpir_nwb.errors import DataError
from neurpir_nwb.io.recording import Recording
from neurpir_nwb.segments import (
    SegmentSettings,
    bin_spike_trains,
    build_segment_set,
    load_segment_set,
    neighbour_indices,
    save_segment_set,
)


def make_recording(n_neurons: int, duration_s: float, *, identifier: str = "rec", seed: int = 0, rate_hz: float = 5.0) -> Recording:
    """Build a recording of Poisson spike trains with neurons on a line 10 um apart."""
    rng = np.random.default_rng(seed)
    trains = [np.sort(rng.uniform(0, duration_s, rng.poisson(rate_hz * duration_s))) for _ in range(n_neurons)]
    trains[0] = np.concatenate([[0.0], trains[0], [duration_s]])  # pin the session span
    return Recording(
        path=Path(f"/data/{identifier}.nwb"),
        identifier=identifier,
        session=f"{identifier}-session",
        subject="mouse0",
        table="units",
        unit_ids=np.arange(100, 100 + n_neurons),
        rows=np.arange(n_neurons),
        spike_times=trains,
        positions=np.stack([np.arange(n_neurons) * 10.0, np.zeros(n_neurons), np.zeros(n_neurons)], axis=1),
        position_source="unit_xyz",
        labels={"region": np.array(["CA1" if i % 2 else "DG" for i in range(n_neurons)], dtype=object)},
        t_start_s=0.0,
        t_stop_s=duration_s,
        nwb_version="2.8.0",
    )


SETTINGS = SegmentSettings(bin_size_s=0.1, bins_per_patch=4, patches=5, neighbours=2, distance_bins=4)


def test_binning_unsorted_trains():
    counts = bin_spike_trains([np.array([0.9, 0.8, 0.1, 0.2, 0.3]), np.array([0.25, 0.75])], 0.0, 2, 0.5)

    assert counts.tolist() == [[3.0, 2.0], [1.0, 1.0]]
    assert counts.dtype == np.float32


def test_binning_drops_spikes_outside_span():
    counts = bin_spike_trains([np.array([-0.1, 0.0, 0.49, 0.5, 1.0, 7.0])], 0.0, 2, 0.5)

    assert counts.tolist() == [[2.0, 1.0]]


def test_binning_empty_trains():
    counts = bin_spike_trains([np.array([]), np.array([])], 0.0, 3, 0.5)

    assert counts.shape == (2, 3)
    assert counts.sum() == 0


def test_neighbours_nearest_first():
    positions = np.array([[0.0, 0, 0], [1.0, 0, 0], [3.0, 0, 0], [7.0, 0, 0]])
    indices, distances = neighbour_indices(positions, 2)

    assert indices.tolist() == [[1, 2], [0, 2], [1, 0], [2, 1]]
    assert distances[3].tolist() == [4.0, 6.0]


def test_neighbours_padded_when_too_few():
    indices, distances = neighbour_indices(np.zeros((2, 3)), 3)

    assert indices.tolist() == [[1, -1, -1], [0, -1, -1]]
    assert np.isnan(distances[:, 1:]).all()


def test_segment_set_layout():
    recording = make_recording(5, 20.0)
    dataset = build_segment_set([recording], SETTINGS)

    window_s = 0.1 * 4 * 5
    assert dataset.attrs["window_s"] == pytest.approx(window_s)
    assert dict(dataset["activity"].sizes) == {"neuron": 5, "window": 10, "patch": 5, "bin": 4}
    assert dataset["valid"].values.all()
    assert dataset["window_start_s"].values[0, :3].tolist() == pytest.approx([0.0, 2.0, 4.0])
    assert dataset["neuron_id"].values[0] == "rec/units/100"
    assert dataset["label_region"].values.tolist() == ["DG", "CA1", "DG", "CA1", "DG"]
    assert dataset["neighbour"].values[0].tolist() == [1, 2]
    assert set(np.unique(dataset["distance_bin"].values)) <= {1, 2, 3}


def test_segment_counts_match_spikes():
    recording = make_recording(3, 20.0)
    dataset = build_segment_set([recording], SETTINGS)

    # Every spike inside the 10 whole windows (0 to 20 s, the last edge excluded) is counted once.
    expected = [int(np.sum(train < 20.0)) for train in recording.spike_times]
    assert dataset["activity"].sum(dim=("window", "patch", "bin")).values.tolist() == expected


def test_recordings_of_different_length_are_padded():
    short = make_recording(3, 8.0, identifier="short")
    long = make_recording(4, 20.0, identifier="long", seed=1)
    dataset = build_segment_set([short, long], SETTINGS)

    assert dataset.sizes["neuron"] == 7
    assert dataset["valid"].values[:3].sum(axis=1).tolist() == [4, 4, 4]
    assert dataset["valid"].values[3:].sum(axis=1).tolist() == [10, 10, 10, 10]
    assert np.isnan(dataset["activity"].values[0, 5]).all()
    # Neighbours stay inside their own recording.
    assert set(dataset["neighbour"].values[:3].ravel()) <= {0, 1, 2}
    assert set(dataset["neighbour"].values[3:].ravel()) <= {3, 4, 5, 6}


def test_too_short_recording_raises():
    with pytest.raises(DataError, match=r"shorter than two windows of 2.000 s"):
        build_segment_set([make_recording(3, 3.0)], SETTINGS)


@pytest.mark.parametrize("suffix", [".nc", ".zarr"])
def test_round_trip_unchanged(tmp_path, suffix):
    dataset = build_segment_set([make_recording(4, 12.0), make_recording(3, 8.0, identifier="b", seed=2)], SETTINGS)
    path = save_segment_set(dataset, tmp_path / f"segments{suffix}")
    loaded = load_segment_set(path)

    xr.testing.assert_identical(loaded, dataset)
    assert not list(tmp_path.glob(".*partial"))


def test_resample_marks_gaps():
    from neurpir_nwb.segments import resample_traces

    timestamps = np.array([0.0, 0.1, 0.2, 0.3, 5.0, 5.1, 5.2])
    traces = np.arange(7, dtype=np.float32)[None, :] * 2.0
    values, grid = resample_traces(traces, timestamps, 10.0)

    assert grid[:4] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert values[0, :4] == pytest.approx([0.0, 2.0, 4.0, 6.0])
    assert np.isnan(values[0, 10])  # inside the 4.7 s gap
    assert values[0, -1] == pytest.approx(12.0)


def test_normalise_zscore_and_robust():
    from neurpir_nwb.segments import normalise_traces

    values = np.array([[1.0, 2.0, 3.0, np.nan], [5.0, 5.0, 5.0, 5.0]], dtype=np.float32)
    zscored = normalise_traces(values, "zscore")
    robust = normalise_traces(values, "robust")

    assert np.nanmean(zscored[0]) == pytest.approx(0.0, abs=1e-6)
    assert np.nanstd(zscored[0]) == pytest.approx(1.0, abs=1e-6)
    assert zscored[1].tolist() == [0.0, 0.0, 0.0, 0.0]  # a flat trace stays finite
    assert robust[0, 1] == pytest.approx(0.0)


def test_trace_windows_with_nan_are_invalid(shared_data):
    from neurpir_nwb.io.ophys import read_ophys
    from neurpir_nwb.segments import build_trace_segment_set
    from neurpir_nwb.train import WindowData

    recording = read_ophys(shared_data / "bugcases" / "B14_fluorescence_nan_inf.nwb")
    settings = SegmentSettings(bin_size_s=1 / recording.rate_hz, bins_per_patch=5, patches=2, neighbours=1, distance_bins=2)
    dataset = build_trace_segment_set([recording], settings)

    # 100 frames in windows of 10: ROI 2 (NaN in frames 10 to 19) loses window 1, ROI 3 (inf at frame 50) loses window 5.
    roi_ids = dataset["unit_id"].values.tolist()
    assert roi_ids == [0, 2, 3]
    assert (~dataset["valid"].values).sum(axis=1).tolist() == [0, 1, 1]
    assert not dataset["valid"].values[1, 1]
    assert not dataset["valid"].values[2, 5]
    assert np.isfinite(WindowData(dataset).activity).all()
