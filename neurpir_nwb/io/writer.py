"""Writer of per-neuron embeddings and probe predictions into a copy of a source NWB file.

The output is the source file plus one processing module ``neurpir`` that contains a
``NeuronEmbeddingTable`` (a DynamicTable type of the ``ndx-neurpir`` extension) named
``embeddings``, with one row per neuron:

``unit``
    ``DynamicTableRegion`` to the source table (the Units table by default), so row i
    describes the neuron in source row ``rows[i]``.
``embedding``
    2-D float32 column, one embedding per neuron.
``predicted_label``
    The probe's label per neuron, ``""`` where it made none. Absent when there is no probe.
``class_probabilities``
    2-D float32 column whose columns follow the table attribute ``class_names``.
    Absent when the probe gives no probabilities.

Neurons of several source tables, such as the PlaneSegmentations of several imaging
planes, get one table each (see :func:`write_embedding_tables_nwb`). Neurons stored as
plain TimeSeries get a ``timeseries`` column of names in place of ``unit``.

The table's ``id`` column contains the ids of the linked source rows (the unit ids).
Provenance is stored twice on the table: the key values as typed attributes of the
extension (``neurpir_version``, ``recipe_sha256``, ``model_sha256``, ``model_name``,
``embedding_dim``, ``class_names``, ``source_nwb_version``, ``output_nwb_version``), and
everything, including the training sources with their DANDI ids, as one JSON text
attribute ``provenance``. The extension's spec is cached in every output, so any NWB
reader opens it with ``NWBHDF5IO(path, load_namespaces=True)`` without this package.

Appending with pynwb caches pynwb's own schema in the output and raises the file's
``nwb_version`` to pynwb's core version (2.11.0 with pynwb 4.2), so pynwb 2.x may no
longer read an output whose source was older. Both versions are recorded on the table,
and an upgrade is logged.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from hdmf.backends.hdf5 import H5DataIO
from hdmf.common import DynamicTable, DynamicTableRegion, VectorData
from pynwb import NWBHDF5IO

from neurpir_nwb._version import __version__
from neurpir_nwb.errors import DataError, RunDirectoryError, SourceError
from neurpir_nwb.nwb_extension import neuron_embedding_table_class

logger = logging.getLogger(__name__)

MODULE_NAME = "neurpir"
TABLE_NAME = "embeddings"
TABLE_PATH = f"processing/{MODULE_NAME}/{TABLE_NAME}"

#: Provenance keys every caller gives; each becomes a text attribute of the table.
REQUIRED_PROVENANCE = ("neurpir_version", "recipe_sha256", "model_name")

#: Optional provenance keys that also become text attributes of the table when given.
OPTIONAL_TEXT_PROVENANCE = ("model_sha256", "label_name")

#: Provenance keys that the writer fills in itself.
RESERVED_PROVENANCE = frozenset({"embedding_dim", "class_names", "source_nwb_version", "output_nwb_version"})

# Probabilities may exceed [0, 1] by float32 rounding.
PROBABILITY_TOLERANCE = 1e-5


@dataclass(frozen=True)
class _SourceTable:
    """Neuron table, identifier and NWB version of the source file, read before the copy is made."""

    path: Path
    table: str
    row_ids: np.ndarray
    nwb_version: str
    identifier: str
    series_names: tuple[str, ...] = ()


def write_embeddings_nwb(
    source_path: str | os.PathLike,
    output_path: str | os.PathLike,
    *,
    rows: np.ndarray,
    embeddings: np.ndarray,
    predicted_labels: Sequence[str] | None,
    probabilities: np.ndarray | None,
    class_names: Sequence[str] | None,
    provenance: Mapping[str, Any],
    table: str = "units",
    series_names: Sequence[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write per-neuron embeddings and predictions into a copy of an NWB file.

    The source is copied to a temporary file beside the output, the ``neurpir``
    module is appended to the copy with pynwb (which caches the ``ndx-neurpir``
    spec), and the copy is renamed to ``output_path``. The source is only ever
    opened for reading.

    Parameters
    ----------
    source_path
        The NWB file whose neurons were embedded.
    output_path
        Where to write the output NWB file. Missing parent folders are created.
    rows
        Row index into the source table of each neuron, one per output row.
    embeddings
        (n_neurons, dim) embeddings, stored as float32.
    predicted_labels
        The probe's label per neuron (``""`` where it made none), or None when
        there is no probe.
    probabilities
        (n_neurons, n_classes) class probabilities, stored as float32, or None.
    class_names
        Names of the classes, in the column order of ``probabilities``. Required
        when ``probabilities`` is given.
    provenance
        JSON-serialisable provenance of the model and the run. It must contain the
        str values ``"neurpir_version"``, ``"recipe_sha256"`` and ``"model_name"``,
        which become table attributes like the optional ``"model_sha256"`` and
        ``"label_name"``. Every key goes into the table's JSON attribute
        ``provenance``, for example ``"training_sources"`` (a list of objects with
        ``identifier`` and, for DANDI assets, ``dandiset_id``, ``dandiset_version``
        and ``asset_id``). An optional ``"source"`` object adds fields, such as
        DANDI ids, to the record of the source file that the writer makes.
    table
        Path of the neuron table inside the source file, for example ``"units"``
        or ``"processing/ophys/ImageSegmentation/PlaneSegmentation"``, or
        ``"acquisition"`` for neurons stored as plain TimeSeries.
    series_names
        With ``table="acquisition"``, the name of the TimeSeries of each neuron, in
        the order of ``rows``. The output then contains a ``timeseries`` column of
        names in place of the region column.
    overwrite
        Replace an existing file at ``output_path``.

    Returns
    -------
    Path
        ``output_path``.

    Raises
    ------
    RunDirectoryError
        If ``output_path`` exists and ``overwrite`` is False, or if it is the source file.
    SourceError
        If the source file is missing or is not an NWB 2.x file.
    DataError
        If the source lacks the table, already contains a ``neurpir`` module, or the
        inputs do not fit its neurons (row out of range, non-finite embedding).
    ValueError
        If the inputs disagree with each other (lengths, shapes, class names), or the
        provenance lacks a required key or cannot be written as JSON.
    """
    block = EmbeddingBlock(
        table=table,
        rows=rows,
        embeddings=embeddings,
        predicted_labels=predicted_labels,
        probabilities=probabilities,
        series_names=series_names,
    )
    return write_embedding_tables_nwb(
        source_path, output_path, blocks=[block], class_names=class_names, provenance=provenance, overwrite=overwrite
    )


