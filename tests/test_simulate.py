"""The Izhikevich network simulator: single-neuron behaviour, networks, NWB files and the command."""

import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
from nwbinspector import Importance, inspect_nwbfile
from pynwb import NWBHDF5IO, NWBFile

from neurpir_nwb.errors import RecipeError, RunDirectoryError
from neurpir_nwb.io.units import LabelSpec, read_units
from neurpir_nwb.simulate import (
    DEFAULT_TYPE_MIX,
    LAMINAR_LAYERS,
    NEURON_TYPES,
    SimulationSettings,
    read_simulation_notes,
    simulate_animal,
    simulate_dataset,
    simulate_neurons,
    write_animal_nwb,
)
from tests.test_cli import run_cli


# Constant input well above the rheobase of every type (4 for b = 0.2, about 1 for LTS).
STRONG_INPUT = 10.0

# Burst thresholds for constant input of 10. After a spike, CH resets to c = -50 mV, close
# to the spike threshold, so the next upstroke takes only a few ms (2 to 5 ms in this
# integration). Each spike adds d = 2 to u until the burst ends, and u then decays with
# the time constant 1 / a = 50 ms before the next burst. So an interval under 10 ms is
# within a burst, and the gap between bursts is at least 25 ms, half of 1 / a.
INTRA_BURST_MAX_S = 0.010
INTER_BURST_MIN_S = 0.025

TINY = SimulationSettings(n_neurons=30, duration_s=30.0)


def constant_input(duration_s: float, dt_ms: float = 1.0, level: float = STRONG_INPUT) -> np.ndarray:
    return np.full(int(round(duration_s * 1000.0 / dt_ms)), level)


def rate_hz(train: np.ndarray, duration_s: float) -> float:
    return len(train) / duration_s


def critical_messages(path: Path) -> list[str]:
    messages = inspect_nwbfile(nwbfile_path=str(path))
    return [f"{m.check_function_name}: {m.message}" for m in messages if m.importance == Importance.CRITICAL]


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory) -> list[Path]:
    """Files of seeds 0 and 1 of a 30-neuron, 30-second network."""
    return simulate_dataset(tmp_path_factory.mktemp("tiny"), TINY, [0, 1])


@pytest.fixture(scope="module")
def tiny_animal() -> object:
    return simulate_animal(TINY, 0)


# --- single neurons under constant input --------------------------------------------------


def test_fast_spiking_faster_than_regular():
    regular, fast = simulate_neurons([NEURON_TYPES["RS"], NEURON_TYPES["FS"]], constant_input(1.0))

    assert rate_hz(fast, 1.0) > 2 * rate_hz(regular, 1.0)
    assert rate_hz(regular, 1.0) > 5.0


def test_chattering_fires_in_bursts():
    (train,) = simulate_neurons(NEURON_TYPES["CH"], constant_input(2.0))
    intervals_s = np.diff(train)
    short = intervals_s < INTRA_BURST_MAX_S

    assert len(train) > 50
    assert short.mean() > 0.6
    assert (intervals_s[~short] >= INTER_BURST_MIN_S).all()
    assert (~short).sum() >= 10  # at least 10 separate bursts in 2 s


def test_regular_spiking_never_bursts():
    (train,) = simulate_neurons(NEURON_TYPES["RS"], constant_input(2.0))

    assert (np.diff(train) >= INTRA_BURST_MAX_S).all()


def test_regular_spiking_adapts():
    (train,) = simulate_neurons(NEURON_TYPES["RS"], constant_input(2.0))
    intervals_s = np.diff(train)

    assert intervals_s[0] < 0.75 * np.median(intervals_s[-5:])


def test_intrinsically_bursting_starts_with_burst():
    (train,) = simulate_neurons(NEURON_TYPES["IB"], constant_input(1.0))
    intervals_s = np.diff(train)

    assert (intervals_s[:2] < INTRA_BURST_MAX_S).all()
    assert (intervals_s[2:] > INTER_BURST_MIN_S).all()


def test_no_spikes_below_rheobase():
    trains = simulate_neurons(list(NEURON_TYPES.values()), constant_input(1.0, level=0.0))

    assert [len(train) for train in trains] == [0] * len(NEURON_TYPES)


