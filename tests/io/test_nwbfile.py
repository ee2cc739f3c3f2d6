"""Tests of opening NWB files: every unreadable file fails with one SourceError naming it."""

import h5py
import pytest

from neurpir_nwb.errors import SourceError
from neurpir_nwb.io.nwbfile import check_nwb_file, nwb_version, open_nwb
from neurpir_nwb.testing import write_units_nwb


def test_open_nwb_missing_file(tmp_path):
    path = tmp_path / "absent.nwb"

    with pytest.raises(SourceError) as error:
        with open_nwb(path):
            pass

    assert str(path) in str(error.value)
    assert "not found" in str(error.value)


def test_open_nwb_text_file(tmp_path):
    path = tmp_path / "notes.nwb"
    path.write_text("this is not HDF5\n")

    with pytest.raises(SourceError) as error:
        with open_nwb(path):
            pass

    assert str(path) in str(error.value)
    assert "is not an NWB file" in str(error.value)


def test_open_nwb_folder(tmp_path):
    with pytest.raises(SourceError, match="is a folder"):
        with open_nwb(tmp_path):
            pass


def test_open_nwb_truncated_download(shared_data):
    path = shared_data / "bugcases" / "B25_truncated_download.nwb"

    with pytest.raises(SourceError) as error:
        with open_nwb(path):
            pass

    message = str(error.value)
    assert str(path) in message
    assert "truncated" in message
    assert "143558 of 239264 bytes" in message
    assert "download it again" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("name", "stored_version"),
    [
        ("nwb1_meister_retina_20080606_R1.nwb", "1.0.6"),
        ("nwb1_allen_ophys_skinny.nwb", "NWB-1.0.5"),
        ("prerelease-1.2.0_sample.nwb", "1.2.0"),
    ],
)
def test_open_nwb_rejects_nwb1(shared_data, name, stored_version):
    path = shared_data / "nwb" / "compat" / name

    with pytest.raises(SourceError) as error:
        with open_nwb(path):
            pass

    message = str(error.value)
    assert str(path) in message
    assert "not a readable NWB 2.x file" in message
    assert "convert it to NWB 2" in message
    assert stored_version in message
    assert nwb_version(path) == stored_version


def test_open_nwb_rejects_matnwb_array_attributes(shared_data):
    path = shared_data / "nwb" / "compat" / "matnwb-2.0b_ecephys_tutorial.nwb"

    with pytest.raises(SourceError) as error:
        with open_nwb(path):
            pass

    message = str(error.value)
    assert str(path) in message
    assert "not a readable NWB 2.x file" in message
    assert "arrays" in message
    assert nwb_version(path) == "2.0b"


def test_open_nwb_wraps_pynwb_failure(tmp_path):
    path = tmp_path / "bare.nwb"
    with h5py.File(path, "w") as h5file:
        h5file.attrs["nwb_version"] = "2.7.0"

    with pytest.raises(SourceError) as error:
        with open_nwb(path):
            pass

    message = str(error.value)
    assert str(path) in message
    assert "pynwb failed to read it" in message
    assert "\n" not in message


def test_open_nwb_hdf5_without_version(tmp_path):
    path = tmp_path / "plain.h5"
    with h5py.File(path, "w") as h5file:
        h5file.create_dataset("values", data=[1, 2, 3])

    with pytest.raises(SourceError, match="no nwb_version attribute"):
        check_nwb_file(path)


def test_open_nwb_read_only_mode(tmp_path):
    path = write_units_nwb(tmp_path / "units.nwb", [[0.1, 0.2]], identifier="session-a")

    with open_nwb(path) as (io, nwbfile):
        assert io.mode == "r"
        assert nwbfile.identifier == "session-a"

    # The file is closed after the block, so h5py can open it for writing again.
    with h5py.File(path, "r+") as h5file:
        assert "units" in h5file


def test_open_nwb_passes_block_errors(tmp_path):
    path = write_units_nwb(tmp_path / "units.nwb", [[0.1]])

    with pytest.raises(KeyError, match="raised inside"):
        with open_nwb(path):
            raise KeyError("raised inside")


def test_nwb_version_real_files(shared_data):
    assert nwb_version(shared_data / "nwb" / "real" / "human_mtl_sub-4_ses-4.nwb") == "2.4.0"
    assert nwb_version(shared_data / "nwb" / "real" / "alm_sub-anm369963_ses-20170228.nwb") == "2.0.2"


@pytest.mark.parametrize(
    "name",
    [
        "pynwb-1.0.2_nwbfile.nwb",
        "pynwb-2.3.2_old_electrodes_table_full.nwb",
        "core-2.10_doric_fiber_photometry.nwb",
        "extension_mylab_cached.nwb",
    ],
)
def test_open_nwb_reads_older_schemas(shared_data, name):
    path = shared_data / "nwb" / "compat" / name

    with open_nwb(path) as (_, nwbfile):
        assert nwbfile.identifier
