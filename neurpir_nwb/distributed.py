"""Training in several processes with torch.distributed: NCCL between GPUs, gloo between CPU processes.

Rank 0 runs the whole pipeline: it reads the sources, builds the segment set, and
after training it alone computes the embeddings, scores the probe and writes every
output. The other ranks only train: they wait for rank 0 to send the windows, the
recipe and, when resuming, the checkpoint, then take part in training with
DistributedDataParallel and return to waiting. Rank 0 releases them when its command
ends.

Every rank draws the same global batch from the same seed and trains on its own
contiguous share of it, so over an epoch each drawn window goes to exactly one rank.
The projections of all ranks are gathered before the loss, and the projector's
batch normalisation uses statistics of the global batch. So every rank computes the
loss of the whole global batch, which equals, up to floating-point rounding, the
loss of one process that trains on that batch.

Processes start either with ``neurpir-nwb train RECIPE --nproc N`` (one machine, see
:func:`start_local`) or with torchrun, which sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` (see :func:`start_from_environment`).
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from neurpir_nwb.errors import TrainingError

__all__ = [
    "GlobalBatchNorm1d",
    "Session",
    "current",
    "finish",
    "gather_rows",
    "launched_by_torchrun",
    "receive_training",
    "share_training",
    "start",
    "start_from_environment",
    "start_local",
    "synchronise_batch_norm",
]

logger = logging.getLogger(__name__)

#: Environment variable with the seconds that ranks wait for rank 0 between trainings.
TIMEOUT_ENV = "NEURPIR_DISTRIBUTED_TIMEOUT_S"

#: Default of that wait: rank 0 may spend hours reading and segmenting large sources first.
DEFAULT_TIMEOUT_S = 24 * 3600.0


@dataclass
class Session:
    """This process's place in a group of training processes.

    Attributes
    ----------
    rank
        Index of this process in the group, 0 to ``world_size - 1``.
    world_size
        Number of processes.
    local_rank
        Index of this process on its machine; it selects the GPU.
    backend
        ``"nccl"`` when the processes train on GPUs, ``"gloo"`` on CPUs.
    coordination
        A gloo group, with a long timeout, that carries the training inputs from rank 0.
    processes
        The processes that :func:`start_local` started for ranks 1 and above.
    healthy
        False after a collective operation failed, so that :func:`finish` does not wait for peers.
    """

    rank: int
    world_size: int
    local_rank: int
    backend: str
    coordination: Any = None
    processes: Any = None
    healthy: bool = True
    _threads_before: int | None = field(default=None, repr=False)

    @property
    def is_main(self) -> bool:
        """Whether this process is rank 0, which alone writes checkpoints and outputs."""
        return self.rank == 0

    def device(self, name: str) -> torch.device:
        """Return this rank's device for a ``train.device`` setting: its own GPU on CUDA."""
        if self.backend == "nccl" and name in ("auto", "cuda"):
            return torch.device("cuda", self.local_rank)
        if name == "cuda":
            raise TrainingError("train.device is 'cuda' but PyTorch finds no CUDA device; use 'auto' or 'cpu'")
        return torch.device("cpu")


_session: Session | None = None


def current() -> Session | None:
    """Return the session of this process, or None when it trains alone."""
    return _session


