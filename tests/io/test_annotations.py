"""Tests of reading annotation tables and joining their labels onto neurons."""

import json
import logging
from pathlib import Path

import h5py
import pytest

from neurpir_nwb.errors import DataError, RecipeError
from neurpir_nwb.io.annotations import (
    AnnotationTable,
    join_annotations,
    normalise_label,
    read_annotation_table,
)

LOGGER = "neurpir_nwb.io.annotations"
SCHEMA_PATH = Path(__file__).resolve().parents[2] / "schemas" / "annotation-table.schema.json"


def write_table(path: Path, lines: list[str]) -> Path:
    """Write the lines of a table file and return its path."""
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def log_messages(caplog, level: int) -> list[str]:
    """Return the messages the annotations module logged at ``level``."""
    return [record.getMessage() for record in caplog.records if record.name == LOGGER and record.levelno == level]


@pytest.fixture
def suite2p(shared_data):
    """Return the path, identifier and ROI ids of the 15-ROI suite2p file."""
    path = shared_data / "nwb" / "real" / "ophys_suite2p_15rois.nwb"
    with h5py.File(path, "r") as file:
        identifier = file["identifier"][()].decode()
        roi_ids = file["processing/ophys/ImageSegmentation/PlaneSegmentation/id"][:]
    return path, identifier, roi_ids


# --- joining on real files ---------------------------------------------------------------------


def test_join_counts_on_suite2p_rois(tmp_path, suite2p, caplog):
    path, identifier, roi_ids = suite2p
    assert roi_ids.tolist() == list(range(15))

    # ROIs 0 to 9 are labelled, ROI 3 twice with the same value, and ROI 99 does not exist.
    subclasses = ["Pvalb", "Sst", "Vip", "L2/3 IT", "L5 ET", "Pvalb", "Sst", "Vip", "L2/3 IT", "L6 CT"]
    lines = ["session,roi_id,subclass"]
    lines += [f"{identifier},{roi},{subclass}" for roi, subclass in enumerate(subclasses)]
    lines += [f"{identifier},3,L2/3 IT", f"{identifier},99,Pvalb"]
    table = read_annotation_table(write_table(tmp_path / "subclass.csv", lines))

    caplog.set_level(logging.INFO, logger=LOGGER)
    labels, raw, report = join_annotations(
        table,
        identifiers=[identifier] * len(roi_ids),
        sources=[path] * len(roi_ids),
        ids=roi_ids,
        label_column="subclass",
    )

    assert report.matched == 10
    assert report.unmatched_neurons == 5
    assert report.labelled == 10
    assert len(report.unknown_keys) == 1
    assert len(report.duplicate_keys) == 1
    assert report.unknown_keys[0] == {"session": identifier, "id": 99, "plane": "", "line": 13}
    assert report.duplicate_keys[0]["id"] == 3
    assert report.duplicate_keys[0]["lines"] == [5, 12]
    assert report.duplicate_keys[0]["conflict"] is False
    assert labels.tolist() == [normalise_label(value) for value in subclasses] + [""] * 5
    assert raw.tolist() == subclasses + [""] * 5

    info = log_messages(caplog, logging.INFO)
    assert any("10 neurons matched, 5 unmatched neurons, 1 unknown keys, 1 duplicate keys" in message for message in info)
    warnings = log_messages(caplog, logging.WARNING)
    assert len(warnings) == 1
    assert "1 neurons appear in more than one row" in warnings[0]
    assert "lines 5, 12" in warnings[0]

    as_dict = report.to_dict()
    assert json.loads(json.dumps(as_dict)) == as_dict
    assert as_dict["matched"] == 10


