"""Checkpoints and --resume: an interrupted run ends with the weights of an uninterrupted one."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from neurpir_nwb.errors import RunDirectoryError, TrainingError
from neurpir_nwb.model import EncoderConfig, NeurPIREncoder, Projector, VICRegLoss
from neurpir_nwb.pipeline import prepare_run_directory
from neurpir_nwb.recipe import load_recipe
from neurpir_nwb.segments import SegmentSettings, build_segment_set
from neurpir_nwb.train import TrainConfig, Trainer, WindowData, load_checkpoint
from tests.test_cli import REPOSITORY, assert_one_line_error
from tests.test_segments import make_recording

SETTINGS = SegmentSettings(bin_size_s=0.1, bins_per_patch=4, patches=4, neighbours=2, distance_bins=4)


@pytest.fixture(autouse=True)
def one_thread():
    """Train the tiny models on one thread: a second one only adds OpenMP synchronisation, which is slow on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Interrupted(Exception):
    """Raised by a step callback to stop a run the way a crash would."""


@pytest.fixture(scope="module")
def data():
    return WindowData(build_segment_set([make_recording(6, 32.0, rate_hz=8.0), make_recording(5, 16.0, identifier="b", seed=3)], SETTINGS))


def make_trainer(batching: str, **settings) -> Trainer:
    torch.manual_seed(0)
    config = EncoderConfig(
        bins_per_patch=4, patches=4, dim=16, heads=2, temporal_layers=1, spatiotemporal_layers=1, distance_bins=4, dropout=0.1, batching=batching
    )
    options = {"epochs": 2, "steps_per_epoch": 5, "batch_size": 6, "lr": 3e-3, "device": "cpu", "neighbour_dropout": 0.3, "checkpoint_steps": 3, "seed": 2}
    return Trainer(NeurPIREncoder(config), Projector(16, [32, 32]), VICRegLoss(), TrainConfig(**{**options, **settings}))


def stop_after(step_number: int):
    def on_step(step, total, metrics):
        if step == step_number:
            raise Interrupted

    return on_step


@pytest.mark.parametrize("batching", ["per-target", "population"])
def test_resumed_fit_equals_uninterrupted(batching, data, tmp_path):
    uninterrupted = make_trainer(batching)
    expected = uninterrupted.fit(data, checkpoint_dir=tmp_path / "whole")

    # Stop during step 8: the last checkpoint is the one after step 6, in the middle of the second epoch.
    with pytest.raises(Interrupted):
        make_trainer(batching).fit(data, checkpoint_dir=tmp_path / "cut", on_step=stop_after(8))
    checkpoint = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    assert checkpoint["step"] == 6

    resumed = make_trainer(batching)
    resumed.load_checkpoint(checkpoint)
    result = resumed.fit(data, checkpoint_dir=tmp_path / "cut")

    for name, parameter in uninterrupted.model.state_dict().items():
        assert torch.equal(parameter, resumed.model.state_dict()[name]), name
    assert result.history == expected.history
    assert result.resumed_from_step == 6
    assert load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["step"] == 10


def test_resume_rejects_changed_settings(data, tmp_path):
    make_trainer("per-target").fit(data, checkpoint_dir=tmp_path)
    checkpoint = load_checkpoint(tmp_path / "checkpoint.pt")

    with pytest.raises(TrainingError, match=r"train.lr 0.003 -> 0.001"):
        make_trainer("per-target", lr=1e-3).load_checkpoint(checkpoint)
    with pytest.raises(TrainingError, match=r"the checkpoint's encoder .* differs from the recipe's encoder"):
        make_trainer("population").load_checkpoint(checkpoint)


def test_missing_checkpoint_reported(tmp_path):
    with pytest.raises(TrainingError, match=r"checkpoint .*checkpoint.pt not found; start the run without --resume"):
        load_checkpoint(tmp_path / "checkpoint.pt")


RUN_GUARD_RECIPE = """\
name: guard
sources:
  - simulate: {animals: 1, neurons: 4, duration_s: 5}
"""


