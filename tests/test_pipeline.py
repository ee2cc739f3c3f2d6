"""A tiny simulated recipe run end to end in-process: simulate, segment, train, probe, write."""

import json

import numpy as np
import pytest
import xarray as xr
from pynwb import NWBHDF5IO

from neurpir_nwb.errors import RecipeError, RunDirectoryError
from neurpir_nwb.pipeline import resolve_sources, run_recipe
from neurpir_nwb.progress import SilentProgress
from neurpir_nwb.recipe import load_recipe
from neurpir_nwb.simulate import read_simulation_notes

TINY_SIMULATED = """\
name: tiny-sim
sources:
  - simulate: {animals: 3, first_seed: 0, neurons: 25, duration_s: 20}
labels:
  cell_type: {from: units.cell_type}
segments: {bin_size_s: 0.01, bins_per_patch: 8, patches: 8, neighbours: 3, distance_bins: 4}
model: {dim: 16, heads: 2, temporal_layers: 1, spatiotemporal_layers: 1, projector: [32, 32]}
train: {epochs: 1, steps_per_epoch: 5, batch_size: 16, lr: 1.0e-3, device: cpu, holdout_fraction: 0.2}
evaluate: {split: test-subjects, test_subjects: [sim-animal-2], probe: knn, knn_neighbours: 3}
"""


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    recipe_path = folder / "tiny.yaml"
    recipe_path.write_text(TINY_SIMULATED)
    recipe = load_recipe(recipe_path, output=folder / "run")
    summary = run_recipe(recipe)
    return recipe, summary


def test_simulated_run_writes_everything(tiny_run):
    _, summary = tiny_run
    run_dir = summary.run_dir

    assert sorted(path.name for path in (run_dir / "simulated").glob("*.nwb")) == [f"sim-animal-{seed}.nwb" for seed in range(3)]
    assert sorted(path.name for path in summary.outputs) == [f"sim-animal-{seed}.nwb" for seed in range(3)]
    for name in ("metrics.json", "embeddings.nc", "segments.nc", "model/weights.pt", "figures/confusion_embedding.png"):
        assert (run_dir / name).is_file(), name


def test_zero_shot_split_keeps_test_animal_unseen(tiny_run):
    _, summary = tiny_run
    embeddings = xr.open_dataset(summary.run_dir / "embeddings.nc", engine="h5netcdf")
    subjects = embeddings["subject"].values.astype(str)
    trained_on = embeddings["trained_on"].values.astype(bool)

    assert not trained_on[subjects == "sim-animal-2"].any()
    assert trained_on[subjects != "sim-animal-2"].all()
    metrics = summary.metrics
    assert metrics["probe"]["split"] == "test-subjects"
    assert metrics["embedding"]["classifier"] == "knn"
    assert sum(map(sum, metrics["embedding"]["confusion"])) == 25


def test_metrics_hold_retrieval_and_baselines(tiny_run):
    recipe, summary = tiny_run
    metrics = json.loads((summary.run_dir / "metrics.json").read_text())

    assert metrics["retrieval"]["n_queries"] > 0
    assert 0.0 <= metrics["retrieval"]["top1"] <= 1.0
    for key in ("embedding", "baseline", "baseline_pca"):
        assert metrics[key]["chance_balanced_accuracy"] == pytest.approx(1 / len(metrics[key]["classes"]))
    assert metrics["training"]["heldout_windows"] > 0
    assert metrics["recipe_sha256"] == recipe.sha256()


def test_output_predictions_are_known_types(tiny_run):
    _, summary = tiny_run
    with NWBHDF5IO(str(summary.outputs[-1]), "r") as io:
        nwb = io.read()
        table = nwb.processing["neurpir"]["embeddings"]
        predicted = set(np.asarray(table["predicted_label"].data[:]).astype(str))
        assert predicted <= {"RS", "IB", "CH", "FS", "LTS"}
        assert len(table) == len(nwb.units)


