"""The problem policy: each data problem that the readers detect is raised, warned about or ignored as the recipe sets."""

import logging
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
from pynwb import NWBHDF5IO, NWBFile

from neurpir_nwb.errors import DataError, RecipeError, SourceError
from neurpir_nwb.io.nwbfile import open_nwb
from neurpir_nwb.io.ophys import read_ophys
from neurpir_nwb.io.problems import ProblemHandler, check_timestamps, repair_timestamps
from neurpir_nwb.io.timeseries import read_timeseries
from neurpir_nwb.io.units import MAX_SESSION_S, LabelSpec, read_units
from neurpir_nwb.recipe import ProblemPolicy, load_recipe
from neurpir_nwb.segments import SegmentSettings, bin_spike_trains, build_segment_set
from neurpir_nwb.testing import SESSION_START_TIME, poisson_spike_trains, write_units_nwb
from tests.io.test_ophys import write_ophys_nwb
from tests.io.test_timeseries import write_timeseries_nwb

REPOSITORY = Path(__file__).resolve().parents[1]

READER_LOGGERS = ("neurpir_nwb.io.units", "neurpir_nwb.io.ophys", "neurpir_nwb.io.timeseries", "neurpir_nwb.io.nwbfile")

# pynwb warns when it builds the transposed series these tests write on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:RoiResponseSeries .* does not match:UserWarning")


def reader_warnings(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name in READER_LOGGERS and record.levelno == logging.WARNING]


def policy(**actions: str) -> ProblemPolicy:
    return ProblemPolicy(**actions)


def copy_writable(source: Path, target: Path) -> Path:
    shutil.copy(source, target)
    target.chmod(0o644)
    return target


# --- the policy in the recipe ------------------------------------------------------------------


def test_every_problem_has_default_and_description():
    defaults = ProblemPolicy()

    for name, field in ProblemPolicy.model_fields.items():
        assert getattr(defaults, name) in ("raise", "warn", "ignore")
        assert "Repair:" in field.description, name


