"""Figures of a run: confusion matrices, the 2-D embedding map and the training curve.

Figures are drawn on :class:`matplotlib.figure.Figure` objects with the Agg canvas,
so this module never changes the pyplot backend of an interactive session.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Colormap
from matplotlib.figure import Figure

from neurpir_nwb.errors import EvaluationInputError
from neurpir_nwb.evaluate.probe import ProbeResult, validate_features

logger = logging.getLogger(__name__)

UNLABELLED_COLOUR = "0.6"




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
    matrix, label_array = validate_features(embeddings, labels)
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
