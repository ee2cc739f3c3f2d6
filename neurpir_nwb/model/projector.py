"""Projector (the VICReg "expander") between the encoder and the loss.

The projector is used in training only. Embeddings for probes and NWB outputs come
from the encoder itself.
"""

from collections.abc import Sequence

import torch
from torch import Tensor, nn


class Projector(nn.Module):
    """MLP of Linear-BatchNorm-ReLU blocks with a plain Linear layer last.

    Parameters
    ----------
    in_dim : int
        Size of the encoder embedding.
    hidden : sequence of int
        Output sizes of the layers in order. The last entry is the size of the
        projection that the loss receives, so ``hidden=(512, 512)`` builds
        Linear(in_dim, 512)-BatchNorm-ReLU-Linear(512, 512).
    parts : int
        Split the embedding into this many equal parts and give each part its own
        MLP of the sizes above; the projections are concatenated. An encoder with
        an own-activity half uses 2, so that VICReg trains each half on its own.

    Notes
    -----
    BatchNorm needs at least two samples per batch in training mode.
    """

    def __init__(self, in_dim: int, hidden: Sequence[int], parts: int = 1) -> None:
        super().__init__()
        sizes = list(hidden)
        if isinstance(in_dim, bool) or not isinstance(in_dim, int) or in_dim < 1:
            raise ValueError(f"projector in_dim must be a positive integer, got {in_dim!r}. Pass the encoder dim")
        if not sizes:
            raise ValueError("projector hidden sizes are empty. Give at least one layer size, for example (512, 512)")
        invalid = [size for size in sizes if isinstance(size, bool) or not isinstance(size, int) or size < 1]
        if invalid:
            raise ValueError(f"projector hidden sizes must be positive integers, got {invalid!r} in {sizes!r}")
        if isinstance(parts, bool) or not isinstance(parts, int) or parts < 1 or in_dim % parts:
            raise ValueError(f"projector parts must be a positive integer that divides in_dim {in_dim}, got {parts!r}")

        self.in_dim = in_dim
        self.parts = parts
        self.out_dim = parts * sizes[-1]
        self.layers = _mlp(in_dim // parts, sizes)
        # The first part uses `layers`, so a one-part projector keeps its plain layout.
        self.extra_parts = nn.ModuleList(_mlp(in_dim // parts, sizes) for _ in range(parts - 1))

    def forward(self, embedding: Tensor) -> Tensor:
        """Project embeddings of shape (batch, in_dim) to shape (batch, out_dim)."""
        if self.parts == 1:
            return self.layers(embedding)
        chunks = embedding.chunk(self.parts, dim=1)  # parts x (batch, in_dim / parts)
        projections = [self.layers(chunks[0])]
        projections += [mlp(chunk) for mlp, chunk in zip(self.extra_parts, chunks[1:])]
        return torch.cat(projections, dim=1)  # (batch, out_dim)


def _mlp(in_dim: int, sizes: list[int]) -> nn.Sequential:
    """Build Linear-BatchNorm-ReLU blocks of the given sizes, with a plain Linear layer last."""
    layers: list[nn.Module] = []
    widths = [in_dim, *sizes]
    for width_in, width_out in zip(widths[:-2], widths[1:-1]):
        layers.append(nn.Linear(width_in, width_out))
        layers.append(nn.BatchNorm1d(width_out))
        layers.append(nn.ReLU(inplace=True))
    layers.append(nn.Linear(widths[-2], widths[-1]))
    return nn.Sequential(*layers)
