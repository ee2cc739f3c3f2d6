"""Probe splits by subject, the k-nearest-neighbour probe, retrieval and the PCA baseline."""

import json

import numpy as np
import pytest

from neurpir_nwb.errors import EvaluationInputError
from neurpir_nwb.evaluate import (
    ProbeSettings,
    binned_activity_pca_features,
    fit_probe,
    probe_from_dict,
    probe_to_dict,
    retrieval_top1,
    run_probe,
)


def separable(n_per_class: int = 12, subjects: int = 3, seed: int = 0):
    """Two classes far apart in feature space, spread evenly over subjects."""
    rng = np.random.default_rng(seed)
    labels = np.array(["E", "I"] * (n_per_class * subjects))
    features = rng.normal(size=(labels.size, 4)) + np.where(labels == "E", 5.0, -5.0)[:, None]
    groups = np.array([f"animal-{index % subjects}" for index in range(labels.size)])
    return features, labels, groups


def test_leave_one_subject_out_folds():
    features, labels, groups = separable()
    result = run_probe(features, labels, groups=groups, settings=ProbeSettings(split="leave-one-group-out"))

    assert result.n_folds == 3
    assert result.split == "leave-one-group-out"
    assert result.macro_f1 == pytest.approx(1.0)
    assert result.confusion.sum() == labels.size


def test_holdout_scores_test_subject_only():
    features, labels, groups = separable()
    settings = ProbeSettings(split="holdout", test_groups=("animal-2",))
    result = run_probe(features, labels, groups=groups, settings=settings)

    assert result.n_folds == 1
    assert result.confusion.sum() == int(np.sum(groups == "animal-2"))
    assert result.balanced_accuracy == pytest.approx(1.0)
    assert result.predicted.shape == labels.shape


def test_holdout_ignores_test_features_in_fit():
    features, labels, groups = separable()
    test = groups == "animal-2"
    changed = features.copy()
    changed[test] += 1000.0  # a shift the scaler would absorb if it were fitted on the test subject

    settings = ProbeSettings(split="holdout", test_groups=("animal-2",))
    original = run_probe(features, labels, groups=groups, settings=settings)
    shifted = run_probe(changed, labels, groups=groups, settings=settings)

    assert original.balanced_accuracy == pytest.approx(1.0)
    assert shifted.balanced_accuracy == pytest.approx(0.5)


def test_holdout_unknown_subject():
    features, labels, groups = separable()
    with pytest.raises(EvaluationInputError, match=r"test groups \['animal-9'\].*missing: \['animal-9'\]"):
        run_probe(features, labels, groups=groups, settings=ProbeSettings(split="holdout", test_groups=("animal-9",)))


def test_group_split_needs_groups():
    features, labels, _ = separable()
    with pytest.raises(EvaluationInputError, match=r"needs one group \(subject\) per neuron"):
        run_probe(features, labels, settings=ProbeSettings(split="leave-one-group-out"))


def test_knn_probe_and_round_trip():
    features, labels, groups = separable()
    settings = ProbeSettings(classifier="knn", knn_neighbours=3)
    result = run_probe(features, labels, settings=settings)
    assert result.classifier == "knn"
    assert result.macro_f1 == pytest.approx(1.0)

    fitted = fit_probe(features, labels, settings=settings)
    rebuilt = probe_from_dict(json.loads(json.dumps(probe_to_dict(fitted))))
    np.testing.assert_array_equal(rebuilt.predict(features), fitted.predict(features))
    np.testing.assert_allclose(rebuilt.predict_proba(features), fitted.predict_proba(features))


def test_class_balance_off_changes_weights():
    features, labels, _ = separable()
    balanced = fit_probe(features, labels, settings=ProbeSettings(class_balance=True))
    plain = fit_probe(features, labels, settings=ProbeSettings(class_balance=False))

    assert balanced.steps[1][1].class_weight == "balanced"
    assert plain.steps[1][1].class_weight is None


def test_invalid_settings():
    with pytest.raises(EvaluationInputError, match=r"unknown probe classifier 'svm'"):
        ProbeSettings(classifier="svm")
    with pytest.raises(EvaluationInputError, match=r"holdout split needs test_groups"):
        ProbeSettings(split="holdout")


def test_retrieval_finds_own_neuron():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(6, 8)) * 5.0
    windows = centres[:, None, :] + rng.normal(size=(6, 10, 8)) * 0.1
    query = np.zeros((6, 10), dtype=bool)
    query[:, 8:] = True

    scores = retrieval_top1(windows, ~query, query)

    assert scores["top1"] == pytest.approx(1.0)
    assert scores["chance"] == pytest.approx(1 / 6)
    assert scores["n_queries"] == 12


def test_retrieval_of_identical_neurons_is_chance_like():
    windows = np.ones((4, 10, 3))
    windows[..., 0] += np.random.default_rng(1).normal(size=(4, 10)) * 1e-3
    query = np.zeros((4, 10), dtype=bool)
    query[:, 9] = True

    scores = retrieval_top1(windows, ~query, query)

    assert scores["top1"] <= 0.75


def test_retrieval_rejects_overlapping_masks():
    mask = np.ones((3, 4), dtype=bool)
    with pytest.raises(EvaluationInputError, match=r"both a reference and a query"):
        retrieval_top1(np.zeros((3, 4, 2)), mask, mask)


def test_pca_features_fit_on_given_neurons():
    rng = np.random.default_rng(0)
    activity = rng.poisson(1.0, size=(5, 6, 4, 3)).astype(np.float32)
    valid = np.ones((5, 6), dtype=bool)
    valid[4, 3:] = False

    features = binned_activity_pca_features(activity, valid, np.arange(3), n_components=4)
    changed = activity.copy()
    changed[3:] *= 50.0  # neurons outside the fit must not move the components
    features_changed = binned_activity_pca_features(changed, valid, np.arange(3), n_components=4)

    assert features.shape == (5, 8)
    assert np.isfinite(features).all()
    np.testing.assert_allclose(features[:3], features_changed[:3])