def test_run_directory_guard_lets_resume_through(tmp_path):
    (tmp_path / "r.yaml").write_text(RUN_GUARD_RECIPE)
    recipe = load_recipe(tmp_path / "r.yaml", output=tmp_path / "run")

    with pytest.raises(RunDirectoryError, match=r"no checkpoint to resume: .*checkpoint.pt not found"):
        prepare_run_directory(recipe, resume=True)

    # An interrupted run leaves model/checkpoint.pt; a finished one also leaves metrics and outputs.
    run_dir = prepare_run_directory(recipe)
    (run_dir / "model").mkdir()
    (run_dir / "model" / "checkpoint.pt").write_bytes(b"state")
    (run_dir / "metrics.json").write_text("{}")
    with pytest.raises(RunDirectoryError, match=r"already contains results .*\. Pass --resume to continue its training"):
        prepare_run_directory(recipe)
    with pytest.raises(RunDirectoryError, match=r"pass only one of them"):
        prepare_run_directory(recipe, resume=True, overwrite=True)

    prepare_run_directory(recipe, resume=True)
    assert (run_dir / "model" / "checkpoint.pt").read_bytes() == b"state"
    assert not (run_dir / "metrics.json").exists()


KILL_RECIPE = """\
name: tiny-resume
sources:
  - simulate: {animals: 2, first_seed: 0, neurons: 12, duration_s: 12}
labels:
  cell_type: {from: units.cell_type}
segments: {bin_size_s: 0.01, bins_per_patch: 8, patches: 8, neighbours: 3, distance_bins: 4}
model: {dim: 16, heads: 2, temporal_layers: 1, spatiotemporal_layers: 1, projector: [32, 32], dropout: 0.1}
train: {epochs: 2, steps_per_epoch: 40, batch_size: 12, lr: 1.0e-3, device: cpu, neighbour_dropout: 0.2, checkpoint_steps: 3}
evaluate: {folds: 2, probe: knn, knn_neighbours: 3}
"""


# One thread per run: the tiny model gains nothing from a second one, and on a busy machine
# OpenMP's synchronisation between two threads makes each step about ten times slower.
ENVIRONMENT = {**os.environ, "PYTHONPATH": str(REPOSITORY), "OMP_NUM_THREADS": "1", "COLUMNS": "200"}


def run_cli(*arguments: str, cwd) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "neurpir_nwb", *arguments]
    return subprocess.run(command, cwd=cwd, env=ENVIRONMENT, capture_output=True, text=True, timeout=600)


def start_cli(*arguments: str, cwd) -> subprocess.Popen:
    command = [sys.executable, "-m", "neurpir_nwb", *arguments]
    return subprocess.Popen(command, cwd=cwd, env=ENVIRONMENT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def kill_after_first_checkpoint(process: subprocess.Popen, checkpoint) -> None:
    """SIGKILL the process as soon as the checkpoint file appears."""
    deadline = time.monotonic() + 300
    while not checkpoint.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"no checkpoint appeared at {checkpoint} before the run ended (exit status {process.returncode})")
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)


def test_killed_run_resumes_to_same_weights(tmp_path):
    (tmp_path / "tiny.yaml").write_text(KILL_RECIPE)

    whole = run_cli("train", "tiny.yaml", "--output", "whole", "--no-progress", cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr

    process = start_cli("train", "tiny.yaml", "--output", "cut", "--no-progress", cwd=tmp_path)
    kill_after_first_checkpoint(process, tmp_path / "cut" / "model" / "checkpoint.pt")
    assert process.returncode == -signal.SIGKILL
    interrupted = load_checkpoint(tmp_path / "cut" / "model" / "checkpoint.pt")
    assert interrupted["step"] < 80
    assert interrupted["step"] % 40 != 0, "the run was killed at an epoch boundary, not in the middle of an epoch"
    assert not (tmp_path / "cut" / "metrics.json").exists()

    rerun = run_cli("train", "tiny.yaml", "--output", "cut", "--no-progress", cwd=tmp_path)
    assert_one_line_error(rerun, "already contains results", "--resume")

    resumed = run_cli("train", "tiny.yaml", "--output", "cut", "--resume", "--no-progress", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr

    expected = load_checkpoint(tmp_path / "whole" / "model" / "checkpoint.pt")
    final = load_checkpoint(tmp_path / "cut" / "model" / "checkpoint.pt")
    assert final["step"] == expected["step"] == 80
    for module in ("encoder", "projector"):
        for name, parameter in expected[module].items():
            assert torch.equal(parameter, final[module][name]), f"{module}.{name}"
    weights = [torch.load(tmp_path / run / "model" / "weights.pt", weights_only=True) for run in ("whole", "cut")]
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
    np.testing.assert_array_equal(final["history"]["loss"], expected["history"]["loss"])
