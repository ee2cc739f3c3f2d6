"""Tests of the ophys reader on the bug-case files, a real Suite2p file and files built with pynwb."""

import json
import logging
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from pynwb import NWBHDF5IO
from pynwb.ophys import DfOverF, Fluorescence, ImageSegmentation, PlaneSegmentation, RoiResponseSeries
from pynwb.testing.mock.file import mock_NWBFile
from pynwb.testing.mock.ophys import mock_ImagingPlane

from neurpir_nwb.errors import DataError, RecipeError
from neurpir_nwb.io.ophys import read_ophys

LOGGERS = ("neurpir_nwb.io.ophys", "neurpir_nwb.io.timeseries")

# pynwb warns when it builds the transposed and mismatched series these tests write on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:RoiResponseSeries .* does not match:UserWarning")


def reader_warnings(caplog) -> list[str]:
    """Return the warning messages that the trace readers logged."""
    records = [record for record in caplog.records if record.name in LOGGERS]
    return [record.getMessage() for record in records if record.levelno == logging.WARNING]


def write_ophys_nwb(
    path: Path,
    data: np.ndarray,
    n_rois: int,
    *,
    rows: list[int] | None = None,
    mask: str = "pixel",
    timestamps: np.ndarray | None = None,
) -> Path:
    """Write an NWB file with one PlaneSegmentation and one DfOverF RoiResponseSeries.

    ROI ``i`` has id ``100 + i`` and a mask centred on pixel (x, y) = (2 + i, 10 + i).
    """
    nwbfile = mock_NWBFile(identifier="built")
    imaging_plane = mock_ImagingPlane(nwbfile=nwbfile)
    plane = PlaneSegmentation(name="PlaneSegmentation", description="ROIs", imaging_plane=imaging_plane)
    if mask == "pixel":
        for i in range(n_rois):
            plane.add_roi(id=100 + i, pixel_mask=[(1 + i, 10 + i, 1.0), (3 + i, 10 + i, 1.0)])
    elif mask == "voxel":
        for i in range(n_rois):
            plane.add_roi(id=100 + i, voxel_mask=[(2 + i, 10 + i, 4, 1.0), (2 + i, 10 + i, 6, 1.0)])
    else:
        for i in range(n_rois):
            image = np.zeros((32, 32), dtype=np.float32)
            image[2 + i, 10 + i] = 1.0
            plane.add_roi(id=100 + i, image_mask=image)

    module = nwbfile.create_processing_module(name="ophys", description="optical physiology")
    segmentation = module.add(ImageSegmentation(name="ImageSegmentation"))
    segmentation.add_plane_segmentation(plane)

    region = plane.create_roi_table_region(
        description="ROIs", region=list(range(n_rois)) if rows is None else rows
    )
    timing = {"timestamps": timestamps} if timestamps is not None else {"rate": 20.0, "starting_time": 0.0}
    series = RoiResponseSeries(name="RoiResponseSeries", data=data, rois=region, unit="a.u.", **timing)
    dff = module.add(DfOverF(name="DfOverF"))
    dff.add_roi_response_series(series)

    with NWBHDF5IO(str(path), "w") as io:
        io.write(nwbfile)
    return path


# --- known failure modes ---------------------------------------------------------------------


def test_roi_subset_two_planes(shared_data):
    path = shared_data / "bugcases" / "B12_roi_subset_two_planes.nwb"

    recording = read_ophys(path, source="Fluorescence")

    assert recording.n_neurons == 7
    assert recording.roi_ids.tolist() == [0, 2, 4, 0, 1, 2, 3]
    assert recording.rows.tolist() == [0, 2, 4, 0, 1, 2, 3]
    assert recording.neuron_ids[1] == "qa-B12/PlaneSegmentation_plane0/2"
    assert recording.neuron_ids[3] == "qa-B12/PlaneSegmentation_plane1/0"
    assert len(set(recording.neuron_ids)) == 7
    assert recording.plane_tables[0].endswith("ImageSegmentation/PlaneSegmentation_plane0")
    assert recording.plane_tables[-1].endswith("ImageSegmentation/PlaneSegmentation_plane1")
    assert recording.table == "processing/ophys/ImageSegmentation"
    assert recording.traces.shape == (7, 40)
    assert recording.time_offsets_s.tolist() == pytest.approx([0, 0, 0, 0.05, 0.05, 0.05, 0.05])


