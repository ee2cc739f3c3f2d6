"""The recipe runner: sources to segments, model, embeddings, probe and NWB outputs.

This is the only module besides the command-line program that runs the whole
pipeline. Each stage takes the previous stage's value and returns a new one, and the
run directory collects what every stage produced::

    runs/<name>/
      recipe.yaml      the resolved recipe
      log.txt          the run's log (written by the command-line program)
      simulated/       NWB files of simulated animals, when the recipe simulates them
      segments.nc      the segment set, reused while the recipe's data part is unchanged
                       (segments.zarr when it is kept in zarr; see segments.store)
      model/           weights, configuration, probe and provenance
      embeddings.nc    per-neuron embeddings with ids and labels
      metrics.json     probe scores, baselines, chance level and timings
      figures/         confusion matrices, embedding map, training curve
      nwb/             one output NWB file per source file
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import platformdirs
import torch
import xarray as xr
import yaml

from neurpir_nwb._version import __version__
from neurpir_nwb.errors import DataError, RecipeError, RunDirectoryError, SourceError, TrainingError
from neurpir_nwb.evaluate import (
    ProbeResult,
    ProbeSettings,
    binned_activity_pca_features,
    fit_probe,
    plot_confusion,
    plot_embedding_map,
    plot_training_curve,
    probe_to_dict,
    retrieval_top1,
    run_probe,
    spike_train_features,
)
from neurpir_nwb.io.annotations import join_annotations, read_annotation_table
from neurpir_nwb.io.ophys import read_ophys
from neurpir_nwb.io.recording import Recording
from neurpir_nwb.io.timeseries import read_timeseries
from neurpir_nwb.io.traces import TraceRecording
from neurpir_nwb.io.units import LabelSpec, read_units
from neurpir_nwb.io.nwbfile import remote_url
from neurpir_nwb.io.writer import EmbeddingBlock, write_embedding_tables_nwb, write_streamed_embeddings_nwb
from neurpir_nwb.model_directory import output_provenance, read_model_metadata, write_json_atomic, write_model_directory
from neurpir_nwb.model import EncoderConfig, NeurPIREncoder, Projector, VICRegLoss
from neurpir_nwb.progress import Progress, SilentProgress
from neurpir_nwb.recipe import Recipe
from neurpir_nwb.simulate import SimulationSettings, simulate_dataset
from neurpir_nwb.segments import (
    SegmentSettings,
    activity_bytes,
    build_segment_set,
    build_trace_segment_set,
    lazy_activity,
    load_segment_set,
    remove_segment_set,
    save_segment_set,
    write_segment_set,
)
from neurpir_nwb.train import (
    TrainConfig,
    Trainer,
    WindowData,
    embed_neurons,
    embedding_batch_count,
    load_checkpoint,
    resolve_device,
)

__all__ = ["RunSummary", "run_recipe", "prepare_run_directory"]

logger = logging.getLogger(__name__)

#: Files and folders whose presence means a run directory contains an earlier run's results.
RESULT_ENTRIES = ("metrics.json", "embeddings.nc", "model", "nwb")

#: Environment variable naming the folder that DANDI sources are downloaded into.
DANDI_CACHE_ENV = "NEURPIR_DANDI_CACHE"


@dataclass
class RunSummary:
    """Run directory, headline metrics and output files of a finished run."""

    run_dir: Path
    metrics: dict[str, Any]
    outputs: list[Path] = field(default_factory=list)


def prepare_run_directory(recipe: Recipe, *, overwrite: bool = False, resume: bool = False) -> Path:
    """Create the run directory, refusing one that contains an earlier run's results unless ``overwrite`` or ``resume``.

    Missing source files and a missing CUDA device are reported first, before
    anything is written.

    With ``overwrite`` the earlier results are removed, but the segment set stays so
    that it can be reused. With ``resume``, ``model/checkpoint.pt`` must exist: it
    stays, so that training continues from it, and the other results are removed.
    Without ``resume`` no checkpoint survives this function, which is how
    :func:`train_encoder` knows whether to resume.
    """
    missing = [str(path) for path in recipe.source_paths if not path.is_file()]
    if missing:
        raise SourceError(
            f"source file {missing[0]} not found"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + "; check the path (paths in a recipe are relative to the recipe file)"
        )
    resolve_device(recipe.train.device)

    run_dir = recipe.output_dir
    checkpoint = run_dir / "model" / "checkpoint.pt"
    if resume and overwrite:
        raise RunDirectoryError("--resume continues the run in the run directory and --overwrite replaces it; pass only one of them")
    if resume and recipe.separate_models:
        # NOTE: each modality's run directory is prepared inside run_recipe, which has no resume option yet.
        raise RunDirectoryError(f"recipe {recipe.name} trains one model per modality (separate_models), which --resume does not support yet")
    if resume and not checkpoint.is_file():
        raise RunDirectoryError(f"no checkpoint to resume: {checkpoint} not found; start the run without --resume")

    earlier = [name for name in RESULT_ENTRIES if (run_dir / name).exists()]
    if earlier and not overwrite and not resume:
        if checkpoint.is_file():
            fix = "Pass --resume to continue its training, --overwrite to replace its results, or choose another directory with --output"
        else:
            fix = "Pass --overwrite to replace them, or choose another directory with --output"
        raise RunDirectoryError(f"run directory {run_dir} already contains results of an earlier run ({', '.join(earlier)}). {fix}")

    for name in earlier:
        target = run_dir / name
        if resume and name == "model":
            continue
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    shutil.rmtree(run_dir / "figures", ignore_errors=True)

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe.resolved(), sort_keys=False), encoding="utf-8")
    return run_dir


def run_recipe(
    recipe: Recipe,
    *,
    overwrite: bool = False,
    progress: Progress | None = None,
    run_dir: Path | None = None,
) -> RunSummary:
    """Run a whole recipe and return where its results are.

    Parameters
    ----------
    recipe
        A validated recipe from :func:`neurpir_nwb.recipe.load_recipe`.
    overwrite
        Replace the results of an earlier run in the same run directory.
    progress
        Draws progress bars for the long stages; silent by default.
    run_dir
        A run directory already made by :func:`prepare_run_directory`; by default it
        is prepared here.
    """
    progress = progress or SilentProgress()
    timings: dict[str, float] = {}
    started = time.perf_counter()
    if run_dir is None:
        run_dir = prepare_run_directory(recipe, overwrite=overwrite)
    logger.info("run directory: %s", run_dir)

    if len({source.modality for source in recipe.sources}) > 1:
        return _run_separate_models(recipe, run_dir, overwrite=overwrite, progress=progress)

    clock = time.perf_counter()
    resolved = resolve_sources(recipe, run_dir, progress)
    source_paths = resolved.paths
    timings["simulate_s"] = time.perf_counter() - clock

    clock = time.perf_counter()
    recordings = read_sources(recipe, source_paths, progress, entries=resolved.entries)
    annotation_reports = join_all_annotations(recipe, recordings)
    timings["read_s"] = time.perf_counter() - clock

    clock = time.perf_counter()
    segment_set = segment(recipe, recordings, run_dir)
    timings["segment_s"] = time.perf_counter() - clock

    clock = time.perf_counter()
    data = window_data(recipe, segment_set)
    encoder, train_result = train_encoder(recipe, data, run_dir, progress)
    timings["train_s"] = time.perf_counter() - clock

    clock = time.perf_counter()
    embeddings, window_embeddings = compute_embeddings(recipe, encoder, segment_set, data, progress)
    timings["embed_s"] = time.perf_counter() - clock

    clock = time.perf_counter()
    evaluation = evaluate(recipe, embeddings, recordings, data, run_dir)
    evaluation.metrics["retrieval"] = score_retrieval(recipe, window_embeddings, data)
    embeddings = _with_predictions(embeddings, evaluation)
    _write_netcdf_atomic(embeddings, run_dir / "embeddings.nc")
    _plot_training_curve(train_result.history, run_dir)
    timings["evaluate_s"] = time.perf_counter() - clock

    clock = time.perf_counter()
    save_model(recipe, encoder, segment_set, evaluation, run_dir, source_provenance=resolved.provenance)
    outputs = write_outputs(recipe, embeddings, evaluation, run_dir, progress, source_provenance=resolved.provenance)
    timings["write_s"] = time.perf_counter() - clock
    timings["total_s"] = time.perf_counter() - started

    metrics = {
        "name": recipe.name,
        "neurpir_version": __version__,
        "recipe_sha256": recipe.sha256(),
        "n_neurons": int(embeddings.sizes["neuron"]),
        "n_windows": int(segment_set["valid"].sum()),
        "sources": [str(path) for path in source_paths],
        "training": {
            "neurons": int(len(data.trainable_neurons())),
            "heldout_windows": int(data.heldout.sum()),
            "device": train_result.device,
            "precision": train_result.precision,
            "steps": recipe.train.epochs * recipe.train.steps_per_epoch,
            "windows_per_s": train_result.windows_per_s,
            "seconds": train_result.seconds,
            "final_loss": float(np.mean(train_result.history["loss"][-recipe.train.steps_per_epoch :])),
        },
        **evaluation.metrics,
        "annotations": annotation_reports,
        "timings_s": timings,
        "machine": machine_description(),
    }
    write_json_atomic(run_dir / "metrics.json", metrics)
    logger.info("wrote %s", run_dir / "metrics.json")
    return RunSummary(run_dir=run_dir, metrics=metrics, outputs=outputs)


def _write_netcdf_atomic(dataset: xr.Dataset, path: Path) -> None:
    """Write a Dataset to netCDF under a temporary name beside ``path``, then rename it to ``path``."""
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        dataset.to_netcdf(partial, engine="h5netcdf")
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def _run_separate_models(recipe: Recipe, run_dir: Path, *, overwrite: bool, progress: Progress) -> RunSummary:
    """Train one model per modality, each in its own run directory, and gather their metrics."""
    metrics: dict[str, Any] = {"name": recipe.name, "neurpir_version": __version__, "recipe_sha256": recipe.sha256(), "models": {}}
    outputs = []
    for modality, part in recipe.split_by_modality().items():
        logger.info("training the %s model in %s", modality, part.output_dir)
        summary = run_recipe(part, overwrite=overwrite, progress=progress)
        metrics["models"][modality] = {"run_dir": str(summary.run_dir), **summary.metrics}
        outputs.extend(summary.outputs)

    write_json_atomic(run_dir / "metrics.json", metrics)
    return RunSummary(run_dir=run_dir, metrics=metrics, outputs=outputs)


@dataclass
class ResolvedSources:
    """The local NWB files of a recipe's sources, in order, with the recipe entry each came from.

    Attributes
    ----------
    paths
        One NWB file per recording.
    entries
        The recipe source of each path.
    provenance
        Extra provenance per path (as resolved str), such as the dandiset, version and
        asset id of a DANDI asset.
    """

    paths: list[Path] = field(default_factory=list)
    entries: list[Any] = field(default_factory=list)
    provenance: dict[str, dict[str, Any]] = field(default_factory=dict)


def resolve_sources(recipe: Recipe, run_dir: Path, progress: Progress) -> ResolvedSources:
    """Return the NWB file of every source: local files, DANDI assets and simulated animals.

    DANDI assets are fetched into the cache folder with verified digests (a file
    already verified there is not fetched again). Simulated animals are written to
    ``run_dir/simulated``, and a file that already exists with the same settings is
    reused. Every file is then read like any other NWB file.
    """
    resolved = ResolvedSources()
    for source in recipe.sources:
        if source.dandi is not None:
            for path, fields in fetch_dandi_source(recipe, source, run_dir, progress):
                resolved.paths.append(path)
                resolved.entries.append(source)
                resolved.provenance[source_key(path)] = fields
            continue

        if source.path is not None:
            resolved.paths.append((recipe.base_dir / source.path).resolve())
            resolved.entries.append(source)
            continue

        simulation = source.simulate
        options = {"n_neurons": simulation.neurons, "duration_s": simulation.duration_s}
        for name in ("type_mix", "parameter_jitter", "reset_jitter_mv", "layout", "fast_input_sd", "fast_input_tau_s", "population_coupling"):
            if getattr(simulation, name) is not None:
                options[name] = getattr(simulation, name)
        seeds = range(simulation.first_seed, simulation.first_seed + simulation.animals)
        paths = simulate_dataset(run_dir / "simulated", SimulationSettings(**options), seeds, progress=progress)
        resolved.paths.extend(paths)
        resolved.entries.extend([source] * len(paths))
    return resolved


def dandi_cache_dir(recipe: Recipe, source: Any) -> Path:
    """Return the folder that DANDI assets of a source are downloaded into.

    In order: the source's ``cache`` (relative to the recipe file), the environment
    variable ``NEURPIR_DANDI_CACHE``, then ``dandisets`` in the user's cache folder.
    """
    if source.cache is not None:
        return (recipe.base_dir / source.cache).resolve()
    if os.environ.get(DANDI_CACHE_ENV):
        return Path(os.environ[DANDI_CACHE_ENV]).expanduser().resolve()
    return Path(platformdirs.user_cache_dir("neurpir-nwb")) / "dandisets"


def fetch_dandi_source(recipe: Recipe, source: Any, run_dir: Path, progress: Progress) -> list[tuple[Path, dict[str, Any]]]:
    """Fetch the NWB assets of a DANDI source and return each local file with its provenance.

    Raises
    ------
    SourceError
        When the source requests streaming, when the run directory lies inside the
        cache folder, or when the fetch fails. The message names the asset and the reason.
    """
    from neurpir_nwb.dandi import fetch, parse_dandi_ref  # imported here because the dandi client loads slowly

    glob = source.path.as_posix() if source.path is not None else "**/*.nwb"
    if source.mode == "stream":
        return _stream_dandi_source(source, glob)

    cache = dandi_cache_dir(recipe, source)
    if run_dir.resolve().is_relative_to(cache):
        raise SourceError(
            f"run directory {run_dir} lies inside the DANDI download folder {cache}; outputs never go into the downloaded tree, "
            "so choose another --output"
        )

    cache.mkdir(parents=True, exist_ok=True)
    result = fetch(parse_dandi_ref(source.dandi), [glob], cache, api_url=source.api_url, progress=progress)

    # The manifest contains each asset's id and digest, so pair them with the fetched files.
    manifest = json.loads(Path(result.manifest_path).read_text(encoding="utf-8"))
    by_path = {entry["path"]: entry for entry in manifest["assets"]}
    fetched = []
    for path in result.paths:
        if path.suffix != ".nwb":
            logger.info("%s: not an NWB file, left out of the recipe's sources", path)
            continue
        asset_path = path.relative_to(cache / result.dandiset_id).as_posix()
        entry = by_path.get(asset_path, {})
        fields = {
            "dandiset_id": result.dandiset_id,
            "dandiset_version": result.version,
            "asset_id": entry.get("asset_id", ""),
            "asset_path": asset_path,
            "dandi_etag": entry.get("dandi_etag", ""),
        }
        fetched.append((path.resolve(), fields))
    if not fetched:
        raise SourceError(f"no NWB asset of {source.dandi} matches the path glob {glob!r}; list the assets with `neurpir-nwb fetch {source.dandi} --list`")
    logger.info("%s (version %s): %d NWB assets in %s", source.dandi, result.version, len(fetched), cache / result.dandiset_id)
    return fetched


def _stream_dandi_source(source: Any, glob: str) -> list[tuple[Path, dict[str, Any]]]:
    """List the NWB assets of a DANDI source and return the URL of each, to be read over HTTP range requests.

    The URLs are returned as ``Path`` objects, which the NWB readers open as streams.
    """
    from neurpir_nwb.dandi import list_assets, parse_dandi_ref, stream_url

    if source.modality != "ecephys":
        # NOTE: outputs of streamed sources copy the Units table only, so ROI traces must be downloaded.
        raise SourceError(
            f"source {source.dandi} streams ROI traces or TimeSeries, but streaming supports Units tables only; "
            "use mode 'download' for this source"
        )

    version, assets = list_assets(parse_dandi_ref(source.dandi), [glob], api_url=source.api_url)
    streamed = []
    for asset in assets:
        if not asset.path.endswith(".nwb"):
            continue
        fields = {
            "dandiset_id": parse_dandi_ref(source.dandi).dandiset_id,
            "dandiset_version": version,
            "asset_id": asset.asset_id,
            "asset_path": asset.path,
            "dandi_etag": asset.etag or "",
            "mode": "stream",
        }
        url = stream_url(asset)
        streamed.append((Path(url), {**fields, "url": url}))
    if not streamed:
        raise SourceError(f"no NWB asset of {source.dandi} matches the path glob {glob!r}; list the assets with `neurpir-nwb fetch {source.dandi} --list`")
    logger.info("%s (version %s): streaming %d NWB assets", source.dandi, version, len(streamed))
    return streamed


def read_sources(
    recipe: Recipe, paths: list[Path], progress: Progress, *, entries: Sequence[Any] | None = None
) -> list[Recording | TraceRecording]:
    """Read every source file as its recipe entry specifies: its Units table, its ROI traces or plain TimeSeries.

    ``entries`` gives the recipe source of each path, as :func:`resolve_sources`
    returns them. Without it, each local file or simulated animal is paired with its
    recipe entry in order.
    """
    unit_labels = {
        name: LabelSpec(source=spec.from_, field=spec.field)
        for name, spec in recipe.labels.items()
        if spec.from_.split(".")[0] in ("units", "electrodes")
    }
    roi_labels = {name: spec.from_.split(".", 1)[1] for name, spec in recipe.labels.items() if spec.from_.startswith("rois.")}

    # Simulated sources come first in `paths` only when listed first, so pair each path with its source's options.
    options = list(entries) if entries is not None else []
    if entries is None:
        for source in recipe.sources:
            count = source.simulate.animals if source.simulate is not None else 1
            options.extend([source] * count)

    recordings = []
    with progress.stage("reading NWB files", len(paths)) as advance:
        for index, (path, source) in enumerate(zip(paths, options)):
            if source.ophys is not None:
                recording = read_ophys(
                    path, source=source.ophys.source, series=source.ophys.series, labels=roi_labels or None, problems=recipe.problems
                )
                logger.info("%s: %d ROIs, %d samples, positions from %s", path.name, recording.n_neurons, recording.n_samples, recording.position_source)
            elif source.timeseries is not None:
                recording = read_timeseries(path, source.timeseries.pattern, problems=recipe.problems)
                logger.info("%s: %d TimeSeries as neurons, %d samples", path.name, recording.n_neurons, recording.n_samples)
            else:
                recording = read_units(
                    path,
                    labels=unit_labels,
                    sort_spikes=recipe.units.sort_spikes,
                    problems=recipe.problems,
                    spike_times_unit=recipe.units.spike_times_unit,
                    sampling_rate_hz=recipe.units.sampling_rate_hz,
                )
                logger.info(
                    "%s: %d units, %d spikes over %.1f to %.1f s, positions from %s",
                    path.name,
                    recording.n_neurons,
                    int(recording.spike_counts.sum()),
                    recording.t_start_s,
                    recording.t_stop_s,
                    recording.position_source,
                )
            recordings.append(recording)
            advance(index + 1)

    return recordings


def join_all_annotations(recipe: Recipe, recordings: list[Recording | TraceRecording]) -> dict[str, dict[str, Any]]:
    """Join every label that comes from an annotation table, and return the join report of each."""
    return {
        name: join_annotation_labels(recipe, name, recordings)
        for name, spec in recipe.labels.items()
        if spec.from_ == "annotations"
    }


def join_annotation_labels(recipe: Recipe, name: str, recordings: list[Recording]) -> dict[str, Any]:
    """Join one label from an annotation table onto the neurons of all recordings at once.

    Neurons without a matching row stay unlabelled (``""``): they still train, and the
    probe leaves them out. The join report is logged and returned.
    """
    spec = recipe.labels[name]
    table = read_annotation_table(recipe.base_dir / spec.table)
    identifiers = np.concatenate([[recording.identifier] * recording.n_neurons for recording in recordings])
    sources = np.concatenate([[str(recording.path)] * recording.n_neurons for recording in recordings])
    ids = np.concatenate([_neuron_ids_in_table(recording) for recording in recordings])
    planes = None
    if any(isinstance(recording, TraceRecording) for recording in recordings):
        planes = np.concatenate([_plane_names(recording) for recording in recordings])
    values, raw, report = join_annotations(
        table,
        identifiers=identifiers,
        sources=sources,
        ids=ids,
        planes=planes,
        label_column=spec.column,
        normalise=spec.normalise,
        merge=spec.merge,
        drop=spec.drop,
    )

    # Split the joined labels back into the recordings, in the order they were concatenated.
    start = 0
    for recording in recordings:
        stop = start + recording.n_neurons
        recording.labels[name] = np.asarray(values[start:stop], dtype=object)
        recording.labels[f"{name}_raw"] = np.asarray(raw[start:stop], dtype=object)
        start = stop
    return report.to_dict()


def _neuron_ids_in_table(recording: Recording | TraceRecording) -> np.ndarray:
    """Return the unit ids of a Units recording or the ROI ids of a trace recording."""
    return recording.roi_ids if isinstance(recording, TraceRecording) else recording.unit_ids


def _plane_names(recording: Recording | TraceRecording) -> np.ndarray:
    """Return each neuron's PlaneSegmentation name, or ``""`` where there is none."""
    if not isinstance(recording, TraceRecording):
        return np.full(recording.n_neurons, "", dtype=object)
    return np.array([str(table).rsplit("/", 1)[-1] for table in recording.plane_tables], dtype=object)