def test_join_opto_tagged_units_human_mtl(tmp_path, shared_data):
    path = shared_data / "nwb" / "real" / "human_mtl_sub-4_ses-4.nwb"
    with h5py.File(path, "r") as file:
        identifier = file["identifier"][()].decode()
        unit_ids = file["units/id"][:]
    assert len(unit_ids) == 35

    # Opto-tagging results cover the first 6 units, so the other 29 stay unlabelled.
    tagged = {0: "ChR2+ PV", 1: "untagged", 2: "ChR2+ SST", 3: "untagged", 4: "ChR2+ PV", 5: "ChR2+ PV"}
    lines = ["session\tunit_id\topto_type\tnotes"]
    lines += [f"{identifier}\t{unit}\t{value}\tlight pulse 5 ms" for unit, value in tagged.items()]
    table = read_annotation_table(write_table(tmp_path / "opto.tsv", lines))
    assert table.key_column == "unit_id"
    assert table.label_columns == ["opto_type", "notes"]

    labels, raw, report = join_annotations(
        table,
        identifiers=[identifier] * len(unit_ids),
        sources=[path] * len(unit_ids),
        ids=unit_ids,
        label_column="opto_type",
        merge={"chr2+ pv": "pv", "chr2+ sst": "sst"},
        drop=["untagged"],
    )

    assert report.matched == 6
    assert report.unmatched_neurons == 29
    assert report.labelled == 4
    assert labels[:6].tolist() == ["pv", "", "sst", "", "pv", "pv"]
    assert raw[:6].tolist() == list(tagged.values())
    assert set(labels[6:].tolist()) == {""}


# --- formats ---------------------------------------------------------------------------------


def test_tsv_table_reads_tab_delimiter(tmp_path):
    lines = ["session\troi_id\tcell_type", "file-a\t0\tPyramidal, deep", "file-a\t1\tinterneuron"]
    table = read_annotation_table(write_table(tmp_path / "types.tsv", lines))

    assert table.delimiter == "\t"
    assert table.key_column == "roi_id"
    assert [row.labels["cell_type"] for row in table.rows] == ["Pyramidal, deep", "interneuron"]


def test_unknown_extension_sniffs_delimiter(tmp_path):
    lines = ["session;unit_id;region", "file-a;4;CA1", "file-a;5;DG"]
    table = read_annotation_table(write_table(tmp_path / "regions.txt", lines))

    assert table.delimiter == ";"
    assert [row.id for row in table.rows] == [4, 5]
    assert [row.labels["region"] for row in table.rows] == ["CA1", "DG"]


def test_quoted_fields_and_blank_lines(tmp_path):
    lines = ["", "session,unit_id,region", 'file-a,1,"CA1, dorsal"', "", "file-a,2,DG"]
    table = read_annotation_table(write_table(tmp_path / "regions.csv", lines))

    assert [row.labels["region"] for row in table.rows] == ["CA1, dorsal", "DG"]
    assert [row.line for row in table.rows] == [3, 5]


def test_label_columns_selects_subset(tmp_path):
    lines = ["session,unit_id,region,layer,depth_um", "file-a,1,CA1,so,120"]
    table = read_annotation_table(write_table(tmp_path / "t.csv", lines), label_columns=["layer"])

    assert table.label_columns == ["layer"]
    assert table.rows[0].labels == {"layer": "so"}


# --- session matching --------------------------------------------------------------------------


def test_glob_session_matches_source_path(tmp_path):
    sources = [
        tmp_path / "dandi" / "sub-4" / "sub-4_ses-4.nwb",
        tmp_path / "dandi" / "sub-5" / "sub-5_ses-1.nwb",
        tmp_path / "dandi" / "sub-5" / "sub-5_ses-2.nwb",
    ]
    lines = [
        "session,unit_id,region",
        "sub-4/*.nwb,0,hippocampus",
        "*ses-1.nwb,0,amygdala",
        f"{tmp_path}/dandi/sub-5/sub-5_ses-2.*,0,entorhinal",
        "ses-2.nwb,0,never",
        "sub-4,0,never",
    ]
    table = read_annotation_table(write_table(tmp_path / "regions.csv", lines))

    labels, raw, report = join_annotations(
        table,
        identifiers=["uuid-a", "uuid-b", "uuid-c"],
        sources=sources,
        ids=[0, 0, 0],
        label_column="region",
    )

    assert labels.tolist() == ["hippocampus", "amygdala", "entorhinal"]
    assert report.matched == 3
    assert [key["line"] for key in report.unknown_keys] == [5, 6]