def test_rerun_refused_then_reuses_simulation(tiny_run):
    recipe, summary = tiny_run
    with pytest.raises(RunDirectoryError, match=r"already contains results"):
        run_recipe(recipe)

    before = {path: path.stat().st_mtime_ns for path in (summary.run_dir / "simulated").glob("*.nwb")}
    run_recipe(recipe, overwrite=True)
    after = {path: path.stat().st_mtime_ns for path in (summary.run_dir / "simulated").glob("*.nwb")}
    assert before == after


def test_simulation_options_reach_the_files(tmp_path):
    recipe_path = tmp_path / "coupled.yaml"
    recipe_path.write_text(
        "name: coupled\n"
        "sources:\n"
        "  - simulate: {animals: 1, neurons: 10, duration_s: 2, layout: laminar, parameter_jitter: 0.1,\n"
        "               fast_input_sd: 1.5, fast_input_tau_s: 0.3, population_coupling: {FS: 0.8, RS: 0.2}}\n"
    )
    recipe = load_recipe(recipe_path, output=tmp_path / "run")

    resolved = resolve_sources(recipe, tmp_path / "run", SilentProgress())
    settings = read_simulation_notes(resolved.paths[0])["settings"]

    assert settings["layout"] == "laminar"
    assert settings["parameter_jitter"] == 0.1
    assert settings["fast_input_sd"] == 1.5
    assert settings["fast_input_tau_s"] == 0.3
    assert settings["population_coupling"] == {"RS": 0.2, "FS": 0.8}


def test_unknown_test_subject(tmp_path):
    recipe_path = tmp_path / "tiny.yaml"
    recipe_path.write_text(TINY_SIMULATED.replace("test_subjects: [sim-animal-2]", "test_subjects: [mouse-7]"))
    recipe = load_recipe(recipe_path, output=tmp_path / "run")

    with pytest.raises(RecipeError, match=r"test_subjects \['mouse-7'\] match no subject"):
        run_recipe(recipe)


def test_annotation_labels_join_units(tmp_path, shared_data):
    import h5py

    source = shared_data / "nwb" / "real" / "human_mtl_sub-4_ses-4.nwb"
    with h5py.File(source, "r") as file:
        identifier = file["identifier"][()].decode()
        unit_ids = file["units/id"][:]

    # 20 of 35 units labelled, one unknown unit id and one duplicate row.
    rows = ["session,unit_id,tag"]
    rows += [f"{identifier},{unit_id},{' PV ' if index % 2 else 'sst'}" for index, unit_id in enumerate(unit_ids[:20])]
    rows += [f"{identifier},9999,PV", f"{identifier},{unit_ids[0]},sst"]
    (tmp_path / "tags.csv").write_text("\n".join(rows) + "\n")
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text(
        "name: tags\nsources: [{path: x.nwb}]\n"
        "labels:\n  tag: {from: annotations, table: tags.csv, column: tag}\n"
    )
    recipe = load_recipe(recipe_path, sources=[source])

    from neurpir_nwb.pipeline import join_all_annotations, read_sources
    from neurpir_nwb.progress import SilentProgress

    recordings = read_sources(recipe, recipe.source_paths, SilentProgress())
    report = join_all_annotations(recipe, recordings)["tag"]
    labels = recordings[0].labels["tag"]

    assert report["matched"] == 20
    assert len(report["unknown_keys"]) == 1
    assert len(report["duplicate_keys"]) == 1
    assert sorted(set(labels.tolist())) == ["", "pv", "sst"]
    assert int(np.sum(labels != "")) == 20
    assert recordings[0].labels["tag_raw"][1] == " PV "


def test_annotation_label_needs_table(tmp_path):
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text("name: t\nsources: [{path: x.nwb}]\nlabels:\n  tag: {from: annotations}\n")
    with pytest.raises(RecipeError, match=r"needs 'table'"):
        load_recipe(recipe_path)


