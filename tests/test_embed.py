"""Applying a trained model to unseen files: the model directory, `neurpir-nwb embed` and its outputs."""

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import xarray as xr
from pynwb import NWBHDF5IO
from pynwb.testing.mock.file import mock_NWBFile
from pynwb.testing.mock.ophys import mock_PlaneSegmentation, mock_RoiResponseSeries

import neurpir_nwb
from neurpir_nwb._version import __version__
from neurpir_nwb.embed import embed_files
from neurpir_nwb.errors import DataError, ModelError, RunDirectoryError
from neurpir_nwb.evaluate import probe_from_dict
from neurpir_nwb.model import EncoderConfig, NeurPIREncoder
from neurpir_nwb.model_directory import MODEL_FORMAT_VERSION, load_model, sha256_file
from neurpir_nwb.pipeline import Evaluation, run_recipe, save_model
from neurpir_nwb.recipe import load_recipe
from neurpir_nwb.segments import load_segment_set
from neurpir_nwb.testing import poisson_spike_trains, write_units_nwb
from tests.test_cli import assert_one_line_error, run_cli

HELD_OUT = "sim-animal-2"

TINY_SIMULATED = f"""\
name: tiny-embed
sources:
  - simulate: {{animals: 3, first_seed: 0, neurons: 20, duration_s: 15}}
labels:
  cell_type: {{from: units.cell_type}}
segments: {{bin_size_s: 0.01, bins_per_patch: 8, patches: 8, neighbours: 3, distance_bins: 4}}
model: {{dim: 16, heads: 2, temporal_layers: 1, spatiotemporal_layers: 1, projector: [32, 32]}}
train: {{epochs: 1, steps_per_epoch: 3, batch_size: 16, lr: 1.0e-3, device: cpu}}
evaluate: {{split: test-subjects, test_subjects: [{HELD_OUT}], probe: logistic}}
"""

OPHYS_TINY = """\
name: ophys-embed
sources:
  - path: x.nwb
    ophys: {source: auto}
segments: {rate_hz: 10, bins_per_patch: 5, patches: 5, neighbours: 3, distance_bins: 4}
model: {dim: 8, heads: 2, temporal_layers: 1, spatiotemporal_layers: 1, projector: [16, 16]}
train: {epochs: 1, steps_per_epoch: 2, batch_size: 8, lr: 1.0e-3, device: cpu}
"""