#: Binned activity above which ``segments.store: auto`` keeps a segment set in zarr rather than in memory.
MEMORY_STORE_LIMIT_BYTES = 4 * 2**30


def segment(recipe: Recipe, recordings: list[Recording | TraceRecording], run_dir: Path) -> xr.Dataset:
    """Build the segment set, or reuse the run directory's one when the data part of the recipe is unchanged.

    A set kept in zarr (``segments.store``) is returned with its activity on disk;
    :func:`window_data` reads it lazily.
    """
    settings = SegmentSettings(**recipe.segments.model_dump(exclude={"normalise", "rate_hz", "store"}))
    settings.bin_size_s = recipe.segments.bin_width_s
    store = segment_store(recipe, recordings, settings)
    path = run_dir / ("segments.zarr" if store == "zarr" else "segments.nc")
    data_sha256 = recipe.data_sha256([Path(recording.path) for recording in recordings])
    if path.exists():
        cached = load_segment_set(path, lazy=store == "zarr")
        if cached.attrs.get("data_sha256") == data_sha256:
            logger.info("reusing the segment set %s: sources and segment settings are unchanged", path)
            return cached
        logger.info("rebuilding the segment set %s: sources or segment settings changed", path)

    # A set of the other store, from an earlier run with another segments.store, is stale now.
    other = run_dir / ("segments.nc" if store == "zarr" else "segments.zarr")
    if other.exists():
        logger.info("removing %s: the segment set is now kept in %s", other, path.name)
        remove_segment_set(other)

    if recipe.modality == "ophys":
        segment_set = build_trace_segment_set(recordings, settings, normalise=recipe.segments.normalise)
    elif store == "zarr":
        logger.info("writing the segment set to %s one block of units at a time", path)
        return write_segment_set(recordings, settings, path, attrs={"data_sha256": data_sha256})
    else:
        segment_set = build_segment_set(recordings, settings)
    segment_set.attrs["data_sha256"] = data_sha256
    save_segment_set(segment_set, path)
    logger.info("wrote the segment set to %s", path)
    return segment_set


