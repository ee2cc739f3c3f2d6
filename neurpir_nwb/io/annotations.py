"""Read external annotation tables (CSV or TSV) and join their labels onto neurons.

An annotation table has a header row and one row per neuron. Its columns are:

``session``
    Which source file the row belongs to. A value equal to a neuron's NWB
    ``identifier`` matches that neuron's file. Otherwise a value that contains ``*``,
    ``?``, ``[`` or ``/`` is a glob matched against the source file path with
    :meth:`pathlib.PurePath.match`: a relative glob such as ``sub-4/*.nwb`` is matched
    from the right end of the path, an absolute glob must match the whole path, and
    ``*`` does not cross a ``/``. Any other value matches no file.
``unit_id`` or ``roi_id``
    The integer ``id`` of the neuron in the Units table or in the PlaneSegmentation.
    A table has exactly one of the two.
``plane`` (optional, ``roi_id`` tables only)
    Name of the PlaneSegmentation, for files with several imaging planes whose ROI ids
    overlap. An empty value matches the ROI id in every plane.
label columns
    Every other column, or the columns the caller names. Values are strings, and an
    empty value means the row gives no label in that column.

The delimiter follows the extension (``.csv``: comma, ``.tsv`` or ``.tab``: tab) and
is sniffed from the header for any other extension. ``schemas/annotation-table.schema.json``
describes the rows as JSON objects.

Examples
--------
>>> table = read_annotation_table("cell_types.csv")                       # doctest: +SKIP
>>> labels, raw, report = join_annotations(                               # doctest: +SKIP
...     table, identifiers=ids_of_file, sources=paths, ids=unit_ids, label_column="subclass",
...     merge={"pvalb": "inhibitory", "sst": "inhibitory"})
>>> report.to_dict()["matched"]                                           # doctest: +SKIP
10
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath, PurePosixPath
from typing import Any, Literal

import numpy as np

from neurpir_nwb.errors import DataError, RecipeError

__all__ = [
    "AnnotationRow",
    "AnnotationTable",
    "JoinReport",
    "join_annotations",
    "normalise_label",
    "read_annotation_table",
]

logger = logging.getLogger(__name__)

SESSION_COLUMN = "session"
KEY_COLUMNS = ("unit_id", "roi_id")
PLANE_COLUMN = "plane"

# Characters that turn a session value into a path glob when it is not an identifier.
GLOB_CHARACTERS = frozenset("*?[/")

# Max duplicate keys that the warning names one by one. It gives only the count of the rest.
MAX_LOGGED_KEYS = 10

EXTENSION_DELIMITERS = {".csv": ",", ".tsv": "\t", ".tab": "\t"}
SNIFFED_DELIMITERS = ",\t;|"


@dataclass(frozen=True)
class AnnotationRow:
    """One row of an annotation table.

    Attributes
    ----------
    line
        1-based line of the row in the file.
    session
        NWB identifier or path glob of the source file, stripped of surrounding spaces.
    id
        Unit id or ROI id.
    plane
        PlaneSegmentation name, or ``""`` when the table has no ``plane`` column or the
        cell is empty.
    labels
        Label column to the value as written in the file.
    """

    line: int
    session: str
    id: int
    plane: str
    labels: dict[str, str]

    @property
    def is_glob(self) -> bool:
        """Whether ``session`` is matched as a path glob when it equals no identifier."""
        return any(character in GLOB_CHARACTERS for character in self.session)


@dataclass
class AnnotationTable:
    """An annotation table read from a CSV or TSV file.

    Attributes
    ----------
    path
        The file the table was read from.
    key_column
        ``"unit_id"`` or ``"roi_id"``.
    label_columns
        Columns that hold labels, in file order.
    rows
        The rows, in file order.
    has_plane
        Whether the table has a ``plane`` column.
    delimiter
        Field delimiter of the file.
    """

    path: Path
    key_column: Literal["unit_id", "roi_id"]
    label_columns: list[str]
    rows: list[AnnotationRow]
    has_plane: bool = False
    delimiter: str = ","

    def to_records(self) -> list[dict[str, Any]]:
        """Return the rows as JSON objects, the form ``annotation-table.schema.json`` describes."""
        records = []
        for row in self.rows:
            record: dict[str, Any] = {SESSION_COLUMN: row.session, self.key_column: row.id}
            if self.has_plane:
                record[PLANE_COLUMN] = row.plane
            record.update(row.labels)
            records.append(record)
        return records


@dataclass
class JoinReport:
    """Outcome of joining one label column of an annotation table onto neurons.

    Attributes
    ----------
    table
        The annotation table file.
    label_column
        The joined column.
    neurons
        Number of neurons the table was joined onto.
    matched
        Neurons that at least one row matches.
    labelled
        Neurons left with a non-empty label: matched neurons less those with an empty
        value, conflicting values or a dropped class.
    unmatched_neurons
        Neurons that no row matches; their label is ``""``.
    unknown_keys
        Rows that match no neuron, as ``{"session", "id", "plane", "line"}``.
    duplicate_keys
        Neurons that several rows match, as ``{"identifier", "id", "plane", "lines",
        "values", "conflict"}``; ``values`` are the raw non-empty values in line order.
    """

    table: str
    label_column: str
    neurons: int
    matched: int
    labelled: int
    unmatched_neurons: int
    unknown_keys: list[dict[str, Any]] = field(default_factory=list)
    duplicate_keys: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Return the report as a JSON-serialisable dict."""
        return {
            "table": self.table,
            "label_column": self.label_column,
            "neurons": self.neurons,
            "matched": self.matched,
            "labelled": self.labelled,
            "unmatched_neurons": self.unmatched_neurons,
            "unknown_keys": [dict(key) for key in self.unknown_keys],
            "duplicate_keys": [{**key, "lines": list(key["lines"]), "values": list(key["values"])} for key in self.duplicate_keys],
        }


