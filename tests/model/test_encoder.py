"""Tests of the population-context encoder and its rotary position encoding."""

import dataclasses
import json

import numpy
import pytest
import torch

from neurpir_nwb.model import EncoderConfig, NeurPIREncoder, Projector, RotaryEmbedding, VICRegLoss

SMALL = EncoderConfig(
    bins_per_patch=4,
    patches=8,
    dim=32,
    heads=2,
    temporal_layers=1,
    spatiotemporal_layers=2,
    distance_bins=8,
)


def build_encoder(config: EncoderConfig = SMALL, seed: int = 0) -> NeurPIREncoder:
    torch.manual_seed(seed)
    return NeurPIREncoder(config).eval()


def make_batch(batch: int, neighbours: int, config: EncoderConfig = SMALL, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    activity = torch.poisson(
        torch.full((batch, 1 + neighbours, config.patches, config.bins_per_patch), 2.0), generator=generator
    )
    distance_bins = torch.arange(1 + neighbours).clamp(max=config.distance_bins - 1).expand(batch, -1).clone()
    present = torch.ones(batch, 1 + neighbours, dtype=torch.bool)
    return activity, distance_bins, present


def test_encoder_output_shape_without_neighbours():
    encoder = build_encoder()
    activity, distance_bins, present = make_batch(batch=5, neighbours=0)

    embedding = encoder(activity, distance_bins, present)

    assert activity.shape == (5, 1, 8, 4)
    assert embedding.shape == (5, 32)
    assert torch.isfinite(embedding).all()


def test_encoder_output_shape_with_neighbours():
    encoder = build_encoder()
    activity, distance_bins, present = make_batch(batch=5, neighbours=3)

    embedding = encoder(activity, distance_bins, present)

    assert embedding.shape == (5, 32)
    assert torch.isfinite(embedding).all()


def test_encoder_output_shape_default_config():
    config = EncoderConfig()
    encoder = build_encoder(config)
    activity, distance_bins, present = make_batch(batch=2, neighbours=2, config=config)

    embedding = encoder(activity, distance_bins, present)

    assert embedding.shape == (2, 128)


def test_encoder_padded_neighbours_ignored():
    encoder = build_encoder()
    activity, distance_bins, present = make_batch(batch=4, neighbours=3)
    present[:, 2:] = False
    present[0, 1] = False

    reference = encoder(activity, distance_bins, present)

    changed_activity = activity.clone()
    changed_activity[:, 2:] = torch.rand_like(changed_activity[:, 2:]) * 50.0
    changed_activity[0, 1] = float("nan")
    changed_bins = distance_bins.clone()
    changed_bins[:, 2:] = 7
    changed = encoder(changed_activity, changed_bins, present)

    torch.testing.assert_close(changed, reference)


def test_encoder_all_padded_equals_no_neighbours():
    encoder = build_encoder()
    activity, distance_bins, present = make_batch(batch=4, neighbours=3)
    present[:, 1:] = False

    padded = encoder(activity, distance_bins, present)
    alone = encoder(activity[:, :1], distance_bins[:, :1], present[:, :1])

    torch.testing.assert_close(padded, alone)


def test_encoder_target_always_present():
    encoder = build_encoder()
    activity, distance_bins, present = make_batch(batch=3, neighbours=2)

    reference = encoder(activity, distance_bins, present)
    present[:, 0] = False
    unmarked = encoder(activity, distance_bins, present)

    torch.testing.assert_close(unmarked, reference)


def test_encoder_present_neighbour_changes_output():
    encoder = build_encoder()
    activity, distance_bins, present = make_batch(batch=4, neighbours=3)

    reference = encoder(activity, distance_bins, present)

    changed_activity = activity.clone()
    changed_activity[:, 2] = changed_activity[:, 2] + 5.0
    changed = encoder(changed_activity, distance_bins, present)

    difference = (changed - reference).abs().amax(dim=1)  # (batch,)
    assert (difference > 1e-4).all()


def test_encoder_distance_bin_changes_output():
    encoder = build_encoder()
    activity, distance_bins, present = make_batch(batch=4, neighbours=3)
    # A trained model has distance embeddings far from their small initial values.
    with torch.no_grad():
        for block in encoder.spatiotemporal_blocks:
            block.distance_embedding.weight.normal_(std=1.0)

    reference = encoder(activity, distance_bins, present)
    changed_bins = distance_bins.clone()
    changed_bins[:, 1] = 6
    changed = encoder(activity, changed_bins, present)

    assert not torch.allclose(changed, reference, atol=1e-4)


def test_encoder_samples_independent_in_batch():
    encoder = build_encoder()
    activity, distance_bins, present = make_batch(batch=4, neighbours=2)

    full = encoder(activity, distance_bins, present)
    first_two = encoder(activity[:2], distance_bins[:2], present[:2])

    torch.testing.assert_close(first_two, full[:2])


def test_encoder_deterministic_with_seed():
    activity, distance_bins, present = make_batch(batch=3, neighbours=2)

    first = build_encoder(seed=5)(activity, distance_bins, present)
    second = build_encoder(seed=5)(activity, distance_bins, present)
    other_seed = build_encoder(seed=6)(activity, distance_bins, present)

    assert torch.equal(first, second)
    assert not torch.allclose(first, other_seed)


def test_encoder_bfloat16_autocast_on_cpu():
    encoder = build_encoder()
    activity, distance_bins, present = make_batch(batch=4, neighbours=3)
    present[:, 3] = False

    with torch.no_grad():
        reference = encoder(activity, distance_bins, present)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            embedding = encoder(activity, distance_bins, present)

    assert embedding.shape == (4, 32)
    assert torch.isfinite(embedding).all()
    similarity = torch.nn.functional.cosine_similarity(embedding.float(), reference, dim=1)  # (batch,)
    assert (similarity > 0.99).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_encoder_bfloat16_autocast_on_cuda():
    encoder = build_encoder().cuda()
    activity, distance_bins, present = (tensor.cuda() for tensor in make_batch(batch=4, neighbours=3))
    present[:, 3] = False

    with torch.no_grad():
        reference = encoder(activity, distance_bins, present)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            embedding = encoder(activity, distance_bins, present)

    assert torch.isfinite(embedding).all()
    similarity = torch.nn.functional.cosine_similarity(embedding.float(), reference, dim=1)  # (batch,)
    assert (similarity > 0.99).all()


def test_training_steps_reduce_vicreg_loss():
    torch.manual_seed(0)
    config = EncoderConfig(bins_per_patch=4, patches=8, dim=32, heads=2, temporal_layers=1, spatiotemporal_layers=1)
    encoder = NeurPIREncoder(config).train()
    projector = Projector(config.dim, [64, 64]).train()
    loss_fn = VICRegLoss()
    optimizer = torch.optim.AdamW([*encoder.parameters(), *projector.parameters()], lr=1e-3, weight_decay=0.01)

    # Two views of each of 16 neurons: the same underlying rates plus independent noise.
    rates = torch.rand(16, 3, config.patches, config.bins_per_patch) * 3.0
    view_a = rates + 0.3 * torch.randn_like(rates)
    view_b = rates + 0.3 * torch.randn_like(rates)
    distance_bins = torch.tensor([0, 1, 2]).expand(16, -1).clone()
    present = torch.ones(16, 3, dtype=torch.bool)
    present[:4, 2] = False

    losses = []
    for _ in range(20):
        z_a = projector(encoder(view_a, distance_bins, present))
        z_b = projector(encoder(view_b, distance_bins, present))
        loss, terms = loss_fn(z_a, z_b)

        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())

    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.85 * losses[0]
    for name, parameter in encoder.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name


