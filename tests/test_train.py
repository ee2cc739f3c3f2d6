"""The trainer on a real segment set: pairs, held-out windows, schedule, checkpoints and embeddings."""

import numpy as np
import pytest
import torch

from neurpir_nwb.errors import TrainingError
from neurpir_nwb.model import EncoderConfig, NeurPIREncoder, Projector, VICRegLoss
from neurpir_nwb.segments import SegmentSettings, build_segment_set
from neurpir_nwb.train import TrainConfig, Trainer, WindowData, autocast_dtype, embed_neurons, resolve_device
from tests.test_segments import make_recording

SETTINGS = SegmentSettings(bin_size_s=0.1, bins_per_patch=4, patches=4, neighbours=2, distance_bins=4)


@pytest.fixture(scope="module")
def segment_set():
    return build_segment_set([make_recording(6, 32.0, rate_hz=8.0), make_recording(4, 16.0, identifier="b", seed=3)], SETTINGS)


def small_trainer(config: TrainConfig) -> Trainer:
    torch.manual_seed(config.seed)
    encoder = NeurPIREncoder(EncoderConfig(bins_per_patch=4, patches=4, dim=16, heads=2, temporal_layers=1, spatiotemporal_layers=1, distance_bins=4))
    return Trainer(encoder, Projector(16, [32, 32]), VICRegLoss(), config)


def test_pairs_are_distinct_windows_of_one_neuron(segment_set):
    data = WindowData(segment_set)
    rng = np.random.default_rng(0)
    (activity_a, bins_a, present_a), (activity_b, bins_b, present_b) = data.sample_pairs(rng, 8, data.trainable_neurons())

    assert activity_a.shape == (8, 3, 4, 4)
    assert torch.equal(bins_a, bins_b)
    assert torch.equal(present_a, present_b)
    assert bins_a[:, 0].eq(0).all()
    assert not torch.equal(activity_a, activity_b)


def test_neighbours_padded_in_small_recording():
    recording = make_recording(2, 16.0)
    data = WindowData(build_segment_set([recording], SETTINGS))
    _, _, present = data.view(np.array([0, 1]), np.array([0, 0]))

    assert present.tolist() == [[True, True, False], [True, True, False]]


def test_holdout_keeps_last_windows(segment_set):
    data = WindowData(segment_set, holdout_fraction=0.25)

    # Windows of 1.6 s: the first recording has 20 and the second 10, so 5 and 3 are held out, at the end.
    assert data.heldout[0].tolist() == [False] * 15 + [True] * 5
    assert data.heldout[6, :10].tolist() == [False] * 7 + [True] * 3
    assert not (data.heldout & data.train_mask).any()
    assert not data.heldout[6, 10:].any()


def test_train_neurons_limit_sampling(segment_set):
    data = WindowData(segment_set, train_neurons=np.arange(6))
    assert data.trainable_neurons().tolist() == [0, 1, 2, 3, 4, 5]


def test_schedule_warms_up_then_decays():
    trainer = small_trainer(TrainConfig(epochs=1, steps_per_epoch=20, warmup_fraction=0.2, lr=1e-3))

    factors = [trainer._lr_factor(step) for step in range(20)]
    assert factors[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert factors[4] == pytest.approx(1.0)
    assert all(later <= earlier for earlier, later in zip(factors[4:], factors[5:]))
    assert factors[-1] < 0.01


def test_fit_reduces_loss_and_checkpoints(segment_set, tmp_path):
    trainer = small_trainer(TrainConfig(epochs=2, steps_per_epoch=15, batch_size=8, lr=3e-3, device="cpu", seed=0))
    result = trainer.fit(WindowData(segment_set), checkpoint_dir=tmp_path)

    losses = result.history["loss"]
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    assert result.windows_per_s > 0

    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] == 2
    assert set(checkpoint) >= {"encoder", "projector", "optimizer", "scheduler"}


def test_same_seed_same_weights(segment_set):
    weights = []
    for _ in range(2):
        trainer = small_trainer(TrainConfig(epochs=1, steps_per_epoch=3, batch_size=4, device="cpu", seed=7))
        trainer.fit(WindowData(segment_set))
        weights.append(torch.cat([parameter.flatten() for parameter in trainer.encoder.parameters()]))

    assert torch.equal(weights[0], weights[1])


def test_too_few_neurons_raise():
    data = WindowData(build_segment_set([make_recording(3, 16.0)], SETTINGS), train_neurons=np.array([0]))
    trainer = small_trainer(TrainConfig(epochs=1, steps_per_epoch=1, batch_size=4, device="cpu"))

    with pytest.raises(TrainingError, match=r"only 1 neuron\(s\) have spikes in two or more windows"):
        trainer.fit(data)


def test_embeddings_average_valid_windows(segment_set):
    trainer = small_trainer(TrainConfig(device="cpu"))
    data = WindowData(segment_set)
    neurons, windows = embed_neurons(trainer.encoder, data, batch_size=7, device="cpu")

    assert neurons.shape == (10, 16)
    assert windows.shape == (10, 20, 16)
    assert np.isnan(windows[6, 10:]).all()
    np.testing.assert_allclose(neurons[6], windows[6, :10].mean(axis=0), rtol=1e-5, atol=1e-6)


def test_device_and_precision_choices():
    assert resolve_device("cpu").type == "cpu"
    assert autocast_dtype("auto", torch.device("cpu")) is None
    assert autocast_dtype("auto", torch.device("cuda")) is torch.bfloat16
    assert autocast_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    if not torch.cuda.is_available():
        with pytest.raises(TrainingError, match=r"finds no CUDA device"):
            resolve_device("cuda")


def test_bf16_training_step_on_cpu(segment_set):
    trainer = small_trainer(TrainConfig(epochs=1, steps_per_epoch=2, batch_size=4, device="cpu", precision="bf16"))
    result = trainer.fit(WindowData(segment_set))

    assert result.precision == "bf16"
    assert np.isfinite(result.history["loss"]).all()


def test_neighbour_dropout_differs_between_views(segment_set):
    data = WindowData(segment_set)
    rng = np.random.default_rng(0)
    (activity_a, _, present_a), (_, _, present_b) = data.sample_pairs(rng, 64, data.trainable_neurons(), neighbour_dropout=0.5)

    assert present_a[:, 0].all()
    assert present_b[:, 0].all()
    assert not torch.equal(present_a, present_b)
    assert 0.3 < present_a[:, 1:].float().mean().item() < 0.7
    assert activity_a[~present_a].abs().sum() == 0
