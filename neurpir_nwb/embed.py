"""Apply a trained model to NWB files it never saw: embed their neurons, predict labels, write outputs.

The input files are read with the readers of training and segmented with the model's
own segment settings and distance-bin edges. The encoder embeds them, the probe labels
them, and they are written like the outputs of ``train``: one copy of each input with a
``neurpir`` module. Inputs that the model cannot read the way it read its training
data (another modality, traces too slow for the model's sampling grid, a recording
shorter than two windows) are rejected before anything is embedded.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import xarray as xr

from neurpir_nwb.errors import DataError, RunDirectoryError, SourceError
from neurpir_nwb.io.nwbfile import check_nwb_file
from neurpir_nwb.io.ophys import read_ophys
from neurpir_nwb.io.recording import Recording
from neurpir_nwb.io.timeseries import read_timeseries
from neurpir_nwb.io.traces import TraceRecording
from neurpir_nwb.io.units import read_units
from neurpir_nwb.recipe import ProblemPolicy
from neurpir_nwb.model_directory import LoadedModel, load_model, output_provenance
from neurpir_nwb.pipeline import software_versions, write_nwb_files
from neurpir_nwb.progress import Progress, SilentProgress, count_noun
from neurpir_nwb.segments import build_segment_set, build_trace_segment_set
from neurpir_nwb.train import WindowData, embed_neurons

__all__ = ["EmbedSummary", "embed_files", "expand_inputs"]

logger = logging.getLogger(__name__)

#: Traces sampled this much slower than the model's grid rate are still accepted. Any
#: slower input would be upsampled by interpolation, which invents samples between the
#: recorded ones, so the model would see smoother activity than it was trained on.
RATE_TOLERANCE = 0.1

_READER_NAMES = {
    "units": "spike trains of a Units table (ecephys)",
    "ophys": "ROI traces in RoiResponseSeries (ophys)",
    "timeseries": "plain TimeSeries traces in acquisition",
}


@dataclass
class EmbedSummary:
    """Outputs of :func:`embed_files` and the embeddings behind them.

    Attributes
    ----------
    model_dir
        The model directory that was applied.
    outputs
        One output NWB file per input, in input order.
    embeddings
        Per-neuron embeddings of all inputs along ``neuron``, with the predictions when
        the model has a probe, and the segment set's neuron coordinates.
    """

    model_dir: Path
    outputs: list[Path] = field(default_factory=list)
    embeddings: xr.Dataset | None = None


def expand_inputs(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Return the NWB files of ``inputs``: files as given, and the ``*.nwb`` files directly inside folders.

    Raises
    ------
    SourceError
        When an input does not exist, a folder contains no ``*.nwb`` file, or no input is given.
    """
    paths: list[Path] = []
    for entry in inputs:
        path = Path(entry)
        if path.is_dir():
            found = sorted(path.glob("*.nwb"))
            if not found:
                raise SourceError(f"{path}: folder contains no *.nwb file; pass NWB files or folders that contain them")
            paths.extend(found)
        elif path.is_file():
            paths.append(path)
        else:
            raise SourceError(f"{path}: input NWB file not found; check the path")
    if not paths:
        raise SourceError("no input NWB files given; pass at least one file or folder")
    return list(dict.fromkeys(path.resolve() for path in paths))