def test_step_size_keeps_rates_close():
    coarse = simulate_neurons(list(NEURON_TYPES.values()), constant_input(1.0, dt_ms=1.0), dt_ms=1.0)
    fine = simulate_neurons(list(NEURON_TYPES.values()), constant_input(1.0, dt_ms=0.25), dt_ms=0.25)

    for name, train_coarse, train_fine in zip(NEURON_TYPES, coarse, fine):
        assert abs(len(train_coarse) - len(train_fine)) <= 0.3 * len(train_fine), name


def test_per_neuron_input_columns():
    current = np.zeros((500, 2))
    current[:, 1] = STRONG_INPUT
    silent, driven = simulate_neurons(NEURON_TYPES["RS"], current)

    assert len(silent) == 0
    assert len(driven) > 0


def test_input_shape_mismatch_rejected():
    with pytest.raises(ValueError, match="3 columns but 2 parameter sets"):
        simulate_neurons([NEURON_TYPES["RS"], NEURON_TYPES["FS"]], np.zeros((10, 3)))


def test_non_finite_input_rejected():
    current = constant_input(0.1)
    current[5] = np.nan

    with pytest.raises(ValueError, match="NaN or infinite"):
        simulate_neurons(NEURON_TYPES["RS"], current)


# --- networks ----------------------------------------------------------------------------


def test_types_fire_distinctly_in_network():
    animal = simulate_animal(SimulationSettings(n_neurons=100, duration_s=20.0), seed=3)
    rates = animal.firing_rates_hz()
    mean_rate = {name: rates[animal.cell_types == name].mean() for name in NEURON_TYPES}

    for name, rate in mean_rate.items():
        assert 1.0 <= rate <= 40.0, f"{name} fires at {rate:.1f} Hz"
    assert mean_rate["FS"] > mean_rate["RS"]
    assert mean_rate["CH"] > mean_rate["RS"]

    def short_fraction(name: str) -> float:
        rows = np.flatnonzero(animal.cell_types == name)
        intervals_s = np.concatenate([np.diff(animal.spike_times[row]) for row in rows])
        return float((intervals_s < INTRA_BURST_MAX_S).mean())

    assert short_fraction("CH") > 0.3
    assert short_fraction("RS") < 0.05


def test_type_counts_follow_mix():
    animal = simulate_animal(SimulationSettings(n_neurons=200, duration_s=0.1), seed=0)
    names, counts = np.unique(animal.cell_types, return_counts=True)

    assert dict(zip(names.tolist(), counts.tolist())) == {
        name: round(fraction * 200) for name, fraction in DEFAULT_TYPE_MIX.items()
    }


def test_counts_add_up_for_uneven_mix():
    settings = SimulationSettings(n_neurons=7, duration_s=0.1, type_mix={"RS": 1 / 3, "FS": 1 / 3, "LTS": 1 / 3})
    animal = simulate_animal(settings, seed=0)
    names, counts = np.unique(animal.cell_types, return_counts=True)

    assert set(names) == {"RS", "FS", "LTS"}
    assert counts.sum() == 7
    assert sorted(counts.tolist()) == [2, 2, 3]


def test_jitter_keeps_types_apart(tiny_animal):
    a, b, c, d = tiny_animal.parameters.T
    types = tiny_animal.cell_types

    assert (a[types == "FS"] > 0.08).all()
    assert (a[types != "FS"] < 0.03).all()
    assert (b[types == "LTS"] > 0.224).all()
    assert (b[types != "LTS"] < 0.221).all()
    assert (c[types == "IB"] < -52.9).all()
    assert (c[types == "CH"] > -52.1).all()
    assert not np.array_equal(a[types == "RS"], np.full((types == "RS").sum(), np.float32(0.02)))


def test_positions_inside_volume():
    settings = SimulationSettings(n_neurons=50, duration_s=0.1, volume_um=(100.0, 200.0, 300.0))
    positions = simulate_animal(settings, seed=1).positions_um

    assert (positions >= 0.0).all()
    assert (positions <= np.array([100.0, 200.0, 300.0])).all()


def layer_of(depth_fraction: np.ndarray) -> np.ndarray:
    bottoms = np.array([bottom for _, _, bottom in LAMINAR_LAYERS])
    return np.searchsorted(bottoms, depth_fraction, side="right").clip(max=len(bottoms) - 1)


