"""Baseline features of spike trains: firing rate, ISI variability and the log-ISI histogram.

These features summarise a neuron without any learning, so a probe on them is the
baseline that learned embeddings must beat.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from sklearn.decomposition import PCA

from neurpir_nwb.errors import EvaluationInputError

logger = logging.getLogger(__name__)




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


#: Maximum number of windows that the PCA baseline is fitted on; beyond it, windows are drawn at random.
MAX_PCA_FIT_WINDOWS = 200_000

#: Neurons whose windows the PCA baseline projects at once.
PCA_BLOCK_NEURONS = 256


def binned_activity_pca(
    activity: np.ndarray,
    valid: np.ndarray,
    fit_neurons: np.ndarray,
    *,
    n_components: int = 16,
    seed: int = 0,
) -> np.ndarray:
    """Project every window onto the principal components of the fitting neurons' windows.

    PCA is fitted on the flattened windows (patches x bins) of ``fit_neurons`` only, so
    a held-out animal never shapes the components; beyond :data:`MAX_PCA_FIT_WINDOWS`
    windows, on a random draw of them.

    Parameters
    ----------
    activity
        ``(n_neurons, n_windows, patches, bins)`` activity, already transformed (for
        example ``log1p`` of spike counts): an array, or a
        :class:`~neurpir_nwb.segments.LazyActivity` read from disk.
    valid
        ``(n_neurons, n_windows)`` bool mask of the windows to use.
    fit_neurons
        Indices of the neurons whose windows fit the PCA.

    Returns
    -------
    numpy.ndarray
        ``(n_neurons, n_windows, n_components)`` float64 projections; invalid windows are NaN.
    """
    n_neurons, n_windows = valid.shape
    fit_mask = np.zeros_like(valid)
    fit_mask[fit_neurons] = valid[fit_neurons]
    if fit_mask.sum() < 2:
        raise EvaluationInputError("PCA needs at least 2 valid windows of the fitting neurons; check the valid mask")

    # The fitting windows, at most MAX_PCA_FIT_WINDOWS of them drawn at random.
    fit_neuron, fit_window = np.nonzero(fit_mask)
    if len(fit_neuron) > MAX_PCA_FIT_WINDOWS:
        chosen = np.sort(np.random.default_rng(seed).choice(len(fit_neuron), MAX_PCA_FIT_WINDOWS, replace=False))
        fit_neuron, fit_window = fit_neuron[chosen], fit_window[chosen]
    fit_values = np.asarray(activity[fit_neuron, fit_window]).reshape(len(fit_neuron), -1)

    components = int(min(n_components, len(fit_neuron), fit_values.shape[-1]))
    pca = PCA(n_components=components, random_state=seed).fit(np.nan_to_num(fit_values))

    # Projected in blocks of neurons, so that activity kept on disk is read a piece at a time.
    projected = np.empty((n_neurons, n_windows, components))
    for start in range(0, n_neurons, PCA_BLOCK_NEURONS):
        block = np.asarray(activity[start : start + PCA_BLOCK_NEURONS])
        rows = block.shape[0]
        projected[start : start + rows] = pca.transform(np.nan_to_num(block.reshape(rows * n_windows, -1))).reshape(rows, n_windows, components)
    projected[~valid] = np.nan
    return projected


def binned_activity_pca_features(
    activity: np.ndarray,
    valid: np.ndarray,
    fit_neurons: np.ndarray,
    *,
    n_components: int = 16,
    seed: int = 0,
) -> np.ndarray:
    """Summarise each neuron by the mean and the standard deviation of its windows' principal components.

    The arguments are those of :func:`binned_activity_pca`.

    Returns
    -------
    numpy.ndarray
        ``(n_neurons, 2 * n_components)`` float64 features.
    """
    projected = binned_activity_pca(activity, valid, fit_neurons, n_components=n_components, seed=seed)
    return summarise_window_projections(projected, valid)


def summarise_window_projections(projected: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Return the mean and the standard deviation of each neuron's valid window projections.

    Invalid windows are ignored, and a neuron without valid windows gets zeros.
    """
    weights = valid[..., None].astype(np.float64)
    counts = np.maximum(weights.sum(axis=1), 1.0)
    values = np.nan_to_num(projected)
    mean = (values * weights).sum(axis=1) / counts
    std = np.sqrt(((values - mean[:, None, :]) ** 2 * weights).sum(axis=1) / counts)
    return np.concatenate([mean, std], axis=1)
