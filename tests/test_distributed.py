"""Training in two gloo processes on 127.0.0.1: identical parameters on both ranks, disjoint shares, single-process loss."""

import os
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as multiprocessing

from neurpir_nwb import distributed
from neurpir_nwb.pipeline import build_trainer
from neurpir_nwb.recipe import Recipe
from neurpir_nwb.segments import SegmentSettings, build_segment_set
from neurpir_nwb.train import WindowData
from tests.test_resume import ENVIRONMENT, run_cli
from tests.test_segments import make_recording

SETTINGS = SegmentSettings(bin_size_s=0.1, bins_per_patch=4, patches=4, neighbours=2, distance_bins=4)

#: Loss of two processes against one process on the same global batches: float rounding only.
LOSS_RTOL = 1e-5


@pytest.fixture(autouse=True)
def one_thread():
    """Train the tiny models on one thread: a second one only adds OpenMP synchronisation, which is slow on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_recipe(batching: str) -> Recipe:
    return Recipe.model_validate(
        {
            "name": "two-processes",
            "sources": [{"path": "unused.nwb"}],
            "segments": {"bins_per_patch": 4, "patches": 4, "neighbours": 2, "distance_bins": 4},
            "model": {"dim": 16, "heads": 2, "temporal_layers": 1, "spatiotemporal_layers": 1, "projector": [32, 32], "batching": batching},
            "train": {"epochs": 2, "steps_per_epoch": 3, "batch_size": 9, "lr": 3e-3, "device": "cpu", "neighbour_dropout": 0.3, "seed": 4},
        }
    )


def make_data() -> WindowData:
    recordings = [make_recording(6, 32.0, rate_hz=8.0), make_recording(5, 16.0, identifier="b", seed=3), make_recording(4, 20.0, identifier="c", seed=5)]
    return WindowData(build_segment_set(recordings, SETTINGS))


def record_shares(data: WindowData) -> list:
    """Make ``data`` record the target neurons of every share of a plan that it gathers, and return the record."""
    shares = []

    def record_pairs(plan, start=0, stop=None, gather=data.pair_views):
        shares.append(plan.neurons[start:stop].tolist())
        return gather(plan, start, stop)

    def record_population(plan, start=0, stop=None, gather=data.population_views):
        shares.append(np.concatenate([draw.targets for draw in plan.draws])[start:stop].tolist())
        return gather(plan, start, stop)

    data.pair_views = record_pairs
    data.population_views = record_population
    return shares


def train_rank(rank: int, world_size: int, init_method: str, batching: str, folder: str) -> None:
    """Run one rank: join the group, train on its shares, write what it recorded, and release the group."""
    torch.set_num_threads(1)
    session = distributed.start("cpu", rank=rank, world_size=world_size, local_rank=rank, init_method=init_method)
    data = make_data()
    shares = record_shares(data)
    trainer = build_trainer(make_recipe(batching), session=session)
    losses = []
    gradient_norms = []
    parameters = []

    def on_step(step, total, metrics):
        losses.append(metrics["loss"])
        gradient_norms.append(metrics["grad_norm"])
        parameters.append(torch.cat([parameter.detach().flatten() for parameter in trainer.model.parameters()]))

    trainer.fit(data, on_step=on_step)
    record = {"loss": losses, "grad_norm": gradient_norms, "parameters": parameters, "shares": shares}
    torch.save(record, Path(folder) / f"rank{rank}.pt")

    # Rank 0 releases the others as the command-line program does when it ends.
    if rank != 0:
        assert distributed.receive_training(session) is None
    distributed.finish(session)

    # Leave as the command-line workers do, before gloo's threads can abort the interpreter's shutdown.
    os._exit(0)


def train_alone(batching: str) -> dict:
    """Train the same recipe in this process on the same global batches."""
    data = make_data()
    shares = record_shares(data)
    result = build_trainer(make_recipe(batching)).fit(data)
    return {"loss": result.history["loss"], "grad_norm": result.history["grad_norm"], "shares": shares}


def run_two_ranks(batching: str, folder: Path) -> list[dict]:
    init_method = f"tcp://127.0.0.1:{distributed._free_port()}"
    context = multiprocessing.start_processes(
        train_rank, args=(2, init_method, batching, str(folder)), nprocs=2, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 180
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the two training processes did not finish within 180 s")
    return [torch.load(folder / f"rank{rank}.pt", weights_only=True) for rank in range(2)]


@pytest.mark.parametrize("batching", ["per-target", "population"])
def test_two_gloo_processes_match_one(batching, tmp_path):
    ranks = run_two_ranks(batching, tmp_path)
    alone = train_alone(batching)

    steps = len(alone["loss"])
    assert steps == 6
    for rank in ranks:
        assert len(rank["parameters"]) == steps
    for step in range(steps):
        assert torch.equal(ranks[0]["parameters"][step], ranks[1]["parameters"][step]), f"ranks differ after step {step + 1}"

    # Both ranks report the loss of the whole global batch, which one process computes within float rounding.
    assert ranks[0]["loss"] == ranks[1]["loss"]
    np.testing.assert_allclose(ranks[0]["loss"], alone["loss"], rtol=LOSS_RTOL)
    # AdamW hides a wrong gradient scale from the loss curve, so compare the gradient norms too.
    np.testing.assert_allclose(ranks[0]["grad_norm"], alone["grad_norm"], rtol=1e-4)

    # The shares of one step are disjoint, contiguous and together the single process's batch.
    for step in range(steps):
        first, second = ranks[0]["shares"][step], ranks[1]["shares"][step]
        assert first and second
        assert first + second == alone["shares"][step]
        if batching == "per-target":
            assert not set(first) & set(second)


def test_share_split_by_rank():
    recipe = make_recipe("per-target")
    trainer = build_trainer(recipe)
    trainer.session = type("Session", (), {"rank": 1, "world_size": 3})()

    assert trainer._share(10) == (3, 6)
    trainer.session.rank = 2
    assert trainer._share(10) == (6, 10)


TINY_SIMULATED = """\
name: tiny-nproc
sources:
  - simulate: {animals: 2, first_seed: 0, neurons: 12, duration_s: 12}