def test_rotary_preserves_norm():
    torch.manual_seed(0)
    rotary = RotaryEmbedding(head_dim=16)
    x = torch.randn(3, 2, 10, 16)

    rotated = rotary(x)

    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(rotated[..., 0, :], x[..., 0, :])
    assert not torch.allclose(rotated[..., 1:, :], x[..., 1:, :])


def test_rotary_dot_product_is_relative():
    torch.manual_seed(0)
    rotary = RotaryEmbedding(head_dim=16)
    query = torch.randn(16)
    key = torch.randn(16)

    def rotated_dot(query_position: int, key_position: int) -> float:
        positions = torch.tensor([query_position, key_position])
        pair = torch.stack((query, key))  # (2, head_dim)
        rotated = rotary(pair, positions)  # (2, head_dim)
        return float(rotated[0] @ rotated[1])

    for shift in (1, 5, 17, 100):
        assert rotated_dot(3 + shift, 1 + shift) == pytest.approx(rotated_dot(3, 1), abs=1e-4)
        assert rotated_dot(1 + shift, 6 + shift) == pytest.approx(rotated_dot(1, 6), abs=1e-4)

    assert rotated_dot(3, 1) != pytest.approx(rotated_dot(5, 1), abs=1e-3)


def test_rotary_matches_pairwise_rotation():
    # Position 1, head_dim 4: pair 0 pairs features 0 and 2 and turns by 1 rad;
    # pair 1 pairs features 1 and 3 and turns by 10000 ** (-2 / 4) = 0.01 rad.
    rotary = RotaryEmbedding(head_dim=4)
    x = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]])

    rotated = rotary(x)

    cos_1, sin_1 = 0.5403023059, 0.8414709848
    cos_001, sin_001 = 0.9999500004, 0.0099998333
    expected = torch.tensor([[1.0, 1.0, 0.0, 0.0], [cos_1, cos_001, sin_1, sin_001]])
    torch.testing.assert_close(rotated, expected)


def test_rotary_keeps_bfloat16_dtype():
    rotary = RotaryEmbedding(head_dim=8)
    x = torch.randn(2, 5, 8, dtype=torch.bfloat16)

    assert rotary(x).dtype == torch.bfloat16


