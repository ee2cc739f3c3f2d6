"""Tests of the NWB writer: embeddings and predictions appended to a copy of a source file."""

import hashlib
import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import pynwb
from pynwb import NWBHDF5IO
from pynwb.testing.mock.file import mock_NWBFile
from pynwb.testing.mock.ophys import mock_PlaneSegmentation

from neurpir_nwb.errors import DataError, RunDirectoryError, SourceError
from neurpir_nwb.io import writer
from neurpir_nwb.io.writer import write_embeddings_nwb

# pynwb warns about an OpticalSeries of the MTL source on every read. The writer adds no warning of its own.
pytestmark = pytest.mark.filterwarnings("ignore:OpticalSeries 'StimulusPresentation_encoding'")

MTL_N_UNITS = 35
MTL_DIM = 16
CLASS_NAMES = ["amygdala_right", "hippocampus_right"]
PROVENANCE = {
    "neurpir_version": "0.1.0",
    "recipe_sha256": "3f" * 32,
    "model_name": "neurpir-transformer",
}

# Reads the output with plain pynwb and h5py and prints what it found as JSON. It runs in
# a fresh interpreter, so it shows that the output needs nothing from neurpir_nwb.
FRESH_READER_SCRIPT = """
import json
import sys

import h5py
from pynwb import NWBHDF5IO

path = sys.argv[1]
with NWBHDF5IO(path, "r", load_namespaces=True) as io:
    nwbfile = io.read()
    table = nwbfile.processing["neurpir"]["embeddings"]
    region = table["unit"]
    region_rows = [int(row) for row in region.data[:]]
    result = {
        "table_type": type(table).__name__,
        "n_rows": len(table),
        "colnames": list(table.colnames),
        "region_targets_units": region.table is nwbfile.units,
        "region_rows": region_rows,
        "linked_unit_ids": [int(region.table.id[row]) for row in region_rows],
        "ids": [int(value) for value in table.id[:]],
        "embedding_dtype": str(table["embedding"].data.dtype),
        "embedding_shape": list(table["embedding"].data.shape),
        "embedding": table["embedding"].data[:].tolist(),
        "labels": [str(label) for label in table["predicted_label"].data[:]],
        "probabilities_dtype": str(table["class_probabilities"].data.dtype),
        "probabilities": table["class_probabilities"].data[:].tolist(),
    }

with h5py.File(path, "r") as output_file:
    attributes = {}
    for name, value in output_file["processing/neurpir/embeddings"].attrs.items():
        attributes[name] = value.tolist() if hasattr(value, "tolist") else value
    result["attributes"] = attributes

assert "neurpir_nwb" not in sys.modules
result["neurpir_nwb_imported"] = "neurpir_nwb" in sys.modules
print(json.dumps(result))
"""


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _folder_entries(folder: Path) -> list[str]:
    return sorted(entry.name for entry in folder.iterdir())


def _build_units_file(path: Path, unit_ids=(100, 101, 102, 103, 104, 105)) -> Path:
    """Write a small NWB file whose Units table has the given ids (not equal to the rows)."""
    nwbfile = mock_NWBFile()
    for i, unit_id in enumerate(unit_ids):
        nwbfile.add_unit(spike_times=[0.1 + i, 0.5 + i, 0.9 + i], id=unit_id)

    with NWBHDF5IO(path, "w") as io:
        io.write(nwbfile)
    return path


def _small_inputs(n_rows: int = 6, dim: int = 4) -> dict:
    """Return valid keyword arguments of write_embeddings_nwb for a file built by _build_units_file."""
    rng = np.random.default_rng(1)
    probabilities = rng.dirichlet(np.ones(2), size=n_rows).astype(np.float32)
    return {
        "rows": np.array([5, 3, 1, 0, 2, 4])[:n_rows],
        "embeddings": rng.normal(size=(n_rows, dim)).astype(np.float32),
        "predicted_labels": [CLASS_NAMES[int(p.argmax())] for p in probabilities],
        "probabilities": probabilities,
        "class_names": CLASS_NAMES,
        "provenance": dict(PROVENANCE),
    }


