"""The trainer: positive pairs of windows, the fit loop, one-update steps, checkpoints and embeddings.

Two windows of the same neuron, taken at different times, form a positive pair. Each
view contains the neuron and its k nearest neighbours in the same window, so the
encoder receives the population around the neuron. :class:`Trainer.fit` loops over
epochs and steps, :meth:`Trainer.step` does one update, and :func:`embed_neurons`
averages a neuron's window embeddings over its whole recording.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from neurpir_nwb.errors import TrainingError
from neurpir_nwb.model import NeurPIREncoder, Projector, VICRegLoss

__all__ = [
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "WindowData",
    "embed_neurons",
    "resolve_device",
    "autocast_dtype",
]

logger = logging.getLogger(__name__)

#: One view: activity (batch, 1 + k, patches, bins), distance bins (batch, 1 + k), present (batch, 1 + k).
View = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass
class TrainConfig:
    """Optimiser, schedule, device and seed of one training run."""

    epochs: int = 30
    steps_per_epoch: int = 50
    batch_size: int = 64
    lr: float = 1.0e-4
    weight_decay: float = 0.01
    warmup_fraction: float = 0.05
    grad_clip: float = 1.0
    device: str = "auto"
    precision: str = "auto"
    seed: int = 0
    neighbour_dropout: float = 0.0

    @property
    def total_steps(self) -> int:
        """Optimiser steps over the whole run."""
        return self.epochs * self.steps_per_epoch


@dataclass
class TrainResult:
    """Measurements of a finished training run: loss history, duration and throughput."""

    history: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0
    windows_per_s: float = 0.0
    device: str = "cpu"
    precision: str = "fp32"


def resolve_device(name: str) -> torch.device:
    """Turn ``auto``, ``cpu`` or ``cuda`` into a device, raising when CUDA is requested but missing."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("train.device is 'cuda' but PyTorch finds no CUDA device; use 'auto' or 'cpu'")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {name!r}; use 'auto', 'cpu' or 'cuda'")
    return torch.device(name)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """Return the autocast dtype for a precision setting, or None for plain fp32.

    ``auto`` is bf16 on CUDA and fp32 on the CPU.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if device.type == "cuda" else None


class WindowData:
    """Windows of a segment set as arrays the sampler and the encoder read.

    Parameters
    ----------
    dataset
        A segment set from :func:`neurpir_nwb.segments.build_segment_set`.
    holdout_fraction
        Share of each neuron's valid windows, the last ones in time, that training skips
        because the retrieval score is measured on them.
    train_neurons
        Indices of the neurons training may draw; by default all. The others are
        still embedded, and may still appear as neighbours of a training neuron only
        when they belong to its recording.
    """

    def __init__(self, dataset: xr.Dataset, *, holdout_fraction: float = 0.0, train_neurons: np.ndarray | None = None):
        if not 0.0 <= holdout_fraction < 1.0:
            raise ValueError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")

        activity = dataset["activity"].values.astype(np.float32)
        if dataset.attrs.get("activity_transform") == "log1p":
            activity = np.log1p(activity)

        # (neuron, window, patch, bin); invalid windows are NaN in the set and zero here.
        self.activity = np.nan_to_num(activity, nan=0.0, posinf=0.0, neginf=0.0)
        self.valid = dataset["valid"].values.astype(bool)
        self.neighbour = dataset["neighbour"].values.astype(np.int64)
        self.distance_bin = dataset["distance_bin"].values.astype(np.int64)
        self.empty = dataset["empty"].values.astype(bool)

        # The last ceil(fraction * valid windows) windows of each neuron are held out of training.
        n_valid = self.valid.sum(axis=1, keepdims=True)
        n_heldout = np.ceil(holdout_fraction * n_valid).astype(np.int64)
        rank = np.cumsum(self.valid, axis=1)
        self.heldout = self.valid & (rank > n_valid - n_heldout)
        self.train_mask = self.valid & ~self.heldout
        if train_neurons is not None:
            allowed = np.zeros(self.n_neurons, dtype=bool)
            allowed[np.asarray(train_neurons, dtype=np.int64)] = True
            self.train_mask &= allowed[:, None]

    @property
    def n_neurons(self) -> int:
        """Neurons in the set."""
        return self.activity.shape[0]

    def trainable_neurons(self) -> np.ndarray:
        """Return the indices of the neurons with spikes and at least two training windows."""
        return np.flatnonzero(~self.empty & (self.train_mask.sum(axis=1) >= 2))

    def view(self, neurons: np.ndarray, windows: np.ndarray) -> View:
        """Gather each neuron with its neighbours in one window.

        Returns
        -------
        activity, distance_bins, present
            (batch, 1 + k, patches, bins) float32, (batch, 1 + k) int64 and (batch, 1 + k) bool.
        """
        # (batch, 1 + k) indices along `neuron`: the target first, then its neighbours.
        members = np.concatenate([neurons[:, None], self.neighbour[neurons]], axis=1)
        present = members >= 0
        safe = np.where(present, members, 0)

        # (batch, 1 + k, patches, bins); padded neighbours read as zeros and are masked in attention.
        activity = self.activity[safe, windows[:, None]]
        activity[~present] = 0.0

        distance_bins = np.concatenate(
            [np.zeros((len(neurons), 1), dtype=np.int64), self.distance_bin[neurons]], axis=1
        )
        return (
            torch.from_numpy(activity),
            torch.from_numpy(distance_bins),
            torch.from_numpy(present),
        )

    def sample_pairs(
        self, rng: np.random.Generator, batch_size: int, neurons: np.ndarray, *, neighbour_dropout: float = 0.0
    ) -> tuple[View, View]:
        """Draw a batch of positive pairs: two different training windows of each drawn neuron.

        Neurons are drawn without replacement while the batch is no larger than the
        set, so the batch's other neurons act as the negatives that VICReg's variance
        and covariance terms push away. With ``neighbour_dropout`` above 0, each view
        hides each neighbour with that probability, independently, so the two views of
        a pair see different neighbours.
        """
        chosen = rng.choice(neurons, size=batch_size, replace=batch_size > len(neurons))

        # Two distinct training windows per neuron: draw the first, then shift by a random non-zero offset.
        windows_a = np.empty(batch_size, dtype=np.int64)
        windows_b = np.empty(batch_size, dtype=np.int64)
        for index, neuron in enumerate(chosen):
            training_windows = np.flatnonzero(self.train_mask[neuron])
            first = rng.integers(len(training_windows))
            second = (first + rng.integers(1, len(training_windows))) % len(training_windows)
            windows_a[index] = training_windows[first]
            windows_b[index] = training_windows[second]

        view_a, view_b = self.view(chosen, windows_a), self.view(chosen, windows_b)
        if neighbour_dropout > 0:
            view_a, view_b = (_drop_neighbours(view, rng, neighbour_dropout) for view in (view_a, view_b))
        return view_a, view_b


def _drop_neighbours(view: View, rng: np.random.Generator, probability: float) -> View:
    """Hide each neighbour of a view with the given probability; the target always stays."""
    activity, distance_bins, present = view
    keep = torch.from_numpy(rng.random(tuple(present.shape)) >= probability)
    keep[:, 0] = True
    present = present & keep
    activity = activity * present[..., None, None]
    return activity, distance_bins, present


class Trainer:
    """Fit an encoder and a projector with VICReg on positive pairs of windows.

    Parameters
    ----------
    encoder, projector, loss
        The modules; the projector is used in training only.
    config
        Optimiser, schedule, device and seed.
    """

    def __init__(self, encoder: NeurPIREncoder, projector: Projector, loss: VICRegLoss, config: TrainConfig):
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = autocast_dtype(config.precision, self.device)
        self.encoder = encoder.to(self.device)
        self.projector = projector.to(self.device)
        self.loss = loss

        parameters = list(self.encoder.parameters()) + list(self.projector.parameters())
        self.optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)

    def _lr_factor(self, step: int) -> float:
        """Return the learning-rate factor: linear warm-up, then cosine decay to zero."""
        total = max(self.config.total_steps, 1)
        warmup = int(self.config.warmup_fraction * total)
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(total - warmup, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    def _autocast(self):
        """Return the autocast context for this run's device and precision."""
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None)

    def step(self, view_a: View, view_b: View) -> dict[str, float]:
        """Do one update on a batch of positive pairs and return the loss terms."""
        self.encoder.train()
        self.projector.train()
        view_a = tuple(tensor.to(self.device, non_blocking=True) for tensor in view_a)
        view_b = tuple(tensor.to(self.device, non_blocking=True) for tensor in view_b)

        with self._autocast():
            z_a = self.projector(self.encoder(*view_a))
            z_b = self.projector(self.encoder(*view_b))
        total, terms = self.loss(z_a.float(), z_b.float())
        if not torch.isfinite(total):
            raise TrainingError(
                f"the loss became {total.item()} at learning rate {self.scheduler.get_last_lr()[0]:.2e}; "
                "lower train.lr or raise train.warmup_fraction in the recipe"
            )

        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(
            list(self.encoder.parameters()) + list(self.projector.parameters()), self.config.grad_clip
        )
        self.optimizer.step()
        self.scheduler.step()

        metrics = {"loss": total.item(), **{name: value.item() for name, value in terms.items()}}
        metrics["grad_norm"] = float(grad_norm)
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        return metrics

    def fit(
        self,
        data: WindowData,
        *,
        checkpoint_dir: Path | None = None,
        on_step: Callable[[int, int, dict[str, float]], None] | None = None,
    ) -> TrainResult:
        """Train for ``epochs * steps_per_epoch`` steps and save a checkpoint after every epoch.

        Parameters
        ----------
        data
            The windows to draw pairs from.
        checkpoint_dir
            Folder for ``checkpoint.pt``; no checkpoints when None.
        on_step
            Called after every step with the step number, the total and the loss terms.
        """
        config = self.config
        neurons = data.trainable_neurons()
        if len(neurons) < 2:
            raise TrainingError(
                f"only {len(neurons)} neuron(s) have spikes in two or more windows; VICReg needs at least 2 "
                "neurons per batch, so add sources or shorten the windows"
            )

        torch.manual_seed(config.seed)
        rng = np.random.default_rng(config.seed)
        history: dict[str, list[float]] = {}
        logger.info(
            "training on %d neurons for %d epochs x %d steps of %d pairs (device %s, %s)",
            len(neurons),
            config.epochs,
            config.steps_per_epoch,
            config.batch_size,
            self.device,
            "bf16 autocast" if self.dtype is not None else "fp32",
        )

        start = time.perf_counter()
        step_number = 0
        for epoch in range(config.epochs):
            for _ in range(config.steps_per_epoch):
                view_a, view_b = data.sample_pairs(rng, config.batch_size, neurons, neighbour_dropout=config.neighbour_dropout)
                metrics = self.step(view_a, view_b)
                for name, value in metrics.items():
                    history.setdefault(name, []).append(value)
                step_number += 1
                if on_step is not None:
                    on_step(step_number, config.total_steps, metrics)

            logger.info("epoch %d/%d: loss %.4f", epoch + 1, config.epochs, float(np.mean(history["loss"][-config.steps_per_epoch :])))
            if checkpoint_dir is not None:
                self.save_checkpoint(Path(checkpoint_dir) / "checkpoint.pt", epoch=epoch + 1)
        seconds = time.perf_counter() - start

        windows = 2 * config.batch_size * config.total_steps
        return TrainResult(
            history=history,
            seconds=seconds,
            windows_per_s=windows / seconds if seconds > 0 else float("nan"),
            device=str(self.device),
            precision="bf16" if self.dtype is not None else "fp32",
        )

    def save_checkpoint(self, path: Path, *, epoch: int) -> None:
        """Write the weights and optimiser state; it loads with ``torch.load(weights_only=True)``."""
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.partial")
        state = {
            "epoch": epoch,
            "encoder": self.encoder.state_dict(),
            "projector": self.projector.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "config": asdict(self.config),
        }
        torch.save(state, temporary)
        temporary.replace(path)


