"""No data lost: a write killed or stopped by a full disk leaves no partial file at the final path.

The writers are run in subprocesses. A kill test pauses the child inside HDF5 writing
(pynwb's dataset writes) and sends SIGKILL. A full-disk test lowers RLIMIT_FSIZE in
the child and ignores SIGXFSZ, so that writing past the limit fails with EFBIG as on a
full file system. The sha256 of the source files and of earlier outputs is compared
before and after.
"""

import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from neurpir_nwb.errors import ModelError, TrainingError
from neurpir_nwb.model import EncoderConfig, NeurPIREncoder
from neurpir_nwb.model_directory import CONFIG_FILE, WEIGHTS_FILE, load_model, sha256_file, write_model_directory
from neurpir_nwb.simulate import SimulationSettings, simulate_animal, write_animal_nwb
from neurpir_nwb.testing import poisson_spike_trains, write_units_nwb
from neurpir_nwb.train import load_checkpoint

REPOSITORY = Path(__file__).resolve().parents[1]
ENVIRONMENT = {**os.environ, "PYTHONPATH": str(REPOSITORY), "COLUMNS": "200"}

#: Seconds a test waits for the child to reach the paused write.
PAUSE_TIMEOUT_S = 240

# Run in the child: pause in pynwb's first dataset write to a file whose name matches
# argv[1] (a glob on the file name), touching the marker argv[2] first, then run the
# Python code in argv[3] with the remaining arguments.
PAUSING_CHILD = textwrap.dedent(
    """
    import fnmatch, sys, time
    from pathlib import Path
    from hdmf.backends.hdf5 import h5tools

    pattern, marker, code = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    sys.argv = [sys.argv[0], *sys.argv[4:]]
    original = h5tools.HDF5IO.write_dataset

    def pausing_write_dataset(self, *args, **kwargs):
        if fnmatch.fnmatch(Path(self.source).name, pattern):
            marker.touch()
            time.sleep(600)
        return original(self, *args, **kwargs)

    h5tools.HDF5IO.write_dataset = pausing_write_dataset
    exec(compile(code, "<child>", "exec"))
    """
)

WRITE_EMBEDDINGS = textwrap.dedent(
    """
    import numpy as np
    from neurpir_nwb.io.writer import EmbeddingBlock, write_embedding_tables_nwb

    source, output, overwrite = sys.argv[1], sys.argv[2], sys.argv[3] == "overwrite"
    rng = np.random.default_rng(int(sys.argv[4]))
    block = EmbeddingBlock(table="units", rows=np.arange(4), embeddings=rng.normal(size=(4, 8)).astype(np.float32))
    write_embedding_tables_nwb(
        source, output, blocks=[block], class_names=None,
        provenance={"neurpir_version": "0", "recipe_sha256": "ab" * 32, "model_name": "test"}, overwrite=overwrite,
    )
    print("written")
    """
)

WRITE_ANIMAL = textwrap.dedent(
    """
    from neurpir_nwb.simulate import SimulationSettings, simulate_animal, write_animal_nwb

    animal = simulate_animal(SimulationSettings(n_neurons=12, duration_s=5.0), seed=1)
    write_animal_nwb(animal, sys.argv[1], overwrite=sys.argv[2] == "overwrite")
    print("written")
    """
)

RUN_CLI = textwrap.dedent(
    """
    from neurpir_nwb.cli.app import main
    main(sys.argv[1:])
    """
)

TINY_RECIPE = """\
name: tiny-sim
sources:
  - simulate: {animals: 2, first_seed: 0, neurons: 16, duration_s: 12}
labels:
  cell_type: {from: units.cell_type}
segments: {bin_size_s: 0.01, bins_per_patch: 8, patches: 8, neighbours: 3, distance_bins: 4}
model: {dim: 16, heads: 2, temporal_layers: 1, spatiotemporal_layers: 1, projector: [32, 32]}
train: {epochs: 1, steps_per_epoch: 3, batch_size: 8, lr: 1.0e-3, device: cpu}
evaluate: {probe: knn, knn_neighbours: 3, folds: 2}
"""


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree_digests(folder: Path) -> dict[str, str]:
    """Return the sha256 of every file under ``folder``, by relative path."""
    return {str(path.relative_to(folder)): sha256(path) for path in sorted(folder.rglob("*")) if path.is_file()}