@dataclass
class EmbeddingBlock:
    """Neurons of one source table, written as one table of the ``neurpir`` module.

    The fields are the arguments of :func:`write_embeddings_nwb`; ``name`` is the
    name of the output table.
    """

    table: str
    rows: np.ndarray
    embeddings: np.ndarray
    predicted_labels: Sequence[str] | None = None
    probabilities: np.ndarray | None = None
    series_names: Sequence[str] | None = None
    name: str = TABLE_NAME


def write_embedding_tables_nwb(
    source_path: str | os.PathLike,
    output_path: str | os.PathLike,
    *,
    blocks: Sequence[EmbeddingBlock],
    class_names: Sequence[str] | None,
    provenance: Mapping[str, Any],
    overwrite: bool = False,
) -> Path:
    """Write several source tables' embeddings, one output table each, into a copy of an NWB file.

    This serves files whose neurons come from several tables, such as the
    PlaneSegmentations of several imaging planes. Each block becomes a table of the
    ``neurpir`` module named ``block.name``, with the same provenance attributes. The
    checks, the atomic rename and the errors are those of :func:`write_embeddings_nwb`;
    the blocks' embeddings must have the same number of dimensions.
    """
    source_path = Path(source_path)
    output_path = Path(output_path)
    names = [block.name for block in blocks]
    if not blocks or len(set(names)) != len(names):
        raise ValueError(f"{source_path}: blocks need distinct output table names, got {names}")

    _check_output_path(source_path, output_path, overwrite)
    checked = []
    for block in blocks:
        table = block.table.strip("/")
        if table == "acquisition":
            source = _read_source_series(source_path, block.series_names)
        else:
            source = _read_source_table(source_path, table)
        rows = _checked_rows(block.rows, source)
        checked.append(
            {
                "name": block.name,
                "source": source,
                "rows": rows,
                "embeddings": _checked_embeddings(block.embeddings, rows, source),
                "labels": _checked_labels(block.predicted_labels, class_names, rows, source),
                "probabilities": _checked_probabilities(block.probabilities, class_names, rows, source),
            }
        )
    dims = sorted({block["embeddings"].shape[1] for block in checked})
    if len(dims) > 1:
        raise ValueError(f"{source_path}: the blocks' embeddings have different dimensions {dims}; pass embeddings of one model")
    source = checked[0]["source"]
    record = _checked_provenance(provenance, class_names, source, embedding_dim=dims[0])

    output_path.parent.mkdir(parents=True, exist_ok=True)
    partial_path = output_path.with_name(f".{output_path.name}.partial-{secrets.token_hex(4)}")
    try:
        shutil.copyfile(source_path, partial_path)
        expected_version = _append_module(partial_path, blocks=checked, class_names=class_names, record=record)
        output_version = _record_output_version(partial_path, names, expected_version)

        # Another process may have created the output while the copy was written.
        if output_path.exists() and not overwrite:
            raise RunDirectoryError(_exists_message(output_path))
        os.replace(partial_path, output_path)
    except BaseException:
        partial_path.unlink(missing_ok=True)
        raise

    if output_version != source.nwb_version:
        logger.info(
            "%s: pynwb raised nwb_version from %s in the source %s to %s, and the table records both versions. "
            "Readers that lack that schema version may fail to open the output",
            output_path,
            source.nwb_version,
            source_path,
            output_version,
        )
    n_neurons = sum(len(block["rows"]) for block in checked)
    logger.info("wrote embeddings of %d neurons from %s to %s", n_neurons, source_path, output_path)
    return output_path


