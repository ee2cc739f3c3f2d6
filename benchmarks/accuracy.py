"""Accuracy benchmark on simulated Izhikevich animals: in domain, out of domain and retrieval.

The encoder trains on every animal but one, which stays unseen. Then:

- in domain: a stratified 5-fold probe over the neurons of the training animals;
- out of domain: the probe fitted on the training animals and scored on the unseen one;
- retrieval: the share of held-out windows (the last ones of every neuron, never
  trained on) whose nearest neuron mean embedding is their own neuron's.

The same probe and splits score three baselines: spike-train features (firing rate,
CV of inter-spike intervals, log-ISI histogram), PCA of the binned windows, and the
same encoder trained without neighbours. Results go to ``<output>/results.json`` and
``<output>/results.md``, figures to ``<output>/figures``.

Usage::

    python benchmarks/accuracy.py                              # the recipe's default simulation
    python benchmarks/accuracy.py --epochs 20 --output runs/benchmark-accuracy
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import xarray as xr
import yaml

from neurpir_nwb.evaluate import (
    ProbeSettings,
    binned_activity_pca,
    plot_confusion,
    plot_embedding_map,
    retrieval_top1,
    run_probe,
    spike_train_features,
    summarise_window_projections,
)
from neurpir_nwb.io.units import read_units
from neurpir_nwb.pipeline import machine_description, run_recipe, software_versions
from neurpir_nwb.recipe import Recipe, load_recipe
from neurpir_nwb.segments import load_segment_set
from neurpir_nwb.train import WindowData

REPOSITORY = Path(__file__).resolve().parents[1]
LABEL = "cell_type"

logger = logging.getLogger("benchmarks.accuracy")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the results table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", type=Path, default=REPOSITORY / "recipes" / "izhikevich.yaml", help="simulated recipe to start from")
    parser.add_argument("--output", type=Path, default=Path("runs") / "benchmark-accuracy", help="folder of the runs and results")
    parser.add_argument("--epochs", type=int, default=None, help="override train.epochs")
    parser.add_argument("--steps-per-epoch", type=int, default=None, help="override train.steps_per_epoch")
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    started = time.perf_counter()
    recipe = load_recipe(arguments.recipe)
    if recipe.evaluate.split != "test-subjects":
        parser.error(f"{arguments.recipe} must use the test-subjects split, so that one animal stays unseen")
    if arguments.epochs is not None:
        recipe.train.epochs = arguments.epochs
    if arguments.steps_per_epoch is not None:
        recipe.train.steps_per_epoch = arguments.steps_per_epoch

    runs = {
        "neurpir": _run(recipe, arguments.output / "neurpir", neighbours=None),
        "neurpir_no_neighbours": _run(recipe, arguments.output / "no-neighbours", neighbours=0),
    }
    results = score(recipe, runs, arguments.output)
    results["wall_time_s"] = time.perf_counter() - started
    results["command"] = " ".join(["python", "benchmarks/accuracy.py", *(argv if argv is not None else sys.argv[1:])])
    results["machine"] = machine_description()
    results["versions"] = software_versions()

    (arguments.output / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    table = results_table(results)
    (arguments.output / "results.md").write_text(table + "\n", encoding="utf-8")
    print(table)
    return 0


def _run(recipe: Recipe, run_dir: Path, *, neighbours: int | None) -> Path:
    """Train one variant of the recipe into ``run_dir`` and return it."""
    variant = recipe.model_copy(deep=True)
    variant.base_dir = recipe.base_dir
    variant.output.dir = run_dir
    if neighbours is not None:
        variant.segments.neighbours = neighbours
    run_recipe(variant, overwrite=True)
    return run_dir


def score(recipe: Recipe, runs: dict[str, Path], output: Path) -> dict:
    """Score the embeddings of every run and the baselines on the same splits."""
    main_run = runs["neurpir"]
    segment_set = load_segment_set(main_run / "segments.nc")
    embeddings = {name: xr.open_dataset(run / "embeddings.nc", engine="h5netcdf").load() for name, run in runs.items()}
    reference = embeddings["neurpir"]

    labels = reference[f"label_{LABEL}"].values.astype(str)
    subjects = reference["subject"].values.astype(str)
    test_subjects = list(recipe.evaluate.test_subjects)
    training = ~np.isin(subjects, test_subjects)
    seed = recipe.train.seed

    data = WindowData(segment_set, holdout_fraction=recipe.train.holdout_fraction, train_neurons=np.flatnonzero(training))
    features = {name: dataset["embedding"].values for name, dataset in embeddings.items()}
    features["spike_train_features"] = _spike_train_features(segment_set)
    pca_windows = binned_activity_pca(data.activity, data.valid, np.flatnonzero(training), seed=seed)
    features["pca_binned_activity"] = summarise_window_projections(pca_windows, data.valid)

    results: dict = {"label": LABEL, "test_subjects": test_subjects, "n_neurons": int(labels.size), "scores": {}}
    in_domain = ProbeSettings(split="stratified", folds=recipe.evaluate.folds)
    out_of_domain = ProbeSettings(split="holdout", test_groups=tuple(test_subjects))
    figures = output / "figures"
    for name, matrix in features.items():
        inside = run_probe(matrix[training], labels[training], seed=seed, settings=in_domain)
        outside = run_probe(matrix, labels, seed=seed, groups=subjects, settings=out_of_domain)
        results["scores"][name] = {"in_domain": inside.to_dict(), "out_of_domain": outside.to_dict()}
        if name == "neurpir":
            plot_confusion(outside, figures / "confusion_out_of_domain.png", title=f"{LABEL} on the unseen animal: NeurPIR embeddings")
            plot_embedding_map(matrix[~training], labels[~training], figures / "embedding_map_unseen_animal.png", title="NeurPIR embeddings of the unseen animal, by type")
            plot_embedding_map(matrix, labels, figures / "embedding_map_all.png", title="NeurPIR embeddings of all animals, by type")

    # Retrieval of held-out windows: both encoders, and PCA windows as the baseline.
    reference_windows = data.valid & ~data.heldout
    for name, run in runs.items():
        metrics = json.loads((run / "metrics.json").read_text())
        results["scores"][name]["retrieval"] = metrics.get("retrieval")
    results["scores"]["pca_binned_activity"]["retrieval"] = retrieval_top1(np.nan_to_num(pca_windows), reference_windows, data.heldout)
    results["scores"]["spike_train_features"]["retrieval"] = None
    return results


def _spike_train_features(segment_set: xr.Dataset) -> np.ndarray:
    """Compute the spike-train baseline features of every neuron of a segment set from its source files."""
    trains, starts, stops = [], [], []
    for source in dict.fromkeys(segment_set["source"].values.astype(str)):
        recording = read_units(source)
        trains.extend(recording.spike_times)
        starts.extend([recording.t_start_s] * recording.n_neurons)
        stops.extend([recording.t_stop_s] * recording.n_neurons)
    return spike_train_features(trains, np.asarray(starts), np.asarray(stops))


def results_table(results: dict) -> str:
    """Format the scores as a Markdown table."""
    names = {
        "neurpir": "NeurPIR embeddings",
        "neurpir_no_neighbours": "NeurPIR without neighbours",
        "spike_train_features": "spike-train features (rate, ISI CV, log-ISI histogram)",
        "pca_binned_activity": "PCA of binned windows",
    }
    lines = [
        "| features | in-domain macro-F1 | in-domain balanced accuracy | out-of-domain macro-F1 | out-of-domain balanced accuracy | retrieval top-1 |",
        "|---|---|---|---|---|---|",
    ]
    for key, label in names.items():
        scores = results["scores"][key]
        retrieval = scores.get("retrieval")
        top1 = f"{retrieval['top1']:.3f}" if retrieval else "n/a"
        inside, outside = scores["in_domain"], scores["out_of_domain"]
        lines.append(
            f"| {label} | {inside['macro_f1']:.3f} | {inside['balanced_accuracy']:.3f} "
            f"| {outside['macro_f1']:.3f} | {outside['balanced_accuracy']:.3f} | {top1} |"
        )
    chance = results["scores"]["neurpir"]["in_domain"]["chance_balanced_accuracy"]
    lines.append(f"| chance | {chance:.3f} | {chance:.3f} | {chance:.3f} | {chance:.3f} | |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