OPHYS_TINY = """\
name: ophys-tiny
sources:
  - path: x.nwb
    ophys: {source: auto}
labels:
  accepted: {from: rois.Accepted}
segments: {bin_size_s: 0.1, bins_per_patch: 5, patches: 5, neighbours: 3, distance_bins: 4}
model: {dim: 16, heads: 2, temporal_layers: 1, spatiotemporal_layers: 1, projector: [32, 32]}
train: {epochs: 1, steps_per_epoch: 5, batch_size: 8, lr: 1.0e-3, device: cpu}
evaluate: {folds: 3}
"""


def test_ophys_recipe_links_plane_segmentation_rows(tmp_path, shared_data):
    import subprocess
    import sys
    import textwrap

    source = shared_data / "nwb" / "real" / "ophys_suite2p_15rois.nwb"
    recipe_path = tmp_path / "ophys.yaml"
    recipe_path.write_text(OPHYS_TINY)
    recipe = load_recipe(recipe_path, sources=[source], output=tmp_path / "run")

    summary = run_recipe(recipe)

    assert summary.metrics["n_neurons"] == 15
    assert summary.metrics["baseline"] is None
    assert summary.metrics["baseline_pca"]["n_labelled"] == 15
    check = textwrap.dedent(
        f"""
        import sys
        from pynwb import NWBHDF5IO
        from pynwb.ophys import PlaneSegmentation
        with NWBHDF5IO({str(summary.outputs[0])!r}, "r") as io:
            table = io.read().processing["neurpir"]["embeddings"]
            assert len(table) == 15
            assert isinstance(table["unit"].table, PlaneSegmentation)
            assert table["unit"].data[:].tolist() == list(range(15))
        assert "neurpir_nwb" not in sys.modules
        print("ok")
        """
    )
    read = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert read.stdout.strip() == "ok", read.stderr


def test_timeseries_recipe_embeds_every_series(tmp_path, shared_data):
    source = shared_data / "nwb" / "real" / "celegans_wholebrain_timeseries.nwb"
    recipe_path = tmp_path / "worm.yaml"
    recipe_path.write_text(
        "name: worm\nsources:\n  - path: x.nwb\n    timeseries: {pattern: 'Activity_*'}\n"
        "segments: {bin_size_s: 0.2, bins_per_patch: 5, patches: 6, neighbours: 3, distance_bins: 4}\n"
        "model: {dim: 16, heads: 2, temporal_layers: 1, spatiotemporal_layers: 1, projector: [32, 32]}\n"
        "train: {epochs: 1, steps_per_epoch: 5, batch_size: 16, device: cpu}\n"
    )
    recipe = load_recipe(recipe_path, sources=[source], output=tmp_path / "run")

    summary = run_recipe(recipe)
    embeddings = xr.open_dataset(summary.run_dir / "embeddings.nc", engine="h5netcdf")

    assert embeddings.sizes["neuron"] == 62
    assert np.isfinite(embeddings["embedding"].values).all()
    with NWBHDF5IO(str(summary.outputs[0]), "r") as io:
        nwb = io.read()
        table = nwb.processing["neurpir"]["embeddings"]
        names = np.asarray(table["timeseries"].data[:]).astype(str)
        assert len(table) == 62
        assert set(names) <= set(nwb.acquisition)
        assert np.asarray(table["embedding"].data).shape == (62, 16)


def test_mixed_modalities_rejected(tmp_path):
    recipe_path = tmp_path / "mixed.yaml"
    recipe_path.write_text("name: m\nsources:\n  - path: a.nwb\n  - path: b.nwb\n    ophys: {source: auto}\n")
    with pytest.raises(RecipeError, match=r"sources mix ecephys Units tables and ophys traces; set separate_models: true"):
        load_recipe(recipe_path)