def write_streamed_embeddings_nwb(
    source_url: str,
    output_path: str | os.PathLike,
    *,
    blocks: Sequence[EmbeddingBlock],
    class_names: Sequence[str] | None,
    provenance: Mapping[str, Any],
    overwrite: bool = False,
) -> Path:
    """Write the embeddings of a streamed file's units into a new NWB file, without downloading the source.

    The new file takes the source's session start time and subject, and a Units table
    with the source's unit ids and spike times, so that the output table's ``unit``
    region links each embedding to its unit. The source's URL, identifier and NWB
    version are added to ``provenance["source"]``. The rest is as in
    :func:`write_embedding_tables_nwb`.
    """
    from hdmf.common import VectorIndex
    from pynwb import NWBFile
    from pynwb.file import Subject
    from pynwb.misc import Units

    from neurpir_nwb.io.nwbfile import open_nwb

    output_path = Path(output_path)
    if any(block.table.strip("/") != "units" for block in blocks):
        raise ValueError(f"{source_url}: only Units tables can be written for a streamed source, got {[block.table for block in blocks]}")
    if output_path.exists() and not overwrite:
        raise RunDirectoryError(_exists_message(output_path))

    # Read only what the new file needs: session metadata, unit ids and spike times.
    with open_nwb(source_url) as (io, source):
        units = source.units
        if units is None:
            raise DataError(f"{source_url}: the file has no Units table to link the embeddings to")
        unit_ids = np.asarray(units.id.data[:], dtype=np.int64)
        spike_times = np.asarray(units["spike_times"].data[:], dtype=np.float64)
        spike_index = np.asarray(units["spike_times_index"].data[:], dtype=np.int64)
        subject = source.subject
        subject_fields = {}
        if subject is not None:
            for name in ("subject_id", "species", "sex", "age", "description", "genotype", "strain"):
                if getattr(subject, name, None) is not None:
                    subject_fields[name] = getattr(subject, name)
        session_start_time = source.session_start_time
        identifier = str(source.identifier)
        nwb_version = io.nwb_version[0] or ""

    nwbfile = NWBFile(
        session_description=f"NeurPIR embeddings of the units of {source_url}, which was streamed and not copied",
        identifier=f"{identifier}-neurpir-{secrets.token_hex(4)}",
        session_start_time=session_start_time,
        subject=Subject(**subject_fields) if subject_fields else None,
    )
    times = VectorData(name="spike_times", description="Spike times of each unit, in seconds, as in the source.", data=spike_times)
    nwbfile.units = Units(
        name="units",
        description=f"Unit ids and spike times of the Units table of {source_url}",
        id=unit_ids,
        columns=[times, VectorIndex(name="spike_times_index", data=spike_index, target=times)],
    )

    output_path.parent.mkdir(parents=True, exist_ok=True)
    base_path = output_path.with_name(f".{output_path.stem}.base-{secrets.token_hex(4)}.nwb")
    try:
        with NWBHDF5IO(str(base_path), "w") as io:
            io.write(nwbfile)
        record = dict(provenance)
        record["source"] = {**dict(provenance.get("source", {})), "url": source_url, "identifier": identifier, "nwb_version": nwb_version}
        return write_embedding_tables_nwb(
            base_path, output_path, blocks=blocks, class_names=class_names, provenance=record, overwrite=overwrite
        )
    finally:
        base_path.unlink(missing_ok=True)


