"""Same-neuron retrieval: whether a held-out window's embedding points back to its own neuron.

This scores the first criterion of the method directly: embeddings of one neuron's
windows lie closer to each other than to other neurons' embeddings.
"""

from __future__ import annotations

import logging

import numpy as np

from neurpir_nwb.errors import EvaluationInputError

logger = logging.getLogger(__name__)


def retrieval_top1(window_embeddings: np.ndarray, reference: np.ndarray, query: np.ndarray) -> dict[str, float | int]:
    """Score top-1 retrieval of held-out windows against the neurons' mean embeddings.

    Each neuron's reference embedding is the mean of its ``reference`` windows. Every
    ``query`` window is matched to the neuron whose reference embedding has the
    highest cosine similarity, among all neurons with reference windows.

    Parameters
    ----------
    window_embeddings
        ``(n_neurons, n_windows, dim)`` window embeddings.
    reference, query
        ``(n_neurons, n_windows)`` bool masks of the windows that form the reference
        means (the training windows) and of the held-out windows to retrieve.

    Returns
    -------
    dict
        ``top1`` (share of query windows matched to their own neuron), ``chance``
        (1 / number of candidate neurons) and ``n_queries``.
    """
    if window_embeddings.ndim != 3 or reference.shape != window_embeddings.shape[:2] or query.shape != reference.shape:
        raise EvaluationInputError(
            f"window embeddings of shape {window_embeddings.shape} do not match masks of shape "
            f"{reference.shape} and {query.shape}; pass (neurons, windows, dim) and (neurons, windows)"
        )
    if (reference & query).any():
        raise EvaluationInputError("a window is both a reference and a query; held-out windows must be left out of the reference")

    # (n_candidates, dim) unit-length mean embeddings of the neurons with reference windows.
    counts = reference.sum(axis=1)
    candidates = np.flatnonzero(counts > 0)
    if candidates.size < 2 or not query[candidates].any():
        raise EvaluationInputError(
            f"retrieval needs at least 2 neurons with reference windows and some held-out windows, got "
            f"{candidates.size} neurons and {int(query.sum())} held-out windows; raise train.holdout_fraction"
        )
    sums = np.where(reference[..., None], window_embeddings, 0.0).sum(axis=1)
    means = _unit_rows(sums[candidates] / counts[candidates, None])

    # (n_queries, dim) held-out windows of the candidate neurons, and their owners.
    owner, window = np.nonzero(query[candidates])
    queries = _unit_rows(window_embeddings[candidates[owner], window])

    nearest = (queries @ means.T).argmax(axis=1)
    top1 = float(np.mean(nearest == owner))
    logger.info("retrieval: %d held-out windows, top-1 %.3f (chance %.3f)", owner.size, top1, 1.0 / candidates.size)
    return {"top1": top1, "chance": 1.0 / candidates.size, "n_queries": int(owner.size), "n_neurons": int(candidates.size)}


def _unit_rows(matrix: np.ndarray) -> np.ndarray:
    """Scale each row to unit length; zero rows stay zero."""
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return np.divide(matrix, norms, out=np.zeros_like(matrix, dtype=np.float64), where=norms > 0)
