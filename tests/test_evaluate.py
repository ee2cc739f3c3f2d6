"""Tests of the baseline features, the linear probe and the evaluation figures."""

import json

import matplotlib.image
import numpy as np
import pytest
from pynwb import NWBHDF5IO

from neurpir_nwb.errors import DataError, ModelError
from neurpir_nwb.evaluate import (
    EvaluationInputError,
    ProbeResult,
    fit_probe,
    isi_histogram_edges_s,
    plot_confusion,
    plot_embedding_map,
    plot_training_curve,
    probe_from_dict,
    probe_to_dict,
    run_probe,
    spike_train_feature_names,
    spike_train_features,
)


def read_spike_trains(path):
    with NWBHDF5IO(str(path), "r") as io:
        units = io.read().units
        return [np.asarray(units["spike_times"][i], dtype=np.float64) for i in range(len(units))]


def separable_features(n_per_class=30, seed=0):
    rng = np.random.default_rng(seed)
    centres = np.array([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [0.0, 10.0, 0.0]])
    features = np.vstack([rng.normal(centre, 1.0, size=(n_per_class, 3)) for centre in centres])
    labels = np.repeat(["fast_spiking", "regular_spiking", "bursting"], n_per_class)
    return features, labels


def assert_png(path):
    assert path.is_file()
    assert path.stat().st_size > 0
    image = matplotlib.image.imread(path)
    assert image.ndim == 3
    assert image.shape[0] > 0
    assert image.shape[1] > 0


# --------------------------------------------------------------------------------------
# Baseline features


def test_features_regular_train():
    train = np.arange(100) * 0.1
    features = spike_train_features([train], 0.0, 10.0)

    assert features.shape == (1, 22)
    assert features[0, 0] == pytest.approx(10.0)
    assert features[0, 1] == pytest.approx(0.0, abs=1e-9)
    assert features[0, 2:].sum() == pytest.approx(1.0)

    # Every interval is 0.1 s, so the mass sits in the bins next to the 0.1 s edge.
    edges_s = isi_histogram_edges_s()
    occupied = np.flatnonzero(features[0, 2:])
    assert edges_s[occupied.min()] <= 0.1 + 1e-9
    assert edges_s[occupied.max() + 1] >= 0.1 - 1e-9
    assert occupied.size <= 2


def test_features_empty_and_short_trains():
    trains = [np.array([]), np.array([2.0]), np.array([2.0, 2.5])]
    features = spike_train_features(trains, 0.0, 10.0)

    assert features[0, 0] == 0.0
    assert features[0, 1] == 0.0
    assert np.all(features[0, 2:] == 0.0)

    assert features[1, 0] == pytest.approx(0.1)
    assert features[1, 1] == 0.0
    assert np.all(features[1, 2:] == 0.0)

    assert features[2, 0] == pytest.approx(0.2)
    assert features[2, 1] == 0.0
    assert features[2, 2:].sum() == pytest.approx(1.0)


def test_features_cv_hand_computed():
    # Intervals 1 s and 3 s: mean 2 s, population standard deviation 1 s.
    features = spike_train_features([np.array([0.0, 1.0, 4.0])], 0.0, 10.0)

    assert features[0, 1] == pytest.approx(0.5)


def test_features_poisson_cv_near_one():
    rng = np.random.default_rng(1)
    train = np.cumsum(rng.exponential(0.05, size=4000))
    features = spike_train_features([train], 0.0, float(train[-1]))

    assert features[0, 0] == pytest.approx(4000 / train[-1])
    assert features[0, 1] == pytest.approx(1.0, abs=0.06)


def test_features_per_neuron_windows():
    trains = [np.array([0.5, 1.5, 2.5, 3.5]), np.array([0.5, 1.5, 2.5, 3.5])]
    features = spike_train_features(trains, [0.0, 1.0], [4.0, 3.0])

    assert features[0, 0] == pytest.approx(4 / 4.0)
    assert features[1, 0] == pytest.approx(2 / 2.0)


def test_features_unsorted_and_nan():
    ordered = spike_train_features([np.array([0.1, 0.2, 0.5, 0.9])], 0.0, 1.0)
    shuffled = spike_train_features([np.array([0.9, np.nan, 0.2, 0.5, 0.1])], 0.0, 1.0)

    np.testing.assert_allclose(shuffled, ordered)


