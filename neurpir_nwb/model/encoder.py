"""Population-context encoder of NeurPIR: one embedding per activity window of a target neuron.

The encoder takes the target neuron together with its k nearest spatial neighbours.
Each neuron's binned activity in a window is cut into patches of consecutive bins,
and each patch becomes one token. A temporal transformer with rotary position
encoding runs over each neuron's tokens. Spatio-temporal blocks then alternate
attention across the 1 + k neurons at each time token, with a learned embedding of
each neuron's distance bin, and attention over time within each neuron. The output
is the mean over time of the target neuron's tokens.

With ``own_embedding``, the encoder also returns the mean over time of the target's
tokens after the temporal blocks, before any spatial attention, appended to the
context embedding. That half depends on the target's own activity alone.

Two batchings compute these embeddings:

- per-target (:meth:`NeurPIREncoder.forward`, the published formulation): each
  target arrives with copies of its k neighbours' activity, so a neuron that serves
  as neighbour of k targets is encoded k + 1 times;
- population (:meth:`NeurPIREncoder.forward_population`): every neuron of a
  recording window is encoded once, and spatial attention reads each neuron's own
  k nearest neighbours through a neighbour index. Every neuron can be a target.

With at most one spatio-temporal block, both give the same embeddings. With deeper
stacks they are two different models. Per-target batching updates the neighbours'
tokens inside each target's neighbourhood, with distance bins relative to that
target. Population batching updates every neuron once, in its own neighbourhood, so
the second block reads neighbours that have already attended to their own
neighbours. Reproducing the per-target model exactly would mean running every block
but the last once per (target, neighbour) pair, which saves only the temporal
blocks. :attr:`EncoderConfig.batching` records which model a set of weights was
trained as.

Method: Wu, Liao, Deng, Guo, Wang, "Neuron Platonic Intrinsic Representation From
Dynamics Using Contrastive Learning", ICLR 2025, arXiv 2502.10425.
"""

import dataclasses
import logging
import math
import numbers
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from neurpir_nwb.model.rotary import RotaryEmbedding, apply_rotary

logger = logging.getLogger(__name__)

#: Formulations of a forward pass; see the module documentation.
BATCHING_MODES = ("per-target", "population")


