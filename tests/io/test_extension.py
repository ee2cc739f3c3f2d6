"""The ndx-neurpir extension: committed YAML, where the package finds it, and the files written with it."""

import json
import logging
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pynwb
import pytest
from nwbinspector import Importance, inspect_nwbfile
from pynwb import NWBHDF5IO

import neurpir_nwb
from neurpir_nwb.errors import DataError, SourceError
from neurpir_nwb.io.writer import EmbeddingBlock, write_embedding_tables_nwb, write_embeddings_nwb
from neurpir_nwb.nwb_extension import NAMESPACE, NAMESPACE_VERSION, TABLE_TYPE, namespace_path
from neurpir_nwb.nwb_extension.create_spec import write_spec
from neurpir_nwb.simulate import SimulationSettings, simulate_dataset

# pynwb warns about an OpticalSeries of the MTL source on every read. The writer adds no warning of its own.
pytestmark = pytest.mark.filterwarnings("ignore:OpticalSeries 'StimulusPresentation_encoding'")

REPOSITORY = Path(__file__).resolve().parents[2]
CLASS_NAMES = ["amygdala_right", "hippocampus_right"]
PROVENANCE = {
    "neurpir_version": "0.1.0",
    "recipe_sha256": "ab" * 32,
    "model_name": "mtl-test",
    "model_sha256": "cd" * 32,
    "label_name": "region",
    "training_sources": [
        {"identifier": "session-a", "dandiset_id": "000004", "dandiset_version": "0.220126.1852", "asset_id": "0f3a"},
    ],
}


def _random_outputs(n_rows: int, dim: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    probabilities = rng.dirichlet(np.ones(len(CLASS_NAMES)), size=n_rows).astype(np.float32)
    return {
        "rows": np.arange(n_rows),
        "embeddings": rng.normal(size=(n_rows, dim)).astype(np.float32),
        "predicted_labels": [CLASS_NAMES[int(p.argmax())] for p in probabilities],
        "probabilities": probabilities,
        "class_names": CLASS_NAMES,
    }


def _our_messages(path: Path, *, skip_validate: bool = False) -> list:
    """Return nwbinspector's messages of BEST_PRACTICE_VIOLATION or above about the objects the writer adds."""
    messages = inspect_nwbfile(
        nwbfile_path=path, skip_validate=skip_validate, importance_threshold=Importance.BEST_PRACTICE_VIOLATION
    )
    ours = []
    for message in messages:
        location = message.location or ""
        if (
            location.startswith("/processing/neurpir")
            or message.object_type == TABLE_TYPE
            or (message.object_type == "ProcessingModule" and message.object_name == "neurpir")
            or message.importance == Importance.ERROR
        ):
            ours.append(message)
    return ours


@pytest.fixture(scope="module")
def mtl_output(shared_data, tmp_path_factory):
    source = shared_data / "nwb" / "real" / "human_mtl_sub-4_ses-4.nwb"
    output = tmp_path_factory.mktemp("mtl") / "sub-4_ses-4.nwb"
    write_embeddings_nwb(source, output, provenance=PROVENANCE, **_random_outputs(35, 8))
    return output


def test_committed_yaml_matches_generator(tmp_path):
    generated = write_spec(tmp_path)

    for path in generated:
        committed = REPOSITORY / "schemas" / NAMESPACE / path.name
        assert committed.is_file(), committed
        assert path.read_text() == committed.read_text(), f"{committed.name} differs from what create_spec writes"


def test_namespace_found_in_checkout():
    assert namespace_path() == REPOSITORY / "schemas" / NAMESPACE / f"{NAMESPACE}.namespace.yaml"


def test_namespace_found_in_wheel(tmp_path):
    pytest.importorskip("hatchling")
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(REPOSITORY), "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    wheel = next((tmp_path / "dist").glob("neurpir_nwb-*.whl"))
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)

    script = (
        "import pynwb\n"
        "from neurpir_nwb.nwb_extension import namespace_path, neuron_embedding_table_class\n"
        "print(namespace_path())\n"
        "print(neuron_embedding_table_class().__name__)\n"
    )
    environment = {**os.environ, "PYTHONPATH": str(site)}
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environment, cwd=tmp_path, timeout=120)

    assert completed.returncode == 0, completed.stderr
    found, class_name = completed.stdout.split()
    assert Path(found) == site / "neurpir_nwb" / "schemas" / NAMESPACE / f"{NAMESPACE}.namespace.yaml"
    assert class_name == TABLE_TYPE
    bundled = sorted(path.name for path in (site / "neurpir_nwb" / "recipes").glob("*.yaml"))
    assert bundled == sorted(path.name for path in (REPOSITORY / "recipes").glob("*.yaml"))


