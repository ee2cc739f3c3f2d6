"""Spikes binned per second and peak memory when loading Units tables.

Part 1 compares bulk reading with per-unit access through pynwb, on a file of
``--units`` units and ``--spikes`` spike times. The file is written in two layouts:
contiguous, as pynwb writes ``add_unit`` data by default, and chunked with gzip in
10 MiB chunks, as conversion tools write large datasets. For each layout it times:

- bulk: :func:`neurpir_nwb.io.units.read_units` (one read of ``spike_times`` and its
  index, then sanitising) and :func:`neurpir_nwb.segments.bin_spike_trains` over all
  spikes of the file in one vectorised pass;
- per-unit: the file opened with pynwb and each unit's spike times taken in turn,
  with ``units[i]`` (a DataFrame row), ``units["spike_times"][i]`` or
  ``units.get_unit_spike_times(i)``, each unit binned with the same counting.

Both produce the same (units, bins) array of 10 ms counts; the rate is spike times
binned per second of wall time, file opening included. The fastest of ``--rounds``
rounds counts.

Part 2 writes a file of ``--large-spikes`` spike times (chunked, 10 MiB chunks) and
segments it in a fresh process. The reader reads it in blocks of units, and the
segment set is written to zarr one block at a time. It reports the time and the
peak resident memory of that process (VmHWM), and, with ``--train-steps``, the peak
after that many training steps that read the zarr set lazily.

The files are built in ``--folder`` (default: a temporary folder) and reused when
they already exist there; nothing is committed.

Usage::

    python benchmarks/load_throughput.py                       # both parts
    python benchmarks/load_throughput.py --large-spikes 0      # part 1 only
    python benchmarks/load_throughput.py --json --folder /tmp/load-benchmark
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from hdmf.backends.hdf5 import H5DataIO
from hdmf.common import ElementIdentifiers, VectorData
from hdmf.data_utils import GenericDataChunkIterator
from pynwb import NWBHDF5IO, NWBFile
from pynwb.misc import Units

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))

#: Width of the bins, in seconds.
BIN_SIZE_S = 0.01

#: HDF5 chunk of the chunked layouts: 10 MiB of float64 spike times.
CHUNK_VALUES = 10 * 2**20 // 8

#: Mean firing rate of every unit, in Hz; with the spike count it sets the session's length.
RATE_HZ = 10.0

PER_UNIT_ACCESS = {
    "units[i]": lambda units, row: np.asarray(units[row]["spike_times"].iloc[0], dtype=np.float64),
    'units["spike_times"][i]': lambda units, row: np.asarray(units["spike_times"][row], dtype=np.float64),
    "units.get_unit_spike_times(i)": lambda units, row: np.asarray(units.get_unit_spike_times(row), dtype=np.float64),
}


def unit_train(seed: int, unit: int, count: int, duration_s: float) -> np.ndarray:
    """Return ``count`` sorted uniform spike times in seconds of one unit, drawn from the seed and the unit."""
    rng = np.random.default_rng([seed, unit])
    return np.sort(rng.uniform(0.0, duration_s, count))


class SpikeTimes(GenericDataChunkIterator):
    """Sorted uniform spike times of every unit, generated per unit from a seed when the writer requests a range of values."""

    def __init__(self, counts: np.ndarray, duration_s: float, seed: int, **kwargs) -> None:
        self.counts = np.asarray(counts, dtype=np.int64)
        self.ends = np.cumsum(self.counts)
        self.duration_s = duration_s
        self.seed = seed
        super().__init__(**kwargs)

    def train(self, unit: int) -> np.ndarray:
        return unit_train(self.seed, unit, int(self.counts[unit]), self.duration_s)

    def _get_data(self, selection: tuple[slice, ...]) -> np.ndarray:
        start, stop = selection[0].start or 0, selection[0].stop
        first = int(np.searchsorted(self.ends, start, side="right"))
        last = int(np.searchsorted(self.ends, stop - 1, side="right"))
        values = np.concatenate([self.train(unit) for unit in range(first, last + 1)])
        base = int(self.ends[first - 1]) if first else 0
        return values[start - base : stop - base]

    def _get_dtype(self) -> np.dtype:
        return np.dtype(np.float64)

    def _get_maxshape(self) -> tuple[int, ...]:
        return (int(self.ends[-1]),)


def write_spike_file(path: Path, n_units: int, n_spikes: int, *, layout: str, seed: int = 0) -> Path:
    """Write a Units table of ``n_units`` units and ``n_spikes`` spike times, ``layout`` contiguous, gzip or chunked."""
    counts = np.full(n_units, n_spikes // n_units, dtype=np.int64)
    counts[: n_spikes % n_units] += 1
    duration_s = n_spikes / n_units / RATE_HZ
    chunk = min(CHUNK_VALUES, n_spikes)
    if layout == "chunked":
        data = H5DataIO(SpikeTimes(counts, duration_s, seed, buffer_shape=(min(4 * chunk, n_spikes),), chunk_shape=(chunk,)))
    else:
        values = np.concatenate([unit_train(seed, unit, int(count), duration_s) for unit, count in enumerate(counts)])
        data = values if layout == "contiguous" else H5DataIO(values, compression="gzip", compression_opts=4, chunks=(chunk,))

    xyz = np.random.default_rng(seed).uniform(0.0, 1000.0, (n_units, 3))
    columns = [VectorData(name=f"unit_{axis}", description=f"{axis} in um", data=xyz[:, column]) for column, axis in enumerate("xyz")]
    units = Units(name="units", description="uniform spike trains", id=ElementIdentifiers(name="id", data=np.arange(n_units)), columns=columns)
    # NOTE: hdmf warns that this index argument differs from the Units spec's index=True; the file it writes is the usual one.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Column 'spike_times' is predefined")
        units.add_column(name="spike_times", description="spike times in seconds", data=data, index=np.cumsum(counts).tolist())
    nwbfile = NWBFile(
        session_description="spike trains for the load benchmark",
        identifier=f"load-benchmark-{layout}-{n_spikes}",
        session_start_time=datetime(2026, 1, 1, tzinfo=timezone.utc),
    )
    nwbfile.units = units

    temporary = path.with_name(f".{path.stem}.partial.nwb")
    with NWBHDF5IO(str(temporary), "w") as io:
        io.write(nwbfile)
    temporary.rename(path)
    return path


def spike_file(folder: Path, n_units: int, n_spikes: int, layout: str) -> Path:
    """Return the benchmark file of this size and layout, writing it when it is missing."""
    path = folder / f"units-{n_units}-{n_spikes}-{layout}.nwb"
    if not path.exists():
        started = time.perf_counter()
        write_spike_file(path, n_units, n_spikes, layout=layout)
        print(f"wrote {path} in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return path


def session_bins(n_units: int, n_spikes: int) -> int:
    return int(np.ceil(n_spikes / n_units / RATE_HZ / BIN_SIZE_S))


def bulk_seconds(path: Path, n_bins: int) -> float:
    from neurpir_nwb.io.units import read_units
    from neurpir_nwb.segments import bin_spike_trains

    started = time.perf_counter()
    recording = read_units(path)
    counts = bin_spike_trains(recording.spike_times, 0.0, n_bins, BIN_SIZE_S)
    seconds = time.perf_counter() - started
    assert counts.sum() == recording.spike_counts.sum()
    return seconds


def per_unit_seconds(path: Path, n_bins: int, access) -> float:
    from neurpir_nwb.segments import bin_spike_trains

    started = time.perf_counter()
    with NWBHDF5IO(str(path), "r") as io:
        units = io.read().units
        n_units = len(units.id)
        counts = np.zeros((n_units, n_bins), dtype=np.float32)
        for row in range(n_units):
            counts[row] = bin_spike_trains([access(units, row)], 0.0, n_bins, BIN_SIZE_S)[0]
    return time.perf_counter() - started


def compare_access(folder: Path, n_units: int, n_spikes: int, rounds: int) -> dict:
    """Time bulk and per-unit binning on both layouts of a file; return spikes per second and speed-ups."""
    n_bins = session_bins(n_units, n_spikes)
    results = {}
    for layout in ("contiguous", "gzip"):
        path = spike_file(folder, n_units, n_spikes, layout)
        bulk = min(bulk_seconds(path, n_bins) for _ in range(rounds))
        entry = {"file_mb": round(path.stat().st_size / 1e6, 1), "bulk_spikes_per_s": n_spikes / bulk, "bulk_s": bulk, "per_unit": {}}
        for name, access in PER_UNIT_ACCESS.items():
            seconds = min(per_unit_seconds(path, n_bins, access) for _ in range(rounds))
            entry["per_unit"][name] = {"spikes_per_s": n_spikes / seconds, "seconds": seconds, "bulk_speedup": seconds / bulk}
        results[layout] = entry
    return results


def peak_resident_bytes() -> int:
    """Return this process's peak resident memory: VmHWM where /proc has it, else ru_maxrss."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def segment_large(path: Path, output: Path, train_steps: int) -> dict:
    """Read and segment one file into a zarr set in this process; return seconds and peak memory."""
    from neurpir_nwb.io.units import read_units
    from neurpir_nwb.segments import SegmentSettings, lazy_activity, write_segment_set

    settings = SegmentSettings(bin_size_s=BIN_SIZE_S, bins_per_patch=16, patches=16, neighbours=8, distance_bins=16)
    started = time.perf_counter()
    recording = read_units(path)
    read_s = time.perf_counter() - started
    segment_set = write_segment_set([recording], settings, output)
    seconds = time.perf_counter() - started
    n_spikes = int(recording.spike_counts.sum())
    result = {
        "spikes": n_spikes,
        "units": recording.n_neurons,
        "windows": int(segment_set.sizes["window"]),
        "activity_gib": 4 * recording.n_neurons * segment_set.sizes["window"] * settings.window_bins / 2**30,
        "zarr_gib": sum(file.stat().st_size for file in output.rglob("*") if file.is_file()) / 2**30,
        "scan_s": read_s,
        "segment_s": seconds,
        "spikes_per_s": n_spikes / seconds,
        "peak_rss_gib": peak_resident_bytes() / 2**30,
    }

    if train_steps:
        import torch

        from neurpir_nwb.model import EncoderConfig, NeurPIREncoder, Projector, VICRegLoss
        from neurpir_nwb.train import TrainConfig, Trainer, WindowData

        torch.manual_seed(0)
        data = WindowData(segment_set, holdout_fraction=0.2, activity=lazy_activity(segment_set))
        encoder = NeurPIREncoder(EncoderConfig(bins_per_patch=16, patches=16, dim=64, heads=4, temporal_layers=1, spatiotemporal_layers=1, distance_bins=16))
        trainer = Trainer(encoder, Projector(64, [256, 256]), VICRegLoss(), TrainConfig(epochs=1, steps_per_epoch=train_steps, batch_size=64, device="cpu", checkpoint_steps=0))
        started = time.perf_counter()
        trainer.fit(data)
        result["train_steps"] = train_steps
        result["train_s_per_step"] = (time.perf_counter() - started) / train_steps
        result["peak_rss_after_training_gib"] = peak_resident_bytes() / 2**30
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--units", type=int, default=1000, help="units of every file")
    parser.add_argument("--spikes", type=int, default=10_000_000, help="spike times of the file that part 1 reads")
    parser.add_argument("--large-spikes", type=int, default=100_000_000, help="spike times of the file that part 2 segments; 0 skips part 2")
    parser.add_argument("--train-steps", type=int, default=5, help="training steps on the zarr set after part 2; 0 skips them")
    parser.add_argument("--rounds", type=int, default=2, help="repeats of every part 1 measurement; the fastest counts")
    parser.add_argument("--folder", type=Path, default=None, help="folder for the files, reused between runs (default: a temporary folder)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--segment-only", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--zarr", type=Path, help=argparse.SUPPRESS)
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    if arguments.segment_only is not None:
        print(json.dumps(segment_large(arguments.segment_only, arguments.zarr, arguments.train_steps)))
        return 0

    temporary = None
    if arguments.folder is None:
        temporary = tempfile.TemporaryDirectory(prefix="neurpir-load-")
        folder = Path(temporary.name)
    else:
        folder = arguments.folder
        folder.mkdir(parents=True, exist_ok=True)

    results: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}"}
    results["access"] = compare_access(folder, arguments.units, arguments.spikes, arguments.rounds)

    if arguments.large_spikes:
        path = spike_file(folder, arguments.units, arguments.large_spikes, "chunked")
        command = [sys.executable, __file__, "--segment-only", str(path), "--zarr", str(folder / "large.zarr"), "--train-steps", str(arguments.train_steps)]
        finished = subprocess.run(command, check=True, capture_output=True, text=True)
        results["large"] = json.loads(finished.stdout.strip().splitlines()[-1])

    if temporary is not None:
        temporary.cleanup()

    if arguments.json:
        print(json.dumps(results))
        return 0

    print(results["machine"])
    print(f"part 1: {arguments.units} units, {arguments.spikes:,} spike times, {BIN_SIZE_S * 1000:.0f} ms bins (speed-up: per-unit time / bulk time)")
    for layout, entry in results["access"].items():
        print(f"  {layout} ({entry['file_mb']} MB): bulk {entry['bulk_spikes_per_s'] / 1e6:.1f} M spikes/s ({entry['bulk_s']:.2f} s)")
        for name, timing in entry["per_unit"].items():
            print(f"    per unit, {name:<31} {timing['spikes_per_s'] / 1e6:8.2f} M spikes/s ({timing['seconds']:.2f} s): bulk speed-up {timing['bulk_speedup']:.2f}x")
    if "large" in results:
        large = results["large"]
        print(
            f"part 2: {large['spikes']:,} spike times of {large['units']} units into {large['windows']:,} windows per unit "
            f"({large['activity_gib']:.3g} GiB of activity, {large['zarr_gib']:.3g} GiB in zarr)"
        )
        print(
            f"  segmented in {large['segment_s']:.1f} s ({large['spikes_per_s'] / 1e6:.1f} M spikes/s, first scan {large['scan_s']:.1f} s), "
            f"peak resident memory {large['peak_rss_gib']:.2f} GiB"
        )
        if "train_steps" in large:
            print(
                f"  training steps on the lazy zarr set: {large['train_steps']}, {large['train_s_per_step']:.2f} s per step, "
                f"peak resident memory {large['peak_rss_after_training_gib']:.2f} GiB"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
