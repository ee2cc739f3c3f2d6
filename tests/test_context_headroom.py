"""The context-headroom script on tiny simulated animals: it reads the files and scores every feature set."""

import json
import subprocess
import sys
from pathlib import Path

from neurpir_nwb.simulate import SimulationSettings, simulate_dataset

REPOSITORY = Path(__file__).resolve().parents[1]


def test_headroom_scores_every_feature_set(tmp_path):
    settings = SimulationSettings(
        n_neurons=60, duration_s=20.0, layout="laminar", fast_input_sd=2.5, population_coupling={"CH": 0.9, "FS": 0.9},
    )  # fmt: skip
    simulate_dataset(tmp_path / "simulated", settings, [0, 1, 2])
    output = tmp_path / "headroom.json"

    completed = subprocess.run(
        [sys.executable, str(REPOSITORY / "benchmarks" / "context_headroom.py"), str(tmp_path / "simulated"), "--output", str(output)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip

    assert completed.returncode == 0, completed.stderr
    results = json.loads(output.read_text())
    assert results["test_subject"] == "sim-animal-2"
    assert sorted(results["scores"]) == ["own", "own + coupling", "own + layer"]
    for values in results["scores"].values():
        assert 0.0 <= values["in_domain"] <= 1.0
        assert 0.0 <= values["out_of_domain"] <= 1.0
    assert "| own + coupling |" in completed.stdout