# Reads a train output with plain pynwb and h5py in a fresh interpreter and prints what it found as JSON.
FRESH_READER = textwrap.dedent(
    """
    import json, sys
    import h5py
    from pynwb import NWBHDF5IO

    path = sys.argv[1]
    with NWBHDF5IO(path, "r", load_namespaces=True) as io:
        nwbfile = io.read()
        table = nwbfile.processing["neurpir"]["embeddings"]
        region = table["unit"]
        result = {
            "type": type(table).__name__,
            "region_targets_units": region.table is nwbfile.units,
            "linked_unit_ids": [int(region.table.id[row]) for row in region.data[:]],
            "table_ids": [int(value) for value in table.id[:]],
            "embedding_dim": int(table.embedding_dim),
            "model_sha256": table.model_sha256,
        }
    with h5py.File(path, "r") as output_file:
        result["units_ids"] = output_file["units/id"][:].tolist()
        embedding = output_file["processing/neurpir/embeddings/embedding"][:]
        result["h5py_embedding_shape"] = list(embedding.shape)
        result["h5py_embedding_dtype"] = str(embedding.dtype)
    result["neurpir_nwb_imported"] = "neurpir_nwb" in sys.modules
    print(json.dumps(result))
    """
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Train a tiny model on two simulated animals; the third is held out of the encoder's training."""
    folder = tmp_path_factory.mktemp("trained")
    recipe_path = folder / "tiny.yaml"
    recipe_path.write_text(TINY_SIMULATED)
    recipe = load_recipe(recipe_path, output=folder / "run")
    summary = run_recipe(recipe)
    return recipe, summary.run_dir


@pytest.fixture(scope="module")
def held_out_embedding(trained, tmp_path_factory):
    """Embed the held-out animal in-process and return the summary."""
    _, run_dir = trained
    out_dir = tmp_path_factory.mktemp("embedded")
    return embed_files(run_dir / "model", [run_dir / "simulated" / f"{HELD_OUT}.nwb"], out_dir)


def _train_embeddings_of(run_dir: Path, subject: str) -> np.ndarray:
    with xr.open_dataset(run_dir / "embeddings.nc", engine="h5netcdf") as embeddings:
        selected = embeddings["subject"].values.astype(str) == subject
        return embeddings["embedding"].values[selected]


def test_train_output_opens_in_fresh_process(trained, tmp_path):
    _, run_dir = trained
    output = run_dir / "nwb" / f"{HELD_OUT}.nwb"
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}

    completed = subprocess.run(
        [sys.executable, "-c", FRESH_READER, str(output)], capture_output=True, text=True, env=environment, cwd=tmp_path, timeout=120
    )
    assert completed.returncode == 0, completed.stderr
    result = json.loads(completed.stdout.strip().splitlines()[-1])

    assert result["neurpir_nwb_imported"] is False
    assert result["type"] == "NeuronEmbeddingTable"
    assert result["region_targets_units"] is True
    assert result["linked_unit_ids"] == result["table_ids"]
    assert sorted(result["linked_unit_ids"]) == sorted(result["units_ids"])
    assert result["h5py_embedding_shape"] == [20, 16]
    assert result["h5py_embedding_dtype"] == "float32"
    assert result["embedding_dim"] == 16
    assert result["model_sha256"] == sha256_file(run_dir / "model" / "weights.pt")


def test_train_output_provenance(trained):
    recipe, run_dir = trained
    with h5py.File(run_dir / "nwb" / f"{HELD_OUT}.nwb", "r") as output_file:
        attributes = dict(output_file["processing/neurpir/embeddings"].attrs)
    record = json.loads(attributes["provenance"])
    sources = {Path(source["path"]).name: source for source in record["training_sources"]}

    assert attributes["recipe_sha256"] == recipe.sha256()
    assert attributes["neurpir_version"] == __version__
    assert attributes["label_name"] == "cell_type"
    assert record["written_by"] == "neurpir-nwb train"
    assert sorted(sources) == [f"sim-animal-{seed}.nwb" for seed in range(3)]
    assert sources[f"{HELD_OUT}.nwb"]["encoder_trained_on"] is False
    assert sources["sim-animal-0.nwb"]["encoder_trained_on"] is True
    assert all(source["identifier"] for source in sources.values())
    assert record["source"]["identifier"] == sources[f"{HELD_OUT}.nwb"]["identifier"]


def test_model_directory_contents(trained):
    _, run_dir = trained
    model_dir = run_dir / "model"
    config = json.loads((model_dir / "config.json").read_text())

    assert sorted(path.name for path in model_dir.iterdir()) == ["checkpoint.pt", "config.json", "probe.json", "provenance.json", "weights.pt"]
    assert config["format_version"] == MODEL_FORMAT_VERSION
    assert config["neurpir_version"] == __version__
    assert config["modality"] == "ecephys"
    assert config["reader"]["kind"] == "units"
    assert config["reader"]["sort_spikes"] is False
    assert config["reader"]["spike_times_unit"] == "s"
    assert config["reader"]["problems"]["descending_spike_times"] == "raise"
    assert config["segments"]["bin_size_s"] == 0.01
    assert len(config["segments"]["distance_bin_edges"]) == 2
    assert config["probe"]["label"] == "cell_type"
    assert config["weights"]["sha256"] == sha256_file(model_dir / "weights.pt")

    # The weights are a plain state dict that loads without pickle.
    encoder_config = EncoderConfig.from_dict(config["encoder"])
    encoder = NeurPIREncoder(encoder_config)
    encoder.load_state_dict(torch.load(model_dir / "weights.pt", weights_only=True))
    assert encoder.dim == config["embedding_dim"]


