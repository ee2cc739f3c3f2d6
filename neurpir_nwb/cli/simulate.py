"""``neurpir-nwb simulate OUT_DIR``: write simulated animals with known cell types as NWB files."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from neurpir_nwb.cli.base import ProgressBars
from neurpir_nwb.simulate import SimulationSettings, simulate_dataset

logger = logging.getLogger(__name__)

_DEFAULTS = SimulationSettings()


def simulate(
    out_dir: Annotated[
        Path, typer.Argument(help="Folder for the NWB files, one sim-animal-<seed>.nwb per animal.", show_default=False)
    ],
    animals: Annotated[int, typer.Option("--animals", min=1, help="Number of animals (networks) to simulate.")] = 3,
    first_seed: Annotated[
        int, typer.Option("--first-seed", min=0, help="Seed of the first animal; the others take the next seeds.")
    ] = 0,
    neurons: Annotated[
        int, typer.Option("--neurons", min=1, help="Number of neurons per animal.")
    ] = _DEFAULTS.n_neurons,
    duration_s: Annotated[
        float, typer.Option("--duration-s", min=0.001, help="Recorded duration per animal, in seconds.")
    ] = _DEFAULTS.duration_s,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Simulate again and replace existing files. Without it, files with the same seed and settings are kept.",
        ),
    ] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
) -> None:
    """Simulate networks of Izhikevich neurons of known types and write one NWB file per animal.

    Each animal is a network with its own seed, so positions, types, parameters, synapses and input differ between animals.

    Each unit's ground-truth type (RS, IB, CH, FS or LTS) is in the Units table's cell_type column. The paths of the files are printed, one per line.

    EXAMPLES

      neurpir-nwb simulate data/izhikevich

      neurpir-nwb simulate data/izhikevich --animals 5 --neurons 1000 --duration-s 600
    """
    settings = SimulationSettings(n_neurons=neurons, duration_s=duration_s)
    seeds = list(range(first_seed, first_seed + animals))
    logger.info("simulating %d animals (seeds %d to %d) into %s", animals, seeds[0], seeds[-1], out_dir)

    paths = simulate_dataset(out_dir, settings, seeds, overwrite=overwrite, progress=ProgressBars(enabled=progress))

    for path in paths:
        typer.echo(str(path))
