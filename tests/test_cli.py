"""The command-line program, run as a user runs it: a subprocess with real files."""

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from neurpir_nwb._version import __version__

REPOSITORY = Path(__file__).resolve().parents[1]

TINY_RECIPE = """\
name: tiny-mtl
sources:
  - path: missing.nwb
labels:
  region: {from: electrodes.location}
segments: {bin_size_s: 0.05, bins_per_patch: 8, patches: 8, neighbours: 3, distance_bins: 4}
model: {dim: 16, heads: 2, temporal_layers: 1, spatiotemporal_layers: 1, projector: [32, 32]}
train: {epochs: 2, steps_per_epoch: 4, batch_size: 16, lr: 1.0e-3, device: cpu, seed: 0}
evaluate: {folds: 3}
"""


def run_cli(*arguments: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run ``python -m neurpir_nwb`` with the arguments and return the finished process."""
    environment = {**os.environ, "PYTHONPATH": str(REPOSITORY), "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "neurpir_nwb", *arguments],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """Check exit status 2, a single error line naming the fragments, and no traceback."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    error_lines = [line for line in lines if line.startswith("error:")]
    assert len(error_lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in error_lines[0], error_lines[0]


def test_version(tmp_path):
    result = run_cli("--version", cwd=tmp_path)

    assert result.returncode == 0
    assert result.stdout.strip() == f"neurpir-nwb {__version__}"


def test_help_lists_train(tmp_path):
    result = run_cli("--help", cwd=tmp_path)

    assert result.returncode == 0
    assert "train" in result.stdout


def test_train_help_names_overrides(tmp_path):
    result = run_cli("train", "--help", cwd=tmp_path)

    assert result.returncode == 0
    assert "--source" in result.stdout
    assert "Overrides the recipe's sources" in result.stdout


def test_typo_in_key(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(TINY_RECIPE.replace("neighbours: 3", "neighbors: 3"))

    result = run_cli("train", str(recipe), cwd=tmp_path)

    assert_one_line_error(result, "line 6", "segments.neighbors", "did you mean 'neighbours'")


def test_missing_source(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(TINY_RECIPE)

    result = run_cli("train", str(recipe), cwd=tmp_path)

    assert_one_line_error(result, "missing.nwb", "not found")
    assert not (tmp_path / "runs").exists()


def test_source_not_nwb(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(TINY_RECIPE)
    fake = tmp_path / "notes.nwb"
    fake.write_text("these are lab notes, not an NWB file\n")

    result = run_cli("train", str(recipe), "--source", str(fake), "--output", "runs/x", cwd=tmp_path)

    assert_one_line_error(result, "notes.nwb", "not an NWB file")


def test_train_on_real_file(tmp_path, shared_data):
    source = shared_data / "nwb" / "real" / "human_mtl_sub-4_ses-4.nwb"
    source_digest = sha256(source)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY_RECIPE)

    result = run_cli("train", str(recipe), "--source", str(source), "--output", "runs/mtl", "--no-progress", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "runs" / "mtl"

    # Metrics: probe, chance level and baseline.
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["n_neurons"] == 35
    assert metrics["probe"]["label"] == "region"
    for scores in (metrics["embedding"], metrics["baseline"]):
        assert 0.0 <= scores["macro_f1"] <= 1.0
        assert 0.0 <= scores["balanced_accuracy"] <= 1.0
    assert metrics["embedding"]["chance_balanced_accuracy"] == pytest.approx(0.5)
    assert metrics["training"]["windows_per_s"] > 0

    # Every artefact of the run directory.
    for name in ("recipe.yaml", "log.txt", "segments.nc", "embeddings.nc", "model/weights.pt", "model/config.json",
                 "model/probe.json", "model/provenance.json", "model/checkpoint.pt",
                 "figures/confusion_embedding.png", "figures/embedding_map.png", "figures/training_curve.png"):
        assert (run_dir / name).is_file(), name
    log = (run_dir / "log.txt").read_text()
    assert log.splitlines()[0].endswith(f"neurpir-nwb {__version__}")
    assert "command line:" in log

    # The output NWB, read in a process that never imports neurpir_nwb.
    outputs = list((run_dir / "nwb").glob("*.nwb"))
    assert [path.name for path in outputs] == [source.name]
    check = textwrap.dedent(
        f"""
        import sys, h5py, numpy as np
        from pynwb import NWBHDF5IO
        with NWBHDF5IO({str(outputs[0])!r}, "r") as io:
            nwb = io.read()
            table = nwb.processing["neurpir"]["embeddings"]
            rows = table["unit"].data[:]
            assert len(table) == 35, len(table)
            assert table["unit"].table is nwb.units
            assert sorted(rows.tolist()) == list(range(35))
            assert np.asarray(table["embedding"].data).shape == (35, 16)
            labels = set(np.asarray(table["predicted_label"].data[:]).astype(str))
            assert labels <= {{"hippocampus_right", "amygdala_right"}}, labels
        assert "neurpir_nwb" not in sys.modules
        print("ok")
        """
    )
    read = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, cwd=tmp_path)
    assert read.returncode == 0, read.stderr
    assert read.stdout.strip() == "ok"

    # The source is untouched.
    assert sha256(source) == source_digest

    # A second run into the same directory is refused, then allowed with --overwrite.
    again = run_cli("train", str(recipe), "--source", str(source), "--output", "runs/mtl", "--no-progress", cwd=tmp_path)
    assert_one_line_error(again, "already contains results", "--overwrite")
    again = run_cli("train", str(recipe), "--source", str(source), "--output", "runs/mtl", "--no-progress", "--overwrite", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "reusing the segment set" in (run_dir / "log.txt").read_text()


@pytest.mark.parametrize(
    "arguments",
    [["trian", "x.yaml"], ["train"], ["--verison"], ["train", "r.yaml", "--device", "gpu"]],
    ids=["unknown-command", "missing-recipe", "unknown-option", "invalid-device"],
)
def test_usage_errors_without_traceback(tmp_path, arguments):
    result = run_cli(*arguments, cwd=tmp_path)

    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "Error" in result.stderr


def test_no_arguments_prints_help(tmp_path):
    result = run_cli(cwd=tmp_path)

    assert "Traceback" not in result.stderr
    assert "train" in result.stdout + result.stderr
