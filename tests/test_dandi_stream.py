"""Streaming DANDI assets over HTTP range requests: readers, training and how many bytes they fetch."""

import json
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np
import pytest
from hdmf.backends.hdf5 import H5DataIO
from pynwb import NWBHDF5IO, NWBFile
from pynwb.ecephys import ElectricalSeries

from neurpir_nwb.dandi import list_assets, stream_url
from neurpir_nwb.errors import SourceError
from neurpir_nwb.io.units import read_units
from neurpir_nwb.pipeline import run_recipe
from neurpir_nwb.recipe import load_recipe
from tests.dandi_server import dandi_server, standard_files  # noqa: F401 (dandi_server is a fixture)

pytestmark = pytest.mark.network

#: Samples and channels of the ElectricalSeries: 3,300,000 x 32 int16 values are 211 MB.
N_SAMPLES = 3_300_000
N_CHANNELS = 32

STREAM_RECIPE = """\
name: dandi-stream
sources:
  - dandi: DANDI:{dandiset}
    mode: stream
    api_url: {api_url}
segments: {{bin_size_s: 0.02, bins_per_patch: 4, patches: 4, neighbours: 2, distance_bins: 4}}
model: {{dim: 8, heads: 2, temporal_layers: 1, spatiotemporal_layers: 1, projector: [16, 16]}}
train: {{epochs: 1, steps_per_epoch: 2, batch_size: 8, lr: 1.0e-3, device: cpu}}
"""


def write_large_ecephys_file(path: Path, n_units: int = 20) -> dict[int, np.ndarray]:
    """Write an NWB file whose bulk is a raw ElectricalSeries, with a small Units table; return the spike trains."""
    nwbfile = NWBFile(
        session_description="raw voltage and sorted units",
        identifier="large-ecephys",
        session_start_time=datetime(2024, 1, 1, tzinfo=timezone.utc),
    )
    device = nwbfile.create_device(name="probe")
    group = nwbfile.create_electrode_group(name="shank", description="one shank", location="CA1", device=device)
    for channel in range(N_CHANNELS):
        nwbfile.add_electrode(group=group, location="CA1", x=0.0, y=20.0 * channel, z=0.0)
    electrodes = nwbfile.create_electrode_table_region(list(range(N_CHANNELS)), "all channels")

    # Random int16 noise does not compress, so the file is as large as the data.
    rng = np.random.default_rng(0)
    data = rng.integers(-2000, 2000, size=(N_SAMPLES, N_CHANNELS), dtype=np.int16)
    nwbfile.add_acquisition(
        ElectricalSeries(
            name="raw",
            data=H5DataIO(data, chunks=(65536, N_CHANNELS)),
            electrodes=electrodes,
            rate=30000.0,
            conversion=1e-6,
        )
    )

    trains = {}
    for unit in range(n_units):
        train = np.sort(rng.uniform(0.0, N_SAMPLES / 30000.0, size=400))
        trains[unit] = train
        nwbfile.add_unit(id=unit, spike_times=train, electrodes=[unit % N_CHANNELS])

    with NWBHDF5IO(str(path), "w") as io:
        io.write(nwbfile)
    return trains


@pytest.fixture(scope="module")
def large_file(tmp_path_factory) -> tuple[Path, dict[int, np.ndarray]]:
    path = tmp_path_factory.mktemp("large") / "large_ecephys.nwb"
    trains = write_large_ecephys_file(path)
    return path, trains


@pytest.mark.slow
def test_streamed_units_fetch_few_bytes(dandi_server, large_file):
    path, trains = large_file
    dandi_server.add_dandiset("000040", draft={"sub-1/sub-1_ecephys.nwb": path})
    _, (asset,) = list_assets("DANDI:000040", api_url=dandi_server.api_url)
    dandi_server.clear_records()

    recording = read_units(stream_url(asset))

    share = dandi_server.bytes_served(asset.path) / asset.size
    print(f"streamed Units of a {asset.size / 1e6:.0f} MB file: {dandi_server.bytes_served(asset.path) / 1e6:.2f} MB ({share:.2%})")
    assert asset.size > 200e6
    assert share < 0.05
    assert recording.unit_ids.tolist() == sorted(trains)
    for unit, train in zip(recording.unit_ids, recording.spike_times):
        np.testing.assert_array_equal(train, trains[int(unit)])


def test_stream_source_trains_end_to_end(dandi_server, shared_data, tmp_path):
    served = standard_files(shared_data)["thalamus_sub-anm00239123_ecephys_ogen.nwb"]
    dandi_server.add_dandiset("000041", draft={"sub-1/sub-1_ecephys.nwb": served})
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(STREAM_RECIPE.format(dandiset="000041", api_url=dandi_server.api_url))

    summary = run_recipe(load_recipe(recipe_path, output=tmp_path / "run"))

    # Nothing is downloaded, and the run directory contains only the outputs, named after the asset.
    (output,) = summary.outputs
    assert output == tmp_path / "run" / "nwb" / "sub-1_ecephys.nwb"
    assert not list(tmp_path.rglob("*.part"))
    with h5py.File(output, "r") as output_file:
        table = output_file["processing/neurpir/embeddings"]
        record = json.loads(table.attrs["provenance"])
        linked_ids = output_file["units/id"][:][table["unit"][:]]
    with h5py.File(served, "r") as source_file:
        source_ids = source_file["units/id"][:]
    assert record["source"]["dandiset_id"] == "000041"
    assert record["source"]["asset_path"] == "sub-1/sub-1_ecephys.nwb"
    assert record["source"]["mode"] == "stream"
    assert sorted(linked_ids.tolist()) == sorted(source_ids.tolist())


def test_stream_of_ophys_source_rejected(dandi_server, shared_data, tmp_path):
    served = shared_data / "nwb" / "real" / "ophys_suite2p_15rois.nwb"
    dandi_server.add_dandiset("000042", draft={"sub-1/sub-1_ophys.nwb": served})
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(
        STREAM_RECIPE.format(dandiset="000042", api_url=dandi_server.api_url).replace(
            "mode: stream", "mode: stream\n    ophys: {source: auto}"
        )
    )

    with pytest.raises(SourceError, match="mode 'download'"):
        run_recipe(load_recipe(recipe_path, output=tmp_path / "run"))
