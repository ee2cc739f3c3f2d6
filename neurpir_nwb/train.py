"""The trainer: positive pairs of windows, the fit loop, one-update steps, checkpoints and embeddings.

Two windows of the same neuron, taken at different times, form a positive pair. Each
view contains the neuron and its k nearest neighbours in the same window, so the
encoder receives the population around the neuron. :class:`Trainer.fit` loops over
epochs and steps, :meth:`Trainer.step` does one update, and :func:`embed_neurons`
averages a neuron's window embeddings over its whole recording.

Batches come in two forms, after the encoder's ``batching``:

- per-target: each step draws ``batch_size`` neurons and two training windows of
  each; every view carries the target and copies of its neighbours' activity;
- population: each step draws whole recording windows, a recording and two
  training windows of it, and every trainable neuron of that recording is a target
  whose two views are its activity in the two windows. Recordings are added until
  the step contains at least ``batch_size`` targets, and every neuron of a drawn
  window is encoded once.

Each step first draws a global plan, the neurons and windows of the whole batch,
from one seeded generator. A single process trains on the whole plan; with several
processes, each rank takes a contiguous share of the plan's targets (see
:mod:`neurpir_nwb.distributed`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr
from torch import Tensor, nn

from neurpir_nwb.errors import TrainingError
from neurpir_nwb.model import NeurPIREncoder, Projector, VICRegLoss
from neurpir_nwb.segments import LazyActivity, prepare_activity

__all__ = [
    "PairPlan",
    "PopulationPlan",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "WindowData",
    "autocast_dtype",
    "embed_neurons",
    "embedding_batch_count",
    "load_checkpoint",
    "resolve_device",
]

logger = logging.getLogger(__name__)

#: One per-target view: activity (batch, 1 + k, patches, bins), distance bins (batch, 1 + k), present (batch, 1 + k).
View = tuple[torch.Tensor, torch.Tensor, torch.Tensor]

#: One population view: activity (rows, patches, bins), neighbours (rows, k) as rows of the view or -1,
#: distance bins (rows, k) and targets (targets,) as rows of the view.
PopulationView = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]

#: Version of the checkpoint layout that :meth:`Trainer.load_checkpoint` reads.
CHECKPOINT_FORMAT = 2

#: Settings that decide the sequence of batches and updates; a resumed run must keep them.
TRAJECTORY_SETTINGS = (
    "epochs",
    "steps_per_epoch",
    "batch_size",
    "lr",
    "weight_decay",
    "warmup_fraction",
    "grad_clip",
    "seed",
    "neighbour_dropout",
)


@dataclass
class TrainConfig:
    """Optimiser, schedule, device, seed and checkpoints of one training run.

    ``checkpoint_steps`` saves a checkpoint every that many steps, besides the one
    after every epoch; 0 saves after every epoch only.
    """

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
    compile: bool = False
    checkpoint_steps: int = 100

    @property
    def total_steps(self) -> int:
        """Optimiser steps over the whole run."""
        return self.epochs * self.steps_per_epoch

    @classmethod
    def from_recipe(cls, train_section: Any) -> TrainConfig:
        """Build the configuration from a recipe's ``train`` section, keeping the keys that are fields here."""
        names = {entry.name for entry in fields(cls)}
        return cls(**{key: value for key, value in train_section.model_dump().items() if key in names})


@dataclass
class TrainResult:
    """Measurements of a finished training run: loss history, duration and throughput.

    ``seconds`` and ``windows_per_s`` cover every session of a resumed run, and
    ``windows_per_s`` counts the target windows that the loss saw, two per target.
    """

    history: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0
    windows_per_s: float = 0.0
    device: str = "cpu"
    precision: str = "fp32"
    batching: str = "per-target"
    processes: int = 1
    steps: int = 0
    resumed_from_step: int | None = None


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

    ``auto`` is bf16 on CUDA and fp32 on the CPU. On a CPU with AVX512-BF16, bf16
    trained the published encoder size 1.4x to 1.7x faster but the default recipe's
    encoder no faster (``benchmarks/train_throughput.py``), so the CPU default stays fp32.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if device.type == "cuda" else None


@dataclass
class PairPlan:
    """The global batch of one per-target step.

    Attributes
    ----------
    neurons
        (batch,) target neurons, as indices along ``neuron``.
    windows_a, windows_b
        (batch,) the two distinct training windows of each target.
    keep_a, keep_b
        (batch, k) bool: the neighbours each view shows, or None without neighbour dropout.
    """

    neurons: np.ndarray
    windows_a: np.ndarray
    windows_b: np.ndarray
    keep_a: np.ndarray | None = None
    keep_b: np.ndarray | None = None

    @property
    def n_targets(self) -> int:
        """Targets in the batch."""
        return len(self.neurons)