def embed_files(
    model_dir: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    device: str = "auto",
    precision: str = "auto",
    batch_size: int = 256,
    progress: Progress | None = None,
    source_provenance: Mapping[str, Mapping[str, Any]] | None = None,
) -> EmbedSummary:
    """Embed the neurons of NWB files with a trained model and write one output NWB file per input.

    Parameters
    ----------
    model_dir
        A model directory (``runs/<name>/model``) or the run directory that contains it.
    inputs
        NWB files, or folders whose ``*.nwb`` files are embedded.
    output_dir
        Folder of the outputs, each named like its input. Created when missing.
    overwrite
        Replace outputs of an earlier run. Without it, an existing output is an error
        raised before anything is embedded.
    device, precision
        Where and in which precision the encoder runs: ``"auto"``, ``"cpu"`` or
        ``"cuda"``, and ``"auto"``, ``"fp32"`` or ``"bf16"``.
    batch_size
        Windows per forward pass.
    progress
        Draws progress bars; silent by default.
    source_provenance
        Extra provenance per input, keyed by its resolved path as str, such as DANDI
        ids. It is stored in the output's record of its source file.

    Raises
    ------
    ModelError
        When the model directory is missing, incomplete or of an incompatible version.
    SourceError
        When an input is missing or is not an NWB 2.x file.
    DataError
        When an input does not match the model: another modality, traces sampled too
        slowly for the model's grid, or a recording shorter than two of its windows.
        Also the readers' errors about the input's content.
    RunDirectoryError
        When an output exists and ``overwrite`` is False, two inputs share a file name,
        or an output would replace its input.
    """
    progress = progress or SilentProgress()
    model = load_model(model_dir)
    paths = expand_inputs(inputs)
    output_dir = Path(output_dir)
    _check_outputs(paths, output_dir, overwrite)

    for path in paths:
        check_nwb_file(path)
        _check_modality(path, model)

    parts = []
    with progress.stage("embedding NWB files", len(paths)) as advance:
        for index, path in enumerate(paths):
            parts.append(_embed_one(model, path, device=device, precision=precision, batch_size=batch_size))
            advance(index + 1)
    embeddings = xr.concat(parts, dim="neuron") if len(parts) > 1 else parts[0]

    provenance = {
        **output_provenance(model.config, model.provenance, command="neurpir-nwb embed"),
        "software": software_versions(),
    }
    outputs = write_nwb_files(
        embeddings,
        output_dir,
        provenance=provenance,
        progress=progress,
        overwrite=overwrite,
        source_provenance=source_provenance,
    )
    logger.info("embedded %d neurons of %s with model %s; outputs in %s", embeddings.sizes["neuron"], count_noun(len(paths), "file"), model.name, output_dir)
    return EmbedSummary(model_dir=model.path, outputs=outputs, embeddings=embeddings)


def _check_outputs(paths: list[Path], output_dir: Path, overwrite: bool) -> None:
    """Reject inputs that share a file name, outputs that replace their input, and existing outputs without ``overwrite``."""
    by_name: dict[str, Path] = {}
    for path in paths:
        if path.name in by_name:
            raise RunDirectoryError(
                f"inputs {by_name[path.name]} and {path} have the same file name, so their outputs in {output_dir} "
                "would collide; embed them into separate output directories"
            )
        by_name[path.name] = path

        output_path = output_dir / path.name
        if output_path.resolve() == path:
            raise RunDirectoryError(f"{output_path}: output path is the input file, which is never modified. Choose another output directory")

    existing = [output_dir / name for name in by_name if (output_dir / name).exists()]
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise RunDirectoryError(
            f"{existing[0]}: output file already exists{more}. Pass --overwrite (overwrite=True from Python) to replace it, or choose another output directory"
        )


def _contents(path: Path) -> dict[str, bool]:
    """Report which neuron tables an NWB file contains: a Units table with spike times, RoiResponseSeries, TimeSeries in acquisition."""
    found = {"units": False, "ophys": False, "timeseries": False}
    with h5py.File(path, "r") as nwb_file:
        units = nwb_file.get("units")
        found["units"] = isinstance(units, h5py.Group) and "spike_times" in units

        def visit(name: str, node: Any) -> None:
            if node.attrs.get("neurodata_type") in ("RoiResponseSeries", b"RoiResponseSeries"):
                found["ophys"] = True

        for group_name in ("processing", "acquisition"):
            group = nwb_file.get(group_name)
            if isinstance(group, h5py.Group):
                group.visititems(visit)

        acquisition = nwb_file.get("acquisition")
        if isinstance(acquisition, h5py.Group):
            found["timeseries"] = any(isinstance(node, h5py.Group) and "data" in node for node in acquisition.values())
    return found


def _check_modality(path: Path, model: LoadedModel) -> None:
    """Reject an input that lacks the kind of neuron table the model was trained on but contains another kind."""
    kind = model.reader["kind"]
    contents = _contents(path)
    if contents[kind]:
        return

    others = [name for name in ("units", "ophys") if name != kind and contents[name]]
    if not others:
        # Neither kind is present: the reader raises its own error, which names what is missing.
        return
    if kind == "units":
        fix = "embed it with a model trained on traces (a recipe whose sources set ophys: {source: auto})"
    else:
        fix = "embed it with a model trained on spike trains (a recipe whose sources are Units tables)"
    raise DataError(
        f"{path}: contains {_READER_NAMES[others[0]]} but no {_READER_NAMES[kind]}, which the model "
        f"{model.name} in {model.path} was trained on; {fix}"
    )


