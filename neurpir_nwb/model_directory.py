"""The model directory: everything ``neurpir-nwb embed`` needs to apply a trained model.

A model directory (``<run directory>/model``) contains::

    config.json       format_version, the neurpir-nwb version that wrote it, the encoder
                      configuration, segment settings with the distance-bin edges, the
                      modality, activity transform and reader settings, the probe's label
                      and class names, and the weights' file name and sha256
    weights.pt        the encoder's state dict; it loads with torch.load(weights_only=True)
    probe.json        the probe's parameters as plain numbers (absent without a probe)
    provenance.json   recipe, recipe sha256, training sources with their NWB identifiers
                      (and DANDI ids when known) and software versions
    checkpoint.pt     the trainer's last checkpoint (weights and optimiser state)

Every file is written to a temporary name and renamed, and ``config.json`` is written
last, so a directory whose ``config.json`` lists the sha256 of its ``weights.pt`` is
complete. A model directory loads in any neurpir-nwb version that reads its
``format_version``; other versions reject it with a message that names both.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from neurpir_nwb._version import __version__
from neurpir_nwb.errors import ModelError
from neurpir_nwb.evaluate import probe_from_dict
from neurpir_nwb.model import EncoderConfig, NeurPIREncoder
from neurpir_nwb.segments import SegmentSettings

__all__ = [
    "MODEL_FORMAT_VERSION",
    "LoadedModel",
    "load_model",
    "output_provenance",
    "read_model_metadata",
    "resolve_model_dir",
    "sha256_file",
    "write_json_atomic",
    "write_model_directory",
]

logger = logging.getLogger(__name__)

#: Version of the model directory's layout. Raise it when a change stops older code
#: from loading new directories or newer code from loading old ones.
MODEL_FORMAT_VERSION = 1

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.pt"
PROBE_FILE = "probe.json"
PROVENANCE_FILE = "provenance.json"


def sha256_file(path: str | os.PathLike) -> str:
    """Return the sha256 of a file's bytes as hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _temporary_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.partial-{secrets.token_hex(4)}")