@dataclass
class PopulationDraw:
    """One recording window pair of a population step: its group, two windows, targets and visible neighbours."""

    group: int
    window_a: int
    window_b: int
    targets: np.ndarray
    keep_a: np.ndarray | None = None
    keep_b: np.ndarray | None = None


@dataclass
class PopulationPlan:
    """The global batch of one population step: recording windows whose targets follow each other in order."""

    draws: list[PopulationDraw]

    @property
    def n_targets(self) -> int:
        """Targets in the batch, over all draws."""
        return sum(len(draw.targets) for draw in self.draws)


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
    activity
        The set's activity read lazily from a zarr segment set, in place of the
        in-memory ``activity`` variable; see :func:`neurpir_nwb.segments.write_segment_set`.

    Notes
    -----
    Population batching encodes whole groups: the neurons of one recording (the
    ``source`` coordinate, in stacking order), joined with every neuron that one of
    them has as neighbour, so that each group contains all neighbours of its members.
    """

    def __init__(
        self,
        dataset: xr.Dataset,
        *,
        holdout_fraction: float = 0.0,
        train_neurons: np.ndarray | None = None,
        activity: LazyActivity | None = None,
    ):
        if not 0.0 <= holdout_fraction < 1.0:
            raise ValueError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")

        # (neuron, window, patch, bin); invalid windows are NaN in the set and zero here.
        self.activity: np.ndarray | LazyActivity
        if activity is not None:
            self.activity = activity
        else:
            self.activity = prepare_activity(dataset["activity"].values, dataset.attrs.get("activity_transform"))
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

        sources = dataset["source"].values.astype(str) if "source" in dataset.coords else None
        self.group, self.group_members, self.local_neighbour = _neighbourhood_groups(self.neighbour, sources)

    @property
    def n_neurons(self) -> int:
        """Neurons in the set."""
        return self.activity.shape[0]

    @property
    def n_groups(self) -> int:
        """Groups of neurons that population batching encodes together."""
        return len(self.group_members)

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

    def plan_pairs(
        self, rng: np.random.Generator, batch_size: int, neurons: np.ndarray, *, neighbour_dropout: float = 0.0
    ) -> PairPlan:
        """Draw the targets and windows of one per-target step: two different training windows of each drawn neuron.

        Neurons are drawn without replacement while the batch is no larger than the
        set, so the batch's other neurons act as the negatives that VICReg's variance
        and covariance terms push away.
        """
        chosen = rng.choice(neurons, size=batch_size, replace=batch_size > len(neurons))

        # Two distinct training windows per neuron: the r-th training window for a random r, then r shifted by a random non-zero offset.
        training = self.train_mask[chosen]  # (batch, windows)
        counts = training.sum(axis=1)
        first = rng.integers(0, counts)
        second = (first + rng.integers(1, counts)) % counts
        rank = np.cumsum(training, axis=1) - 1  # (batch, windows)
        windows_a = np.argmax(training & (rank == first[:, None]), axis=1)
        windows_b = np.argmax(training & (rank == second[:, None]), axis=1)

        keep_a = keep_b = None
        if neighbour_dropout > 0:
            shape = (batch_size, self.neighbour.shape[1])
            keep_a = rng.random(shape) >= neighbour_dropout
            keep_b = rng.random(shape) >= neighbour_dropout
        return PairPlan(chosen, windows_a, windows_b, keep_a, keep_b)

    def pair_views(self, plan: PairPlan, start: int = 0, stop: int | None = None) -> tuple[View, View]:
        """Gather the two views of the targets ``start`` to ``stop`` of a per-target plan.

        A neighbour that a view hides is marked absent and its activity is zero, as
        for padding.
        """
        part = slice(start, plan.n_targets if stop is None else stop)
        views = []
        for windows, keep in ((plan.windows_a, plan.keep_a), (plan.windows_b, plan.keep_b)):
            activity, distance_bins, present = self.view(plan.neurons[part], windows[part])
            if keep is not None:
                present[:, 1:] &= torch.from_numpy(keep[part])
                activity[~present] = 0.0
            views.append((activity, distance_bins, present))
        return views[0], views[1]

    def sample_pairs(
        self, rng: np.random.Generator, batch_size: int, neurons: np.ndarray, *, neighbour_dropout: float = 0.0
    ) -> tuple[View, View]:
        """Draw a batch of positive pairs: two different training windows of each drawn neuron.

        With ``neighbour_dropout`` above 0, each view hides each neighbour with that
        probability, independently, so the two views of a pair see different neighbours.
        """
        return self.pair_views(self.plan_pairs(rng, batch_size, neurons, neighbour_dropout=neighbour_dropout))

    def plan_population(
        self, rng: np.random.Generator, batch_size: int, neurons: np.ndarray, *, neighbour_dropout: float = 0.0
    ) -> PopulationPlan:
        """Draw the recording windows of one population step, until they hold at least ``batch_size`` targets.

        Groups are drawn without replacement, with probability proportional to their
        trainable neurons, and again from the start when all are used. In each drawn
        group, the first window is uniform among the windows where some trainable
        neuron may train, and the second among the other windows where a neuron that
        trains at the first may train too. The targets are the trainable neurons that
        may train at both, so each draw has at least one.
        """
        # NOTE: a step encodes whole recordings, so its memory grows with the neurons of the largest recording.
        trainable = np.zeros(self.n_neurons, dtype=bool)
        trainable[neurons] = True
        per_group = np.bincount(self.group[neurons], minlength=self.n_groups)
        groups = np.flatnonzero(per_group)
        weights = per_group[groups] / per_group[groups].sum()

        draws: list[PopulationDraw] = []
        count = 0
        while count < batch_size:
            for group in rng.choice(groups, size=len(groups), replace=False, p=weights):
                draw = self._draw_window_pair(rng, int(group), trainable, neighbour_dropout)
                draws.append(draw)
                count += len(draw.targets)
                if count >= batch_size:
                    break
        return PopulationPlan(draws)

    def _draw_window_pair(
        self, rng: np.random.Generator, group: int, trainable: np.ndarray, neighbour_dropout: float
    ) -> PopulationDraw:
        """Draw two windows of one group and the targets that may train at both."""
        members = self.group_members[group]
        candidates = members[trainable[members]]
        training = self.train_mask[candidates]  # (candidates, windows)

        window_a = int(rng.choice(np.flatnonzero(training.any(axis=0))))
        partners = training[training[:, window_a]].any(axis=0)
        partners[window_a] = False
        window_b = int(rng.choice(np.flatnonzero(partners)))
        targets = candidates[training[:, window_a] & training[:, window_b]]

        keep_a = keep_b = None
        if neighbour_dropout > 0:
            shape = (len(members), self.neighbour.shape[1])
            keep_a = rng.random(shape) >= neighbour_dropout
            keep_b = rng.random(shape) >= neighbour_dropout
        return PopulationDraw(group, window_a, window_b, targets, keep_a, keep_b)

    def population_views(
        self, plan: PopulationPlan, start: int = 0, stop: int | None = None
    ) -> tuple[PopulationView, PopulationView]:
        """Gather the two views of the targets ``start`` to ``stop`` of a population plan.

        Each draw that contains one of those targets contributes all neurons of its
        group as rows, so every target's neighbours are rows of the same view.
        """
        stop = plan.n_targets if stop is None else stop
        parts: list[list[np.ndarray]] = [[], []]
        neighbour_parts: list[list[np.ndarray]] = [[], []]
        bins_parts, target_parts = [], []
        rows = 0
        first_target = 0
        for draw in plan.draws:
            chosen = draw.targets[max(start - first_target, 0) : max(stop - first_target, 0)]
            first_target += len(draw.targets)
            if len(chosen) == 0:
                continue

            members = self.group_members[draw.group]
            neighbours = self.local_neighbour[members]  # (members, k)
            for view, (window, keep) in enumerate(((draw.window_a, draw.keep_a), (draw.window_b, draw.keep_b))):
                parts[view].append(self.activity[members, window])
                visible = neighbours if keep is None else np.where(keep, neighbours, -1)
                neighbour_parts[view].append(np.where(visible >= 0, visible + rows, -1))
            bins_parts.append(self.distance_bin[members])
            target_parts.append(np.searchsorted(members, chosen) + rows)
            rows += len(members)

        if not target_parts:
            return _empty_population_view(self), _empty_population_view(self)
        distance_bins = torch.from_numpy(np.concatenate(bins_parts))
        targets = torch.from_numpy(np.concatenate(target_parts))
        return tuple(
            (torch.from_numpy(np.concatenate(parts[view])), torch.from_numpy(np.concatenate(neighbour_parts[view])), distance_bins, targets)
            for view in (0, 1)
        )

    def sample_population(
        self, rng: np.random.Generator, batch_size: int, neurons: np.ndarray, *, neighbour_dropout: float = 0.0
    ) -> tuple[PopulationView, PopulationView]:
        """Draw recording windows until they hold at least ``batch_size`` targets, and gather their two views."""
        return self.population_views(self.plan_population(rng, batch_size, neurons, neighbour_dropout=neighbour_dropout))

    def population_batches(self, batch_size: int) -> list[tuple[int, np.ndarray]]:
        """Split the valid windows into inference batches of whole groups: (group, windows) pairs.

        A batch contains as many windows of one group as fit in about ``batch_size``
        rows, and at least one.
        """
        batches = []
        for group, members in enumerate(self.group_members):
            windows = np.flatnonzero(self.valid[members].any(axis=0))
            per_batch = max(1, batch_size // len(members))
            batches.extend((group, windows[start : start + per_batch]) for start in range(0, len(windows), per_batch))
        return batches

    def population_window_view(self, group: int, windows: np.ndarray) -> tuple[PopulationView, np.ndarray, np.ndarray]:
        """Gather every neuron of a group in the given windows, with the valid ones as targets.

        Returns
        -------
        view, neurons, windows
            The population view, and the neuron and window of each target.
        """
        members = self.group_members[group]
        n_members = len(members)
        activity = self.activity[members[None, :], windows[:, None]]  # (windows, members, patches, bins)
        activity = activity.reshape(len(windows) * n_members, *activity.shape[2:])

        # Window i occupies rows i * members to (i + 1) * members.
        offsets = (np.arange(len(windows)) * n_members)[:, None, None]  # (windows, 1, 1)
        local = self.local_neighbour[members][None]  # (1, members, k)
        neighbours = np.where(local >= 0, local + offsets, -1).reshape(len(windows) * n_members, -1)
        distance_bins = np.tile(self.distance_bin[members], (len(windows), 1))  # (windows * members, k)

        targets = np.flatnonzero(self.valid[members][:, windows].T.reshape(-1))
        view = (
            torch.from_numpy(np.ascontiguousarray(activity)),
            torch.from_numpy(neighbours),
            torch.from_numpy(distance_bins),
            torch.from_numpy(targets),
        )
        return view, members[targets % n_members], windows[targets // n_members]


def _empty_population_view(data: WindowData) -> PopulationView:
    """Return a population view with no rows, for a rank whose share of a step is empty."""
    patches, bins = data.activity.shape[2:]
    k = data.neighbour.shape[1]
    return (
        torch.zeros((0, patches, bins), dtype=torch.float32),
        torch.zeros((0, k), dtype=torch.int64),
        torch.zeros((0, k), dtype=torch.int64),
        torch.zeros(0, dtype=torch.int64),
    )


def _neighbourhood_groups(neighbour: np.ndarray, sources: np.ndarray | None) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """Group neurons into recordings closed under the neighbour relation.

    Returns
    -------
    group, members, local_neighbour
        (n_neurons,) group of each neuron; the sorted neurons of each group; and
        (n_neurons, k) each neighbour's position among its group's members, or -1.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n_neurons = len(neighbour)
    rows, columns = np.nonzero(neighbour >= 0)
    edges_from = [rows]
    edges_to = [neighbour[rows, columns]]
    if sources is not None and n_neurons > 1:
        same = np.flatnonzero(sources[1:] == sources[:-1])
        edges_from.append(same)
        edges_to.append(same + 1)
    edges_from = np.concatenate(edges_from)
    edges_to = np.concatenate(edges_to)
    graph = coo_matrix((np.ones(len(edges_from), dtype=np.int8), (edges_from, edges_to)), shape=(n_neurons, n_neurons))
    _, group = connected_components(graph, directed=False)

    n_groups = int(group.max()) + 1
    order = np.argsort(group, kind="stable")
    starts = np.searchsorted(group[order], np.arange(n_groups + 1))
    members = [order[starts[index] : starts[index + 1]] for index in range(n_groups)]
    position = np.empty(n_neurons, dtype=np.int64)
    position[order] = np.arange(n_neurons) - starts[group[order]]
    local_neighbour = np.where(neighbour >= 0, position[np.maximum(neighbour, 0)], -1)
    return group.astype(np.int64), members, local_neighbour