def test_laminar_layout_places_types_by_layer():
    # 1,000 neurons and no activity: only positions matter. Expected shares from the layer
    # densities times thicknesses: IB in layer 5 0.70, CH in layer 2/3 0.72, FS in layer
    # 2/3 0.35 (the layer's thickness). With 150 or more neurons per type, the binomial
    # SD of a share is at most 0.04, so the thresholds below sit 3 SD or more away.
    settings = SimulationSettings(n_neurons=1000, duration_s=0.01, layout="laminar", volume_um=(400.0, 400.0, 800.0))
    animal = simulate_animal(settings, seed=2)
    layers = layer_of(animal.positions_um[:, 2] / 800.0)
    names = [name for name, _, _ in LAMINAR_LAYERS]

    def share(cell_type: str, layer: str) -> float:
        return float(np.mean(layers[animal.cell_types == cell_type] == names.index(layer)))

    assert share("IB", "L5") > 0.55
    assert share("CH", "L2/3") > 0.55
    assert 0.2 < share("FS", "L2/3") < 0.5
    assert (animal.positions_um >= 0).all()
    assert (animal.positions_um <= [400.0, 400.0, 800.0]).all()


def test_uniform_layout_ignores_type():
    settings = SimulationSettings(n_neurons=1000, duration_s=0.01)
    animal = simulate_animal(settings, seed=2)
    layers = layer_of(animal.positions_um[:, 2] / 500.0)

    assert np.mean(layers[animal.cell_types == "IB"] == 2) < 0.4
    assert np.mean(layers[animal.cell_types == "CH"] == 0) < 0.5


def test_layouts_share_types_and_parameters():
    uniform = simulate_animal(SimulationSettings(n_neurons=40, duration_s=0.01), seed=5)
    laminar = simulate_animal(SimulationSettings(n_neurons=40, duration_s=0.01, layout="laminar"), seed=5)

    assert np.array_equal(uniform.cell_types, laminar.cell_types)
    assert np.array_equal(uniform.parameters, laminar.parameters)
    assert np.array_equal(uniform.positions_um[:, :2], laminar.positions_um[:, :2])


def test_excitatory_follows_type(tiny_animal):
    expected = [NEURON_TYPES[name].excitatory for name in tiny_animal.cell_types]

    assert tiny_animal.excitatory.tolist() == expected


def test_input_drift_makes_rates_nonstationary():
    steady = SimulationSettings(n_neurons=60, duration_s=60.0, drift_shared_sd=0.0, drift_private_sd=0.0)
    drifting = SimulationSettings(n_neurons=60, duration_s=60.0)

    def window_rate_cv(settings: SimulationSettings) -> float:
        animal = simulate_animal(settings, seed=2)
        counts = np.histogram(np.concatenate(animal.spike_times), bins=12, range=(0.0, 60.0))[0]
        return float(counts.std() / counts.mean())

    drifting_cv, steady_cv = window_rate_cv(drifting), window_rate_cv(steady)
    assert drifting_cv > 0.1
    assert drifting_cv > 3 * steady_cv


def population_correlations(settings: SimulationSettings) -> tuple[dict[str, float], dict[str, float]]:
    """Return each type's mean correlation with the summed activity of all other neurons, and its mean rate in Hz."""
    animal = simulate_animal(settings, seed=2)
    n_bins = int(settings.duration_s / 0.16)
    counts = np.stack([np.histogram(train, bins=n_bins, range=(0.0, n_bins * 0.16))[0] for train in animal.spike_times])
    others = counts.sum(axis=0) - counts  # (neurons, bins)
    correlation = np.array([np.corrcoef(own, rest)[0, 1] for own, rest in zip(counts, others)])
    rates_hz = np.array([len(train) for train in animal.spike_times]) / settings.duration_s

    types = np.unique(animal.cell_types)
    mean_correlation = {name: float(correlation[animal.cell_types == name].mean()) for name in types}
    mean_rate_hz = {name: float(rates_hz[animal.cell_types == name].mean()) for name in types}
    return mean_correlation, mean_rate_hz