def test_rotary_rejects_odd_head_dim():
    with pytest.raises(ValueError, match="got 7"):
        RotaryEmbedding(head_dim=7)


def test_config_rejects_indivisible_heads():
    with pytest.raises(ValueError, match="dim 130 is not divisible by heads 4"):
        EncoderConfig(dim=130, heads=4)


def test_config_rejects_odd_head_dim():
    with pytest.raises(ValueError, match="= 3 is odd"):
        EncoderConfig(dim=12, heads=4)


def test_config_rejects_invalid_values():
    with pytest.raises(ValueError, match="patches must be an integer of at least 1, got 0"):
        EncoderConfig(patches=0)
    with pytest.raises(ValueError, match="temporal_layers"):
        EncoderConfig(temporal_layers=-1)
    with pytest.raises(ValueError, match="dropout"):
        EncoderConfig(dropout=1.0)
    with pytest.raises(ValueError, match="mlp_ratio"):
        EncoderConfig(mlp_ratio=0.0)


def test_config_accepts_numpy_integers():
    config = EncoderConfig(patches=numpy.int64(16), dim=numpy.int32(64), dropout=numpy.float32(0.5))

    assert type(config.patches) is int
    assert type(config.dim) is int
    assert type(config.dropout) is float
    assert json.loads(json.dumps(config.to_dict()))["patches"] == 16


def test_config_dict_round_trip():
    config = EncoderConfig(dim=64, heads=8, dropout=0.1)

    values = config.to_dict()

    assert values["dim"] == 64
    assert EncoderConfig.from_dict(values) == config


def test_config_from_dict_rejects_unknown_keys():
    values = EncoderConfig().to_dict()
    values["width"] = 256

    with pytest.raises(ValueError, match=r"\['width'\]"):
        EncoderConfig.from_dict(values)


def test_encoder_rejects_wrong_window_shape():
    encoder = build_encoder()
    activity, distance_bins, present = make_batch(batch=2, neighbours=1)

    with pytest.raises(ValueError, match=r"\(batch, 1 \+ k, 8, 4\)"):
        encoder(activity[:, :, :6], distance_bins, present)


def test_encoder_rejects_mismatched_neighbour_inputs():
    encoder = build_encoder()
    activity, distance_bins, present = make_batch(batch=2, neighbours=2)

    with pytest.raises(ValueError, match="distance_bins must have shape"):
        encoder(activity, distance_bins[:, :2], present)
    with pytest.raises(ValueError, match="present must have shape"):
        encoder(activity, distance_bins, present[:, :2])
    with pytest.raises(ValueError, match="present must be a bool tensor"):
        encoder(activity, distance_bins, present.long())
    with pytest.raises(ValueError, match="distance_bins must be a long tensor"):
        encoder(activity, distance_bins.int(), present)


def test_encoder_dropout_active_only_in_training():
    config = dataclasses.replace(SMALL, dropout=0.3)
    torch.manual_seed(0)
    encoder = NeurPIREncoder(config)
    activity, distance_bins, present = make_batch(batch=3, neighbours=1, config=config)

    encoder.eval()
    assert torch.equal(encoder(activity, distance_bins, present), encoder(activity, distance_bins, present))

    encoder.train()
    torch.manual_seed(1)
    first = encoder(activity, distance_bins, present)
    torch.manual_seed(2)
    second = encoder(activity, distance_bins, present)
    assert not torch.allclose(first, second)


def test_own_embedding_appends_a_half_that_ignores_neighbours():
    config = dataclasses.replace(SMALL, own_embedding=True)
    encoder = build_encoder(config)
    activity, distance_bins, present = make_batch(batch=4, neighbours=3, config=config)
    changed = activity.clone()
    changed[:, 1:] = torch.poisson(torch.full_like(changed[:, 1:], 5.0))

    with torch.no_grad():
        embedding = encoder(activity, distance_bins, present)
        with_other_neighbours = encoder(changed, distance_bins, present)

    assert config.output_dim == encoder.dim == 64
    assert embedding.shape == (4, 64)
    # Different neighbours change the context half and leave the own half as it was.
    assert not torch.allclose(embedding[:, :32], with_other_neighbours[:, :32])
    torch.testing.assert_close(embedding[:, 32:], with_other_neighbours[:, 32:])


def test_own_embedding_context_half_unchanged():
    plain = build_encoder(SMALL, seed=3)
    both = NeurPIREncoder(dataclasses.replace(SMALL, own_embedding=True)).eval()
    missing, unexpected = both.load_state_dict(plain.state_dict(), strict=False)
    activity, distance_bins, present = make_batch(batch=3, neighbours=2)

    with torch.no_grad():
        context = plain(activity, distance_bins, present)
        embedding = both(activity, distance_bins, present)

    assert sorted(missing) == ["own_norm.bias", "own_norm.weight"]
    assert not unexpected
    torch.testing.assert_close(embedding[:, :32], context)


def test_own_embedding_must_be_a_bool():
    with pytest.raises(ValueError, match="own_embedding"):
        EncoderConfig(own_embedding="yes")