class _PairModel(nn.Module):
    """Encoder and projector as one module, so that DistributedDataParallel synchronises both in one pass."""

    def __init__(self, encoder: NeurPIREncoder, projector: Projector) -> None:
        super().__init__()
        self.encoder = encoder
        self.projector = projector

    def forward(self, view_a: tuple[Tensor, ...], view_b: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        """Project both views: per-target views of three tensors, population views of four."""
        embed = self.encoder.forward_population if len(view_a) == 4 else self.encoder
        return self.projector(embed(*view_a)), self.projector(embed(*view_b))


class _DeviceFeed:
    """Copies of batches to the training device: pinned host memory and a side stream on CUDA, so copies overlap compute."""

    # NOTE: the CUDA branch has not run on a GPU yet; the tests run on CPUs only.

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def send(self, tensors: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """Start copying host tensors to the device; on the CPU they are returned as they are."""
        if self.stream is None:
            return tuple(tensor.to(self.device) for tensor in tensors)
        with torch.cuda.stream(self.stream):
            return tuple(tensor.pin_memory().to(self.device, non_blocking=True) for tensor in tensors)

    def receive(self, tensors: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """Make the compute stream wait for the copies that :meth:`send` started."""
        if self.stream is None:
            return tensors
        current = torch.cuda.current_stream(self.device)
        current.wait_stream(self.stream)
        for tensor in tensors:
            tensor.record_stream(current)
        return tensors


class Trainer:
    """Fit an encoder and a projector with VICReg on positive pairs of windows.

    Parameters
    ----------
    encoder, projector, loss
        The modules; the projector is used in training only. The encoder's
        ``config.batching`` selects per-target or population batches.
    config
        Optimiser, schedule, device, seed and checkpoints.
    session
        This process's place among several training processes, from
        :mod:`neurpir_nwb.distributed`; None trains in this process alone.
    """

    def __init__(
        self, encoder: NeurPIREncoder, projector: Projector, loss: VICRegLoss, config: TrainConfig, *, session: Any = None
    ):
        from neurpir_nwb import distributed

        self.config = config
        self.session = session if session is not None and session.world_size > 1 else None
        self.device = self.session.device(config.device) if self.session else resolve_device(config.device)
        self.dtype = autocast_dtype(config.precision, self.device)
        self.batching = encoder.config.batching
        self.encoder = encoder.to(self.device)
        self.projector = projector.to(self.device)
        self.loss = loss
        if self.session is not None:
            distributed.synchronise_batch_norm(self.projector)

        self.model = _PairModel(self.encoder, self.projector)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)

        self.network: nn.Module = self.model
        if self.session is not None:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.network = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)
        if config.compile:
            self.network = torch.compile(self.network)
        self.feed = _DeviceFeed(self.device)

        # Filled by load_checkpoint when resuming.
        self.start_step = 0
        self._resume: dict[str, Any] | None = None

    @property
    def rank(self) -> int:
        """This process's rank, 0 when training alone."""
        return self.session.rank if self.session else 0

    @property
    def world_size(self) -> int:
        """Number of training processes."""
        return self.session.world_size if self.session else 1

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

    def step(self, view_a: tuple[Tensor, ...], view_b: tuple[Tensor, ...]) -> dict[str, float]:
        """Do one update on a batch of positive pairs and return the loss terms.

        The views are per-target views (three tensors) or population views (four
        tensors), after the encoder's batching. With several processes, each passes
        its own share of the global batch.
        """
        batch = self.feed.receive(self.feed.send((*view_a, *view_b)))
        half = len(batch) // 2
        return self._metrics(self._update(batch[:half], batch[half:]))

    def _update(self, view_a: tuple[Tensor, ...], view_b: tuple[Tensor, ...]) -> dict[str, Tensor]:
        """Run the forward and backward passes and the optimiser step; the returned values stay on the device."""
        from neurpir_nwb import distributed

        self.model.train()
        with self._autocast():
            z_a, z_b = self.network(view_a, view_b)
        if self.session is not None:
            z_a = distributed.gather_rows(z_a)
            z_b = distributed.gather_rows(z_b)
        total, terms = self.loss(z_a.float(), z_b.float())
        if not torch.isfinite(total):
            raise TrainingError(
                f"the loss became {total.item()} at learning rate {self.scheduler.get_last_lr()[0]:.2e}; "
                "lower train.lr or raise train.warmup_fraction in the recipe"
            )

        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        return {"loss": total.detach(), **{name: value.detach() for name, value in terms.items()}, "grad_norm": grad_norm}

    def _metrics(self, values: dict[str, Tensor]) -> dict[str, float]:
        """Copy the loss terms to Python numbers, which waits for the device to finish the step."""
        metrics = {name: float(value) for name, value in values.items()}
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        return metrics

    def _share(self, n_targets: int) -> tuple[int, int]:
        """Return the first and the stop index of this rank's contiguous share of a plan's targets."""
        return self.rank * n_targets // self.world_size, (self.rank + 1) * n_targets // self.world_size

    def _plan(self, data: WindowData, rng: np.random.Generator, neurons: np.ndarray) -> PairPlan | PopulationPlan:
        """Draw the global batch of one step."""
        draw = data.plan_population if self.batching == "population" else data.plan_pairs
        return draw(rng, self.config.batch_size, neurons, neighbour_dropout=self.config.neighbour_dropout)

    def _local_views(self, data: WindowData, plan: PairPlan | PopulationPlan) -> tuple[Tensor, ...]:
        """Gather this rank's share of a plan as the tensors of view a followed by those of view b."""
        start, stop = self._share(plan.n_targets)
        if isinstance(plan, PopulationPlan):
            view_a, view_b = data.population_views(plan, start, stop)
        else:
            view_a, view_b = data.pair_views(plan, start, stop)
        return (*view_a, *view_b)

    def fit(
        self,
        data: WindowData,
        *,
        checkpoint_dir: Path | None = None,
        on_step: Callable[[int, int, dict[str, float]], None] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> TrainResult:
        """Train for ``epochs * steps_per_epoch`` steps, saving checkpoints after every epoch and every ``checkpoint_steps`` steps.

        After :meth:`load_checkpoint`, training continues from the checkpoint's step
        with its random states, so it ends with the weights of an uninterrupted run
        on the same device and thread count.

        Parameters
        ----------
        data
            The windows to draw pairs from.
        checkpoint_dir
            Folder for ``checkpoint.pt``; no checkpoints when None. With several
            processes, rank 0 alone writes it.
        on_step
            Called after every step with the step number, the total and the loss terms.
        metadata
            Stored in every checkpoint under ``"metadata"``, such as the sha256 of the data.
        """
        config = self.config
        neurons = data.trainable_neurons()
        if len(neurons) < 2:
            raise TrainingError(
                f"only {len(neurons)} neuron(s) have spikes in two or more windows; VICReg needs at least 2 "
                "neurons per batch, so add sources or shorten the windows"
            )
        if self.batching == "population" and not self.encoder.config.batchings_agree and self.rank == 0:
            logger.info(
                "population batching with %d spatio-temporal layers: every neuron is updated once in its own "
                "neighbourhood, which differs from per-target batching for stacks deeper than one layer",
                self.encoder.config.spatiotemporal_layers,
            )

        rng = np.random.default_rng(config.seed)
        torch.manual_seed(config.seed + self.rank)
        history: dict[str, list[float]] = {}
        seconds_before = 0.0
        windows = 0
        if self._resume is not None:
            rng.bit_generator.state = self._resume["numpy_rng"]
            self._restore_torch_rng(self._resume)
            history = {name: list(values) for name, values in self._resume["history"].items()}
            seconds_before = float(self._resume["seconds"])
            windows = int(self._resume["windows"])

        if self.rank == 0:
            logger.info(
                "training on %d neurons for %d epochs x %d steps of %s%d targets (%s batching, %d process%s, device %s, %s)",
                len(neurons),
                config.epochs,
                config.steps_per_epoch,
                "at least " if self.batching == "population" else "",
                config.batch_size,
                self.batching,
                self.world_size,
                "es" if self.world_size > 1 else "",
                self.device,
                "bf16 autocast" if self.dtype is not None else "fp32",
            )

        start = time.perf_counter()
        step_number = self.start_step
        if step_number < config.total_steps:
            plan = self._plan(data, rng, neurons)
            batch = self.feed.send(self._local_views(data, plan))
        while step_number < config.total_steps:
            batch = self.feed.receive(batch)
            half = len(batch) // 2
            values = self._update(batch[:half], batch[half:])
            step_number += 1
            windows += 2 * plan.n_targets

            # Draw and start copying the next batch while the device finishes this step.
            rng_state = rng.bit_generator.state
            if step_number < config.total_steps:
                plan = self._plan(data, rng, neurons)
                batch = self.feed.send(self._local_views(data, plan))

            metrics = self._metrics(values)
            for name, value in metrics.items():
                history.setdefault(name, []).append(value)
            if on_step is not None:
                on_step(step_number, config.total_steps, metrics)

            epoch_end = step_number % config.steps_per_epoch == 0
            if epoch_end and self.rank == 0:
                recent = history["loss"][-config.steps_per_epoch :]
                logger.info("epoch %d/%d: loss %.4f", step_number // config.steps_per_epoch, config.epochs, float(np.mean(recent)))
            # Every rank takes part, because the checkpoint gathers the random states of all ranks.
            periodic = config.checkpoint_steps > 0 and step_number % config.checkpoint_steps == 0
            if epoch_end or periodic:
                elapsed = seconds_before + time.perf_counter() - start
                self._save_checkpoint(
                    None if checkpoint_dir is None else Path(checkpoint_dir) / "checkpoint.pt",
                    step=step_number,
                    numpy_rng=rng_state,
                    history=history,
                    seconds=elapsed,
                    windows=windows,
                    metadata=metadata,
                )
        seconds = seconds_before + time.perf_counter() - start

        return TrainResult(
            history=history,
            seconds=seconds,
            windows_per_s=windows / seconds if seconds > 0 else float("nan"),
            device=str(self.device),
            precision="bf16" if self.dtype is not None else "fp32",
            batching=self.batching,
            processes=self.world_size,
            steps=config.total_steps,
            resumed_from_step=self.start_step if self._resume is not None else None,
        )

    def _torch_rng_states(self) -> tuple[list[Tensor], list[Tensor]]:
        """Return the CPU and CUDA random states of every rank, in rank order."""
        cpu_state = torch.get_rng_state()
        cuda_state = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else torch.zeros(0, dtype=torch.uint8)
        if self.session is None:
            return [cpu_state], [cuda_state]

        import torch.distributed as dist

        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, (cpu_state, cuda_state), group=self.session.coordination)
        return [state[0] for state in gathered], [state[1] for state in gathered]

    def _restore_torch_rng(self, state: dict[str, Any]) -> None:
        """Restore this rank's random states from a checkpoint; a rank the checkpoint lacks keeps its fresh seed."""
        if self.rank < len(state["torch_rng"]):
            torch.set_rng_state(state["torch_rng"][self.rank])
        cuda_states = state.get("cuda_rng", [])
        if self.device.type == "cuda" and self.rank < len(cuda_states) and cuda_states[self.rank].numel():
            torch.cuda.set_rng_state(cuda_states[self.rank], self.device)

    def _save_checkpoint(
        self,
        path: Path | None,
        *,
        step: int,
        numpy_rng: dict[str, Any],
        history: dict[str, list[float]],
        seconds: float,
        windows: int,
        metadata: dict[str, Any] | None,
    ) -> None:
        """Write everything a resumed run needs to ``path``; with several processes all ranks call it and rank 0 writes."""
        torch_states, cuda_states = self._torch_rng_states()
        if self.rank != 0 or path is None:
            return

        state = {
            "format_version": CHECKPOINT_FORMAT,
            "epoch": step // self.config.steps_per_epoch,
            "step": step,
            "encoder": self.encoder.state_dict(),
            "projector": self.projector.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "config": asdict(self.config),
            "encoder_config": self.encoder.config.to_dict(),
            "history": history,
            "seconds": seconds,
            "windows": windows,
            "numpy_rng": numpy_rng,
            "torch_rng": torch_states,
            "cuda_rng": cuda_states,
            "world_size": self.world_size,
            "metadata": dict(metadata or {}),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.partial")
        torch.save(state, temporary)
        temporary.replace(path)

    def load_checkpoint(self, state: dict[str, Any]) -> None:
        """Restore the weights, optimiser, schedule, history and random states of a checkpoint, for :meth:`fit` to continue.

        Raises
        ------
        TrainingError
            When the checkpoint has another layout, another encoder configuration,
            or other settings that decide the batches and updates.
        """
        if state.get("format_version") != CHECKPOINT_FORMAT:
            raise TrainingError(
                f"the checkpoint has format {state.get('format_version')!r}, but this version resumes format "
                f"{CHECKPOINT_FORMAT}; start the run again with --overwrite"
            )
        if state["encoder_config"] != self.encoder.config.to_dict():
            raise TrainingError(
                f"the checkpoint's encoder {state['encoder_config']} differs from the recipe's encoder "
                f"{self.encoder.config.to_dict()}; resume with the recipe of the interrupted run, or pass --overwrite"
            )
        changed = {
            name: (state["config"].get(name), getattr(self.config, name))
            for name in TRAJECTORY_SETTINGS
            if state["config"].get(name) != getattr(self.config, name)
        }
        if changed:
            described = ", ".join(f"train.{name} {before!r} -> {now!r}" for name, (before, now) in changed.items())
            raise TrainingError(
                f"the recipe changed since the checkpoint was written ({described}); resume with the recipe of the "
                "interrupted run, or pass --overwrite to start again"
            )

        self.encoder.load_state_dict(state["encoder"])
        self.projector.load_state_dict(state["projector"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.start_step = int(state["step"])
        self._resume = state
        if self.rank == 0:
            logger.info("resuming training at step %d of %d", self.start_step, self.config.total_steps)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint written by :meth:`Trainer.fit` onto the CPU.

    Raises
    ------
    TrainingError
        When the file is missing or cannot be read as a checkpoint.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise TrainingError(f"checkpoint {path} not found; start the run without --resume") from None
    except Exception as error:  # torch raises several types for damaged files.
        raise TrainingError(f"checkpoint {path} could not be read ({error}); start the run again with --overwrite") from error


def _inference_batching(encoder: NeurPIREncoder, batching: str | None) -> str:
    """Choose the batching for embedding: population wherever it gives this encoder's embeddings."""
    if batching is not None:
        return batching
    config = encoder.config
    return "population" if config.batching == "population" or config.batchings_agree else "per-target"


def embedding_batch_count(encoder: NeurPIREncoder, data: WindowData, *, batch_size: int = 256, batching: str | None = None) -> int:
    """Return the number of forward passes :func:`embed_neurons` makes, for progress bars."""
    if _inference_batching(encoder, batching) == "population":
        return len(data.population_batches(batch_size))
    return math.ceil(int(data.valid.sum()) / batch_size)


def _per_target_batches(data: WindowData, batch_size: int) -> Iterator[tuple[View, np.ndarray, np.ndarray]]:
    neurons, windows = np.nonzero(data.valid)
    for start in range(0, len(neurons), batch_size):
        batch_neurons = neurons[start : start + batch_size]
        batch_windows = windows[start : start + batch_size]
        yield data.view(batch_neurons, batch_windows), batch_neurons, batch_windows


def _population_batches(data: WindowData, batch_size: int) -> Iterator[tuple[PopulationView, np.ndarray, np.ndarray]]:
    for group, windows in data.population_batches(batch_size):
        yield data.population_window_view(group, windows)


@torch.no_grad()
def embed_neurons(
    encoder: NeurPIREncoder,
    data: WindowData,
    *,
    batch_size: int = 256,
    device: str = "auto",
    precision: str = "auto",
    on_batch: Callable[[int, int], None] | None = None,
    batching: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Embed every valid window and average each neuron's windows.

    Parameters
    ----------
    batch_size
        Target windows per forward pass; with population batching, rows per pass,
        with at least one whole recording window.
    precision
        ``"auto"``, ``"fp32"`` or ``"bf16"``. It replaces any autocast the caller
        has entered: ``"auto"`` is bf16 on CUDA and fp32 on the CPU.
    batching
        ``"per-target"`` or ``"population"``. By default population, which encodes
        each neuron once per window, whenever it gives this encoder's embeddings:
        for a population model, and for any model with at most one spatio-temporal layer.

    Returns
    -------
    neuron_embeddings, window_embeddings
        (n_neurons, dim) float32 means over each neuron's valid windows, and
        (n_neurons, n_windows, dim) float32 window embeddings with NaN at invalid windows.
    """
    torch_device = resolve_device(device)
    dtype = autocast_dtype(precision, torch_device)
    encoder = encoder.to(torch_device).eval()
    batching = _inference_batching(encoder, batching)

    dim = encoder.config.output_dim
    window_embeddings = np.full((*data.valid.shape, dim), np.nan, dtype=np.float32)
    n_batches = embedding_batch_count(encoder, data, batch_size=batch_size, batching=batching)
    if batching == "population":
        batches = _population_batches(data, batch_size)
        embed = encoder.forward_population
    else:
        batches = _per_target_batches(data, batch_size)
        embed = encoder

    for index, (view, batch_neurons, batch_windows) in enumerate(batches):
        view = tuple(tensor.to(torch_device) for tensor in view)
        with torch.autocast(torch_device.type, dtype=dtype, enabled=dtype is not None):
            embedding = embed(*view)
        window_embeddings[batch_neurons, batch_windows] = embedding.float().cpu().numpy()
        if on_batch is not None:
            on_batch(index + 1, n_batches)

    # Invalid windows are NaN, so the mean runs over each neuron's valid windows only.
    counts = data.valid.sum(axis=1)[:, None]
    sums = np.nansum(window_embeddings, axis=1)
    neuron_embeddings = np.divide(sums, counts, out=np.zeros_like(sums), where=counts > 0)
    return neuron_embeddings.astype(np.float32), window_embeddings