@dataclass(frozen=True)
class EncoderConfig:
    """Shape of the encoder.

    Attributes
    ----------
    bins_per_patch : int
        Activity bins per token.
    patches : int
        Tokens per window, so a window spans ``bins_per_patch * patches`` bins.
    dim : int
        Width of the tokens and of the output embedding.
    heads : int
        Attention heads. ``dim / heads`` must be an even integer for the rotary encoding.
    temporal_layers : int
        Transformer blocks over time that run on each neuron before any spatial attention.
    spatiotemporal_layers : int
        Blocks of spatial attention across neurons followed by temporal attention.
    distance_bins : int
        Size of the distance-bin vocabulary. Bin 0 is reserved for the target
        neuron and neighbours use bins 1 to ``distance_bins - 1``.
    mlp_ratio : float
        Hidden width of each block's MLP as a multiple of ``dim``.
    dropout : float
        Dropout probability on attention weights and residual branches during training.
    own_embedding : bool
        Append to the output the mean over time of the target's tokens after the
        temporal blocks, so the embedding has ``2 * dim`` entries: the context half
        first, then the half computed from the target's own activity alone.
    batching : str
        ``"per-target"`` or ``"population"``: the formulation the weights are
        trained with. It matters only with two or more spatio-temporal layers, where
        the two formulations differ (see the module documentation) and the encoder
        accepts only the input of its own formulation.
    """

    bins_per_patch: int = 16
    patches: int = 32
    dim: int = 128
    heads: int = 4
    temporal_layers: int = 2
    spatiotemporal_layers: int = 2
    distance_bins: int = 32
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    own_embedding: bool = False
    batching: str = "per-target"

    def __post_init__(self) -> None:
        minimum_values = {
            "bins_per_patch": 1,
            "patches": 1,
            "dim": 1,
            "heads": 1,
            "temporal_layers": 0,
            "spatiotemporal_layers": 0,
            "distance_bins": 1,
        }
        for name, minimum in minimum_values.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
                raise ValueError(
                    f"encoder {name} must be an integer of at least {minimum}, got {value!r}. "
                    f"Set it to {minimum} or more"
                )
            # Store plain ints, so that NumPy integers from array attributes still serialise to JSON.
            object.__setattr__(self, name, int(value))

        for name in ("mlp_ratio", "dropout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"encoder {name} must be a number, got {value!r}")
            object.__setattr__(self, name, float(value))

        if not isinstance(self.own_embedding, bool):
            raise ValueError(f"encoder own_embedding must be true or false, got {self.own_embedding!r}")
        if self.batching not in BATCHING_MODES:
            raise ValueError(f"encoder batching must be one of {', '.join(BATCHING_MODES)}, got {self.batching!r}")

        if self.dim % self.heads != 0:
            raise ValueError(
                f"encoder dim {self.dim} is not divisible by heads {self.heads}. "
                f"Choose a dim that is a multiple of {self.heads} or a number of heads that divides {self.dim}"
            )
        head_dim = self.dim // self.heads
        if head_dim % 2 != 0:
            raise ValueError(
                f"encoder head dimension dim / heads = {self.dim} / {self.heads} = {head_dim} is odd, "
                "but rotary position encoding needs an even head dimension. "
                f"Use dim {self.heads * (head_dim + 1)} or change heads"
            )

        if not self.mlp_ratio > 0:
            raise ValueError(f"encoder mlp_ratio must be positive, got {self.mlp_ratio!r}. The usual value is 4.0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"encoder dropout must be in [0, 1), got {self.dropout!r}. Use 0.0 to disable dropout")

    @property
    def output_dim(self) -> int:
        """Size of the embedding the encoder returns."""
        return 2 * self.dim if self.own_embedding else self.dim

    @property
    def batchings_agree(self) -> bool:
        """Whether per-target and population batching give the same embeddings: at most one spatio-temporal layer."""
        return self.spatiotemporal_layers <= 1

    @property
    def head_dim(self) -> int:
        """Features per attention head."""
        return self.dim // self.heads

    def to_dict(self) -> dict[str, Any]:
        """Return the configuration as a plain dictionary, for JSON or YAML."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "EncoderConfig":
        """Build a configuration from a dictionary written by :meth:`to_dict`.

        Raises
        ------
        ValueError
            When the dictionary has keys that are not configuration fields, or a
            value fails the checks of the constructor.
        """
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"unknown encoder configuration keys {unknown}. The known keys are {sorted(known)}. "
                "Remove the unknown keys, or use the neurpir-nwb version that wrote them"
            )
        return cls(**values)


class MultiHeadAttention(nn.Module):
    """Multi-head self-attention with optional rotary positions and an optional key mask."""

    def __init__(self, dim: int, heads: int, dropout: float, rotary: bool) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.rotary = RotaryEmbedding(self.head_dim) if rotary else None

    def forward(self, x: Tensor, key_mask: Tensor | None = None) -> Tensor:
        """Attend over the sequence axis of ``x``.

        Parameters
        ----------
        x : Tensor
            Tokens, shape (n, seq, dim).
        key_mask : Tensor, optional
            Bool, shape (n, seq). False marks keys that no query may attend to.
            Every row needs at least one True entry.

        Returns
        -------
        Tensor
            Shape (n, seq, dim).
        """
        n, seq, dim = x.shape

        qkv = self.qkv(x).reshape(n, seq, 3, self.heads, self.head_dim)  # (n, seq, 3, heads, head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (n, heads, seq, head_dim)

        if self.rotary is not None:
            positions = torch.arange(seq, device=x.device)  # (seq,)
            cos, sin = self.rotary.angles(positions)  # (seq, head_dim / 2) each
            query = apply_rotary(query, cos, sin)  # (n, heads, seq, head_dim)
            key = apply_rotary(key, cos, sin)  # (n, heads, seq, head_dim)

        attention_mask = None if key_mask is None else key_mask[:, None, None, :]  # (n, 1, 1, seq)
        attended = F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=attention_mask,
            dropout_p=self.dropout if self.training else 0.0,
        )  # (n, heads, seq, head_dim)

        attended = attended.transpose(1, 2).reshape(n, seq, dim)  # (n, seq, dim)
        return self.out(attended)


class TransformerBlock(nn.Module):
    """Pre-norm residual block: attention, then an MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float, rotary: bool) -> None:
        super().__init__()
        hidden = max(1, round(dim * mlp_ratio))
        self.attention_norm = nn.LayerNorm(dim)
        self.attention = MultiHeadAttention(dim, heads, dropout, rotary)
        self.attention_dropout = nn.Dropout(dropout)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, dim),
            nn.Dropout(dropout),
        )

    def forward(self, x: Tensor, key_mask: Tensor | None = None) -> Tensor:
        """Update tokens of shape (n, seq, dim), attending only to keys where ``key_mask`` (bool, (n, seq)) is True."""
        x = x + self.attention_dropout(self.attention(self.attention_norm(x), key_mask))  # (n, seq, dim)
        x = x + self.mlp(self.mlp_norm(x))  # (n, seq, dim)
        return x


