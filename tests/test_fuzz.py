"""Property-based tests: random recipes and random small NWB files give a result or a clean NeurpirError.

The default runs draw a few dozen examples per property, so the whole file runs in
well under a minute. The ``slow`` variants draw many more.
"""

import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pynwb import NWBHDF5IO, NWBFile, TimeSeries
from pynwb.ophys import DfOverF, ImageSegmentation, PlaneSegmentation, RoiResponseSeries
from pynwb.testing.mock.ophys import mock_ImagingPlane

from neurpir_nwb.errors import DataError, NeurpirError, RecipeError
from neurpir_nwb.inspect import inspect_file
from neurpir_nwb.io.ophys import read_ophys
from neurpir_nwb.io.timeseries import read_timeseries
from neurpir_nwb.io.units import LabelSpec, read_units
from neurpir_nwb.recipe import ProblemPolicy, Recipe, load_recipe
from neurpir_nwb.segments import SegmentSettings, build_segment_set, build_trace_segment_set
from neurpir_nwb.testing import SESSION_START_TIME

# No example database: the runs write nothing into the checkout.
FAST = settings(max_examples=30, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
THOROUGH = settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

#: Segment settings small enough for spike trains of a few seconds: windows of 2 s.
SPIKE_SETTINGS = dict(bin_size_s=0.25, bins_per_patch=4, patches=2, neighbours=2, distance_bins=3)


# --- recipes -----------------------------------------------------------------------------------

RECIPE_KEYS = sorted(Recipe.model_fields) + ["from", "path", "simulate", "dim", "heads", "epochs", "bin_size_s", "sort_spikes", "empty_units"]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**6), max_value=10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["raise", "warn", "ignore", "units.cell_type", "electrodes.location", "a.nwb", "cpu", "auto"]),
)
documents = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(RECIPE_KEYS), st.text(max_size=8)), children, max_size=5),
    ),
    max_leaves=25,
)


def check_recipe_text(text: str) -> None:
    """Load ``text`` as a recipe file: it must validate or raise RecipeError, nothing else."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "recipe.yaml"
        path.write_text(text, encoding="utf-8")
        try:
            recipe = load_recipe(path)
        except RecipeError as error:
            assert str(error).strip()
            assert "\n" not in str(error)
            return
    assert isinstance(recipe, Recipe)
    assert recipe.sources


@FAST
@given(documents)
def test_random_recipe_documents(document):
    check_recipe_text(yaml.safe_dump(document, allow_unicode=True))


@FAST
@given(st.text(max_size=200))
def test_random_recipe_text(text):
    check_recipe_text(text)


@FAST
@given(
    st.fixed_dictionaries(
        {"name": st.sampled_from(["run", "x-1", "", "bad name"]), "sources": st.just([{"path": "a.nwb"}])},
        optional={
            "problems": st.dictionaries(st.sampled_from(sorted(ProblemPolicy.model_fields) + ["typo"]), scalars, max_size=4),
            "units": st.dictionaries(st.sampled_from(["sort_spikes", "spike_times_unit", "sampling_rate_hz"]), scalars, max_size=3),
            "segments": st.dictionaries(st.sampled_from(["bin_size_s", "patches", "neighbours", "rate_hz"]), scalars, max_size=3),
        },
    )
)
def test_near_valid_recipes(document):
    check_recipe_text(yaml.safe_dump(document, allow_unicode=True))


# --- Units tables ---------------------------------------------------------------------------

spike_values = st.one_of(
    st.floats(min_value=0.0, max_value=8.0),
    st.floats(min_value=-5.0, max_value=200.0),
    st.sampled_from([np.nan, np.inf, -np.inf, -1.0, 0.0, 1e300, 5e5, 86_401.0, 3.0, 3.0]),
)


@st.composite
def spike_trains(draw):
    """One unit's spike train: empty, sorted, unsorted, with duplicates, NaN or huge values."""
    values = draw(st.lists(spike_values, max_size=25))
    if values and draw(st.booleans()):
        values = sorted(values, key=lambda value: (np.isnan(value), value))
    if values and draw(st.booleans()):
        values = values + values[: draw(st.integers(1, len(values)))]
    return values


text_values = st.one_of(st.text(max_size=10), st.sampled_from(["", "unknown", "CA1", "DG", " n/a ", "brain_region: ALM; layer: 5"]))


@st.composite
def unit_columns(draw, n_units: int):
    """Extra units columns of random dtypes: int, float with NaN, bool, str and fixed-length byte strings."""
    columns = {}
    for index in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["int", "float", "bool", "str", "bytes"]))
        if kind == "int":
            values = draw(st.lists(st.integers(-(2**31), 2**31 - 1), min_size=n_units, max_size=n_units))
        elif kind == "float":
            values = draw(st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=n_units, max_size=n_units))
        elif kind == "bool":
            values = draw(st.lists(st.booleans(), min_size=n_units, max_size=n_units))
        elif kind == "str":
            values = draw(st.lists(text_values, min_size=n_units, max_size=n_units))
        else:
            texts = draw(st.lists(st.text(alphabet=st.characters(max_codepoint=126, min_codepoint=32), max_size=12), min_size=n_units, max_size=n_units))
            values = np.array([text.encode("ascii") for text in texts], dtype="S12")
        columns[f"column_{index}_{kind}"] = values
    return columns


