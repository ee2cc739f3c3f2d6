"""Tests of the VICReg loss and the projector, with expected values worked out by hand."""

import math

import pytest
import torch

from neurpir_nwb.model import Projector, VICRegLoss


def test_vicreg_terms_match_hand_arithmetic():
    # View a: column 0 is (0, 0.5, 1), mean 0.5, unbiased variance (0.25 + 0 + 0.25) / 2 = 0.25, std 0.5.
    #         column 1 is (0, 0.5, -0.5), mean 0, unbiased variance (0 + 0.25 + 0.25) / 2 = 0.25, std 0.5.
    #         covariance of the columns: ((-0.5)(0) + (0)(0.5) + (0.5)(-0.5)) / 2 = -0.125.
    # View b: column 0 is constant, std 0. Column 1 is (0, 2, 4), mean 2, variance (4 + 0 + 4) / 2 = 4, std 2.
    #         covariance of the columns: 0, because column 0 does not vary.
    z_a = torch.tensor([[0.0, 0.0], [0.5, 0.5], [1.0, -0.5]])
    z_b = torch.tensor([[0.0, 0.0], [0.0, 2.0], [0.0, 4.0]])

    loss = VICRegLoss(invariance=25.0, variance=25.0, covariance=1.0, target_std=1.0, eps=0.0)
    total, terms = loss(z_a, z_b)

    # Squared differences: row 0 (0, 0), row 1 (0.25, 2.25), row 2 (1.0, 20.25), averaged over 6 entries.
    expected_invariance = (0.0 + 0.0 + 0.25 + 2.25 + 1.0 + 20.25) / 6
    # Hinges relu(1 - std): view a (0.5, 0.5) with mean 0.5, view b (1.0, 0.0) with mean 0.5.
    expected_variance = (0.5 + 0.5) / 2
    # Off-diagonal entries of view a: two of -0.125, so (0.015625 + 0.015625) / 2 dimensions. View b adds 0.
    expected_covariance = (0.015625 + 0.015625) / 2 + 0.0
    expected_total = 25.0 * expected_invariance + 25.0 * expected_variance + 1.0 * expected_covariance

    assert terms["invariance"].item() == pytest.approx(expected_invariance, rel=1e-6)
    assert terms["variance"].item() == pytest.approx(expected_variance, rel=1e-6)
    assert terms["covariance"].item() == pytest.approx(expected_covariance, rel=1e-6)
    assert total.item() == pytest.approx(111.4739583333, rel=1e-6)
    assert total.item() == pytest.approx(expected_total, rel=1e-6)


def test_vicreg_weights_scale_terms():
    z_a = torch.tensor([[0.0, 0.0], [0.5, 0.5], [1.0, -0.5]])
    z_b = torch.tensor([[0.0, 0.0], [0.0, 2.0], [0.0, 4.0]])

    total, _ = VICRegLoss(invariance=1.0, variance=0.0, covariance=0.0, eps=0.0)(z_a, z_b)
    assert total.item() == pytest.approx(23.75 / 6, rel=1e-6)

    total, _ = VICRegLoss(invariance=0.0, variance=2.0, covariance=0.0, eps=0.0)(z_a, z_b)
    assert total.item() == pytest.approx(2.0 * 0.5, rel=1e-6)

    total, _ = VICRegLoss(invariance=0.0, variance=0.0, covariance=3.0, eps=0.0)(z_a, z_b)
    assert total.item() == pytest.approx(3.0 * 0.015625, rel=1e-6)


def test_vicreg_identical_views_invariance_zero():
    z = torch.tensor([[1.0, -2.0, 0.5], [3.0, 0.0, -1.0], [0.0, 1.0, 2.0], [-1.0, 4.0, 0.0]])

    _, terms = VICRegLoss()(z, z.clone())

    assert terms["invariance"].item() == 0.0


def test_vicreg_collapsed_embeddings_variance():
    # Every row equal: the variance is 0, so each dimension's std is sqrt(eps) = sqrt(1e-4) = 0.01.
    collapsed = torch.full((4, 3), 0.7)

    _, terms = VICRegLoss(target_std=1.0, eps=1e-4)(collapsed, collapsed)
    assert terms["variance"].item() == pytest.approx(1.0 - 0.01, rel=1e-6)
    assert terms["covariance"].item() == 0.0

    _, terms = VICRegLoss(target_std=2.0, eps=1e-4)(collapsed, collapsed)
    assert terms["variance"].item() == pytest.approx(2.0 - 0.01, rel=1e-6)


def test_vicreg_variance_hinge_inactive_above_target():
    # Columns (0, 2) and (0, -2): unbiased variance (1 + 1) / 1 = 2, std about 1.414, above target 1.
    z = torch.tensor([[0.0, 0.0], [2.0, -2.0]])

    _, terms = VICRegLoss(target_std=1.0)(z, z)

    assert terms["variance"].item() == 0.0


def test_vicreg_decorrelated_inputs_covariance_zero():
    # Centred columns (1, 1, -1, -1) and (1, -1, 1, -1) are orthogonal.
    z = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])

    _, terms = VICRegLoss()(z, z)

    assert terms["covariance"].item() == 0.0