def segment_store(recipe: Recipe, recordings: list, settings: SegmentSettings) -> str:
    """Return ``"memory"`` or ``"zarr"``: the recipe's ``segments.store``, with auto decided by the activity's size."""
    if recipe.modality == "ophys":
        return "memory"
    if recipe.segments.store != "auto":
        return recipe.segments.store
    size = activity_bytes(recordings, settings)
    store = "zarr" if size > MEMORY_STORE_LIMIT_BYTES else "memory"
    logger.info(
        "segments.store auto: the binned activity takes %.2f GiB (zarr above %.0f GiB), so the segment set is kept in %s",
        size / 2**30,
        MEMORY_STORE_LIMIT_BYTES / 2**30,
        store,
    )
    return store


def encoder_config(recipe: Recipe) -> EncoderConfig:
    """Return the encoder configuration that the recipe's segments and model sections describe."""
    return EncoderConfig(
        bins_per_patch=recipe.segments.bins_per_patch,
        patches=recipe.segments.patches,
        dim=recipe.model.dim,
        heads=recipe.model.heads,
        temporal_layers=recipe.model.temporal_layers,
        spatiotemporal_layers=recipe.model.spatiotemporal_layers,
        distance_bins=recipe.segments.distance_bins,
        mlp_ratio=recipe.model.mlp_ratio,
        dropout=recipe.model.dropout,
        own_embedding=recipe.model.own_embedding,
        batching=recipe.model.batching,
    )