def launched_by_torchrun() -> bool:
    """Return whether torchrun, or another launcher that sets ``RANK`` and ``WORLD_SIZE``, started several processes."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def _backend_for(device_name: str) -> str:
    if device_name == "cpu" or not torch.cuda.is_available():
        return "gloo"
    return "nccl"


def _wait_timeout() -> datetime.timedelta:
    value = os.environ.get(TIMEOUT_ENV)
    if value is None:
        return datetime.timedelta(seconds=DEFAULT_TIMEOUT_S)
    try:
        seconds = float(value)
    except ValueError:
        raise TrainingError(f"{TIMEOUT_ENV} must be a number of seconds, got {value!r}") from None
    return datetime.timedelta(seconds=seconds)


def start(device_name: str, *, rank: int, world_size: int, local_rank: int, init_method: str = "env://") -> Session:
    """Join the group of training processes and return this process's session.

    Parameters
    ----------
    device_name
        The recipe's ``train.device``: ``auto`` and ``cuda`` train on GPUs with NCCL
        when CUDA is available; otherwise the processes use gloo on CPUs.
    rank, world_size, local_rank
        This process's rank, the number of processes and the rank on this machine.
    init_method
        Rendezvous address, ``env://`` for ``MASTER_ADDR`` and ``MASTER_PORT``.
    """
    global _session
    backend = _backend_for(device_name)
    if backend == "nccl":
        if local_rank >= torch.cuda.device_count():
            raise TrainingError(
                f"process {rank} has local rank {local_rank}, but this machine has {torch.cuda.device_count()} CUDA "
                "device(s); start at most one process per GPU on each machine"
            )
        torch.cuda.set_device(local_rank)

    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size)
    coordination = dist.new_group(backend="gloo", timeout=_wait_timeout())
    _session = Session(rank=rank, world_size=world_size, local_rank=local_rank, backend=backend, coordination=coordination)
    logger.info("process %d of %d joined the training group (%s)", rank, world_size, backend)
    return _session


def start_from_environment(device_name: str) -> Session:
    """Join the group that torchrun started, reading the rank and rendezvous from the environment."""
    return start(
        device_name,
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )


def _free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_local(nproc: int, device_name: str, worker: Callable[..., None], worker_args: tuple = ()) -> Session:
    """Start ``nproc - 1`` more processes on this machine and make this process rank 0 of the group.

    The others run ``worker(index, world_size, init_method, device_name, threads, *worker_args)``
    in fresh interpreters (the spawn start method), with ``index`` from 0, for ranks
    1 to ``nproc - 1``. On CPUs, each process uses ``cpu_count // nproc`` threads
    (at least 1) during training, so that the processes do not compete for cores.
    """
    import torch.multiprocessing as multiprocessing

    if _backend_for(device_name) == "nccl" and nproc > torch.cuda.device_count():
        raise TrainingError(
            f"--nproc {nproc} asks for more processes than this machine's {torch.cuda.device_count()} CUDA device(s); "
            "start at most one process per GPU"
        )
    init_method = f"tcp://127.0.0.1:{_free_port()}"
    threads = max(1, (os.cpu_count() or 1) // nproc)
    context = multiprocessing.start_processes(
        worker,
        args=(nproc, init_method, device_name, threads, *worker_args),
        nprocs=nproc - 1,
        join=False,
        start_method="spawn",
    )
    try:
        session = start(device_name, rank=0, world_size=nproc, local_rank=0, init_method=init_method)
    except BaseException:
        for process in context.processes:
            process.kill()
        raise
    session.processes = context
    session._threads_before = torch.get_num_threads()
    if session.backend == "gloo":
        torch.set_num_threads(threads)
    return session


def share_training(session: Session, payload: Any) -> None:
    """Send the training inputs from rank 0 to the other ranks, which wait in :func:`receive_training`."""
    # NOTE: the windows travel pickled in one broadcast, so each rank needs memory for a full copy, and rank 0 for two.
    objects = [payload]
    dist.broadcast_object_list(objects, src=0, group=session.coordination)


def receive_training(session: Session) -> Any:
    """Wait for rank 0's next training inputs; None means that rank 0 has finished."""
    objects = [None]
    dist.broadcast_object_list(objects, src=0, group=session.coordination)
    return objects[0]


def finish(session: Session) -> None:
    """Release the other ranks, wait for the processes that :func:`start_local` started, and leave the group.

    Raises
    ------
    TrainingError
        When one of the started processes failed.
    """
    global _session
    failed = []
    try:
        if session.is_main and session.healthy:
            share_training(session, None)
        if session.processes is not None:
            for process in session.processes.processes:
                process.join(timeout=60 if session.healthy else 5)
                if process.is_alive():
                    process.kill()
                    process.join()
            failed = [index + 1 for index, process in enumerate(session.processes.processes) if process.exitcode != 0]
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        if session._threads_before is not None:
            torch.set_num_threads(session._threads_before)
        _session = None
    if failed and session.healthy:
        raise TrainingError(f"training process(es) of rank {', '.join(map(str, failed))} failed; see their log messages above")