def test_population_coupling_follows_type_not_dynamics():
    # No synapses and no slow shared drift, so that the fast shared input is the only
    # source of correlation between neurons.
    base = dict(
        n_neurons=60, duration_s=60.0, type_mix={"RS": 0.5, "IB": 0.5}, excitatory_weight=0.0,
        inhibitory_weight=0.0, drift_shared_sd=0.0, fast_input_sd=2.5,
    )  # fmt: skip
    rs_coupled = population_correlations(SimulationSettings(**base, population_coupling={"RS": 0.9}))
    ib_coupled = population_correlations(SimulationSettings(**base, population_coupling={"IB": 0.9}))

    # A coupling of 0.9 gives the common part 81 % of the fast input's variance. Spiking
    # and 160 ms counts lose part of it (0.65 to 0.74 measured), and uncoupled neurons
    # stay near 0, so 0.4 and 0.1 separate the two with a wide margin.
    assert rs_coupled[0]["RS"] > 0.4
    assert rs_coupled[0]["IB"] < 0.1
    assert ib_coupled[0]["IB"] > 0.4
    assert ib_coupled[0]["RS"] < 0.1

    # The fast input has the same variance at every coupling, so each type keeps its
    # rate (within 2 % measured) whichever type is coupled.
    for name in ("RS", "IB"):
        assert rs_coupled[1][name] == pytest.approx(ib_coupled[1][name], rel=0.05)


def test_without_fast_input_coupling_changes_nothing(tiny_animal):
    coupled = simulate_animal(SimulationSettings(n_neurons=30, duration_s=30.0, population_coupling={"FS": 0.9}), 0)

    assert all(np.array_equal(x, y) for x, y in zip(tiny_animal.spike_times, coupled.spike_times))


def test_network_is_seeded(tiny_animal):
    again = simulate_animal(TINY, 0)
    other = simulate_animal(TINY, 1)

    assert all(np.array_equal(x, y) for x, y in zip(tiny_animal.spike_times, again.spike_times))
    assert np.array_equal(tiny_animal.positions_um, again.positions_um)
    assert not np.array_equal(tiny_animal.positions_um, other.positions_um)


def test_longer_duration_keeps_network(tiny_animal):
    longer = simulate_animal(SimulationSettings(n_neurons=30, duration_s=40.0), 0)

    assert np.array_equal(longer.positions_um, tiny_animal.positions_um)
    assert np.array_equal(longer.parameters, tiny_animal.parameters)
    assert np.array_equal(longer.cell_types, tiny_animal.cell_types)


# --- settings ----------------------------------------------------------------------------


def test_settings_round_trip():
    settings = SimulationSettings(
        n_neurons=12, duration_s=5, type_mix={"RS": 0.5, "FS": 0.5}, volume_um=[100, 100, 50],
        fast_input_sd=1.5, population_coupling={"FS": 0.8},
    )  # fmt: skip
    values = json.loads(json.dumps(settings.to_dict()))

    assert SimulationSettings.from_dict(values) == settings
    assert values["population_coupling"] == {"FS": 0.8}
    assert values["volume_um"] == [100.0, 100.0, 50.0]
    assert isinstance(values["duration_s"], float)


@pytest.mark.parametrize(
    ("values", "fragments"),
    [
        ({"n_neurons": 0}, ["n_neurons 0", "give 1 to"]),
        ({"n_neurons": 2.5}, ["n_neurons 2.5", "whole number"]),
        ({"dt_ms": 2.0}, ["dt_ms 2", "at most 1"]),
        ({"duration_s": -1.0}, ["duration_s -1", "above 0"]),
        ({"type_mix": {"RS": 0.5, "FS": 0.4}}, ["sum to 0.9", "sum to 1"]),
        ({"type_mix": {"RS": 0.5, "PV": 0.5}}, ["unknown types PV", "RS, IB, CH, FS, LTS"]),
        ({"type_mix": {"RS": 1.0, "FS": 0.0}}, ["fraction of FS is 0", "leave the type out"]),
        ({"type_mix": {"RS": "all"}}, ["fraction of RS is 'all'", "give a number"]),
        ({"type_mix": {}}, ["type_mix is empty", "mapping of type name to fraction"]),
        ({"type_mix": ["RS"]}, ["type_mix ['RS'] is invalid", "mapping of type name"]),
        ({"volume_um": (100.0, 100.0)}, ["volume_um", "three lengths"]),
        ({"parameter_jitter": 0.5}, ["parameter_jitter 0.5", "at most 0.2"]),
        ({"layout": "columnar"}, ["layout 'columnar'", "uniform, laminar"]),
        ({"fast_input_sd": -1.0}, ["fast_input_sd -1", "at least 0"]),
        ({"fast_input_tau_s": 0.0}, ["fast_input_tau_s 0", "above 0"]),
        ({"population_coupling": {"PV": 0.5}}, ["unknown types PV", "RS, IB, CH, FS, LTS"]),
        ({"population_coupling": {"FS": 1.5}}, ["population_coupling of FS is 1.5", "from 0 to 1"]),
        ({"population_coupling": {"FS": "high"}}, ["population_coupling of FS is 'high'", "give a number"]),
    ],
)
def test_invalid_settings_rejected(values, fragments):
    with pytest.raises(RecipeError) as raised:
        SimulationSettings(**values)

    for fragment in fragments:
        assert fragment in str(raised.value)