def start_paused(pattern: str, marker: Path, code: str, *arguments: str, cwd: Path) -> subprocess.Popen:
    """Start a child that runs ``code`` and pauses in the first dataset write to a file matching ``pattern``."""
    return subprocess.Popen(
        [sys.executable, "-c", PAUSING_CHILD, pattern, str(marker), code, *arguments],
        cwd=cwd,
        env=ENVIRONMENT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def kill_when_paused(child: subprocess.Popen, marker: Path) -> None:
    """Wait until the child touches the marker, then kill it with SIGKILL."""
    deadline = time.monotonic() + PAUSE_TIMEOUT_S
    while not marker.exists():
        if child.poll() is not None:
            _, stderr = child.communicate()
            pytest.fail(f"the child ended (status {child.returncode}) before it reached the write: {stderr[-2000:]}")
        if time.monotonic() > deadline:
            child.kill()
            pytest.fail("the child did not reach the write in time")
        time.sleep(0.02)

    child.send_signal(signal.SIGKILL)
    child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL


def limit_file_size(limit_bytes: int):
    """Return a preexec function that caps the size of any file the child writes, as a full disk would."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return apply


def run_limited(limit_bytes: int, code: str, *arguments: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "import sys\n" + code, *arguments],
        cwd=cwd,
        env=ENVIRONMENT,
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=limit_file_size(limit_bytes),
    )


def source_units_file(folder: Path) -> Path:
    return write_units_nwb(folder / "source.nwb", poisson_spike_trains(4, duration_s=20.0, seed=3), identifier="source")


# --- the NWB embedding writer --------------------------------------------------------------------


def test_killed_embedding_write_leaves_no_output(tmp_path):
    source = source_units_file(tmp_path)
    source_digest = sha256(source)
    output = tmp_path / "out" / "source.nwb"
    marker = tmp_path / "paused"

    child = start_paused(".source.nwb.partial-*", marker, WRITE_EMBEDDINGS, str(source), str(output), "new", "1", cwd=tmp_path)
    kill_when_paused(child, marker)

    assert not output.exists()
    leftovers = list(output.parent.iterdir())
    assert [path.name.startswith(".source.nwb.partial-") for path in leftovers] == [True]
    assert leftovers[0].stat().st_size > 0
    assert sha256(source) == source_digest


def test_killed_overwrite_keeps_earlier_output(tmp_path):
    source = source_units_file(tmp_path)
    output = tmp_path / "out" / "source.nwb"
    first = subprocess.run(
        [sys.executable, "-c", "import sys\n" + WRITE_EMBEDDINGS, str(source), str(output), "new", "1"],
        cwd=tmp_path, env=ENVIRONMENT, capture_output=True, text=True, timeout=300,
    )
    assert first.returncode == 0, first.stderr
    digests = {"source": sha256(source), "output": sha256(output)}
    marker = tmp_path / "paused"

    child = start_paused(".source.nwb.partial-*", marker, WRITE_EMBEDDINGS, str(source), str(output), "overwrite", "2", cwd=tmp_path)
    kill_when_paused(child, marker)

    assert {"source": sha256(source), "output": sha256(output)} == digests


@pytest.mark.parametrize("margin_bytes", [-4096, 2048], ids=["during-copy", "during-append"])
def test_full_disk_embedding_write(tmp_path, margin_bytes):
    source = source_units_file(tmp_path)
    output = tmp_path / "out" / "source.nwb"
    earlier = subprocess.run(
        [sys.executable, "-c", "import sys\n" + WRITE_EMBEDDINGS, str(source), str(output), "new", "1"],
        cwd=tmp_path, env=ENVIRONMENT, capture_output=True, text=True, timeout=300,
    )
    assert earlier.returncode == 0, earlier.stderr
    digests = {"source": sha256(source), "output": sha256(output)}

    result = run_limited(source.stat().st_size + margin_bytes, WRITE_EMBEDDINGS, str(source), str(output), "overwrite", "2", cwd=tmp_path)

    assert result.returncode != 0
    assert "written" not in result.stdout
    assert "File too large" in result.stderr or "EFBIG" in result.stderr or "errno = 27" in result.stderr
    assert {"source": sha256(source), "output": sha256(output)} == digests
    assert sorted(path.name for path in output.parent.iterdir()) == ["source.nwb"]


def test_full_disk_new_output_absent(tmp_path):
    source = source_units_file(tmp_path)
    output = tmp_path / "out" / "source.nwb"
    source_digest = sha256(source)

    result = run_limited(source.stat().st_size + 2048, WRITE_EMBEDDINGS, str(source), str(output), "new", "1", cwd=tmp_path)

    assert result.returncode != 0
    assert not output.exists()
    assert list(output.parent.iterdir()) == []
    assert sha256(source) == source_digest


# --- simulated animals --------------------------------------------------------------------------


def test_killed_animal_write_keeps_earlier_file(tmp_path):
    target = tmp_path / "sim" / "sim-animal-1.nwb"
    write_animal_nwb(simulate_animal(SimulationSettings(n_neurons=12, duration_s=5.0), seed=1), target)
    digest = sha256(target)
    marker = tmp_path / "paused"

    child = start_paused("sim-animal-1.nwb", marker, WRITE_ANIMAL, str(target), "overwrite", cwd=tmp_path)
    kill_when_paused(child, marker)

    assert sha256(target) == digest
    assert [path.name for path in target.parent.iterdir() if path.suffix == ".nwb"] == ["sim-animal-1.nwb"]


def test_full_disk_animal_write(tmp_path):
    target = tmp_path / "sim" / "sim-animal-1.nwb"

    result = run_limited(20_000, WRITE_ANIMAL, str(target), "new", cwd=tmp_path)

    assert result.returncode != 0
    assert not target.exists()
    assert [path for path in target.parent.rglob("*") if path.is_file()] == []


# --- a whole run -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def earlier_run(tmp_path_factory):
    """A finished tiny simulated run, the earlier outputs the later tests must leave intact."""
    folder = tmp_path_factory.mktemp("earlier")
    (folder / "tiny.yaml").write_text(TINY_RECIPE)
    result = subprocess.run(
        [sys.executable, "-m", "neurpir_nwb", "train", "tiny.yaml", "--output", "runs/first", "--no-progress"],
        cwd=folder, env=ENVIRONMENT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    return folder


@pytest.mark.slow
def test_killed_run_keeps_earlier_results(earlier_run):
    folder = earlier_run
    first = folder / "runs" / "first"
    digests = tree_digests(first)
    source = first / "simulated" / "sim-animal-0.nwb"
    marker = folder / "paused"

    child = start_paused(
        ".sim-animal-0.nwb.partial-*", marker, RUN_CLI,
        "train", "tiny.yaml", "--source", str(source), "--output", "runs/killed", "--no-progress", "--epochs", "1",
        cwd=folder,
    )
    kill_when_paused(child, marker)

    assert tree_digests(first) == digests
    assert not (folder / "runs" / "killed" / "nwb" / "sim-animal-0.nwb").exists()

    # The interrupted run's directory is not silently reused.
    again = subprocess.run(
        [sys.executable, "-m", "neurpir_nwb", "train", "tiny.yaml", "--source", str(source), "--output", "runs/killed", "--no-progress"],
        cwd=folder, env=ENVIRONMENT, capture_output=True, text=True, timeout=600,
    )
    assert again.returncode == 2
    assert "already contains results of an earlier run" in again.stderr
    assert tree_digests(first) == digests


@pytest.mark.slow
def test_full_disk_run_keeps_earlier_results(earlier_run):
    folder = earlier_run
    first = folder / "runs" / "first"
    digests = tree_digests(first)
    source = first / "simulated" / "sim-animal-0.nwb"

    result = subprocess.run(
        [sys.executable, "-m", "neurpir_nwb", "train", "tiny.yaml", "--source", str(source), "--output", "runs/full", "--no-progress"],
        cwd=folder,
        env=ENVIRONMENT,
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=limit_file_size(source.stat().st_size - 1),
    )

    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")][0].count("disk is full") == 1
    assert tree_digests(first) == digests
    outputs = folder / "runs" / "full" / "nwb"
    assert not (outputs / "sim-animal-0.nwb").exists()
    assert [path.name for path in outputs.iterdir()] == [] if outputs.exists() else True


# --- model files load without pickle --------------------------------------------------------------


def small_model_directory(folder: Path) -> Path:
    encoder = NeurPIREncoder(EncoderConfig(bins_per_patch=4, patches=4, dim=8, heads=2, temporal_layers=1, spatiotemporal_layers=1, distance_bins=3))
    segments = {"bin_size_s": 0.01, "bins_per_patch": 4, "patches": 4, "neighbours": 2, "distance_bins": 3, "distance_bin_edges": [1.0]}
    return write_model_directory(
        folder / "model",
        encoder=encoder,
        model_name="small",
        segments=segments,
        modality="ecephys",
        activity_transform="log1p",
        reader={"kind": "units", "sort_spikes": False},
        probe=None,
        label_name=None,
        provenance={"recipe_sha256": "00" * 32},
    )


#: Set by ``_record_unpickling`` when a pickled object is rebuilt.
UNPICKLED = []


def _record_unpickling(value):
    UNPICKLED.append(value)
    return value


class PickledPayload:
    """An object whose unpickling calls ``_record_unpickling``, as arbitrary code in a pickle would run."""

    def __reduce__(self):
        return (_record_unpickling, ("code ran",))


def test_weights_load_without_pickle(tmp_path):
    model_dir = small_model_directory(tmp_path)

    state = torch.load(model_dir / WEIGHTS_FILE, weights_only=True)
    loaded = load_model(model_dir)

    assert all(isinstance(value, torch.Tensor) for value in state.values())
    for name, value in loaded.encoder.state_dict().items():
        assert torch.equal(value, state[name])


def test_pickle_in_weights_rejected(tmp_path):
    model_dir = small_model_directory(tmp_path)
    weights = model_dir / WEIGHTS_FILE
    state = torch.load(weights, weights_only=True)
    torch.save({**state, "payload": PickledPayload()}, weights)
    config = json.loads((model_dir / CONFIG_FILE).read_text())
    config["weights"]["sha256"] = sha256_file(weights)
    (model_dir / CONFIG_FILE).write_text(json.dumps(config))

    with pytest.raises(ModelError) as error:
        load_model(model_dir)

    assert str(weights) in str(error.value)
    assert "could not be loaded as a state dict" in str(error.value)
    assert UNPICKLED == []


@pytest.mark.slow
def test_checkpoint_loads_without_pickle(earlier_run):
    checkpoint = earlier_run / "runs" / "first" / "model" / "checkpoint.pt"

    state = load_checkpoint(checkpoint)

    assert isinstance(state, dict)
    assert all(isinstance(key, str) for key in state)
    assert torch.load(checkpoint, weights_only=True).keys() == state.keys()


def test_pickle_in_checkpoint_rejected(tmp_path):
    checkpoint = tmp_path / "checkpoint.pt"
    torch.save({"step": 3, "payload": PickledPayload()}, checkpoint)

    with pytest.raises(TrainingError) as error:
        load_checkpoint(checkpoint)

    assert str(checkpoint) in str(error.value)
    assert UNPICKLED == []