def _read_warnings(path: Path) -> set[str]:
    """Return the messages of the warnings that reading the file with pynwb emits."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with NWBHDF5IO(path, "r") as io:
            io.read()
    return {str(warning.message) for warning in caught}


def _validate_with_cached_namespaces(path: Path) -> tuple[str, list[str]]:
    """Return ("errors", messages), or ("raised", [exception]) when the validator itself fails."""
    try:
        errors = pynwb.validate(path=path)
    except Exception as error:  # any failure counts, because the outcome is compared with the source's
        return "raised", [f"{type(error).__name__}: {error}"]
    return "errors", sorted(str(error) for error in errors)


@pytest.fixture(scope="module")
def mtl_output(shared_data, tmp_path_factory):
    """Write embeddings of all MTL units, in reversed row order, and return what was written."""
    source = shared_data / "nwb" / "real" / "human_mtl_sub-4_ses-4.nwb"
    output = tmp_path_factory.mktemp("mtl") / "nwb" / "sub-4_ses-4.nwb"

    rng = np.random.default_rng(0)
    rows = np.arange(MTL_N_UNITS)[::-1].copy()
    embeddings = rng.normal(size=(MTL_N_UNITS, MTL_DIM)).astype(np.float32)
    probabilities = rng.dirichlet(np.ones(len(CLASS_NAMES)), size=MTL_N_UNITS).astype(np.float32)
    labels = [CLASS_NAMES[int(p.argmax())] for p in probabilities]
    labels[3] = ""

    sha_before = _sha256(source)
    returned = write_embeddings_nwb(
        source,
        output,
        rows=rows,
        embeddings=embeddings,
        predicted_labels=labels,
        probabilities=probabilities,
        class_names=CLASS_NAMES,
        provenance=PROVENANCE,
    )
    return {
        "source": source,
        "output": output,
        "returned": returned,
        "sha_before": sha_before,
        "sha_after": _sha256(source),
        "rows": rows,
        "embeddings": embeddings,
        "labels": labels,
        "probabilities": probabilities,
    }


def test_mtl_round_trip_in_fresh_process(mtl_output, tmp_path):
    script = tmp_path / "read_output.py"
    script.write_text(FRESH_READER_SCRIPT)
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}

    completed = subprocess.run(
        [sys.executable, str(script), str(mtl_output["output"])],
        capture_output=True,
        text=True,
        env=environment,
        cwd=tmp_path,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    result = json.loads(completed.stdout.strip().splitlines()[-1])

    rows = mtl_output["rows"]
    assert result["neurpir_nwb_imported"] is False
    assert result["table_type"] == "NeuronEmbeddingTable"
    assert result["n_rows"] == MTL_N_UNITS
    assert result["colnames"] == ["unit", "embedding", "predicted_label", "class_probabilities"]
    assert result["region_targets_units"] is True
    assert result["region_rows"] == rows.tolist()

    # Unit ids of the MTL file equal the row numbers, so the reversed rows also reverse the ids.
    assert result["linked_unit_ids"] == rows.tolist()
    assert result["ids"] == rows.tolist()

    assert result["embedding_dtype"] == "float32"
    assert result["embedding_shape"] == [MTL_N_UNITS, MTL_DIM]
    np.testing.assert_array_equal(np.array(result["embedding"], dtype=np.float32), mtl_output["embeddings"])
    assert result["labels"] == mtl_output["labels"]
    assert result["probabilities_dtype"] == "float32"
    np.testing.assert_array_equal(np.array(result["probabilities"], dtype=np.float32), mtl_output["probabilities"])

    attributes = result["attributes"]
    assert attributes["neurpir_version"] == PROVENANCE["neurpir_version"]
    assert attributes["recipe_sha256"] == PROVENANCE["recipe_sha256"]
    assert attributes["model_name"] == PROVENANCE["model_name"]
    assert attributes["class_names"] == CLASS_NAMES
    assert attributes["source_nwb_version"] == "2.4.0"
    assert attributes["output_nwb_version"] == "2.11.0"
    assert attributes["embedding_dim"] == MTL_DIM
    record = json.loads(attributes["provenance"])
    assert record["recipe_sha256"] == PROVENANCE["recipe_sha256"]
    assert record["source"]["nwb_version"] == "2.4.0"
    assert record["output_nwb_version"] == "2.11.0"


def test_mtl_source_unchanged(mtl_output):
    assert mtl_output["sha_after"] == mtl_output["sha_before"]
    assert mtl_output["returned"] == mtl_output["output"]


def test_mtl_output_folder_has_no_partial_file(mtl_output):
    assert _folder_entries(mtl_output["output"].parent) == [mtl_output["output"].name]


def test_mtl_module_description_names_version(mtl_output):
    with NWBHDF5IO(mtl_output["output"], "r") as io:
        module = io.read().processing["neurpir"]

    assert "neurpir-nwb" in module.description
    assert writer.__version__ in module.description


def test_mtl_read_adds_no_warnings(mtl_output):
    source_warnings = _read_warnings(mtl_output["source"])
    output_warnings = _read_warnings(mtl_output["output"])

    assert output_warnings - source_warnings == set()


def test_mtl_validates_against_pynwb_schema(mtl_output):
    assert pynwb.validate(path=mtl_output["output"], use_cached_namespaces=False) == []


def test_mtl_cached_validation_matches_source(mtl_output):
    # The source caches hdmf-common 1.5.0 without the experimental.yaml that its namespace
    # names, and the output keeps that cache, so the cached-namespace validator may fail on
    # both. The output must not fare worse than the source.
    source_outcome, source_messages = _validate_with_cached_namespaces(mtl_output["source"])
    output_outcome, output_messages = _validate_with_cached_namespaces(mtl_output["output"])

    assert output_outcome == source_outcome
    if source_outcome == "errors":
        assert set(output_messages) - set(source_messages) == set()
    else:
        assert output_messages == source_messages


def test_small_file_validates_with_cached_namespaces(tmp_path):
    source = _build_units_file(tmp_path / "source.nwb")
    output = write_embeddings_nwb(source, tmp_path / "out" / "source.nwb", **_small_inputs())

    assert pynwb.validate(path=source) == []
    assert pynwb.validate(path=output) == []


def test_small_file_links_rows_to_unit_ids(tmp_path):
    source = _build_units_file(tmp_path / "source.nwb")
    inputs = _small_inputs()
    output = write_embeddings_nwb(source, tmp_path / "run" / "nwb" / "source.nwb", **inputs)

    with NWBHDF5IO(output, "r") as io:
        nwbfile = io.read()
        table = nwbfile.processing["neurpir"]["embeddings"]
        region = table["unit"]
        linked_ids = [int(region.table.id[row]) for row in region.data[:]]
        table_ids = table.id[:].tolist()
        region_targets_units = region.table is nwbfile.units

    expected_ids = (100 + inputs["rows"]).tolist()
    assert region_targets_units
    assert linked_ids == expected_ids
    assert table_ids == expected_ids


def test_old_source_version_logged(shared_data, tmp_path, caplog):
    source = shared_data / "nwb" / "real" / "alm_sub-anm369963_ses-20170228.nwb"
    caplog.set_level(logging.INFO, logger="neurpir_nwb.io.writer")

    output = write_embeddings_nwb(
        source,
        tmp_path / "alm.nwb",
        rows=np.array([0]),
        embeddings=np.ones((1, 3)),
        predicted_labels=None,
        probabilities=None,
        class_names=None,
        provenance=PROVENANCE,
    )

    version_messages = [record.getMessage() for record in caplog.records if "nwb_version" in record.getMessage()]
    assert len(version_messages) == 1
    assert "2.0.2" in version_messages[0]
    assert "2.11.0" in version_messages[0]
    with h5py.File(output, "r") as output_file:
        attributes = output_file["processing/neurpir/embeddings"].attrs
        assert attributes["source_nwb_version"] == "2.0.2"
        assert attributes["output_nwb_version"] == "2.11.0"


def test_same_version_not_logged(tmp_path, caplog):
    source = _build_units_file(tmp_path / "source.nwb")
    caplog.set_level(logging.INFO, logger="neurpir_nwb.io.writer")

    write_embeddings_nwb(source, tmp_path / "out.nwb", **_small_inputs())

    assert not [record for record in caplog.records if "nwb_version" in record.getMessage()]


def test_without_probe_writes_two_columns(tmp_path):
    source = _build_units_file(tmp_path / "source.nwb")
    inputs = _small_inputs()
    inputs.update(predicted_labels=None, probabilities=None, class_names=None)

    output = write_embeddings_nwb(source, tmp_path / "out.nwb", **inputs)

    with NWBHDF5IO(output, "r") as io:
        table = io.read().processing["neurpir"]["embeddings"]
        colnames = table.colnames
        embedding = table["embedding"].data[:]
    with h5py.File(output, "r") as output_file:
        attribute_names = set(output_file["processing/neurpir/embeddings"].attrs)

    assert colnames == ("unit", "embedding")
    np.testing.assert_array_equal(embedding, inputs["embeddings"])
    assert "class_names" not in attribute_names
    assert {"neurpir_version", "recipe_sha256", "source_nwb_version"} <= attribute_names


def test_labels_without_probabilities(tmp_path):
    source = _build_units_file(tmp_path / "source.nwb")
    inputs = _small_inputs()
    inputs.update(probabilities=None)
    inputs["predicted_labels"][0] = ""

    output = write_embeddings_nwb(source, tmp_path / "out.nwb", **inputs)

    with NWBHDF5IO(output, "r") as io:
        table = io.read().processing["neurpir"]["embeddings"]
        colnames = table.colnames
        labels = [str(label) for label in table["predicted_label"].data[:]]

    assert colnames == ("unit", "embedding", "predicted_label")
    assert labels == inputs["predicted_labels"]


def test_plane_segmentation_target(tmp_path):
    nwbfile = mock_NWBFile()
    # pynwb's mocks number their default names per process, so the name is given.
    mock_PlaneSegmentation(name="PlaneSegmentation", n_rois=4, nwbfile=nwbfile)
    source = tmp_path / "ophys.nwb"
    with NWBHDF5IO(source, "w") as io:
        io.write(nwbfile)

    output = write_embeddings_nwb(
        source,
        tmp_path / "out.nwb",
        rows=np.array([3, 0]),
        embeddings=np.ones((2, 5)),
        predicted_labels=None,
        probabilities=None,
        class_names=None,
        provenance=PROVENANCE,
        table="/processing/ophys/PlaneSegmentation",
    )

    with NWBHDF5IO(output, "r") as io:
        nwbfile = io.read()
        region = nwbfile.processing["neurpir"]["embeddings"]["unit"]
        targets_plane = region.table is nwbfile.processing["ophys"]["PlaneSegmentation"]
        region_rows = region.data[:].tolist()

    assert targets_plane
    assert region_rows == [3, 0]


def test_existing_output_without_overwrite(tmp_path):
    source = _build_units_file(tmp_path / "source.nwb")
    output = tmp_path / "out" / "source.nwb"
    write_embeddings_nwb(source, output, **_small_inputs())
    sha_first = _sha256(output)

    with pytest.raises(RunDirectoryError, match="--overwrite") as raised:
        write_embeddings_nwb(source, output, **_small_inputs())

    assert str(output) in str(raised.value)
    assert "another output directory" in str(raised.value)
    assert _sha256(output) == sha_first
    assert _folder_entries(output.parent) == ["source.nwb"]


def test_overwrite_replaces_output(tmp_path):
    source = _build_units_file(tmp_path / "source.nwb")
    output = tmp_path / "out" / "source.nwb"
    write_embeddings_nwb(source, output, **_small_inputs())

    second = _small_inputs()
    second["embeddings"] = np.full((6, 4), 7.5, dtype=np.float32)
    write_embeddings_nwb(source, output, overwrite=True, **second)

    with NWBHDF5IO(output, "r") as io:
        embedding = io.read().processing["neurpir"]["embeddings"]["embedding"].data[:]
    np.testing.assert_array_equal(embedding, second["embeddings"])
    assert _folder_entries(output.parent) == ["source.nwb"]


def test_output_equal_to_source_rejected(tmp_path):
    source = _build_units_file(tmp_path / "source.nwb")
    sha_before = _sha256(source)

    with pytest.raises(RunDirectoryError, match="source file"):
        write_embeddings_nwb(source, tmp_path / "." / "source.nwb", overwrite=True, **_small_inputs())

    assert _sha256(source) == sha_before
    assert _folder_entries(tmp_path) == ["source.nwb"]


def _raise_injected(*args, **kwargs):
    raise RuntimeError("injected failure")


@pytest.mark.parametrize(
    ("target", "name"),
    [(writer.NWBHDF5IO, "write"), (writer, "_record_output_version")],
    ids=["pynwb-write", "version-record"],
)
def test_failure_leaves_no_file(tmp_path, monkeypatch, target, name):
    source = _build_units_file(tmp_path / "source.nwb")
    output_folder = tmp_path / "out"
    monkeypatch.setattr(target, name, _raise_injected)

    with pytest.raises(RuntimeError, match="injected failure"):
        write_embeddings_nwb(source, output_folder / "source.nwb", **_small_inputs())

    assert _folder_entries(output_folder) == []


def test_failed_overwrite_keeps_old_output(tmp_path, monkeypatch):
    source = _build_units_file(tmp_path / "source.nwb")
    output = tmp_path / "out" / "source.nwb"
    write_embeddings_nwb(source, output, **_small_inputs())
    sha_first = _sha256(output)
    monkeypatch.setattr(writer, "_record_output_version", _raise_injected)

    with pytest.raises(RuntimeError, match="injected failure"):
        write_embeddings_nwb(source, output, overwrite=True, **_small_inputs())

    assert _sha256(output) == sha_first
    assert _folder_entries(output.parent) == ["source.nwb"]


def test_appended_module_kept_beside_ours(shared_data, tmp_path):
    source = shared_data / "bugcases" / "B19a_appended_ok.nwb"
    with h5py.File(source, "r") as source_file:
        earlier_embedding = source_file["processing/embedding/neuron_embeddings/embedding"][:]

    output = write_embeddings_nwb(
        source,
        tmp_path / "B19a.nwb",
        rows=np.array([0, 1, 2]),
        embeddings=np.eye(3, 8),
        predicted_labels=["", "", ""],
        probabilities=None,
        class_names=None,
        provenance=PROVENANCE,
    )

    with NWBHDF5IO(output, "r") as io:
        nwbfile = io.read()
        module_names = set(nwbfile.processing)
        kept_embedding = nwbfile.processing["embedding"]["neuron_embeddings"]["embedding"].data[:]
        our_embedding = nwbfile.processing["neurpir"]["embeddings"]["embedding"].data[:]

    assert module_names == {"embedding", "neurpir"}
    np.testing.assert_array_equal(kept_embedding, earlier_embedding)
    np.testing.assert_array_equal(our_embedding, np.eye(3, 8, dtype=np.float32))


def test_source_with_neurpir_module_rejected(shared_data, tmp_path):
    first_output = write_embeddings_nwb(
        shared_data / "bugcases" / "B19a_appended_ok.nwb",
        tmp_path / "first" / "B19a.nwb",
        rows=np.array([0, 1, 2]),
        embeddings=np.ones((3, 2)),
        predicted_labels=None,
        probabilities=None,
        class_names=None,
        provenance=PROVENANCE,
    )
    second_folder = tmp_path / "second"

    with pytest.raises(DataError, match="already contains a processing module 'neurpir'") as raised:
        write_embeddings_nwb(
            first_output,
            second_folder / "B19a.nwb",
            rows=np.array([0, 1, 2]),
            embeddings=np.ones((3, 2)),
            predicted_labels=None,
            probabilities=None,
            class_names=None,
            provenance=PROVENANCE,
        )

    assert str(first_output) in str(raised.value)
    assert not second_folder.exists() or _folder_entries(second_folder) == []


def _replace(inputs: dict, **changes) -> dict:
    updated = dict(inputs)
    updated.update(changes)
    return updated


def _with_nan_embedding(inputs: dict) -> dict:
    embeddings = inputs["embeddings"].copy()
    embeddings[1, 2] = np.nan
    return _replace(inputs, embeddings=embeddings)


def _with_overflowing_embedding(inputs: dict) -> dict:
    embeddings = inputs["embeddings"].astype(np.float64)
    embeddings[0, 0] = 1e300
    return _replace(inputs, embeddings=embeddings)


def _with_unknown_label(inputs: dict) -> dict:
    labels = list(inputs["predicted_labels"])
    labels[2] = "thalamus"
    return _replace(inputs, predicted_labels=labels)


def _without_recipe_hash(inputs: dict) -> dict:
    return _replace(inputs, provenance={"neurpir_version": "0.1.0", "model_name": "m"})


INVALID_INPUT_CASES = [
    ("rows-length", lambda i: _replace(i, rows=i["rows"][:5]), ValueError, r"\(5, dim\)"),
    ("row-out-of-range", lambda i: _replace(i, rows=np.array([0, 1, 2, 3, 4, 6])), DataError, "row 6 is outside"),
    ("negative-row", lambda i: _replace(i, rows=np.array([0, 1, 2, 3, 4, -1])), DataError, "row -1 is outside"),
    ("duplicate-row", lambda i: _replace(i, rows=np.array([0, 1, 2, 3, 4, 4])), DataError, "unit id 104"),
    ("float-rows", lambda i: _replace(i, rows=np.arange(6.0)), ValueError, "integer"),
    ("embeddings-1d", lambda i: _replace(i, embeddings=np.ones(6)), ValueError, r"got \(6,\)"),
    ("embedding-nan", _with_nan_embedding, DataError, "unit id 103"),
    ("embedding-overflow", _with_overflowing_embedding, DataError, "unit id 105"),
    ("labels-length", lambda i: _replace(i, predicted_labels=["a"] * 5), ValueError, "5 predicted labels"),
    ("label-not-str", lambda i: _replace(i, predicted_labels=[1] * 6), ValueError, "must be str"),
    ("label-unknown", _with_unknown_label, ValueError, "'thalamus'"),
    ("probabilities-shape", lambda i: _replace(i, probabilities=np.ones((6, 3))), ValueError, r"\(6, 2\)"),
    ("probabilities-no-classes", lambda i: _replace(i, class_names=None), ValueError, "class_names"),
    ("probability-above-one", lambda i: _replace(i, probabilities=np.full((6, 2), 1.5)), DataError, "outside"),
    ("duplicate-class", lambda i: _replace(i, class_names=["a", "a"], predicted_labels=["a"] * 6), ValueError, "distinct"),
    ("missing-recipe-hash", _without_recipe_hash, ValueError, "recipe_sha256"),
    ("reserved-key", lambda i: _replace(i, provenance={**PROVENANCE, "embedding_dim": 3}), ValueError, "reserved"),
    ("attribute-not-str", lambda i: _replace(i, provenance={**PROVENANCE, "model_sha256": 30}), ValueError, "Pass it as str"),
    ("provenance-not-json", lambda i: _replace(i, provenance={**PROVENANCE, "started": object()}), ValueError, "JSON"),
    ("source-not-mapping", lambda i: _replace(i, provenance={**PROVENANCE, "source": "DANDI"}), ValueError, "mapping"),
]


@pytest.mark.parametrize(
    ("change", "error_type", "match"),
    [case[1:] for case in INVALID_INPUT_CASES],
    ids=[case[0] for case in INVALID_INPUT_CASES],
)
def test_invalid_inputs_rejected(tmp_path, change, error_type, match):
    source = _build_units_file(tmp_path / "source.nwb")
    output_folder = tmp_path / "out"

    with pytest.raises(error_type, match=match) as raised:
        write_embeddings_nwb(source, output_folder / "source.nwb", **change(_small_inputs()))

    assert str(source) in str(raised.value)
    assert not output_folder.exists()


def test_missing_table_rejected(tmp_path):
    nwbfile = mock_NWBFile()
    source = tmp_path / "no_units.nwb"
    with NWBHDF5IO(source, "w") as io:
        io.write(nwbfile)

    with pytest.raises(DataError, match="no table 'units'"):
        write_embeddings_nwb(source, tmp_path / "out" / "x.nwb", **_small_inputs())


def test_missing_source_rejected(tmp_path):
    with pytest.raises(SourceError, match="not found"):
        write_embeddings_nwb(tmp_path / "absent.nwb", tmp_path / "out.nwb", **_small_inputs())


def test_nwb1_source_rejected(shared_data, tmp_path):
    source = shared_data / "nwb" / "compat" / "nwb1_meister_retina_20080606_R1.nwb"

    with pytest.raises(SourceError, match="missing NWB version"):
        write_embeddings_nwb(source, tmp_path / "out" / "x.nwb", **_small_inputs())


def test_series_neurons_named_and_checked(tmp_path, shared_data):
    source = shared_data / "nwb" / "real" / "celegans_wholebrain_timeseries.nwb"
    names = ["Activity_0001", "Activity_0000"]
    provenance = {"neurpir_version": "0.1.0", "recipe_sha256": "0" * 64, "model_name": "worm"}

    output = write_embeddings_nwb(
        source,
        tmp_path / "worm.nwb",
        rows=np.arange(2),
        embeddings=np.ones((2, 3), dtype=np.float32),
        predicted_labels=None,
        probabilities=None,
        class_names=None,
        provenance=provenance,
        table="acquisition",
        series_names=names,
    )
    with NWBHDF5IO(str(output), "r") as io:
        table = io.read().processing["neurpir"]["embeddings"]
        assert np.asarray(table["timeseries"].data[:]).astype(str).tolist() == names

    with pytest.raises(DataError, match=r"no TimeSeries 'Activity_9999' in acquisition"):
        write_embeddings_nwb(
            source,
            tmp_path / "bad.nwb",
            rows=np.arange(1),
            embeddings=np.ones((1, 3), dtype=np.float32),
            predicted_labels=None,
            probabilities=None,
            class_names=None,
            provenance=provenance,
            table="acquisition",
            series_names=["Activity_9999"],
        )
    assert not (tmp_path / "bad.nwb").exists()
