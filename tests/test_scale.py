"""Loading at scale: spike trains read in blocks of units, and segment sets in zarr read lazily in training."""

import logging
import tracemalloc

import numpy as np
import pytest
import torch
import xarray as xr

from neurpir_nwb import segments
from neurpir_nwb.errors import DataError
from neurpir_nwb.io.units import SpikeTrainBlocks, read_units
from neurpir_nwb.model import EncoderConfig, NeurPIREncoder, Projector, VICRegLoss
from neurpir_nwb.pipeline import run_recipe
from neurpir_nwb.recipe import ProblemPolicy, load_recipe
from neurpir_nwb.segments import LazyActivity, SegmentSettings, build_segment_set, load_segment_set, write_segment_set
from neurpir_nwb.testing import poisson_spike_trains, write_units_nwb
from neurpir_nwb.train import TrainConfig, Trainer, WindowData
from tests.test_pipeline import TINY_SIMULATED

SETTINGS = SegmentSettings(bin_size_s=0.05, bins_per_patch=4, patches=4, neighbours=3, distance_bins=4)

#: Spike times per block in these tests: a few units per block.
SMALL_CHUNK = 700


def write_file_with_problems(path, *, duration_s=60.0, n_units=30, seed=0, identifier="big"):
    """Write units with NaN, negative, duplicate and descending spike times, an empty unit and obs_intervals."""
    trains = [list(train) for train in poisson_spike_trains(n_units, rate_hz=6.0, duration_s=duration_s, seed=seed)]
    trains[3].insert(5, float("nan"))
    trains[7].insert(0, -1.0)
    trains[11].insert(9, trains[11][8])
    trains[14] = trains[14][::-1]
    trains[5] = []
    intervals = [[[0.0, duration_s]] for _ in range(n_units)]
    intervals[9] = [[0.0, duration_s / 2]]
    xyz = np.random.default_rng(seed).uniform(0.0, 100.0, (n_units, 3))
    return write_units_nwb(path, trains, identifier=identifier, unit_xyz=xyz, obs_intervals=intervals)


WARN_SORT = ProblemPolicy(descending_spike_times="warn")


@pytest.fixture(scope="module")
def big_file(tmp_path_factory):
    return write_file_with_problems(tmp_path_factory.mktemp("scale") / "big.nwb")


def test_block_read_gives_memory_read(big_file):
    in_memory = read_units(big_file, problems=WARN_SORT)
    blocked = read_units(big_file, problems=WARN_SORT, chunk_spikes=SMALL_CHUNK)

    assert isinstance(blocked.spike_times, SpikeTrainBlocks)
    assert len(blocked.spike_times.block_rows()) > 5
    assert not isinstance(in_memory.spike_times, SpikeTrainBlocks)
    for row, (expected, got) in enumerate(zip(in_memory.spike_times, blocked.spike_times, strict=True)):
        np.testing.assert_array_equal(got, expected, err_msg=f"unit row {row}")
    np.testing.assert_array_equal(blocked.spike_counts, in_memory.spike_counts)
    assert (blocked.t_start_s, blocked.t_stop_s) == (in_memory.t_start_s, in_memory.t_stop_s)
    assert blocked.repairs == in_memory.repairs
    np.testing.assert_array_equal(blocked.positions, in_memory.positions)


def test_block_slices_give_memory_trains(big_file):
    in_memory = read_units(big_file, problems=WARN_SORT).spike_times
    blocked = read_units(big_file, problems=WARN_SORT, chunk_spikes=SMALL_CHUNK).spike_times

    for part in (slice(3, 17), slice(None, None, 5), slice(-4, None), slice(8, 8)):
        expected, got = in_memory[part], blocked[part]
        assert len(got) == len(expected), part
        for row, (want, have) in enumerate(zip(expected, got)):
            np.testing.assert_array_equal(have, want, err_msg=f"{part}, train {row}")


def test_block_read_repairs_each_problem(big_file):
    blocked = read_units(big_file, problems=WARN_SORT, chunk_spikes=SMALL_CHUNK)

    assert blocked.repairs == {
        "nan_dropped": 1,
        "negative_dropped": 1,
        "units_sorted": 1,
        "equal_times_kept": 1,
        "outside_obs_intervals_dropped": blocked.repairs["outside_obs_intervals_dropped"],
    }
    assert blocked.repairs["outside_obs_intervals_dropped"] > 0
    assert blocked.spike_counts[5] == 0
    assert np.all(np.diff(blocked.spike_times[14]) >= 0)
    assert blocked.spike_times[9].max() <= 30.0


