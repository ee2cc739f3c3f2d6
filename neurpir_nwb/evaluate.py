"""Probes, baseline features, metrics and figures for per-neuron embeddings.

The probe is linear: features are standardised, a logistic regression with balanced
class weights predicts the label, and stratified k-fold cross-validation reports
macro-F1 and balanced accuracy beside their chance levels. The same probe runs on the learned
embeddings and on the baseline features of :func:`spike_train_features`, so the two
are scored alike.

Figures are drawn on :class:`matplotlib.figure.Figure` objects with the Agg canvas,
so this module never changes the pyplot backend of an interactive session.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Colormap
from matplotlib.figure import Figure
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, f1_score
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from neurpir_nwb.errors import DataError, ModelError

logger = logging.getLogger(__name__)

# Upper bound on lbfgs iterations, set high so that slow fits on many features
# converge instead of stopping early with a ConvergenceWarning.
PROBE_MAX_ITER = 5000

# Label permutations behind ``ProbeResult.chance_macro_f1``.
CHANCE_PERMUTATIONS = 2000

# Version of the dictionary written by :func:`probe_to_dict`.
PROBE_FORMAT_VERSION = 1
PROBE_KIND = "standard-scaler+logistic-regression"

UNLABELLED_COLOUR = "0.6"


class EvaluationInputError(DataError, ValueError):
    """Invalid input to an evaluation function, such as too few labelled neurons per class."""


# --------------------------------------------------------------------------------------
# Baseline features


def spike_train_feature_names(isi_bins: int = 20) -> list[str]:
    """Return the column names of :func:`spike_train_features` for ``isi_bins`` histogram bins."""
    _validate_isi_bins(isi_bins)
    width = max(2, len(str(isi_bins - 1)))
    return ["firing_rate_hz", "isi_cv"] + [f"isi_hist_{i:0{width}d}" for i in range(isi_bins)]


def isi_histogram_edges_s(isi_bins: int = 20, isi_range_s: tuple[float, float] = (1e-3, 10.0)) -> np.ndarray:
    """Return the ``isi_bins + 1`` log-spaced bin edges, in seconds, of the ISI histogram."""
    return 10.0 ** _isi_log_edges(isi_bins, isi_range_s)


def _isi_log_edges(isi_bins: int, isi_range_s: tuple[float, float]) -> np.ndarray:
    low_s, high_s = _validate_isi_range(isi_bins, isi_range_s)
    return np.linspace(np.log10(low_s), np.log10(high_s), isi_bins + 1)


def spike_train_features(
    spike_times: Sequence[np.ndarray],
    t_start_s: Sequence[float] | float,
    t_stop_s: Sequence[float] | float,
    *,
    isi_bins: int = 20,
    isi_range_s: tuple[float, float] = (1e-3, 10.0),
) -> np.ndarray:
    """Compute firing-rate and inter-spike-interval (ISI) features per neuron.

    Only spikes inside ``[t_start_s, t_stop_s]`` count. Spike times that are not
    finite fall outside every window and are ignored, and each train is sorted
    before its intervals are taken.

    Parameters
    ----------
    spike_times
        One array of spike times in seconds per neuron.
    t_start_s, t_stop_s
        Window in seconds over which the features are computed, one value shared by
        all neurons or one per neuron. ``t_stop_s`` must exceed ``t_start_s``.
    isi_bins
        Number of bins of the ISI histogram.
    isi_range_s
        Lowest and highest bin edge of the ISI histogram, in seconds. Intervals
        outside the range are counted in the first or last bin.

    Returns
    -------
    numpy.ndarray
        ``(n_neurons, 2 + isi_bins)`` float64, columns as named by
        :func:`spike_train_feature_names`:

        - firing rate in Hz: spikes in the window divided by its duration;
        - coefficient of variation of the ISIs (standard deviation over mean, with
          the population standard deviation), 0 when the neuron has fewer than 3
          spikes;
        - the histogram of log10 ISIs on the edges of :func:`isi_histogram_edges_s`,
          normalised to sum to 1, all zeros when the neuron has fewer than 2 spikes.

    Raises
    ------
    EvaluationInputError
        When a window is not finite or has no duration, the windows do not match the
        number of neurons, or the histogram settings are invalid.
    """
    n_neurons = len(spike_times)
    log_edges = _isi_log_edges(isi_bins, isi_range_s)
    starts_s = _per_neuron_values(t_start_s, n_neurons, "t_start_s")
    stops_s = _per_neuron_values(t_stop_s, n_neurons, "t_stop_s")
    _validate_windows(starts_s, stops_s)

    # Flatten all trains into one array with the owning neuron of every spike.
    trains = [np.asarray(train, dtype=np.float64).ravel() for train in spike_times]
    lengths = np.array([train.size for train in trains], dtype=np.int64)
    times_s = np.concatenate(trains) if n_neurons else np.empty(0)
    owners = np.repeat(np.arange(n_neurons), lengths)

    # NaN compares false, so it drops out with the spikes outside the window.
    inside = (times_s >= starts_s[owners]) & (times_s <= stops_s[owners])
    times_s = times_s[inside]
    owners = owners[inside]
    order = np.lexsort((times_s, owners))
    times_s = times_s[order]
    owners = owners[order]

    counts = np.bincount(owners, minlength=n_neurons)
    rates_hz = counts / (stops_s - starts_s)

    # Intervals between consecutive spikes of the same neuron.
    same_neuron = owners[1:] == owners[:-1]
    isis_s = np.diff(times_s)[same_neuron]
    isi_owners = owners[1:][same_neuron]
    isi_counts = np.bincount(isi_owners, minlength=n_neurons)

    cvs = _isi_coefficients_of_variation(isis_s, isi_owners, isi_counts)
    histograms = _isi_histograms(isis_s, isi_owners, isi_counts, log_edges)

    return np.column_stack([rates_hz, cvs, histograms])


def _isi_coefficients_of_variation(isis_s: np.ndarray, owners: np.ndarray, isi_counts: np.ndarray) -> np.ndarray:
    n_neurons = isi_counts.size
    totals_s = np.bincount(owners, weights=isis_s, minlength=n_neurons)
    means_s = np.divide(totals_s, isi_counts, out=np.zeros(n_neurons), where=isi_counts > 0)

    deviations_s = isis_s - means_s[owners]
    squared_totals = np.bincount(owners, weights=deviations_s**2, minlength=n_neurons)
    variances = np.divide(squared_totals, isi_counts, out=np.zeros(n_neurons), where=isi_counts > 0)

    # Duplicate spike times can give a zero mean interval, so the CV is reported as 0 there.
    defined = (isi_counts >= 2) & (means_s > 0)
    return np.divide(np.sqrt(variances), means_s, out=np.zeros(n_neurons), where=defined)


def _isi_histograms(
    isis_s: np.ndarray, owners: np.ndarray, isi_counts: np.ndarray, log_edges: np.ndarray
) -> np.ndarray:
    n_neurons = isi_counts.size
    n_bins = log_edges.size - 1

    # A zero interval has log10 of -inf and lands in the first bin like any short one.
    with np.errstate(divide="ignore"):
        log_isis = np.log10(isis_s)
    bins = np.clip(np.searchsorted(log_edges, log_isis, side="right") - 1, 0, n_bins - 1)

    flat = np.bincount(owners * n_bins + bins, minlength=n_neurons * n_bins)
    histograms = flat.reshape(n_neurons, n_bins).astype(np.float64)
    return np.divide(histograms, isi_counts[:, None], out=np.zeros_like(histograms), where=isi_counts[:, None] > 0)


def _per_neuron_values(values: Sequence[float] | float, n_neurons: int, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim == 0:
        return np.full(n_neurons, float(array))

    if array.shape != (n_neurons,):
        raise EvaluationInputError(
            f"{name} has shape {array.shape} but there are {n_neurons} spike trains; "
            f"pass one value in seconds shared by all neurons or one per neuron"
        )
    return array


def _validate_windows(starts_s: np.ndarray, stops_s: np.ndarray) -> None:
    invalid = ~(np.isfinite(starts_s) & np.isfinite(stops_s) & (stops_s > starts_s))
    if not invalid.any():
        return

    index = int(np.flatnonzero(invalid)[0])
    raise EvaluationInputError(
        f"window of neuron {index} (position in spike_times) is invalid: "
        f"t_start_s={starts_s[index]!r}, t_stop_s={stops_s[index]!r} "
        f"({int(invalid.sum())} neurons affected); pass finite times in seconds with t_stop_s > t_start_s"
    )


def _validate_isi_bins(isi_bins: int) -> None:
    if int(isi_bins) != isi_bins or isi_bins < 1:
        raise EvaluationInputError(f"isi_bins must be a positive integer, got {isi_bins!r}")


def _validate_isi_range(isi_bins: int, isi_range_s: tuple[float, float]) -> tuple[float, float]:
    _validate_isi_bins(isi_bins)
    if len(isi_range_s) != 2:
        raise EvaluationInputError(f"isi_range_s must be (low_s, high_s), got {isi_range_s!r}")

    low_s, high_s = (float(value) for value in isi_range_s)
    if not (np.isfinite(low_s) and np.isfinite(high_s) and 0 < low_s < high_s):
        raise EvaluationInputError(
            f"isi_range_s={isi_range_s!r} is invalid; pass finite edges in seconds with 0 < low_s < high_s"
        )
    return low_s, high_s


# --------------------------------------------------------------------------------------
# Probe


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
        Number of cross-validation folds: ``min(folds, smallest class count)``.
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
            "n_folds": int(self.n_folds),
            "n_labelled": int(self.n_labelled),
            "confusion": [[int(count) for count in row] for row in self.confusion],
        }


def run_probe(features: np.ndarray, labels: Sequence[str], *, folds: int = 5, seed: int = 0) -> ProbeResult:
    """Score a linear probe on per-neuron features with stratified k-fold cross-validation.

    The probe standardises the features and fits a logistic regression with balanced
    class weights. Neurons labelled ``""`` (or ``None``) are left out of fitting and
    scoring, and get the prediction of the probe fitted on all labelled neurons.

    Parameters
    ----------
    features
        ``(n_neurons, n_features)`` finite features, for example embeddings or the
        output of :func:`spike_train_features`.
    labels
        One label per neuron, ``""`` for unlabelled.
    folds
        Requested number of folds, at least 2. The probe uses
        ``min(folds, smallest class count)`` so that every fold contains every class.
    seed
        Seed of the fold shuffling, the logistic regression and the chance estimate.

    Returns
    -------
    ProbeResult

    Raises
    ------
    EvaluationInputError
        When the features are not a finite 2-D array matching the labels, when fewer
        than 2 classes are labelled, or when a class has fewer than 2 neurons. It is
        a ``ValueError``.
    """
    if int(folds) != folds or folds < 2:
        raise EvaluationInputError(f"folds must be an integer of at least 2, got {folds!r}")

    matrix, label_array = _validate_probe_input(features, labels)
    labelled = label_array != ""
    classes, class_counts = np.unique(label_array[labelled], return_counts=True)
    _require_two_classes(classes, class_counts)
    _require_two_neurons_per_class(classes, class_counts)

    n_folds = int(min(folds, class_counts.min()))
    x_labelled = matrix[labelled]
    y_labelled = label_array[labelled]

    # Out-of-fold predictions for the labelled neurons.
    splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    probabilities_labelled = np.zeros((y_labelled.size, classes.size))
    f1_scores = []
    balanced_accuracies = []
    for train_index, test_index in splitter.split(x_labelled, y_labelled):
        # Every training fold contains every class, because k <= the smallest class count,
        # so the probability columns follow ``classes``.
        pipeline = _new_probe(seed).fit(x_labelled[train_index], y_labelled[train_index])
        fold_probabilities = pipeline.predict_proba(x_labelled[test_index])
        probabilities_labelled[test_index] = fold_probabilities

        fold_predicted = classes[fold_probabilities.argmax(axis=1)]
        y_true = y_labelled[test_index]
        f1_scores.append(f1_score(y_true, fold_predicted, labels=classes, average="macro", zero_division=0))
        balanced_accuracies.append(balanced_accuracy_score(y_true, fold_predicted))

    # Predictions of the probe fitted on all labelled neurons for the unlabelled ones.
    probabilities = np.zeros((label_array.size, classes.size))
    probabilities[labelled] = probabilities_labelled
    if not labelled.all():
        pipeline = _new_probe(seed).fit(x_labelled, y_labelled)
        probabilities[~labelled] = pipeline.predict_proba(matrix[~labelled])

    predicted = classes[probabilities.argmax(axis=1)]
    confusion = confusion_matrix(y_labelled, predicted[labelled], labels=classes)

    result = ProbeResult(
        classes=[str(name) for name in classes],
        macro_f1=float(np.mean(f1_scores)),
        macro_f1_std=float(np.std(f1_scores)),
        balanced_accuracy=float(np.mean(balanced_accuracies)),
        balanced_accuracy_std=float(np.std(balanced_accuracies)),
        chance_balanced_accuracy=1.0 / classes.size,
        chance_macro_f1=_permutation_chance_macro_f1(y_labelled, classes, seed),
        n_folds=n_folds,
        n_labelled=int(labelled.sum()),
        confusion=confusion.astype(np.int64),
        predicted=predicted.astype(str),
        probabilities=probabilities,
    )
    logger.info(
        "probe on %d labelled neurons, %d classes, %d folds: macro-F1 %.3f (chance %.3f), balanced accuracy %.3f",
        result.n_labelled,
        classes.size,
        n_folds,
        result.macro_f1,
        result.chance_macro_f1,
        result.balanced_accuracy,
    )
    return result


def fit_probe(features: np.ndarray, labels: Sequence[str], *, seed: int = 0) -> Pipeline:
    """Fit the probe of :func:`run_probe` on all labelled neurons and return it.

    Neurons labelled ``""`` (or ``None``) are left out. A class may have a single
    neuron here, because nothing is held out.

    Raises
    ------
    EvaluationInputError
        When the features are not a finite 2-D array matching the labels, or fewer
        than 2 classes are labelled.
    """
    matrix, label_array = _validate_probe_input(features, labels)
    labelled = label_array != ""
    classes, class_counts = np.unique(label_array[labelled], return_counts=True)
    _require_two_classes(classes, class_counts)

    return _new_probe(seed).fit(matrix[labelled], label_array[labelled])


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


def _new_probe(seed: int) -> Pipeline:
    regression = LogisticRegression(class_weight="balanced", max_iter=PROBE_MAX_ITER, random_state=seed)
    return Pipeline([("scaler", StandardScaler()), ("logistic", regression)])


def _validate_probe_input(features: np.ndarray, labels: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
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


# --------------------------------------------------------------------------------------
# Figures


def plot_confusion(result: ProbeResult, path: str | Path, *, title: str) -> Path:
    """Draw the confusion matrix of a probe as a PNG and return its path.

    Cell colours are the fraction of each true class (rows sum to 1) and the cell text
    is the count of neurons. The title gets a second line with macro-F1 and balanced
    accuracy beside their chance levels. Missing parent folders are created.
    """
    confusion = np.asarray(result.confusion, dtype=np.float64)
    row_totals = confusion.sum(axis=1, keepdims=True)
    fractions = np.divide(confusion, row_totals, out=np.zeros_like(confusion), where=row_totals > 0)
    n_classes = len(result.classes)

    # The width leaves room for the score line of the title even with two classes.
    side_in = 2.5 + 0.6 * n_classes
    figure = Figure(figsize=(max(7.0, side_in + 2.0), side_in + 0.5), layout="constrained")
    axes = figure.add_subplot()
    image = axes.imshow(fractions, cmap="Blues", vmin=0.0, vmax=1.0)
    colourbar = figure.colorbar(image, ax=axes)
    colourbar.set_label("fraction of true class")

    # Text on dark cells is white so the counts stay readable.
    for row in range(n_classes):
        for column in range(n_classes):
            colour = "white" if fractions[row, column] > 0.5 else "black"
            axes.text(column, row, f"{int(confusion[row, column])}", ha="center", va="center", color=colour)

    axes.set_xticks(range(n_classes), result.classes, rotation=45, ha="right")
    axes.set_yticks(range(n_classes), result.classes)
    axes.set_xlabel("predicted class (out-of-fold)")
    axes.set_ylabel("true class (neurons)")
    figure.suptitle(
        f"{title}\nmacro-F1 {result.macro_f1:.2f} (chance {result.chance_macro_f1:.2f}), "
        f"balanced accuracy {result.balanced_accuracy:.2f} (chance {result.chance_balanced_accuracy:.2f})",
        fontsize="medium",
    )
    return _save_png(figure, path)


def plot_embedding_map(embeddings: np.ndarray, labels: Sequence[str], path: str | Path, *, title: str) -> Path:
    """Draw the first two principal components of the embeddings as a PNG and return its path.

    Each neuron is one point coloured by its label. Unlabelled neurons (``""`` or
    ``None``) are drawn grey, beneath the others, as "unlabelled". Missing parent
    folders are created.

    Raises
    ------
    EvaluationInputError
        When the embeddings are not a finite 2-D array with one row per label.
    """
    matrix, label_array = _validate_probe_input(embeddings, labels)
    coordinates, explained = _principal_components_2d(matrix)

    figure = Figure(figsize=(6.5, 5.0), layout="constrained")
    axes = figure.add_subplot()

    unlabelled = label_array == ""
    if unlabelled.any():
        axes.scatter(
            coordinates[unlabelled, 0],
            coordinates[unlabelled, 1],
            s=12,
            color=UNLABELLED_COLOUR,
            alpha=0.6,
            label=f"unlabelled (n={int(unlabelled.sum())})",
        )

    classes = np.unique(label_array[~unlabelled])
    colour_map = _class_colour_map(classes.size)
    for index, name in enumerate(classes):
        members = label_array == name
        axes.scatter(
            coordinates[members, 0],
            coordinates[members, 1],
            s=16,
            color=colour_map(index),
            label=f"{name} (n={int(members.sum())})",
        )

    axes.set_xlabel(f"PC 1 ({100 * explained[0]:.0f}% of variance, arbitrary units)")
    axes.set_ylabel(f"PC 2 ({100 * explained[1]:.0f}% of variance, arbitrary units)")
    axes.set_title(title)
    if label_array.size:
        axes.legend(fontsize="small", loc="best", ncols=1 if classes.size <= 12 else 2, markerscale=1.5)
    return _save_png(figure, path)


def plot_training_curve(history: Mapping[str, Sequence[float]], path: str | Path, *, title: str) -> Path:
    """Draw loss terms against the optimiser step as a PNG and return its path.

    Each key of ``history`` other than ``"step"`` is one curve, plotted against
    ``history["step"]`` when that key exists and has the same length, else against
    0, 1, 2, ... The y axis is logarithmic when every finite value is positive.
    Missing parent folders are created.

    Raises
    ------
    EvaluationInputError
        When no curve has a value.
    """
    curves = {name: np.asarray(values, dtype=np.float64).ravel() for name, values in history.items() if name != "step"}
    curves = {name: values for name, values in curves.items() if values.size}
    if not curves:
        raise EvaluationInputError(
            f"training history has no loss values (keys: {sorted(history)}); "
            f"train for at least one step before plotting"
        )

    steps = np.asarray(history.get("step", []), dtype=np.float64).ravel()
    figure = Figure(figsize=(6.5, 4.0), layout="constrained")
    axes = figure.add_subplot()
    for name, values in curves.items():
        x = steps if steps.size == values.size else np.arange(values.size)
        axes.plot(x, values, label=name, marker="." if values.size < 50 else None)

    finite = np.concatenate([values[np.isfinite(values)] for values in curves.values()])
    if finite.size and (finite > 0).all():
        axes.set_yscale("log")

    axes.set_xlabel("optimiser step")
    axes.set_ylabel("loss (dimensionless)")
    axes.set_title(title)
    axes.grid(True, which="major", alpha=0.3)
    axes.legend(fontsize="small")
    return _save_png(figure, path)


def _principal_components_2d(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # Components past the rank of the data are returned as zeros, so one neuron or
    # one feature still gives a 2-D map.
    coordinates = np.zeros((matrix.shape[0], 2))
    explained = np.zeros(2)
    if matrix.shape[0] == 0 or matrix.shape[1] == 0:
        return coordinates, explained

    centred = matrix - matrix.mean(axis=0)
    left, singular, _ = np.linalg.svd(centred, full_matrices=False)
    n_components = min(2, singular.size)
    coordinates[:, :n_components] = left[:, :n_components] * singular[:n_components]

    total = float((singular**2).sum())
    if total > 0:
        explained[:n_components] = singular[:n_components] ** 2 / total
    return coordinates, explained


def _class_colour_map(n_classes: int) -> Colormap:
    if n_classes <= 10:
        return colormaps["tab10"]
    if n_classes <= 20:
        return colormaps["tab20"]
    return colormaps["turbo"].resampled(n_classes)


def _save_png(figure: Figure, path: str | Path) -> Path:
    output = Path(path)
    output.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    figure.savefig(output, format="png", dpi=120, bbox_inches="tight", pad_inches=0.1)
    figure.clear()
    logger.debug("wrote figure %s", output)
    return output