def test_spec_cached_with_version(mtl_output):
    with h5py.File(mtl_output, "r") as output_file:
        cached_versions = list(output_file["specifications"][NAMESPACE])
        table = output_file["processing/neurpir/embeddings"]
        neurodata_type = table.attrs["neurodata_type"]
        namespace = table.attrs["namespace"]

    assert cached_versions == [NAMESPACE_VERSION]
    assert neurodata_type == TABLE_TYPE
    assert namespace == NAMESPACE


def test_mtl_upgrade_recorded_in_provenance(mtl_output):
    # The source was written under NWB 2.4.0; appending with pynwb 4 upgrades the file to
    # pynwb's core version, so the table records both versions instead of keeping 2.4.0.
    core_version = pynwb.get_type_map().namespace_catalog.get_namespace("core").version
    with h5py.File(mtl_output, "r") as output_file:
        root_version = output_file.attrs["nwb_version"]
        attributes = dict(output_file["processing/neurpir/embeddings"].attrs)
    record = json.loads(attributes["provenance"])

    assert attributes["source_nwb_version"] == "2.4.0"
    assert attributes["output_nwb_version"] == core_version
    assert root_version == core_version
    assert record["source_nwb_version"] == "2.4.0"
    assert record["output_nwb_version"] == core_version
    assert record["source"]["nwb_version"] == "2.4.0"


def test_upgrade_logged(shared_data, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="neurpir_nwb.io.writer")
    source = shared_data / "nwb" / "real" / "human_mtl_sub-4_ses-4.nwb"

    write_embeddings_nwb(source, tmp_path / "mtl.nwb", provenance=PROVENANCE, **_random_outputs(35, 4))

    upgrades = [record.getMessage() for record in caplog.records if "raised nwb_version" in record.getMessage()]
    assert len(upgrades) == 1
    assert "from 2.4.0" in upgrades[0]


def test_provenance_attributes_typed(mtl_output):
    with NWBHDF5IO(str(mtl_output), "r", load_namespaces=True) as io:
        table = io.read().processing["neurpir"]["embeddings"]
        typed = {
            "embedding_dim": int(table.embedding_dim),
            "model_name": table.model_name,
            "recipe_sha256": table.recipe_sha256,
            "model_sha256": table.model_sha256,
            "label_name": table.label_name,
            "class_names": [str(name) for name in table.class_names],
        }
        record = json.loads(table.provenance)

    assert typed == {
        "embedding_dim": 8,
        "model_name": "mtl-test",
        "recipe_sha256": PROVENANCE["recipe_sha256"],
        "model_sha256": PROVENANCE["model_sha256"],
        "label_name": "region",
        "class_names": CLASS_NAMES,
    }
    assert record["training_sources"] == PROVENANCE["training_sources"]
    assert record["source"]["path"].endswith("human_mtl_sub-4_ses-4.nwb")
    assert record["source"]["identifier"]


def test_dandi_fields_of_source_kept(shared_data, tmp_path):
    source = shared_data / "nwb" / "real" / "human_mtl_sub-4_ses-4.nwb"
    dandi = {"dandiset_id": "000004", "dandiset_version": "draft", "asset_id": "5c9e"}

    output = write_embeddings_nwb(source, tmp_path / "mtl.nwb", provenance={**PROVENANCE, "source": dandi}, **_random_outputs(35, 4))

    with h5py.File(output, "r") as output_file:
        record = json.loads(output_file["processing/neurpir/embeddings"].attrs["provenance"])
    assert record["source"]["asset_id"] == "5c9e"
    assert record["source"]["dandiset_id"] == "000004"
    assert record["source"]["nwb_version"] == "2.4.0"


