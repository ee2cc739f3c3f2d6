"""Tests of the Units reader on the bug-case files, real NWB files and files built with pynwb."""

import logging

import numpy as np
import pytest
from pynwb import NWBHDF5IO, NWBFile
from pynwb.misc import Units

from neurpir_nwb.errors import DataError, RecipeError, SourceError
from neurpir_nwb.io import units as units_module
from neurpir_nwb.io.units import LabelSpec, parse_structured_location, read_units
from neurpir_nwb.testing import SESSION_START_TIME, write_units_nwb

LOGGER = "neurpir_nwb.io.units"


def unit_warnings(caplog) -> list[str]:
    """Return the warning messages that the Units reader logged."""
    records = [record for record in caplog.records if record.name == LOGGER]
    return [record.getMessage() for record in records if record.levelno == logging.WARNING]


def matching(messages: list[str], *parts: str) -> list[str]:
    """Return the messages that contain every one of ``parts``."""
    return [message for message in messages if all(part in message for part in parts)]


# --- known failure modes ---------------------------------------------------------------------


def test_zero_spike_units_kept(shared_data, caplog):
    path = shared_data / "bugcases" / "B01_units_zero_spikes.nwb"

    recording = read_units(path)

    assert recording.spike_counts.tolist() == [0, 3, 0, 0, 2, 0]
    assert recording.empty.tolist() == [True, False, True, True, False, True]
    assert recording.unit_ids.tolist() == [0, 1, 2, 3, 4, 5]
    assert recording.spike_times[1].tolist() == [0.5, 1.0, 1.5]
    assert recording.spike_times[4].tolist() == [2.0, 2.25]
    assert recording.t_start_s == 0.5
    assert recording.t_stop_s == 2.25

    empty_warnings = matching(unit_warnings(caplog), "no spike times")
    assert len(empty_warnings) == 1
    assert "unit ids 0, 2, 3, 5" in empty_warnings[0]
    assert str(path) in empty_warnings[0]


def test_descending_train_raises(shared_data):
    path = shared_data / "bugcases" / "B02_spike_times_not_ascending.nwb"

    with pytest.raises(DataError) as error:
        read_units(path)

    message = str(error.value)
    assert str(path) in message
    assert "unit 1 " in message
    assert "index 3" in message
    assert "7.0" in message
    assert "0.05" in message
    assert "trial-relative" in message
    assert "sort_spikes: true" in message


def test_sort_opt_in_keeps_duplicates(shared_data, caplog):
    path = shared_data / "bugcases" / "B02_spike_times_not_ascending.nwb"

    recording = read_units(path, sort_spikes=True)

    assert recording.spike_times[1].tolist() == [0.05, 1.0, 2.0, 5.0, 6.0, 7.0]
    assert recording.spike_times[2].tolist() == [1.0, 1.5, 1.5, 2.0]
    assert recording.repairs["units_sorted"] == 1
    assert recording.repairs["equal_times_kept"] == 1

    messages = unit_warnings(caplog)
    assert len(matching(messages, "unit 1:", "sorted")) == 1
    assert len(matching(messages, "unit 2:", "kept 1 duplicate spike times")) == 1


def test_unsorted_train_raises_by_default(shared_data):
    path = shared_data / "bugcases" / "B03_unsorted_and_sentinel_spikes.nwb"

    with pytest.raises(DataError) as error:
        read_units(path)

    message = str(error.value)
    assert "unit 0 " in message
    assert "index 1" in message
    assert "0.9" in message
    assert "0.8" in message


def test_sorted_and_sentinels_dropped(shared_data, caplog):
    path = shared_data / "bugcases" / "B03_unsorted_and_sentinel_spikes.nwb"

    recording = read_units(path, sort_spikes=True)

    assert recording.spike_times[0].tolist() == [0.1, 0.2, 0.3, 0.8, 0.9]
    assert recording.spike_times[1].tolist() == [0.25, 0.75]
    counts, _ = np.histogram(recording.spike_times[0], bins=[0.0, 0.5, 1.0])
    assert counts.tolist() == [3, 2]
    assert recording.repairs["negative_dropped"] == 2

    negative_warnings = matching(unit_warnings(caplog), "unit 1:", "negative")
    assert len(negative_warnings) == 1
    assert "dropped 2 negative spike times" in negative_warnings[0]


