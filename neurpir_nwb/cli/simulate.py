"""``neurpir-nwb simulate OUT_DIR``: write simulated animals with known cell types as NWB files."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Annotated

import typer

from neurpir_nwb.cli.base import ProgressBars
from neurpir_nwb.errors import RecipeError
from neurpir_nwb.progress import count_noun
from neurpir_nwb.simulate import SimulationSettings, read_simulation_notes, simulate_dataset

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
        int | None,
        typer.Option("--neurons", min=1, help=f"Number of neurons per animal. [default: {_DEFAULTS.n_neurons}, or that of --like]", show_default=False),
    ] = None,
    duration_s: Annotated[
        float | None,
        typer.Option(
            "--duration-s", min=0.001, help=f"Recorded duration per animal, in seconds. [default: {_DEFAULTS.duration_s:g}, or that of --like]", show_default=False
        ),
    ] = None,
    like: Annotated[
        Path | None,
        typer.Option(
            "--like",
            exists=True,
            dir_okay=False,
            help=(
                "A simulated NWB file whose settings the new animals take (layout, jitter, fast input and coupling, "
                "size and duration), so that they come from the same distribution. --neurons and --duration-s override it."
            ),
            show_default=False,
        ),
    ] = None,
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

      neurpir-nwb simulate data/new-animal --animals 1 --first-seed 7 --like runs/izhikevich-coupling/simulated/sim-animal-0.nwb
    """
    settings = _settings_like(like) if like is not None else _DEFAULTS
    if neurons is not None:
        settings = dataclasses.replace(settings, n_neurons=neurons)
    if duration_s is not None:
        settings = dataclasses.replace(settings, duration_s=duration_s)
    seeds = list(range(first_seed, first_seed + animals))
    logger.info("simulating %s (seeds %d to %d) into %s", count_noun(animals, "animal"), seeds[0], seeds[-1], out_dir)

    paths = simulate_dataset(out_dir, settings, seeds, overwrite=overwrite, progress=ProgressBars(enabled=progress))

    for path in paths:
        typer.echo(str(path))


def _settings_like(path: Path) -> SimulationSettings:
    """Return the simulation settings recorded in a simulated NWB file, or raise RecipeError."""
    notes = read_simulation_notes(path)
    if notes is None or not isinstance(notes.get("settings"), dict):
        raise RecipeError(
            f"{path}: no simulation settings found; give a file written by 'neurpir-nwb simulate' or by a recipe's "
            "simulate source (a run directory's simulated/ folder)"
        )
    return SimulationSettings.from_dict(notes["settings"])