@st.composite
def units_files(draw):
    """Keyword arguments of :func:`write_random_units`."""
    n_units = draw(st.integers(0, 5))
    n_electrodes = draw(st.integers(0, 3))
    links = None
    if n_electrodes and draw(st.booleans()):
        links = [draw(st.lists(st.integers(0, n_electrodes - 1), max_size=2)) for _ in range(n_units)]
    return {
        "trains": [draw(spike_trains()) for _ in range(n_units)],
        "ids": draw(st.one_of(st.just(list(range(n_units))), st.lists(st.integers(0, 4), min_size=n_units, max_size=n_units))),
        "columns": draw(unit_columns(n_units)),
        "locations": draw(st.lists(text_values, min_size=n_electrodes, max_size=n_electrodes)),
        "links": links,
    }


def write_random_units(path: Path, trains, ids, columns, locations, links) -> bool:
    """Write the drawn Units table; return False when pynwb itself rejects it."""
    nwbfile = NWBFile(session_description="fuzz", identifier="fuzz", session_start_time=SESSION_START_TIME)
    try:
        if locations:
            device = nwbfile.create_device(name="probe")
            group = nwbfile.create_electrode_group(name="shank", description="shank", location="brain", device=device)
            for location in locations:
                nwbfile.add_electrode(location=location, group=group)
        for name in columns:
            nwbfile.add_unit_column(name=name, description=name)
        for row, (train, unit_id) in enumerate(zip(trains, ids)):
            values = {name: column[row] for name, column in columns.items()}
            if links is not None:
                values["electrodes"] = links[row]
            nwbfile.add_unit(id=unit_id, spike_times=np.asarray(train, dtype=np.float64), **values)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with NWBHDF5IO(str(path), "w") as io:
                io.write(nwbfile)
    except Exception:  # pynwb rejects some drawn tables while building them; such files never reach a reader.
        return False
    return True


policies = st.builds(
    ProblemPolicy,
    **{
        name: st.sampled_from(["raise", "warn", "ignore"])
        for name in ProblemPolicy.model_fields
        if name != "spike_times_not_seconds"
    },
)


def check_units_file(drawn: dict, policy: ProblemPolicy, sort_spikes: bool, label_choices: list[str]) -> None:
    """Read a drawn Units file and segment it: a segment set or a NeurpirError, and inspect agrees with the reader."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "units.nwb"
        assume(write_random_units(path, **drawn))

        report = inspect_file(path)
        assert report.loadable, report.error
        try:
            read_units(path)
        except DataError:
            default_raises = True
        else:
            default_raises = False
        assert (report.exit_status == 1) == default_raises, [problem.kind for problem in report.raised_problems]

        labels = {f"label_{index}": LabelSpec(source) for index, source in enumerate(label_choices)}
        try:
            recording = read_units(path, labels=labels, sort_spikes=sort_spikes, problems=policy)
            dataset = build_segment_set([recording], SegmentSettings(**SPIKE_SETTINGS))
        except NeurpirError as error:
            assert str(error).strip()
            return

    activity = dataset["activity"].values[dataset["valid"].values]
    assert np.isfinite(activity).all()
    assert all(np.all(np.diff(train) >= 0) and np.isfinite(train).all() for train in recording.spike_times)


@st.composite
def units_cases(draw):
    drawn = draw(units_files())
    sources = [f"units.{name}" for name in drawn["columns"]]
    if drawn["locations"]:
        sources.append("electrodes.location")
    labels = draw(st.lists(st.sampled_from(sources), max_size=2, unique=True)) if sources else []
    return drawn, draw(policies), draw(st.booleans()), labels


@FAST
@given(units_cases())
def test_random_units_files(case):
    check_units_file(*case)


@pytest.mark.slow
@THOROUGH
@given(units_cases())
def test_random_units_files_thorough(case):
    check_units_file(*case)


# --- traces -----------------------------------------------------------------------------------

sample_values = st.one_of(st.floats(-1e6, 1e6), st.sampled_from([np.nan, np.inf, -np.inf, 0.0]))


@st.composite
def trace_files(draw):
    """A RoiResponseSeries of 1 to 4 ROIs, stored (time, ROIs) or transposed, with a rate or random timestamps."""
    n_rois = draw(st.integers(1, 4))
    n_frames = draw(st.integers(1, 40))
    values = draw(st.lists(sample_values, min_size=n_frames * n_rois, max_size=n_frames * n_rois))
    data = np.asarray(values, dtype=np.float32).reshape(n_frames, n_rois)
    if draw(st.booleans()):
        data = data.T
    timestamps = None
    if draw(st.booleans()):
        steps = draw(st.lists(st.sampled_from([0.1, 0.1, 0.1, 0.0, -0.1, 0.35, np.nan]), min_size=n_frames, max_size=n_frames))
        timestamps = np.cumsum(np.nan_to_num(steps, nan=0.1))
        for index, step in enumerate(steps):
            if np.isnan(step):
                timestamps[index] = np.nan
    return {"data": data, "n_rois": n_rois, "timestamps": timestamps, "labels": draw(st.lists(text_values, min_size=n_rois, max_size=n_rois))}


def write_random_ophys(path: Path, data, n_rois, timestamps, labels) -> bool:
    """Write the drawn series with pixel masks and a text column; return False when pynwb rejects it."""
    nwbfile = NWBFile(session_description="fuzz", identifier="fuzz", session_start_time=SESSION_START_TIME)
    plane = PlaneSegmentation(name="PlaneSegmentation", description="ROIs", imaging_plane=mock_ImagingPlane(nwbfile=nwbfile))
    plane.add_column(name="cell_type", description="label")
    for index in range(n_rois):
        plane.add_roi(pixel_mask=[(index, 1, 1.0), (index + 1, 2, 1.0)], cell_type=labels[index])
    module = nwbfile.create_processing_module(name="ophys", description="ophys")
    module.add(ImageSegmentation(name="ImageSegmentation")).add_plane_segmentation(plane)
    region = plane.create_roi_table_region(description="ROIs", region=list(range(n_rois)))
    timing = {"timestamps": timestamps} if timestamps is not None else {"rate": 10.0}
    try:
        series = RoiResponseSeries(name="RoiResponseSeries", data=data, rois=region, unit="a.u.", **timing)
        module.add(DfOverF(name="DfOverF")).add_roi_response_series(series)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with NWBHDF5IO(str(path), "w") as io:
                io.write(nwbfile)
    except Exception:  # pynwb rejects some drawn series while building them; such files never reach a reader.
        return False
    return True


def check_ophys_file(drawn: dict, policy: ProblemPolicy) -> None:
    """Read and segment a drawn ophys file: a segment set or a NeurpirError; inspect never fails."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "ophys.nwb"
        assume(write_random_ophys(path, **drawn))

        report = inspect_file(path)
        assert report.loadable, report.error
        settings_ = SegmentSettings(bin_size_s=0.1, bins_per_patch=2, patches=2, neighbours=1, distance_bins=2)
        try:
            recording = read_ophys(path, labels={"cell_type": "cell_type"}, problems=policy)
            dataset = build_trace_segment_set([recording], settings_)
        except NeurpirError as error:
            assert str(error).strip()
            return

    activity = dataset["activity"].values[dataset["valid"].values]
    assert np.isfinite(activity).all()