@torch.no_grad()
def embed_neurons(
    encoder: NeurPIREncoder,
    data: WindowData,
    *,
    batch_size: int = 256,
    device: str = "auto",
    precision: str = "auto",
    on_batch: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Embed every valid window and average each neuron's windows.

    Returns
    -------
    neuron_embeddings, window_embeddings
        (n_neurons, dim) float32 means over each neuron's valid windows, and
        (n_neurons, n_windows, dim) float32 window embeddings with NaN at invalid windows.
    """
    torch_device = resolve_device(device)
    dtype = autocast_dtype(precision, torch_device)
    encoder = encoder.to(torch_device).eval()

    neurons, windows = np.nonzero(data.valid)
    dim = encoder.config.dim
    window_embeddings = np.full((*data.valid.shape, dim), np.nan, dtype=np.float32)

    n_batches = math.ceil(len(neurons) / batch_size)
    for index, start in enumerate(range(0, len(neurons), batch_size)):
        batch_neurons = neurons[start : start + batch_size]
        batch_windows = windows[start : start + batch_size]
        view = tuple(tensor.to(torch_device) for tensor in data.view(batch_neurons, batch_windows))
        with torch.autocast(torch_device.type, dtype=dtype, enabled=dtype is not None):
            embedding = encoder(*view)
        window_embeddings[batch_neurons, batch_windows] = embedding.float().cpu().numpy()
        if on_batch is not None:
            on_batch(index + 1, n_batches)

    # Invalid windows are NaN, so the mean runs over each neuron's valid windows only.
    counts = data.valid.sum(axis=1)[:, None]
    sums = np.nansum(window_embeddings, axis=1)
    neuron_embeddings = np.divide(sums, counts, out=np.zeros_like(sums), where=counts > 0)
    return neuron_embeddings.astype(np.float32), window_embeddings
