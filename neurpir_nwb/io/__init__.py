"""Readers of NWB neurodata families and writers of the NWB outputs."""

from neurpir_nwb.io.recording import Recording

__all__ = ["Recording"]