def test_mtl_inspector_clean_for_our_objects(mtl_output):
    # The source caches hdmf-common 1.5.0 without the experimental.yaml its namespace names,
    # so pynwb's cached-namespace validation fails on the source itself; inspect without it.
    assert _our_messages(mtl_output, skip_validate=True) == []


def test_ophys_inspector_clean_for_our_objects(shared_data, tmp_path):
    source = shared_data / "nwb" / "real" / "ophys_suite2p_15rois.nwb"
    output = write_embeddings_nwb(
        source,
        tmp_path / "ophys.nwb",
        provenance=PROVENANCE,
        table="processing/ophys/ImageSegmentation/PlaneSegmentation",
        **_random_outputs(15, 8),
    )

    assert pynwb.validate(path=output) == []
    assert _our_messages(output) == []


def test_simulated_inspector_clean_for_our_objects(tmp_path):
    settings = SimulationSettings(n_neurons=12, duration_s=5.0)
    (source,) = simulate_dataset(tmp_path / "simulated", settings, [0])
    output = write_embeddings_nwb(source, tmp_path / "out" / source.name, provenance=PROVENANCE, **_random_outputs(12, 8))

    assert pynwb.validate(path=output) == []
    assert _our_messages(output) == []


def test_read_embeddings_single_file(mtl_output):
    dataset = neurpir_nwb.read_embeddings(mtl_output)

    assert dataset.sizes["neuron"] == 35
    assert dataset["embedding"].shape == (35, 8)
    assert dataset["embedding"].dtype == np.float32
    assert dataset["class"].values.tolist() == CLASS_NAMES
    assert dataset["source_table"].values[0] == "/units"
    assert dataset["source_row"].values.tolist() == list(range(35))
    assert set(dataset["model_sha256"].values.tolist()) == {PROVENANCE["model_sha256"]}
    provenance = json.loads(dataset.attrs["provenance"])
    assert provenance[str(mtl_output)]["embeddings"]["model_name"] == "mtl-test"


def test_read_embeddings_folder_and_list(shared_data, tmp_path):
    folder = tmp_path / "outputs"
    real = shared_data / "nwb" / "real"
    write_embeddings_nwb(real / "human_mtl_sub-4_ses-4.nwb", folder / "mtl.nwb", provenance=PROVENANCE, **_random_outputs(35, 6))
    write_embeddings_nwb(
        real / "ophys_suite2p_15rois.nwb",
        folder / "ophys.nwb",
        provenance=PROVENANCE,
        table="processing/ophys/ImageSegmentation/PlaneSegmentation",
        **_random_outputs(15, 6, seed=1),
    )
    rows_per_file = {}
    for path in sorted(folder.glob("*.nwb")):
        with h5py.File(path, "r") as output_file:
            rows_per_file[path.name] = len(output_file["processing/neurpir/embeddings/id"])

    from_folder = neurpir_nwb.read_embeddings(folder)
    from_list = neurpir_nwb.read_embeddings([folder / "ophys.nwb", folder / "mtl.nwb"])

    assert from_folder.sizes["neuron"] == sum(rows_per_file.values()) == 50
    assert from_list.sizes["neuron"] == 50
    assert from_list["file"].values[0] == str(folder / "ophys.nwb")
    assert set(from_folder["source_table"].values.tolist()) == {"/units", "/processing/ophys/ImageSegmentation/PlaneSegmentation"}
    assert sorted(json.loads(from_folder.attrs["provenance"])) == sorted(str(path) for path in folder.glob("*.nwb"))