def test_nan_dropped_per_unit(shared_data, caplog):
    path = shared_data / "bugcases" / "B05_spike_times_nan.nwb"

    recording = read_units(path)

    assert recording.spike_times[0].tolist() == [0.1, 0.2, 0.3]
    assert recording.spike_times[1].tolist() == [0.15, 0.9]
    assert all(np.isfinite(train).all() for train in recording.spike_times)
    assert recording.repairs == {"nan_dropped": 2}

    nan_warnings = matching(unit_warnings(caplog), "non-finite")
    assert len(nan_warnings) == 1
    assert "unit 1: dropped 2 non-finite spike times" in nan_warnings[0]


def test_region_column_labels(shared_data):
    path = shared_data / "bugcases" / "B09_units_max_electrode_region.nwb"

    recording = read_units(path, labels={"region": LabelSpec("units.max_electrode.location")})

    assert recording.labels["region"].tolist() == ["CA1", "DG", "DG"]


def test_byte_strings_decoded(shared_data):
    path = shared_data / "bugcases" / "B22_strings_as_bytes.nwb"
    labels = {
        "cell_type": LabelSpec("units.cell_type"),
        "region": LabelSpec("electrodes.location"),
        "shank": LabelSpec("electrodes.group_name"),
    }

    recording = read_units(path, labels=labels)

    assert recording.labels["cell_type"][0] == "pyramidal"
    assert recording.labels["cell_type"].tolist() == ["pyramidal", "granule", "PV"]
    assert recording.labels["region"].tolist() == ["CA1", "DG", "CA3"]
    assert recording.labels["shank"].tolist() == ["shank0", "shank0", "shank0"]
    for values in recording.labels.values():
        assert all(type(value) is np.str_ for value in values)
    assert recording.position_source == "electrode_row"
    assert recording.positions[:, 0].tolist() == [0.0, 1.0, 2.0]


# --- real files --------------------------------------------------------------------


def test_human_mtl_units(shared_data):
    path = shared_data / "nwb" / "real" / "human_mtl_sub-4_ses-4.nwb"

    recording = read_units(path, labels={"region": LabelSpec("electrodes.location")})

    assert recording.n_neurons == 35
    assert int(recording.spike_counts.sum()) == 214_278
    assert set(recording.labels["region"].tolist()) == {"hippocampus_right", "amygdala_right"}
    assert recording.position_source == "electrode_xyz"
    assert recording.positions.shape == (35, 3)
    assert np.isfinite(recording.positions).all()
    assert recording.positions[0].tolist() == [26.63, -15.83, -16.49]
    assert recording.t_start_s == pytest.approx(0.00786, abs=1e-4)
    assert recording.t_stop_s == pytest.approx(2821.07, abs=0.01)
    assert recording.nwb_version == "2.4.0"
    assert recording.identifier == "TWH103_CBID4"
    assert recording.session == "4"
    assert recording.subject == "4"
    assert recording.table == "units"
    assert recording.rows.tolist() == list(range(35))
    assert recording.neuron_ids[0] == "TWH103_CBID4/units/0"
    assert recording.repairs == {}


def test_alm_descending_by_default(shared_data):
    path = shared_data / "nwb" / "real" / "alm_sub-anm369963_ses-20170228.nwb"

    with pytest.raises(DataError, match="unit 1001 descend"):
        read_units(path)


def test_alm_structured_location(shared_data):
    path = shared_data / "nwb" / "real" / "alm_sub-anm369963_ses-20170228.nwb"
    labels = {
        "region": LabelSpec("electrodes.location", field="brain_region"),
        "layer": LabelSpec("electrodes.location", field="cortical_layer"),
        "cell_type": LabelSpec("units.cell_type"),
    }

    recording = read_units(path, labels=labels, sort_spikes=True)

    assert recording.unit_ids.tolist() == [1001]
    assert recording.spike_counts.tolist() == [1679]
    assert recording.labels["region"].tolist() == ["ALM"]
    assert recording.labels["layer"].tolist() == ["5"]
    assert recording.labels["cell_type"].tolist() == ["PTlower"]
    assert recording.subject == "anm369963"
    assert recording.nwb_version == "2.0.2"
    assert recording.repairs == {"units_sorted": 1}
    assert np.all(np.diff(recording.spike_times[0]) >= 0)