# --- reading ---------------------------------------------------------------------------------


def read_annotation_table(path: str | Path, *, label_columns: Sequence[str] | None = None) -> AnnotationTable:
    """Read an annotation table from a CSV or TSV file with a header row.

    Parameters
    ----------
    path
        The table. ``.csv`` is comma-separated, ``.tsv`` and ``.tab`` are tab-separated,
        and the delimiter of any other extension is sniffed from the header.
    label_columns
        Columns to keep as labels. By default every column other than ``session``,
        the key column and ``plane``.

    Raises
    ------
    RecipeError
        When the file is missing, or its header lacks ``session`` or a key column, has
        both ``unit_id`` and ``roi_id``, repeats a column, or lacks a requested label column.
    DataError
        When the file is empty or not UTF-8, or a row has the wrong number of fields, an
        empty session or a non-integer id. The message names the file, the line and the value.
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"annotation table {path} not found; give the path of a CSV or TSV file")

    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataError(
            f"{path}: annotation table is not UTF-8 text (byte {error.start}); save it as UTF-8 CSV or TSV"
        ) from None
    if not text.strip():
        raise DataError(f"{path}: annotation table is empty; add a header row such as 'session,unit_id,cell_type' and one row per neuron")

    delimiter = _delimiter_of(path, text)
    reader = csv.reader(text.splitlines(keepends=True), delimiter=delimiter)

    header, header_line = _read_header(path, reader)
    key_column, has_plane, chosen = _check_header(path, header, header_line, label_columns)

    rows = _read_rows(path, reader, header, header_line, key_column, has_plane, chosen)
    logger.debug("%s: read %d annotation rows keyed by %s with label columns %s", path, len(rows), key_column, chosen)
    return AnnotationTable(
        path=path,
        key_column=key_column,
        label_columns=chosen,
        rows=rows,
        has_plane=has_plane,
        delimiter=delimiter,
    )


def _delimiter_of(path: Path, text: str) -> str:
    """Return the delimiter that the extension implies, else the one sniffed from the header."""
    suffix = path.suffix.lower()
    if suffix in EXTENSION_DELIMITERS:
        return EXTENSION_DELIMITERS[suffix]

    header = next(line for line in text.splitlines() if line.strip())
    try:
        return csv.Sniffer().sniff(header, delimiters=SNIFFED_DELIMITERS).delimiter
    except csv.Error:
        raise RecipeError(
            f"{path}: failed to detect the delimiter of the header {header.strip()!r}; "
            "name the file .csv (comma-separated) or .tsv (tab-separated)"
        ) from None


def _read_header(path: Path, reader: Any) -> tuple[list[str], int]:
    """Return the first non-blank record, stripped, and its line."""
    for record in reader:
        if any(cell.strip() for cell in record):
            return [cell.strip() for cell in record], reader.line_num
    raise DataError(f"{path}: annotation table has no header row; add one such as 'session,unit_id,cell_type'")


def _check_header(
    path: Path, header: list[str], header_line: int, label_columns: Sequence[str] | None
) -> tuple[Literal["unit_id", "roi_id"], bool, list[str]]:
    """Return the key column, whether a ``plane`` column exists, and the label columns."""
    where = f"{path}, line {header_line}"
    looks_tab_separated = len(header) == 1 and "\t" in header[0]
    hint = "; the header looks tab-separated, so name the file .tsv" if looks_tab_separated else ""

    if "" in header:
        raise RecipeError(f"{where}: column {header.index('') + 1} of the header has no name; name every column")
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise RecipeError(f"{where}: header repeats the column {repeated[0]!r}; give every column a distinct name")

    if SESSION_COLUMN not in header:
        raise RecipeError(
            f"{where}: header {header} has no 'session' column; add one holding the NWB identifier "
            f"or a path glob of each row's source file{hint}"
        )
    keys = [name for name in KEY_COLUMNS if name in header]
    if not keys:
        raise RecipeError(
            f"{where}: header {header} has no key column; add 'unit_id' (Units table ids) "
            f"or 'roi_id' (PlaneSegmentation ids){hint}"
        )
    if len(keys) > 1:
        raise RecipeError(f"{where}: header has both 'unit_id' and 'roi_id'; keep one key column per table")
    key_column: Literal["unit_id", "roi_id"] = "unit_id" if keys[0] == "unit_id" else "roi_id"

    has_plane = PLANE_COLUMN in header
    if has_plane and key_column != "roi_id":
        raise RecipeError(f"{where}: a 'plane' column needs 'roi_id' keys, but the key column is 'unit_id'; rename or remove 'plane'")

    reserved = {SESSION_COLUMN, key_column, PLANE_COLUMN}
    available = [name for name in header if name not in reserved]
    if label_columns is None:
        chosen = available
    else:
        chosen = list(label_columns)
        for name in chosen:
            if name not in available:
                raise RecipeError(
                    f"{where}: label column {name!r} not found; the table's label columns are {', '.join(available) or 'none'}"
                )
    if not chosen:
        raise RecipeError(f"{where}: annotation table has no label column; add a column such as 'cell_type' beside the keys")
    return key_column, has_plane, chosen


def _read_rows(
    path: Path,
    reader: Any,
    header: list[str],
    header_line: int,
    key_column: str,
    has_plane: bool,
    label_columns: list[str],
) -> list[AnnotationRow]:
    """Parse and check every row after the header."""
    positions = {name: index for index, name in enumerate(header)}
    rows = []
    last_line = header_line
    for record in reader:
        line = last_line + 1
        last_line = reader.line_num
        if not any(cell.strip() for cell in record):
            continue

        if len(record) != len(header):
            raise DataError(
                f"{path}, line {line}: row has {len(record)} fields but the header has {len(header)}; "
                "give every row one value per column (leave a cell empty for a missing label)"
            )

        session = record[positions[SESSION_COLUMN]].strip()
        if not session:
            raise DataError(f"{path}, line {line}: empty 'session'; give the NWB identifier or a path glob of the source file")

        id_text = record[positions[key_column]].strip()
        try:
            neuron_id = int(id_text)
        except ValueError:
            raise DataError(
                f"{path}, line {line}: {key_column} {id_text!r} is not an integer; "
                f"give the integer id of the neuron in the NWB table"
            ) from None

        plane = record[positions[PLANE_COLUMN]].strip() if has_plane else ""
        labels = {name: record[positions[name]] for name in label_columns}
        rows.append(AnnotationRow(line=line, session=session, id=neuron_id, plane=plane, labels=labels))
    return rows


# --- joining ---------------------------------------------------------------------------------


def normalise_label(value: str) -> str:
    """Strip, collapse runs of whitespace to one space and case-fold a label."""
    return " ".join(value.split()).casefold()


def join_annotations(
    table: AnnotationTable,
    *,
    identifiers: Sequence[str] | np.ndarray,
    sources: Sequence[str | Path] | np.ndarray,
    ids: Sequence[int] | np.ndarray,
    planes: Sequence[str] | np.ndarray | None = None,
    label_column: str,
    normalise: bool = True,
    merge: Mapping[str, str] | None = None,
    drop: Sequence[str] = (),
) -> tuple[np.ndarray, np.ndarray, JoinReport]:
    """Join one label column of an annotation table onto neurons.

    Join the table onto every neuron of a run at once. Rows that belong to a file
    left out of the call count as unknown keys.

    Parameters
    ----------
    table
        The annotation table.
    identifiers, sources, ids
        Per neuron: the NWB identifier of its file, the path of its file, and its unit
        id or ROI id.
    planes
        Per neuron: its PlaneSegmentation name. None when the neurons have no plane.
    label_column
        Column of the table to join.
    normalise
        Strip, collapse whitespace and case-fold the labels, as :func:`normalise_label`
        does. The keys of ``merge`` and the entries of ``drop`` are normalised the same way.
    merge
        Label to the class that replaces it, applied after normalisation, for example
        ``{"pvalb": "inhibitory", "sst": "inhibitory"}``.
    drop
        Classes turned into ``""``. A neuron is dropped when its label before or after
        ``merge`` is listed.

    Returns
    -------
    labels
        One str per neuron (object array): the label after normalisation, merge and drop,
        ``""`` for unmatched neurons, empty values, conflicting duplicates and dropped classes.
    raw
        One str per neuron (object array): the value as written in the table, ``""`` for
        unmatched neurons and conflicting duplicates.
    report
        Counts of matched and unmatched neurons, unknown keys and duplicate keys.

    Raises
    ------
    RecipeError
        When ``label_column`` is not a label column of the table.
    ValueError
        When the per-neuron arrays differ in length.
    """
    if label_column not in table.label_columns:
        raise RecipeError(
            f"{table.path}: label column {label_column!r} not found; "
            f"the table's label columns are {', '.join(table.label_columns)}"
        )

    identifiers = [str(value) for value in identifiers]
    source_paths = [PurePosixPath(Path(source).as_posix()) for source in sources]
    ids = np.asarray(ids, dtype=np.int64)
    plane_names = [str(value) for value in planes] if planes is not None else [""] * len(ids)
    lengths = {len(identifiers), len(source_paths), len(ids), len(plane_names)}
    if len(lengths) != 1:
        raise ValueError(
            f"identifiers, sources, ids and planes need one entry per neuron, but have lengths "
            f"{len(identifiers)}, {len(source_paths)}, {len(ids)} and {len(plane_names)}"
        )

    rows_per_neuron, unknown_keys = _match_rows(table, identifiers, source_paths, ids, plane_names)
    classify = _classifier(normalise, merge, drop)

    n_neurons = len(ids)
    labels = np.full(n_neurons, "", dtype=object)
    raw = np.full(n_neurons, "", dtype=object)
    duplicate_keys = []
    for neuron, rows in enumerate(rows_per_neuron):
        if not rows:
            continue
        values = [row.labels[label_column] for row in rows if row.labels[label_column].strip()]
        classes = {classify(value)[0] for value in values}
        conflict = len(classes) > 1
        if len(rows) > 1:
            duplicate_keys.append(
                {
                    "identifier": identifiers[neuron],
                    "id": int(ids[neuron]),
                    "plane": plane_names[neuron],
                    "lines": [row.line for row in rows],
                    "values": values,
                    "conflict": conflict,
                }
            )
        if values and not conflict:
            raw[neuron] = values[0]
            labels[neuron] = classify(values[0])[1]

    matched = sum(1 for rows in rows_per_neuron if rows)
    report = JoinReport(
        table=str(table.path),
        label_column=label_column,
        neurons=n_neurons,
        matched=matched,
        labelled=int(np.count_nonzero(labels != "")),
        unmatched_neurons=n_neurons - matched,
        unknown_keys=unknown_keys,
        duplicate_keys=duplicate_keys,
    )
    _log_report(report)
    return labels, raw, report


def _match_rows(
    table: AnnotationTable,
    identifiers: list[str],
    source_paths: list[PurePosixPath],
    ids: np.ndarray,
    plane_names: list[str],
) -> tuple[list[list[AnnotationRow]], list[dict[str, Any]]]:
    """Return the rows matching each neuron, in line order, and the rows matching none."""
    neurons_by_id: dict[int, list[int]] = {}
    for neuron, neuron_id in enumerate(ids.tolist()):
        neurons_by_id.setdefault(neuron_id, []).append(neuron)

    glob_matches: dict[tuple[str, PurePosixPath], bool] = {}

    def session_matches(row: AnnotationRow, neuron: int) -> bool:
        if row.session == identifiers[neuron]:
            return True
        if not row.is_glob:
            return False
        key = (row.session, source_paths[neuron])
        if key not in glob_matches:
            glob_matches[key] = _glob_matches(source_paths[neuron], row.session)
        return glob_matches[key]

    rows_per_neuron: list[list[AnnotationRow]] = [[] for _ in range(len(ids))]
    unknown_keys = []
    for row in table.rows:
        found = False
        for neuron in neurons_by_id.get(row.id, []):
            if row.plane and row.plane != plane_names[neuron]:
                continue
            if session_matches(row, neuron):
                rows_per_neuron[neuron].append(row)
                found = True
        if not found:
            unknown_keys.append({"session": row.session, "id": row.id, "plane": row.plane, "line": row.line})
    return rows_per_neuron, unknown_keys


def _glob_matches(path: PurePosixPath, pattern: str) -> bool:
    """Match a path against a glob from the right, or in full when the glob is absolute."""
    # NOTE: Python 3.11's PurePath.match treats "**" like "*", so it spans exactly one folder.
    try:
        return path.match(pattern)
    except ValueError:
        # PurePath.match raises ValueError on an empty pattern such as "/".
        return False


def _classifier(normalise: bool, merge: Mapping[str, str] | None, drop: Sequence[str]) -> Any:
    """Return a function mapping a raw value to (class compared between duplicates, final label)."""
    prepare = normalise_label if normalise else (lambda value: value)
    merged = {prepare(key): value for key, value in (merge or {}).items()}
    dropped = {prepare(value) for value in drop}

    def classify(value: str) -> tuple[str, str]:
        label = prepare(value)
        target = merged.get(label, label)
        if label in dropped or target in dropped:
            return target, ""
        return target, target

    return classify


def _log_report(report: JoinReport) -> None:
    """Log the join's counts, and a warning for duplicate keys."""
    logger.info(
        "%s, column %r: %d neurons matched, %d unmatched neurons, %d unknown keys, %d duplicate keys",
        report.table,
        report.label_column,
        report.matched,
        report.unmatched_neurons,
        len(report.unknown_keys),
        len(report.duplicate_keys),
    )
    if not report.duplicate_keys:
        return

    conflicts = [key for key in report.duplicate_keys if key["conflict"]]
    listed_keys = ", ".join(
        f"{key['identifier']}/{key['plane'] + '/' if key['plane'] else ''}{key['id']} (lines {', '.join(map(str, key['lines']))})"
        for key in report.duplicate_keys[:MAX_LOGGED_KEYS]
    )
    more = len(report.duplicate_keys) - MAX_LOGGED_KEYS
    if more > 0:
        listed_keys += f" and {more} more"
    logger.warning(
        "%s, column %r: %d neurons appear in more than one row, %d of them with conflicting values that leave "
        "them unlabelled: %s; keep one row per neuron",
        report.table,
        report.label_column,
        len(report.duplicate_keys),
        len(conflicts),
        listed_keys,
    )