def test_auto_source_prefers_dff(shared_data):
    path = shared_data / "bugcases" / "B12_roi_subset_two_planes.nwb"

    recording = read_ophys(path)

    assert recording.roi_ids.tolist() == [0, 2, 4]
    assert recording.series_names.tolist() == ["plane0"] * 3


def test_series_name_ambiguous(shared_data):
    path = shared_data / "bugcases" / "B12_roi_subset_two_planes.nwb"

    with pytest.raises(DataError, match="several RoiResponseSeries are called 'plane0'"):
        read_ophys(path, series="plane0")

    recording = read_ophys(path, series=["Fluorescence/plane1"])
    assert recording.roi_ids.tolist() == [0, 1, 2, 3]


def test_columns_differ_from_rois(tmp_path):
    path = write_ophys_nwb(tmp_path / "mismatch.nwb", np.ones((30, 5), dtype=np.float32), 4)

    with pytest.raises(DataError) as caught:
        read_ophys(path)

    message = str(caught.value)
    assert str(path) in message
    assert "'DfOverF/RoiResponseSeries'" in message
    assert "5 columns" in message
    assert "4 ROIs" in message


def test_all_nan_roi_dropped(shared_data, caplog):
    path = shared_data / "bugcases" / "B14_fluorescence_nan_inf.nwb"

    with caplog.at_level(logging.WARNING):
        recording = read_ophys(path)

    assert recording.roi_ids.tolist() == [0, 2, 3]
    dropped = [message for message in reader_warnings(caplog) if "dropped 1 of 4" in message]
    assert len(dropped) == 1
    assert "ROI 1 of PlaneSegmentation_plane0" in dropped[0]


def test_nan_inf_counted_per_roi(shared_data, caplog):
    path = shared_data / "bugcases" / "B14_fluorescence_nan_inf.nwb"

    with caplog.at_level(logging.WARNING):
        recording = read_ophys(path)

    assert recording.nan_counts.tolist() == [0, 10, 0]
    assert recording.inf_counts.tolist() == [0, 0, 1]
    assert recording.repairs == {"neurons_dropped_all_nan": 1, "nan_samples": 10, "inf_samples": 1}
    assert np.isnan(recording.traces[1, 10:20]).all()
    assert np.isfinite(recording.traces[1, :10]).all()
    assert np.isnan(recording.traces[2, 50])
    assert not np.isinf(recording.traces).any()
    messages = reader_warnings(caplog)
    assert any("ROI 2 of PlaneSegmentation_plane0 has 10 NaN" in message for message in messages)
    assert any("ROI 3 of PlaneSegmentation_plane0 has 0 NaN and 1 infinite" in message for message in messages)


def test_int16_conversion_offset(shared_data):
    path = shared_data / "bugcases" / "B16_int16_conversion_offset.nwb"

    recording = read_ophys(path, series="scaled")

    assert recording.traces.dtype == np.float32
    assert recording.traces[:, 0].tolist() == [40.0, 90.0]
    assert recording.traces[:, 3].tolist() == [-32768 * 0.5 - 10, 32767 * 0.5 - 10]
    assert recording.rate_hz == 5.0


def test_int16_no_overflow(shared_data):
    path = shared_data / "bugcases" / "B16_int16_conversion_offset.nwb"

    recording = read_ophys(path, series="unscaled")

    assert recording.traces[:, 3].tolist() == [-32768.0, 32767.0]


def test_int16_default_scale_warns(shared_data, caplog):
    path = shared_data / "bugcases" / "B16_int16_conversion_offset.nwb"

    with caplog.at_level(logging.WARNING):
        read_ophys(path, series="unscaled")
        scaled_messages = len(reader_warnings(caplog))
        read_ophys(path, series="scaled")

    messages = reader_warnings(caplog)
    assert any("'unscaled'" in message and "raw counts" in message for message in messages)
    assert len(messages) == scaled_messages


def test_same_roi_in_two_series(shared_data):
    path = shared_data / "bugcases" / "B16_int16_conversion_offset.nwb"

    with pytest.raises(DataError, match="ROI 0 of PlaneSegmentation_plane0 has traces in both"):
        read_ophys(path)


# --- real files ----------------------------------------------------------------------------------


def test_suite2p_real_file(shared_data):
    path = shared_data / "nwb" / "real" / "ophys_suite2p_15rois.nwb"

    recording = read_ophys(path, labels={"accepted": "Accepted"})

    assert recording.n_neurons == 15
    assert recording.traces.shape == (15, 250)
    assert recording.rate_hz == 10.0
    assert recording.timestamps_s[1] == pytest.approx(0.1)
    assert recording.series_names.tolist() == ["RoiResponseSeries"] * 15
    assert recording.rows.tolist() == list(range(15))
    assert recording.table == "processing/ophys/ImageSegmentation/PlaneSegmentation"
    assert recording.position_source == "roi_centroid_px"
    assert recording.labels["accepted"].tolist()[:5] == ["1", "1", "1", "0", "0"]
    assert recording.nwb_version.startswith("2.")