def test_thalamus_unit_xyz(shared_data):
    path = shared_data / "nwb" / "real" / "thalamus_sub-anm00239123_ecephys_ogen.nwb"

    recording = read_units(path, labels={"cell_type": LabelSpec("units.cell_type")})

    assert recording.n_neurons == 4
    assert int(recording.spike_counts.sum()) == 34_057
    assert recording.position_source == "unit_xyz"
    assert recording.positions[:, 0].tolist() == [0.438813, 0.754594, 0.996374, 1.11818]
    assert recording.positions[0, 1] == -4.41125
    assert set(recording.labels["cell_type"].tolist()) == {"Narrow width spiking", "Cannot be determined"}
    assert recording.unit_ids.tolist() == [1, 2, 3, 4]


def test_septum_without_electrode_link(shared_data, caplog):
    path = shared_data / "nwb" / "real" / "septum_hpc_DT9_stub.nwb"

    recording = read_units(path)

    assert recording.n_neurons == 10
    assert int(recording.spike_counts.sum()) == 1725
    assert recording.position_source == "unit_row"
    assert recording.positions[:, 0].tolist() == list(range(10))
    assert np.isfinite(recording.positions).all()
    assert recording.session == "20170428_0um_0um_merge"
    assert recording.subject == "DT9"
    assert len(matching(unit_warnings(caplog), "unit row numbers")) == 1


def test_septum_electrode_label_raises(shared_data):
    path = shared_data / "nwb" / "real" / "septum_hpc_DT9_stub.nwb"

    with pytest.raises(DataError) as error:
        read_units(path, labels={"region": LabelSpec("electrodes.location")})

    assert str(path) in str(error.value)
    assert "no 'electrodes' column" in str(error.value)


def test_phy_empty_locations(shared_data):
    path = shared_data / "nwb" / "real" / "phy_A8604-211122_unlabelled.nwb"

    recording = read_units(path, labels={"region": LabelSpec("units.location")})

    assert recording.labels["region"].tolist() == ["", "", ""]
    assert recording.unit_ids.tolist() == [6, 191, 206]
    assert recording.subject == ""


def test_cut_index_raises(shared_data):
    path = shared_data / "nwb" / "real" / "allen_vcnp_stub_ndx-aibs.nwb"

    with pytest.raises(DataError) as error:
        read_units(path)

    assert "spike_times_index of unit 951791918" in str(error.value)
    assert "damaged or was cut" in str(error.value)


def test_truncated_file_raises(shared_data):
    with pytest.raises(SourceError, match="truncated"):
        read_units(shared_data / "bugcases" / "B25_truncated_download.nwb")


# --- files built with pynwb --------------------------------------------------------


def test_built_file_round_trip(tmp_path):
    trains = [[0.5, 1.0], [2.0, 3.0, 4.0]]
    path = write_units_nwb(tmp_path / "a.nwb", trains, identifier="ident", session_id="ses-1", subject_id="m7")

    recording = read_units(path)

    assert [train.tolist() for train in recording.spike_times] == trains
    assert recording.identifier == "ident"
    assert recording.session == "ses-1"
    assert recording.subject == "m7"
    assert recording.neuron_ids == ["ident/units/0", "ident/units/1"]
    assert recording.t_start_s == 0.5
    assert recording.t_stop_s == 4.0
    assert recording.path == path


def test_session_defaults_to_identifier(tmp_path):
    path = write_units_nwb(tmp_path / "a.nwb", [[0.5]], identifier="ident", subject_id=None)

    recording = read_units(path)

    assert recording.session == "ident"
    assert recording.subject == ""


def test_raw_index_in_descent_error(tmp_path):
    path = write_units_nwb(tmp_path / "a.nwb", [[0.1, 0.2], [0.5, np.nan, 0.7, 0.6]])

    with pytest.raises(DataError) as error:
        read_units(path)

    assert "unit 1 descend at index 3, from 0.7 to 0.6 s" in str(error.value)


def test_sanitise_before_order_check(tmp_path):
    # A sentinel between two spikes would read as a descent if the order were checked first.
    path = write_units_nwb(tmp_path / "a.nwb", [[-1.0, 0.1, -1.0, 0.2, np.nan, 0.3, np.inf]])

    recording = read_units(path)

    assert recording.spike_times[0].tolist() == [0.1, 0.2, 0.3]
    assert recording.repairs == {"nan_dropped": 2, "negative_dropped": 2}


def test_all_units_empty(tmp_path, caplog):
    path = write_units_nwb(tmp_path / "a.nwb", [[], [np.nan]])

    recording = read_units(path)

    assert recording.spike_counts.tolist() == [0, 0]
    assert recording.t_start_s == 0.0
    assert recording.t_stop_s == 0.0
    assert len(matching(unit_warnings(caplog), "2 of 2 units have no spike times", "unit ids 0, 1")) == 1