def test_vicreg_covariance_sums_both_views():
    # View a: columns (0, 1, 2) and (0, 1, 2), unbiased variance 1 each and covariance 1.
    #         Off-diagonal squares 1 + 1, divided by 2 dimensions, give 1.
    # View b: columns (1, 1, -1) and (1, -1, 1), both with mean 1/3, centred (2/3, 2/3, -4/3) and
    #         (2/3, -4/3, 2/3). Covariance (4/9 - 8/9 - 8/9) / 2 = -2/3, so (4/9 + 4/9) / 2 = 4/9.
    z_a = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]])
    z_b = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0]])

    _, same = VICRegLoss()(z_a, z_a)
    _, mixed = VICRegLoss()(z_a, z_b)

    assert same["covariance"].item() == pytest.approx(1.0 + 1.0, rel=1e-6)
    assert mixed["covariance"].item() == pytest.approx(1.0 + 4.0 / 9.0, rel=1e-6)


def test_vicreg_rejects_batch_of_one():
    z = torch.ones(1, 4)

    with pytest.raises(ValueError, match="at least 2 samples"):
        VICRegLoss()(z, z)


def test_vicreg_rejects_mismatched_views():
    with pytest.raises(ValueError, match=r"\(4, 3\) and \(4, 2\)"):
        VICRegLoss()(torch.ones(4, 3), torch.ones(4, 2))

    with pytest.raises(ValueError, match="same shape"):
        VICRegLoss()(torch.ones(4), torch.ones(4))


def test_vicreg_rejects_invalid_settings():
    with pytest.raises(ValueError, match="variance weight"):
        VICRegLoss(variance=-1.0)
    with pytest.raises(ValueError, match="target_std"):
        VICRegLoss(target_std=0.0)
    with pytest.raises(ValueError, match="eps"):
        VICRegLoss(eps=-1e-4)


def test_vicreg_bfloat16_inputs_give_float32_loss():
    z_a = torch.tensor([[0.0, 0.0], [0.5, 0.5], [1.0, -0.5]], dtype=torch.bfloat16)
    z_b = torch.tensor([[0.0, 0.0], [0.0, 2.0], [0.0, 4.0]], dtype=torch.bfloat16)

    total, terms = VICRegLoss(eps=0.0)(z_a, z_b)

    assert total.dtype == torch.float32
    assert terms["invariance"].item() == pytest.approx(23.75 / 6, rel=1e-6)


def test_vicreg_gradient_is_finite_for_collapse():
    z_a = torch.zeros(4, 3, requires_grad=True)
    z_b = torch.zeros(4, 3, requires_grad=True)

    total, _ = VICRegLoss()(z_a, z_b)
    total.backward()

    assert torch.isfinite(z_a.grad).all()
    assert torch.isfinite(z_b.grad).all()


def test_projector_layer_structure():
    projector = Projector(8, [16, 12, 4])
    layers = list(projector.layers)

    kinds = [type(layer) for layer in layers]
    assert kinds == [
        torch.nn.Linear,
        torch.nn.BatchNorm1d,
        torch.nn.ReLU,
        torch.nn.Linear,
        torch.nn.BatchNorm1d,
        torch.nn.ReLU,
        torch.nn.Linear,
    ]
    assert (layers[0].in_features, layers[0].out_features) == (8, 16)
    assert (layers[3].in_features, layers[3].out_features) == (16, 12)
    assert (layers[6].in_features, layers[6].out_features) == (12, 4)
    assert projector.out_dim == 4


def test_projector_single_layer_is_linear():
    projector = Projector(8, [5])

    assert [type(layer) for layer in projector.layers] == [torch.nn.Linear]
    assert projector(torch.randn(3, 8)).shape == (3, 5)


def test_projector_output_shape_and_sign():
    torch.manual_seed(0)
    projector = Projector(8, [16, 4])

    projected = projector(torch.randn(6, 8))

    assert projected.shape == (6, 4)
    # The last layer has no ReLU, so negative outputs occur.
    assert (projected < 0).any()


def test_projector_rejects_invalid_sizes():
    with pytest.raises(ValueError, match="empty"):
        Projector(8, [])
    with pytest.raises(ValueError, match=r"\[0\]"):
        Projector(8, [16, 0])
    with pytest.raises(ValueError, match="in_dim"):
        Projector(0, [16])


def test_vicreg_target_std_hinge_value():
    # Column (0, 1): unbiased variance 0.5, std sqrt(0.5). With target 1 and eps 0 the hinge is 1 - sqrt(0.5).
    z = torch.tensor([[0.0], [1.0]])

    _, terms = VICRegLoss(eps=0.0)(z, z)

    assert terms["variance"].item() == pytest.approx(1.0 - math.sqrt(0.5), rel=1e-6)


def test_projector_parts_project_each_half_on_its_own():
    torch.manual_seed(0)
    projector = Projector(8, [16, 4], parts=2).eval()
    embedding = torch.randn(5, 8)
    changed = embedding.clone()
    changed[:, 4:] = torch.randn(5, 4)

    projected = projector(embedding)
    projected_changed = projector(changed)

    assert projector.out_dim == 8
    assert projected.shape == (5, 8)
    torch.testing.assert_close(projected[:, :4], projected_changed[:, :4])
    assert not torch.allclose(projected[:, 4:], projected_changed[:, 4:])


def test_projector_parts_must_divide_the_embedding():
    with pytest.raises(ValueError, match="parts"):
        Projector(9, [16], parts=2)