def test_recipe_problem_section_validated(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: x\nsources: [{path: a.nwb}]\nproblems: {empty_units: ignore, descending_spike_times: warn}\n")

    recipe = load_recipe(path)

    assert recipe.problems.empty_units == "ignore"
    assert recipe.problems.descending_spike_times == "warn"
    assert recipe.problems.nonfinite_spike_times == "warn"
    assert recipe.resolved()["problems"]["empty_units"] == "ignore"


def test_unknown_problem_key_rejected(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: x\nsources: [{path: a.nwb}]\nproblems: {empty_unit: ignore}\n")

    with pytest.raises(RecipeError) as error:
        load_recipe(path)

    assert "unknown key 'problems.empty_unit'" in str(error.value)
    assert "did you mean 'empty_units'?" in str(error.value)


def test_invalid_action_rejected(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: x\nsources: [{path: a.nwb}]\nproblems: {empty_units: skip}\n")

    with pytest.raises(RecipeError, match="invalid value 'skip' for 'problems.empty_units'"):
        load_recipe(path)


def test_samples_unit_needs_rate(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: x\nsources: [{path: a.nwb}]\nunits: {spike_times_unit: samples}\n")

    with pytest.raises(RecipeError, match="needs sampling_rate_hz"):
        load_recipe(path)


def test_policy_changes_data_hash(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: x\nsources: [{path: a.nwb}]\n")
    first = load_recipe(path).data_sha256()
    path.write_text("name: x\nsources: [{path: a.nwb}]\nproblems: {empty_units: ignore}\n")

    assert load_recipe(path).data_sha256() != first


# --- spike times in samples or milliseconds ----------------------------------------------------


def test_sample_indices_raise(tmp_path):
    trains = [np.arange(100, 3100, 100, dtype=np.float64), np.arange(150, 3150, 150, dtype=np.float64)]
    path = write_units_nwb(tmp_path / "samples.nwb", trains)

    with pytest.raises(DataError) as error:
        read_units(path)

    message = str(error.value)
    assert str(path) in message
    assert "the 50 spike times of units 0, 1 are all whole numbers, from 100.0 to 3000.0" in message
    assert "sample indices" in message
    assert "units.spike_times_unit" in message
    assert "units.sampling_rate_hz" in message


def test_samples_converted_with_rate(tmp_path, caplog):
    trains = [np.arange(100, 3100, 100, dtype=np.float64)]
    path = write_units_nwb(tmp_path / "samples.nwb", trains)

    recording = read_units(path, spike_times_unit="samples", sampling_rate_hz=1000.0)

    assert recording.spike_times[0][:3].tolist() == [0.1, 0.2, 0.3]
    assert recording.t_stop_s == 3.0
    assert not [message for message in reader_warnings(caplog) if "sample indices" in message]


def test_sample_indices_warn_reads_seconds(tmp_path, caplog):
    path = write_units_nwb(tmp_path / "samples.nwb", [np.arange(1, 31, dtype=np.float64)])

    recording = read_units(path, problems=policy(spike_times_not_seconds="warn"))

    assert recording.spike_times[0][-1] == 30.0
    assert len([message for message in reader_warnings(caplog) if "look like sample indices" in message]) == 1


def test_milliseconds_raise_then_convert(tmp_path):
    train_ms = np.sort(np.random.default_rng(0).uniform(0, 3_600_000, size=15)) + 0.5
    path = write_units_nwb(tmp_path / "ms.nwb", [train_ms])

    with pytest.raises(DataError) as error:
        read_units(path)
    recording = read_units(path, spike_times_unit="ms")

    assert f"spike times of units 0 reach {float(train_ms.max())!r} s" in str(error.value)
    assert "milliseconds" in str(error.value)
    assert f"{MAX_SESSION_S / 3600:.0f} h" in str(error.value)
    np.testing.assert_allclose(recording.spike_times[0], train_ms / 1000.0)


def test_invalid_time_unit_rejected(tmp_path):
    path = write_units_nwb(tmp_path / "a.nwb", [[0.1]])

    with pytest.raises(RecipeError, match="'minutes' is invalid"):
        read_units(path, spike_times_unit="minutes")


# --- spike-train repairs under each action -----------------------------------------------------


def test_nan_spikes_raise_names_unit(shared_data):
    path = shared_data / "bugcases" / "B05_spike_times_nan.nwb"

    with pytest.raises(DataError) as error:
        read_units(path, problems=policy(nonfinite_spike_times="raise"))

    message = str(error.value)
    assert f"{path}: unit 1 has 2 NaN or infinite spike times (unit 1 first at index 1)" in message
    assert "problems.nonfinite_spike_times: warn" in message


def test_nan_spikes_ignored_silently(shared_data, caplog):
    recording = read_units(shared_data / "bugcases" / "B05_spike_times_nan.nwb", problems=policy(nonfinite_spike_times="ignore", unlinked_units="ignore"))

    assert recording.spike_times[1].tolist() == [0.15, 0.9]
    assert recording.repairs == {"nan_dropped": 2}
    assert reader_warnings(caplog) == []


def test_sentinels_raise_names_value(shared_data):
    path = shared_data / "bugcases" / "B03_unsorted_and_sentinel_spikes.nwb"

    with pytest.raises(DataError) as error:
        read_units(path, sort_spikes=True, problems=policy(negative_spike_times="raise"))

    assert "unit 1 has 2 negative spike times, which look like sentinel values (unit 1 has -1.0 s at index 0)" in str(error.value)


def test_raw_trains_bin_without_sorting(shared_data):
    with h5py.File(shared_data / "bugcases" / "B03_unsorted_and_sentinel_spikes.nwb", "r") as h5file:
        ends = h5file["units/spike_times_index"][:]
        raw_unit0 = h5file["units/spike_times"][: ends[0]]

    counts = bin_spike_trains([raw_unit0], t_start_s=0.0, n_bins=2, bin_size_s=0.5)

    assert raw_unit0.tolist() == [0.9, 0.8, 0.1, 0.2, 0.3]
    assert counts.tolist() == [[3.0, 2.0]]


def test_descending_warn_equals_sort_opt_in(shared_data, caplog):
    path = shared_data / "bugcases" / "B02_spike_times_not_ascending.nwb"

    by_policy = read_units(path, problems=policy(descending_spike_times="warn"))
    by_option = read_units(path, sort_spikes=True)

    assert [train.tolist() for train in by_policy.spike_times] == [train.tolist() for train in by_option.spike_times]
    assert by_policy.spike_times[1].tolist() == [0.05, 1.0, 2.0, 5.0, 6.0, 7.0]


def test_descending_ignored_sorts_silently(shared_data, caplog):
    recording = read_units(
        shared_data / "bugcases" / "B02_spike_times_not_ascending.nwb",
        problems=policy(descending_spike_times="ignore", duplicate_spike_times="ignore", unlinked_units="ignore"),
    )

    assert recording.spike_times[1].tolist() == [0.05, 1.0, 2.0, 5.0, 6.0, 7.0]
    assert recording.repairs == {"units_sorted": 1, "equal_times_kept": 1}
    assert reader_warnings(caplog) == []


def test_duplicates_raise_names_time(shared_data):
    with pytest.raises(DataError) as error:
        read_units(shared_data / "bugcases" / "B02_spike_times_not_ascending.nwb", sort_spikes=True, problems=policy(duplicate_spike_times="raise"))

    assert "unit 2 has 1 spike times equal to the time before them (unit 2 repeats 1.5 s)" in str(error.value)


def test_empty_units_raise_lists_ids(shared_data):
    with pytest.raises(DataError) as error:
        read_units(shared_data / "bugcases" / "B01_units_zero_spikes.nwb", problems=policy(empty_units="raise"))

    assert "4 of 6 units have no spike times (unit ids 0, 2, 3, 5)" in str(error.value)
    assert "problems.empty_units: warn" in str(error.value)


def test_second_alm_session(shared_data):
    path = shared_data / "nwb" / "real" / "alm_sub-anm372793_ses-20170508.nwb"

    recording = read_units(path, labels={"cell_type": LabelSpec("units.cell_type")}, sort_spikes=True)

    assert recording.unit_ids.tolist() == [1001]
    assert recording.spike_counts.tolist() == [2434]
    assert recording.labels["cell_type"].tolist() == ["PTupper"]


def test_allen_stub_layout(shared_data):
    path = shared_data / "nwb" / "real" / "allen_vcnp_stub_ndx-aibs.nwb"

    with h5py.File(path, "r") as h5file:
        n_units = len(h5file["units/id"])
        n_spikes = len(h5file["units/spike_times"])
        n_columns = len(h5file["units"].attrs["colnames"])
        locations = {value.decode() for value in h5file["general/extracellular_ephys/electrodes/location"][:]}
        cached = list(h5file["specifications/ndx-aibs-ecephys"].keys())
    with open_nwb(path) as (_, nwbfile):
        opened_units = len(nwbfile.units)

    assert (n_units, n_spikes, n_columns, opened_units) == (10, 10, 29, 10)
    assert locations == {"VISam", "grey", ""}
    assert cached == ["0.2.0"]


# --- obs_intervals ----------------------------------------------------------------------------


def write_obs_intervals_nwb(path: Path) -> Path:
    """Write units 0 and 1 with spikes every 0.1 s from 0 to 20 s. Unit 0 is observed in [0, 8] and [12, 20] s only."""
    nwbfile = NWBFile(session_description="obs", identifier="obs", session_start_time=SESSION_START_TIME)
    times = np.round(np.arange(0.05, 20.0, 0.1), 6)
    nwbfile.add_unit(spike_times=times, obs_intervals=[[0.0, 8.0], [12.0, 20.0]])
    nwbfile.add_unit(spike_times=times + 0.01, obs_intervals=[[0.0, 20.0]])
    with NWBHDF5IO(str(path), "w") as io:
        io.write(nwbfile)
    return path


def test_spikes_outside_intervals_dropped(tmp_path, caplog):
    path = write_obs_intervals_nwb(tmp_path / "obs.nwb")

    recording = read_units(path)

    assert recording.spike_counts.tolist() == [160, 200]
    assert not ((recording.spike_times[0] > 8.0) & (recording.spike_times[0] < 12.0)).any()
    assert recording.repairs["outside_obs_intervals_dropped"] == 40
    assert recording.obs_intervals_s[0].tolist() == [[0.0, 8.0], [12.0, 20.0]]
    assert any("unit 0: dropped 40 spike times outside its obs_intervals" in message for message in reader_warnings(caplog))


def test_windows_outside_intervals_invalid(tmp_path):
    recording = read_units(write_obs_intervals_nwb(tmp_path / "obs.nwb"))
    settings = SegmentSettings(bin_size_s=0.1, bins_per_patch=5, patches=2, neighbours=1, distance_bins=2)

    dataset = build_segment_set([recording], settings)

    # Windows of 1 s start at the first spike (0.05 s); unit 0 is not observed from 8 to 12 s.
    starts = dataset["window_start_s"].values[0]
    valid = dataset["valid"].values
    inside = ((starts >= 0.0) & (starts + 1.0 <= 8.0)) | ((starts >= 12.0) & (starts + 1.0 <= 20.0))
    assert valid[0].tolist() == inside.tolist()
    assert valid[1].all()
    assert (~valid[0]).sum() == 5


def test_outside_intervals_raise(tmp_path):
    path = write_obs_intervals_nwb(tmp_path / "obs.nwb")

    with pytest.raises(DataError, match="unit 0 has 40 spike times outside their obs_intervals"):
        read_units(path, problems=policy(spikes_outside_obs_intervals="raise"))


def test_reversed_interval_rejected(tmp_path):
    path = write_obs_intervals_nwb(tmp_path / "obs.nwb")
    with h5py.File(path, "a") as h5file:
        h5file["units/obs_intervals"][0] = [8.0, 1.0]

    with pytest.raises(DataError, match=r"obs_intervals of unit 0 has the interval \[8.0, 1.0\] s"):
        read_units(path, problems=policy(spikes_outside_obs_intervals="ignore"))


# --- electrodes and labels --------------------------------------------------------------------


def test_unlinked_units_raise(shared_data):
    path = shared_data / "nwb" / "real" / "septum_hpc_DT9_stub.nwb"

    with pytest.raises(DataError) as error:
        read_units(path, problems=policy(unlinked_units="raise"))

    assert f"{path}: the Units table has no electrodes column and no unit_x/y/z columns" in str(error.value)
    assert "problems.unlinked_units: warn" in str(error.value)


def test_unknown_location_unlabelled(tmp_path, caplog):
    path = write_units_nwb(
        tmp_path / "a.nwb",
        [[0.1], [0.2], [0.3]],
        electrode_locations=["CA1", "Unknown", " n/a "],
        unit_electrodes=[[0], [1], [2]],
    )

    recording = read_units(path, labels={"region": LabelSpec("electrodes.location")})

    assert recording.labels["region"].tolist() == ["CA1", "", ""]
    messages = [message for message in reader_warnings(caplog) if "label 'region' is empty" in message]
    assert len(messages) == 1
    assert "for 2 of 3 units (unit ids 1, 2)" in messages[0]


def test_unknown_location_does_not_vote(tmp_path):
    path = write_units_nwb(
        tmp_path / "a.nwb",
        [[0.1]],
        electrode_locations=["unknown", "unknown", "DG"],
        unit_electrodes=[[0, 1, 2]],
    )

    recording = read_units(path, labels={"region": LabelSpec("electrodes.location")})

    assert recording.labels["region"].tolist() == ["DG"]


def test_empty_locations_raise(shared_data):
    path = shared_data / "nwb" / "real" / "phy_A8604-211122_unlabelled.nwb"

    with pytest.raises(DataError) as error:
        read_units(path, labels={"region": LabelSpec("units.location")}, problems=policy(missing_labels="raise"))

    assert "label 'region' is empty for 3 of 3 units (unit ids 6, 191, 206)" in str(error.value)
    assert "problems.missing_labels: warn" in str(error.value)


def point_electrode_outside(path: Path, row: int) -> Path:
    """Make the first link of the units' electrodes column point at ``row``."""
    with h5py.File(path, "a") as h5file:
        h5file["units/electrodes"][0] = row
    return path


def test_electrode_out_of_bounds_raises(tmp_path):
    path = write_units_nwb(
        tmp_path / "a.nwb",
        [[0.1], [0.2]],
        electrode_locations=["CA1", "DG"],
        electrode_xyz=[[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]],
        unit_electrodes=[[0], [1]],
    )
    point_electrode_outside(path, 7)

    with pytest.raises(DataError) as error:
        read_units(path)

    assert f"{path}: unit 0 links through 'electrodes' to row 7 of electrodes, which has rows 0 to 1" in str(error.value)
    assert "problems.region_out_of_bounds: warn" in str(error.value)


def test_electrode_out_of_bounds_dropped(tmp_path, caplog):
    path = write_units_nwb(
        tmp_path / "a.nwb",
        [[0.1], [0.2]],
        electrode_locations=["CA1", "DG"],
        electrode_xyz=[[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]],
        unit_electrodes=[[0], [1]],
    )
    point_electrode_outside(path, -3)

    recording = read_units(path, labels={"region": LabelSpec("electrodes.location")}, problems=policy(region_out_of_bounds="warn"))

    assert recording.labels["region"].tolist() == ["", "DG"]
    assert recording.position_source == "unit_row"
    assert any("units 0 link to no electrode" in message for message in reader_warnings(caplog))


def test_roi_out_of_bounds(tmp_path):
    path = write_ophys_nwb(tmp_path / "rois.nwb", np.ones((20, 3), dtype=np.float32), 3)
    with h5py.File(path, "a") as h5file:
        h5file["processing/ophys/DfOverF/RoiResponseSeries/rois"][1] = 9

    with pytest.raises(DataError, match="rois of 'DfOverF/RoiResponseSeries' points at row 9 of PlaneSegmentation, which has 3 ROIs"):
        read_ophys(path)
    recording = read_ophys(path, problems=policy(region_out_of_bounds="warn"))

    assert recording.roi_ids.tolist() == [100, 102]


# --- traces ---------------------------------------------------------------------------------


def test_transposed_traces_raise(tmp_path):
    path = write_ophys_nwb(tmp_path / "t.nwb", np.zeros((3, 50), dtype=np.float32), 3)

    with pytest.raises(DataError) as error:
        read_ophys(path, problems=policy(transposed_traces="raise"))

    assert "stores data as (ROIs, time) with shape (3, 50)" in str(error.value)
    assert "problems.transposed_traces: warn" in str(error.value)


def test_nonfinite_samples_raise(shared_data):
    with pytest.raises(DataError) as error:
        read_ophys(shared_data / "bugcases" / "B14_fluorescence_nan_inf.nwb", problems=policy(nonfinite_samples="raise"))

    assert "3 of 4 neurons have NaN or infinite samples (110 NaN, 1 infinite" in str(error.value)


def test_raw_integer_data_raise(shared_data):
    with pytest.raises(DataError, match="series 'unscaled' stores int16 data with the default conversion 1"):
        read_ophys(shared_data / "bugcases" / "B16_int16_conversion_offset.nwb", series="unscaled", problems=policy(raw_integer_data="raise"))


BAD_TIMESTAMPS = np.array([0.0, 0.1, np.nan, 0.3, 0.2, 0.4, 0.4, 0.5])


def test_invalid_timestamps_raise(tmp_path):
    data = np.arange(8 * 2, dtype=np.float32).reshape(8, 2)
    path = write_ophys_nwb(tmp_path / "t.nwb", data, 2, timestamps=BAD_TIMESTAMPS)

    with pytest.raises(DataError) as error:
        read_ophys(path)

    message = str(error.value)
    assert "1 NaN timestamps (first at sample 2)" in message
    assert "1 that go back in time (first at sample 4)" in message
    assert "1 that repeat the time before (first at sample 6)" in message
    assert "problems.invalid_timestamps: warn" in message


def test_invalid_timestamps_repaired(tmp_path):
    data = np.arange(8 * 2, dtype=np.float32).reshape(8, 2)
    path = write_ophys_nwb(tmp_path / "t.nwb", data, 2, timestamps=BAD_TIMESTAMPS)

    recording = read_ophys(path, problems=policy(invalid_timestamps="warn"))

    assert recording.timestamps_s.tolist() == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
    assert recording.traces[0].tolist() == [0.0, 2.0, 8.0, 6.0, 10.0, 14.0]
    assert recording.rate_hz == pytest.approx(10.0)


def test_timeseries_timestamps_repaired(tmp_path):
    path = write_timeseries_nwb(tmp_path / "ts.nwb", {"cell": {"data": np.arange(8.0), "timestamps": BAD_TIMESTAMPS}})

    with pytest.raises(DataError, match="series 'cell' has 1 NaN timestamps"):
        read_timeseries(path, "cell")
    recording = read_timeseries(path, "cell", problems=policy(invalid_timestamps="ignore"))

    assert recording.traces[0].tolist() == [0.0, 1.0, 4.0, 3.0, 5.0, 7.0]


def test_irregular_timestamps_warn_then_raise(tmp_path, caplog):
    timestamps = np.array([0.0, 0.1, 0.2, 0.5, 0.6, 0.7])
    path = write_ophys_nwb(tmp_path / "irregular.nwb", np.ones((6, 2), dtype=np.float32), 2, timestamps=timestamps)

    read_ophys(path)
    with pytest.raises(DataError, match="irregular timestamps: intervals differ from their median 0.1 s by up to 0.2 s"):
        read_ophys(path, problems=policy(irregular_timestamps="raise"))

    assert any("irregular timestamps" in message for message in reader_warnings(caplog))


def test_check_timestamps_regular():
    findings = check_timestamps(np.arange(100) / 30.0)

    assert not findings.invalid
    assert not findings.irregular
    assert repair_timestamps(np.array([0.2, np.nan, 0.1, 0.2]))[0].tolist() == [2, 0]


# --- file-level problems --------------------------------------------------------------------------


def test_naive_session_start(shared_data, tmp_path, caplog):
    path = copy_writable(shared_data / "nwb" / "real" / "septum_hpc_DT9_stub.nwb", tmp_path / "naive.nwb")
    with h5py.File(path, "a") as h5file:
        del h5file["session_start_time"]
        h5file.create_dataset("session_start_time", data=b"2017-04-28T00:00:00")

    recording = read_units(path)
    with pytest.raises(DataError) as error:
        read_units(path, problems=policy(naive_session_start="raise"))

    assert recording.n_neurons == 10
    assert any("session_start_time '2017-04-28T00:00:00' has no timezone" in message for message in reader_warnings(caplog))
    assert "store the time with its UTC offset" in str(error.value)


def test_old_schema_warns_and_raises(shared_data, caplog):
    path = shared_data / "nwb" / "real" / "thalamus_sub-anm00239123_ecephys_ogen.nwb"

    read_units(path)
    with pytest.raises(DataError, match="written with NWB schema 2.1.0"):
        read_units(path, problems=policy(old_schema="raise"))

    assert any("NWB schema 2.1.0" in message for message in reader_warnings(caplog))


def test_current_schema_not_old(shared_data, caplog):
    read_units(shared_data / "nwb" / "real" / "human_mtl_sub-4_ses-4.nwb")

    assert not [message for message in reader_warnings(caplog) if "NWB schema" in message]


def test_uncached_extension_unreadable(shared_data, tmp_path):
    path = copy_writable(shared_data / "nwb" / "compat" / "pynwb-2.1.0_nwbfile_with_extension.nwb", tmp_path / "ext.nwb")
    with h5py.File(path, "a") as h5file:
        del h5file["specifications/ndx-testextension"]

    with pytest.raises(SourceError) as error:
        with open_nwb(path):
            pass

    assert str(path) in str(error.value)
    assert "'ndx-testextension'" in str(error.value)
    assert "write the file again with the specification cached" in str(error.value)


LOADED_EXTENSION_SCRIPT = textwrap.dedent(
    """
    import json, sys, h5py, logging, pynwb
    from pathlib import Path
    from neurpir_nwb.io.nwbfile import open_nwb

    # Load the extension into pynwb from the spec the original file caches, as its package would.
    folder = Path(sys.argv[2])
    with h5py.File(sys.argv[1], "r") as h5file:
        spec = h5file["specifications/ndx-testextension/0.1.0"]
        for name in spec:
            text = spec[name][()]
            (folder / name).write_text(text.decode() if isinstance(text, bytes) else text)
    pynwb.load_namespaces(str(folder / "namespace"))

    messages = []
    logging.getLogger("neurpir_nwb").addHandler(type("H", (logging.Handler,), {"emit": lambda self, r: messages.append(r.getMessage())})())
    with open_nwb(sys.argv[3]) as (_, nwbfile):
        print(json.dumps({"acquisition": sorted(nwbfile.acquisition), "messages": messages}))
    """
)


def test_uncached_extension_loaded_warns(shared_data, tmp_path):
    import json

    original = shared_data / "nwb" / "compat" / "pynwb-2.1.0_nwbfile_with_extension.nwb"
    path = copy_writable(original, tmp_path / "ext.nwb")
    with h5py.File(path, "a") as h5file:
        del h5file["specifications/ndx-testextension"]
    spec_folder = tmp_path / "spec"
    spec_folder.mkdir()

    result = subprocess.run(
        [sys.executable, "-c", LOADED_EXTENSION_SCRIPT, str(original), str(spec_folder), str(path)],
        capture_output=True,
        text=True,
        cwd=REPOSITORY,
        timeout=120,
    )

    assert result.returncode == 0, result.stderr
    output = json.loads(result.stdout.strip().splitlines()[-1])
    assert output["acquisition"] == ["test_ts"]
    assert any("uses the extension namespace 'ndx-testextension'" in message and "without caching" in message for message in output["messages"])


def test_handler_collects_without_raising():
    from neurpir_nwb.io.problems import Problem

    handler = ProblemHandler(collect=True)
    action = handler.report(Problem(kind="descending_spike_times", description="x", fix="y"))

    assert action == "raise"
    assert [problem.kind for problem in handler.found] == ["descending_spike_times"]
    with pytest.raises(DataError, match="damaged; fix it"):
        handler.report(Problem(kind="unreadable", description="damaged", fix="fix it"))


# --- the bug catalogue --------------------------------------------------------------------------


def test_catalogue_lists_every_problem():
    catalogue = (REPOSITORY / "docs" / "robustness.md").read_text()

    for name in ProblemPolicy.model_fields:
        assert f"| `{name}` |" in catalogue, name


def test_catalogue_tests_exist():
    import re

    catalogue = (REPOSITORY / "docs" / "robustness.md").read_text()
    references = set(re.findall(r"(tests/[\w/]+\.py)::(\w+)", catalogue))

    assert len(references) > 40
    for file_name, test_name in sorted(references):
        source = (REPOSITORY / file_name).read_text()
        assert f"def {test_name}(" in source, f"{file_name}::{test_name}"
