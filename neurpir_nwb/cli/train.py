"""``neurpir-nwb train RECIPE``: run a recipe from NWB files to embeddings, probe and NWB outputs."""

from __future__ import annotations

import enum
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from neurpir_nwb.cli.base import ProgressBars, configure_logging, console, run_log
from neurpir_nwb.errors import NeurpirError
from neurpir_nwb.recipe import bundled_recipes

logger = logging.getLogger(__name__)


class Device(str, enum.Enum):
    """Devices a run can train on."""

    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


def train(
    recipe: Annotated[Path, typer.Argument(help=f"YAML recipe, or the name of a bundled recipe ({', '.join(bundled_recipes())}).", show_default=False)],
    source: Annotated[
        list[Path] | None,
        typer.Option(
            "--source",
            "-s",
            help="NWB file to train on; repeat for several. Overrides the recipe's sources.",
            show_default=False,
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Run directory. Overrides the recipe's output.dir (default runs/<name>).", show_default=False),
    ] = None,
    device: Annotated[
        Device | None,
        typer.Option(help="auto, cpu or cuda. Overrides the recipe's train.device.", show_default=False),
    ] = None,
    epochs: Annotated[
        int | None,
        typer.Option(min=1, help="Number of epochs. Overrides the recipe's train.epochs.", show_default=False),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace the results of an earlier run in the run directory.")
    ] = False,
    resume: Annotated[
        bool,
        typer.Option("--resume", help="Continue an interrupted run from <run directory>/model/checkpoint.pt, with the same recipe."),
    ] = False,
    nproc: Annotated[
        int,
        typer.Option(
            min=1,
            help="Train with this many processes on this machine (DistributedDataParallel: one per GPU with NCCL, or gloo on CPUs).",
        ),
    ] = 1,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")] = True,
) -> None:
    """Train an encoder on a recipe's NWB files and write embeddings, metrics, figures and NWB outputs.

    EXAMPLES

      neurpir-nwb train recipes/izhikevich.yaml

      neurpir-nwb train recipes/human-mtl-regions.yaml --source sub-4_ses-4_ecephys+image.nwb --output runs/mtl

      neurpir-nwb train recipes/izhikevich.yaml --nproc 4

      torchrun --nnodes 2 --nproc-per-node 8 --rdzv-id run1 --rdzv-backend c10d --rdzv-endpoint HOST:29400 -m neurpir_nwb train recipe.yaml
    """
    # Imported here so that --help and --version return without loading torch and pynwb.
    from neurpir_nwb import distributed
    from neurpir_nwb.pipeline import prepare_run_directory, run_recipe
    from neurpir_nwb.recipe import load_recipe

    loaded = load_recipe(recipe, sources=source, output=output)
    if device is not None:
        loaded.train.device = device.value
    if epochs is not None:
        loaded.train.epochs = epochs

    session = None
    if distributed.launched_by_torchrun():
        if nproc > 1:
            raise typer.BadParameter("torchrun starts the processes already; leave --nproc out under torchrun", param_hint="--nproc")
        if int(os.environ["RANK"]) != 0:
            _report_warnings_only()
        session = distributed.start_from_environment(loaded.train.device)
        if not session.is_main:
            _serve_training(session)
            return

    try:
        run_dir = prepare_run_directory(loaded, overwrite=overwrite, resume=resume)
        if nproc > 1 and session is None:
            session = distributed.start_local(nproc, loaded.train.device, _run_worker_process)
        with run_log(run_dir / "log.txt"):
            logger.info("recipe %s (sha256 %s)", recipe, loaded.sha256()[:12])
            try:
                summary = run_recipe(loaded, run_dir=run_dir, progress=ProgressBars(enabled=progress))
            except NeurpirError as error:
                logger.debug("run failed: %s", error)
                raise
    finally:
        if session is not None:
            distributed.finish(session)

    _print_summary(summary.metrics, summary.run_dir)


def _serve_training(session) -> None:
    """Train on every batch of inputs that rank 0 sends, until it sends None, then leave the group."""
    from neurpir_nwb import distributed
    from neurpir_nwb.pipeline import build_trainer

    try:
        while (payload := distributed.receive_training(session)) is not None:
            recipe, data, checkpoint = payload
            trainer = build_trainer(recipe, session=session)
            if checkpoint is not None:
                trainer.load_checkpoint(checkpoint)
            trainer.fit(data)
    except BaseException:
        session.healthy = False
        raise
    finally:
        distributed.finish(session)


def _report_warnings_only() -> None:
    """Log warnings and errors only: rank 0 reports progress and results for the whole group."""
    configure_logging(quiet=True)


def _run_worker_process(index: int, world_size: int, init_method: str, device: str, threads: int) -> None:
    """Run rank ``index + 1`` of a group that ``--nproc`` started: join it and train until rank 0 finishes."""
    import torch

    from neurpir_nwb import distributed

    _report_warnings_only()
    session = distributed.start(device, rank=index + 1, world_size=world_size, local_rank=index + 1, init_method=init_method)
    if session.backend == "gloo":
        torch.set_num_threads(threads)
    _serve_training(session)

    # NOTE: gloo's threads can abort a worker's interpreter shutdown ("terminate called without an active exception"), so a worker that finished leaves at once.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _print_summary(metrics: dict, run_dir: Path) -> None:
    """Print the headline numbers of a finished run on standard output, one block per model."""
    if "models" in metrics:
        for modality, model_metrics in metrics["models"].items():
            typer.echo(f"{modality} model:")
            _print_summary(model_metrics, Path(model_metrics["run_dir"]))
        return

    training = metrics["training"]
    typer.echo(f"run directory: {run_dir}")
    typer.echo(
        f"neurons: {metrics['n_neurons']}, windows: {metrics['n_windows']}, "
        f"training: {training['seconds']:.1f} s at {training['windows_per_s']:.1f} windows/s on {training['device']}"
    )
    if metrics.get("probe"):
        label = metrics["probe"]["label"]
        embedding = metrics["embedding"]
        baseline = metrics["baseline"] or metrics["baseline_pca"]
        baseline_name = "spike-train baseline" if metrics["baseline"] else "PCA baseline"
        typer.echo(
            f"probe on {label}: macro-F1 {embedding['macro_f1']:.3f}, balanced accuracy {embedding['balanced_accuracy']:.3f} "
            f"(chance {embedding['chance_balanced_accuracy']:.3f}); {baseline_name} macro-F1 {baseline['macro_f1']:.3f}, "
            f"balanced accuracy {baseline['balanced_accuracy']:.3f}"
        )
    retrieval = metrics.get("retrieval")
    if retrieval:
        typer.echo(f"retrieval of held-out windows: top-1 {retrieval['top1']:.3f} (chance {retrieval['chance']:.3f})")
    typer.echo(f"metrics: {run_dir / 'metrics.json'}, figures: {run_dir / 'figures'}, NWB outputs: {run_dir / 'nwb'}")
    console.print(f"total time: {metrics['timings_s']['total_s']:.1f} s", highlight=False)