def build_modules(recipe: Recipe) -> tuple[NeurPIREncoder, Projector, VICRegLoss]:
    """Create the encoder, projector and loss the recipe describes."""
    config = encoder_config(recipe)
    encoder = NeurPIREncoder(config)
    projector = Projector(config.output_dim, recipe.model.projector, parts=2 if config.own_embedding else 1)
    loss = VICRegLoss(
        invariance=recipe.loss.invariance,
        variance=recipe.loss.variance,
        covariance=recipe.loss.covariance,
    )
    return encoder, projector, loss


def window_data(recipe: Recipe, segment_set: xr.Dataset) -> WindowData:
    """Prepare the windows for training: hold out the last windows, and the test subjects of a zero-shot split."""
    train_neurons = None
    if recipe.evaluate.split == "test-subjects":
        subjects = segment_set["subject"].values.astype(str)
        unknown = sorted(set(recipe.evaluate.test_subjects) - set(subjects.tolist()))
        if unknown:
            raise RecipeError(
                f"evaluate.test_subjects {unknown} match no subject of the sources; "
                f"the subjects are {sorted(set(subjects.tolist()))}"
            )
        train_neurons = np.flatnonzero(~np.isin(subjects, recipe.evaluate.test_subjects))
        logger.info(
            "zero-shot split: the encoder never sees subjects %s (%d neurons)",
            ", ".join(recipe.evaluate.test_subjects),
            int(len(subjects) - len(train_neurons)),
        )
    return WindowData(
        segment_set,
        holdout_fraction=recipe.train.holdout_fraction,
        train_neurons=train_neurons,
        activity=lazy_activity(segment_set),
    )