def test_per_unit_warnings_capped(tmp_path, caplog):
    n_units = units_module.MAX_LOGGED_UNITS + 5
    path = write_units_nwb(tmp_path / "a.nwb", [[0.1, np.nan]] * n_units)

    recording = read_units(path)

    messages = matching(unit_warnings(caplog), "non-finite")
    assert len(messages) == units_module.MAX_LOGGED_UNITS + 1
    assert "5 more units: dropped 5 non-finite spike times" in messages[-1]
    assert recording.repairs["nan_dropped"] == n_units


def test_electrode_xyz_mean(tmp_path):
    path = write_units_nwb(
        tmp_path / "a.nwb",
        [[0.1], [0.2]],
        electrode_locations=["CA1", "CA1", "DG"],
        electrode_xyz=[[0.0, 0.0, 0.0], [2.0, 4.0, 6.0], [10.0, 10.0, 10.0]],
        unit_electrodes=[[0, 1], [2]],
    )

    recording = read_units(path)

    assert recording.position_source == "electrode_xyz"
    assert recording.positions.tolist() == [[1.0, 2.0, 3.0], [10.0, 10.0, 10.0]]


def test_electrode_row_without_xyz(tmp_path, caplog):
    path = write_units_nwb(
        tmp_path / "a.nwb",
        [[0.1], [0.2]],
        electrode_locations=["CA1", "CA1", "DG"],
        unit_electrodes=[[2, 0], [1]],
    )

    recording = read_units(path)

    assert recording.position_source == "electrode_row"
    assert recording.positions.tolist() == [[2.0, 0.0, 0.0], [1.0, 0.0, 0.0]]
    assert len(matching(unit_warnings(caplog), "first electrode")) == 1


def test_unlinked_unit_uses_unit_rows(tmp_path, caplog):
    path = write_units_nwb(
        tmp_path / "a.nwb",
        [[0.1], [0.2], [0.3]],
        electrode_locations=["CA1", "DG"],
        electrode_xyz=[[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]],
        unit_electrodes=[[0], [], [1]],
    )

    recording = read_units(path, labels={"region": LabelSpec("electrodes.location")})

    assert recording.position_source == "unit_row"
    assert recording.positions[:, 0].tolist() == [0.0, 1.0, 2.0]
    assert recording.labels["region"].tolist() == ["CA1", "", "DG"]
    assert len(matching(unit_warnings(caplog), "units 1 link to no electrode")) == 1


def test_unit_xyz_not_finite_falls_back(tmp_path):
    path = write_units_nwb(
        tmp_path / "a.nwb",
        [[0.1], [0.2]],
        unit_xyz=[[1.0, 2.0, 3.0], [np.nan, 0.0, 0.0]],
        electrode_locations=["CA1"],
        electrode_xyz=[[5.0, 6.0, 7.0]],
        unit_electrodes=[[0], [0]],
    )

    recording = read_units(path)

    assert recording.position_source == "electrode_xyz"
    assert recording.positions.tolist() == [[5.0, 6.0, 7.0], [5.0, 6.0, 7.0]]


def test_majority_label_and_ties(tmp_path):
    path = write_units_nwb(
        tmp_path / "a.nwb",
        [[0.1], [0.2], [0.3], [0.4]],
        electrode_locations=["CA1", "DG", "DG", " ", "CA3"],
        unit_electrodes=[[0, 1, 2], [0, 1], [1, 0], [3, 3, 4]],
    )

    recording = read_units(path, labels={"region": LabelSpec("electrodes.location")})

    # Majority, ties to the first linked electrode, and a blank location that does not vote.
    assert recording.labels["region"].tolist() == ["DG", "CA1", "DG", "CA3"]


def test_units_column_labels(tmp_path):
    path = write_units_nwb(
        tmp_path / "a.nwb",
        [[0.1], [0.2]],
        unit_columns={"cell_type": [" pyramidal ", ""], "depth_um": [780.0, np.nan]},
    )

    labels = {"cell_type": LabelSpec("units.cell_type"), "depth": LabelSpec("units.depth_um")}
    recording = read_units(path, labels=labels)

    assert recording.labels["cell_type"].tolist() == ["pyramidal", ""]
    assert recording.labels["depth"].tolist() == ["780.0", ""]


