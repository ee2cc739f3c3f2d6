"""Rotary position encoding (RoPE) for the temporal attention of the encoder.

RoPE rotates each pair of query and key features by an angle that grows with
the token position. The dot product of a rotated query at position m and a
rotated key at position n then depends on m - n only, so attention scores depend
on the time between patches, not on their absolute position. This module pairs
feature i with feature i + head_dim / 2 (the "rotate half" layout).
"""

import torch
from torch import Tensor, nn


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the feature pairs of ``x`` by the angles whose cosine and sine are given.

    Parameters
    ----------
    x : Tensor
        Queries or keys, shape (..., seq, head_dim) with an even head_dim.
    cos, sin : Tensor
        Cosine and sine of the rotation angles, shape (seq, head_dim / 2), float32.

    Returns
    -------
    Tensor
        The rotated features, same shape and dtype as ``x``. The rotation runs in
        float32 so that bfloat16 inputs keep the angles' precision.
    """
    half = x.shape[-1] // 2
    x_float = x.float()
    first = x_float[..., :half]  # (..., seq, half)
    second = x_float[..., half:]  # (..., seq, half)

    rotated_first = first * cos - second * sin  # (..., seq, half)
    rotated_second = first * sin + second * cos  # (..., seq, half)
    return torch.cat((rotated_first, rotated_second), dim=-1).to(x.dtype)  # (..., seq, head_dim)


class RotaryEmbedding(nn.Module):
    """Rotary position encoding of one attention head's features.

    Parameters
    ----------
    head_dim : int
        Features per attention head. Must be even, because features rotate in pairs.
    base : float
        Base of the geometric sequence of rotation frequencies. Pair j turns by
        ``position * base ** (-2 j / head_dim)`` radians.
    """

    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        if head_dim <= 0 or head_dim % 2 != 0:
            raise ValueError(
                f"rotary position encoding needs a positive even head dimension, got {head_dim}. "
                "Choose dim and heads so that dim / heads is even"
            )
        if base <= 1.0:
            raise ValueError(f"rotary base must be greater than 1, got {base}. The usual value is 10000")

        self.head_dim = head_dim
        self.base = base

        exponents = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim  # (head_dim / 2,)
        inverse_frequency = base ** (-exponents)  # (head_dim / 2,)
        # Not persistent: the frequencies follow from head_dim and base, so checkpoints need not store them.
        self.register_buffer("inverse_frequency", inverse_frequency, persistent=False)

    def angles(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """Compute the cosine and sine of the rotation angles at the given positions.

        Parameters
        ----------
        positions : Tensor
            Token positions, shape (seq,), integer or float.

        Returns
        -------
        tuple of Tensor
            Cosine and sine, each of shape (seq, head_dim / 2), float32.
        """
        inverse_frequency = self.inverse_frequency.to(device=positions.device, dtype=torch.float32)
        angle = positions.to(torch.float32)[:, None] * inverse_frequency[None, :]  # (seq, head_dim / 2)
        return torch.cos(angle), torch.sin(angle)

    def forward(self, x: Tensor, positions: Tensor | None = None) -> Tensor:
        """Rotate queries or keys by their token positions.

        Parameters
        ----------
        x : Tensor
            Queries or keys, shape (..., seq, head_dim).
        positions : Tensor, optional
            Token positions, shape (seq,). Defaults to 0, 1, ..., seq - 1.

        Returns
        -------
        Tensor
            The rotated features, same shape and dtype as ``x``.
        """
        if x.shape[-1] != self.head_dim:
            raise ValueError(
                f"rotary position encoding was built for head dimension {self.head_dim}, "
                f"got features of size {x.shape[-1]}. Pass tensors of shape (..., seq, {self.head_dim})"
            )

        seq = x.shape[-2]
        if positions is None:
            positions = torch.arange(seq, device=x.device)
        elif positions.shape != (seq,):
            raise ValueError(
                f"positions must have shape ({seq},) to match the sequence length, got {tuple(positions.shape)}"
            )

        cos, sin = self.angles(positions)  # (seq, head_dim / 2) each
        return apply_rotary(x, cos, sin)
