"""Population-context encoder of NeurPIR: one embedding per activity window of a target neuron.

The encoder takes the target neuron together with its k nearest spatial neighbours.
Each neuron's binned activity in a window is cut into patches of consecutive bins,
and each patch becomes one token. A temporal transformer with rotary position
encoding runs over each neuron's tokens. Spatio-temporal blocks then alternate
attention across the 1 + k neurons at each time token, with a learned embedding of
each neuron's distance bin, and attention over time within each neuron. The output
is the mean over time of the target neuron's tokens.

Method: Wu, Liao, Deng, Guo, Wang, "Neuron Platonic Intrinsic Representation From
Dynamics Using Contrastive Learning", ICLR 2025, arXiv 2502.10425.
"""

import dataclasses
import logging
import numbers
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from neurpir_nwb.model.rotary import RotaryEmbedding, apply_rotary

logger = logging.getLogger(__name__)


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

        parameters = sum(parameter.numel() for parameter in self.parameters())
        logger.debug("built NeurPIR encoder with %d parameters: %s", parameters, config.to_dict())

    @property
    def dim(self) -> int:
        """Size of the output embedding."""
        return self.config.dim

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
            Shape (batch, dim): the mean over time of the target neuron's output tokens.

        Raises
        ------
        ValueError
            When a shape or dtype does not match the configuration.
        """
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

        last = len(self.spatiotemporal_blocks) - 1
        for index, block in enumerate(self.spatiotemporal_blocks):
            # Shape (batch, neurons, patches, dim), or (batch, 1, patches, dim) after the last block.
            x = block(x, distance_bins, spatial_key_mask, target_only=index == last)

        target = self.final_norm(x[:, 0])  # (batch, patches, dim)
        return target.mean(dim=1)  # (batch, dim)