def _read_input(path: Path, model: LoadedModel) -> Recording | TraceRecording:
    """Read an input with the reader and reader settings of the model's training data."""
    reader = model.reader
    # Model directories written before the problem policy existed read with the default policy.
    problems = ProblemPolicy(**reader["problems"]) if "problems" in reader else None
    if reader["kind"] == "ophys":
        return read_ophys(path, source=reader.get("source", "auto"), series=reader.get("series"), problems=problems)
    if reader["kind"] == "timeseries":
        return read_timeseries(path, reader["pattern"], problems=problems)
    return read_units(
        path,
        sort_spikes=bool(reader.get("sort_spikes", False)),
        problems=problems,
        spike_times_unit=reader.get("spike_times_unit", "s"),
        sampling_rate_hz=reader.get("sampling_rate_hz"),
    )


def _native_rate_hz(recording: TraceRecording) -> float:
    """Return the traces' sampling rate, from the series or from the median sample interval."""
    if recording.rate_hz:
        return float(recording.rate_hz)
    intervals_s = np.diff(recording.timestamps_s)
    return float(1.0 / np.median(intervals_s)) if intervals_s.size else 0.0


def _check_timing(path: Path, recording: Recording | TraceRecording, model: LoadedModel) -> None:
    """Reject traces sampled too slowly for the model's grid, and recordings shorter than two windows."""
    settings = model.segment_settings
    window = f"windows of {settings.window_s:.3f} s ({settings.patches} patches x {settings.bins_per_patch} bins of {settings.bin_size_s:.4g} s)"

    if isinstance(recording, TraceRecording):
        grid_rate_hz = 1.0 / settings.bin_size_s
        rate_hz = _native_rate_hz(recording)
        if rate_hz < grid_rate_hz * (1.0 - RATE_TOLERANCE):
            raise DataError(
                f"{path}: traces are sampled at {rate_hz:.3g} Hz, but the model {model.name} resamples traces to "
                f"{grid_rate_hz:.3g} Hz (bins of {settings.bin_size_s:.4g} s), and upsampling by more than "
                f"{RATE_TOLERANCE:.0%} would invent samples. Embed recordings sampled at "
                f"{grid_rate_hz * (1.0 - RATE_TOLERANCE):.3g} Hz or faster, or train a model with segments.rate_hz "
                f"at or below {rate_hz:.3g}"
            )
        span_s = float(recording.timestamps_s[-1] - recording.timestamps_s[0]) if recording.n_samples else 0.0
    else:
        span_s = recording.t_stop_s - recording.t_start_s

    if span_s < 2 * settings.window_s:
        raise DataError(
            f"{path}: the recording spans {span_s:.3f} s, but the model {model.name} embeds {window} and needs "
            f"two windows per neuron ({2 * settings.window_s:.3f} s). Embed a longer recording, or train a model "
            "with shorter windows"
        )


def _embed_one(model: LoadedModel, path: Path, *, device: str, precision: str, batch_size: int) -> xr.Dataset:
    """Read, segment and embed one input, and predict its neurons' labels."""
    recording = _read_input(path, model)
    _check_timing(path, recording, model)

    edges = model.distance_bin_edges
    if isinstance(recording, TraceRecording):
        normalise = model.config["segments"].get("normalise", "zscore")
        segment_set = build_trace_segment_set([recording], model.segment_settings, normalise=normalise, edges=edges)
    else:
        segment_set = build_segment_set([recording], model.segment_settings, edges=edges)
    segment_set.attrs["activity_transform"] = model.config["activity_transform"]

    data = WindowData(segment_set)
    neuron_embeddings, _ = embed_neurons(model.encoder, data, batch_size=batch_size, device=device, precision=precision)

    neuron_coords = {name: coord for name, coord in segment_set.coords.items() if coord.dims == ("neuron",)}
    embeddings = xr.Dataset({"embedding": (("neuron", "dim"), neuron_embeddings)}, coords=neuron_coords)
    if model.probe is not None:
        class_names = np.array(model.class_names, dtype=object)
        probabilities = model.probe.predict_proba(neuron_embeddings.astype(np.float64))
        embeddings = embeddings.assign(
            predicted_label=("neuron", class_names[probabilities.argmax(axis=1)]),
            class_probabilities=(("neuron", "class"), probabilities.astype(np.float32)),
        ).assign_coords({"class": class_names})
    logger.info("%s: embedded %d neurons with model %s", path.name, embeddings.sizes["neuron"], model.name)
    return embeddings