def write_json_atomic(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as indented JSON to a temporary file beside ``path`` and rename it to ``path``."""
    path = Path(path)
    temporary = _temporary_path(path)
    try:
        temporary.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def _save_weights_atomic(encoder: NeurPIREncoder, path: Path) -> str:
    """Save the encoder's state dict through a temporary file and return the file's sha256."""
    temporary = _temporary_path(path)
    try:
        torch.save(encoder.state_dict(), temporary)
        digest = sha256_file(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return digest


def write_model_directory(
    model_dir: str | os.PathLike,
    *,
    encoder: NeurPIREncoder,
    model_name: str,
    segments: Mapping[str, Any],
    modality: str,
    activity_transform: str,
    reader: Mapping[str, Any],
    probe: Mapping[str, Any] | None,
    label_name: str | None,
    provenance: Mapping[str, Any],
) -> Path:
    """Write the weights, probe, provenance and configuration of a trained model, each file atomically.

    Parameters
    ----------
    model_dir
        The folder to write; created when missing. Files of an earlier model there are
        replaced, and a stale ``probe.json`` is removed when ``probe`` is None.
    encoder
        The trained encoder; its configuration and state dict are saved.
    model_name
        Name of the model, usually the recipe's name.
    segments
        Segment settings (``bin_size_s``, ``bins_per_patch``, ``patches``,
        ``neighbours``, ``distance_bins``), the ``distance_bin_edges`` and, for traces,
        ``normalise`` and ``rate_hz``.
    modality
        ``"ecephys"`` (spike trains of a Units table) or ``"ophys"`` (traces).
    activity_transform
        The transform applied to binned activity before the encoder, such as ``"log1p"``.
    reader
        How input files are read: ``{"kind": "units", "sort_spikes": ...}``,
        ``{"kind": "ophys", "source": ..., "series": ...}`` or
        ``{"kind": "timeseries", "pattern": ...}``.
    probe
        The probe's parameters from :func:`neurpir_nwb.evaluate.probe_to_dict`, or None.
    label_name
        Name of the label the probe predicts.
    provenance
        JSON-serialisable provenance: recipe, its sha256, training sources, versions.

    Returns
    -------
    Path
        ``model_dir``.
    """
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)

    weights_sha256 = _save_weights_atomic(encoder, model_dir / WEIGHTS_FILE)

    class_names = None
    if probe is not None:
        class_names = [str(name) for name in probe["classes"]]
        write_json_atomic(model_dir / PROBE_FILE, {"label": label_name, **probe})
    else:
        (model_dir / PROBE_FILE).unlink(missing_ok=True)

    write_json_atomic(
        model_dir / PROVENANCE_FILE,
        {
            "format_version": MODEL_FORMAT_VERSION,
            "neurpir_version": __version__,
            "model_name": model_name,
            "model_sha256": weights_sha256,
            **provenance,
        },
    )

    config = {
        "format_version": MODEL_FORMAT_VERSION,
        "neurpir_version": __version__,
        "model_name": model_name,
        "encoder": encoder.config.to_dict(),
        "embedding_dim": int(encoder.config.output_dim),
        "segments": dict(segments),
        "modality": modality,
        "activity_transform": activity_transform,
        "reader": dict(reader),
        "probe": None if probe is None else {"file": PROBE_FILE, "label": label_name, "class_names": class_names},
        "weights": {
            "file": WEIGHTS_FILE,
            "sha256": weights_sha256,
            "format": "PyTorch state dict of the encoder; load it with torch.load(path, weights_only=True)",
        },
        "provenance_file": PROVENANCE_FILE,
    }
    write_json_atomic(model_dir / CONFIG_FILE, config)
    logger.info("wrote model directory %s (weights sha256 %s)", model_dir, weights_sha256[:12])
    return model_dir


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """Return the model directory at ``path``, or at ``path/model`` when ``path`` is a run directory.

    Raises
    ------
    ModelError
        When neither folder contains ``config.json``.
    """
    path = Path(path)
    if (path / CONFIG_FILE).is_file():
        return path
    if (path / "model" / CONFIG_FILE).is_file():
        return path / "model"
    if not path.exists():
        raise ModelError(f"model directory {path} not found; pass the model folder of a run, such as runs/<name>/model")
    raise ModelError(
        f"{path} is not a model directory: it contains no {CONFIG_FILE}. Pass the model folder of a "
        "finished run, such as runs/<name>/model"
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise ModelError(f"{path} not found; the model directory is incomplete. Copy the whole folder or retrain") from error
    except (OSError, json.JSONDecodeError) as error:
        raise ModelError(f"{path} is not readable JSON ({error}); the model directory is damaged. Retrain the model") from error
    if not isinstance(data, dict):
        raise ModelError(f"{path} does not contain a JSON object; the model directory is damaged. Retrain the model")
    return data


def read_model_metadata(model_dir: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read ``config.json`` and ``provenance.json`` after checking that this version reads their format.

    A directory of the same ``format_version`` loads whatever neurpir-nwb version wrote
    it, with an INFO log when that version differs from this one.

    Returns
    -------
    (config, provenance)

    Raises
    ------
    ModelError
        When a file is missing or damaged, or the format version is not the one this
        version reads. The message names both neurpir-nwb versions and both format versions.
    """
    model_dir = resolve_model_dir(model_dir)
    config = _read_json(model_dir / CONFIG_FILE)
    written_by = str(config.get("neurpir_version", "unknown"))
    format_version = config.get("format_version")

    if format_version != MODEL_FORMAT_VERSION:
        if format_version is None:
            found = "no format_version (written before model formats were versioned)"
        else:
            found = f"model format {format_version!r}"
        if isinstance(format_version, int) and format_version > MODEL_FORMAT_VERSION:
            fix = f"upgrade neurpir-nwb to {written_by} or later, or retrain the model with neurpir-nwb {__version__}"
        else:
            fix = f"retrain the model with neurpir-nwb {__version__}, or load it with neurpir-nwb {written_by}"
        raise ModelError(
            f"{model_dir / CONFIG_FILE}: written by neurpir-nwb {written_by} with {found}, but neurpir-nwb "
            f"{__version__} reads model format {MODEL_FORMAT_VERSION}; {fix}"
        )
    if written_by != __version__:
        logger.info(
            "%s was written by neurpir-nwb %s; loading it with neurpir-nwb %s (same model format %d)",
            model_dir,
            written_by,
            __version__,
            MODEL_FORMAT_VERSION,
        )

    missing = [key for key in ("encoder", "segments", "modality", "activity_transform", "reader", "weights") if key not in config]
    if missing:
        raise ModelError(f"{model_dir / CONFIG_FILE} lacks the keys {missing}; the model directory is damaged. Retrain the model")
    provenance = _read_json(model_dir / config.get("provenance_file", PROVENANCE_FILE))
    return config, provenance


@dataclass
class LoadedModel:
    """A trained encoder with its probe and the settings to segment new files like its training data.

    Attributes
    ----------
    path
        The model directory.
    config, provenance
        The contents of ``config.json`` and ``provenance.json``.
    encoder
        The encoder with its trained weights, in eval mode, on the CPU.
    segment_settings
        Bin, patch, window and neighbour settings of the training segment set.
    distance_bin_edges
        Edges of the neighbour distance bins of the training segment set.
    probe
        The fitted probe, or None when the model has none.
    label_name
        Name of the label the probe predicts, or None.
    model_sha256
        sha256 of ``weights.pt``.
    """

    path: Path
    config: dict[str, Any]
    provenance: dict[str, Any]
    encoder: NeurPIREncoder
    segment_settings: SegmentSettings
    distance_bin_edges: np.ndarray
    probe: Any | None
    label_name: str | None
    model_sha256: str

    @property
    def name(self) -> str:
        """The model's name, usually the name of its recipe."""
        return str(self.config.get("model_name", self.path.parent.name))

    @property
    def modality(self) -> str:
        """``"ecephys"`` for spike-train models, ``"ophys"`` for trace models."""
        return str(self.config["modality"])

    @property
    def reader(self) -> dict[str, Any]:
        """Reader settings of the training data, such as ``{"kind": "units", "sort_spikes": False}``."""
        return dict(self.config["reader"])

    @property
    def class_names(self) -> list[str] | None:
        """The probe's classes, in the column order of its probabilities."""
        return None if self.probe is None else [str(name) for name in self.probe.classes_]


def load_model(model_dir: str | os.PathLike) -> LoadedModel:
    """Load a model directory written by :func:`write_model_directory`.

    ``model_dir`` may also be a run directory, whose ``model`` folder is loaded.

    Raises
    ------
    ModelError
        When a file is missing or damaged, the weights do not match the sha256 that
        ``config.json`` records, the format version is not the one this version
        reads, or the weights do not fit the encoder configuration.
    """
    model_dir = resolve_model_dir(model_dir)
    config, provenance = read_model_metadata(model_dir)
    written_by = config.get("neurpir_version", "unknown")

    try:
        encoder_config = EncoderConfig.from_dict(config["encoder"])
    except (TypeError, ValueError) as error:
        raise ModelError(
            f"{model_dir / CONFIG_FILE}: encoder configuration written by neurpir-nwb {written_by} is invalid for "
            f"neurpir-nwb {__version__} ({error})"
        ) from error

    weights_path = model_dir / config["weights"].get("file", WEIGHTS_FILE)
    if not weights_path.is_file():
        raise ModelError(f"{weights_path} not found; the model directory is incomplete. Copy the whole folder or retrain")
    model_sha256 = sha256_file(weights_path)
    expected_sha256 = config["weights"].get("sha256")
    if expected_sha256 != model_sha256:
        raise ModelError(
            f"{weights_path} has sha256 {model_sha256[:12]}..., but {CONFIG_FILE} records {str(expected_sha256)[:12]}...; "
            "the weights belong to another model. Copy the whole model directory again or retrain"
        )

    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for damaged or unsafe files.
        raise ModelError(f"{weights_path} could not be loaded as a state dict ({error}); retrain the model") from error
    encoder = NeurPIREncoder(encoder_config)
    try:
        encoder.load_state_dict(state)
    except RuntimeError as error:
        raise ModelError(
            f"{weights_path} does not fit the encoder configuration in {CONFIG_FILE} ({str(error).splitlines()[0]}); "
            "the directory mixes files of two models. Retrain the model"
        ) from error
    encoder.eval()

    segments = config["segments"]
    try:
        settings = SegmentSettings(**{name: segments[name] for name in ("bin_size_s", "bins_per_patch", "patches", "neighbours", "distance_bins")})
    except (KeyError, ValueError) as error:
        raise ModelError(f"{model_dir / CONFIG_FILE}: invalid segment settings {segments} ({error}); retrain the model") from error
    edges = np.asarray(segments.get("distance_bin_edges", []), dtype=np.float64)

    probe = None
    label_name = None
    if config.get("probe"):
        probe_data = _read_json(model_dir / config["probe"].get("file", PROBE_FILE))
        label_name = probe_data.get("label") or config["probe"].get("label")
        probe = probe_from_dict(probe_data)
        n_features = int(getattr(probe, "n_features_in_", encoder_config.output_dim))
        if n_features != encoder_config.output_dim:
            raise ModelError(
                f"{model_dir / PROBE_FILE} expects {n_features} features, but the encoder returns "
                f"{encoder_config.output_dim} dimensions; the directory mixes files of two models. Retrain the model"
            )

    logger.info(
        "loaded model %s from %s: %s, %d-dimensional embeddings, probe: %s",
        config.get("model_name", "?"),
        model_dir,
        config["modality"],
        encoder_config.output_dim,
        label_name or "none",
    )
    return LoadedModel(
        path=model_dir,
        config=config,
        provenance=provenance,
        encoder=encoder,
        segment_settings=settings,
        distance_bin_edges=edges,
        probe=probe,
        label_name=label_name,
        model_sha256=model_sha256,
    )


def output_provenance(config: Mapping[str, Any], provenance: Mapping[str, Any], *, command: str) -> dict[str, Any]:
    """Return the provenance that the NWB writer stores with embeddings computed by this model.

    Parameters
    ----------
    config, provenance
        The model directory's ``config.json`` and ``provenance.json``.
    command
        The command that computes the embeddings, such as ``"neurpir-nwb train"``.
    """
    record: dict[str, Any] = {
        "neurpir_version": __version__,
        "recipe_sha256": str(provenance.get("recipe_sha256", "")),
        "model_name": str(config.get("model_name", "")),
        "model_sha256": str(config["weights"]["sha256"]),
        "model_neurpir_version": str(config.get("neurpir_version", "")),
        "model_format_version": config.get("format_version"),
        "written_by": command,
        "training_sources": list(provenance.get("training_sources", [])),
    }
    if config.get("probe"):
        record["label_name"] = str(config["probe"].get("label") or "")
    return record
