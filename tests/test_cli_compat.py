"""Every command on every file that is not a plain NWB 2 Units file: it works, or prints one error line and exits with status 2."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from neurpir_nwb.cli.app import main
from neurpir_nwb.model import EncoderConfig, NeurPIREncoder
from neurpir_nwb.model_directory import write_model_directory

REPOSITORY = Path(__file__).resolve().parents[1]

COMPAT_FILES = [
    "core-2.10_doric_fiber_photometry.nwb",
    "extension_mylab_cached.nwb",
    "matnwb-2.0b_ecephys_tutorial.nwb",
    "nwb1_allen_ophys_skinny.nwb",
    "nwb1_meister_retina_20080606_R1.nwb",
    "prerelease-1.2.0_sample.nwb",
    "pynwb-1.0.2_nwbfile.nwb",
    "pynwb-1.0.3_nwbfile.nwb",
    "pynwb-1.1.2_nwbfile.nwb",
    "pynwb-1.2.1_extension.nwb",
    "pynwb-1.3.3_timeseries_no_data.nwb",
    "pynwb-1.5.1_timeintervals_non_ndtype_tsref.nwb",
    "pynwb-2.1.0_nwbfile_with_extension.nwb",
    "pynwb-2.2.0_subject_no_age__reference.nwb",
    "pynwb-2.3.2_old_electrodes_table_full.nwb",
    "pynwb-2.6.0_DynamicTableElectrodes.nwb",
]

#: Files that pynwb cannot read, and the reason their one error line contains.
REJECTED = {
    "matnwb-2.0b_ecephys_tutorial.nwb": "root attributes are stored as arrays",
    "nwb1_allen_ophys_skinny.nwb": "convert it to NWB 2 first",
    "nwb1_meister_retina_20080606_R1.nwb": "convert it to NWB 2 first",
    "prerelease-1.2.0_sample.nwb": "convert it to NWB 2 first",
}

MINIMAL_RECIPE = """\
name: compat
sources:
  - path: {path}
segments: {{bin_size_s: 0.05, bins_per_patch: 4, patches: 4, neighbours: 2, distance_bins: 3}}
model: {{dim: 8, heads: 2, temporal_layers: 1, spatiotemporal_layers: 1, projector: [16]}}
train: {{epochs: 1, steps_per_epoch: 2, batch_size: 4, device: cpu}}
"""


def run_main(capsys, *arguments: str) -> tuple[int, str, str]:
    """Run the program in this process; return its exit status, standard output and standard error."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(arguments))
        raise SystemExit(0)
    captured = capsys.readouterr()
    return int(exit_info.value.code or 0), captured.out, captured.err


def assert_one_error_line(status: int, err: str, *fragments: str) -> None:
    assert status == 2, err
    assert "Traceback" not in err
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, err
    for fragment in fragments:
        assert fragment in error_lines[0], error_lines[0]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A model directory of an untrained encoder, enough for ``embed`` to read files with."""
    folder = tmp_path_factory.mktemp("model")
    encoder = NeurPIREncoder(EncoderConfig(bins_per_patch=4, patches=4, dim=8, heads=2, temporal_layers=1, spatiotemporal_layers=1, distance_bins=3))
    segments = {"bin_size_s": 0.05, "bins_per_patch": 4, "patches": 4, "neighbours": 2, "distance_bins": 3, "distance_bin_edges": [1.0]}
    return write_model_directory(
        folder / "model",
        encoder=encoder,
        model_name="compat",
        segments=segments,
        modality="ecephys",
        activity_transform="log1p",
        reader={"kind": "units", "sort_spikes": False},
        probe=None,
        label_name=None,
        provenance={"recipe_sha256": "00" * 32},
    )


def test_compat_list_complete(shared_data):
    assert sorted(path.name for path in (shared_data / "nwb" / "compat").glob("*.nwb")) == COMPAT_FILES


@pytest.mark.parametrize("name", COMPAT_FILES)
def test_train_on_compat_file(shared_data, tmp_path, capsys, name):
    path = shared_data / "nwb" / "compat" / name
    recipe = tmp_path / "compat.yaml"
    recipe.write_text(MINIMAL_RECIPE.format(path=path))

    status, _, err = run_main(capsys, "train", str(recipe), "--output", str(tmp_path / "run"), "--no-progress")

    # None of these files has a Units table with spike trains, so a Units recipe cannot train on any of them.
    expected = REJECTED.get(name, "has no Units table")
    assert_one_error_line(status, err, name, expected)


@pytest.mark.parametrize("name", COMPAT_FILES)
def test_embed_on_compat_file(shared_data, tmp_path, capsys, model_dir, name):
    path = shared_data / "nwb" / "compat" / name

    status, _, err = run_main(capsys, "embed", str(model_dir), str(path), "--output", str(tmp_path / "out"), "--no-progress")

    expected = REJECTED.get(name, "has no Units table")
    assert_one_error_line(status, err, name, expected)
    assert not (tmp_path / "out" / name).exists()


@pytest.mark.parametrize("command", ["inspect", "train", "embed"])
def test_nwb1_file_as_new_user(shared_data, tmp_path, model_dir, command):
    path = shared_data / "nwb" / "compat" / "nwb1_meister_retina_20080606_R1.nwb"
    recipe = tmp_path / "compat.yaml"
    recipe.write_text(MINIMAL_RECIPE.format(path=path))
    arguments = {
        "inspect": ["inspect", str(path)],
        "train": ["train", str(recipe), "--output", "run", "--no-progress"],
        "embed": ["embed", str(model_dir), str(path), "--output", "out", "--no-progress"],
    }[command]

    result = subprocess.run(
        [sys.executable, "-m", "neurpir_nwb", *arguments],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPOSITORY), "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=600,
    )

    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1
    assert error_lines[0].endswith(f"{path.name} has nwb_version '1.0.6', so it is not a readable NWB 2.x file; convert it to NWB 2 first")
    assert result.stdout == ""
