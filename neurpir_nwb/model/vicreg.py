"""VICReg loss: variance-invariance-covariance regularisation of two views.

Bardes, Ponce, LeCun, "VICReg: Variance-Invariance-Covariance Regularization for
Self-Supervised Learning", ICLR 2022. The two views are projections of two
activity windows of the same neuron. VICReg needs no negatives because the
variance and covariance terms keep the embeddings of different neurons apart.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _variance_term(z: Tensor, target_std: float, eps: float) -> Tensor:
    std = torch.sqrt(z.var(dim=0, unbiased=True) + eps)  # (dim,)
    return F.relu(target_std - std).mean()


def _covariance_term(z: Tensor) -> Tensor:
    batch, dim = z.shape
    centred = z - z.mean(dim=0, keepdim=True)  # (batch, dim)
    covariance = centred.T @ centred / (batch - 1)  # (dim, dim)
    off_diagonal = covariance - torch.diag(torch.diagonal(covariance))  # (dim, dim)
    return off_diagonal.pow(2).sum() / dim


class VICRegLoss(nn.Module):
    """VICReg loss of two batches of projections.

    Parameters
    ----------
    invariance : float
        Weight of the invariance term, the mean squared error between the views.
    variance : float
        Weight of the variance term, a hinge on each dimension's standard deviation across the batch.
    covariance : float
        Weight of the covariance term, the squared off-diagonal covariances divided by the dimension.
    target_std : float
        Standard deviation below which the variance hinge is active.
    eps : float
        Added to the variance before the square root, so the gradient stays finite
        when a dimension collapses.
    """

    def __init__(
        self,
        invariance: float = 25.0,
        variance: float = 25.0,
        covariance: float = 1.0,
        target_std: float = 1.0,
        eps: float = 1e-4,
    ) -> None:
        super().__init__()
        for name, value in (("invariance", invariance), ("variance", variance), ("covariance", covariance)):
            if not value >= 0:
                raise ValueError(
                    f"VICReg {name} weight must be 0 or more, got {value!r}. The usual weights are 25, 25, 1"
                )
        if not target_std > 0:
            raise ValueError(f"VICReg target_std must be positive, got {target_std!r}. The usual value is 1.0")
        if not eps >= 0:
            raise ValueError(f"VICReg eps must be 0 or more, got {eps!r}. The usual value is 1e-4")

        self.invariance_weight = float(invariance)
        self.variance_weight = float(variance)
        self.covariance_weight = float(covariance)
        self.target_std = float(target_std)
        self.eps = float(eps)

    def forward(self, z_a: Tensor, z_b: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Compute the weighted loss and its unweighted terms.

        Parameters
        ----------
        z_a, z_b : Tensor
            Projections of the two views, shape (batch, dim) each, with row i of
            both coming from the same neuron. The loss is computed in float32.

        Returns
        -------
        tuple
            The weighted total, a scalar, and a dictionary of the unweighted scalar
            terms under "invariance", "variance" and "covariance". The variance
            term is averaged over the two views and the covariance term is summed
            over them.

        Raises
        ------
        ValueError
            When the views differ in shape, are not 2-D, or hold fewer than two
            samples, for which no variance across the batch exists.
        """
        if z_a.dim() != 2 or z_a.shape != z_b.shape:
            raise ValueError(
                f"VICReg needs two views of the same shape (batch, dim), got {tuple(z_a.shape)} and "
                f"{tuple(z_b.shape)}. Pass the projections of both views of each neuron"
            )
        if z_a.shape[0] < 2:
            raise ValueError(
                f"VICReg needs a batch of at least 2 samples to estimate the variance across the batch, "
                f"got {z_a.shape[0]}. Increase the batch size"
            )

        z_a = z_a.float()  # (batch, dim)
        z_b = z_b.float()  # (batch, dim)

        invariance = F.mse_loss(z_a, z_b)
        variance = (_variance_term(z_a, self.target_std, self.eps) + _variance_term(z_b, self.target_std, self.eps)) / 2
        covariance = _covariance_term(z_a) + _covariance_term(z_b)

        total = (
            self.invariance_weight * invariance
            + self.variance_weight * variance
            + self.covariance_weight * covariance
        )
        terms = {"invariance": invariance, "variance": variance, "covariance": covariance}
        return total, terms