def train_encoder(recipe: Recipe, data: WindowData, run_dir: Path, progress: Progress):
    """Train the encoder on positive pairs of windows, saving checkpoints in ``run_dir/model``.

    When ``run_dir/model/checkpoint.pt`` exists, training continues from it:
    :func:`prepare_run_directory` keeps a checkpoint only for ``--resume``. With
    several processes (see :mod:`neurpir_nwb.distributed`), this runs on rank 0,
    which sends the windows, the recipe and the checkpoint to the other ranks and
    alone writes checkpoints.
    """
    from neurpir_nwb import distributed

    checkpoint_path = run_dir / "model" / "checkpoint.pt"
    checkpoint = load_checkpoint(checkpoint_path) if checkpoint_path.is_file() else None
    data_sha256 = data_sha256_of(data)
    if checkpoint is not None:
        written_for = checkpoint.get("metadata", {}).get("data_sha256")
        if written_for is not None and written_for != data_sha256:
            raise RunDirectoryError(
                f"{checkpoint_path} was written for other training windows than the recipe's sources give now; "
                "resume with the sources and segment settings of the interrupted run, or pass --overwrite to start again"
            )
        logger.info("resuming from %s (step %d)", checkpoint_path, int(checkpoint["step"]))

    session = distributed.current()
    if session is not None:
        distributed.share_training(session, (recipe, data, checkpoint))

    trainer = build_trainer(recipe, session=session)
    if checkpoint is not None:
        trainer.load_checkpoint(checkpoint)
    with progress.stage("training", trainer.config.total_steps) as advance:
        if trainer.start_step:
            advance(trainer.start_step)
        try:
            result = trainer.fit(
                data,
                checkpoint_dir=run_dir / "model",
                on_step=lambda step, total, metrics: advance(step),
                metadata={"data_sha256": data_sha256},
            )
        except RuntimeError as error:
            if session is None:
                raise
            session.healthy = False
            raise TrainingError(
                f"training with {session.world_size} processes failed ({error}); the messages of the other processes "
                "above name the cause"
            ) from error
        except BaseException:
            if session is not None:
                session.healthy = False
            raise

    logger.info(
        "trained %d steps in %.1f s: %.1f windows/s on %s (%s, %s batching, %d process%s)",
        trainer.config.total_steps,
        result.seconds,
        result.windows_per_s,
        result.device,
        result.precision,
        result.batching,
        result.processes,
        "es" if result.processes > 1 else "",
    )
    return trainer.encoder, result


