"""neurpir-nwb: time-invariant per-neuron embeddings from NWB recordings.

The package learns one embedding per recorded neuron with NeurPIR (contrastive
learning with VICReg on windows of the neuron and its spatial neighbours), predicts
cell type or brain region from the embeddings, and writes both back as NWB
processing modules. Start from :func:`neurpir_nwb.recipe.load_recipe` and
:func:`neurpir_nwb.pipeline.run_recipe`, or from the ``neurpir-nwb`` command.
"""

from neurpir_nwb._version import __version__

__all__ = ["__version__"]
