"""The probe: a classifier on per-neuron features, scored by cross-validation.

Features are standardised and a logistic regression (or a k-nearest-neighbour
classifier) predicts the label. The scaler and the classifier are fitted on the
training folds only. Splits are stratified k-fold, leave-one-group-out (a group is
usually a subject, for zero-shot scores on unseen animals), or a fixed train/test
split by group. Scores are macro-F1 and balanced accuracy beside their chance levels.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, f1_score
from sklearn.model_selection import StratifiedKFold
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from neurpir_nwb.errors import EvaluationInputError, ModelError

logger = logging.getLogger(__name__)

# Upper bound on lbfgs iterations, set high so that slow fits on many features
# converge instead of stopping early with a ConvergenceWarning.
PROBE_MAX_ITER = 5000

# Label permutations behind ``ProbeResult.chance_macro_f1``.
CHANCE_PERMUTATIONS = 2000

# Version of the dictionary written by :func:`probe_to_dict`.
PROBE_FORMAT_VERSION = 1
PROBE_KIND = "standard-scaler+logistic-regression"
KNN_PROBE_KIND = "standard-scaler+k-nearest-neighbours"




@dataclass
class ProbeResult:
    """Cross-validated scores and predictions of a linear probe.

    Attributes
    ----------
    classes
        Class names in sorted order; the columns of ``probabilities`` and the rows and
        columns of ``confusion`` follow it.
    macro_f1, macro_f1_std
        Mean and population standard deviation over folds of the macro-averaged F1 score.
    balanced_accuracy, balanced_accuracy_std
        Mean and population standard deviation over folds of the balanced accuracy.
    chance_balanced_accuracy
        Balanced accuracy of any guess that ignores the features: ``1 / n_classes``.
    chance_macro_f1
        Mean macro-F1 of the true labels against random permutations of themselves,
        which keeps the class counts (a stratified random guess). Its expected value
        is ``1 / n_classes`` as well, and the estimate uses a fixed seed.
    n_folds
        Number of folds: ``min(folds, smallest class count)`` for the stratified
        split, the number of groups for leave-one-group-out, 1 for holdout.
    n_labelled
        Number of neurons with a label, the only ones fitted and scored.
    confusion
        ``(n_classes, n_classes)`` int64 counts of the out-of-fold predictions, rows
        are the true class and columns the predicted class.
    predicted
        ``(n_neurons,)`` str. The out-of-fold prediction for labelled neurons, and the
        prediction of the probe fitted on all labelled neurons for unlabelled ones.
    probabilities
        ``(n_neurons, n_classes)`` float64 class probabilities, under the same rule.
    split, classifier
        The split and the classifier that produced the scores.
    """

    classes: list[str]
    macro_f1: float
    macro_f1_std: float
    balanced_accuracy: float
    balanced_accuracy_std: float
    chance_balanced_accuracy: float
    chance_macro_f1: float
    n_folds: int
    n_labelled: int
    confusion: np.ndarray
    predicted: np.ndarray
    probabilities: np.ndarray
    split: str = "stratified"
    classifier: str = "logistic"

    def to_dict(self) -> dict[str, Any]:
        """Return the scores as a JSON-serialisable dictionary, without per-neuron arrays."""
        return {
            "classes": list(self.classes),
            "class_counts": {name: int(count) for name, count in zip(self.classes, self.confusion.sum(axis=1))},
            "macro_f1": float(self.macro_f1),
            "macro_f1_std": float(self.macro_f1_std),
            "balanced_accuracy": float(self.balanced_accuracy),
            "balanced_accuracy_std": float(self.balanced_accuracy_std),
            "chance_balanced_accuracy": float(self.chance_balanced_accuracy),
            "chance_macro_f1": float(self.chance_macro_f1),
            "split": self.split,
            "classifier": self.classifier,
            "n_folds": int(self.n_folds),
            "n_labelled": int(self.n_labelled),
            "confusion": [[int(count) for count in row] for row in self.confusion],
        }


SPLITS = ("stratified", "leave-one-group-out", "holdout")
CLASSIFIERS = ("logistic", "knn")


@dataclass(frozen=True)
class ProbeSettings:
    """Classifier and split of a probe.

    Attributes
    ----------
    classifier
        ``"logistic"`` (logistic regression) or ``"knn"`` (k nearest neighbours).
    class_balance
        Weight classes by the inverse of their frequency (logistic regression only).
    knn_neighbours
        Neighbours of the k-nearest-neighbour classifier.
    split
        ``"stratified"`` (stratified k-fold), ``"leave-one-group-out"`` (each group,
        usually a subject, is the test set once) or ``"holdout"`` (train on every
        group but ``test_groups``, test on those).
    folds
        Folds of the stratified split.
    test_groups
        Groups of the test set of the ``"holdout"`` split.
    """

    classifier: str = "logistic"
    class_balance: bool = True
    knn_neighbours: int = 5
    split: str = "stratified"
    folds: int = 5
    test_groups: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.classifier not in CLASSIFIERS:
            raise EvaluationInputError(f"unknown probe classifier {self.classifier!r}; use one of {', '.join(CLASSIFIERS)}")
        if self.split not in SPLITS:
            raise EvaluationInputError(f"unknown split {self.split!r}; use one of {', '.join(SPLITS)}")
        if int(self.folds) != self.folds or self.folds < 2:
            raise EvaluationInputError(f"folds must be an integer of at least 2, got {self.folds!r}")
        if self.knn_neighbours < 1:
            raise EvaluationInputError(f"knn_neighbours must be at least 1, got {self.knn_neighbours!r}")
        if self.split == "holdout" and not self.test_groups:
            raise EvaluationInputError("the holdout split needs test_groups: the groups (subjects) to test on")


def run_probe(
    features: np.ndarray,
    labels: Sequence[str],
    *,
    folds: int = 5,
    seed: int = 0,
    groups: Sequence[str] | None = None,
    settings: ProbeSettings | None = None,
) -> ProbeResult:
    """Score a probe on per-neuron features with cross-validation.

    By default the probe standardises the features and fits a logistic regression
    with balanced class weights on stratified k-fold splits. The scaler and the
    classifier see the training folds only. Neurons labelled ``""`` (or ``None``)
    are left out of fitting and scoring, and get the prediction of the probe fitted
    on all labelled neurons.

    Parameters
    ----------
    features
        ``(n_neurons, n_features)`` finite features, for example embeddings or the
        output of :func:`spike_train_features`.
    labels
        One label per neuron, ``""`` for unlabelled.
    folds
        Requested number of stratified folds, at least 2, used when ``settings`` is
        not given. The probe uses ``min(folds, smallest class count)`` so that every
        fold contains every class.
    seed
        Seed of the fold shuffling, the classifier and the chance estimate.
    groups
        One group per neuron (usually the subject), needed by the
        ``"leave-one-group-out"`` and ``"holdout"`` splits.
    settings
        Classifier and split; by default logistic regression on stratified folds.

    Returns
    -------
    ProbeResult
        With the ``"holdout"`` split, neurons of the training groups get in-sample
        predictions, and the scores and the confusion matrix cover the test groups only.

    Raises
    ------
    EvaluationInputError
        When the features are not a finite 2-D array matching the labels, when fewer
        than 2 classes are labelled, when a class has fewer than 2 neurons, or when a
        split needs groups that are missing. It is a ``ValueError``.
    """
    settings = settings or ProbeSettings(folds=folds)
    matrix, label_array = validate_features(features, labels)
    labelled = label_array != ""
    classes, class_counts = np.unique(label_array[labelled], return_counts=True)
    _require_two_classes(classes, class_counts)
    if settings.split == "stratified":
        _require_two_neurons_per_class(classes, class_counts)

    x_labelled = matrix[labelled]
    y_labelled = label_array[labelled]
    group_array = _group_array(groups, label_array.size, settings.split)
    splits = _splits(settings, y_labelled, None if group_array is None else group_array[labelled], seed)

    # Out-of-fold predictions for the labelled neurons; `scored` marks those in a test fold.
    probabilities_labelled = np.zeros((y_labelled.size, classes.size))
    scored = np.zeros(y_labelled.size, dtype=bool)
    f1_scores = []
    balanced_accuracies = []
    for train_index, test_index in splits:
        pipeline = _new_probe(seed, settings, n_train=train_index.size).fit(x_labelled[train_index], y_labelled[train_index])
        probabilities_labelled[test_index] = _probabilities(pipeline, x_labelled[test_index], classes)
        scored[test_index] = True

        fold_predicted = classes[probabilities_labelled[test_index].argmax(axis=1)]
        y_true = y_labelled[test_index]
        f1_scores.append(f1_score(y_true, fold_predicted, labels=np.unique(y_true), average="macro", zero_division=0))
        balanced_accuracies.append(balanced_accuracy_score(y_true, fold_predicted))

    # The probe fitted on all labelled neurons predicts the unlabelled ones and the training groups of a holdout split.
    probabilities = np.zeros((label_array.size, classes.size))
    probabilities[labelled] = probabilities_labelled
    unscored = ~labelled
    unscored[np.flatnonzero(labelled)[~scored]] = True
    if unscored.any():
        pipeline = _new_probe(seed, settings, n_train=y_labelled.size).fit(x_labelled, y_labelled)
        probabilities[unscored] = _probabilities(pipeline, matrix[unscored], classes)

    predicted = classes[probabilities.argmax(axis=1)]
    confusion = confusion_matrix(y_labelled[scored], predicted[labelled][scored], labels=classes)

    result = ProbeResult(
        classes=[str(name) for name in classes],
        macro_f1=float(np.mean(f1_scores)),
        macro_f1_std=float(np.std(f1_scores)),
        balanced_accuracy=float(np.mean(balanced_accuracies)),
        balanced_accuracy_std=float(np.std(balanced_accuracies)),
        chance_balanced_accuracy=1.0 / classes.size,
        chance_macro_f1=_permutation_chance_macro_f1(y_labelled[scored], classes, seed),
        n_folds=len(splits),
        n_labelled=int(labelled.sum()),
        confusion=confusion.astype(np.int64),
        predicted=predicted.astype(str),
        probabilities=probabilities,
        split=settings.split,
        classifier=settings.classifier,
    )
    logger.debug(
        "%s probe on %d labelled neurons, %d classes, %d %s folds: macro-F1 %.3f (chance %.3f), balanced accuracy %.3f",
        settings.classifier,
        result.n_labelled,
        classes.size,
        result.n_folds,
        settings.split,
        result.macro_f1,
        result.chance_macro_f1,
        result.balanced_accuracy,
    )
    return result


def _group_array(groups: Sequence[str] | None, n_neurons: int, split: str) -> np.ndarray | None:
    """Check the groups a split needs and return them as an array of str."""
    if groups is None:
        if split != "stratified":
            raise EvaluationInputError(f"the {split} split needs one group (subject) per neuron; pass groups=")
        return None

    group_array = np.asarray([str(group) for group in groups], dtype=str)
    if group_array.size != n_neurons:
        raise EvaluationInputError(f"{group_array.size} groups were given for {n_neurons} neurons; pass one group per neuron")
    return group_array


def _splits(
    settings: ProbeSettings, y: np.ndarray, groups: np.ndarray | None, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Return the (train, test) index pairs of a split over the labelled neurons."""
    if settings.split == "stratified":
        n_folds = int(min(settings.folds, np.unique(y, return_counts=True)[1].min()))
        splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        return list(splitter.split(np.zeros(y.size), y))

    if settings.split == "leave-one-group-out":
        unique_groups = np.unique(groups)
        if unique_groups.size < 2:
            raise EvaluationInputError(
                f"leave-one-group-out needs at least 2 groups (subjects), got {unique_groups.tolist()}; "
                "add recordings of another subject or use the stratified split"
            )
        pairs = [(np.flatnonzero(groups != group), np.flatnonzero(groups == group)) for group in unique_groups]
    else:
        test = np.isin(groups, list(settings.test_groups))
        missing = sorted(set(settings.test_groups) - set(groups.tolist()))
        if missing or test.all():
            raise EvaluationInputError(
                f"the holdout split's test groups {list(settings.test_groups)} must be some but not all of the "
                f"groups {np.unique(groups).tolist()}; missing: {missing}"
            )
        pairs = [(np.flatnonzero(~test), np.flatnonzero(test))]

    for train_index, _ in pairs:
        if np.unique(y[train_index]).size < 2:
            raise EvaluationInputError(
                "a training split contains fewer than 2 classes, so no classifier can be fitted; "
                "use the stratified split or add labelled neurons to the other groups"
            )
    return pairs