def _exists_message(output_path: Path) -> str:
    return (
        f"{output_path}: output file already exists. Pass --overwrite (overwrite=True from Python) to replace it "
        f"or choose another output directory"
    )


def _check_output_path(source_path: Path, output_path: Path, overwrite: bool) -> None:
    """Raise unless ``output_path`` may be written without touching the source."""
    if not source_path.is_file():
        raise SourceError(f"{source_path}: source NWB file not found. Check the path")

    same_file = output_path.resolve() == source_path.resolve()
    if output_path.exists() and not same_file:
        same_file = os.path.samefile(output_path, source_path)
    if same_file:
        raise RunDirectoryError(
            f"{output_path}: output path is the source file, which the writer never modifies. "
            f"Choose another output directory"
        )

    if output_path.exists() and not overwrite:
        raise RunDirectoryError(_exists_message(output_path))


def _decode_attribute(value: object) -> str:
    """Return an HDF5 string attribute or scalar dataset as str, whether stored as bytes, str or a 1-element array."""
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.reshape(-1)[0]
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return str(value)


def _file_identifier(source_file: h5py.File) -> str:
    """Return the file's ``identifier`` dataset as str, or ``""`` when it has none."""
    node = source_file.get("identifier")
    return _decode_attribute(node[()]) if isinstance(node, h5py.Dataset) else ""


def _reject_earlier_module(source_path: Path, source_file: h5py.File) -> None:
    if f"processing/{MODULE_NAME}" in source_file:
        raise DataError(
            f"{source_path}: already contains a processing module '{MODULE_NAME}', probably "
            f"written by an earlier run. Use the original recording as the source"
        )


def _read_source_table(source_path: Path, table: str) -> _SourceTable:
    """Read the ids of the neuron table, the identifier and the NWB version of the source, read-only."""
    try:
        source_file = h5py.File(source_path, "r")
    except OSError as error:
        raise SourceError(f"{source_path}: not a readable HDF5 file ({error}). Check that it is an NWB 2.x file") from error

    with source_file:
        if "nwb_version" not in source_file.attrs:
            raise SourceError(
                f"{source_path}: missing NWB version, so it is not an NWB 2.x file. "
                f"Convert NWB 1.x files to NWB 2.x first"
            )
        nwb_version = _decode_attribute(source_file.attrs["nwb_version"])
        _reject_earlier_module(source_path, source_file)

        node = source_file.get(table)
        if not isinstance(node, h5py.Group) or not isinstance(node.get("id"), h5py.Dataset):
            raise DataError(
                f"{source_path}: no table '{table}' with an id column was found. Pass the path "
                f"of the neuron table, for example 'units'"
            )
        row_ids = node["id"][:].astype(np.int64)
        identifier = _file_identifier(source_file)

    return _SourceTable(path=source_path, table=table, row_ids=row_ids, nwb_version=nwb_version, identifier=identifier)


def _read_source_series(source_path: Path, series_names: Sequence[str] | None) -> _SourceTable:
    """Check that every named TimeSeries is in the source's acquisition group, and read the identifier and NWB version."""
    if not series_names:
        raise ValueError(f"{source_path}: neurons in 'acquisition' need series_names, one TimeSeries name per neuron")

    with h5py.File(source_path, "r") as source_file:
        nwb_version = _decode_attribute(source_file.attrs.get("nwb_version", b""))
        _reject_earlier_module(source_path, source_file)
        acquisition = source_file.get("acquisition")
        missing = [name for name in series_names if acquisition is None or name not in acquisition]
        identifier = _file_identifier(source_file)
    if missing:
        raise DataError(f"{source_path}: no TimeSeries '{missing[0]}' in acquisition; pass names read from this file")

    names = tuple(str(name) for name in series_names)
    return _SourceTable(
        path=source_path,
        table="acquisition",
        row_ids=np.arange(len(names), dtype=np.int64),
        nwb_version=nwb_version,
        identifier=identifier,
        series_names=names,
    )