class _AllGather(torch.autograd.Function):
    """All-gather of equally shaped tensors whose backward pass sums every rank's gradient of this rank's piece."""

    @staticmethod
    def forward(context: Any, tensor: Tensor) -> Tensor:
        pieces = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(pieces, tensor.contiguous())
        return torch.stack(pieces)  # (world_size, ...)

    @staticmethod
    def backward(context: Any, gradient: Tensor) -> Tensor:
        gradient = gradient.contiguous()
        dist.all_reduce(gradient, op=dist.ReduceOp.SUM)
        return gradient[dist.get_rank()]


def gather_rows(tensor: Tensor) -> Tensor:
    """Concatenate every rank's rows of ``tensor`` in rank order, keeping the gradient.

    Ranks may hold different numbers of rows. The backward pass sums, for each rank's
    rows, the gradients that every rank computes for them. Since every rank computes
    the same loss of the gathered rows, each rank's gradient is ``world_size`` times
    the gradient of that loss, and DistributedDataParallel's averaging over ranks
    restores the exact gradient.
    """
    sizes = [torch.zeros(1, dtype=torch.long, device=tensor.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([tensor.shape[0]], device=tensor.device))
    counts = [int(size.item()) for size in sizes]
    largest = max(counts)

    padding = tensor.new_zeros((largest - tensor.shape[0], *tensor.shape[1:]))
    padded = torch.cat((tensor, padding), dim=0)  # (largest, ...)
    pieces = _AllGather.apply(padded)  # (world_size, largest, ...)
    return torch.cat([piece[:count] for piece, count in zip(pieces, counts)], dim=0)  # (sum of counts, ...)


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics are those of the batches of all ranks together.

    PyTorch's SyncBatchNorm needs GPUs; this one also runs with gloo on CPUs. Each
    rank's mean and variance are gathered and merged, with gradients, and outside a
    process group or in evaluation it is a plain BatchNorm1d.
    """

    def forward(self, x: Tensor) -> Tensor:
        """Normalise ``x`` of shape (batch, features) with the global batch's statistics in training."""
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)

        count = x.new_tensor([float(x.shape[0])])  # (1,)
        mean = x.mean(dim=0) if x.shape[0] else x.new_zeros(x.shape[1])  # (features,)
        variance = x.var(dim=0, unbiased=False) if x.shape[0] else x.new_zeros(x.shape[1])  # (features,)
        local = torch.cat((count, mean, variance))  # (1 + 2 * features,)
        gathered = _AllGather.apply(local)  # (world_size, 1 + 2 * features)

        counts = gathered[:, :1]  # (world_size, 1)
        means = gathered[:, 1 : 1 + x.shape[1]]  # (world_size, features)
        variances = gathered[:, 1 + x.shape[1] :]  # (world_size, features)
        total = counts.sum()
        global_mean = (counts * means).sum(dim=0) / total  # (features,)
        global_variance = (counts * (variances + (means - global_mean) ** 2)).sum(dim=0) / total  # (features,)

        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = global_variance * total / max(float(total) - 1.0, 1.0)
                self.running_mean.mul_(1 - momentum).add_(momentum * global_mean.detach())
                self.running_var.mul_(1 - momentum).add_(momentum * unbiased.detach())

        normalised = (x - global_mean) / torch.sqrt(global_variance + self.eps)  # (batch, features)
        if self.affine:
            normalised = normalised * self.weight + self.bias
        return normalised


def synchronise_batch_norm(module: nn.Module) -> nn.Module:
    """Turn every BatchNorm1d inside ``module`` into a :class:`GlobalBatchNorm1d` that keeps its parameters and buffers."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm1d) and not isinstance(child, GlobalBatchNorm1d):
            replacement = GlobalBatchNorm1d(
                child.num_features, eps=child.eps, momentum=child.momentum, affine=child.affine, track_running_stats=child.track_running_stats
            )
            if child.affine:
                replacement.weight = child.weight
                replacement.bias = child.bias
            if child.track_running_stats:
                replacement.running_mean = child.running_mean
                replacement.running_var = child.running_var
                replacement.num_batches_tracked = child.num_batches_tracked
            replacement.train(child.training)
            setattr(module, name, replacement)
        else:
            synchronise_batch_norm(child)
    return module