def build_trainer(recipe: Recipe, *, session: Any = None) -> Trainer:
    """Create the modules the recipe describes, seeded with ``train.seed``, and their trainer."""
    torch.manual_seed(recipe.train.seed)
    encoder, projector, loss = build_modules(recipe)
    return Trainer(encoder, projector, loss, TrainConfig.from_recipe(recipe.train), session=session)


#: Neurons whose activity is hashed at once, so that a set kept in zarr is read in pieces.
ACTIVITY_HASH_NEURONS = 64


def data_sha256_of(data: WindowData) -> str:
    """Return the sha256 of the training windows: activity, neighbours and which windows may train."""
    digest = hashlib.sha256()
    for start in range(0, data.n_neurons, ACTIVITY_HASH_NEURONS):
        digest.update(np.ascontiguousarray(data.activity[start : start + ACTIVITY_HASH_NEURONS]).tobytes())
    for array in (data.train_mask, data.neighbour, data.distance_bin):
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def compute_embeddings(
    recipe: Recipe, encoder: NeurPIREncoder, segment_set: xr.Dataset, data: WindowData, progress: Progress
) -> tuple[xr.Dataset, np.ndarray]:
    """Embed every window and average each neuron's windows into one embedding.

    Returns the per-neuron embeddings with the segment set's neuron coordinates, and
    the (neuron, window, dim) window embeddings.
    """
    n_batches = embedding_batch_count(encoder, data, batch_size=recipe.train.embed_batch_size)
    with progress.stage("embedding windows (batches)", n_batches) as advance:
        neuron_embeddings, window_embeddings = embed_neurons(
            encoder,
            data,
            batch_size=recipe.train.embed_batch_size,
            device=recipe.train.device,
            precision=recipe.train.precision,
            on_batch=lambda done, total: advance(done),
        )

    neuron_coords = {name: coord for name, coord in segment_set.coords.items() if coord.dims == ("neuron",)}
    embeddings = xr.Dataset(
        {"embedding": (("neuron", "dim"), neuron_embeddings)},
        coords={**neuron_coords, "trained_on": ("neuron", np.isin(np.arange(data.n_neurons), data.trainable_neurons()))},
        attrs={"neurpir_version": __version__, "recipe_sha256": recipe.sha256(), "window_s": segment_set.attrs["window_s"]},
    )
    return embeddings, window_embeddings


def score_retrieval(recipe: Recipe, window_embeddings: np.ndarray, data: WindowData) -> dict[str, Any] | None:
    """Score same-neuron retrieval of the held-out windows, when the recipe keeps windows out of training."""
    if recipe.train.holdout_fraction == 0 or not data.heldout.any():
        return None
    return retrieval_top1(window_embeddings, data.valid & ~data.heldout, data.heldout)


@dataclass
class Evaluation:
    """Probe results on the embeddings and on the baseline features."""

    label: str | None = None
    embedding_probe: ProbeResult | None = None
    baseline_probe: ProbeResult | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    probe: dict[str, Any] | None = None


def probe_settings(recipe: Recipe) -> ProbeSettings:
    """Translate the recipe's evaluate section into probe settings."""
    split = {"stratified": "stratified", "leave-one-subject-out": "leave-one-group-out", "test-subjects": "holdout"}
    return ProbeSettings(
        classifier=recipe.evaluate.probe,
        class_balance=recipe.evaluate.class_balance,
        knn_neighbours=recipe.evaluate.knn_neighbours,
        split=split[recipe.evaluate.split],
        folds=recipe.evaluate.folds,
        test_groups=tuple(recipe.evaluate.test_subjects),
    )


def recording_spike_features(recording: Recording) -> np.ndarray:
    """Return the firing-rate and ISI features of a recording's units, block by block when the trains are read in blocks."""
    trains = recording.spike_times
    blocks = trains.blocks() if hasattr(trains, "blocks") else [(0, trains)]
    return np.concatenate(
        [spike_train_features(block, recording.t_start_s, recording.t_stop_s) for _, block in blocks]
    )


