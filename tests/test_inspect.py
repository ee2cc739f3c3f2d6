"""``neurpir-nwb inspect``: reports of the shared files, the recipe's policy, DANDI streams and large files."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
from pynwb import NWBHDF5IO, TimeSeries
from pynwb.ophys import Fluorescence, ImageSegmentation, PlaneSegmentation, RoiResponseSeries
from pynwb.testing.mock.file import mock_NWBFile
from pynwb.testing.mock.ophys import mock_ImagingPlane

from neurpir_nwb.cli.app import main
from neurpir_nwb.inspect import MAX_INSPECT_SPIKES, exit_status, format_report, inspect_file, inspect_recipe_sources, inspect_sources
from neurpir_nwb.recipe import load_recipe
from neurpir_nwb.testing import write_units_nwb
from tests.dandi_server import DRAFT_ONLY_ID, PUBLISHED_ID, THALAMUS, dandi_server, standard_files  # noqa: F401

REPOSITORY = Path(__file__).resolve().parents[1]

# pynwb warns about an OpticalSeries of the human MTL file on every read.
pytestmark = pytest.mark.filterwarnings("ignore:OpticalSeries 'StimulusPresentation_encoding'")

#: Exit status of `neurpir-nwb inspect` for every shared file under the default policy.
EXPECTED_STATUS = {
    "bugcases/B01_units_zero_spikes.nwb": 0,
    "bugcases/B02_spike_times_not_ascending.nwb": 1,
    "bugcases/B03_unsorted_and_sentinel_spikes.nwb": 1,
    "bugcases/B05_spike_times_nan.nwb": 0,
    "bugcases/B09_units_max_electrode_region.nwb": 0,
    "bugcases/B12_roi_subset_two_planes.nwb": 0,
    "bugcases/B14_fluorescence_nan_inf.nwb": 0,
    "bugcases/B16_int16_conversion_offset.nwb": 1,
    "bugcases/B19a_appended_ok.nwb": 0,
    "bugcases/B22_strings_as_bytes.nwb": 0,
    "bugcases/B25_truncated_download.nwb": 2,
    "nwb/compat/core-2.10_doric_fiber_photometry.nwb": 0,
    "nwb/compat/extension_mylab_cached.nwb": 1,
    "nwb/compat/matnwb-2.0b_ecephys_tutorial.nwb": 2,
    "nwb/compat/nwb1_allen_ophys_skinny.nwb": 2,
    "nwb/compat/nwb1_meister_retina_20080606_R1.nwb": 2,
    "nwb/compat/prerelease-1.2.0_sample.nwb": 2,
    "nwb/compat/pynwb-1.0.2_nwbfile.nwb": 1,
    "nwb/compat/pynwb-1.0.3_nwbfile.nwb": 1,
    "nwb/compat/pynwb-1.1.2_nwbfile.nwb": 1,
    "nwb/compat/pynwb-1.2.1_extension.nwb": 1,
    "nwb/compat/pynwb-1.3.3_timeseries_no_data.nwb": 1,
    "nwb/compat/pynwb-1.5.1_timeintervals_non_ndtype_tsref.nwb": 0,
    "nwb/compat/pynwb-2.1.0_nwbfile_with_extension.nwb": 0,
    "nwb/compat/pynwb-2.2.0_subject_no_age__reference.nwb": 1,
    "nwb/compat/pynwb-2.3.2_old_electrodes_table_full.nwb": 1,
    "nwb/compat/pynwb-2.6.0_DynamicTableElectrodes.nwb": 1,
    "nwb/real/allen_vcnp_stub_ndx-aibs.nwb": 1,
    "nwb/real/alm_sub-anm369963_ses-20170228.nwb": 1,
    "nwb/real/alm_sub-anm372793_ses-20170508.nwb": 1,
    "nwb/real/celegans_wholebrain_timeseries.nwb": 0,
    "nwb/real/human_mtl_sub-4_ses-4.nwb": 0,
    "nwb/real/ophys_suite2p_15rois.nwb": 0,
    "nwb/real/phy_A8604-211122_unlabelled.nwb": 0,
    "nwb/real/septum_hpc_DT9_stub.nwb": 0,
    "nwb/real/thalamus_sub-anm00239123_ecephys_ogen.nwb": 0,
}


def run_inspect(capsys, *arguments: str) -> tuple[int, str, str]:
    """Run ``neurpir-nwb inspect`` in this process and return its exit status, standard output and error."""
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", *arguments])
        raise SystemExit(0)
    captured = capsys.readouterr()
    return int(exit_info.value.code or 0), captured.out, captured.err


def one_report(path) -> dict:
    (report,) = inspect_sources([path])
    return report


def problems_of(report, kind: str) -> list:
    return [problem for problem in report.all_problems if problem.kind == kind]


def write_recipe(folder: Path, text: str) -> Path:
    path = folder / "recipe.yaml"
    path.write_text(textwrap.dedent(text))
    return path


# --- every shared file ---------------------------------------------------------------------------


def test_expected_status_lists_every_shared_file(shared_data):
    on_disk = {str(path.relative_to(shared_data)) for path in shared_data.rglob("*.nwb")}

    assert on_disk == set(EXPECTED_STATUS)


@pytest.mark.parametrize("name", sorted(EXPECTED_STATUS))
def test_cli_status_of_shared_file(shared_data, capsys, name):
    status, out, err = run_inspect(capsys, str(shared_data / name))

    assert status == EXPECTED_STATUS[name], out + err
    assert "Traceback" not in out + err
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    if status == 2:
        assert len(error_lines) == 1
        assert name.rsplit("/", 1)[-1] in error_lines[0]
        assert out == ""
    else:
        assert error_lines == []
        assert out.splitlines()[0] == str(shared_data / name)
        assert out.splitlines()[-1].startswith("  status: loadable")


def test_all_files_in_one_run_without_traceback(shared_data):
    files = [str(shared_data / name) for name in sorted(EXPECTED_STATUS)]
    environment = {**os.environ, "PYTHONPATH": str(REPOSITORY)}

    result = subprocess.run(
        [sys.executable, "-m", "neurpir_nwb", "inspect", "--json", *files],
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
    )

    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    document = json.loads(result.stdout)
    assert [entry["exit_status"] for entry in document["files"]] == [EXPECTED_STATUS[name] for name in sorted(EXPECTED_STATUS)]
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1
    assert "and 4 more files cannot be loaded" in error_lines[0]


# --- exact values of the shared files -------------------------------------------------------------


def test_zero_spike_units_reported(shared_data):
    report = one_report(shared_data / "bugcases" / "B01_units_zero_spikes.nwb")

    (table,) = report.tables
    assert (table.neurons, table.events) == (6, 5)
    assert (table.t_start_s, table.t_stop_s) == (0.5, 2.25)
    (empty,) = problems_of(report, "empty_units")
    assert empty.neurons == ["0", "2", "3", "5"]
    assert empty.action(report.policy) == "warn"


def test_descending_train_exit_one(shared_data):
    report = one_report(shared_data / "bugcases" / "B02_spike_times_not_ascending.nwb")

    (descending,) = problems_of(report, "descending_spike_times")
    assert descending.neurons == ["1"]
    assert "index 3" in descending.description
    assert "7.0" in descending.description
    assert "0.05" in descending.description
    (duplicates,) = problems_of(report, "duplicate_spike_times")
    assert duplicates.neurons == ["2"]
    assert "1.5" in duplicates.description
    assert report.exit_status == 1


def test_recipe_sorting_accepts_descending(shared_data, tmp_path):
    recipe = load_recipe(
        write_recipe(
            tmp_path,
            """\
            name: sorted
            sources: [{path: unused.nwb}]
            units: {sort_spikes: true}
            """,
        )
    )

    (report,) = inspect_sources([shared_data / "bugcases" / "B02_spike_times_not_ascending.nwb"], recipe=recipe)

    assert problems_of(report, "descending_spike_times")[0].action(report.policy) == "warn"
    assert report.exit_status == 0


def test_recipe_policy_refuses_nan(shared_data, tmp_path, capsys):
    recipe = write_recipe(
        tmp_path,
        """\
        name: strict
        sources: [{path: unused.nwb}]
        problems: {nonfinite_spike_times: raise}
        """,
    )
    path = shared_data / "bugcases" / "B05_spike_times_nan.nwb"

    status, out, _ = run_inspect(capsys, str(path), "--recipe", str(recipe))

    assert status == 1
    assert "[raise] nonfinite_spike_times (1 neuron)" in out
    assert "unit 1 has 2 NaN or infinite spike times" in out
    assert "problems.nonfinite_spike_times: warn" in out


def test_sentinels_counted_descent_raised(shared_data):
    report = one_report(shared_data / "bugcases" / "B03_unsorted_and_sentinel_spikes.nwb")

    (negative,) = problems_of(report, "negative_spike_times")
    assert (negative.neurons, negative.count) == (["1"], 2)
    (descending,) = problems_of(report, "descending_spike_times")
    assert descending.neurons == ["0"]
    assert "0.9" in descending.description
    assert "0.8" in descending.description


def test_max_electrode_labels_found(shared_data):
    report = one_report(shared_data / "bugcases" / "B09_units_max_electrode_region.nwb")

    labels = report.tables[0].labels
    assert labels["units.max_electrode.location"]["values"] == {"DG": 2, "CA1": 1}


def test_two_planes_by_recipe(shared_data, tmp_path):
    path = shared_data / "bugcases" / "B12_roi_subset_two_planes.nwb"
    recipe = load_recipe(
        write_recipe(
            tmp_path,
            """\
            name: planes
            sources: [{path: unused.nwb, ophys: {source: Fluorescence}}]
            """,
        )
    )

    default = one_report(path)
    (report,) = inspect_sources([path], recipe=recipe)

    assert default.tables[0].neurons == 3
    assert default.tables[0].details["available_series"] == ["DfOverF/plane0", "Fluorescence/plane0", "Fluorescence/plane1"]
    (table,) = report.tables
    assert table.neurons == 7
    assert table.details["planes"] == ["PlaneSegmentation_plane0", "PlaneSegmentation_plane1"]
    assert table.rate_hz == pytest.approx(10.0)


def test_nan_inf_counted(shared_data):
    report = one_report(shared_data / "bugcases" / "B14_fluorescence_nan_inf.nwb")

    (problem,) = problems_of(report, "nonfinite_samples")
    assert problem.neurons == [f"ROI {roi} of PlaneSegmentation_plane0" for roi in (1, 2, 3)]
    assert problem.count == 111
    assert "110 NaN, 1 infinite" in problem.description
    assert "1 of them have no finite sample (ROI 1 of PlaneSegmentation_plane0)" in problem.description


def test_raw_counts_and_shared_rois(shared_data):
    report = one_report(shared_data / "bugcases" / "B16_int16_conversion_offset.nwb")

    (raw,) = problems_of(report, "raw_integer_data")
    assert "'unscaled'" in raw.description
    assert "int16" in raw.description
    (unreadable,) = problems_of(report, "unreadable")
    assert "ROI 0 of PlaneSegmentation_plane0 has traces in both" in unreadable.description


def test_byte_string_labels_found(shared_data):
    report = one_report(shared_data / "bugcases" / "B22_strings_as_bytes.nwb")

    labels = report.tables[0].labels
    assert labels["units.cell_type"]["values"] == {"pyramidal": 1, "granule": 1, "PV": 1}
    assert labels["electrodes.location"]["values"] == {"CA1": 1, "DG": 1, "CA3": 1}


def test_truncated_file_not_loadable(shared_data):
    report = one_report(shared_data / "bugcases" / "B25_truncated_download.nwb")

    assert not report.loadable
    assert "truncated (143558 of 239264 bytes)" in report.error


def test_human_mtl_summary(shared_data):
    report = one_report(shared_data / "nwb" / "real" / "human_mtl_sub-4_ses-4.nwb")

    (table,) = report.tables
    assert report.modality == "ecephys"
    assert (table.neurons, table.events) == (35, 214_278)
    assert table.t_start_s == pytest.approx(0.00786, abs=1e-4)
    assert table.t_stop_s == pytest.approx(2821.07, abs=0.01)
    assert table.positions == "electrode_xyz"
    assert table.labels["electrodes.location"] == {"values": {"hippocampus_right": 25, "amygdala_right": 10}, "missing": 0}
    assert report.all_problems == []
    assert report.nwb_version == "2.4.0"


def test_alm_structured_location_fields(shared_data):
    report = one_report(shared_data / "nwb" / "real" / "alm_sub-anm372793_ses-20170508.nwb")

    (table,) = report.tables
    assert (table.neurons, table.events) == (1, 2434)
    assert table.labels["units.cell_type"]["values"] == {"PTupper": 1}
    fields = table.labels["electrodes.location"]["fields"]
    assert fields["brain_region"]["values"] == {"ALM": 1}
    assert fields["cortical_layer"]["values"] == {"5": 1}
    assert fields["brain_subregion"] == {"values": {}, "missing": 1}
    assert [problem.kind for problem in report.all_problems] == ["old_schema", "descending_spike_times"]


def test_thalamus_unit_positions(shared_data):
    report = one_report(shared_data / "nwb" / "real" / "thalamus_sub-anm00239123_ecephys_ogen.nwb")

    (table,) = report.tables
    assert (table.neurons, table.events) == (4, 34_057)
    assert table.positions == "unit_xyz"
    assert table.labels["units.cell_type"]["values"] == {"Narrow width spiking": 3, "Cannot be determined": 1}


def test_septum_units_unlinked(shared_data):
    report = one_report(shared_data / "nwb" / "real" / "septum_hpc_DT9_stub.nwb")

    (table,) = report.tables
    assert (table.neurons, table.events) == (10, 1725)
    assert table.positions == "unit_row"
    (unlinked,) = problems_of(report, "unlinked_units")
    assert len(unlinked.neurons) == 10


def test_phy_empty_locations_reported(shared_data):
    report = one_report(shared_data / "nwb" / "real" / "phy_A8604-211122_unlabelled.nwb")

    (table,) = report.tables
    assert (table.neurons, table.events) == (3, 21_354)
    (missing,) = problems_of(report, "missing_labels")
    assert missing.neurons == ["6", "191", "206"]
    assert table.labels["units.location"] == {"values": {}, "missing": 3}


def test_suite2p_summary(shared_data):
    report = one_report(shared_data / "nwb" / "real" / "ophys_suite2p_15rois.nwb")

    (table,) = report.tables
    assert (table.reader, table.neurons, table.events) == ("ophys", 15, 250)
    assert table.rate_hz == pytest.approx(10.0)
    assert table.positions == "roi_centroid_px (image_mask of shape (15, 128, 128))"
    assert table.labels["rois.Accepted (PlaneSegmentation)"]["values"] == {"0": 8, "1": 7}


def test_celegans_timeseries_summary(shared_data):
    report = one_report(shared_data / "nwb" / "real" / "celegans_wholebrain_timeseries.nwb")

    (table,) = report.tables
    assert (table.reader, table.table, table.neurons, table.events) == ("timeseries", "Activity_*", 62, 2244)
    assert [problem.kind for problem in report.all_problems] == ["old_schema", "irregular_timestamps"]


def test_allen_stub_cut_index(shared_data):
    report = one_report(shared_data / "nwb" / "real" / "allen_vcnp_stub_ndx-aibs.nwb")

    (unreadable,) = problems_of(report, "unreadable")
    assert "spike_times_index of unit 951791918" in unreadable.description
    assert problems_of(report, "uncached_extension") == []


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("nwb1_meister_retina_20080606_R1.nwb", "convert it to NWB 2 first"),
        ("nwb1_allen_ophys_skinny.nwb", "convert it to NWB 2 first"),
        ("prerelease-1.2.0_sample.nwb", "convert it to NWB 2 first"),
        ("matnwb-2.0b_ecephys_tutorial.nwb", "root attributes are stored as arrays"),
    ],
)
def test_rejected_compat_files(shared_data, name, reason):
    report = one_report(shared_data / "nwb" / "compat" / name)

    assert not report.loadable
    assert name in report.error
    assert "not a readable NWB 2.x file" in report.error
    assert reason in report.error
    assert "\n" not in report.error


def test_old_pynwb_file_reported(shared_data):
    report = one_report(shared_data / "nwb" / "compat" / "pynwb-1.0.2_nwbfile.nwb")

    (old,) = problems_of(report, "old_schema")
    assert "NWB schema 2.0b without cached specifications" in old.description
    assert "no Units table, no RoiResponseSeries" in problems_of(report, "unreadable")[0].description


# --- output --------------------------------------------------------------------------------------


def test_json_output_fields(shared_data, capsys):
    status, out, _ = run_inspect(capsys, str(shared_data / "bugcases" / "B05_spike_times_nan.nwb"), "--json")

    document = json.loads(out)
    assert status == 0
    assert document["exit_status"] == 0
    (entry,) = document["files"]
    assert entry["modality"] == "ecephys"
    (table,) = entry["tables"]
    assert (table["neurons"], table["events"]) == (2, 5)
    problem = next(problem for problem in table["problems"] if problem["kind"] == "nonfinite_spike_times")
    assert problem == {
        "kind": "nonfinite_spike_times",
        "action": "warn",
        "table": "units",
        "count": 2,
        "neurons": ["1"],
        "description": problem["description"],
        "repair": "they are dropped",
        "fix": problem["fix"],
    }
    assert "B05_spike_times_nan.nwb: unit 1 has 2 NaN or infinite spike times" in problem["description"]


def test_folder_inspected_recursively(shared_data, tmp_path):
    folder = tmp_path / "dandiset" / "sub-1"
    folder.mkdir(parents=True)
    shutil.copy(shared_data / "bugcases" / "B01_units_zero_spikes.nwb", folder / "a.nwb")
    shutil.copy(shared_data / "bugcases" / "B05_spike_times_nan.nwb", folder / "b.nwb")

    reports = inspect_sources([tmp_path / "dandiset"])

    assert [Path(report.source).name for report in reports] == ["a.nwb", "b.nwb"]
    assert exit_status(reports) == 0


def test_recipe_sources_inspected(shared_data, tmp_path, capsys):
    source = shared_data / "nwb" / "real" / "human_mtl_sub-4_ses-4.nwb"
    recipe = write_recipe(
        tmp_path,
        f"""\
        name: mtl
        sources: [{{path: {source}}}]
        labels:
          region: {{from: electrodes.location}}
        """,
    )

    status, out, _ = run_inspect(capsys, "--recipe", str(recipe))

    assert status == 0
    assert "label region (electrodes.location): hippocampus_right 25, amygdala_right 10" in out


def test_missing_path_one_error_line(tmp_path, capsys):
    status, out, err = run_inspect(capsys, str(tmp_path / "absent.nwb"))

    assert status == 2
    assert out == ""
    assert [line for line in err.splitlines() if line.strip()] == [f"error: NWB file {tmp_path / 'absent.nwb'} not found"]


def test_uncached_extension_not_loadable(shared_data, tmp_path):
    path = tmp_path / "extension.nwb"
    shutil.copy(shared_data / "nwb" / "compat" / "pynwb-2.1.0_nwbfile_with_extension.nwb", path)
    path.chmod(0o644)
    with h5py.File(path, "a") as h5file:
        del h5file["specifications/ndx-testextension"]

    report = inspect_file(path)

    assert not report.loadable
    assert "extension namespace 'ndx-testextension' (at acquisition/test_ts)" in report.error
    assert "does not cache its specification" in report.error


def test_naive_session_start_reported(shared_data, tmp_path):
    path = tmp_path / "naive.nwb"
    shutil.copy(shared_data / "nwb" / "real" / "septum_hpc_DT9_stub.nwb", path)
    path.chmod(0o644)
    with h5py.File(path, "a") as h5file:
        del h5file["session_start_time"]
        h5file.create_dataset("session_start_time", data=b"2017-04-28T00:00:00")

    report = inspect_file(path)

    (naive,) = problems_of(report, "naive_session_start")
    assert "'2017-04-28T00:00:00' has no timezone" in naive.description
    assert naive.action(report.policy) == "warn"
    assert any("[warn] naive_session_start" in line for line in format_report(report))


# --- DANDI streams ------------------------------------------------------------------------------


@pytest.mark.network
def test_dandi_asset_streamed(dandi_server, shared_data, capsys):
    status, out, err = run_inspect(capsys, f"DANDI:{DRAFT_ONLY_ID}", "--api-url", dandi_server.api_url, "--json")

    assert status == 0, err
    (entry,) = json.loads(out)["files"]
    assert entry["source"] == f"DANDI:{DRAFT_ONLY_ID}/draft/sub-anm00239123/sub-anm00239123_ecephys+ogen.nwb"
    (table,) = entry["tables"]
    assert (table["neurons"], table["events"], table["positions"]) == (4, 34_057, "unit_xyz")
    gets = [record for record in dandi_server.blob_records() if record.method == "GET"]
    assert gets and all(record.status == 206 and record.range for record in gets)
    assert dandi_server.bytes_served("sub-anm00239123/sub-anm00239123_ecephys+ogen.nwb") <= standard_files(shared_data)[THALAMUS].stat().st_size


@pytest.mark.network
def test_dandi_glob_selects_assets(dandi_server):
    reports = inspect_sources([f"DANDI:{PUBLISHED_ID}/draft"], globs=["sub-anm36*/*.nwb"], api_url=dandi_server.api_url)

    assert len(reports) == 1
    assert reports[0].source.startswith(f"DANDI:{PUBLISHED_ID}/draft/sub-anm369963/")
    assert reports[0].tables[0].events == 1679


# --- large files --------------------------------------------------------------------------------

# The peak RSS comes from VmHWM, which starts afresh at exec; getrusage's ru_maxrss would
# include the pages of the forked test process.
LARGE_SCRIPT = textwrap.dedent(
    """
    import json, re, sys, time
    from pathlib import Path
    from neurpir_nwb.inspect import inspect_file

    start = time.perf_counter()
    report = inspect_file(sys.argv[1])
    elapsed_s = time.perf_counter() - start
    peak_kib = int(re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1))
    print(json.dumps({
        "elapsed_s": elapsed_s,
        "rss_peak_bytes": peak_kib * 1024,
        "exit_status": report.exit_status,
        "readers": [table.reader for table in report.tables],
        "neurons": [table.neurons for table in report.tables],
        "positions": [table.positions for table in report.tables],
    }))
    """
)


def write_large_logical_file(path: Path) -> int:
    """Write a small NWB file, then swap in unallocated datasets of about 30 GB; return their logical size in bytes.

    Unwritten chunks take no disk space, but a reader that loads them gets every byte.
    """
    nwbfile = mock_NWBFile(identifier="large")
    for i in range(3):
        nwbfile.add_unit(spike_times=np.linspace(0.1, 50.0, 200) + i * 0.01)
    nwbfile.add_acquisition(TimeSeries(name="raw", data=np.zeros((10, 4), dtype=np.int16), unit="V", rate=30_000.0))

    plane = PlaneSegmentation(name="PlaneSegmentation", description="ROIs", imaging_plane=mock_ImagingPlane(nwbfile=nwbfile))
    for _ in range(3):
        plane.add_roi(image_mask=np.ones((4, 4), dtype=np.float32))
    module = nwbfile.create_processing_module(name="ophys", description="optical physiology")
    module.add(ImageSegmentation(name="ImageSegmentation")).add_plane_segmentation(plane)
    region = plane.create_roi_table_region(description="ROIs", region=[0, 1, 2])
    series = RoiResponseSeries(name="RoiResponseSeries", data=np.ones((50, 3), dtype=np.float32), rois=region, unit="a.u.", rate=30.0)
    module.add(Fluorescence(name="Fluorescence")).add_roi_response_series(series)
    with NWBHDF5IO(str(path), "w") as io:
        io.write(nwbfile)

    logical_bytes = 0
    with h5py.File(path, "a") as h5file:
        for name, shape, dtype, chunks in [
            ("acquisition/raw/data", (2_000_000_000, 4), np.int16, (1_000_000, 4)),
            ("processing/ophys/ImageSegmentation/PlaneSegmentation/image_mask", (3, 40_000, 40_000), np.float32, (1, 4000, 4000)),
            ("processing/ophys/Fluorescence/RoiResponseSeries/data", (100_000_000, 3), np.float32, (1_000_000, 3)),
        ]:
            attributes = dict(h5file[name].attrs)
            del h5file[name]
            dataset = h5file.create_dataset(name, shape=shape, dtype=dtype, chunks=chunks)
            dataset.attrs.update(attributes)
            logical_bytes += int(np.prod(shape)) * np.dtype(dtype).itemsize
    return logical_bytes


def test_large_file_inspected_lazily(tmp_path):
    path = tmp_path / "large.nwb"
    logical_bytes = write_large_logical_file(path)

    result = subprocess.run(
        [sys.executable, "-c", LARGE_SCRIPT, str(path)],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPOSITORY,
        timeout=300,
    )
    measured = json.loads(result.stdout.strip().splitlines()[-1])

    print(
        f"{logical_bytes / 2**30:.0f} GiB of datasets in a {path.stat().st_size / 2**20:.1f} MiB file: inspected in "
        f"{measured['elapsed_s']:.2f} s, peak RSS {measured['rss_peak_bytes'] / 2**20:.0f} MiB"
    )
    assert logical_bytes > 10 * 2**30
    assert measured["readers"] == ["units", "ophys"]
    assert measured["neurons"] == [3, 3]
    assert measured["positions"][1] == "roi_centroid_px (image_mask of shape (3, 40000, 40000))"
    assert measured["elapsed_s"] < 20
    assert measured["rss_peak_bytes"] < 2**30


def test_spike_budget_limits_units_read(tmp_path, monkeypatch):
    path = write_units_nwb(tmp_path / "units.nwb", [np.linspace(0.1, 9.0, 50)] * 4)
    monkeypatch.setattr("neurpir_nwb.inspect.MAX_INSPECT_SPIKES", 120)

    report = inspect_file(path)

    (table,) = report.tables
    assert (table.neurons, table.checked_neurons, table.events) == (4, 2, 100)
    assert "(spike trains of the first 2 units checked)" in "\n".join(format_report(report))
    assert MAX_INSPECT_SPIKES > 1_000_000


@pytest.mark.network
def test_recipe_dandi_source_streamed(dandi_server, tmp_path):
    recipe = load_recipe(
        write_recipe(
            tmp_path,
            f"""\
            name: streamed
            sources:
              - {{dandi: "DANDI:{DRAFT_ONLY_ID}", mode: stream, api_url: "{dandi_server.api_url}"}}
            """,
        )
    )

    (report,) = inspect_recipe_sources(recipe)

    assert report.source.endswith("sub-anm00239123_ecephys+ogen.nwb")
    assert (report.tables[0].neurons, report.tables[0].events) == (4, 34_057)