def test_embed_matches_in_process_probe(trained, held_out_embedding):
    _, run_dir = trained
    train_embeddings = _train_embeddings_of(run_dir, HELD_OUT)
    probe = probe_from_dict(json.loads((run_dir / "model" / "probe.json").read_text()))
    expected_labels = probe.predict(train_embeddings.astype(np.float64))

    embedded = neurpir_nwb.read_embeddings(held_out_embedding.outputs)

    # Same encoder, same segments and neighbours: the embeddings of the unseen animal are those of the train run.
    np.testing.assert_allclose(embedded["embedding"].values, train_embeddings, atol=1e-5)
    # probe.json is fitted on the training subjects only, so it predicts the unseen animal as the train run did.
    assert embedded["predicted_label"].values.astype(str).tolist() == expected_labels.tolist()
    with xr.open_dataset(run_dir / "embeddings.nc", engine="h5netcdf") as embeddings:
        selected = embeddings["subject"].values.astype(str) == HELD_OUT
        train_predictions = embeddings["predicted_label"].values[selected].astype(str).tolist()
    assert embedded["predicted_label"].values.astype(str).tolist() == train_predictions
    np.testing.assert_allclose(embedded["class_probabilities"].values.sum(axis=1), 1.0, atol=1e-5)


def test_embed_cli_writes_outputs(trained, tmp_path):
    _, run_dir = trained
    source = run_dir / "simulated" / f"{HELD_OUT}.nwb"

    result = run_cli("embed", str(run_dir / "model"), str(source), "-o", "out", "--no-progress", cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    output = tmp_path / "out" / f"{HELD_OUT}.nwb"
    assert output.is_file()
    assert str(Path("out") / f"{HELD_OUT}.nwb") in result.stdout
    with NWBHDF5IO(str(output), "r") as io:
        table = io.read().processing["neurpir"]["embeddings"]
        record = json.loads(table.provenance)
        n_rows = len(table)
    assert n_rows == 20
    assert record["written_by"] == "neurpir-nwb embed"
    assert record["model_sha256"] == sha256_file(run_dir / "model" / "weights.pt")


def test_embed_rerun_needs_overwrite(trained, tmp_path):
    _, run_dir = trained
    source = run_dir / "simulated" / f"{HELD_OUT}.nwb"
    first = embed_files(run_dir, [source], tmp_path)
    modified = first.outputs[0].stat().st_mtime_ns

    with pytest.raises(RunDirectoryError, match="--overwrite") as raised:
        embed_files(run_dir, [source], tmp_path)
    assert str(first.outputs[0]) in str(raised.value)
    assert first.outputs[0].stat().st_mtime_ns == modified

    second = embed_files(run_dir, [source], tmp_path, overwrite=True)
    assert second.outputs == first.outputs
    assert sorted(path.name for path in tmp_path.iterdir()) == [f"{HELD_OUT}.nwb"]


def test_embed_dandi_fields_recorded(trained, tmp_path):
    _, run_dir = trained
    source = (run_dir / "simulated" / f"{HELD_OUT}.nwb").resolve()
    dandi = {"dandiset_id": "000021", "dandiset_version": "0.210913.1639", "asset_id": "a1b2"}

    summary = embed_files(run_dir / "model", [source], tmp_path, source_provenance={str(source): dandi})

    with h5py.File(summary.outputs[0], "r") as output_file:
        record = json.loads(output_file["processing/neurpir/embeddings"].attrs["provenance"])
    assert record["source"]["asset_id"] == "a1b2"
    assert record["source"]["dandiset_version"] == "0.210913.1639"


def test_save_model_records_dandi_sources(trained, tmp_path):
    recipe, run_dir = trained
    model = load_model(run_dir / "model")
    segment_set = load_segment_set(run_dir / "segments.nc")
    first_source = str(Path(segment_set["source"].values[0]).resolve())
    dandi = {"dandiset_id": "000021", "asset_id": "f00d"}

    save_model(recipe, model.encoder, segment_set, Evaluation(), tmp_path, source_provenance={first_source: dandi})

    provenance = json.loads((tmp_path / "model" / "provenance.json").read_text())
    records = {record["path"]: record for record in provenance["training_sources"]}
    assert records[first_source]["asset_id"] == "f00d"
    assert not (tmp_path / "model" / "probe.json").exists()


def test_spike_model_rejects_ophys_input(trained, shared_data, tmp_path):
    _, run_dir = trained
    source = shared_data / "nwb" / "real" / "ophys_suite2p_15rois.nwb"

    result = run_cli("embed", str(run_dir / "model"), str(source), "-o", "out", "--no-progress", cwd=tmp_path)

    assert_one_line_error(result, "ophys_suite2p_15rois.nwb", "ROI traces in RoiResponseSeries (ophys)", "no spike trains of a Units table (ecephys)", "model trained on traces")
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_short_recording_rejected(trained, tmp_path):
    _, run_dir = trained
    short = write_units_nwb(tmp_path / "short.nwb", poisson_spike_trains(4, rate_hz=20.0, duration_s=1.0))

    with pytest.raises(DataError, match="needs two windows per neuron") as raised:
        embed_files(run_dir, [short], tmp_path / "out")

    assert "short.nwb" in str(raised.value)
    assert "1.28" in str(raised.value)


def test_same_file_names_rejected(trained, tmp_path):
    _, run_dir = trained
    source = run_dir / "simulated" / f"{HELD_OUT}.nwb"
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        shutil.copyfile(source, tmp_path / folder / source.name)

    with pytest.raises(RunDirectoryError, match="same file name"):
        embed_files(run_dir, [tmp_path / "a", tmp_path / "b"], tmp_path / "out")


def _write_slow_ophys(path: Path, rate_hz: float) -> Path:
    nwbfile = mock_NWBFile()
    plane = mock_PlaneSegmentation(n_rois=6, nwbfile=nwbfile)
    traces = np.random.default_rng(0).normal(size=(200, 6))
    mock_RoiResponseSeries(data=traces, rate=rate_hz, plane_segmentation=plane, nwbfile=nwbfile)
    with NWBHDF5IO(str(path), "w") as io:
        io.write(nwbfile)
    return path


def test_ophys_model_embeds_and_rejects_slow_traces(shared_data, tmp_path):
    source = shared_data / "nwb" / "real" / "ophys_suite2p_15rois.nwb"
    recipe_path = tmp_path / "ophys.yaml"
    recipe_path.write_text(OPHYS_TINY)
    run_dir = run_recipe(load_recipe(recipe_path, sources=[source], output=tmp_path / "run")).run_dir
    config = json.loads((run_dir / "model" / "config.json").read_text())
    assert {key: config["reader"][key] for key in ("kind", "source", "series")} == {"kind": "ophys", "source": "auto", "series": None}
    assert config["reader"]["problems"]["transposed_traces"] == "warn"
    assert config["segments"]["rate_hz"] == 10.0

    summary = embed_files(run_dir / "model", [source], tmp_path / "out")
    embedded = neurpir_nwb.read_embeddings(summary.outputs)
    assert embedded.sizes["neuron"] == 15
    assert embedded["source_table"].values[0] == "/processing/ophys/ImageSegmentation/PlaneSegmentation"
    np.testing.assert_allclose(embedded["embedding"].values, xr.open_dataset(run_dir / "embeddings.nc", engine="h5netcdf")["embedding"].values, atol=1e-5)

    slow = _write_slow_ophys(tmp_path / "slow.nwb", rate_hz=2.0)
    with pytest.raises(DataError, match=r"sampled at 2 Hz") as raised:
        embed_files(run_dir / "model", [slow], tmp_path / "out-slow")
    message = str(raised.value)
    assert "slow.nwb" in message
    assert "10 Hz" in message
    assert "segments.rate_hz" in message


def _copy_model(trained, tmp_path: Path) -> Path:
    _, run_dir = trained
    return Path(shutil.copytree(run_dir / "model", tmp_path / "model"))


def _edit_config(model_dir: Path, **changes) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    config.update(changes)
    (model_dir / "config.json").write_text(json.dumps(config))


def test_model_from_other_version_loads(trained, tmp_path, caplog):
    model_dir = _copy_model(trained, tmp_path)
    _edit_config(model_dir, neurpir_version="9.9.9")
    caplog.set_level(logging.INFO, logger="neurpir_nwb.model_directory")

    model = load_model(model_dir)

    assert model.encoder.dim == 16
    assert model.class_names == json.loads((model_dir / "probe.json").read_text())["classes"]
    messages = [record.getMessage() for record in caplog.records if "9.9.9" in record.getMessage()]
    assert len(messages) == 1
    assert __version__ in messages[0]


def test_model_of_newer_format_rejected(trained, tmp_path):
    model_dir = _copy_model(trained, tmp_path)
    _edit_config(model_dir, neurpir_version="9.9.9", format_version=MODEL_FORMAT_VERSION + 1)

    with pytest.raises(ModelError) as raised:
        load_model(model_dir)

    message = str(raised.value)
    assert "neurpir-nwb 9.9.9" in message
    assert f"neurpir-nwb {__version__}" in message
    assert f"model format {MODEL_FORMAT_VERSION + 1}" in message
    assert f"reads model format {MODEL_FORMAT_VERSION}" in message
    assert "upgrade neurpir-nwb" in message


def test_model_without_format_rejected(trained, tmp_path):
    model_dir = _copy_model(trained, tmp_path)
    config = json.loads((model_dir / "config.json").read_text())
    del config["format_version"]
    (model_dir / "config.json").write_text(json.dumps(config))

    with pytest.raises(ModelError, match="no format_version"):
        load_model(model_dir)


def test_model_with_foreign_weights_rejected(trained, tmp_path):
    model_dir = _copy_model(trained, tmp_path)
    torch.save({"weight": torch.zeros(2)}, model_dir / "weights.pt")

    with pytest.raises(ModelError, match="sha256"):
        load_model(model_dir)


def test_missing_model_directory(tmp_path):
    with pytest.raises(ModelError, match="not found") as raised:
        embed_files(tmp_path / "nowhere", [tmp_path / "x.nwb"], tmp_path / "out")

    assert "nowhere" in str(raised.value)


def test_run_directory_without_model(tmp_path):
    (tmp_path / "run").mkdir()

    with pytest.raises(ModelError, match="not a model directory"):
        load_model(tmp_path / "run")


def test_read_embeddings_of_train_outputs(trained):
    _, run_dir = trained
    rows = 0
    for path in (run_dir / "nwb").glob("*.nwb"):
        with h5py.File(path, "r") as output_file:
            rows += len(output_file["processing/neurpir/embeddings/id"])

    dataset = neurpir_nwb.read_embeddings(run_dir / "nwb")

    assert dataset.sizes["neuron"] == rows == 60
    assert dataset.sizes["embedding_dim"] == 16
    assert len(set(dataset["identifier"].values.tolist())) == 3


def test_pynapple_opens_output(trained):
    pynapple = pytest.importorskip("pynapple")
    _, run_dir = trained

    data = pynapple.load_file(str(run_dir / "nwb" / f"{HELD_OUT}.nwb"))

    # pynapple loads time-based objects only, so it lists the units and skips the embeddings
    # table, which has no column ending in _times that it would turn into spike times.
    assert list(data.keys()) == ["units"]
    assert len(data["units"]) == 20