def evaluate(recipe: Recipe, embeddings: xr.Dataset, recordings: list[Recording], data: WindowData, run_dir: Path) -> Evaluation:
    """Score the embeddings with a linear probe against the baseline features, and draw the figures."""
    figures = run_dir / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    label = recipe.probe_label
    vectors = embeddings["embedding"].values

    if label is None or f"label_{label}" not in embeddings.coords:
        plot_embedding_map(vectors, [""] * len(vectors), figures / "embedding_map.png", title=f"{recipe.name}: embeddings")
        logger.info("no label to probe: the recipe defines no labels, so only embeddings are written")
        return Evaluation(metrics={"probe": None})

    labels = embeddings[f"label_{label}"].values.astype(str)
    plot_embedding_map(vectors, labels, figures / "embedding_map.png", title=f"{recipe.name}: embeddings by {label}")

    settings = probe_settings(recipe)
    groups = embeddings["subject"].values.astype(str)
    seed = recipe.train.seed
    try:
        embedding_probe = run_probe(vectors, labels, seed=seed, groups=groups, settings=settings)
    except ValueError as error:
        logger.warning("probe on label %r skipped: %s", label, error)
        return Evaluation(label=label, metrics={"probe": None, "probe_skipped": str(error)})

    baseline_probe = None
    if all(isinstance(recording, Recording) for recording in recordings):
        baseline_features = np.concatenate([recording_spike_features(recording) for recording in recordings])
        baseline_probe = run_probe(baseline_features, labels, seed=seed, groups=groups, settings=settings)

    pca_features = binned_activity_pca_features(data.activity, data.valid, data.trainable_neurons(), seed=seed)
    pca_probe = run_probe(pca_features, labels, seed=seed, groups=groups, settings=settings)

    plot_confusion(embedding_probe, figures / "confusion_embedding.png", title=f"{label}: probe on embeddings")
    logger.info(
        "probe on %r: macro-F1 %.3f, balanced accuracy %.3f (chance %.3f); PCA baseline macro-F1 %.3f",
        label,
        embedding_probe.macro_f1,
        embedding_probe.balanced_accuracy,
        embedding_probe.chance_balanced_accuracy,
        pca_probe.macro_f1,
    )
    if baseline_probe is not None:
        plot_confusion(baseline_probe, figures / "confusion_baseline.png", title=f"{label}: probe on firing-rate and ISI features")
        logger.info(
            "spike-train baseline on %r: macro-F1 %.3f, balanced accuracy %.3f",
            label,
            baseline_probe.macro_f1,
            baseline_probe.balanced_accuracy,
        )

    # The saved probe, which `embed` uses, is fitted without the test subjects of a zero-shot split too.
    fitted_on = ~np.isin(groups, _test_subjects(recipe))
    probe = probe_to_dict(fit_probe(vectors[fitted_on], labels[fitted_on], seed=seed, settings=settings))
    metrics = {
        "probe": {
            "label": label,
            "model": recipe.evaluate.probe,
            "split": recipe.evaluate.split,
            "folds": embedding_probe.n_folds,
            "test_subjects": list(recipe.evaluate.test_subjects),
        },
        "embedding": embedding_probe.to_dict(),
        "baseline": (
            {"features": "firing rate, CV of inter-spike intervals, log-ISI histogram", **baseline_probe.to_dict()}
            if baseline_probe is not None
            else None
        ),
        "baseline_pca": {"features": "mean and SD of the 16 principal components of binned windows", **pca_probe.to_dict()},
    }
    return Evaluation(label=label, embedding_probe=embedding_probe, baseline_probe=baseline_probe, metrics=metrics, probe=probe)


def _with_predictions(embeddings: xr.Dataset, evaluation: Evaluation) -> xr.Dataset:
    """Add the probe's predictions and class probabilities to the embeddings."""
    result = evaluation.embedding_probe
    if result is None:
        return embeddings
    return embeddings.assign(
        predicted_label=("neuron", result.predicted.astype(object)),
        class_probabilities=(("neuron", "class"), result.probabilities.astype(np.float32)),
    ).assign_coords({"class": np.array(result.classes, dtype=object)})


def _plot_training_curve(history: dict[str, list[float]], run_dir: Path) -> None:
    """Draw the loss terms against the step."""
    names = {
        "loss": "loss (weighted sum)",
        "invariance": "invariance (unweighted)",
        "variance": "variance (unweighted)",
        "covariance": "covariance (unweighted)",
    }
    curves = {label: history[name] for name, label in names.items() if name in history}
    plot_training_curve(curves, run_dir / "figures" / "training_curve.png", title="VICReg loss and its terms")


def save_model(
    recipe: Recipe,
    encoder: NeurPIREncoder,
    segment_set: xr.Dataset,
    evaluation: Evaluation,
    run_dir: Path,
    *,
    source_provenance: Mapping[str, Mapping[str, Any]] | None = None,
) -> Path:
    """Write the model directory: weights, encoder and segment settings, reader settings, probe and provenance.

    The weights are a plain state dict that loads with ``torch.load(weights_only=True)``,
    and the probe is JSON, so nothing in the folder needs pickle. Each file is written
    atomically; see :mod:`neurpir_nwb.model_directory` for the layout.

    Parameters
    ----------
    source_provenance
        Extra fields per source file, keyed by its resolved path as str, such as
        ``{"dandiset_id": "000021", "dandiset_version": "0.210913.1639", "asset_id": ...}``
        for DANDI assets. They are added to the training sources' records.
    """
    segments = {
        **SegmentSettings.from_attrs(segment_set.attrs).to_dict(),
        "distance_bin_edges": [float(edge) for edge in segment_set.attrs["distance_bin_edges"]],
    }
    if segment_set.attrs["modality"] == "ophys":
        segments["normalise"] = str(segment_set.attrs["normalise"])
        segments["rate_hz"] = float(segment_set.attrs["rate_hz"])

    provenance = {
        "recipe_sha256": recipe.sha256(),
        "recipe": recipe.resolved(),
        "sources": [str(path) for path in recipe.source_paths],
        "identifiers": sorted(set(segment_set["identifier"].values.astype(str).tolist())),
        "training_sources": training_source_records(segment_set, source_provenance, test_subjects=_test_subjects(recipe)),
        "versions": software_versions(),
    }
    return write_model_directory(
        run_dir / "model",
        encoder=encoder,
        model_name=recipe.name,
        segments=segments,
        modality=str(segment_set.attrs["modality"]),
        activity_transform=str(segment_set.attrs["activity_transform"]),
        reader=reader_settings(recipe),
        probe=evaluation.probe,
        label_name=evaluation.label,
        provenance=provenance,
    )


def _test_subjects(recipe: Recipe) -> list[str]:
    """Return the subjects that the encoder never trains on: the test subjects of a zero-shot split."""
    return list(recipe.evaluate.test_subjects) if recipe.evaluate.split == "test-subjects" else []


