"""Encoder, projector and losses of NeurPIR."""

from neurpir_nwb.model.encoder import EncoderConfig, NeurPIREncoder
from neurpir_nwb.model.projector import Projector
from neurpir_nwb.model.rotary import RotaryEmbedding, apply_rotary
from neurpir_nwb.model.vicreg import VICRegLoss

__all__ = ["EncoderConfig", "NeurPIREncoder", "Projector", "RotaryEmbedding", "VICRegLoss", "apply_rotary"]