@FAST
@given(trace_files(), policies)
def test_random_ophys_files(drawn, policy):
    check_ophys_file(drawn, policy)


@pytest.mark.slow
@THOROUGH
@given(trace_files(), policies)
def test_random_ophys_files_thorough(drawn, policy):
    check_ophys_file(drawn, policy)


@st.composite
def timeseries_files(draw):
    """One to three plain TimeSeries of random dtypes, lengths and timing."""
    n_series = draw(st.integers(1, 3))
    length = draw(st.integers(0, 30))
    series = {}
    for index in range(n_series):
        kind = draw(st.sampled_from(["float", "int", "bool"]))
        n = length if draw(st.integers(0, 4)) else draw(st.integers(0, 30))
        if kind == "float":
            data = np.asarray(draw(st.lists(sample_values, min_size=n, max_size=n)), dtype=np.float64)
        elif kind == "int":
            data = np.asarray(draw(st.lists(st.integers(-(2**15), 2**15 - 1), min_size=n, max_size=n)), dtype=np.int16)
        else:
            data = np.asarray(draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=bool)
        rate = draw(st.sampled_from([10.0, 10.0, 5.0]))
        series[f"cell_{index}"] = {"data": data, "rate": rate, "conversion": draw(st.sampled_from([1.0, 0.5, 1e30]))}
    return series


def check_timeseries_file(series: dict) -> None:
    """Read and segment drawn TimeSeries: a segment set or a NeurpirError; inspect never fails."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "series.nwb"
        nwbfile = NWBFile(session_description="fuzz", identifier="fuzz", session_start_time=SESSION_START_TIME)
        try:
            for name, options in series.items():
                nwbfile.add_acquisition(TimeSeries(name=name, unit="a.u.", **options))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with NWBHDF5IO(str(path), "w") as io:
                    io.write(nwbfile)
        except Exception:  # pynwb rejects some drawn series while building them; such files never reach a reader.
            assume(False)

        report = inspect_file(path)
        assert report.loadable, report.error
        settings_ = SegmentSettings(bin_size_s=0.1, bins_per_patch=2, patches=2, neighbours=1, distance_bins=2)
        try:
            recording = read_timeseries(path, "cell_*")
            dataset = build_trace_segment_set([recording], settings_)
        except NeurpirError as error:
            assert str(error).strip()
            return

    activity = dataset["activity"].values[dataset["valid"].values]
    assert np.isfinite(activity).all()


@FAST
@given(timeseries_files())
def test_random_timeseries_files(series):
    check_timeseries_file(series)