def _checked_rows(rows: np.ndarray, source: _SourceTable) -> np.ndarray:
    """Return ``rows`` as int64 after checking they are distinct rows of the source table."""
    rows = np.asarray(rows)
    if rows.ndim != 1 or rows.size == 0 or not np.issubdtype(rows.dtype, np.integer):
        raise ValueError(
            f"{source.path}: rows must be a non-empty 1-D integer array of row indices into "
            f"'{source.table}', got shape {rows.shape} and dtype {rows.dtype}"
        )
    rows = rows.astype(np.int64)

    n_rows = len(source.row_ids)
    outside = np.flatnonzero((rows < 0) | (rows >= n_rows))
    if outside.size:
        raise DataError(
            f"{source.path}: row {rows[outside[0]]} is outside '{source.table}', which has "
            f"{n_rows} rows (0 to {n_rows - 1}). Pass rows read from this file"
        )

    values, counts = np.unique(rows, return_counts=True)
    if np.any(counts > 1):
        repeated = values[counts > 1]
        raise DataError(
            f"{source.path}: row {repeated[0]} (unit id {source.row_ids[repeated[0]]}) appears "
            f"{counts[counts > 1][0]} times in rows. Pass each neuron once"
        )
    return rows


def _checked_embeddings(embeddings: np.ndarray, rows: np.ndarray, source: _SourceTable) -> np.ndarray:
    """Return ``embeddings`` as a finite (n_neurons, dim) float32 array."""
    embeddings = np.asarray(embeddings)
    if embeddings.ndim != 2 or embeddings.shape[0] != len(rows) or embeddings.shape[1] == 0:
        raise ValueError(
            f"{source.path}: embeddings must have shape ({len(rows)}, dim) with one row per "
            f"entry of rows, got {embeddings.shape}"
        )
    if not np.issubdtype(embeddings.dtype, np.number) or np.iscomplexobj(embeddings):
        raise ValueError(f"{source.path}: embeddings must be real numbers, got dtype {embeddings.dtype}")

    # Check finiteness after the float32 cast, because values beyond about 3.4e38 become inf.
    with np.errstate(over="ignore"):
        embeddings = embeddings.astype(np.float32)
    bad_rows = np.flatnonzero(~np.isfinite(embeddings).all(axis=1))
    if bad_rows.size:
        i = bad_rows[0]
        raise DataError(
            f"{source.path}: embedding of unit id {source.row_ids[rows[i]]} (row {rows[i]} of "
            f"'{source.table}') contains a non-finite value {embeddings[i][~np.isfinite(embeddings[i])][0]}, and "
            f"{bad_rows.size} neurons are affected. Check the model and its training loss"
        )
    return embeddings


def _checked_labels(
    predicted_labels: Sequence[str] | None,
    class_names: Sequence[str] | None,
    rows: np.ndarray,
    source: _SourceTable,
) -> list[str] | None:
    """Return the labels as a list of str, each ``""`` or one of ``class_names``."""
    if predicted_labels is None:
        return None

    labels = list(predicted_labels)
    if len(labels) != len(rows):
        raise ValueError(
            f"{source.path}: {len(labels)} predicted labels for {len(rows)} rows. Pass one label per row"
        )

    for i, label in enumerate(labels):
        if not isinstance(label, str):
            raise ValueError(
                f"{source.path}: predicted label of unit id {source.row_ids[rows[i]]} is {label!r} of "
                f"type {type(label).__name__}, but labels must be str, with \"\" for no prediction"
            )
        if label and class_names is not None and label not in class_names:
            raise ValueError(
                f"{source.path}: predicted label {label!r} of unit id {source.row_ids[rows[i]]} is not "
                f"one of the class names {list(class_names)}"
            )
    return labels


