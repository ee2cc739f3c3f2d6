"""How much can a neuron's neighbours add to its own spike train for telling simulated types apart?

The accuracy benchmark compares NeurPIR, whose encoder reads each neuron with its
spatial neighbours, against the same encoder without neighbours. This script measures
the room for such a gain with hand-made features and the same probe and splits:

- own: the spike-train features of the accuracy benchmark (firing rate, CV of
  inter-spike intervals, log-ISI histogram);
- own + coupling: with the neuron's population coupling to its neighbours, the
  correlation of its spike counts in 160 ms bins with the summed counts of its k
  nearest neighbours;
- own + layer: with the neuron's true cortical layer, for files of the laminar layout.

When "own" already scores near 1, no encoder can show that neighbours help; when
"own + coupling" scores well above "own", the neighbours carry type information.

Usage::

    python benchmarks/context_headroom.py runs/benchmark-accuracy/neurpir/simulated
    python benchmarks/context_headroom.py runs/benchmark-coupling/neurpir/simulated --test-subject sim-animal-3
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

from neurpir_nwb.evaluate import ProbeSettings, run_probe, spike_train_features
from neurpir_nwb.io.units import LabelSpec, read_units
from neurpir_nwb.simulate import LAMINAR_LAYERS, read_simulation_notes

#: Width in seconds of the count bins of the coupling feature: one token of the default recipe.
COUPLING_BIN_S = 0.16

logger = logging.getLogger("benchmarks.context_headroom")


def main(argv: list[str] | None = None) -> int:
    """Score the hand-made features and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="folder of simulated NWB files (a run directory's 'simulated')")
    parser.add_argument("--test-subject", default=None, help="animal scored out of domain; by default the last file's")
    parser.add_argument("--neighbours", type=int, default=8, help="number of nearest neighbours of the coupling feature")
    parser.add_argument("--output", type=Path, default=None, help="JSON file of the scores")
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    paths = sorted(arguments.folder.glob("*.nwb"))
    if not paths:
        parser.error(f"{arguments.folder} contains no .nwb files; give the 'simulated' folder of a simulated run")

    features: dict[str, list[np.ndarray]] = {"own": [], "coupling": [], "layer": []}
    labels, subjects = [], []
    for path in paths:
        recording = read_units(path, labels={"cell_type": LabelSpec("units.cell_type")})
        settings = (read_simulation_notes(path) or {}).get("settings", {})

        starts = np.full(recording.n_neurons, recording.t_start_s)
        stops = np.full(recording.n_neurons, recording.t_stop_s)
        features["own"].append(spike_train_features(recording.spike_times, starts, stops))
        features["coupling"].append(
            neighbour_coupling(recording.spike_times, recording.positions, recording.t_start_s, recording.t_stop_s, arguments.neighbours)
        )
        if settings.get("layout") == "laminar":
            features["layer"].append(layer_one_hot(recording.positions[:, 2] / float(settings["volume_um"][2])))

        labels.extend(recording.labels["cell_type"].astype(str))
        subjects.extend([recording.subject] * recording.n_neurons)
        logger.info("read %s: %d neurons", path.name, recording.n_neurons)

    labels_array, subjects_array = np.asarray(labels), np.asarray(subjects)
    test_subject = arguments.test_subject or subjects_array[-1]
    if test_subject not in subjects_array:
        parser.error(f"--test-subject {test_subject!r} is not among the animals of {arguments.folder}: {', '.join(dict.fromkeys(subjects))}")
    if np.all(subjects_array == test_subject):
        parser.error(f"{arguments.folder} contains one animal only; the probe needs at least one more to fit on before it scores {test_subject}")

    own = np.concatenate(features["own"])
    variants = {"own": own, "own + coupling": np.hstack([own, np.concatenate(features["coupling"])])}
    if len(features["layer"]) == len(paths):
        variants["own + layer"] = np.hstack([own, np.concatenate(features["layer"])])

    scores = {name: score(matrix, labels_array, subjects_array, test_subject) for name, matrix in variants.items()}
    if arguments.output is not None:
        arguments.output.write_text(json.dumps({"test_subject": test_subject, "scores": scores}, indent=2) + "\n", encoding="utf-8")

    print("| features | in-domain macro-F1 | out-of-domain macro-F1 |")
    print("|---|---|---|")
    for name, values in scores.items():
        print(f"| {name} | {values['in_domain']:.3f} | {values['out_of_domain']:.3f} |")
    return 0


def neighbour_coupling(spike_times, positions_um: np.ndarray, t_start_s: float, t_stop_s: float, neighbours: int) -> np.ndarray:
    """Return ``(n_neurons, 1)``: each neuron's count correlation with its ``neighbours`` nearest neurons together."""
    n_bins = int((t_stop_s - t_start_s) / COUPLING_BIN_S)
    edges_s = t_start_s + np.arange(n_bins + 1) * COUPLING_BIN_S
    counts = np.stack([np.histogram(train, bins=edges_s)[0] for train in spike_times]).astype(float)  # (neurons, bins)

    distances_um = np.linalg.norm(positions_um[:, None, :] - positions_um[None, :, :], axis=-1)  # (neurons, neurons)
    np.fill_diagonal(distances_um, np.inf)
    nearest = np.argsort(distances_um, axis=1)[:, :neighbours]  # (neurons, neighbours)

    coupling = np.zeros((len(counts), 1))
    for neuron, others in enumerate(nearest):
        together = counts[others].sum(axis=0)
        if counts[neuron].std() > 0 and together.std() > 0:
            coupling[neuron, 0] = np.corrcoef(counts[neuron], together)[0, 1]
    return coupling


def layer_one_hot(depth_fraction: np.ndarray) -> np.ndarray:
    """Return ``(n_neurons, layers)``: one column per layer of the laminar layout, 1 where the neuron sits."""
    columns = [(depth_fraction >= top) & (depth_fraction < bottom) for _, top, bottom in LAMINAR_LAYERS]
    return np.stack(columns, axis=1).astype(float)


def score(features: np.ndarray, labels: np.ndarray, subjects: np.ndarray, test_subject: str) -> dict[str, float]:
    """Return in-domain (stratified 5-fold over the training animals) and out-of-domain macro-F1."""
    training = subjects != test_subject
    inside = run_probe(features[training], labels[training], settings=ProbeSettings(split="stratified"))
    outside = run_probe(features, labels, groups=subjects, settings=ProbeSettings(split="holdout", test_groups=(test_subject,)))
    return {"in_domain": inside.macro_f1, "out_of_domain": outside.macro_f1}


if __name__ == "__main__":
    sys.exit(main())