def test_separate_models_per_modality(tmp_path, shared_data):
    units = shared_data / "nwb" / "real" / "human_mtl_sub-4_ses-4.nwb"
    rois = shared_data / "nwb" / "real" / "ophys_suite2p_15rois.nwb"
    recipe_path = tmp_path / "both.yaml"
    recipe_path.write_text(
        f"name: both\nseparate_models: true\nsources:\n  - path: {units}\n  - path: {rois}\n    ophys: {{source: auto}}\n"
        "segments: {bin_size_s: 0.1, bins_per_patch: 5, patches: 5, neighbours: 2, distance_bins: 3}\n"
        "model: {dim: 8, heads: 2, temporal_layers: 1, spatiotemporal_layers: 1, projector: [16, 16]}\n"
        "train: {epochs: 1, steps_per_epoch: 2, batch_size: 4, device: cpu}\n"
    )
    recipe = load_recipe(recipe_path, output=tmp_path / "run")

    summary = run_recipe(recipe)

    assert set(summary.metrics["models"]) == {"ecephys", "ophys"}
    assert summary.metrics["models"]["ecephys"]["n_neurons"] == 35
    assert summary.metrics["models"]["ophys"]["n_neurons"] == 15
    assert sorted(path.parent.parent.name for path in summary.outputs) == ["ecephys", "ophys"]
    assert (tmp_path / "run" / "metrics.json").is_file()


def test_annotated_rois_drive_the_probe(tmp_path, shared_data):
    import h5py

    source = shared_data / "nwb" / "real" / "ophys_suite2p_15rois.nwb"
    with h5py.File(source, "r") as file:
        identifier = file["identifier"][()].decode()

    # ROIs 0 to 9 labelled, plus ROI 99 that does not exist and a second row for ROI 3.
    rows = ["session,roi_id,subclass"]
    rows += [f"{identifier},{roi},{'Pvalb' if roi % 2 else 'L2/3 IT'}" for roi in range(10)]
    rows += [f"{identifier},99,Sst", f"{identifier},3,Pvalb"]
    (tmp_path / "subclass.csv").write_text("\n".join(rows) + "\n")
    recipe_path = tmp_path / "ophys.yaml"
    recipe_path.write_text(
        OPHYS_TINY.replace("  accepted: {from: rois.Accepted}", "  subclass: {from: annotations, table: subclass.csv, column: subclass}")
    )
    recipe = load_recipe(recipe_path, sources=[source], output=tmp_path / "run")

    summary = run_recipe(recipe)
    report = summary.metrics["annotations"]["subclass"]

    assert report["matched"] == 10
    assert report["unmatched_neurons"] == 5
    assert len(report["unknown_keys"]) == 1
    assert len(report["duplicate_keys"]) == 1
    assert summary.metrics["embedding"]["n_labelled"] == 10
    assert sum(map(sum, summary.metrics["embedding"]["confusion"])) == 10


def test_two_planes_write_one_table_each(tmp_path, shared_data):
    source = shared_data / "bugcases" / "B12_roi_subset_two_planes.nwb"
    recipe_path = tmp_path / "planes.yaml"
    recipe_path.write_text(
        "name: planes\nsources:\n  - path: x.nwb\n    ophys: {source: Fluorescence}\n"
        "segments: {bin_size_s: 0.1, bins_per_patch: 2, patches: 2, neighbours: 2, distance_bins: 3}\n"
        "model: {dim: 8, heads: 2, temporal_layers: 1, spatiotemporal_layers: 1, projector: [16, 16]}\n"
        "train: {epochs: 1, steps_per_epoch: 2, batch_size: 4, device: cpu}\n"
    )
    recipe = load_recipe(recipe_path, sources=[source], output=tmp_path / "run")

    summary = run_recipe(recipe)

    with NWBHDF5IO(str(summary.outputs[0]), "r") as io:
        module = io.read().processing["neurpir"]
        plane0 = module["embeddings_PlaneSegmentation_plane0"]
        plane1 = module["embeddings_PlaneSegmentation_plane1"]
        assert plane0["unit"].table.name == "PlaneSegmentation_plane0"
        assert plane1["unit"].table.name == "PlaneSegmentation_plane1"
        assert plane0.id[:].tolist() == [0, 2, 4]
        assert plane1.id[:].tolist() == [0, 1, 2, 3]
        assert plane0["unit"].data[:].tolist() == [0, 2, 4]