def _checked_probabilities(
    probabilities: np.ndarray | None,
    class_names: Sequence[str] | None,
    rows: np.ndarray,
    source: _SourceTable,
) -> np.ndarray | None:
    """Return the probabilities as a finite (n_neurons, n_classes) float32 array within [0, 1]."""
    if probabilities is None:
        return None

    if class_names is None:
        raise ValueError(f"{source.path}: class_names is missing, but probabilities need it to name their columns")

    probabilities = np.asarray(probabilities)
    expected_shape = (len(rows), len(class_names))
    if probabilities.shape != expected_shape:
        raise ValueError(
            f"{source.path}: probabilities must have shape {expected_shape} (rows x class names), "
            f"got {probabilities.shape}"
        )
    if not np.issubdtype(probabilities.dtype, np.number) or np.iscomplexobj(probabilities):
        raise ValueError(f"{source.path}: probabilities must be real numbers, got dtype {probabilities.dtype}")

    probabilities = probabilities.astype(np.float32)
    valid = np.isfinite(probabilities) & (probabilities >= -PROBABILITY_TOLERANCE)
    valid &= probabilities <= 1 + PROBABILITY_TOLERANCE
    bad_rows = np.flatnonzero(~valid.all(axis=1))
    if bad_rows.size:
        i = bad_rows[0]
        raise DataError(
            f"{source.path}: class probabilities of unit id {source.row_ids[rows[i]]} are "
            f"{probabilities[i].tolist()}, outside [0, 1]. Pass the probe's predict_proba output"
        )
    return np.clip(probabilities, 0.0, 1.0)