def test_features_out_of_range_intervals():
    # A duplicate spike (0 s interval) and a 50 s interval fall outside the default range.
    trains = [np.array([1.0, 1.0, 51.0])]
    features = spike_train_features(trains, 0.0, 100.0)

    assert np.isfinite(features).all()
    assert features[0, 2] == pytest.approx(0.5)
    assert features[0, -1] == pytest.approx(0.5)


def test_features_names_match_columns():
    names = spike_train_feature_names(isi_bins=7)
    features = spike_train_features([np.array([0.0, 0.3, 0.4])], 0.0, 1.0, isi_bins=7)

    assert len(names) == features.shape[1]
    assert names[:2] == ["firing_rate_hz", "isi_cv"]
    assert len(set(names)) == len(names)


def test_features_no_neurons():
    features = spike_train_features([], 0.0, 1.0)

    assert features.shape == (0, 22)


@pytest.mark.parametrize(
    ("t_start_s", "t_stop_s"),
    [(5.0, 5.0), (5.0, 1.0), (0.0, np.nan), ([0.0, 0.0], [1.0, 0.0])],
)
def test_features_invalid_window(t_start_s, t_stop_s):
    trains = [np.array([0.5]), np.array([0.7])]

    with pytest.raises(EvaluationInputError, match="t_stop_s > t_start_s"):
        spike_train_features(trains, t_start_s, t_stop_s)


def test_features_window_length_mismatch():
    with pytest.raises(ValueError, match="3 spike trains"):
        spike_train_features([np.array([0.5])] * 3, [0.0, 0.0], 1.0)


@pytest.mark.parametrize("isi_range_s", [(0.0, 1.0), (1.0, 0.1), (1e-3, np.inf)])
def test_features_invalid_isi_range(isi_range_s):
    with pytest.raises(EvaluationInputError, match="isi_range_s"):
        spike_train_features([np.array([0.5])], 0.0, 1.0, isi_range_s=isi_range_s)


def test_features_zero_spike_units_file(shared_data):
    trains = read_spike_trains(shared_data / "bugcases" / "B01_units_zero_spikes.nwb")
    features = spike_train_features(trains, 0.5, 2.25)

    np.testing.assert_allclose(features[:, 0], np.array([0, 3, 0, 0, 2, 0]) / 1.75)
    assert np.all(features[[0, 2, 3, 5], 2:] == 0.0)
    np.testing.assert_allclose(features[[1, 4], 2:].sum(axis=1), 1.0)


def test_features_unsorted_sentinel_file(shared_data):
    trains = read_spike_trains(shared_data / "bugcases" / "B03_unsorted_and_sentinel_spikes.nwb")
    features = spike_train_features(trains, 0.0, 1.0)

    # Unit 0 sorted is [0.1, 0.2, 0.3, 0.8, 0.9]. Unit 1 keeps [0.25, 0.75] once the -1 sentinels drop out.
    assert features[0, 0] == pytest.approx(5.0)
    assert features[0, 1] == pytest.approx(np.std([0.1, 0.1, 0.5, 0.1]) / 0.2)
    assert features[1, 0] == pytest.approx(2.0)
    assert features[1, 1] == 0.0


@pytest.mark.filterwarnings("ignore:OpticalSeries:UserWarning")
def test_features_human_mtl_regions(shared_data):
    path = shared_data / "nwb" / "real" / "human_mtl_sub-4_ses-4.nwb"
    with NWBHDF5IO(str(path), "r") as io:
        nwb = io.read()
        trains = [np.asarray(nwb.units["spike_times"][i]) for i in range(len(nwb.units))]
        electrode_rows = np.asarray(nwb.units["electrodes"].data[:])
        locations = nwb.electrodes["location"].data[:]
    regions = [value.decode() if isinstance(value, bytes) else str(value) for value in locations[electrode_rows]]

    features = spike_train_features(trains, 0.0, max(float(train.max()) for train in trains))
    result = run_probe(features, regions)

    assert features.shape == (35, 22)
    assert np.isfinite(features).all()
    np.testing.assert_allclose(features[:, 2:].sum(axis=1), 1.0)
    assert result.classes == ["amygdala_right", "hippocampus_right"]
    assert result.n_labelled == 35
    assert result.confusion.sum() == 35
    assert 0.0 <= result.macro_f1 <= 1.0