def test_unknown_setting_rejected():
    with pytest.raises(RecipeError, match="unknown simulation settings neurons"):
        SimulationSettings.from_dict({"neurons": 10})


def test_negative_seed_rejected():
    with pytest.raises(RecipeError, match="seed -1"):
        simulate_animal(TINY, -1)


# --- NWB files ---------------------------------------------------------------------------


def test_file_reads_as_units(tiny_files, tiny_animal):
    recording = read_units(tiny_files[0], labels={"cell_type": LabelSpec("units.cell_type")})

    assert recording.labels["cell_type"].tolist() == tiny_animal.cell_types.tolist()
    assert recording.position_source == "unit_xyz"
    np.testing.assert_allclose(recording.positions, tiny_animal.positions_um)
    assert recording.subject == "sim-animal-0"
    assert recording.repairs == {}


def test_file_spike_trains_ascending(tiny_files, tiny_animal):
    recording = read_units(tiny_files[0])

    for train, expected in zip(recording.spike_times, tiny_animal.spike_times):
        assert (np.diff(train) > 0).all()
        assert (train >= 0.0).all()
        assert (train < TINY.duration_s).all()
        np.testing.assert_array_equal(train, expected)


def test_file_passes_nwbinspector(tiny_files):
    assert critical_messages(tiny_files[0]) == []


def test_file_records_settings(tiny_files):
    notes = read_simulation_notes(tiny_files[0])

    assert notes["seed"] == 0
    assert notes["integration"]["dt_ms"] == 1.0
    assert "forward Euler" in notes["integration"]["scheme"]
    assert SimulationSettings.from_dict(notes["settings"]) == TINY

    with NWBHDF5IO(str(tiny_files[0]), "r") as io:
        nwbfile = io.read()
        assert "dt = 1 ms" in nwbfile.units.description
        assert nwbfile.units.resolution == 0.001
        assert nwbfile.session_start_time.tzinfo is not None
        assert nwbfile.subject.subject_id == "sim-animal-0"
        assert nwbfile.units["excitatory"].data[:].dtype == bool


def test_seeds_give_different_files(tiny_files):
    first, second = (read_units(path).spike_times for path in tiny_files)

    assert not all(len(x) == len(y) and np.array_equal(x, y) for x, y in zip(first, second))


def test_same_seed_same_file_content(tiny_files, tmp_path):
    (again,) = simulate_dataset(tmp_path, TINY, [0])

    with NWBHDF5IO(str(tiny_files[0]), "r") as io_first, NWBHDF5IO(str(again), "r") as io_again:
        first, second = io_first.read(), io_again.read()
        assert first.identifier == second.identifier
        np.testing.assert_array_equal(first.units["spike_times"].data[:], second.units["spike_times"].data[:])
        np.testing.assert_array_equal(first.units["spike_times_index"].data[:], second.units["spike_times_index"].data[:])


def test_silent_units_written(tmp_path):
    silent = SimulationSettings(
        n_neurons=5, duration_s=2.0, input_mean=-20.0, input_noise_sd=0.0, drift_shared_sd=0.0, drift_private_sd=0.0
    )
    path = write_animal_nwb(simulate_animal(silent, seed=0), tmp_path / "silent.nwb")
    recording = read_units(path)

    assert len(recording.unit_ids) == 5
    assert [len(train) for train in recording.spike_times] == [0] * 5
    assert critical_messages(path) == []


def test_write_rejects_existing_file(tmp_path, tiny_animal):
    path = write_animal_nwb(tiny_animal, tmp_path / "animal.nwb")

    with pytest.raises(RunDirectoryError, match="already exists"):
        write_animal_nwb(tiny_animal, path)
    assert write_animal_nwb(tiny_animal, path, overwrite=True) == path
    assert sorted(item.name for item in tmp_path.iterdir()) == ["animal.nwb"]


