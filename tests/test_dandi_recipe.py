"""Recipes whose sources are DANDI assets, trained end to end against a DANDI test instance on 127.0.0.1."""

import hashlib
import json
from pathlib import Path

import h5py
import pytest

from neurpir_nwb.errors import RecipeError, SourceError
from neurpir_nwb.pipeline import run_recipe
from neurpir_nwb.recipe import load_recipe
from tests.dandi_server import (  # noqa: F401 (dandi_server is a fixture)
    LATEST_ASSETS,
    LATEST_VERSION,
    PUBLISHED_ID,
    dandi_server,
    standard_files,
)
from tests.test_cli import assert_one_line_error, run_cli

#: The latest published version serves three files with 12 units in all.
ASSET_PATHS = sorted(LATEST_ASSETS)

RECIPE = """\
name: dandi-source
sources:
  - dandi: {reference}
    path: "sub-*/*.nwb"
    cache: cache
    api_url: {api_url}
units: {{sort_spikes: true}}
segments: {{bin_size_s: 0.02, bins_per_patch: 4, patches: 4, neighbours: 2, distance_bins: 4}}
model: {{dim: 8, heads: 2, temporal_layers: 1, spatiotemporal_layers: 1, projector: [16, 16]}}
train: {{epochs: 1, steps_per_epoch: 2, batch_size: 8, lr: 1.0e-3, device: cpu}}
"""

pytestmark = pytest.mark.network


def write_recipe(folder: Path, api_url: str, reference: str = f"DANDI:{PUBLISHED_ID}", **changes: str) -> Path:
    text = RECIPE.format(reference=reference, api_url=api_url)
    for old, new in changes.items():
        text = text.replace(old, new)
    path = folder / "recipe.yaml"
    path.write_text(text)
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_recipe_trains_on_downloaded_assets(dandi_server, shared_data, tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, dandi_server.api_url), output=tmp_path / "run")
    served = standard_files(shared_data)

    summary = run_recipe(recipe)

    # The verified assets of the latest version are in the cache, and the outputs are only in the run directory.
    cache = tmp_path / "cache" / PUBLISHED_ID
    for asset_path in ASSET_PATHS:
        assert sha256(cache / asset_path) == sha256(served[LATEST_ASSETS[asset_path]])
    assert sorted(summary.outputs) == sorted(tmp_path / "run" / "nwb" / Path(path).name for path in ASSET_PATHS)
    assert sorted(path.relative_to(cache).as_posix() for path in cache.rglob("*.nwb")) == ASSET_PATHS

    # Provenance of each output table and of the model names the dandiset, version and asset.
    for asset_path in ASSET_PATHS:
        output = tmp_path / "run" / "nwb" / Path(asset_path).name
        with h5py.File(output, "r") as output_file:
            record = json.loads(output_file["processing/neurpir/embeddings"].attrs["provenance"])
        assert record["source"]["dandiset_id"] == PUBLISHED_ID
        assert record["source"]["dandiset_version"] == LATEST_VERSION
        assert record["source"]["asset_id"] == dandi_server.asset(asset_path).asset_id
        assert record["source"]["asset_path"] == asset_path

    model_provenance = json.loads((tmp_path / "run" / "model" / "provenance.json").read_text())
    asset_ids = sorted(record["asset_id"] for record in model_provenance["training_sources"])
    assert asset_ids == sorted(dandi_server.asset(path).asset_id for path in ASSET_PATHS)
    assert {record["dandiset_version"] for record in model_provenance["training_sources"]} == {LATEST_VERSION}

    # A second run finds the verified assets in the cache and downloads nothing.
    dandi_server.clear_records()
    run_recipe(load_recipe(tmp_path / "recipe.yaml", output=tmp_path / "run"), overwrite=True)
    assert dandi_server.blob_records() == []


def test_run_directory_inside_cache_rejected(dandi_server, tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, dandi_server.api_url), output=tmp_path / "cache" / "run")

    with pytest.raises(SourceError, match="outputs never go into the downloaded tree"):
        run_recipe(recipe)


def test_glob_without_assets_names_the_glob(dandi_server, tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, dandi_server.api_url, **{"sub-*/*.nwb": "sub-none/*.nwb"}), output=tmp_path / "run")

    with pytest.raises(SourceError, match="sub-none"):
        run_recipe(recipe)


def test_bad_reference_is_a_recipe_error(tmp_path):
    path = write_recipe(tmp_path, "http://127.0.0.1:9/api", reference="DANDI:21")

    with pytest.raises(RecipeError, match="DANDI:21"):
        load_recipe(path)


def test_dandi_options_need_a_dandi_source(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("name: x\nsources:\n  - path: a.nwb\n    mode: stream\n")

    with pytest.raises(RecipeError, match="apply to 'dandi' sources only"):
        load_recipe(path)


@pytest.mark.slow
def test_cli_trains_from_dandi_source(dandi_server, tmp_path):
    recipe_path = write_recipe(tmp_path, dandi_server.api_url)

    result = run_cli("train", str(recipe_path), "--output", str(tmp_path / "run"), "--no-progress", cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert sorted(path.name for path in (tmp_path / "run" / "nwb").iterdir()) == sorted(Path(path).name for path in ASSET_PATHS)


def test_cli_reports_unknown_dandiset(dandi_server, tmp_path):
    recipe_path = write_recipe(tmp_path, dandi_server.api_url, reference="DANDI:000999")

    result = run_cli("train", str(recipe_path), "--output", str(tmp_path / "run"), "--no-progress", cwd=tmp_path)

    assert_one_line_error(result, "000999")