def _checked_provenance(
    provenance: Mapping[str, Any],
    class_names: Sequence[str] | None,
    source: _SourceTable,
    *,
    embedding_dim: int,
) -> dict[str, Any]:
    """Return the full provenance record of the tables: the caller's keys plus the source's identifier, versions and classes.

    The record's ``output_nwb_version`` is the version pynwb is expected to write. The
    writer corrects it after writing when the file records another version.
    """
    missing = [name for name in REQUIRED_PROVENANCE if name not in provenance]
    if missing:
        raise ValueError(f"{source.path}: provenance keys {missing} are missing. Pass them in provenance")

    for name in provenance:
        if not isinstance(name, str) or not name:
            raise ValueError(f"{source.path}: provenance key {name!r} must be a non-empty str")
        if name in RESERVED_PROVENANCE:
            raise ValueError(f"{source.path}: provenance key {name!r} is reserved for the writer, which fills it in. Remove it")
    for name in (*REQUIRED_PROVENANCE, *OPTIONAL_TEXT_PROVENANCE):
        if name in provenance and not isinstance(provenance[name], str):
            value = provenance[name]
            raise ValueError(
                f"{source.path}: provenance {name!r} is {value!r} of type {type(value).__name__}, "
                f"but it becomes a text attribute. Pass it as str"
            )

    extra_source = provenance.get("source") or {}
    if not isinstance(extra_source, Mapping):
        raise ValueError(f"{source.path}: provenance 'source' must be a mapping of extra fields, such as DANDI ids, got {extra_source!r}")

    record: dict[str, Any] = dict(provenance)
    record["embedding_dim"] = int(embedding_dim)
    record["source"] = {
        **extra_source,
        "path": str(source.path.resolve()),
        "identifier": source.identifier,
        "nwb_version": source.nwb_version,
    }
    record["source_nwb_version"] = source.nwb_version

    if class_names is not None:
        names = list(class_names)
        if not names or not all(isinstance(name, str) and name for name in names) or len(set(names)) != len(names):
            raise ValueError(f"{source.path}: class_names must be distinct non-empty str, got {names}")
        record["class_names"] = names

    try:
        json.dumps(record, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{source.path}: provenance cannot be written as JSON ({error}). Pass str, numbers, lists and mappings") from error
    return record


def _find_table(io: NWBHDF5IO, nwbfile, source: _SourceTable) -> DynamicTable:
    """Find the pynwb object of the source table by its path inside the file."""
    builder_path = f"root/{source.table}"
    for container in nwbfile.objects.values():
        builder = io.manager.get_builder(container)
        if builder is not None and builder.path == builder_path:
            if not isinstance(container, DynamicTable):
                raise DataError(
                    f"{source.path}: '{source.table}' is a {type(container).__name__}, not a table "
                    f"of neurons. Pass the path of the Units table or a PlaneSegmentation"
                )
            return container

    raise DataError(f"{source.path}: pynwb found no object at '{source.table}'. Check the table path")


def _table_attributes(record: Mapping[str, Any], output_nwb_version: str) -> dict[str, Any]:
    """Return the keyword arguments of NeuronEmbeddingTable that carry the provenance."""
    attributes: dict[str, Any] = {name: record[name] for name in REQUIRED_PROVENANCE}
    attributes.update({name: record[name] for name in OPTIONAL_TEXT_PROVENANCE if name in record})
    attributes["embedding_dim"] = np.int32(record["embedding_dim"])
    if "class_names" in record:
        attributes["class_names"] = list(record["class_names"])
    attributes["source_nwb_version"] = record["source_nwb_version"]
    attributes["output_nwb_version"] = output_nwb_version
    attributes["provenance"] = json.dumps({**record, "output_nwb_version": output_nwb_version}, sort_keys=True)
    return attributes


def _append_module(
    partial_path: Path, *, blocks: list[dict], class_names: Sequence[str] | None, record: Mapping[str, Any]
) -> str:
    """Append the ``neurpir`` module with one table per block to the copy, and return the nwb_version pynwb writes."""
    table_class = neuron_embedding_table_class()
    with NWBHDF5IO(partial_path, mode="a") as io:
        nwbfile = io.read()

        # pynwb writes the nwb_version of the core namespace it builds the file with.
        output_nwb_version = str(io.manager.type_map.namespace_catalog.get_namespace("core").version)
        attributes = _table_attributes(record, output_nwb_version)

        tables = []
        for block in blocks:
            source, rows, embeddings = block["source"], block["rows"], block["embeddings"]
            labels, probabilities = block["labels"], block["probabilities"]
            if source.series_names:
                # Plain TimeSeries are no table rows, so each row names its TimeSeries in /acquisition.
                link = VectorData(
                    name="timeseries",
                    description="Name of the TimeSeries in /acquisition that this row describes.",
                    data=[source.series_names[row] for row in rows],
                )
            else:
                link = DynamicTableRegion(
                    name="unit",
                    description=f"Row of /{source.table} that this row describes.",
                    data=rows,
                    table=_find_table(io, nwbfile, source),
                )

            columns = [
                link,
                VectorData(
                    name="embedding",
                    description=(
                        f"Time-invariant embedding of the neuron learned by NeurPIR "
                        f"(VICReg contrastive learning), float32, {embeddings.shape[1]} dimensions."
                    ),
                    data=H5DataIO(embeddings, compression="gzip", compression_opts=4),
                ),
            ]
            if labels is not None:
                columns.append(
                    VectorData(
                        name="predicted_label",
                        description="Label predicted by the probe from the embedding, or empty where it made none.",
                        data=labels,
                    )
                )
            if probabilities is not None:
                columns.append(
                    VectorData(
                        name="class_probabilities",
                        description=(
                            f"Probe class probabilities, float32. Column j is the probability of "
                            f"class_names[j] in the table attribute class_names: {', '.join(class_names)}."
                        ),
                        data=probabilities,
                    )
                )

            tables.append(
                table_class(
                    name=block["name"],
                    description=(
                        f"One row per neuron of /{source.table}: its NeurPIR embedding and the probe's "
                        f"predictions. The id column holds the ids of the linked rows, and the provenance "
                        f"is stored in this table's attributes."
                    ),
                    id=source.row_ids[rows],
                    columns=columns,
                    **attributes,
                )
            )

        module = nwbfile.create_processing_module(
            name=MODULE_NAME,
            description=(
                f"Per-neuron embeddings and probe predictions written by neurpir-nwb {__version__}."
            ),
        )
        for table in tables:
            module.add(table)

        # NOTE: pynwb caches its own schema and sets nwb_version to its core version here,
        # so pynwb 2.x cannot read outputs of older sources that contain an electrodes table.
        io.write(nwbfile, cache_spec=True)
    return output_nwb_version


def _record_output_version(partial_path: Path, table_names: Sequence[str], expected_version: str) -> str:
    """Return the output's ``nwb_version``, correcting the tables' record of it when pynwb wrote another one."""
    with h5py.File(partial_path, "r+") as output_file:
        output_nwb_version = _decode_attribute(output_file.attrs["nwb_version"])
        if output_nwb_version == expected_version:
            return output_nwb_version

        logger.debug("%s: pynwb wrote nwb_version %s, not %s; correcting the tables", partial_path, output_nwb_version, expected_version)
        for table_name in table_names:
            group = output_file[f"processing/{MODULE_NAME}/{table_name}"]
            group.attrs["output_nwb_version"] = output_nwb_version
            record = json.loads(_decode_attribute(group.attrs["provenance"]))
            record["output_nwb_version"] = output_nwb_version
            group.attrs["provenance"] = json.dumps(record, sort_keys=True)
    return output_nwb_version
