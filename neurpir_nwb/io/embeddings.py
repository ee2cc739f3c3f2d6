"""Reader of the NWB outputs: the ``NeuronEmbeddingTable``s of many files as one xarray Dataset.

The tables are read with h5py, without pynwb, so reading many outputs is fast and
emits none of the warnings pynwb raises about the rest of a source file.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import xarray as xr

from neurpir_nwb.errors import DataError, SourceError
from neurpir_nwb.nwb_extension import TABLE_TYPE
from neurpir_nwb.progress import count_noun

__all__ = ["read_embeddings"]

logger = logging.getLogger(__name__)

MODULE_PATH = "processing/neurpir"


def read_embeddings(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> xr.Dataset:
    """Read the embeddings and predictions of NWB outputs written by ``neurpir-nwb train`` or ``embed``.

    Parameters
    ----------
    paths
        An output NWB file, a folder (all ``*.nwb`` files directly inside it), or a
        list of files and folders.

    Returns
    -------
    xarray.Dataset
        One entry per neuron along the dimension ``neuron``, over all tables of all files:

        - ``embedding`` (neuron, embedding_dim), float32.
        - ``predicted_label`` (neuron), str, ``""`` where no probe predicted one; present
          when any table has predictions.
        - ``class_probabilities`` (neuron, class), float32, NaN for tables without
          them; the coordinate ``class`` contains the class names.
        - Coordinates along ``neuron``: ``file`` (output path), ``identifier`` (the NWB
          file identifier, shared with the source file), ``table`` (name of the table
          in the ``neurpir`` module), ``row`` (row in that table), ``unit_id`` (the
          table's ``id``: unit or ROI id), ``source_table`` (path of the linked Units
          table or PlaneSegmentation, or ``/acquisition``), ``source_row`` (row in
          it, -1 for plain TimeSeries), ``timeseries`` (series name, ``""`` for table
          rows) and ``model_sha256``.
        - ``attrs["provenance"]``: JSON text of ``{file: {table: provenance}}``, each
          provenance being the table's JSON ``provenance`` attribute.

    Raises
    ------
    SourceError
        When a path does not exist, a folder contains no ``*.nwb`` file, or a file is
        not readable HDF5.
    DataError
        When a file contains no ``NeuronEmbeddingTable`` in ``/processing/neurpir``,
        or two files disagree on the embedding dimension or the class names; the
        message names both files.
    """
    files = _expand(paths)
    tables = [table for path in files for table in _read_file(path)]
    _check_consistent(tables)

    embedding_dim = tables[0]["embedding"].shape[1]
    class_names = next((table["class_names"] for table in tables if table["class_names"] is not None), None)
    has_labels = any(table["predicted_label"] is not None for table in tables)

    def column(name: str, fill: Any, dtype: Any) -> np.ndarray:
        parts = [table[name] if table[name] is not None else np.full(len(table["unit_id"]), fill, dtype=dtype) for table in tables]
        return np.concatenate(parts).astype(dtype)

    coords: dict[str, Any] = {
        "file": ("neuron", column("file", "", object)),
        "identifier": ("neuron", column("identifier", "", object)),
        "table": ("neuron", column("table", "", object)),
        "row": ("neuron", column("row", -1, np.int64)),
        "unit_id": ("neuron", column("unit_id", -1, np.int64)),
        "source_table": ("neuron", column("source_table", "", object)),
        "source_row": ("neuron", column("source_row", -1, np.int64)),
        "timeseries": ("neuron", column("timeseries", "", object)),
        "model_sha256": ("neuron", column("model_sha256", "", object)),
    }
    data_vars: dict[str, Any] = {
        "embedding": (("neuron", "embedding_dim"), np.concatenate([table["embedding"] for table in tables]).astype(np.float32)),
    }
    if has_labels:
        data_vars["predicted_label"] = ("neuron", column("predicted_label", "", object))
    if class_names is not None:
        n_classes = len(class_names)
        probabilities = [
            table["class_probabilities"]
            if table["class_probabilities"] is not None
            else np.full((len(table["unit_id"]), n_classes), np.nan, dtype=np.float32)
            for table in tables
        ]
        data_vars["class_probabilities"] = (("neuron", "class"), np.concatenate(probabilities).astype(np.float32))
        coords["class"] = np.array(class_names, dtype=object)

    provenance: dict[str, dict[str, Any]] = {}
    for table in tables:
        provenance.setdefault(table["file"][0], {})[table["table"][0]] = table["provenance"]

    models = sorted({table["model_sha256"][0] for table in tables})
    if len(models) > 1:
        logger.warning("the outputs come from %d different models (weights sha256 %s); compare their embeddings with care", len(models), ", ".join(m[:12] for m in models))

    dataset = xr.Dataset(
        data_vars,
        coords=coords,
        attrs={"provenance": json.dumps(provenance, sort_keys=True), "embedding_dim": int(embedding_dim), "n_files": len(files)},
    )
    logger.info("read %d neurons from %s of %s", dataset.sizes["neuron"], count_noun(len(tables), "table"), count_noun(len(files), "file"))
    return dataset


def _expand(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Return the NWB files of a file, a folder, or a list of both, without repeats."""
    entries = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    files: list[Path] = []
    for entry in entries:
        path = Path(entry)
        if path.is_dir():
            found = sorted(path.glob("*.nwb"))
            if not found:
                raise SourceError(f"{path}: folder contains no *.nwb file; pass the nwb folder of a run or of an embed output")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise SourceError(f"{path}: NWB output not found; check the path")
    if not files:
        raise SourceError("no NWB outputs given; pass a file, a folder or a list of them")
    return list(dict.fromkeys(files))