# --------------------------------------------------------------------------------------
# Probe


def test_probe_separable_classes():
    features, labels = separable_features()
    result = run_probe(features, labels)

    assert isinstance(result, ProbeResult)
    assert result.macro_f1 == 1.0
    assert result.balanced_accuracy == 1.0
    assert result.macro_f1_std == 0.0
    assert result.n_folds == 5
    assert result.n_labelled == 90
    assert result.classes == ["bursting", "fast_spiking", "regular_spiking"]
    np.testing.assert_array_equal(result.confusion, np.diag([30, 30, 30]))
    np.testing.assert_array_equal(result.predicted, labels)


def test_probe_noise_near_chance():
    rng = np.random.default_rng(2)
    features = rng.normal(size=(300, 10))
    labels = rng.choice(["a", "b", "c"], size=300)
    result = run_probe(features, labels)

    assert result.chance_balanced_accuracy == pytest.approx(1 / 3)
    assert result.chance_macro_f1 == pytest.approx(1 / 3, abs=0.02)
    assert abs(result.balanced_accuracy - 1 / 3) < 0.1
    assert abs(result.macro_f1 - result.chance_macro_f1) < 0.1


def test_probe_unlabelled_neurons():
    features, labels = separable_features()
    labels = labels.astype(object)
    labels[[0, 40]] = ""
    labels[70] = None
    extra = np.array([[10.0, 0.0, 0.0]])
    result = run_probe(np.vstack([features, extra]), list(labels) + [""])

    assert result.n_labelled == 87
    assert result.confusion.sum() == 87
    assert result.predicted.shape == (91,)
    assert result.predicted[0] == "fast_spiking"
    assert result.predicted[40] == "regular_spiking"
    assert result.predicted[70] == "bursting"
    assert result.predicted[90] == "regular_spiking"
    assert result.probabilities.shape == (91, 3)
    np.testing.assert_allclose(result.probabilities.sum(axis=1), 1.0)


def test_probe_folds_limited_by_smallest_class():
    features, labels = separable_features()
    keep = np.concatenate([np.arange(30), np.arange(30, 33), np.arange(60, 90)])
    result = run_probe(features[keep], labels[keep], folds=10)

    assert result.n_folds == 3
    assert result.to_dict()["class_counts"] == {"bursting": 30, "fast_spiking": 30, "regular_spiking": 3}


def test_probe_is_deterministic():
    rng = np.random.default_rng(3)
    features = rng.normal(size=(60, 4))
    labels = rng.choice(["x", "y"], size=60)
    first = run_probe(features, labels, seed=7)
    second = run_probe(features, labels, seed=7)

    assert first.to_dict() == second.to_dict()
    np.testing.assert_array_equal(first.probabilities, second.probabilities)


def test_probe_one_class_rejected():
    features, _ = separable_features()

    with pytest.raises(ValueError, match="at least 2 labelled classes.*'pyramidal': 89"):
        run_probe(features, ["pyramidal"] * 89 + [""])


def test_probe_singleton_class_rejected():
    features, labels = separable_features()
    labels = labels.astype(object)
    labels[:29] = ""

    with pytest.raises(EvaluationInputError, match="'fast_spiking' has fewer.*'fast_spiking': 1") as raised:
        run_probe(features, labels)
    assert isinstance(raised.value, DataError)
    assert "merge it into another class" in str(raised.value)


def test_probe_rejects_non_finite_features():
    features, labels = separable_features()
    features[12, 1] = np.nan

    with pytest.raises(EvaluationInputError, match="neuron 12"):
        run_probe(features, labels)


def test_probe_rejects_label_count_mismatch():
    features, labels = separable_features()

    with pytest.raises(EvaluationInputError, match="90 rows but 89 labels"):
        run_probe(features, labels[:-1])


