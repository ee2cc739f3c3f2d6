"""Recipe loading, validation messages and the exported JSON Schema."""

import json
from pathlib import Path
from typing import get_args

import pytest

from neurpir_nwb.errors import RecipeError
from neurpir_nwb.recipe import NeuronType, load_recipe, recipe_json_schema
from neurpir_nwb.simulate import NEURON_TYPES

REPOSITORY = Path(__file__).resolve().parents[1]


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_sources_relative_to_recipe(tmp_path):
    folder = tmp_path / "recipes"
    folder.mkdir()
    recipe = load_recipe(write(folder / "r.yaml", "name: r\nsources:\n  - path: ../data/a.nwb\n"))

    assert recipe.source_paths == [(tmp_path / "data" / "a.nwb").resolve()]
    assert recipe.output_dir == Path("runs") / "r"


def test_source_and_output_overrides(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path / "r.yaml", "name: r\nsources:\n  - path: a.nwb\noutput: {dir: runs/x}\n")

    recipe = load_recipe(path, sources=["b.nwb", "c.nwb"], output="elsewhere")

    assert recipe.source_paths == [(tmp_path / "b.nwb").resolve(), (tmp_path / "c.nwb").resolve()]
    assert recipe.output_dir == Path("elsewhere")


def test_defaults_filled_in(tmp_path):
    recipe = load_recipe(write(tmp_path / "r.yaml", "name: r\nsources: [{path: a.nwb}]\n"))

    resolved = recipe.resolved()
    assert resolved["segments"]["bin_size_s"] == 0.02
    assert resolved["train"]["device"] == "auto"
    assert resolved["loss"] == {"name": "vicreg", "invariance": 25.0, "variance": 25.0, "covariance": 1.0}
    assert recipe.segments.window_s == pytest.approx(0.02 * 16 * 32)


def test_unknown_key_names_line_and_allowed(tmp_path):
    text = "name: r\nsources:\n  - path: a.nwb\nsegments:\n  bin_size_s: 0.02\n  neighbors: 4\n"
    with pytest.raises(RecipeError) as caught:
        load_recipe(write(tmp_path / "r.yaml", text))

    message = str(caught.value)
    assert "line 6" in message
    assert "unknown key 'segments.neighbors'" in message
    assert "did you mean 'neighbours'" in message
    assert "bin_size_s" in message
    assert "patches" in message


def test_unknown_top_level_key(tmp_path):
    with pytest.raises(RecipeError, match=r"line 3: unknown key 'trian'.*did you mean 'train'"):
        load_recipe(write(tmp_path / "r.yaml", "name: r\nsources: [{path: a.nwb}]\ntrian: {epochs: 1}\n"))


def test_unknown_key_inside_label(tmp_path):
    text = "name: r\nsources: [{path: a.nwb}]\nlabels:\n  region: {from: electrodes.location, feild: x}\n"
    with pytest.raises(RecipeError, match=r"line 4: unknown key 'labels.region.feild'; allowed keys here: column, drop, field, from, merge, normalise, table; did you mean 'field'"):
        load_recipe(write(tmp_path / "r.yaml", text))


def test_unknown_key_inside_simulation(tmp_path):
    text = "name: r\nsources:\n  - simulate:\n      animals: 2\n      populaton_coupling: {FS: 0.5}\n"
    expected = (
        r"line 5: unknown key 'sources.0.simulate.populaton_coupling'; allowed keys here: animals, duration_s, "
        r"fast_input_sd, .*; did you mean 'population_coupling'"
    )
    with pytest.raises(RecipeError, match=expected):
        load_recipe(write(tmp_path / "r.yaml", text))


@pytest.mark.parametrize(
    ("simulate", "expected"),
    [
        ("{fast_input_sd: 2, population_coupling: {FS: 1.5}}", r"invalid value 1.5 for 'sources.0.simulate.population_coupling.FS'.*less than or equal to 1"),
        ("{fast_input_sd: 2, population_coupling: {PV: 0.5}}", r"invalid value 'PV' for 'sources.0.simulate.population_coupling.PV': .*'RS', 'IB', 'CH', 'FS' or 'LTS'"),
        ("{type_mix: {RS: 0.5, PV: 0.5}}", r"invalid value 'PV' for 'sources.0.simulate.type_mix.PV'"),
        ("{population_coupling: {FS: 0.5}}", r"invalid 'sources.0.simulate': population_coupling has no effect while fast_input_sd is 0.*set fast_input_sd above 0"),
    ],
)
def test_simulation_values_checked_on_load(tmp_path, simulate, expected):
    text = f"name: r\nsources:\n  - simulate: {simulate}\n"
    with pytest.raises(RecipeError, match=f"line 3: {expected}"):
        load_recipe(write(tmp_path / "r.yaml", text))


