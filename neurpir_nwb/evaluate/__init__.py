"""Evaluation of per-neuron embeddings: probes, baseline features, retrieval and figures.

The same probe runs on the learned embeddings and on baseline features, with the same
splits, so the two are scored alike.
"""

from neurpir_nwb.errors import EvaluationInputError
from neurpir_nwb.evaluate.features import (
    binned_activity_pca,
    binned_activity_pca_features,
    isi_histogram_edges_s,
    spike_train_feature_names,
    spike_train_features,
    summarise_window_projections,
)
from neurpir_nwb.evaluate.figures import plot_confusion, plot_embedding_map, plot_training_curve
from neurpir_nwb.evaluate.probe import (
    ProbeResult,
    ProbeSettings,
    fit_probe,
    probe_from_dict,
    probe_to_dict,
    run_probe,
)
from neurpir_nwb.evaluate.retrieval import retrieval_top1

__all__ = [
    "EvaluationInputError",
    "ProbeResult",
    "ProbeSettings",
    "binned_activity_pca",
    "binned_activity_pca_features",
    "fit_probe",
    "isi_histogram_edges_s",
    "plot_confusion",
    "plot_embedding_map",
    "plot_training_curve",
    "probe_from_dict",
    "probe_to_dict",
    "retrieval_top1",
    "run_probe",
    "spike_train_feature_names",
    "spike_train_features",
    "summarise_window_projections",
]
