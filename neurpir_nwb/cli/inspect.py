"""``neurpir-nwb inspect PATH_OR_DANDI_REF...``: what a recipe would load from NWB files, and every data problem."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Optional

import typer

from neurpir_nwb.errors import SourceError

logger = logging.getLogger(__name__)


def inspect(
    sources: Annotated[
        Optional[list[str]],
        typer.Argument(
            help="NWB files, folders of NWB files (searched recursively), or DANDI references such as "
            "DANDI:000021/draft, whose assets are streamed. Default: the NWB file and DANDI sources of --recipe.",
            show_default=False,
        ),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the reports as JSON on standard output.")] = False,
    recipe: Annotated[
        Optional[Path],
        typer.Option(
            "--recipe",
            "-r",
            help="Recipe whose problem policy, reader options (units, ophys, timeseries) and labels apply. "
            "Default: the default policy, and every kind of table the file has.",
            show_default=False,
        ),
    ] = None,
    path: Annotated[
        Optional[list[str]],
        typer.Option(
            "--path",
            "-p",
            help="Glob of the asset paths of DANDI references, such as 'sub-*/*.nwb'; repeat for several. Default: every asset.",
            show_default=False,
        ),
    ] = None,
    api_url: Annotated[
        Optional[str],
        typer.Option(
            "--api-url",
            help="REST API URL of the DANDI instance. Default: $NEURPIR_DANDI_API_URL, else https://api.dandiarchive.org/api.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Show what a recipe would load from NWB files, and every data problem, reading lazily.

    For each file: the modality, the neurons of each table with their time span and rate, the labels and positions found, and each data problem with its count, the neurons it affects and what the problem policy does with it.

    Exit status: 0 when every file is loadable, 1 when a file is loadable but the policy raises for one of its problems (marked raise), 2 when a file cannot be loaded.

    EXAMPLES

      neurpir-nwb inspect sub-4_ses-4_ecephys+image.nwb

      neurpir-nwb inspect data/ --recipe recipes/human-mtl-regions.yaml --json

      neurpir-nwb inspect DANDI:000021/0.210913.1639 --path 'sub-*/*.nwb'
    """
    # Imported here so that --help returns without loading pynwb.
    from neurpir_nwb.inspect import exit_status, format_report, inspect_recipe_sources, inspect_sources
    from neurpir_nwb.recipe import load_recipe

    loaded = load_recipe(recipe) if recipe is not None else None
    if sources:
        reports = inspect_sources(sources, recipe=loaded, globs=path or [], api_url=api_url)
    elif loaded is not None:
        reports = inspect_recipe_sources(loaded)
        if not reports:
            raise SourceError(f"recipe {recipe} has no NWB file or DANDI sources to inspect (only simulated ones); give NWB files")
    else:
        raise typer.BadParameter("give at least one NWB file, folder or DANDI reference, or a recipe with --recipe")

    if json_output:
        document = {"exit_status": exit_status(reports), "files": [report.to_dict() for report in reports]}
        typer.echo(json.dumps(document, indent=2))
    else:
        for report in reports:
            if report.loadable:
                typer.echo("\n".join(format_report(report)))

    failed = [report for report in reports if not report.loadable]
    if failed:
        for report in failed[1:]:
            logger.error("%s", report.error)
        more = f" (and {len(failed) - 1} more files cannot be loaded)" if len(failed) > 1 else ""
        raise SourceError(f"{failed[0].error}{more}")
    if exit_status(reports):
        raise typer.Exit(code=1)