def test_identifier_with_glob_characters_matches_exactly(tmp_path):
    lines = ["session,unit_id,region", "lab/session[1],2,CA3"]
    table = read_annotation_table(write_table(tmp_path / "regions.csv", lines))

    labels, _, report = join_annotations(
        table,
        identifiers=["lab/session[1]", "lab/session[1]"],
        sources=[tmp_path / "a.nwb", tmp_path / "a.nwb"],
        ids=[1, 2],
        label_column="region",
    )

    assert labels.tolist() == ["", "ca3"]
    assert report.unknown_keys == []


def test_plane_column_keys_overlapping_roi_ids(tmp_path):
    lines = [
        "session,plane,roi_id,cell_type",
        "file-a,PlaneSegmentation_plane0,2,pyramidal",
        "file-a,PlaneSegmentation_plane1,2,interneuron",
        "file-a,,3,astrocyte",
        "file-a,PlaneSegmentation_plane2,0,pyramidal",
    ]
    table = read_annotation_table(write_table(tmp_path / "types.csv", lines))
    planes = ["PlaneSegmentation_plane0"] * 3 + ["PlaneSegmentation_plane1"] * 4

    labels, _, report = join_annotations(
        table,
        identifiers=["file-a"] * 7,
        sources=[tmp_path / "a.nwb"] * 7,
        ids=[0, 2, 4, 0, 1, 2, 3],
        planes=planes,
        label_column="cell_type",
    )

    assert labels.tolist() == ["", "pyramidal", "", "", "", "interneuron", "astrocyte"]
    assert report.matched == 3
    assert report.duplicate_keys == []
    assert report.unknown_keys == [{"session": "file-a", "id": 0, "plane": "PlaneSegmentation_plane2", "line": 5}]


# --- normalisation, merge and drop ------------------------------------------------------------


def test_normalisation_keeps_raw_values(tmp_path):
    lines = ["session,unit_id,subclass", "f,0,  PValb ", "f,1,pvalb", "f,2,L2/3   IT", "f,3,", "f,4,SST"]
    table = read_annotation_table(write_table(tmp_path / "t.csv", lines))
    arrays = {"identifiers": ["f"] * 5, "sources": ["f.nwb"] * 5, "ids": range(5), "label_column": "subclass"}

    labels, raw, report = join_annotations(table, **arrays)
    assert labels.tolist() == ["pvalb", "pvalb", "l2/3 it", "", "sst"]
    assert raw.tolist() == ["  PValb ", "pvalb", "L2/3   IT", "", "SST"]
    assert report.matched == 5
    assert report.labelled == 4

    labels, raw, _ = join_annotations(table, **arrays, normalise=False)
    assert labels.tolist() == ["  PValb ", "pvalb", "L2/3   IT", "", "SST"]
    assert raw.tolist() == labels.tolist()


def test_merge_and_drop_classes(tmp_path):
    lines = ["session,unit_id,subclass", "f,0,Pvalb", "f,1,Sst", "f,2,L2/3 IT", "f,3,Vip", "f,4,Unknown", "f,5,L6 CT"]
    table = read_annotation_table(write_table(tmp_path / "t.csv", lines))

    labels, raw, report = join_annotations(
        table,
        identifiers=["f"] * 6,
        sources=["f.nwb"] * 6,
        ids=range(6),
        label_column="subclass",
        merge={"PVALB": "inhibitory", "sst": "inhibitory", "l2/3 it": "excitatory", "l6 ct": "excitatory"},
        drop=["unknown", "vip"],
    )

    assert labels.tolist() == ["inhibitory", "inhibitory", "excitatory", "", "", "excitatory"]
    assert raw.tolist() == ["Pvalb", "Sst", "L2/3 IT", "Vip", "Unknown", "L6 CT"]
    assert report.labelled == 4


def test_drop_applies_to_merged_class(tmp_path):
    lines = ["session,unit_id,subclass", "f,0,Pvalb", "f,1,L2/3 IT"]
    table = read_annotation_table(write_table(tmp_path / "t.csv", lines))

    labels, _, _ = join_annotations(
        table,
        identifiers=["f", "f"],
        sources=["f.nwb", "f.nwb"],
        ids=[0, 1],
        label_column="subclass",
        merge={"pvalb": "inhibitory", "l2/3 it": "excitatory"},
        drop=["excitatory"],
    )

    assert labels.tolist() == ["inhibitory", ""]