def reader_settings(recipe: Recipe) -> dict[str, Any]:
    """Return how the recipe's sources are read, so that ``embed`` reads new files the same way.

    NOTE: sources of one modality that use different readers (ROI traces and plain
    TimeSeries) record the first source's reader only.
    """
    source = recipe.sources[0]
    problems = recipe.problems.model_dump(mode="json")
    if source.ophys is not None:
        return {"kind": "ophys", "source": source.ophys.source, "series": source.ophys.series, "problems": problems}
    if source.timeseries is not None:
        return {"kind": "timeseries", "pattern": source.timeseries.pattern, "problems": problems}
    return {
        "kind": "units",
        "sort_spikes": recipe.units.sort_spikes,
        "spike_times_unit": recipe.units.spike_times_unit,
        "sampling_rate_hz": recipe.units.sampling_rate_hz,
        "problems": problems,
    }


def source_key(source: str | Path) -> str:
    """Return how a source is keyed in provenance: its URL when streamed, else its resolved path."""
    url = remote_url(source)
    return url if url is not None else str(Path(source).resolve())


def training_source_records(
    segment_set: xr.Dataset,
    source_provenance: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    test_subjects: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Return one record per source file of a segment set: path, NWB identifier, session, subject and neuron count.

    ``encoder_trained_on`` is False for the sources of ``test_subjects``, whose neurons
    the encoder never trained on. Fields of ``source_provenance[path]``, such as DANDI
    ids, are added to the record of ``path`` (the resolved path as str).
    """
    sources = segment_set["source"].values.astype(str)
    records = []
    for source in dict.fromkeys(sources.tolist()):
        first = int(np.flatnonzero(sources == source)[0])
        path = source_key(source)
        subject = str(segment_set["subject"].values[first])
        records.append(
            {
                **dict((source_provenance or {}).get(path, {})),
                "path": path,
                "identifier": str(segment_set["identifier"].values[first]),
                "session": str(segment_set["session"].values[first]),
                "subject": subject,
                "n_neurons": int((sources == source).sum()),
                "encoder_trained_on": subject not in test_subjects,
            }
        )
    return records


def write_outputs(
    recipe: Recipe,
    embeddings: xr.Dataset,
    evaluation: Evaluation,
    run_dir: Path,
    progress: Progress,
    *,
    source_provenance: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[Path]:
    """Write one output NWB file per source file, with its neurons' embeddings and predictions.

    The provenance of every table comes from the model directory that :func:`save_model`
    wrote, so call that first. ``source_provenance`` is as in :func:`save_model`.
    """
    config, model_provenance = read_model_metadata(run_dir / "model")
    provenance = {**output_provenance(config, model_provenance, command="neurpir-nwb train"), "software": software_versions()}
    return write_nwb_files(
        embeddings,
        run_dir / "nwb",
        provenance=provenance,
        progress=progress,
        source_provenance=source_provenance,
    )


def write_nwb_files(
    embeddings: xr.Dataset,
    out_dir: Path,
    *,
    provenance: Mapping[str, Any],
    progress: Progress,
    overwrite: bool = False,
    source_provenance: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[Path]:
    """Write one copy of each source file with a ``neurpir`` module of its neurons' embeddings.

    ``embeddings`` has a ``neuron`` dimension with the coordinates ``source``,
    ``table``, ``table_row`` (and ``series`` for plain TimeSeries), the variable
    ``embedding`` and, with a probe, ``predicted_label`` and ``class_probabilities``
    along a ``class`` coordinate. Each output is named like its source.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    sources = embeddings["source"].values.astype(str)
    tables_of_neurons = embeddings["table"].values.astype(str)
    has_probe = "predicted_label" in embeddings

    outputs = []
    unique_sources = list(dict.fromkeys(sources))
    with progress.stage("writing NWB outputs", len(unique_sources)) as advance:
        for index, source in enumerate(unique_sources):
            selected = sources == source
            key = source_key(source)
            fields = dict((source_provenance or {}).get(key, {}))
            streamed = remote_url(source) is not None
            output_path = out_dir / (Path(fields["asset_path"]).name if streamed and "asset_path" in fields else Path(source).name)
            if not streamed and output_path.resolve() == Path(source).resolve():
                raise DataError(f"output {output_path} would overwrite its source file; choose another output directory")

            # One output table per source table: "embeddings", or "embeddings_<plane>" for several imaging planes.
            tables = list(dict.fromkeys(tables_of_neurons[selected]))
            blocks = []
            for table in tables:
                chosen = selected & (tables_of_neurons == table)
                blocks.append(
                    EmbeddingBlock(
                        table=table,
                        rows=embeddings["table_row"].values[chosen],
                        embeddings=embeddings["embedding"].values[chosen],
                        predicted_labels=embeddings["predicted_label"].values[chosen].astype(str) if has_probe else None,
                        probabilities=embeddings["class_probabilities"].values[chosen] if has_probe else None,
                        series_names=embeddings["series"].values[chosen].astype(str).tolist() if table == "acquisition" else None,
                        name="embeddings" if len(tables) == 1 else f"embeddings_{table.rsplit('/', 1)[-1]}",
                    )
                )

            file_provenance = dict(provenance)
            if fields:
                file_provenance["source"] = fields
            write = write_streamed_embeddings_nwb if streamed else write_embedding_tables_nwb
            write(
                remote_url(source) if streamed else source,
                output_path,
                blocks=blocks,
                class_names=[str(name) for name in embeddings["class"].values] if has_probe else None,
                provenance=file_provenance,
                overwrite=overwrite,
            )
            outputs.append(output_path)
            advance(index + 1)
    return outputs


def software_versions() -> dict[str, str]:
    """Return the versions of Python and the packages a run depends on."""
    versions = {"python": platform.python_version()}
    for package in ("neurpir-nwb", "pynwb", "hdmf", "h5py", "torch", "numpy", "xarray", "scikit-learn"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def machine_description() -> dict[str, Any]:
    """Describe the machine a run used: processor, core count and accelerator."""
    description = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return description
