"""The ``neurpir-nwb`` command-line program: one module per command."""

from neurpir_nwb.cli.app import app, main

__all__ = ["app", "main"]