def test_wrong_type_names_value(tmp_path):
    text = "name: r\nsources: [{path: a.nwb}]\ntrain:\n  epochs: ten\n"
    with pytest.raises(RecipeError, match=r"line 4: invalid value 'ten' for 'train.epochs'"):
        load_recipe(write(tmp_path / "r.yaml", text))


def test_wrong_choice_lists_allowed(tmp_path):
    text = "name: r\nsources: [{path: a.nwb}]\ntrain: {device: gpu}\n"
    with pytest.raises(RecipeError, match=r"'gpu' for 'train.device'.*'auto', 'cpu' or 'cuda'"):
        load_recipe(write(tmp_path / "r.yaml", text))


def test_head_size_must_be_even(tmp_path):
    text = "name: r\nsources: [{path: a.nwb}]\nmodel: {dim: 20, heads: 4}\n"
    with pytest.raises(RecipeError, match=r"head size of 5; rotary positions need an even whole head size"):
        load_recipe(write(tmp_path / "r.yaml", text))
    text = "name: r\nsources: [{path: a.nwb}]\nmodel: {dim: 30, heads: 4}\n"
    with pytest.raises(RecipeError, match=r"invalid 'model': dim 30 with 4 heads"):
        load_recipe(write(tmp_path / "r.yaml", text))


def test_missing_sources(tmp_path):
    with pytest.raises(RecipeError, match=r"missing required key 'sources'"):
        load_recipe(write(tmp_path / "r.yaml", "name: r\n"))


def test_probe_label_must_exist(tmp_path):
    text = "name: r\nsources: [{path: a.nwb}]\nevaluate: {label: region}\n"
    with pytest.raises(RecipeError, match=r"evaluate.label 'region' is not a label"):
        load_recipe(write(tmp_path / "r.yaml", text))


def test_invalid_yaml(tmp_path):
    with pytest.raises(RecipeError, match=r"is not valid YAML"):
        load_recipe(write(tmp_path / "r.yaml", "name: [r\n"))


def test_hash_changes_with_content(tmp_path):
    first = load_recipe(write(tmp_path / "a.yaml", "name: r\nsources: [{path: a.nwb}]\n"))
    second = load_recipe(write(tmp_path / "b.yaml", "name: r\nsources: [{path: a.nwb}]\ntrain: {epochs: 3}\n"))

    assert first.sha256() != second.sha256()
    assert first.data_sha256() == second.data_sha256()


@pytest.mark.parametrize("name", sorted(path.name for path in (REPOSITORY / "recipes").glob("*.yaml")))
def test_shipped_recipes_validate(name):
    recipe = load_recipe(REPOSITORY / "recipes" / name)
    assert recipe.name == name.removesuffix(".yaml")


def test_exported_schema_is_current():
    exported = json.loads((REPOSITORY / "schemas" / "recipe.schema.json").read_text())
    assert exported == recipe_json_schema(), "regenerate it with: python -m neurpir_nwb.recipe"


def test_bundled_recipe_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe("izhikevich")

    assert recipe.name == "izhikevich"
    assert recipe.simulations[0].animals == 4


def test_unknown_recipe_lists_bundled(tmp_path):
    with pytest.raises(RecipeError, match=r"bundled recipe \(celegans-timeseries, human-mtl-regions, izhikevich, izhikevich-coupling, ophys-example\)"):
        load_recipe(tmp_path / "nope.yaml")


def test_rate_sets_bin_width_for_traces(tmp_path):
    text = "name: r\nsources:\n  - path: a.nwb\n    ophys: {source: auto}\nsegments: {rate_hz: 4, bins_per_patch: 2, patches: 3}\n"
    recipe = load_recipe(write(tmp_path / "r.yaml", text))

    assert recipe.segments.bin_width_s == pytest.approx(0.25)
    assert recipe.segments.window_s == pytest.approx(1.5)


def test_rate_rejected_for_spike_trains(tmp_path):
    text = "name: r\nsources: [{path: a.nwb}]\nsegments: {rate_hz: 4}\n"
    with pytest.raises(RecipeError, match=r"segments.rate_hz resamples traces of ophys sources"):
        load_recipe(write(tmp_path / "r.yaml", text))


def test_recipe_type_names_match_simulator():
    assert list(get_args(NeuronType)) == list(NEURON_TYPES)