def test_suite2p_centroids_match_file(shared_data):
    import h5py

    path = shared_data / "nwb" / "real" / "ophys_suite2p_15rois.nwb"
    with h5py.File(path, "r") as h5file:
        stored = h5file["processing/ophys/ImageSegmentation/PlaneSegmentation/RoiCentroid"][:]

    recording = read_ophys(path)

    # Suite2p stores the median pixel of each ROI as (x, y), close to the weighted mean but not equal.
    distances = np.abs(recording.positions[:, :2] - stored)
    assert np.median(distances) < 1.0
    assert distances.max() < 5.0
    assert (recording.positions[:, 2] == 0).all()


def test_suite2p_neuropil_by_name(shared_data):
    path = shared_data / "nwb" / "real" / "ophys_suite2p_15rois.nwb"

    default = read_ophys(path)
    neuropil = read_ophys(path, series="Neuropil")

    assert neuropil.series_names.tolist() == ["Neuropil"] * 15
    assert neuropil.traces.shape == (15, 250)
    assert not np.array_equal(neuropil.traces, default.traces)


# --- files built with pynwb -----------------------------------------------------------------------


def test_transposed_traces_fixed(tmp_path, caplog):
    traces = np.arange(3 * 50, dtype=np.float32).reshape(3, 50)
    path = write_ophys_nwb(tmp_path / "transposed.nwb", traces, 3)

    with caplog.at_level(logging.WARNING):
        recording = read_ophys(path)

    assert recording.traces.shape == (3, 50)
    assert np.array_equal(recording.traces, traces)
    assert any("(ROIs, time)" in message for message in reader_warnings(caplog))


def test_square_traces_rejected(tmp_path):
    path = write_ophys_nwb(tmp_path / "square.nwb", np.zeros((4, 4), dtype=np.float32), 4)

    with pytest.raises(DataError, match="shape \\(4, 4\\) with 4 ROIs"):
        read_ophys(path)


def test_square_with_timestamps_rejected(tmp_path):
    timestamps = np.arange(4) / 20.0
    path = write_ophys_nwb(tmp_path / "square.nwb", np.zeros((4, 4), dtype=np.float32), 4, timestamps=timestamps)

    with pytest.raises(DataError, match="cannot be told"):
        read_ophys(path)


def test_irregular_timestamps(tmp_path):
    timestamps = np.array([0.0, 0.1, 0.2, 0.5, 0.6, 0.7])
    path = write_ophys_nwb(tmp_path / "irregular.nwb", np.ones((6, 2), dtype=np.float32), 2, timestamps=timestamps)

    recording = read_ophys(path)

    assert recording.rate_hz is None
    assert recording.timestamps_s.tolist() == timestamps.tolist()


@pytest.mark.parametrize(
    ("mask", "source", "expected"),
    [
        ("pixel", "roi_centroid_px", [[2.0, 10.0, 0.0], [3.0, 11.0, 0.0], [4.0, 12.0, 0.0]]),
        ("voxel", "roi_centroid_voxels", [[2.0, 10.0, 5.0], [3.0, 11.0, 5.0], [4.0, 12.0, 5.0]]),
        ("image", "roi_centroid_px", [[2.0, 10.0, 0.0], [3.0, 11.0, 0.0], [4.0, 12.0, 0.0]]),
    ],
)
def test_centroids_by_mask_kind(tmp_path, mask, source, expected):
    path = write_ophys_nwb(tmp_path / f"{mask}.nwb", np.ones((20, 3), dtype=np.float32), 3, mask=mask)

    recording = read_ophys(path)

    assert recording.position_source == source
    assert recording.positions.tolist() == expected
    assert recording.roi_ids.tolist() == [100, 101, 102]


def test_roi_subset_rows(tmp_path):
    path = write_ophys_nwb(tmp_path / "subset.nwb", np.ones((20, 2), dtype=np.float32), 4, rows=[3, 1])

    recording = read_ophys(path)

    assert recording.rows.tolist() == [3, 1]
    assert recording.roi_ids.tolist() == [103, 101]
    assert recording.positions[:, 0].tolist() == [5.0, 3.0]
    assert recording.neuron_ids == ["built/PlaneSegmentation/103", "built/PlaneSegmentation/101"]


