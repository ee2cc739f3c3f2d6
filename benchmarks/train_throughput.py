"""Target embeddings per second for training and inference, in per-target and population batching.

Two encoder sizes run in one process, each in both batchings:

- published: width 256, 8 heads, 2 temporal and 2 spatio-temporal layers, 32 patches
  of 16 bins, 8 neighbours, 32 distance bins;
- default: the encoder of ``recipes/izhikevich.yaml``.

The data are one simulated recording of Poisson spike trains (5 Hz) of neurons at
random positions in a 200 um cube, segmented like real data. Training runs the real
:class:`~neurpir_nwb.train.Trainer` for a few steps after one warm-up step, and each
step's two views count as two target embeddings per target. Inference runs
:func:`~neurpir_nwb.train.embed_neurons` over the first windows of every neuron. A
population step contains every neuron of one window; a per-target step draws
``--per-target-batch`` neurons. Each measurement is repeated ``--rounds`` times,
alternating the batchings, and the fastest round counts, because other processes on
a shared machine slow single rounds. On a busy machine, ``--clock cpu`` measures
process CPU time on one thread instead of wall time on all threads: it ignores time
spent waiting for other processes.

Usage::

    python benchmarks/train_throughput.py                # table
    python benchmarks/train_throughput.py --json         # one JSON object
    python benchmarks/train_throughput.py --precision bf16 --steps 4
    python benchmarks/train_throughput.py --device cuda --flops --peak-tflops 989   # as benchmarks/gpu_check.sh runs it

With ``--flops``, the operations of one target embedding are counted with
``torch.utils.flop_counter`` (matrix products and attention) in a training step and
in inference, and multiplied by the rates into the achieved TFLOP/s.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from neurpir_nwb.io.recording import Recording
from neurpir_nwb.model import EncoderConfig, NeurPIREncoder, Projector, VICRegLoss
from neurpir_nwb.pipeline import encoder_config
from neurpir_nwb.recipe import load_recipe
from neurpir_nwb.segments import SegmentSettings, build_segment_set
from neurpir_nwb.train import TrainConfig, Trainer, WindowData, embed_neurons

REPOSITORY = Path(__file__).resolve().parents[1]
BATCHINGS = ("population", "per-target")

#: Bin width of the simulated recording, in seconds.
BIN_SIZE_S = 0.01

#: The clock that rates divide by: wall time, or this process's CPU time with ``--clock cpu``.
clock = time.perf_counter

#: Device of the encoder: ``--device``.
DEVICE = "cpu"


@dataclasses.dataclass
class Size:
    """One encoder size with its neighbourhood and projector."""

    name: str
    encoder: EncoderConfig
    neighbours: int
    projector: list[int]


def published_size() -> Size:
    encoder = EncoderConfig(bins_per_patch=16, patches=32, dim=256, heads=8, temporal_layers=2, spatiotemporal_layers=2, distance_bins=32)
    return Size("published", encoder, neighbours=8, projector=[256, 256])


def default_size() -> Size:
    recipe = load_recipe(REPOSITORY / "recipes" / "izhikevich.yaml")
    encoder = encoder_config(recipe)
    return Size("default", encoder, neighbours=recipe.segments.neighbours, projector=list(recipe.model.projector))


def simulated_windows(size: Size, n_neurons: int, n_windows: int, seed: int = 0) -> WindowData:
    """Segment one recording of Poisson spike trains, with every window valid."""
    rng = np.random.default_rng(seed)
    window_s = BIN_SIZE_S * size.encoder.bins_per_patch * size.encoder.patches
    duration_s = window_s * n_windows
    trains = [np.sort(rng.uniform(0.0, duration_s, rng.poisson(5.0 * duration_s))) for _ in range(n_neurons)]
    trains[0] = np.concatenate([[0.0], trains[0], [duration_s]])
    recording = Recording(
        path=Path("/benchmark/simulated.nwb"),
        identifier="benchmark",
        session="benchmark",
        subject="benchmark",
        table="units",
        unit_ids=np.arange(n_neurons),
        rows=np.arange(n_neurons),
        spike_times=trains,
        positions=rng.uniform(0.0, 200.0, (n_neurons, 3)),
        position_source="unit_xyz",
        labels={},
        t_start_s=0.0,
        t_stop_s=duration_s,
        nwb_version="2.8.0",
    )
    settings = SegmentSettings(BIN_SIZE_S, size.encoder.bins_per_patch, size.encoder.patches, size.neighbours, size.encoder.distance_bins)
    return WindowData(build_segment_set([recording], settings))


def build_trainer(size: Size, batching: str, batch_size: int, steps: int, precision: str, compile_model: bool) -> Trainer:
    torch.manual_seed(0)
    encoder = NeurPIREncoder(dataclasses.replace(size.encoder, batching=batching))
    projector = Projector(encoder.config.output_dim, size.projector, parts=2 if encoder.config.own_embedding else 1)
    config = TrainConfig(
        epochs=1, steps_per_epoch=steps, batch_size=batch_size, lr=1e-4, device=DEVICE, precision=precision, compile=compile_model, checkpoint_steps=0
    )
    return Trainer(encoder, projector, VICRegLoss(), config)


def train_rate(data: WindowData, size: Size, batching: str, batch_size: int, steps: int, precision: str, compile_model: bool) -> float:
    """Return target embeddings per second of training steps after the first, two per target and step."""
    trainer = build_trainer(size, batching, batch_size, steps + 1, precision, compile_model)
    finished = []
    trainer.fit(data, on_step=lambda step, total, metrics: finished.append(clock()))
    targets_per_step = data.n_neurons if batching == "population" else batch_size
    return 2 * targets_per_step * steps / (finished[-1] - finished[0])


def infer_rate(data: WindowData, size: Size, batching: str, batch_size: int, n_windows: int, precision: str) -> float:
    """Return target embeddings per second of :func:`embed_neurons` over windows 1 to ``n_windows``, after a warm-up on window 0."""
    torch.manual_seed(0)
    encoder = NeurPIREncoder(dataclasses.replace(size.encoder, batching=batching))
    every_window = data.valid.copy()
    data.valid[:] = False
    data.valid[:, 0] = True
    embed_neurons(encoder, data, batch_size=batch_size, device=DEVICE, precision=precision, batching=batching)

    data.valid[:] = False
    data.valid[:, 1 : 1 + n_windows] = True
    start = clock()
    embed_neurons(encoder, data, batch_size=batch_size, device=DEVICE, precision=precision, batching=batching)
    seconds = clock() - start
    data.valid[:] = every_window
    return data.n_neurons * n_windows / seconds


def flops_per_target(data: WindowData, size: Size, batching: str, batch_size: int, precision: str) -> dict[str, float]:
    """Count the floating-point operations of one target embedding, in a training step (forward and backward) and in inference."""
    from torch.utils.flop_counter import FlopCounterMode

    trainer = build_trainer(size, batching, batch_size, 1, precision, False)
    with FlopCounterMode(display=False) as counter:
        trainer.fit(data)
    targets = data.n_neurons if batching == "population" else batch_size
    train = counter.get_total_flops() / (2 * targets)

    torch.manual_seed(0)
    encoder = NeurPIREncoder(dataclasses.replace(size.encoder, batching=batching))
    every_window = data.valid.copy()
    data.valid[:] = False
    data.valid[:, 0] = True
    with FlopCounterMode(display=False) as counter:
        embed_neurons(encoder, data, batch_size=batch_size, device=DEVICE, precision=precision, batching=batching)
    data.valid[:] = every_window
    return {"train_flops": train, "infer_flops": counter.get_total_flops() / data.n_neurons}


def key(batching: str) -> str:
    """Return the JSON key of a batching: per_target or population."""
    return batching.replace("-", "_")


def measure(size: Size, arguments: argparse.Namespace) -> tuple[dict, dict]:
    """Measure both batchings of one size; return the rates and the settings behind them."""
    n_neurons = arguments.population
    data = simulated_windows(size, n_neurons, n_windows=8)
    per_target_batch = arguments.per_target_batch
    infer_windows = {"population": 4, "per-target": 1}
    rates = {key(batching): {"train_per_s": 0.0, "infer_per_s": 0.0} for batching in BATCHINGS}
    for _ in range(arguments.rounds):
        for batching in BATCHINGS:
            batch_size = n_neurons if batching == "population" else per_target_batch
            rate = train_rate(data, size, batching, batch_size, arguments.steps, arguments.precision, arguments.compile)
            rates[key(batching)]["train_per_s"] = max(rates[key(batching)]["train_per_s"], rate)
        for batching in BATCHINGS:
            infer_batch = n_neurons if batching == "population" else per_target_batch
            rate = infer_rate(data, size, batching, infer_batch, infer_windows[batching], arguments.precision)
            rates[key(batching)]["infer_per_s"] = max(rates[key(batching)]["infer_per_s"], rate)

    if arguments.flops:
        for batching in BATCHINGS:
            batch_size = n_neurons if batching == "population" else per_target_batch
            counts = flops_per_target(data, size, batching, batch_size, arguments.precision)
            entry = rates[key(batching)]
            entry.update(counts)
            entry["train_tflops"] = entry["train_per_s"] * counts["train_flops"] / 1e12
            entry["infer_tflops"] = entry["infer_per_s"] * counts["infer_flops"] / 1e12

    details = {
        "neurons_per_window": n_neurons,
        "targets_per_step": {"population": n_neurons, "per_target": per_target_batch},
        "timed_train_steps": arguments.steps,
        "warm_up_steps": 1,
        "inference_windows_per_neuron": infer_windows,
        "rounds": arguments.rounds,
    }
    return rates, details


def device_description() -> str:
    processor = platform.processor() or platform.machine()
    model = ""
    if Path("/proc/cpuinfo").is_file():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"cpu: {model or processor}, {os.cpu_count()} cores"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--steps", type=int, default=2, help="timed training steps per measurement, after one warm-up step")
    parser.add_argument("--rounds", type=int, default=2, help="repeats of every measurement; the fastest counts")
    parser.add_argument(
        "--population", type=int, default=200, help="neurons in the simulated recording, the targets of a population step (the default recipe's animals have 200)"
    )
    parser.add_argument("--per-target-batch", type=int, default=64, help="targets per per-target step and per inference pass (the published batch is 64)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="autocast precision of training and inference")
    parser.add_argument("--compile", action="store_true", help="compile the training model with torch.compile")
    parser.add_argument("--sizes", nargs="+", choices=("published", "default"), default=["published", "default"], help="sizes to measure")
    parser.add_argument(
        "--clock", choices=("wall", "cpu"), default="wall", help="divide by wall time on all threads, or by CPU time on one thread"
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="device of the encoder")
    parser.add_argument(
        "--flops", action="store_true", help="also count the operations of one target embedding and report the achieved TFLOP/s"
    )
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="the device's peak TFLOP/s, to report the achieved share of it")
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    global DEVICE
    DEVICE = arguments.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available to this torch build; run on a machine with a GPU")

    global clock
    if arguments.clock == "cpu":
        torch.set_num_threads(1)
        clock = time.process_time

    sizes = {"published": published_size, "default": default_size}
    results: dict = {}
    details: dict = {}
    started = time.perf_counter()
    for name in arguments.sizes:
        results[name], details[name] = measure(sizes[name](), arguments)
    results["device"] = torch.cuda.get_device_name(0) if DEVICE == "cuda" else device_description()
    results["threads"] = torch.get_num_threads()

    if arguments.json:
        print(json.dumps(results))
        return 0

    print(
        f"{results['device']}, {results['threads']} torch threads, {arguments.clock} clock, {arguments.precision}, "
        f"torch {torch.__version__}, python {platform.python_version()}"
    )
    print(f"{'size':<10} {'batching':<11} {'train/s':>9} {'infer/s':>9}   settings")
    for name in arguments.sizes:
        for batching in BATCHINGS:
            rate = results[name][key(batching)]
            batch = details[name]["targets_per_step"][key(batching)]
            print(f"{name:<10} {batching:<11} {rate['train_per_s']:>9.1f} {rate['infer_per_s']:>9.1f}   {batch} targets per step")
            if arguments.flops:
                share = ""
                if arguments.peak_tflops:
                    share = f" ({100 * rate['train_tflops'] / arguments.peak_tflops:.1f} % and {100 * rate['infer_tflops'] / arguments.peak_tflops:.1f} % of {arguments.peak_tflops:.0f})"
                print(
                    f"{'':<22} {rate['train_flops'] / 1e9:.3g} GFLOP per target in training, {rate['infer_flops'] / 1e9:.3g} in inference: "
                    f"{rate['train_tflops']:.3f} and {rate['infer_tflops']:.3f} TFLOP/s{share}"
                )
        speedup_train = results[name]["population"]["train_per_s"] / results[name]["per_target"]["train_per_s"]
        speedup_infer = results[name]["population"]["infer_per_s"] / results[name]["per_target"]["infer_per_s"]
        print(f"{name:<10} {'speed-up':<11} {speedup_train:>8.1f}x {speedup_infer:>8.1f}x")
        print(f"{'':<10} {details[name]}")
    print(f"total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