# --- duplicates ----------------------------------------------------------------------------------


def test_conflicting_duplicates_stay_unlabelled(tmp_path, caplog):
    lines = [
        "session,unit_id,subclass",
        "f,0,Pvalb",
        "f,0,Sst",
        "f,1,Pvalb",
        "f,1,pvalb ",
        "f,2,Pvalb",
        "f,2,Sst",
        "f,3,Vip",
        "f,3,",
    ]
    table = read_annotation_table(write_table(tmp_path / "t.csv", lines))

    caplog.set_level(logging.INFO, logger=LOGGER)
    labels, raw, report = join_annotations(
        table,
        identifiers=["f"] * 4,
        sources=["f.nwb"] * 4,
        ids=range(4),
        label_column="subclass",
        merge={"sst": "inhibitory", "pvalb": "inhibitory"},
    )
    assert labels.tolist() == ["inhibitory", "inhibitory", "inhibitory", "vip"]
    assert report.duplicate_keys[0]["conflict"] is False

    labels, raw, report = join_annotations(
        table, identifiers=["f"] * 4, sources=["f.nwb"] * 4, ids=range(4), label_column="subclass"
    )
    assert labels.tolist() == ["", "pvalb", "", "vip"]
    assert raw.tolist() == ["", "Pvalb", "", "Vip"]
    assert report.matched == 4
    assert report.labelled == 2
    assert [key["id"] for key in report.duplicate_keys] == [0, 1, 2, 3]
    assert [key["conflict"] for key in report.duplicate_keys] == [True, False, True, False]
    assert report.duplicate_keys[0]["values"] == ["Pvalb", "Sst"]
    assert report.duplicate_keys[0]["lines"] == [2, 3]

    warnings = log_messages(caplog, logging.WARNING)
    assert "4 neurons appear in more than one row, 2 of them with conflicting values" in warnings[-1]


# --- invalid tables -----------------------------------------------------------------------------


def test_missing_key_column_names_file_and_line(tmp_path):
    path = write_table(tmp_path / "bad.csv", ["session,neuron,subclass", "f,0,Pvalb"])

    with pytest.raises(RecipeError) as error:
        read_annotation_table(path)

    message = str(error.value)
    assert str(path) in message
    assert "line 1" in message
    assert "'unit_id'" in message
    assert "'roi_id'" in message


def test_tab_content_in_csv_suggests_tsv(tmp_path):
    path = write_table(tmp_path / "bad.csv", ["session\tunit_id\tsubclass", "f\t0\tPvalb"])

    with pytest.raises(RecipeError, match=r"name the file \.tsv"):
        read_annotation_table(path)


def test_non_integer_id_names_line_and_value(tmp_path):
    path = write_table(tmp_path / "bad.csv", ["session,unit_id,subclass", "f,0,Pvalb", "f,1,Sst", "f,2.5,Vip"])

    with pytest.raises(DataError) as error:
        read_annotation_table(path)

    message = str(error.value)
    assert f"{path}, line 4" in message
    assert "'2.5'" in message
    assert "not an integer" in message


def test_empty_file_is_rejected(tmp_path):
    path = write_table(tmp_path / "empty.csv", ["", "  "])

    with pytest.raises(DataError) as error:
        read_annotation_table(path)

    assert str(path) in str(error.value)
    assert "empty" in str(error.value)


def test_wrong_field_count_names_line(tmp_path):
    path = write_table(tmp_path / "bad.tsv", ["session\tunit_id\tsubclass", "f\t0\tPvalb\textra"])

    with pytest.raises(DataError, match=r"line 2: row has 4 fields but the header has 3"):
        read_annotation_table(path)


