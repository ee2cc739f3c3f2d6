"""Generate the YAML of the ``ndx-neurpir`` NWB extension with pynwb's spec API.

The committed files ``schemas/ndx-neurpir/ndx-neurpir.namespace.yaml`` and
``ndx-neurpir.extensions.yaml`` are the output of this module. After changing the
spec below, regenerate them from a source checkout::

    python -m neurpir_nwb.nwb_extension.create_spec

A test compares the committed files with what this module generates. Keep changes
additive (new optional attributes or columns, with a new namespace version): a
reader that loads an older spec than the one a file caches drops what it does not know.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pynwb.spec import NWBAttributeSpec, NWBDatasetSpec, NWBGroupSpec, NWBNamespaceBuilder, export_spec

from neurpir_nwb.nwb_extension import NAMESPACE, NAMESPACE_VERSION, TABLE_TYPE

#: Where the committed YAML lives in a source checkout: <repository>/schemas/ndx-neurpir.
DEFAULT_OUTPUT_DIR = Path(__file__).resolve().parents[2] / "schemas" / NAMESPACE


def _text_attribute(name: str, doc: str, *, required: bool = True) -> NWBAttributeSpec:
    return NWBAttributeSpec(name=name, doc=doc, dtype="text", required=required)


def table_spec() -> NWBGroupSpec:
    """Return the spec of ``NeuronEmbeddingTable``, a DynamicTable with one row per neuron."""
    attributes = [
        NWBAttributeSpec(
            name="embedding_dim",
            doc="Number of dimensions of each embedding: the second dimension of the embedding column.",
            dtype="int32",
        ),
        _text_attribute("model_name", "Name of the model that computed the embeddings: the name of the recipe it was trained with."),
        _text_attribute("neurpir_version", "Version of neurpir-nwb that wrote this table."),
        _text_attribute(
            "recipe_sha256",
            "sha256 of the training recipe with every default filled in, serialised as canonical JSON.",
        ),
        _text_attribute(
            "model_sha256",
            "sha256 of the model's weights file (weights.pt), which identifies the encoder that computed the embeddings.",
            required=False,
        ),
        _text_attribute(
            "label_name",
            "Name of the label that the probe predicts, such as 'region' or 'cell_type'.",
            required=False,
        ),
        NWBAttributeSpec(
            name="class_names",
            doc="Names of the probe's classes. Column j of class_probabilities is the probability of class_names[j].",
            dtype="text",
            dims=["num_classes"],
            shape=[None],
            required=False,
        ),
        _text_attribute("source_nwb_version", "nwb_version of the source file that this file is a copy of."),
        _text_attribute(
            "output_nwb_version",
            "nwb_version of this file as written. It is newer than source_nwb_version when the writer's "
            "NWB schema is newer than the source's, because appending with pynwb upgrades the file's schema.",
        ),
        _text_attribute(
            "provenance",
            "Full provenance as a JSON object: the attributes above, the training sources (NWB file identifiers, "
            "and DANDI dandiset id, version and asset id when known), the source file of these rows, the "
            "command that wrote them and the software versions.",
        ),
    ]
    columns = [
        NWBDatasetSpec(
            name="unit",
            neurodata_type_inc="DynamicTableRegion",
            doc=(
                "Row of the source table (the Units table or a PlaneSegmentation) that each row describes. "
                "Absent when the neurons are plain TimeSeries, which the timeseries column names instead."
            ),
            quantity="?",
        ),
        NWBDatasetSpec(
            name="timeseries",
            neurodata_type_inc="VectorData",
            doc="Name of the TimeSeries in /acquisition that each row describes, for neurons stored as plain TimeSeries.",
            dtype="text",
            quantity="?",
        ),
        NWBDatasetSpec(
            name="embedding",
            neurodata_type_inc="VectorData",
            doc="Time-invariant embedding of each neuron, the mean of the encoder's output over the neuron's windows.",
            dtype="float32",
            dims=["num_rows", "embedding_dim"],
            shape=[None, None],
        ),
        NWBDatasetSpec(
            name="predicted_label",
            neurodata_type_inc="VectorData",
            doc="Label that the probe predicts from the embedding, or an empty string where it made no prediction.",
            dtype="text",
            quantity="?",
        ),
        NWBDatasetSpec(
            name="class_probabilities",
            neurodata_type_inc="VectorData",
            doc="Class probabilities of the probe. Column j is the probability of class_names[j].",
            dtype="float32",
            dims=["num_rows", "num_classes"],
            shape=[None, None],
            quantity="?",
        ),
    ]
    return NWBGroupSpec(
        neurodata_type_def=TABLE_TYPE,
        neurodata_type_inc="DynamicTable",
        default_name="embeddings",
        doc=(
            "One row per recorded neuron: its time-invariant embedding learned by NeurPIR (VICReg contrastive "
            "learning on time windows of the neuron and its spatial neighbours), a link to the neuron's row in "
            "the source table, and the probe's predicted label and class probabilities. The id column holds "
            "the ids of the linked rows (unit ids or ROI ids)."
        ),
        attributes=attributes,
        datasets=columns,
    )


def namespace_builder() -> NWBNamespaceBuilder:
    """Return the builder of the ``ndx-neurpir`` namespace, which includes the NWB core namespace."""
    builder = NWBNamespaceBuilder(
        name=NAMESPACE,
        version=NAMESPACE_VERSION,
        doc="Per-neuron embeddings and cell-type or brain-region predictions written by neurpir-nwb.",
        author=["neurpir-nwb developers"],
    )
    builder.include_namespace("core")
    return builder


def write_spec(output_dir: str | Path = DEFAULT_OUTPUT_DIR) -> list[Path]:
    """Write the namespace and extensions YAML into ``output_dir`` and return their paths."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    export_spec(namespace_builder(), [table_spec()], str(output_dir))
    return [output_dir / f"{NAMESPACE}.namespace.yaml", output_dir / f"{NAMESPACE}.extensions.yaml"]


def main(argv: list[str] | None = None) -> None:
    """Write the YAML, by default into the checkout's ``schemas/ndx-neurpir`` folder."""
    parser = argparse.ArgumentParser(description=f"Generate the YAML of the {NAMESPACE} NWB extension.")
    parser.add_argument(
        "--output",
        type=Path,
        default=DEFAULT_OUTPUT_DIR,
        help=f"folder to write the YAML to (default: {DEFAULT_OUTPUT_DIR})",
    )
    arguments = parser.parse_args(argv)
    for path in write_spec(arguments.output):
        print(path)


if __name__ == "__main__":
    main()