def test_read_embeddings_two_planes(shared_data, tmp_path):
    source = shared_data / "bugcases" / "B12_roi_subset_two_planes.nwb"
    blocks = [
        EmbeddingBlock(table="processing/ophys/ImageSegmentation/PlaneSegmentation_plane0", rows=np.array([0, 2, 4]),
                       embeddings=np.ones((3, 4)), name="embeddings_PlaneSegmentation_plane0"),
        EmbeddingBlock(table="processing/ophys/ImageSegmentation/PlaneSegmentation_plane1", rows=np.arange(4),
                       embeddings=np.zeros((4, 4)), name="embeddings_PlaneSegmentation_plane1"),
    ]
    with h5py.File(source, "r") as source_file:
        paths = []
        source_file.visit(lambda name: paths.append(name) if name.endswith(("PlaneSegmentation_plane0", "PlaneSegmentation_plane1")) else None)
    for block, path in zip(blocks, sorted(paths)):
        block.table = path

    output = write_embedding_tables_nwb(source, tmp_path / "planes.nwb", blocks=blocks, class_names=None, provenance=PROVENANCE)
    dataset = neurpir_nwb.read_embeddings(output)

    assert dataset.sizes["neuron"] == 7
    assert dataset["table"].values.tolist() == ["embeddings_PlaneSegmentation_plane0"] * 3 + ["embeddings_PlaneSegmentation_plane1"] * 4
    assert dataset["source_row"].values.tolist() == [0, 2, 4, 0, 1, 2, 3]
    assert "predicted_label" not in dataset


def test_read_embeddings_timeseries_names(shared_data, tmp_path):
    source = shared_data / "nwb" / "real" / "celegans_wholebrain_timeseries.nwb"
    output = write_embeddings_nwb(
        source, tmp_path / "worm.nwb", rows=np.arange(2), embeddings=np.ones((2, 3)), predicted_labels=None,
        probabilities=None, class_names=None, provenance=PROVENANCE, table="acquisition", series_names=["Activity_0003", "Activity_0001"],
    )

    dataset = neurpir_nwb.read_embeddings(output)

    assert dataset["timeseries"].values.tolist() == ["Activity_0003", "Activity_0001"]
    assert dataset["source_table"].values.tolist() == ["/acquisition"] * 2
    assert dataset["source_row"].values.tolist() == [-1, -1]


def test_read_embeddings_different_dims_rejected(shared_data, mtl_output, tmp_path):
    other = write_embeddings_nwb(
        shared_data / "nwb" / "real" / "human_mtl_sub-4_ses-4.nwb", tmp_path / "wide.nwb", provenance=PROVENANCE, **_random_outputs(35, 12)
    )

    with pytest.raises(DataError, match="12-dimensional") as raised:
        neurpir_nwb.read_embeddings([mtl_output, other])

    assert str(mtl_output) in str(raised.value)
    assert str(other) in str(raised.value)


def test_read_embeddings_different_classes_rejected(shared_data, mtl_output, tmp_path):
    inputs = _random_outputs(35, 8)
    inputs["class_names"] = ["CA1", "DG"]
    inputs["predicted_labels"] = ["CA1"] * 35
    other = write_embeddings_nwb(shared_data / "nwb" / "real" / "human_mtl_sub-4_ses-4.nwb", tmp_path / "ca.nwb", provenance=PROVENANCE, **inputs)

    with pytest.raises(DataError, match="classes") as raised:
        neurpir_nwb.read_embeddings([mtl_output, other])

    assert str(mtl_output) in str(raised.value)
    assert str(other) in str(raised.value)


def test_read_embeddings_rejects_source_file(shared_data):
    source = shared_data / "nwb" / "real" / "human_mtl_sub-4_ses-4.nwb"

    with pytest.raises(DataError, match=f"no {TABLE_TYPE}"):
        neurpir_nwb.read_embeddings(source)


def test_read_embeddings_missing_paths(tmp_path):
    with pytest.raises(SourceError, match="not found"):
        neurpir_nwb.read_embeddings(tmp_path / "absent.nwb")
    with pytest.raises(SourceError, match="no \\*.nwb file"):
        neurpir_nwb.read_embeddings(tmp_path)
