"""neurpir-nwb: time-invariant per-neuron embeddings from NWB recordings.

The package learns one embedding per recorded neuron with NeurPIR (contrastive
learning with VICReg on windows of the neuron and its spatial neighbours), predicts
cell type or brain region from the embeddings, and writes both back as NWB
processing modules. Start from :func:`neurpir_nwb.recipe.load_recipe` and
:func:`neurpir_nwb.pipeline.run_recipe`, or from the ``neurpir-nwb`` command.
:func:`read_embeddings` reads the NWB outputs back as one xarray Dataset.
"""

from typing import Any

from neurpir_nwb._version import __version__

__all__ = ["__version__", "read_embeddings"]


def __getattr__(name: str) -> Any:
    # Imported on first use, so that `import neurpir_nwb` and the CLI's --help stay fast.
    if name == "read_embeddings":
        from neurpir_nwb.io.embeddings import read_embeddings

        return read_embeddings
    raise AttributeError(f"module 'neurpir_nwb' has no attribute {name!r}")
