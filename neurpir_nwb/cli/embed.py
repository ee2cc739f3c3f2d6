"""``neurpir-nwb embed MODEL_DIR INPUT... -o OUTDIR``: apply a trained model to NWB files it never saw."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from neurpir_nwb.cli.base import ProgressBars
from neurpir_nwb.cli.train import Device
from neurpir_nwb.progress import count_noun


def embed(
    model_dir: Annotated[
        Path,
        typer.Argument(help="Model directory of a finished run (runs/<name>/model), or the run directory itself.", show_default=False),
    ],
    inputs: Annotated[
        list[Path],
        typer.Argument(help="NWB files to embed, or folders whose *.nwb files are embedded.", show_default=False),
    ],
    output: Annotated[
        Path,
        typer.Option("--output", "-o", help="Folder for the output NWB files, one per input, named like it.", show_default=False),
    ],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace output files of an earlier run.")] = False,
    device: Annotated[Device, typer.Option(help="auto, cpu or cuda: where the encoder runs.")] = Device.auto,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")] = True,
) -> None:
    """Embed the neurons of new NWB files with a trained encoder, predict labels with its probe, and write NWB outputs.

    The inputs are read and segmented with the model's own settings. Inputs of another
    modality than the model's training data, or traces sampled too slowly for its bins,
    are rejected with the fix.

    EXAMPLES

      neurpir-nwb embed runs/izhikevich/model new_animal.nwb -o embedded/

      neurpir-nwb embed runs/mtl/model sessions/ -o embedded/ --overwrite
    """
    # Imported here so that --help and --version return without loading torch and pynwb.
    from neurpir_nwb.embed import embed_files

    summary = embed_files(model_dir, inputs, output, overwrite=overwrite, device=device.value, progress=ProgressBars(enabled=progress))

    embeddings = summary.embeddings
    typer.echo(f"model: {summary.model_dir}")
    typer.echo(f"embedded {embeddings.sizes['neuron']} neurons of {count_noun(len(summary.outputs), 'NWB file')}")
    for path in summary.outputs:
        typer.echo(f"  {path}")
    typer.echo(f"NWB outputs: {output}")