def test_dataset_keeps_matching_files(tiny_files):
    modified_ns = [path.stat().st_mtime_ns for path in tiny_files]
    reused = simulate_dataset(tiny_files[0].parent, TINY, [0, 1])

    assert reused == tiny_files
    assert [path.stat().st_mtime_ns for path in reused] == modified_ns


def test_dataset_rejects_other_settings(tmp_path):
    simulate_dataset(tmp_path, SimulationSettings(n_neurons=5, duration_s=1.0), [4])

    with pytest.raises(RunDirectoryError) as raised:
        simulate_dataset(tmp_path, SimulationSettings(n_neurons=6, duration_s=1.0), [4])
    message = str(raised.value)
    assert "sim-animal-4.nwb" in message
    assert "settings.n_neurons (5 in the file, 6 now)" in message
    assert "--overwrite" in message

    (path,) = simulate_dataset(tmp_path, SimulationSettings(n_neurons=6, duration_s=1.0), [4], overwrite=True)
    assert len(read_units(path).unit_ids) == 6


def test_dataset_reports_each_animal(tmp_path):
    reported = []
    paths = simulate_dataset(
        tmp_path, SimulationSettings(n_neurons=4, duration_s=1.0), [7, 9], on_animal=lambda seed, path: reported.append((seed, path))
    )

    assert reported == [(7, tmp_path / "sim-animal-7.nwb"), (9, tmp_path / "sim-animal-9.nwb")]
    assert paths == [path for _, path in reported]


def test_dataset_rejects_repeated_seeds(tmp_path):
    with pytest.raises(RecipeError, match="repeated"):
        simulate_dataset(tmp_path, TINY, [1, 1])


# --- command line ------------------------------------------------------------------------




def test_cli_writes_files(tmp_path):
    result = run_cli(
        "simulate", "out", "--animals", "2", "--first-seed", "3", "--neurons", "20", "--duration-s", "5", "--no-progress",
        cwd=tmp_path,
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [str(Path("out") / "sim-animal-3.nwb"), str(Path("out") / "sim-animal-4.nwb")]
    recording = read_units(tmp_path / "out" / "sim-animal-4.nwb", labels={"cell_type": LabelSpec("units.cell_type")})
    assert len(recording.unit_ids) == 20
    assert set(recording.labels["cell_type"]) <= set(NEURON_TYPES)

    changed = run_cli("simulate", "out", "--first-seed", "3", "--neurons", "21", "--duration-s", "5", cwd=tmp_path)
    assert changed.returncode == 2
    assert "Traceback" not in changed.stderr
    error_lines = [line for line in changed.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, changed.stderr
    assert "sim-animal-3.nwb" in error_lines[0]
    assert "--overwrite" in error_lines[0]


def test_cli_simulates_like_a_file(tmp_path):
    template = SimulationSettings(
        n_neurons=15, duration_s=4.0, layout="laminar", parameter_jitter=0.15, fast_input_sd=2.5, population_coupling={"FS": 0.9},
    )  # fmt: skip
    (source,) = simulate_dataset(tmp_path / "trained", template, [0])

    result = run_cli("simulate", "new", "--animals", "1", "--first-seed", "7", "--like", str(source), "--no-progress", cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    settings = read_simulation_notes(tmp_path / "new" / "sim-animal-7.nwb")["settings"]
    assert SimulationSettings.from_dict(settings) == template

    longer = run_cli("simulate", "longer", "--like", str(source), "--duration-s", "6", "--animals", "1", "--no-progress", cwd=tmp_path)
    assert longer.returncode == 0, longer.stderr
    settings = read_simulation_notes(tmp_path / "longer" / "sim-animal-0.nwb")["settings"]
    assert settings["duration_s"] == 6.0
    assert settings["population_coupling"] == {"FS": 0.9}


def test_cli_like_needs_simulated_file(tmp_path):
    # A recorded file carries no simulation notes.
    plain = tmp_path / "plain.nwb"
    nwbfile = NWBFile(session_description="recorded", identifier="plain", session_start_time=datetime(2024, 1, 1, tzinfo=timezone.utc))
    with NWBHDF5IO(plain, "w") as io:
        io.write(nwbfile)

    result = run_cli("simulate", "new", "--like", str(plain), "--no-progress", cwd=tmp_path)

    assert result.returncode == 2
    assert f"{plain}: no simulation settings found" in result.stderr