def test_block_read_reports_problems_with_unit_ids(big_file, caplog):
    with caplog.at_level(logging.WARNING, logger="neurpir_nwb.io.units"):
        read_units(big_file, problems=WARN_SORT, chunk_spikes=SMALL_CHUNK)
    messages = "\n".join(record.getMessage() for record in caplog.records)

    lines = messages.splitlines()
    assert any("unit 3" in line and "non-finite" in line for line in lines)
    assert any("unit 7" in line and "negative" in line for line in lines)
    assert any("unit 14" in line and "sorted" in line for line in lines)


def test_block_read_raises_for_descending_trains(big_file):
    with pytest.raises(DataError, match="unit 14 descend"):
        read_units(big_file, chunk_spikes=SMALL_CHUNK)


def test_blocks_segment_like_memory(big_file):
    in_memory = build_segment_set([read_units(big_file, problems=WARN_SORT)], SETTINGS)
    blocked = build_segment_set([read_units(big_file, problems=WARN_SORT, chunk_spikes=SMALL_CHUNK)], SETTINGS)

    xr.testing.assert_identical(blocked, in_memory)


@pytest.fixture(scope="module")
def two_recordings(tmp_path_factory, big_file):
    shorter = write_file_with_problems(tmp_path_factory.mktemp("short") / "short.nwb", duration_s=25.0, n_units=20, seed=4, identifier="short")
    return [read_units(path, problems=WARN_SORT, chunk_spikes=SMALL_CHUNK) for path in (big_file, shorter)]


@pytest.fixture(scope="module")
def zarr_set(tmp_path_factory, two_recordings):
    path = tmp_path_factory.mktemp("zarr") / "segments.zarr"
    return write_segment_set(two_recordings, SETTINGS, path, attrs={"data_sha256": "abc"}), path


def test_zarr_set_equals_memory_set(two_recordings, zarr_set):
    lazy, path = zarr_set
    in_memory = build_segment_set(two_recordings, SETTINGS)
    loaded = load_segment_set(path)

    assert lazy.attrs["data_sha256"] == "abc"
    assert not path.with_name(".segments.zarr.partial").exists()
    for name in in_memory.variables:
        np.testing.assert_array_equal(loaded[name].values, in_memory[name].values, err_msg=name)
    assert np.isnan(loaded["activity"].values[30:, 25 * 4 :]).all()


def test_lazy_activity_reads_the_pairs_a_batch_needs(two_recordings, zarr_set):
    _, path = zarr_set
    data = WindowData(build_segment_set(two_recordings, SETTINGS))
    lazy = LazyActivity(path, transform="log1p")
    neurons = np.array([[0, 4, 31], [49, 2, 0]])
    windows = np.array([[3], [10]])
    members = np.array([1, 5, 40])

    assert lazy.shape == data.activity.shape
    np.testing.assert_array_equal(lazy[neurons, windows], data.activity[neurons, windows])
    np.testing.assert_array_equal(lazy[members, 7], data.activity[members, 7])
    np.testing.assert_array_equal(lazy[members[None, :], windows[:, 0][:, None]], data.activity[members[None, :], windows[:, 0][:, None]])
    np.testing.assert_array_equal(lazy[10:20], data.activity[10:20])
    assert lazy[np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)].shape == (0, 4, 4)


def train_weights(data: WindowData, batching: str) -> torch.Tensor:
    torch.manual_seed(0)
    config = EncoderConfig(bins_per_patch=4, patches=4, dim=16, heads=2, temporal_layers=1, spatiotemporal_layers=1, distance_bins=4, batching=batching)
    encoder = NeurPIREncoder(config)
    trainer = Trainer(encoder, Projector(16, [32, 32]), VICRegLoss(), TrainConfig(epochs=1, steps_per_epoch=3, batch_size=8, device="cpu", seed=3, checkpoint_steps=0))
    trainer.fit(data)
    return torch.cat([parameter.detach().flatten() for parameter in encoder.parameters()])