def _text(value: Any) -> str:
    """Return an HDF5 string value as str, whether stored as bytes or str."""
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.reshape(-1)[0]
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _texts(dataset: h5py.Dataset) -> np.ndarray:
    return np.array([_text(value) for value in dataset[:]], dtype=object)


def _read_file(path: Path) -> list[dict[str, Any]]:
    """Read every NeuronEmbeddingTable of one output file."""
    try:
        nwb_file = h5py.File(path, "r")
    except OSError as error:
        raise SourceError(f"{path}: not a readable HDF5 file ({error}); pass NWB outputs of neurpir-nwb") from error

    with nwb_file:
        module = nwb_file.get(MODULE_PATH)
        groups = []
        if isinstance(module, h5py.Group):
            groups = [
                (name, node)
                for name, node in sorted(module.items())
                if isinstance(node, h5py.Group) and _text(node.attrs.get("neurodata_type", "")) == TABLE_TYPE
            ]
        if not groups:
            raise DataError(
                f"{path}: no {TABLE_TYPE} in /{MODULE_PATH}; pass NWB outputs written by neurpir-nwb train or embed"
            )

        identifier_node = nwb_file.get("identifier")
        identifier = _text(identifier_node[()]) if isinstance(identifier_node, h5py.Dataset) else ""
        return [_read_table(path, nwb_file, name, group, identifier) for name, group in groups]


def _read_table(path: Path, nwb_file: h5py.File, name: str, group: h5py.Group, identifier: str) -> dict[str, Any]:
    """Read the columns and provenance of one table as arrays, one entry per row."""
    embedding = group["embedding"][:]
    n_rows = embedding.shape[0]

    source_table = np.full(n_rows, "", dtype=object)
    source_row = np.full(n_rows, -1, dtype=np.int64)
    timeseries = None
    if "unit" in group:
        region = group["unit"]
        source_row = region[:].astype(np.int64)
        source_table[:] = nwb_file[region.attrs["table"]].name
    elif "timeseries" in group:
        timeseries = _texts(group["timeseries"])
        source_table[:] = "/acquisition"

    predicted_label = _texts(group["predicted_label"]) if "predicted_label" in group else None
    probabilities = group["class_probabilities"][:].astype(np.float32) if "class_probabilities" in group else None
    class_names = [_text(value) for value in group.attrs["class_names"]] if "class_names" in group.attrs else None

    raw_provenance = group.attrs.get("provenance")
    provenance = json.loads(_text(raw_provenance)) if raw_provenance is not None else {}
    model_sha256 = _text(group.attrs.get("model_sha256", provenance.get("model_sha256", "")))

    return {
        "path": path,
        "file": np.full(n_rows, str(path), dtype=object),
        "identifier": np.full(n_rows, identifier, dtype=object),
        "table": np.full(n_rows, name, dtype=object),
        "row": np.arange(n_rows, dtype=np.int64),
        "unit_id": group["id"][:].astype(np.int64),
        "source_table": source_table,
        "source_row": source_row,
        "timeseries": timeseries,
        "model_sha256": np.full(n_rows, model_sha256, dtype=object),
        "embedding": embedding,
        "predicted_label": predicted_label,
        "class_probabilities": probabilities,
        "class_names": class_names,
        "provenance": provenance,
    }


def _check_consistent(tables: list[dict[str, Any]]) -> None:
    """Raise DataError, naming both files, when two tables differ in embedding dimension or class names."""
    first = tables[0]
    for table in tables[1:]:
        if table["embedding"].shape[1] != first["embedding"].shape[1]:
            raise DataError(
                f"{table['path']} (table {table['table'][0]}) has {table['embedding'].shape[1]}-dimensional embeddings, but "
                f"{first['path']} (table {first['table'][0]}) has {first['embedding'].shape[1]}-dimensional ones; "
                "read outputs of one model together"
            )

    with_classes = [table for table in tables if table["class_names"] is not None]
    for table in with_classes[1:]:
        if table["class_names"] != with_classes[0]["class_names"]:
            raise DataError(
                f"{table['path']} (table {table['table'][0]}) has the classes {table['class_names']}, but "
                f"{with_classes[0]['path']} (table {with_classes[0]['table'][0]}) has {with_classes[0]['class_names']}; "
                "read outputs of one probe together"
            )