#: Token features (rows * patches * dim) that population batching runs through a block at a
#: time on the CPU. Chunks of this size keep a chunk's activations in the processor cache,
#: which speeds up the matrix products. The result does not depend on the chunk size.
# NOTE: 2**19 (2 MiB of float32 tokens) measured fastest on one Zen 4 CPU with 1 MiB of L2 cache per core.
# Other CPUs may prefer another size.
POPULATION_CHUNK_FEATURES = 2**19


def _row_chunks(n_rows: int, features_per_row: int, device: torch.device, workers: int = 1) -> list[slice]:
    """Split ``n_rows`` rows into consecutive slices of equal size for population batching.

    On the CPU each slice has at most :data:`POPULATION_CHUNK_FEATURES` token
    features, and the number of slices is a multiple of ``workers`` where there
    are enough rows, so that worker threads get equal shares. Other devices run
    all rows at once, because a GPU runs small matrix products below its full
    speed. With no rows, return one empty slice, so that the shapes of an empty
    batch still flow through.
    """
    n_rows = max(n_rows, 1)
    if device.type != "cpu":
        return [slice(0, n_rows)]
    maximum = max(1, POPULATION_CHUNK_FEATURES // max(1, features_per_row))
    count = min(n_rows, workers * math.ceil(n_rows / maximum / workers))
    size = math.ceil(n_rows / count)
    return [slice(start, start + size) for start in range(0, n_rows, size)]


#: Thread pools of population inference on the CPU, by (pid, workers, threads per worker).
_CHUNK_POOLS: dict[tuple[int, int, int], ThreadPoolExecutor] = {}


def _chunk_pool(workers: int, threads: int) -> ThreadPoolExecutor:
    """Return a pool of ``workers`` threads whose operators each use ``threads`` threads.

    ``torch.set_num_threads`` in a worker also changes the default that threads
    started later inherit, so the calling thread sets its own count again once
    every worker has started.
    """
    key = (os.getpid(), workers, threads)
    pool = _CHUNK_POOLS.get(key)
    if pool is not None:
        return pool

    # A new thread count replaces the pools of earlier counts, so that their threads do not pile up.
    for old_key in [old_key for old_key in _CHUNK_POOLS if old_key[0] == key[0]]:
        _CHUNK_POOLS.pop(old_key).shutdown(wait=False)

    calling_threads = torch.get_num_threads()
    pool = ThreadPoolExecutor(workers, thread_name_prefix="neurpir-chunks", initializer=torch.set_num_threads, initargs=(threads,))
    started = threading.Barrier(workers)
    # Each task waits for the others, so the pool has to start all its workers before any task returns.
    list(pool.map(lambda _: started.wait(timeout=60.0), range(workers)))
    torch.set_num_threads(calling_threads)

    _CHUNK_POOLS[key] = pool
    return pool


def _run_row_chunks(function: Callable[[slice], Tensor], n_rows: int, features_per_row: int, device: torch.device) -> Tensor:
    """Apply ``function`` to consecutive slices of ``n_rows`` rows and join the outputs along the first axis.

    In inference on a CPU with several intra-op threads, the slices run at once in
    worker threads of one intra-op thread each, with the caller's grad, inference
    and autocast modes. Whole slices on separate cores waste less time than
    operators split over the cores, because most operators of population batching
    are small. On a Zen 4 CPU, scaled_dot_product_attention at these shapes even
    ran slower on two threads than on one. Matrix products may round differently
    on one thread than on several, within float tolerance. Training runs the
    slices in turn, so that dropout draws its random numbers in a fixed order.
    """
    threads = torch.get_num_threads()
    workers = threads if device.type == "cpu" and not torch.is_grad_enabled() else 1
    chunks = _row_chunks(n_rows, features_per_row, device, workers)
    workers = min(workers, len(chunks))

    if workers < 2:
        parts = [function(chunk) for chunk in chunks]
    else:
        autocast_dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
        inference = torch.is_inference_mode_enabled()

        def run(chunk: slice) -> Tensor:
            with torch.inference_mode(inference), torch.no_grad():
                with torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    return function(chunk)

        parts = list(_chunk_pool(workers, max(1, threads // workers)).map(run, chunks))

    return parts[0] if len(parts) == 1 else torch.cat(parts)


# A forked child has none of the parent's worker threads, so it starts its own pools.
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_CHUNK_POOLS.clear)


class _PopulationProjections(NamedTuple):
    """Projections that population batching computes once per window, for every neuron and distance bin.

    Attributes
    ----------
    x_centred : Tensor
        Float32, shape (neurons, patches, dim): each token minus its mean over features.
    inverse_scale : Tensor
        Float32, shape (neurons, patches, distance_bins): 1 / s of each token with each distance bin's embedding added.
    key, value : Tensor
        Shape (neurons, patches, heads, head_dim): the neurons' parts of the keys and values.
    bins : Tensor
        Shape (distance_bins, 3 * dim): each distance bin's part of the queries, keys and values.
    offset : Tensor
        Shape (3 * dim,): the layer norm's bias projected, with the projection's bias.
    query_weight : Tensor
        Shape (dim, dim): the query weight with the layer norm's gain folded in.
    """

    x_centred: Tensor
    inverse_scale: Tensor
    key: Tensor
    value: Tensor
    bins: Tensor
    offset: Tensor
    query_weight: Tensor


class SpatioTemporalBlock(nn.Module):
    """Spatial attention across neurons at each time token, then temporal attention within each neuron.

    Before the spatial attention, a learned embedding of each neuron's distance bin
    is added to all of that neuron's tokens.
    """

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.distance_embedding = nn.Embedding(config.distance_bins, config.dim)
        nn.init.normal_(self.distance_embedding.weight, std=0.02)
        self.spatial = TransformerBlock(config.dim, config.heads, config.mlp_ratio, config.dropout, rotary=False)
        self.temporal = TransformerBlock(config.dim, config.heads, config.mlp_ratio, config.dropout, rotary=True)

    def forward(self, x: Tensor, distance_bins: Tensor, spatial_key_mask: Tensor, target_only: bool) -> Tensor:
        """Update the tokens of the target and its neighbours.

        Parameters
        ----------
        x : Tensor
            Tokens, shape (batch, neurons, patches, dim).
        distance_bins : Tensor
            Long, shape (batch, neurons).
        spatial_key_mask : Tensor
            Bool, shape (batch * patches, neurons). False marks padded neighbours.
        target_only : bool
            Run the temporal attention on the target neuron only and return its
            tokens alone. The last block uses this because only the target's tokens
            reach the output.

        Returns
        -------
        Tensor
            Shape (batch, neurons, patches, dim), or (batch, 1, patches, dim) with ``target_only``.
        """
        batch, neurons, patches, dim = x.shape

        x = x + self.distance_embedding(distance_bins)[:, :, None, :]  # (batch, neurons, patches, dim)

        spatial = x.transpose(1, 2).reshape(batch * patches, neurons, dim)  # (batch * patches, neurons, dim)
        spatial = self.spatial(spatial, spatial_key_mask)  # (batch * patches, neurons, dim)
        x = spatial.reshape(batch, patches, neurons, dim).transpose(1, 2)  # (batch, neurons, patches, dim)

        if target_only:
            x = x[:, :1]  # (batch, 1, patches, dim)
        kept_neurons = x.shape[1]

        temporal = x.reshape(batch * kept_neurons, patches, dim)  # (batch * kept_neurons, patches, dim)
        temporal = self.temporal(temporal)  # (batch * kept_neurons, patches, dim)
        return temporal.reshape(batch, kept_neurons, patches, dim)

    def forward_population(self, x: Tensor, neighbours: Tensor, distance_bins: Tensor, rows: Tensor) -> Tensor:
        """Update the tokens of ``rows``, each attending to itself and its own neighbours.

        Row ``i`` gets the output that :meth:`forward` gives the target of a
        neighbourhood made of neuron ``i`` and its neighbours. Every neuron's keys
        and values are projected first; then the rows run through the spatial
        attention, its MLP and the temporal attention in chunks (see
        :data:`POPULATION_CHUNK_FEATURES`), which do not change the result.

        Parameters
        ----------
        x : Tensor
            Tokens of every neuron of the window, shape (neurons, patches, dim).
        neighbours : Tensor
            Long, shape (neurons, k): the row of each neighbour in ``x``, or -1 where
            a neighbour is absent.
        distance_bins : Tensor
            Long, shape (neurons, k): the distance bin of each neighbour.
        rows : Tensor
            Long, shape (rows,): the neurons whose tokens to update.

        Returns
        -------
        Tensor
            Shape (rows, patches, dim).
        """
        member_present = torch.cat((torch.ones_like(rows[:, None], dtype=torch.bool), neighbours[rows] >= 0), dim=1)
        members = torch.cat((rows[:, None], neighbours[rows].clamp(min=0)), dim=1)  # (rows, 1 + k)
        member_bins = torch.cat((torch.zeros_like(rows[:, None]), distance_bins[rows]), dim=1)  # (rows, 1 + k)
        member_bins = member_bins.masked_fill(~member_present, 0)  # (rows, 1 + k)

        projections = self._population_projections(x)

        def update(chunk: slice) -> Tensor:
            spatial = self._spatial_population(x, projections, members[chunk], member_bins[chunk], member_present[chunk])
            return self.temporal(spatial)  # (chunk rows, patches, dim)

        return _run_row_chunks(update, len(rows), x.shape[1] * x.shape[2], x.device)  # (rows, patches, dim)

    def _population_projections(self, x: Tensor) -> _PopulationProjections:
        """Project every neuron's tokens and every distance bin once, for :meth:`_spatial_population`.

        In per-target batching, the keys and values of member m come from
        ``LayerNorm(x_m + e_b) @ W``, with e_b the embedding of m's distance bin b
        relative to the target, so they differ per (target, member) pair. With
        centred vectors ``xc = x - mean(x)`` and ``ec = e - mean(e)``,
        ``LayerNorm(x + e) = (xc + ec) / s * gamma + beta``, where the scalar
        ``s = sqrt(var(x) + var(e) + 2 mean(xc * ec) + eps)``. So
        ``LayerNorm(x + e) @ W = (xc @ Wg + ec @ Wg) / s + beta @ W``, with
        ``Wg = gamma * W`` the weight with the layer norm's gain folded in: one
        projection per neuron and one per distance bin, combined per pair with s.
        """
        norm = self.spatial.attention_norm
        attention = self.spatial.attention
        n_neurons, patches, dim = x.shape
        heads, head_dim = attention.heads, attention.head_dim
        table = self.distance_embedding.weight  # (distance_bins, dim)
        weight = attention.qkv.weight * norm.weight  # (3 * dim, dim): Wg, the gain scales each input feature

        # 1 / s of every (neuron, patch, distance bin), in float32 whatever the autocast dtype.
        with torch.autocast(x.device.type, enabled=False):
            x_float = x.float()
            x_centred = x_float - x_float.mean(dim=-1, keepdim=True)  # (neurons, patches, dim)
            table_float = table.float()
            table_centred = table_float - table_float.mean(dim=-1, keepdim=True)  # (distance_bins, dim)
            x_variance = torch.linalg.vector_norm(x_centred, dim=-1).square() / dim  # (neurons, patches)
            variances = x_variance.reshape(-1, 1) + (table_centred.pow(2).mean(dim=-1) + norm.eps)
            variances = torch.addmm(variances, x_centred.reshape(-1, dim), table_centred.T, alpha=2.0 / dim)
            inverse_scale = torch.rsqrt(variances).reshape(n_neurons, patches, len(table))  # (neurons, patches, distance_bins)

        key = F.linear(x_centred, weight[dim : 2 * dim]).view(n_neurons, patches, heads, head_dim)
        value = F.linear(x_centred, weight[2 * dim :]).view(n_neurons, patches, heads, head_dim)
        bins = F.linear(table_centred, weight)  # (distance_bins, 3 * dim)
        offset = F.linear(norm.bias, attention.qkv.weight, attention.qkv.bias)  # (3 * dim,): beta @ W + b
        return _PopulationProjections(x_centred, inverse_scale, key, value, bins, offset, weight[:dim])

    def _spatial_population(
        self, x: Tensor, projections: _PopulationProjections, members: Tensor, member_bins: Tensor, member_present: Tensor
    ) -> Tensor:
        """Run the spatial block for the first member of each row of ``members``, attending to all its members.

        The keys and values of each (row, member) pair combine the member's
        projection and its distance bin's projection with the pair's 1 / s (see
        :meth:`_population_projections`). The attention applies 1 / s to each pair's
        score and to its attention weight instead of to the key and value vectors.
        It gathers one neighbour slot at a time, so no (rows, patches, 1 + k, dim)
        tensor is built. The key offset ``beta @ W`` adds the same score to every key
        of a query, which softmax removes, and the value offset adds a constant,
        since the weights sum to 1. scaled_dot_product_attention cannot scale each
        key's score, so this attention is written out; it is the one place that
        does not use it.

        Returns
        -------
        Tensor
            Shape (rows, patches, dim): the block's output tokens of the rows.
        """
        block = self.spatial
        attention = block.attention
        patches, dim = x.shape[1:]
        rows, size = members.shape
        heads, head_dim = attention.heads, attention.head_dim
        bin_key = projections.bins[:, dim : 2 * dim].reshape(-1, 1, heads, head_dim)  # (distance_bins, 1, heads, head_dim)
        bin_value = projections.bins[:, 2 * dim :].reshape(-1, 1, heads, head_dim)  # (distance_bins, 1, heads, head_dim)
        value_offset = projections.offset[2 * dim :].view(heads, head_dim)
        root = 1.0 / math.sqrt(head_dim)

        # The query is the row's own token with distance bin 0, as the target's in per-target batching. It is
        # projected like the keys, (xc @ Wg + ec_0 @ Wg) / s_0 + beta @ W + b, and scaled by 1 / sqrt(head_dim).
        own = members[:, 0]  # (rows,)
        query = F.linear(projections.x_centred.index_select(0, own), projections.query_weight, projections.bins[0, :dim])
        query = torch.addcmul(projections.offset[:dim] * root, query, projections.inverse_scale[own, :, :1] * root)
        query = query.view(rows, patches, heads, head_dim).to(projections.key.dtype)  # (rows, patches, heads, head_dim)

        scores = []
        member_scales = []
        for slot in range(size):
            member, bins = members[:, slot], member_bins[:, slot]  # (rows,) each
            key = projections.key.index_select(0, member)  # (rows, patches, heads, head_dim)
            key += bin_key.index_select(0, bins)
            scale = projections.inverse_scale[member, :, bins][..., None]  # (rows, patches, 1)
            scores.append((query * key).sum(dim=-1) * scale)  # (rows, patches, heads)
            member_scales.append(scale)

        # Slots first, so that the softmax and the weighted sum run over whole (rows, patches, heads) blocks.
        scores = torch.stack(scores)  # (1 + k, rows, patches, heads)
        scores = scores.masked_fill(~member_present.T[:, :, None, None], float("-inf"))
        weights = torch.softmax(scores.float(), dim=0)  # (1 + k, rows, patches, heads)
        weights = F.dropout(weights, attention.dropout, self.training)
        weights = weights * torch.stack(member_scales)  # (1 + k, rows, patches, heads)

        def slot_values(slot: int) -> Tensor:
            """Gather the values of one neighbour slot, with their distance bins' part: (rows, patches, heads, head_dim)."""
            value = projections.value.index_select(0, members[:, slot])
            value += bin_value.index_select(0, member_bins[:, slot])
            return value

        attended = torch.addcmul(value_offset, weights[0, ..., None], slot_values(0))  # (rows, patches, heads, head_dim)
        for slot in range(1, size):
            attended.addcmul_(weights[slot, ..., None], slot_values(slot))
        attended = attention.out(attended.reshape(rows, patches, dim))  # (rows, patches, dim)

        tokens = x.index_select(0, own) + self.distance_embedding.weight[0]  # (rows, patches, dim)
        tokens = tokens + block.attention_dropout(attended)  # (rows, patches, dim)
        return tokens + block.mlp(block.mlp_norm(tokens))  # (rows, patches, dim)


class NeurPIREncoder(nn.Module):
    """Encoder of a target neuron's activity window in the context of its spatial neighbours.

    Parameters
    ----------
    config : EncoderConfig
        Shape of the encoder.

    Notes
    -----
    Padded neighbours do not change the output: their activity is replaced with
    zeros, they are masked out as keys of the spatial attention, and the temporal
    attention never mixes neurons. The target (index 0) is always attended to,
    whatever ``present[:, 0]`` holds.
    """

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_embedding = nn.Linear(config.bins_per_patch, config.dim)
        self.temporal_blocks = nn.ModuleList(
            TransformerBlock(config.dim, config.heads, config.mlp_ratio, config.dropout, rotary=True)
            for _ in range(config.temporal_layers)
        )
        self.spatiotemporal_blocks = nn.ModuleList(
            SpatioTemporalBlock(config) for _ in range(config.spatiotemporal_layers)
        )
        self.final_norm = nn.LayerNorm(config.dim)
        self.own_norm = nn.LayerNorm(config.dim) if config.own_embedding else None

        parameters = sum(parameter.numel() for parameter in self.parameters())
        logger.debug("built NeurPIR encoder with %d parameters: %s", parameters, config.to_dict())

    @property
    def dim(self) -> int:
        """Size of the output embedding."""
        return self.config.output_dim

    def _validate_inputs(self, activity: Tensor, distance_bins: Tensor, present: Tensor) -> None:
        config = self.config
        expected_window = (config.patches, config.bins_per_patch)

        if activity.dim() != 4 or tuple(activity.shape[2:]) != expected_window:
            raise ValueError(
                f"activity must have shape (batch, 1 + k, {config.patches}, {config.bins_per_patch}) "
                f"for this encoder, got {tuple(activity.shape)}. Cut windows into {config.patches} patches "
                f"of {config.bins_per_patch} bins"
            )
        if activity.shape[1] < 1:
            raise ValueError("activity has no neuron along dimension 1. Index 0 must hold the target neuron")
        if not activity.is_floating_point():
            raise ValueError(
                f"activity must be a floating-point tensor, got {activity.dtype}. Convert it with .float()"
            )

        neurons_shape = tuple(activity.shape[:2])
        if tuple(distance_bins.shape) != neurons_shape:
            raise ValueError(
                f"distance_bins must have shape {neurons_shape} to match activity, got {tuple(distance_bins.shape)}"
            )
        if distance_bins.dtype != torch.long:
            raise ValueError(f"distance_bins must be a long tensor, got {distance_bins.dtype}. Convert it with .long()")
        if tuple(present.shape) != neurons_shape:
            raise ValueError(f"present must have shape {neurons_shape} to match activity, got {tuple(present.shape)}")
        if present.dtype != torch.bool:
            raise ValueError(f"present must be a bool tensor, got {present.dtype}. Convert it with .bool()")

    def forward(self, activity: Tensor, distance_bins: Tensor, present: Tensor) -> Tensor:
        """Embed a batch of windows, one per target neuron.

        Parameters
        ----------
        activity : Tensor
            Float, shape (batch, 1 + k, patches, bins_per_patch). Index 0 along
            dimension 1 is the target neuron and 1 to k are its neighbours.
        distance_bins : Tensor
            Long, shape (batch, 1 + k). 0 for the target and 1 to
            ``distance_bins - 1`` for neighbours. Values out of range raise an
            IndexError on CPU and a device-side assertion on CUDA.
        present : Tensor
            Bool, shape (batch, 1 + k). False marks padding, for a neighbourhood
            with fewer than k neighbours.

        Returns
        -------
        Tensor
            Shape (batch, dim): the mean over time of the target neuron's output
            tokens. With ``own_embedding``, shape (batch, 2 * dim): that context
            embedding, then the mean over time of the target's tokens after the
            temporal blocks.

        Raises
        ------
        ValueError
            When a shape or dtype does not match the configuration, or when the
            encoder is a population model with two or more spatio-temporal layers,
            whose embeddings need every neuron of the window: use
            :meth:`forward_population` for those.
        """
        if self.config.batching == "population" and not self.config.batchings_agree:
            raise ValueError(
                f"this encoder was trained with population batching and {self.config.spatiotemporal_layers} "
                "spatio-temporal layers, so its embeddings depend on the neighbours of neighbours, which a "
                "per-target batch lacks. Call forward_population with every neuron of the window"
            )
        self._validate_inputs(activity, distance_bins, present)
        batch, neurons, patches, _ = activity.shape
        dim = self.config.dim

        # The target always counts as present, so every spatial query has at least one key.
        target_column = torch.ones_like(present[:, :1])  # (batch, 1)
        key_present = torch.cat((target_column, present[:, 1:]), dim=1)  # (batch, neurons)

        # Zeroing padded activity keeps NaN or stale values in padding out of every later sum.
        padding = ~key_present[:, :, None, None]  # (batch, neurons, 1, 1)
        activity = activity.masked_fill(padding, 0.0)  # (batch, neurons, patches, bins_per_patch)

        spatial_key_mask = key_present[:, None, :].expand(batch, patches, neurons)  # (batch, patches, neurons)
        spatial_key_mask = spatial_key_mask.reshape(batch * patches, neurons)  # (batch * patches, neurons)

        x = self.patch_embedding(activity)  # (batch, neurons, patches, dim)

        temporal = x.reshape(batch * neurons, patches, dim)  # (batch * neurons, patches, dim)
        for block in self.temporal_blocks:
            temporal = block(temporal)  # (batch * neurons, patches, dim)
        x = temporal.reshape(batch, neurons, patches, dim)  # (batch, neurons, patches, dim)
        own = x[:, 0]  # (batch, patches, dim)

        last = len(self.spatiotemporal_blocks) - 1
        for index, block in enumerate(self.spatiotemporal_blocks):
            # Shape (batch, neurons, patches, dim), or (batch, 1, patches, dim) after the last block.
            x = block(x, distance_bins, spatial_key_mask, target_only=index == last)

        target = self.final_norm(x[:, 0]).mean(dim=1)  # (batch, dim)
        if self.own_norm is None:
            return target
        return torch.cat((target, self.own_norm(own).mean(dim=1)), dim=1)  # (batch, 2 * dim)

    def forward_population(
        self, activity: Tensor, neighbours: Tensor, distance_bins: Tensor, targets: Tensor | None = None
    ) -> Tensor:
        """Embed the targets of one or more recording windows, encoding every neuron once.

        Each row of ``activity`` is one neuron in one window. The temporal blocks run
        once per row, and the spatial attention of row i reads the rows that
        ``neighbours[i]`` names. Windows of several recordings, or several windows of
        one recording, can therefore share a batch, provided that each row's
        neighbours are rows of the same window.

        Parameters
        ----------
        activity : Tensor
            Float, shape (neurons, patches, bins_per_patch).
        neighbours : Tensor
            Long, shape (neurons, k): the row of each of the neuron's k nearest
            neighbours, nearest first, or -1 where a neighbour is absent or hidden.
        distance_bins : Tensor
            Long, shape (neurons, k): 1 to ``distance_bins - 1`` for each neighbour;
            ignored where the neighbour is -1.
        targets : Tensor, optional
            Long, shape (targets,): the rows to embed; by default every row.

        Returns
        -------
        Tensor
            Shape (targets, output_dim), row j for ``targets[j]``. With at most one
            spatio-temporal layer, each row equals what :meth:`forward` returns for
            that neuron with its neighbours' activity.

        Raises
        ------
        ValueError
            When a shape, dtype or row index does not match, or when the encoder is a
            per-target model with two or more spatio-temporal layers, whose
            embeddings this formulation does not reproduce. Indices are range-checked
            on the CPU only; on CUDA an index out of range raises a device-side
            assertion.
        """
        if self.config.batching == "per-target" and not self.config.batchings_agree:
            raise ValueError(
                f"this encoder was trained with per-target batching and {self.config.spatiotemporal_layers} "
                "spatio-temporal layers, where each neighbour is updated inside its target's neighbourhood; "
                "population batching computes a different model for such stacks. Call forward with per-target "
                "batches, or train with model.batching: population"
            )
        n_neurons = activity.shape[0]
        if targets is None:
            targets = torch.arange(n_neurons, device=activity.device)
        self._validate_population_inputs(activity, neighbours, distance_bins, targets)

        # The patch embedding and the temporal blocks treat each row alone, so they run in chunks of rows.
        def encode(chunk: slice) -> Tensor:
            part = self.patch_embedding(activity[chunk])  # (chunk rows, patches, dim)
            for block in self.temporal_blocks:
                part = block(part)  # (chunk rows, patches, dim)
            return part

        x = _run_row_chunks(encode, n_neurons, self.config.patches * self.config.dim, activity.device)  # (neurons, patches, dim)
        # The own-activity half needs only the targets' tokens at this point.
        own = None if self.own_norm is None else self.own_norm(x[targets]).mean(dim=1)  # (targets, dim)

        # Blocks before the last update every row, because later blocks read them as neighbours.
        every_row = torch.arange(n_neurons, device=activity.device)
        last = len(self.spatiotemporal_blocks) - 1
        for index, block in enumerate(self.spatiotemporal_blocks):
            rows = targets if index == last else every_row
            x = block.forward_population(x, neighbours, distance_bins, rows)  # (rows, patches, dim)
        if last < 0:
            x = x[targets]  # (targets, patches, dim)

        target = self.final_norm(x).mean(dim=1)  # (targets, dim)
        if own is None:
            return target
        return torch.cat((target, own), dim=1)  # (targets, 2 * dim)

    def _validate_population_inputs(self, activity: Tensor, neighbours: Tensor, distance_bins: Tensor, targets: Tensor) -> None:
        config = self.config
        expected_window = (config.patches, config.bins_per_patch)

        if activity.dim() != 3 or tuple(activity.shape[1:]) != expected_window:
            raise ValueError(
                f"activity must have shape (neurons, {config.patches}, {config.bins_per_patch}) for population "
                f"batching with this encoder, got {tuple(activity.shape)}"
            )
        if not activity.is_floating_point():
            raise ValueError(f"activity must be a floating-point tensor, got {activity.dtype}. Convert it with .float()")

        n_neurons = activity.shape[0]
        if neighbours.dim() != 2 or neighbours.shape[0] != n_neurons:
            raise ValueError(f"neighbours must have shape ({n_neurons}, k) to match activity, got {tuple(neighbours.shape)}")
        if tuple(distance_bins.shape) != tuple(neighbours.shape):
            raise ValueError(
                f"distance_bins must have shape {tuple(neighbours.shape)} to match neighbours, got {tuple(distance_bins.shape)}"
            )
        for name, tensor in (("neighbours", neighbours), ("distance_bins", distance_bins), ("targets", targets)):
            if tensor.dtype != torch.long:
                raise ValueError(f"{name} must be a long tensor, got {tensor.dtype}. Convert it with .long()")
        if targets.dim() != 1:
            raise ValueError(f"targets must be a 1-D tensor of row indices, got shape {tuple(targets.shape)}")

        if activity.device.type != "cpu":
            return
        if neighbours.numel() and (neighbours.min() < -1 or neighbours.max() >= n_neurons):
            raise ValueError(
                f"neighbours must hold rows 0 to {n_neurons - 1} of activity, or -1 for an absent neighbour, "
                f"got values from {int(neighbours.min())} to {int(neighbours.max())}"
            )
        if targets.numel() and (targets.min() < 0 or targets.max() >= n_neurons):
            raise ValueError(
                f"targets must hold rows 0 to {n_neurons - 1} of activity, got values from "
                f"{int(targets.min())} to {int(targets.max())}"
            )
        present = neighbours >= 0
        if present.any() and (distance_bins[present].min() < 1 or distance_bins[present].max() >= config.distance_bins):
            raise ValueError(
                f"distance_bins of present neighbours must be 1 to {config.distance_bins - 1}, got values from "
                f"{int(distance_bins[present].min())} to {int(distance_bins[present].max())}"
            )