def test_empty_session_names_line(tmp_path):
    path = write_table(tmp_path / "bad.csv", ["session,unit_id,subclass", " ,0,Pvalb"])

    with pytest.raises(DataError, match=r"line 2: empty 'session'"):
        read_annotation_table(path)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("session,unit_id,roi_id,x", "both 'unit_id' and 'roi_id'"),
        ("session,unit_id,x,x", "repeats the column 'x'"),
        ("session,unit_id", "no label column"),
        ("session,unit_id,plane,x", "'plane' column needs 'roi_id'"),
        ("unit_id,x", "no 'session' column"),
        ("session,unit_id,,x", "column 3 of the header has no name"),
    ],
)
def test_invalid_header_is_rejected(tmp_path, header, expected):
    path = write_table(tmp_path / "bad.csv", [header])

    with pytest.raises(RecipeError, match=expected):
        read_annotation_table(path)


def test_missing_file_and_unknown_label_column(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        read_annotation_table(tmp_path / "missing.csv")

    path = write_table(tmp_path / "t.csv", ["session,unit_id,subclass", "f,0,Pvalb"])
    with pytest.raises(RecipeError, match="label column 'class' not found; the table's label columns are subclass"):
        read_annotation_table(path, label_columns=["class"])

    table = read_annotation_table(path)
    with pytest.raises(RecipeError, match="label column 'region' not found"):
        join_annotations(table, identifiers=["f"], sources=["f.nwb"], ids=[0], label_column="region")


def test_mismatched_neuron_arrays_raise(tmp_path):
    table = read_annotation_table(write_table(tmp_path / "t.csv", ["session,unit_id,subclass", "f,0,Pvalb"]))

    with pytest.raises(ValueError, match="lengths 2, 2, 1 and 2"):
        join_annotations(table, identifiers=["f", "f"], sources=["a", "b"], ids=[0], planes=["p", "p"], label_column="subclass")


# --- JSON Schema -------------------------------------------------------------------------------


def test_schema_file_declares_row_keys():
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))

    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["type"] == "array"
    row = schema["$defs"]["row"]
    assert row["required"] == ["session"]
    assert [option["required"] for option in row["oneOf"]] == [["unit_id"], ["roi_id"]]
    assert set(row["properties"]) == {"session", "unit_id", "roi_id", "plane"}
    assert row["additionalProperties"]["type"] == "string"


def test_read_tables_validate_against_schema(tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    validator = jsonschema.Draft202012Validator(schema)
    validator.check_schema(schema)

    units = read_annotation_table(write_table(tmp_path / "u.csv", ["session,unit_id,subclass", "f,0,Pvalb", "f,1,"]))
    rois = read_annotation_table(write_table(tmp_path / "r.tsv", ["session\tplane\troi_id\ttype", "f\tp0\t2\tpyr"]))
    assert isinstance(units, AnnotationTable)
    assert validator.is_valid(units.to_records())
    assert validator.is_valid(rois.to_records())
    assert rois.to_records() == [{"session": "f", "roi_id": 2, "plane": "p0", "type": "pyr"}]


@pytest.mark.parametrize(
    "records",
    [
        [{"unit_id": 0, "subclass": "Pvalb"}],
        [{"session": "", "unit_id": 0, "subclass": "Pvalb"}],
        [{"session": "f", "unit_id": "0", "subclass": "Pvalb"}],
        [{"session": "f", "unit_id": 0, "roi_id": 0, "subclass": "Pvalb"}],
        [{"session": "f", "unit_id": 0, "subclass": 3}],
        [{"session": "f", "unit_id": 0}],
        [{"session": "f", "unit_id": 0, "plane": "p0", "x": "a"}],
        [{"session": "f", "roi_id": 0, "plane": "p0"}],
        [{"session": "f", "unit_id": 0, "x": "a"}, {"session": "f", "roi_id": 1, "x": "a"}],
    ],
)
def test_schema_rejects_invalid_rows(records):
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))

    assert not jsonschema.Draft202012Validator(schema).is_valid(records)


def test_normalise_label_collapses_whitespace():
    assert normalise_label("  L2/3\t IT ") == "l2/3 it"
    assert normalise_label("STRASSE") == normalise_label("straße")
    assert normalise_label(" \t ") == ""