def test_probe_rejects_single_fold():
    features, labels = separable_features()

    with pytest.raises(EvaluationInputError, match="folds"):
        run_probe(features, labels, folds=1)


def test_probe_result_dict_is_json():
    features, labels = separable_features()
    summary = run_probe(features, labels).to_dict()
    loaded = json.loads(json.dumps(summary))

    assert loaded["macro_f1"] == 1.0
    assert loaded["n_labelled"] == 90
    assert loaded["confusion"] == [[30, 0, 0], [0, 30, 0], [0, 0, 30]]
    assert "predicted" not in loaded
    assert "probabilities" not in loaded


@pytest.mark.parametrize("n_classes", [2, 3])
def test_probe_dict_round_trip(n_classes):
    rng = np.random.default_rng(4)
    features = rng.normal(size=(120, 6)) * [1.0, 5.0, 0.1, 2.0, 1.0, 3.0] + [0.0, 100.0, -3.0, 0.0, 1.0, 0.0]
    labels = rng.choice(["a", "b", "c"][:n_classes], size=120)
    probe = fit_probe(features, labels)
    rebuilt = probe_from_dict(json.loads(json.dumps(probe_to_dict(probe))))

    test_features = rng.normal(size=(50, 6)) * 4.0
    np.testing.assert_array_equal(rebuilt.predict(test_features), probe.predict(test_features))
    np.testing.assert_array_equal(rebuilt.predict_proba(test_features), probe.predict_proba(test_features))
    assert list(rebuilt.classes_) == list(probe.classes_)


def test_fit_probe_ignores_unlabelled():
    features, labels = separable_features()
    labels = labels.astype(object)
    labels[:30] = ""
    probe = fit_probe(features, labels)

    assert list(probe.classes_) == ["bursting", "regular_spiking"]


def test_probe_from_dict_missing_key():
    features, labels = separable_features()
    parameters = probe_to_dict(fit_probe(features, labels))
    del parameters["coef"]

    with pytest.raises(ModelError, match="coef"):
        probe_from_dict(parameters)


def test_probe_from_dict_inconsistent_shapes():
    features, labels = separable_features()
    parameters = probe_to_dict(fit_probe(features, labels))
    parameters["intercept"] = parameters["intercept"][:2]

    with pytest.raises(ModelError, match="intercept of shape"):
        probe_from_dict(parameters)


def test_probe_to_dict_rejects_unfitted():
    with pytest.raises(ModelError, match="fitted"):
        probe_to_dict(object())


# --------------------------------------------------------------------------------------
# Figures


def test_plot_confusion_writes_png(tmp_path):
    features, labels = separable_features()
    result = run_probe(features, labels)
    path = plot_confusion(result, tmp_path / "figures" / "confusion.png", title="cell type")

    assert path == tmp_path / "figures" / "confusion.png"
    assert_png(path)


def test_plot_embedding_map_writes_png(tmp_path):
    features, labels = separable_features()
    labels = labels.astype(object)
    labels[:5] = ""
    path = plot_embedding_map(features, labels, tmp_path / "map.png", title="embeddings")

    assert_png(path)


def test_plot_embedding_map_single_dimension(tmp_path):
    path = plot_embedding_map(np.arange(6.0)[:, None], ["a", "a", "b", "b", "", ""], tmp_path / "map.png", title="1-D")

    assert_png(path)


def test_plot_training_curve_writes_png(tmp_path):
    history = {
        "step": [0, 10, 20, 30],
        "loss": [30.0, 20.0, 12.0, 9.0],
        "invariance": [1.0, 0.5, 0.3, 0.2],
        "variance": [1.0, 0.6, 0.2, 0.0],
    }
    path = plot_training_curve(history, tmp_path / "curve.png", title="VICReg")

    assert_png(path)


def test_plot_training_curve_negative_values(tmp_path):
    history = {"loss": [2.0, 0.5, -1.0, -2.5, float("nan")]}
    path = plot_training_curve(history, tmp_path / "curve.png", title="InfoNCE")

    assert_png(path)


def test_plot_training_curve_empty_history(tmp_path):
    with pytest.raises(EvaluationInputError, match="no loss values"):
        plot_training_curve({"loss": []}, tmp_path / "curve.png", title="empty")