labels:
  cell_type: {from: units.cell_type}
segments: {bin_size_s: 0.01, bins_per_patch: 8, patches: 8, neighbours: 3, distance_bins: 4}
model: {dim: 16, heads: 2, temporal_layers: 1, spatiotemporal_layers: 1, projector: [32, 32], batching: population}
train: {epochs: 1, steps_per_epoch: 4, batch_size: 8, lr: 1.0e-3, device: cpu}
evaluate: {folds: 2, probe: knn, knn_neighbours: 3}
"""


def test_train_cli_with_two_processes(tmp_path):
    (tmp_path / "tiny.yaml").write_text(TINY_SIMULATED)

    result = run_cli("train", "tiny.yaml", "--nproc", "2", "--output", "run", "--no-progress", cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["training"]["steps"] == 4
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "population batching, 2 processes" in log
    assert sorted(path.name for path in (tmp_path / "run" / "nwb").iterdir()) == ["sim-animal-0.nwb", "sim-animal-1.nwb"]


@pytest.mark.slow
def test_train_under_torchrun(tmp_path):
    (tmp_path / "tiny.yaml").write_text(TINY_SIMULATED)
    endpoint = f"127.0.0.1:{distributed._free_port()}"
    launcher = ["-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint]

    result = subprocess.run(
        [sys.executable, *launcher, "-m", "neurpir_nwb", "train", "tiny.yaml", "--output", "run", "--no-progress"],
        cwd=tmp_path,
        env=ENVIRONMENT,
        capture_output=True,
        text=True,
        timeout=600,
    )

    assert result.returncode == 0, result.stderr
    assert "population batching, 2 processes" in (tmp_path / "run" / "log.txt").read_text()
    assert "process 1 of 2" not in result.stderr
    assert (tmp_path / "run" / "metrics.json").is_file()
