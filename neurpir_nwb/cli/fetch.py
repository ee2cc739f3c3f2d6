"""``neurpir-nwb fetch REF``: list or download the assets of a Dandiset version, verified by their digests."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.console import Console
from rich.filesize import decimal
from rich.logging import RichHandler
from rich.table import Table

from neurpir_nwb.cli.base import ProgressBars, console

if TYPE_CHECKING:
    from neurpir_nwb.dandi import AssetInfo

logger = logging.getLogger(__name__)


def show_client_warnings() -> None:
    """Show the dandi client's warnings, such as its retries, but not its errors, which fetch reports in one line."""
    handler = RichHandler(console=console, show_path=False, rich_tracebacks=False, markup=False)
    handler.setLevel(logging.WARNING)
    handler.addFilter(lambda record: record.levelno < logging.ERROR)
    client_logger = logging.getLogger("dandi")
    client_logger.handlers = [handler]
    client_logger.propagate = False


def print_asset_table(label: str, assets: list[AssetInfo]) -> None:
    """Print the assets' paths and sizes, and their total, as a table on standard output."""
    output = Console(soft_wrap=False, highlight=False)
    if not output.is_terminal:
        # Redirected output is read in files and logs, where rich's default of 80 columns would fold paths.
        output.width = 200

    total = sum(asset.size for asset in assets)
    table = Table(title=f"{label}: {len(assets)} assets", show_footer=True, title_justify="left")
    table.add_column("path", footer="total", overflow="fold")
    table.add_column("size", footer=decimal(total), justify="right", no_wrap=True)
    table.add_column("bytes", footer=f"{total:,}", justify="right", no_wrap=True)
    for asset in assets:
        table.add_row(asset.path, decimal(asset.size), f"{asset.size:,}")
    output.print(table)


def fetch(
    ref: Annotated[
        str,
        typer.Argument(
            help="Dandiset: DANDI:<6-digit id>, optionally followed by /draft or /<published version>.",
            show_default=False,
        ),
    ],
    path: Annotated[
        Optional[list[str]],
        typer.Option(
            "--path",
            "-p",
            help="Glob of asset paths to select, such as 'sub-*/*.nwb'; * stays within one folder and ** crosses "
            "folders. Repeat for several globs. Default: every asset.",
            show_default=False,
        ),
    ] = None,
    dest: Annotated[
        Optional[Path],
        typer.Option(
            "--dest",
            "-d",
            help="Folder for downloads; files go to DEST/<dandiset id>/<asset path>. Default: ./dandisets.",
            show_default=False,
        ),
    ] = None,
    list_only: Annotated[
        bool, typer.Option("--list", help="Print the selected assets and their total size, and download nothing.")
    ] = False,
    jobs: Annotated[int, typer.Option("--jobs", "-j", min=1, help="Number of files downloaded in parallel.")] = 1,
    api_url: Annotated[
        Optional[str],
        typer.Option(
            "--api-url",
            help="REST API URL of the DANDI instance. Default: $NEURPIR_DANDI_API_URL, else https://api.dandiarchive.org/api.",
            show_default=False,
        ),
    ] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
) -> None:
    """Download the assets of a Dandiset version, or list them with --list.

    Without a version, the latest published version is used, and the draft when nothing is published. Each file is verified against the dandi-etag (and SHA-256, when known) of its metadata before it is moved into place. An interrupted download resumes when the command runs again, and files verified before are skipped. DEST/<dandiset id>/neurpir-manifest.json records the version, the files and their digests.

    The local paths are printed, one per line.

    EXAMPLES

      neurpir-nwb fetch DANDI:000021 --list

      neurpir-nwb fetch DANDI:000021/0.210913.1639 --path 'sub-*/*.nwb' --dest data --jobs 4
    """
    # Imported here so that the other commands do not pay for loading the dandi client.
    from neurpir_nwb import dandi

    show_client_warnings()
    dandi_ref = dandi.parse_dandi_ref(ref)
    globs = path or []

    if list_only:
        version, assets = dandi.list_assets(dandi_ref, globs, api_url=api_url, metadata=False)
        print_asset_table(f"DANDI:{dandi_ref.dandiset_id}/{version}", assets)
        return

    result = dandi.fetch(
        dandi_ref,
        globs,
        dest if dest is not None else dandi.DEFAULT_DEST,
        api_url=api_url,
        jobs=jobs,
        progress=ProgressBars(enabled=progress, count_bytes=True),
    )
    logger.info(
        "DANDI:%s/%s: %d files downloaded, %d already verified; manifest %s",
        result.dandiset_id,
        result.version,
        len(result.downloaded),
        len(result.skipped),
        result.manifest_path,
    )
    for local_path in result.paths:
        typer.echo(str(local_path))