def test_structured_field_missing_warns(tmp_path, caplog):
    path = write_units_nwb(
        tmp_path / "a.nwb",
        [[0.1], [0.2]],
        electrode_locations=["brain_region: ALM; cortical_layer: 5", "VISp"],
        unit_electrodes=[[0], [1]],
    )

    labels = {"layer": LabelSpec("electrodes.location", field="cortical_layer")}
    recording = read_units(path, labels=labels)

    assert recording.labels["layer"].tolist() == ["5", ""]
    assert len(matching(unit_warnings(caplog), "label 'layer' is empty for 1 of 2 units")) == 1


def test_missing_label_column_raises(tmp_path):
    path = write_units_nwb(tmp_path / "a.nwb", [[0.1]])

    with pytest.raises(DataError) as error:
        read_units(path, labels={"cell_type": LabelSpec("units.cell_type")})

    assert str(path) in str(error.value)
    assert "no column 'cell_type'" in str(error.value)
    assert "spike_times" in str(error.value)


def test_region_column_as_label_raises(tmp_path):
    path = write_units_nwb(tmp_path / "a.nwb", [[0.1]], electrode_locations=["CA1"], unit_electrodes=[[0]])

    with pytest.raises(DataError, match="units.electrodes.location"):
        read_units(path, labels={"region": LabelSpec("units.electrodes")})


def test_plain_column_as_region_raises(tmp_path):
    path = write_units_nwb(tmp_path / "a.nwb", [[0.1]], unit_columns={"quality": ["good"]})

    with pytest.raises(DataError, match="does not link to another table"):
        read_units(path, labels={"region": LabelSpec("units.quality.location")})


@pytest.mark.parametrize("source", ["location", "units", "units.", "subject.species", "units.a.b.c", ""])
def test_label_spec_invalid_source(source):
    with pytest.raises(RecipeError, match="label source"):
        LabelSpec(source)


def test_label_spec_parts():
    assert (LabelSpec("units.cell_type").region_column, LabelSpec("units.cell_type").column) == (None, "cell_type")
    assert LabelSpec("electrodes.location").region_column == "electrodes"
    assert LabelSpec("units.max_electrode.location").region_column == "max_electrode"
    assert LabelSpec("units.max_electrode.location").column == "location"


def test_file_without_units_raises(tmp_path):
    path = tmp_path / "empty.nwb"
    with NWBHDF5IO(str(path), "w") as io:
        io.write(NWBFile(session_description="no units", identifier="e", session_start_time=SESSION_START_TIME))

    with pytest.raises(DataError) as error:
        read_units(path)

    assert str(path) in str(error.value)
    assert "has no Units table" in str(error.value)


def test_units_without_spike_times_raises(tmp_path):
    path = tmp_path / "quality.nwb"
    nwbfile = NWBFile(session_description="no spikes", identifier="q", session_start_time=SESSION_START_TIME)
    nwbfile.add_unit_column(name="quality", description="sorting quality")
    nwbfile.add_unit(quality="good")
    with NWBHDF5IO(str(path), "w") as io:
        io.write(nwbfile)

    with pytest.raises(DataError) as error:
        read_units(path)

    assert str(path) in str(error.value)
    assert "no spike_times column" in str(error.value)


def test_reads_trains_in_bulk(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("spike trains must be read in bulk")

    monkeypatch.setattr(Units, "get_unit_spike_times", fail)
    monkeypatch.setattr(Units, "to_dataframe", fail)
    path = write_units_nwb(
        tmp_path / "a.nwb",
        [[0.1, 0.2], [0.3]],
        electrode_locations=["CA1"],
        unit_electrodes=[[0], [0]],
    )

    recording = read_units(path, labels={"region": LabelSpec("electrodes.location")})

    assert recording.spike_counts.tolist() == [2, 1]


# --- structured location strings ---------------------------------------------------


def test_parse_structured_location():
    text = "brain_region: ALM; brain_subregion: N/A; cortical_layer: 5; hemisphere: left"

    assert parse_structured_location(text) == {
        "brain_region": "ALM",
        "brain_subregion": "N/A",
        "cortical_layer": "5",
        "hemisphere": "left",
    }


@pytest.mark.parametrize("text", ["CA1", "", "hippocampus_right", "brain_region: ALM; left"])
def test_parse_plain_location(text):
    assert parse_structured_location(text) == {}


def test_parse_trailing_separator():
    assert parse_structured_location("a: 1; b: x:y;") == {"a": "1", "b": "x:y"}