def test_missing_label_column(tmp_path):
    path = write_ophys_nwb(tmp_path / "labels.nwb", np.ones((20, 2), dtype=np.float32), 2)

    with pytest.raises(DataError, match="column 'cell_type'"):
        read_ophys(path, labels={"cell_type": "cell_type"})


def test_invalid_source():
    with pytest.raises(RecipeError, match="'dff'"):
        read_ophys("unused.nwb", source="dff")


# --- memory of dense image masks ---------------------------------------------------------------------

N_LARGE_ROIS = 2000
LARGE_GRID = 512

MEASURE_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys, time, tracemalloc
    from neurpir_nwb.io.ophys import read_ophys

    tracemalloc.start()
    start = time.perf_counter()
    recording = read_ophys(sys.argv[1])
    elapsed_s = time.perf_counter() - start
    _, traced_peak = tracemalloc.get_traced_memory()
    print(json.dumps({
        "rss_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "traced_peak_bytes": traced_peak,
        "elapsed_s": elapsed_s,
        "positions": recording.positions[:3].tolist(),
        "n_neurons": recording.n_neurons,
    }))
    """
)


def write_large_image_masks(path: Path) -> Path:
    """Write 2,000 ROIs as dense 512 x 512 image masks, one compressed chunk per ROI, without holding them all.

    ROI ``i`` is a 3 x 3 square centred on pixel (x, y) = (10 + i % 490, 10 + i // 490).
    """
    from hdmf.backends.hdf5 import H5DataIO
    from hdmf.common import VectorData
    from hdmf.data_utils import DataChunkIterator

    def masks():
        for i in range(N_LARGE_ROIS):
            image = np.zeros((LARGE_GRID, LARGE_GRID), dtype=np.float32)
            x, y = 10 + i % 490, 10 + i // 490
            image[x - 1 : x + 2, y - 1 : y + 2] = 1.0
            yield image

    shape = (N_LARGE_ROIS, LARGE_GRID, LARGE_GRID)
    iterator = DataChunkIterator(data=masks(), maxshape=shape, dtype=np.dtype("float32"))
    column = VectorData(
        name="image_mask",
        description="dense ROI masks",
        data=H5DataIO(iterator, chunks=(1, LARGE_GRID, LARGE_GRID), compression="gzip", compression_opts=1),
    )

    nwbfile = mock_NWBFile(identifier="large")
    plane = PlaneSegmentation(
        name="PlaneSegmentation",
        description="ROIs",
        imaging_plane=mock_ImagingPlane(nwbfile=nwbfile),
        id=list(range(N_LARGE_ROIS)),
        columns=[column],
    )
    module = nwbfile.create_processing_module(name="ophys", description="optical physiology")
    segmentation = module.add(ImageSegmentation(name="ImageSegmentation"))
    segmentation.add_plane_segmentation(plane)

    region = plane.create_roi_table_region(description="ROIs", region=list(range(N_LARGE_ROIS)))
    series = RoiResponseSeries(
        name="RoiResponseSeries",
        data=np.ones((10, N_LARGE_ROIS), dtype=np.float32),
        rois=region,
        unit="a.u.",
        rate=10.0,
    )
    module.add(Fluorescence(name="Fluorescence")).add_roi_response_series(series)

    with NWBHDF5IO(str(path), "w") as io:
        io.write(nwbfile)
    return path


@pytest.mark.slow
def test_dense_image_masks_memory(tmp_path):
    start = time.perf_counter()
    path = write_large_image_masks(tmp_path / "large.nwb")
    write_s = time.perf_counter() - start

    result = subprocess.run(
        [sys.executable, "-c", MEASURE_SCRIPT, str(path)],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    measured = json.loads(result.stdout.strip().splitlines()[-1])

    print(
        f"2000 dense 512 x 512 image masks: file {path.stat().st_size / 2**20:.1f} MiB written in {write_s:.1f} s; "
        f"read in {measured['elapsed_s']:.1f} s, peak RSS {measured['rss_peak_bytes'] / 2**20:.0f} MiB, "
        f"peak traced {measured['traced_peak_bytes'] / 2**20:.0f} MiB"
    )
    assert measured["n_neurons"] == N_LARGE_ROIS
    assert measured["positions"] == [[10.0, 10.0, 0.0], [11.0, 10.0, 0.0], [12.0, 10.0, 0.0]]
    assert measured["rss_peak_bytes"] < 2**30
