"""The ``ndx-neurpir`` NWB extension: the type of the tables that neurpir-nwb writes.

``NeuronEmbeddingTable`` is a DynamicTable with one row per neuron (see
:mod:`neurpir_nwb.nwb_extension.create_spec` for its columns and attributes). Its YAML
is committed in ``schemas/ndx-neurpir`` and cached in every file written, so readers
open outputs with ``NWBHDF5IO(path, load_namespaces=True)`` and need no import of
this package.

The YAML is found in the wheel layout (``neurpir_nwb/schemas/ndx-neurpir``, where the
wheel build copies ``schemas``) and in the source layout (``<checkout>/schemas/ndx-neurpir``)
used by editable installs.
"""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = [
    "NAMESPACE",
    "NAMESPACE_VERSION",
    "TABLE_TYPE",
    "load_namespace",
    "namespace_path",
    "neuron_embedding_table_class",
]

NAMESPACE = "ndx-neurpir"
NAMESPACE_VERSION = "0.1.0"
TABLE_TYPE = "NeuronEmbeddingTable"

_PACKAGE_DIR = Path(__file__).resolve().parents[1]

#: Folders searched for the YAML, in order: the wheel layout, then the source checkout.
SPEC_DIRS = (_PACKAGE_DIR / "schemas" / NAMESPACE, _PACKAGE_DIR.parent / "schemas" / NAMESPACE)


def namespace_path() -> Path:
    """Return the path of ``ndx-neurpir.namespace.yaml``.

    Raises
    ------
    FileNotFoundError
        When neither the wheel layout nor the source layout contains it, which means
        the installation is incomplete.
    """
    for folder in SPEC_DIRS:
        path = folder / f"{NAMESPACE}.namespace.yaml"
        if path.is_file():
            return path
    searched = ", ".join(str(folder) for folder in SPEC_DIRS)
    raise FileNotFoundError(
        f"{NAMESPACE}.namespace.yaml not found in {searched}; the installation is incomplete. "
        "Reinstall neurpir-nwb, or run `python -m neurpir_nwb.nwb_extension.create_spec` in a source checkout"
    )


def load_namespace() -> None:
    """Load the extension into pynwb's global type map, once per process."""
    import pynwb

    if NAMESPACE in pynwb.available_namespaces():
        loaded = pynwb.get_type_map().namespace_catalog.get_namespace(NAMESPACE).version
        if loaded != NAMESPACE_VERSION:
            logger.warning(
                "pynwb has already loaded %s %s, not the %s that this version of neurpir-nwb writes; "
                "outputs get the loaded version's spec",
                NAMESPACE,
                loaded,
                NAMESPACE_VERSION,
            )
        return
    pynwb.load_namespaces(str(namespace_path()))


def neuron_embedding_table_class() -> type:
    """Return the pynwb class of ``NeuronEmbeddingTable``, loading the extension first when needed."""
    import pynwb

    load_namespace()
    return pynwb.get_class(TABLE_TYPE, NAMESPACE)