def _probabilities(pipeline: Pipeline, features: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Predict class probabilities with columns in the order of ``classes``.

    A training fold may lack a class; that class then gets probability 0.
    """
    probabilities = np.zeros((features.shape[0], classes.size))
    fitted_classes = pipeline.classes_
    probabilities[:, np.searchsorted(classes, fitted_classes)] = pipeline.predict_proba(features)
    return probabilities


def fit_probe(features: np.ndarray, labels: Sequence[str], *, seed: int = 0, settings: ProbeSettings | None = None) -> Pipeline:
    """Fit the probe of :func:`run_probe` on all labelled neurons and return it.

    Neurons labelled ``""`` (or ``None``) are left out. A class may have a single
    neuron here, because nothing is held out.

    Raises
    ------
    EvaluationInputError
        When the features are not a finite 2-D array matching the labels, or fewer
        than 2 classes are labelled.
    """
    matrix, label_array = validate_features(features, labels)
    labelled = label_array != ""
    classes, class_counts = np.unique(label_array[labelled], return_counts=True)
    _require_two_classes(classes, class_counts)

    return _new_probe(seed, settings, n_train=int(labelled.sum())).fit(matrix[labelled], label_array[labelled])


def probe_to_dict(pipeline: Pipeline) -> dict[str, Any]:
    """Return the parameters of a fitted probe as a JSON-serialisable dictionary.

    The dictionary contains lists of floats only, so a model directory stores the probe
    without pickle. JSON writes Python floats with enough digits to read back the same
    float64, so :func:`probe_from_dict` rebuilds a probe with identical predictions.

    Raises
    ------
    ModelError
        When ``pipeline`` is not a fitted StandardScaler + LogisticRegression pipeline.
    """
    steps = getattr(pipeline, "steps", None)
    if steps is not None and len(steps) == 2 and isinstance(steps[1][1], KNeighborsClassifier):
        return _knn_probe_to_dict(pipeline)
    if (
        steps is None
        or len(steps) != 2
        or not isinstance(steps[0][1], StandardScaler)
        or not isinstance(steps[1][1], LogisticRegression)
        or not hasattr(steps[1][1], "coef_")
    ):
        raise ModelError(
            f"cannot serialise probe {pipeline!r}: expected a fitted StandardScaler + LogisticRegression "
            f"pipeline as returned by fit_probe"
        )

    scaler = steps[0][1]
    regression = steps[1][1]
    return {
        "kind": PROBE_KIND,
        "format_version": PROBE_FORMAT_VERSION,
        "classes": [str(name) for name in regression.classes_],
        "scaler_mean": [float(value) for value in scaler.mean_],
        "scaler_scale": [float(value) for value in scaler.scale_],
        "coef": [[float(value) for value in row] for row in regression.coef_],
        "intercept": [float(value) for value in regression.intercept_],
    }


def probe_from_dict(data: Mapping[str, Any]) -> Pipeline:
    """Rebuild a fitted probe from the dictionary of :func:`probe_to_dict`.

    Raises
    ------
    ModelError
        When a key is missing, the format version is unknown, or the array shapes do
        not agree with each other or with the number of classes.
    """
    if data.get("kind") == KNN_PROBE_KIND:
        return _knn_probe_from_dict(data)

    required = ("kind", "format_version", "classes", "scaler_mean", "scaler_scale", "coef", "intercept")
    missing = [key for key in required if key not in data]
    if missing:
        raise ModelError(f"probe parameters lack the keys {missing}; rewrite the probe with probe_to_dict")

    if data["kind"] != PROBE_KIND or data["format_version"] != PROBE_FORMAT_VERSION:
        raise ModelError(
            f"probe parameters of kind {data['kind']!r}, version {data['format_version']!r} are not supported; "
            f"this version reads kind {PROBE_KIND!r}, version {PROBE_FORMAT_VERSION}. Refit the probe"
        )

    classes = np.asarray([str(name) for name in data["classes"]])
    mean = np.asarray(data["scaler_mean"], dtype=np.float64)
    scale = np.asarray(data["scaler_scale"], dtype=np.float64)
    coef = np.asarray(data["coef"], dtype=np.float64)
    intercept = np.asarray(data["intercept"], dtype=np.float64)
    _validate_probe_shapes(classes, mean, scale, coef, intercept)

    scaler = StandardScaler()
    scaler.mean_ = mean
    scaler.scale_ = scale
    scaler.var_ = scale**2
    scaler.n_features_in_ = mean.size
    scaler.n_samples_seen_ = 0

    regression = LogisticRegression(class_weight="balanced", max_iter=PROBE_MAX_ITER)
    regression.classes_ = classes
    regression.coef_ = coef
    regression.intercept_ = intercept
    regression.n_features_in_ = mean.size
    regression.n_iter_ = np.zeros(1, dtype=np.int32)

    return Pipeline([("scaler", scaler), ("logistic", regression)])


def _knn_probe_to_dict(pipeline: Pipeline) -> dict[str, Any]:
    """Return a fitted k-nearest-neighbour probe as its training set and settings."""
    scaler, knn = pipeline.steps[0][1], pipeline.steps[1][1]
    features = scaler.inverse_transform(knn._fit_X)
    return {
        "kind": KNN_PROBE_KIND,
        "format_version": PROBE_FORMAT_VERSION,
        "classes": [str(name) for name in knn.classes_],
        "n_neighbours": int(knn.n_neighbors),
        "train_features": [[float(value) for value in row] for row in features],
        "train_labels": [str(knn.classes_[code]) for code in knn._y],
    }


def _knn_probe_from_dict(data: Mapping[str, Any]) -> Pipeline:
    """Refit a k-nearest-neighbour probe from the training set of :func:`_knn_probe_to_dict`."""
    missing = [key for key in ("n_neighbours", "train_features", "train_labels") if key not in data]
    if missing or data.get("format_version") != PROBE_FORMAT_VERSION:
        raise ModelError(f"k-nearest-neighbour probe parameters lack the keys {missing} or have an unknown version; refit the probe")

    features = np.asarray(data["train_features"], dtype=np.float64)
    labels = np.asarray(data["train_labels"], dtype=str)
    if features.ndim != 2 or features.shape[0] != labels.size:
        raise ModelError(f"k-nearest-neighbour probe has {features.shape} training features for {labels.size} labels; refit the probe")
    settings = ProbeSettings(classifier="knn", knn_neighbours=int(data["n_neighbours"]))
    return _new_probe(0, settings, n_train=labels.size).fit(features, labels)


def _validate_probe_shapes(
    classes: np.ndarray, mean: np.ndarray, scale: np.ndarray, coef: np.ndarray, intercept: np.ndarray
) -> None:
    n_classes = classes.size
    n_features = mean.size
    n_rows = 1 if n_classes == 2 else n_classes
    problems = []
    if n_classes < 2:
        problems.append(f"{n_classes} classes (at least 2 needed)")
    if scale.shape != (n_features,):
        problems.append(f"scaler_scale of shape {scale.shape} for {n_features} features")
    if coef.shape != (n_rows, n_features):
        problems.append(f"coef of shape {coef.shape}, expected {(n_rows, n_features)}")
    if intercept.shape != (n_rows,):
        problems.append(f"intercept of shape {intercept.shape}, expected {(n_rows,)}")

    if problems:
        raise ModelError(f"probe parameters are inconsistent: {'; '.join(problems)}. Refit the probe")


def _new_probe(seed: int, settings: ProbeSettings | None = None, *, n_train: int | None = None) -> Pipeline:
    """Return an unfitted scaler + classifier pipeline."""
    settings = settings or ProbeSettings()
    if settings.classifier == "knn":
        n_neighbours = settings.knn_neighbours if n_train is None else max(1, min(settings.knn_neighbours, n_train))
        classifier = KNeighborsClassifier(n_neighbors=n_neighbours)
        return Pipeline([("scaler", StandardScaler()), ("knn", classifier)])

    regression = LogisticRegression(
        class_weight="balanced" if settings.class_balance else None,
        max_iter=PROBE_MAX_ITER,
        random_state=seed,
    )
    return Pipeline([("scaler", StandardScaler()), ("logistic", regression)])


def validate_features(features: np.ndarray, labels: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    matrix = np.asarray(features, dtype=np.float64)
    if matrix.ndim != 2:
        raise EvaluationInputError(
            f"features must be a 2-D array (n_neurons, n_features), got shape {matrix.shape}; "
            f"reshape a single feature with features[:, None]"
        )

    label_array = np.asarray(["" if label is None else str(label) for label in labels], dtype=str)
    if label_array.size != matrix.shape[0]:
        raise EvaluationInputError(
            f"features have {matrix.shape[0]} rows but {label_array.size} labels were given; "
            f"pass one label per neuron, with '' for unlabelled neurons"
        )

    not_finite = ~np.isfinite(matrix).all(axis=1)
    if not_finite.any():
        index = int(np.flatnonzero(not_finite)[0])
        raise EvaluationInputError(
            f"features of neuron {index} (row of the feature matrix) contain NaN or infinite values "
            f"({int(not_finite.sum())} neurons affected); drop these neurons or recompute their features"
        )
    return matrix, label_array


def _describe_counts(classes: np.ndarray, counts: np.ndarray) -> str:
    if classes.size == 0:
        return "no labelled neurons"
    return ", ".join(f"'{name}': {count}" for name, count in zip(classes, counts))


def _require_two_classes(classes: np.ndarray, counts: np.ndarray) -> None:
    if classes.size >= 2:
        return

    raise EvaluationInputError(
        f"the probe needs at least 2 labelled classes, got {_describe_counts(classes, counts)}; "
        f"label neurons of another class or choose a label with more than one value"
    )


def _require_two_neurons_per_class(classes: np.ndarray, counts: np.ndarray) -> None:
    too_small = classes[counts < 2]
    if too_small.size == 0:
        return

    names = ", ".join(f"'{name}'" for name in too_small)
    verb = "has" if too_small.size == 1 else "have"
    raise EvaluationInputError(
        f"cross-validation needs at least 2 labelled neurons per class, but {names} {verb} fewer "
        f"(counts: {_describe_counts(classes, counts)}); label more neurons of that class, "
        f"merge it into another class, or relabel its neurons ''"
    )


def _permutation_chance_macro_f1(y: np.ndarray, classes: np.ndarray, seed: int) -> float:
    # A permutation keeps every class count, so precision equals recall and the F1 of
    # class c is (neurons of class c that keep label c) / (count of class c).
    codes = np.searchsorted(classes, y)
    counts = np.bincount(codes, minlength=classes.size)
    n_classes = classes.size
    rng = np.random.default_rng(seed)

    # Chunks keep the (permutations, neurons) code array near 2 million entries.
    chunk = max(1, min(CHANCE_PERMUTATIONS, 2_000_000 // max(1, codes.size)))
    scores = []
    for start in range(0, CHANCE_PERMUTATIONS, chunk):
        n_rows = min(chunk, CHANCE_PERMUTATIONS - start)
        permuted = rng.permuted(np.broadcast_to(codes, (n_rows, codes.size)), axis=1)
        hits = permuted == codes
        rows = np.broadcast_to(np.arange(n_rows)[:, None], hits.shape)
        kept = np.bincount(rows[hits] * n_classes + permuted[hits], minlength=n_rows * n_classes)
        scores.append((kept.reshape(n_rows, n_classes) / counts).mean(axis=1))

    return float(np.concatenate(scores).mean())


