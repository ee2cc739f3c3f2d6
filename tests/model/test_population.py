"""Population batching: every neuron of a window encoded once, and the same embeddings as per-target batching."""

import contextlib
import dataclasses

import numpy as np
import pytest
import torch

from neurpir_nwb.model import EncoderConfig, NeurPIREncoder, Projector, VICRegLoss
from neurpir_nwb.model import encoder as encoder_module
from neurpir_nwb.segments import SegmentSettings, build_segment_set
from neurpir_nwb.train import TrainConfig, Trainer, WindowData, embed_neurons
from tests.test_segments import make_recording

SMALL = EncoderConfig(bins_per_patch=4, patches=8, dim=32, heads=2, temporal_layers=1, spatiotemporal_layers=1, distance_bins=8)

SETTINGS = SegmentSettings(bin_size_s=0.1, bins_per_patch=4, patches=4, neighbours=3, distance_bins=4)


@pytest.fixture(autouse=True)
def one_thread():
    """Train the tiny models on one thread: a second one only adds OpenMP synchronisation, which is slow on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def build_encoder(config: EncoderConfig, seed: int = 0) -> NeurPIREncoder:
    """Build an encoder whose distance embeddings and layer norms are far from their initial values."""
    torch.manual_seed(seed)
    encoder = NeurPIREncoder(config).eval()
    with torch.no_grad():
        for block in encoder.spatiotemporal_blocks:
            block.distance_embedding.weight.normal_(std=1.0)
            block.spatial.attention_norm.weight.normal_(mean=1.0, std=0.5)
            block.spatial.attention_norm.bias.normal_(std=0.5)
    return encoder


def make_population(n_neurons: int, k: int, config: EncoderConfig, seed: int = 1):
    """Return activity, neighbours with absent entries, and distance bins of one window of n neurons."""
    generator = torch.Generator().manual_seed(seed)
    activity = torch.poisson(torch.full((n_neurons, config.patches, config.bins_per_patch), 2.0), generator=generator)
    neighbours = torch.stack([torch.randperm(n_neurons - 1, generator=generator)[:k] for _ in range(n_neurons)])
    neighbours = neighbours + (neighbours >= torch.arange(n_neurons)[:, None]).long()  # never the neuron itself
    neighbours[0, 1:] = -1
    neighbours[3, -1] = -1
    distance_bins = torch.randint(1, config.distance_bins, (n_neurons, k), generator=generator)
    return activity, neighbours, distance_bins


def per_target_input(activity, neighbours, distance_bins, targets):
    """Gather each target with copies of its neighbours, as per-target batching does."""
    present = torch.cat((torch.ones(len(targets), 1, dtype=torch.bool), neighbours[targets] >= 0), dim=1)
    members = torch.cat((targets[:, None], neighbours[targets].clamp(min=0)), dim=1)
    bins = torch.cat((torch.zeros(len(targets), 1, dtype=torch.long), distance_bins[targets]), dim=1)
    return activity[members], bins, present


@pytest.mark.parametrize("spatiotemporal_layers", [0, 1])
@pytest.mark.parametrize("own_embedding", [False, True])
def test_population_matches_per_target(spatiotemporal_layers, own_embedding):
    config = dataclasses.replace(SMALL, spatiotemporal_layers=spatiotemporal_layers, own_embedding=own_embedding)
    encoder = build_encoder(config)
    activity, neighbours, distance_bins = make_population(12, 4, config)
    targets = torch.tensor([0, 3, 5, 6, 11])

    population = encoder.forward_population(activity, neighbours, distance_bins, targets)
    per_target = encoder(*per_target_input(activity, neighbours, distance_bins, targets))

    assert population.shape == (5, config.output_dim)
    torch.testing.assert_close(population, per_target, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk_rows", [None, 4])
def test_population_gradients_match_per_target(monkeypatch, chunk_rows):
    config = dataclasses.replace(SMALL, own_embedding=True)
    activity, neighbours, distance_bins = make_population(10, 3, config)
    targets = torch.arange(10)
    if chunk_rows is not None:
        rows_per_chunk(monkeypatch, chunk_rows, config)

    gradients = []
    for batching in ("population", "per-target"):
        encoder = build_encoder(config).train()
        if batching == "population":
            embedding = encoder.forward_population(activity, neighbours, distance_bins, targets)
        else:
            embedding = encoder(*per_target_input(activity, neighbours, distance_bins, targets))
        (embedding * torch.linspace(-1, 1, embedding.shape[1])).sum().backward()
        gradients.append({name: parameter.grad for name, parameter in encoder.named_parameters()})

    assert gradients[0].keys() == gradients[1].keys()
    for name in gradients[0]:
        torch.testing.assert_close(gradients[0][name], gradients[1][name], rtol=1e-4, atol=1e-5, msg=name)


def test_population_bfloat16_close_to_float32():
    encoder = build_encoder(SMALL)
    activity, neighbours, distance_bins = make_population(12, 4, SMALL)

    with torch.no_grad():
        reference = encoder.forward_population(activity, neighbours, distance_bins)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            embedding = encoder.forward_population(activity, neighbours, distance_bins)

    similarity = torch.nn.functional.cosine_similarity(embedding.float(), reference, dim=1)
    assert (similarity > 0.99).all()


def test_deep_population_uses_own_neighbourhoods():
    config = dataclasses.replace(SMALL, spatiotemporal_layers=2, batching="population")
    encoder = build_encoder(config)
    activity, neighbours, distance_bins = make_population(12, 4, config)

    population = encoder.forward_population(activity, neighbours, distance_bins)

    # Reference: every block runs the per-target block on each neuron's own neighbourhood and keeps the neuron's row.
    with torch.no_grad():
        x = encoder.patch_embedding(activity)
        for block in encoder.temporal_blocks:
            x = block(x)
        everyone = torch.arange(12)
        for block in encoder.spatiotemporal_blocks:
            _, bins, present = per_target_input(activity, neighbours, distance_bins, everyone)
            members = torch.cat((everyone[:, None], neighbours.clamp(min=0)), dim=1)
            key_mask = present[:, None, :].expand(12, config.patches, 5).reshape(12 * config.patches, 5)
            x = block(x[members], bins, key_mask, target_only=True)[:, 0]
        reference = encoder.final_norm(x).mean(dim=1)

    torch.testing.assert_close(population, reference, rtol=1e-5, atol=1e-5)


def rows_per_chunk(monkeypatch, rows: int, config: EncoderConfig) -> None:
    """Make population batching run ``rows`` rows of a window through each block at a time."""
    monkeypatch.setattr(encoder_module, "POPULATION_CHUNK_FEATURES", rows * config.patches * config.dim)


@pytest.mark.parametrize("rows", [1, 5])
def test_chunked_population_matches_per_target(monkeypatch, rows):
    config = dataclasses.replace(SMALL, own_embedding=True)
    encoder = build_encoder(config)
    activity, neighbours, distance_bins = make_population(12, 4, config)
    targets = torch.tensor([0, 3, 5, 6, 11])
    per_target = encoder(*per_target_input(activity, neighbours, distance_bins, targets))

    rows_per_chunk(monkeypatch, rows, config)
    population = encoder.forward_population(activity, neighbours, distance_bins, targets)

    torch.testing.assert_close(population, per_target, rtol=1e-5, atol=1e-5)


def test_deep_population_chunks_unchanged(monkeypatch):
    config = dataclasses.replace(SMALL, spatiotemporal_layers=2, batching="population")
    encoder = build_encoder(config)
    activity, neighbours, distance_bins = make_population(12, 4, config)
    targets = torch.tensor([1, 2, 9])
    whole = encoder.forward_population(activity, neighbours, distance_bins, targets)

    rows_per_chunk(monkeypatch, 5, config)
    chunked = encoder.forward_population(activity, neighbours, distance_bins, targets)

    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)


def test_chunked_population_without_rows(monkeypatch):
    config = dataclasses.replace(SMALL, own_embedding=True)
    encoder = build_encoder(config)
    rows_per_chunk(monkeypatch, 2, config)

    embedding = encoder.forward_population(
        torch.zeros(0, config.patches, config.bins_per_patch), torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, 3, dtype=torch.long)
    )

    assert embedding.shape == (0, config.output_dim)


def test_row_chunks_split_evenly():
    cpu = torch.device("cpu")
    rows = encoder_module.POPULATION_CHUNK_FEATURES // 100

    chunks = encoder_module._row_chunks(4 * rows - 4, 100, cpu)

    assert [(chunk.start, chunk.stop) for chunk in chunks] == [(start, start + rows - 1) for start in range(0, 4 * rows - 4, rows - 1)]
    assert [(chunk.start, chunk.stop) for chunk in encoder_module._row_chunks(0, 100, cpu)] == [(0, 1)]
    assert len(encoder_module._row_chunks(rows, 100, cpu)) == 1
    assert encoder_module._row_chunks(4 * rows, 100, torch.device("meta")) == [slice(0, 4 * rows)]


def test_row_chunks_share_out_between_workers():
    cpu = torch.device("cpu")
    rows = encoder_module.POPULATION_CHUNK_FEATURES // 100

    assert len(encoder_module._row_chunks(rows, 100, cpu, workers=2)) == 2
    assert len(encoder_module._row_chunks(3 * rows, 100, cpu, workers=2)) == 4
    assert encoder_module._row_chunks(1, 100, cpu, workers=2) == [slice(0, 1)]


def threaded_embeddings(encoder, inputs, threads: int, mode: str = "no_grad") -> torch.Tensor:
    """Embed every row with ``threads`` intra-op threads, under no_grad, inference_mode or no_grad with bf16 autocast."""
    torch.set_num_threads(threads)
    with contextlib.ExitStack() as modes:
        modes.enter_context(torch.inference_mode() if mode == "inference_mode" else torch.no_grad())
        if mode == "bf16-autocast":
            modes.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
        return encoder.forward_population(*inputs).float()


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "bf16-autocast"])
def test_threaded_inference_matches_one_thread(monkeypatch, mode):
    config = dataclasses.replace(SMALL, spatiotemporal_layers=2, batching="population", own_embedding=True)
    encoder = build_encoder(config)
    inputs = make_population(12, 4, config)
    rows_per_chunk(monkeypatch, 3, config)

    one_thread = threaded_embeddings(encoder, inputs, 1, mode)
    two_threads = threaded_embeddings(encoder, inputs, 2, mode)

    # Workers that lost the caller's autocast would differ from one thread by the bf16 rounding, about 1e-2.
    torch.testing.assert_close(two_threads, one_thread, rtol=1e-6, atol=1e-6)
    assert any(workers == 2 for _, workers, _ in encoder_module._CHUNK_POOLS)
    assert torch.get_num_threads() == 2


def test_thread_count_change_replaces_pool(monkeypatch):
    config = dataclasses.replace(SMALL, spatiotemporal_layers=2, batching="population")
    encoder = build_encoder(config)
    inputs = make_population(12, 4, config)
    rows_per_chunk(monkeypatch, 2, config)

    two_threads = threaded_embeddings(encoder, inputs, 2)
    three_threads = threaded_embeddings(encoder, inputs, 3)

    torch.testing.assert_close(three_threads, two_threads, rtol=1e-5, atol=1e-6)
    assert [workers for _, workers, _ in encoder_module._CHUNK_POOLS] == [3]


def test_deeper_stack_rejects_other_batching():
    activity, neighbours, distance_bins = make_population(6, 2, SMALL)
    per_target = build_encoder(dataclasses.replace(SMALL, spatiotemporal_layers=2))
    population = build_encoder(dataclasses.replace(SMALL, spatiotemporal_layers=2, batching="population"))

    with pytest.raises(ValueError, match=r"trained with per-target batching and 2 spatio-temporal layers"):
        per_target.forward_population(activity, neighbours, distance_bins)
    with pytest.raises(ValueError, match=r"trained with population batching and 2 spatio-temporal layers"):
        population(*per_target_input(activity, neighbours, distance_bins, torch.arange(6)))


def test_population_rejects_invalid_rows():
    encoder = build_encoder(SMALL)
    activity, neighbours, distance_bins = make_population(6, 2, SMALL)

    outside = neighbours.clone()
    outside[2, 0] = 6
    with pytest.raises(ValueError, match=r"neighbours must hold rows 0 to 5 of activity"):
        encoder.forward_population(activity, outside, distance_bins)
    with pytest.raises(ValueError, match=r"targets must hold rows 0 to 5"):
        encoder.forward_population(activity, neighbours, distance_bins, torch.tensor([1, 7]))
    bin_zero = distance_bins.clone()
    bin_zero[1, 1] = 0
    with pytest.raises(ValueError, match=r"distance_bins of present neighbours must be 1 to 7"):
        encoder.forward_population(activity, neighbours, bin_zero)
    with pytest.raises(ValueError, match=r"activity must have shape \(neurons, 8, 4\)"):
        encoder.forward_population(activity[:, :4], neighbours, distance_bins)


def test_batching_setting_validated_and_serialised():
    with pytest.raises(ValueError, match=r"encoder batching must be one of per-target, population"):
        EncoderConfig(batching="window")

    config = dataclasses.replace(SMALL, batching="population")
    assert EncoderConfig.from_dict(config.to_dict()) == config
    assert EncoderConfig.from_dict({key: value for key, value in config.to_dict().items() if key != "batching"}).batching == "per-target"


@pytest.fixture(scope="module")
def segment_set():
    recordings = [make_recording(7, 24.0, rate_hz=8.0), make_recording(5, 16.0, identifier="b", seed=3)]
    return build_segment_set(recordings, SETTINGS)


def test_groups_are_recordings(segment_set):
    data = WindowData(segment_set)

    assert data.n_groups == 2
    assert data.group_members[0].tolist() == list(range(7))
    assert data.group_members[1].tolist() == list(range(7, 12))
    present = data.neighbour >= 0
    assert np.array_equal(data.group_members[1][data.local_neighbour[8][present[8]]], data.neighbour[8][present[8]])


def test_population_plan_windows_and_targets(segment_set):
    data = WindowData(segment_set, holdout_fraction=0.25)
    rng = np.random.default_rng(0)
    neurons = data.trainable_neurons()

    for _ in range(20):
        plan = data.plan_population(rng, 9, neurons)
        assert plan.n_targets >= 9
        for draw in plan.draws:
            assert draw.window_a != draw.window_b
            assert np.isin(draw.targets, data.group_members[draw.group]).all()
            assert data.train_mask[draw.targets, draw.window_a].all()
            assert data.train_mask[draw.targets, draw.window_b].all()


def test_population_views_gather_neighbours(segment_set):
    data = WindowData(segment_set)
    rng = np.random.default_rng(1)
    plan = data.plan_population(rng, 10, data.trainable_neurons())
    view_a, view_b = data.population_views(plan)

    activity, neighbours, distance_bins, targets = view_a
    assert len(targets) == plan.n_targets
    rows = np.concatenate([data.group_members[draw.group] for draw in plan.draws])
    windows = np.concatenate([[draw.window_a] * len(data.group_members[draw.group]) for draw in plan.draws])
    np.testing.assert_array_equal(activity.numpy(), data.activity[rows, windows])
    for row in range(len(rows)):
        present = neighbours[row] >= 0
        np.testing.assert_array_equal(rows[neighbours[row][present].numpy()], data.neighbour[rows[row]][present.numpy()])
        np.testing.assert_array_equal(distance_bins[row].numpy(), data.distance_bin[rows[row]])
    assert torch.equal(view_b[3], targets)
    assert not torch.equal(view_b[0], activity)


def test_population_views_hide_neighbours_independently(segment_set):
    data = WindowData(segment_set)
    plan = data.plan_population(np.random.default_rng(2), 40, data.trainable_neurons(), neighbour_dropout=0.5)
    view_a, view_b = data.population_views(plan)

    hidden_a = (view_a[1] < 0).float().mean().item()
    assert 0.3 < hidden_a < 0.8
    assert not torch.equal(view_a[1], view_b[1])


def test_pair_plan_draws_distinct_training_windows(segment_set):
    data = WindowData(segment_set, holdout_fraction=0.25)
    plan = data.plan_pairs(np.random.default_rng(3), 500, data.trainable_neurons())

    assert (plan.windows_a != plan.windows_b).all()
    assert data.train_mask[plan.neurons, plan.windows_a].all()
    assert data.train_mask[plan.neurons, plan.windows_b].all()
    # The first recording has 15 windows, 11 of them for training, and every one of them is drawn.
    first = plan.neurons < 7
    assert set(plan.windows_a[first].tolist()) == set(range(11))


def test_population_embeddings_match_per_target(segment_set):
    torch.manual_seed(0)
    config = EncoderConfig(bins_per_patch=4, patches=4, dim=16, heads=2, temporal_layers=1, spatiotemporal_layers=1, distance_bins=4, own_embedding=True)
    encoder = NeurPIREncoder(config)
    data = WindowData(segment_set, holdout_fraction=0.25)
    data.valid[2, 3] = False

    population, population_windows = embed_neurons(encoder, data, batch_size=20, device="cpu", batching="population")
    per_target, per_target_windows = embed_neurons(encoder, data, batch_size=20, device="cpu", batching="per-target")

    np.testing.assert_array_equal(np.isnan(population_windows), np.isnan(per_target_windows))
    np.testing.assert_allclose(population_windows, per_target_windows, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(population, per_target, rtol=1e-5, atol=1e-5)
    assert population.shape == (12, 32)


def test_population_fit_reduces_loss(segment_set):
    torch.manual_seed(0)
    config = EncoderConfig(bins_per_patch=4, patches=4, dim=16, heads=2, temporal_layers=1, spatiotemporal_layers=1, distance_bins=4, batching="population")
    trainer = Trainer(NeurPIREncoder(config), Projector(16, [32, 32]), VICRegLoss(), TrainConfig(epochs=2, steps_per_epoch=15, batch_size=8, lr=3e-3, device="cpu"))

    result = trainer.fit(WindowData(segment_set))

    losses = result.history["loss"]
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    assert result.batching == "population"
    assert result.windows_per_s > 0