@pytest.mark.parametrize("batching", ["per-target", "population"])
def test_training_on_lazy_set_gives_same_weights(two_recordings, zarr_set, batching):
    lazy_set, path = zarr_set
    in_memory = WindowData(build_segment_set(two_recordings, SETTINGS), holdout_fraction=0.2)
    lazy = WindowData(lazy_set, holdout_fraction=0.2, activity=segments.lazy_activity(lazy_set))

    assert isinstance(lazy.activity, LazyActivity)
    assert torch.equal(train_weights(lazy, batching), train_weights(in_memory, batching))


def peak_bytes(action) -> int:
    tracemalloc.start()
    try:
        action()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_block_segmentation_bounds_memory(tmp_path, monkeypatch):
    # 200 units at 10 Hz for 400 s: 800,000 spike times (6.4 MB) and 32 MB of binned activity.
    path = write_units_nwb(tmp_path / "long.nwb", poisson_spike_trains(200, rate_hz=10.0, duration_s=400.0, seed=1), unit_xyz=np.random.default_rng(1).uniform(0, 50, (200, 3)))
    settings = SegmentSettings(bin_size_s=0.01, bins_per_patch=8, patches=8, neighbours=3, distance_bins=4)
    monkeypatch.setattr(segments, "BIN_BLOCK_BYTES", 2**20)
    activity_bytes = 200 * 624 * 64 * 4

    in_memory = peak_bytes(lambda: build_segment_set([read_units(path)], settings))
    blocked = peak_bytes(lambda: write_segment_set([read_units(path, chunk_spikes=50_000)], settings, tmp_path / "long.zarr"))

    assert in_memory > activity_bytes
    assert blocked < activity_bytes / 3, f"block-wise segmentation peaked at {blocked / 1e6:.1f} MB, in memory at {in_memory / 1e6:.1f} MB"


def test_recipe_with_zarr_store_trains_like_memory(tmp_path):
    runs = {}
    for store in ("memory", "zarr"):
        recipe_path = tmp_path / f"{store}.yaml"
        recipe_path.write_text(TINY_SIMULATED.replace("distance_bins: 4}", f"distance_bins: 4, store: {store}}}"))
        runs[store] = run_recipe(load_recipe(recipe_path, output=tmp_path / store))

    assert (runs["zarr"].run_dir / "segments.zarr" / "activity").is_dir()
    assert not (runs["zarr"].run_dir / "segments.nc").exists()
    embeddings = {store: xr.open_dataset(run.run_dir / "embeddings.nc", engine="h5netcdf")["embedding"].values for store, run in runs.items()}
    np.testing.assert_allclose(embeddings["zarr"], embeddings["memory"], rtol=0, atol=1e-6)
    assert runs["zarr"].metrics["embedding"]["macro_f1"] == runs["memory"].metrics["embedding"]["macro_f1"]
    assert runs["zarr"].metrics["baseline_pca"]["macro_f1"] == runs["memory"].metrics["baseline_pca"]["macro_f1"]


def test_blocks_end_on_chunk_boundaries(big_file):
    # About 8 units' spike times per block, cut to 6 units and then back to a multiple of 4.
    blocks = read_units(big_file, problems=WARN_SORT, chunk_spikes=3000).spike_times
    rows = blocks.block_rows(max_units=6, align=4)

    assert rows[0][0] == 0
    assert rows[-1][1] == len(blocks)
    assert all(stop == next_start for (_, stop), (next_start, _) in zip(rows, rows[1:]))
    assert all(stop % 4 == 0 for _, stop in rows[:-1])
    assert max(stop - start for start, stop in rows) <= 6


def test_store_switch_removes_stale_set(tmp_path):
    recipe_path = tmp_path / "tiny.yaml"
    runs = []
    for store in ("zarr", "memory"):
        recipe_path.write_text(TINY_SIMULATED.replace("distance_bins: 4}", f"distance_bins: 4, store: {store}}}"))
        recipe = load_recipe(recipe_path, output=tmp_path / "run")
        runs.append(run_recipe(recipe, overwrite=bool(runs)))

    assert (runs[-1].run_dir / "segments.nc").is_file()
    assert not (runs[-1].run_dir / "segments.zarr").exists()
