"""Simulate networks of Izhikevich neurons of known types and write one NWB file per animal.

The files are the package's embedded default dataset and its cell-type benchmark: every
unit's ground-truth type sits in the Units table's ``cell_type`` column, and a model has
to recover it from the unit's spike train alone.

Model
-----
Each neuron follows Izhikevich (2003, "Simple model of spiking neurons", IEEE Trans.
Neural Netw. 14:1569-1572)::

    v' = 0.04 v^2 + 5 v + 140 - u + I
    u' = a (b v - u)
    if v >= 30 mV: v <- c, u <- u + d

with v in mV, t in ms and I in the model's units (mV/ms). The type sets (a, b, c, d).
The integration is forward Euler with a fixed time step ``dt_ms`` (1 ms by default).
As in that paper's code, v advances in two half-steps of ``dt_ms / 2``, and u in one
full step from the new v. A spike's time is placed inside its step by linear
interpolation of v up to the 30 mV peak. Spike times are therefore not locked to the
step grid, but they are accurate only to about one step.

Network
-------
Neurons sit uniformly at random in a box of ``volume_um``. A synapse from neuron j to
neuron i forms with probability ``p0 * exp(-distance / lambda)``. Excitatory neurons
(RS, IB, CH) have weights uniform in ``[0, excitatory_weight]`` and inhibitory ones
(FS, LTS) uniform in ``[-inhibitory_weight, 0]``. A presynaptic spike adds its weight
to the postsynaptic input for the next step: a 1 ms current pulse, scaled by
``1 ms / dt_ms`` so that its charge does not depend on the step.

With ``layout="uniform"``, types are placed at random, independent of position. With
``layout="laminar"``, z is cortical depth from the pia, cut into the layers of
``LAMINAR_LAYERS``, and each type is denser in some layers than in others
(``LAMINAR_DENSITY``): intrinsically bursting neurons mostly in layer 5, chattering
neurons mostly in layer 2/3, fast-spiking neurons in every layer. Each type keeps its
share of the mix, and only its depths change.

The default weights keep the 1 : 2 ratio of Izhikevich (2003), whose maxima were 0.5
and 1, but are 4 times larger. His neurons had 1,000 inputs each, and these have
tens: about 15 among 200 neurons and 75 among 1,000 in the default volume.
With these defaults, connected pairs are more correlated than unconnected ones while
the network stays asynchronous.

Input
-----
Every neuron receives ``input_mean + shared(t) + private_i(t) + noise_i(t)``:
``shared`` is one Ornstein-Uhlenbeck process common to all neurons and ``private_i``
one per neuron, both with time constant ``drift_tau_s`` and updated every 100 ms, so
the firing rates drift over tens of seconds. ``noise_i`` is white Gaussian noise drawn
every step, with standard deviation ``input_noise_sd`` at a 1 ms step (scaled by
``sqrt(1 ms / dt_ms)`` at other steps).

With ``fast_input_sd`` above 0, every neuron also receives fast input fluctuations of
that standard deviation: ``fast_input_sd * (k * fast_shared(t) + sqrt(1 - k^2) *
fast_private_i(t))``, two unit-variance Ornstein-Uhlenbeck processes with time constant
``fast_input_tau_s`` on the same 100 ms grid. ``k`` is the population coupling of the
neuron's type (``population_coupling``, 0 to 1), and the common part carries ``k^2`` of
the fast input's variance. Neurons differ in this coupling (Okun et al. 2015, "Diverse
coupling of neurons to populations in sensory cortex", Nature 521:511-515). Because the
fast input has the same variance at every coupling, a neuron's own spike train does
not show its coupling; only its co-fluctuation with the other neurons does.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from types import MappingProxyType

import h5py
import numpy as np
from hdmf.backends.hdf5 import H5DataIO
from hdmf.common import VectorData, VectorIndex
from pynwb import NWBHDF5IO, NWBFile
from pynwb.file import Subject
from pynwb.misc import Units

from neurpir_nwb._version import __version__
from neurpir_nwb.errors import RecipeError, RunDirectoryError
from neurpir_nwb.progress import Progress, SilentProgress, count_noun

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_TYPE_MIX",
    "NEURON_TYPES",
    "IzhikevichParameters",
    "SimulatedAnimal",
    "SimulationSettings",
    "animal_file_name",
    "read_simulation_notes",
    "simulate_animal",
    "simulate_dataset",
    "simulate_neurons",
    "write_animal_nwb",
]

#: Version of the simulation model. Files written by another version are not reused.
MODEL_VERSION = 1

#: Membrane potential (mV) at which a spike is emitted and v is reset.
V_PEAK_MV = 30.0

#: Membrane potential (mV) of every neuron at the start of the warm-up.
V_START_MV = -65.0

#: Interval (ms) at which the slow input drift is updated.
DRIFT_STEP_MS = 100.0

#: Session start time of every simulated file, fixed so that files depend only on seed and settings.
SESSION_START_TIME = datetime(2024, 1, 1, 0, 0, 0, tzinfo=timezone.utc)

#: Largest network: the dense weight matrix takes n_neurons**2 * 4 bytes (1.6 GB at 20,000).
MAX_NEURONS = 20_000


# --- neuron types ----------------------------------------------------------------------


@dataclass(frozen=True)
class IzhikevichParameters:
    """Parameters of one Izhikevich neuron.

    Attributes
    ----------
    a
        Recovery rate of u, in 1/ms.
    b
        Sensitivity of u to v.
    c
        Reset potential of v after a spike, in mV.
    d
        Increment of u after a spike.
    excitatory
        Whether the neuron's synapses are excitatory.
    """

    a: float
    b: float
    c: float
    d: float
    excitatory: bool = True


#: Canonical (a, b, c, d) of the preset types (Izhikevich 2003).
NEURON_TYPES: Mapping[str, IzhikevichParameters] = MappingProxyType(
    {
        "RS": IzhikevichParameters(0.02, 0.2, -65.0, 8.0, excitatory=True),  # regular spiking
        "IB": IzhikevichParameters(0.02, 0.2, -55.0, 4.0, excitatory=True),  # intrinsically bursting
        "CH": IzhikevichParameters(0.02, 0.2, -50.0, 2.0, excitatory=True),  # chattering
        "FS": IzhikevichParameters(0.1, 0.2, -65.0, 2.0, excitatory=False),  # fast spiking
        "LTS": IzhikevichParameters(0.02, 0.25, -65.0, 2.0, excitatory=False),  # low-threshold spiking
    }
)

#: Cortical layers of the laminar layout: name, then top and bottom as fractions of the
#: volume's depth (z) from the pia. Thicknesses follow rodent sensory cortex roughly.
LAMINAR_LAYERS: tuple[tuple[str, float, float], ...] = (
    ("L2/3", 0.0, 0.35),
    ("L4", 0.35, 0.5),
    ("L5", 0.5, 0.75),
    ("L6", 0.75, 1.0),
)

#: Relative density of each type in each layer of ``LAMINAR_LAYERS``, in layer order.
#: Intrinsically bursting (thick-tufted) cells sit mostly in layer 5, chattering cells
#: mostly in layer 2/3, low-threshold spiking (Martinotti-like) cells in layers 2/3 and
#: 5; regular and fast-spiking cells occur in every layer.
LAMINAR_DENSITY: Mapping[str, tuple[float, float, float, float]] = MappingProxyType(
    {
        "RS": (1.0, 1.0, 0.6, 1.2),
        "IB": (0.05, 0.1, 1.0, 0.3),
        "CH": (1.0, 0.4, 0.2, 0.1),
        "FS": (1.0, 1.0, 1.0, 1.0),
        "LTS": (0.6, 0.2, 0.8, 0.4),
    }
)

#: Neuron layouts in space.
LAYOUTS = ("uniform", "laminar")

#: Default fraction of each type. Cortex is about 80 % excitatory, but a benchmark needs
#: every class well represented. With at least 15 % per type, an animal of 200 neurons
#: has at least 30 neurons of each type, so every fold of a 5-fold split contains at
#: least 6. Excitatory neurons stay the majority (60 %).
DEFAULT_TYPE_MIX: Mapping[str, float] = MappingProxyType({"RS": 0.3, "IB": 0.15, "CH": 0.15, "FS": 0.25, "LTS": 0.15})


# --- settings --------------------------------------------------------------------------


@dataclass(frozen=True)
class SimulationSettings:
    """Settings of a simulated animal: network size, duration, integration, connectivity and input.

    Every animal of a data set shares the settings and differs by its seed. Currents and
    weights are in the model's units (mV/ms).

    Attributes
    ----------
    n_neurons
        Number of neurons, at most 20,000.
    duration_s
        Recorded duration in seconds. Spike times lie in ``[0, duration_s)``.
    warmup_s
        Simulated time in seconds before the recording starts, so that the recording
        does not begin with the transient from identical initial states.
    dt_ms
        Integration time step in ms, in (0, 1].
    type_mix
        Type name (a key of ``NEURON_TYPES``) to fraction of neurons; fractions sum to 1.
    volume_um
        Size (x, y, z) in micrometres of the box the neurons sit in.
    layout
        ``"uniform"``: every neuron anywhere in the box, whatever its type.
        ``"laminar"``: z is depth, and each type's depth follows its layer densities
        (``LAMINAR_DENSITY``).
    connection_probability
        Connection probability ``p0`` between two neurons at distance 0.
    connection_length_um
        Length constant ``lambda`` in micrometres of the connection probability.
    excitatory_weight
        Largest weight of an excitatory synapse; weights are uniform in ``[0, excitatory_weight]``.
    inhibitory_weight
        Largest magnitude of an inhibitory synapse; weights are uniform in ``[-inhibitory_weight, 0]``.
    input_mean
        Mean input current. The rheobase of the b = 0.2 types under constant input is 4.
    input_noise_sd
        Standard deviation of the white noise current at a 1 ms step.
    drift_shared_sd
        Standard deviation of the slow input drift shared by all neurons.
    drift_private_sd
        Standard deviation of each neuron's own slow input drift.
    drift_tau_s
        Time constant in seconds of both drifts.
    parameter_jitter
        Relative standard deviation of each neuron's a, b and d around its type's values.
    reset_jitter_mv
        Standard deviation in mV of each neuron's c around its type's value.
    fast_input_sd
        Standard deviation of the fast input fluctuations. At 0 there are none.
    fast_input_tau_s
        Time constant in seconds of the fast input fluctuations.
    population_coupling
        Type name to its coupling k (0 to 1): the weight of the fast input common to all
        neurons, whose share of the fast input's variance is k squared. Types left out
        have 0.
    """

    n_neurons: int = 200
    duration_s: float = 300.0
    warmup_s: float = 2.0
    dt_ms: float = 1.0
    type_mix: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_TYPE_MIX))
    volume_um: tuple[float, float, float] = (500.0, 500.0, 500.0)
    layout: str = "uniform"
    connection_probability: float = 0.5
    connection_length_um: float = 150.0
    excitatory_weight: float = 2.0
    inhibitory_weight: float = 4.0
    input_mean: float = 3.0
    input_noise_sd: float = 4.0
    drift_shared_sd: float = 1.0
    drift_private_sd: float = 0.5
    drift_tau_s: float = 20.0
    parameter_jitter: float = 0.05
    reset_jitter_mv: float = 1.0
    fast_input_sd: float = 0.0
    fast_input_tau_s: float = 0.2
    population_coupling: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "type_mix", MappingProxyType(_checked_type_mix(self.type_mix)))
        object.__setattr__(self, "population_coupling", MappingProxyType(_checked_coupling(self.population_coupling)))
        object.__setattr__(self, "volume_um", _checked_volume(self.volume_um))
        _check_settings(self)

        # Plain Python numbers, so that the settings serialise to JSON and compare equal after a round trip.
        object.__setattr__(self, "n_neurons", int(self.n_neurons))
        for item in fields(self):
            if item.name not in ("n_neurons", "type_mix", "volume_um", "layout", "population_coupling"):
                object.__setattr__(self, item.name, float(getattr(self, item.name)))

    @property
    def n_steps(self) -> int:
        """Number of recorded integration steps, enough to cover ``duration_s``."""
        return int(math.ceil(self.duration_s * 1000.0 / self.dt_ms - 1e-9))

    @property
    def n_warmup_steps(self) -> int:
        """Number of integration steps before the recording starts."""
        return int(round(self.warmup_s * 1000.0 / self.dt_ms))

    def to_dict(self) -> dict[str, object]:
        """Return the settings as JSON-ready values."""
        values = {item.name: getattr(self, item.name) for item in fields(self)}
        values["type_mix"] = dict(self.type_mix)
        values["volume_um"] = list(self.volume_um)
        values["population_coupling"] = dict(self.population_coupling)
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, object]) -> SimulationSettings:
        """Build settings from ``to_dict`` output; keys left out take their defaults.

        Raises
        ------
        RecipeError
            When a key is unknown or a value is invalid.
        """
        known = {item.name for item in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise RecipeError(
                f"unknown simulation settings {', '.join(unknown)}; valid settings are {', '.join(sorted(known))}"
            )

        values = dict(values)
        if "volume_um" in values:
            values["volume_um"] = tuple(values["volume_um"])
        return cls(**values)


def _type_numbers(values: Mapping[str, float], setting: str, label: str, example: str) -> dict[str, float]:
    """Return a mapping of type name to number as floats in ``NEURON_TYPES`` order, or raise RecipeError.

    ``label`` names one value in messages, such as ``"type_mix fraction"``. The callers
    check the ranges.
    """
    if not isinstance(values, Mapping):
        raise RecipeError(f"{setting} {values!r} is invalid; give a mapping of type name to number, such as {example}")

    unknown = sorted(set(values) - set(NEURON_TYPES))
    if unknown:
        raise RecipeError(f"{setting} names unknown types {', '.join(unknown)}; valid types are {', '.join(NEURON_TYPES)}")

    numbers = {}
    for name in NEURON_TYPES:
        if name not in values:
            continue

        value = values[name]
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise RecipeError(f"{label} of {name} is {value!r}; give a number")
        numbers[name] = float(value)
    return numbers


def _checked_type_mix(type_mix: Mapping[str, float]) -> dict[str, float]:
    """Return the type mix as a dict in ``NEURON_TYPES`` order, or raise RecipeError."""
    if isinstance(type_mix, Mapping) and not type_mix:
        raise RecipeError("type_mix is empty; give a mapping of type name to fraction, such as {'RS': 0.5, 'FS': 0.5}")
    mix = _type_numbers(type_mix, "type_mix", "type_mix fraction", "{'RS': 0.5, 'FS': 0.5}")

    for name, fraction in mix.items():
        if not (math.isfinite(fraction) and fraction > 0.0):
            raise RecipeError(f"type_mix fraction of {name} is {fraction:g}; give a fraction above 0 or leave the type out")

    total = sum(mix.values())
    if abs(total - 1.0) > 1e-6:
        raise RecipeError(f"type_mix fractions sum to {total:.6g}; make them sum to 1")
    return mix


def _checked_coupling(coupling: Mapping[str, float]) -> dict[str, float]:
    """Return the population coupling of each type in ``NEURON_TYPES`` order, or raise RecipeError."""
    checked = _type_numbers(coupling, "population_coupling", "population_coupling", "{'FS': 0.9}")

    for name, value in checked.items():
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise RecipeError(f"population_coupling of {name} is {value:g}; give a value from 0 to 1")
    return checked


def _checked_volume(volume_um: Sequence[float]) -> tuple[float, float, float]:
    """Return the volume as three floats, or raise RecipeError."""
    try:
        volume = tuple(float(side) for side in volume_um)
    except (TypeError, ValueError):
        raise RecipeError(f"volume_um {volume_um!r} is invalid; give three lengths in micrometres, such as (500, 500, 500)") from None

    if len(volume) != 3 or not all(math.isfinite(side) and side > 0.0 for side in volume):
        raise RecipeError(f"volume_um {volume_um!r} is invalid; give three lengths above 0 in micrometres, such as (500, 500, 500)")
    return volume


def _check_settings(settings: SimulationSettings) -> None:
    """Raise RecipeError naming the first setting that is out of range."""
    if settings.layout not in LAYOUTS:
        raise RecipeError(f"layout {settings.layout!r} is unknown; give one of {', '.join(LAYOUTS)}")
    if isinstance(settings.n_neurons, bool) or not isinstance(settings.n_neurons, (int, np.integer)):
        raise RecipeError(f"n_neurons {settings.n_neurons!r} is invalid; give a whole number of neurons")
    if not 1 <= settings.n_neurons <= MAX_NEURONS:
        raise RecipeError(
            f"n_neurons {settings.n_neurons} is out of range; give 1 to {MAX_NEURONS} "
            "(the dense weight matrix takes n_neurons squared times 4 bytes)"
        )

    # (name, lowest, highest, whether the lowest value itself is allowed)
    ranges = [
        ("duration_s", 0.0, math.inf, False),
        ("warmup_s", 0.0, math.inf, True),
        ("dt_ms", 0.0, 1.0, False),
        ("connection_probability", 0.0, 1.0, True),
        ("connection_length_um", 0.0, math.inf, False),
        ("excitatory_weight", 0.0, math.inf, True),
        ("inhibitory_weight", 0.0, math.inf, True),
        ("input_mean", -math.inf, math.inf, True),
        ("input_noise_sd", 0.0, math.inf, True),
        ("drift_shared_sd", 0.0, math.inf, True),
        ("drift_private_sd", 0.0, math.inf, True),
        ("drift_tau_s", 0.0, math.inf, False),
        # With z clipped to [-2, 2], these limits keep a, b and d positive and c within 10 mV of its type.
        ("parameter_jitter", 0.0, 0.2, True),
        ("reset_jitter_mv", 0.0, 5.0, True),
        ("fast_input_sd", 0.0, math.inf, True),
        ("fast_input_tau_s", 0.0, math.inf, False),
    ]
    for name, lowest, highest, closed in ranges:
        value = getattr(settings, name)
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise RecipeError(f"{name} {value!r} is invalid; give a number")

        value = float(value)
        above = value >= lowest if closed else value > lowest
        if not (math.isfinite(value) and above and value <= highest):
            bound = "at least" if closed else "above"
            upper = f" and at most {highest:g}" if math.isfinite(highest) else ""
            raise RecipeError(f"{name} {value:g} is out of range; give a value {bound} {lowest:g}{upper}")

    if settings.n_steps < 1:
        raise RecipeError(f"duration_s {settings.duration_s:g} is shorter than one step of {settings.dt_ms:g} ms; give a longer duration")


# --- integration -----------------------------------------------------------------------

#: A function called with the simulated time in seconds since the recording started.
OnTime = Callable[[float], None]


def simulate_neurons(
    parameters: IzhikevichParameters | Sequence[IzhikevichParameters] | np.ndarray,
    input_current: np.ndarray,
    dt_ms: float = 1.0,
) -> list[np.ndarray]:
    """Simulate unconnected Izhikevich neurons driven by a given input current.

    Parameters
    ----------
    parameters
        One parameter set for every neuron, one per neuron, or an (n_neurons, 4) array
        of a, b, c, d.
    input_current
        Input in mV/ms per step: shape (n_steps,) drives every neuron with the same
        current, (n_steps, n_neurons) each with its own. A single parameter set with a
        2-D input gives every column the same parameters.
    dt_ms
        Integration time step in ms, in (0, 1].

    Returns
    -------
    list of numpy.ndarray
        Ascending spike times in seconds per neuron, measured from the start of the first step.

    Raises
    ------
    ValueError
        When the shapes disagree, the input is not finite, or dt_ms is out of range.
    """
    if not 0.0 < dt_ms <= 1.0:
        raise ValueError(f"dt_ms {dt_ms} is out of range; give a step above 0 and at most 1 ms")

    current = np.asarray(input_current, dtype=np.float32)
    if current.ndim not in (1, 2) or current.shape[0] == 0:
        raise ValueError(f"input_current has shape {current.shape}; give (n_steps,) or (n_steps, n_neurons) with n_steps >= 1")
    if not np.isfinite(current).all():
        raise ValueError("input_current contains NaN or infinite values; give finite currents")

    table = _parameter_table(parameters)
    if current.ndim == 2 and len(table) == 1:
        table = np.repeat(table, current.shape[1], axis=0)
    n_neurons = len(table)
    if current.ndim == 2 and current.shape[1] != n_neurons:
        raise ValueError(f"input_current has {current.shape[1]} columns but {n_neurons} parameter sets were given")

    def blocks() -> Iterator[np.ndarray]:
        block_steps = 1000
        for start in range(0, len(current), block_steps):
            block = current[start : start + block_steps]
            yield np.broadcast_to(block[:, None], (len(block), n_neurons)) if block.ndim == 1 else block

    units, times_ms = _integrate(table, blocks(), dt_ms=dt_ms, weights=None, n_skipped_steps=0)
    times_s = np.divide(times_ms, 1000.0, out=times_ms)
    return _split_trains(units, times_s, n_neurons)


def _parameter_table(parameters: IzhikevichParameters | Sequence[IzhikevichParameters] | np.ndarray) -> np.ndarray:
    """Return an (n_neurons, 4) float32 array of a, b, c, d."""
    if isinstance(parameters, IzhikevichParameters):
        parameters = [parameters]
    if isinstance(parameters, np.ndarray):
        table = np.asarray(parameters, dtype=np.float32)
    else:
        table = np.array([[item.a, item.b, item.c, item.d] for item in parameters], dtype=np.float32).reshape(-1, 4)

    if table.ndim != 2 or table.shape[1] != 4 or len(table) == 0:
        raise ValueError(f"parameters have shape {table.shape}; give (n_neurons, 4) values of a, b, c, d")
    if not np.isfinite(table).all():
        raise ValueError("parameters contain NaN or infinite values; give finite a, b, c, d")
    return table


def _integrate(
    parameters: np.ndarray,
    input_blocks: Iterator[np.ndarray],
    *,
    dt_ms: float,
    weights: np.ndarray | None,
    n_skipped_steps: int,
    on_time: OnTime | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Integrate the neurons step by step over the input blocks, vectorised over neurons.

    ``weights[j, i]`` is the pulse added to neuron i's input in the step after neuron j
    fires, already scaled for the step. Spikes of the first ``n_skipped_steps`` steps
    (the warm-up) are dropped, and step ``n_skipped_steps`` starts at time 0.

    Returns the unit index (int32) and the time in ms of every spike, in order of time.
    """
    a, b, c, d = (np.ascontiguousarray(column, dtype=np.float32) for column in parameters.T)
    n_neurons = len(a)

    # The loop runs once per step, so every constant factor is folded in here. All terms
    # of v' except those in v are constant over a step, so the loop keeps them multiplied
    # by the half-step. It keeps u as u_half = u * dt/2 for the same reason.
    half_dt = np.float32(dt_ms / 2.0)
    quadratic = np.float32(0.04) * half_dt
    linear = np.float32(5.0) * half_dt
    offset = np.float32(140.0) * half_dt
    peak = np.float32(V_PEAK_MV)
    b_half = b * half_dt
    a_dt = a * np.float32(dt_ms)
    d_half = d * half_dt
    scaled_weights = None if weights is None else (weights * half_dt).astype(np.float32)

    v = np.full(n_neurons, V_START_MV, dtype=np.float32)
    v_next = np.empty(n_neurons, dtype=np.float32)
    u_half = b_half * v
    drive = np.empty(n_neurons, dtype=np.float32)
    scratch = np.empty(n_neurons, dtype=np.float32)
    above_peak = np.empty(n_neurons, dtype=bool)
    synaptic = None

    recorder = _SpikeRecorder(dt_ms)
    step = -n_skipped_steps
    steps_per_report = max(1, int(round(1000.0 / dt_ms)))

    for block in input_blocks:
        block_half = np.multiply(block, half_dt, dtype=np.float32)
        block_half += offset

        for current_half in block_half:
            np.subtract(current_half, u_half, out=drive)
            if synaptic is not None:
                drive += synaptic

            # First half-step into v_next, so that v keeps the step's starting values.
            np.multiply(v, quadratic, out=scratch)
            scratch += linear
            scratch *= v
            scratch += drive
            np.add(v, scratch, out=v_next)
            v, v_next = v_next, v

            np.multiply(v, quadratic, out=scratch)
            scratch += linear
            scratch *= v
            scratch += drive
            v += scratch

            np.greater_equal(v, peak, out=above_peak)
            fired = above_peak.nonzero()[0]
            if fired.size:
                if step >= 0:
                    recorder.add(step, fired, v_next[fired], v[fired])
                # u is updated from v capped at the peak, so that the overshoot within a step does not inflate it.
                v[fired] = peak

            np.multiply(v, b_half, out=scratch)
            scratch -= u_half
            scratch *= a_dt
            u_half += scratch

            synaptic = None
            if fired.size:
                v[fired] = c[fired]
                u_half[fired] += d_half[fired]
                if scaled_weights is not None:
                    if fired.size == 1:
                        synaptic = scaled_weights[fired[0]]
                    else:
                        synaptic = np.add.reduce(scaled_weights.take(fired, axis=0), axis=0)

            step += 1
            if on_time is not None and step > 0 and step % steps_per_report == 0:
                on_time(step * dt_ms / 1000.0)

        recorder.compact()

    return recorder.result()


class _SpikeRecorder:
    """Collects the spikes of each step and compacts them into arrays once per input block.

    A spike's time is where v crossed the peak, by linear interpolation between v at the
    start and at the end of its step. Compacting keeps memory at 12 bytes per spike
    instead of three small arrays per step.
    """

    def __init__(self, dt_ms: float):
        self.dt_ms = dt_ms
        self.steps: list[int] = []
        self.units: list[np.ndarray] = []
        self.v_start: list[np.ndarray] = []
        self.v_end: list[np.ndarray] = []
        self.compacted_units: list[np.ndarray] = []
        self.compacted_times_ms: list[np.ndarray] = []

    def add(self, step: int, fired: np.ndarray, v_start: np.ndarray, v_end: np.ndarray) -> None:
        """Record the neurons that fired in a step, with v at the step's start and end (before the cap)."""
        self.steps.append(step)
        self.units.append(fired)
        self.v_start.append(v_start)
        self.v_end.append(v_end)

    def compact(self) -> None:
        """Turn the steps recorded since the last call into unit indices and times in ms."""
        if not self.steps:
            return

        counts = [len(fired) for fired in self.units]
        steps = np.repeat(np.asarray(self.steps, dtype=np.float64), counts)
        v_start = np.concatenate(self.v_start).astype(np.float64)
        v_end = np.concatenate(self.v_end).astype(np.float64)
        fraction = np.clip((V_PEAK_MV - v_start) / (v_end - v_start), 0.0, 1.0)

        self.compacted_units.append(np.concatenate(self.units).astype(np.int32))
        self.compacted_times_ms.append((steps + fraction) * self.dt_ms)
        for pending in (self.steps, self.units, self.v_start, self.v_end):
            pending.clear()

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """Return the unit index and the time in ms of every spike, in order of time."""
        self.compact()
        if not self.compacted_units:
            return np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.float64)

        units = np.concatenate(self.compacted_units)
        self.compacted_units.clear()
        times_ms = np.concatenate(self.compacted_times_ms)
        self.compacted_times_ms.clear()
        return units, times_ms


def _split_trains(units: np.ndarray, times_s: np.ndarray, n_neurons: int) -> list[np.ndarray]:
    """Split spikes given in order of time into one ascending train per neuron."""
    order = np.argsort(units, kind="stable")
    ends = np.cumsum(np.bincount(units, minlength=n_neurons))
    return np.split(times_s[order], ends[:-1])


# --- network ---------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class SimulatedAnimal:
    """One simulated network and the spike trains it produced.

    Attributes
    ----------
    seed
        Seed of the animal; the network, its parameters and its input follow from it.
    settings
        Settings the animal was simulated with.
    spike_times
        Ascending spike times in seconds, one array per neuron.
    cell_types
        Type name per neuron (a key of ``NEURON_TYPES``).
    excitatory
        Whether each neuron is excitatory.
    positions_um
        (n_neurons, 3) positions in micrometres.
    parameters
        (n_neurons, 4) per-neuron a, b, c, d after jitter.
    n_synapses
        Number of synapses in the network.
    wall_time_s
        Time in seconds that the simulation took.
    """

    seed: int
    settings: SimulationSettings
    spike_times: list[np.ndarray]
    cell_types: np.ndarray
    excitatory: np.ndarray
    positions_um: np.ndarray
    parameters: np.ndarray
    n_synapses: int
    wall_time_s: float

    @property
    def subject_id(self) -> str:
        """Subject id of the animal, ``sim-animal-<seed>``."""
        return f"sim-animal-{self.seed}"

    def firing_rates_hz(self) -> np.ndarray:
        """Return each neuron's mean firing rate in spikes per second over the recording."""
        counts = np.array([len(train) for train in self.spike_times], dtype=np.float64)
        return counts / self.settings.duration_s


def simulate_animal(settings: SimulationSettings, seed: int, *, on_time: OnTime | None = None) -> SimulatedAnimal:
    """Build the network of one animal and simulate its spike trains.

    The seed fixes the positions, types, parameters, synapses and input. Positions and
    types, parameters, synapses and input each draw from their own random stream, so
    changing ``duration_s`` changes only the input and the spike trains, never the network.

    Parameters
    ----------
    settings
        Settings shared by every animal of a data set.
    seed
        Non-negative seed of the animal.
    on_time
        Called about once per simulated second with the recorded time so far, in seconds.

    Returns
    -------
    SimulatedAnimal
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise RecipeError(f"seed {seed!r} is invalid; give a whole number of at least 0")

    started = time.perf_counter()
    streams = [np.random.default_rng(child) for child in np.random.SeedSequence(int(seed)).spawn(4)]
    type_rng, parameter_rng, synapse_rng, input_rng = streams

    n_neurons = settings.n_neurons
    positions_um = type_rng.uniform(0.0, 1.0, size=(n_neurons, 3)) * np.asarray(settings.volume_um)
    cell_types = _assign_types(settings.type_mix, n_neurons, type_rng)
    if settings.layout == "laminar":
        positions_um[:, 2] = _laminar_depths(cell_types, type_rng) * settings.volume_um[2]
    excitatory = np.array([NEURON_TYPES[name].excitatory for name in cell_types], dtype=bool)
    parameters = _jittered_parameters(cell_types, settings, parameter_rng)
    weights = _synaptic_weights(positions_um, excitatory, settings, synapse_rng)
    n_synapses = int(np.count_nonzero(weights))

    coupling = np.array([settings.population_coupling.get(name, 0.0) for name in cell_types])
    blocks = _input_blocks(settings, input_rng, coupling)
    units, times_ms = _integrate(
        parameters,
        blocks,
        dt_ms=settings.dt_ms,
        weights=weights,
        n_skipped_steps=settings.n_warmup_steps,
        on_time=on_time,
    )
    times_s = np.divide(times_ms, 1000.0, out=times_ms)

    # The last step can end after duration_s when the duration is not a whole number of steps.
    recorded = times_s < settings.duration_s
    if not recorded.all():
        units, times_s = units[recorded], times_s[recorded]
    spike_times = _split_trains(units, times_s, n_neurons)
    del units, times_ms, times_s

    wall_time_s = time.perf_counter() - started
    n_spikes = sum(len(train) for train in spike_times)
    logger.info(
        "simulated animal %d: %s, %s, %.0f s, %s (%.2f Hz mean) in %.1f s",
        seed, count_noun(n_neurons, "neuron"), count_noun(n_synapses, "synapse"), settings.duration_s, count_noun(n_spikes, "spike"),
        n_spikes / (n_neurons * settings.duration_s), wall_time_s,
    )  # fmt: skip

    return SimulatedAnimal(
        seed=int(seed),
        settings=settings,
        spike_times=spike_times,
        cell_types=cell_types,
        excitatory=excitatory,
        positions_um=positions_um,
        parameters=parameters,
        n_synapses=n_synapses,
        wall_time_s=wall_time_s,
    )


def _assign_types(type_mix: Mapping[str, float], n_neurons: int, rng: np.random.Generator) -> np.ndarray:
    """Return one type name per neuron in random order, with counts rounded from the mix.

    Counts are the floors of ``fraction * n_neurons``. The neurons left over go to the
    types with the largest remainders, so the counts always add up to ``n_neurons``.
    """
    names = list(type_mix)
    exact = np.array([type_mix[name] for name in names]) * n_neurons
    counts = np.floor(exact).astype(np.int64)
    leftover = n_neurons - int(counts.sum())
    by_remainder = np.argsort(-(exact - counts), kind="stable")
    counts[by_remainder[:leftover]] += 1

    labels = np.repeat(np.array(names, dtype=object), counts)
    return rng.permutation(labels).astype(str)


def _laminar_depths(cell_types: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Return each neuron's depth as a fraction of the volume's depth, drawn from its type's layer densities.

    A neuron's layer is drawn with probability proportional to its type's density in
    the layer times the layer's thickness. Its depth is then uniform within the layer.
    """
    tops = np.array([top for _, top, _ in LAMINAR_LAYERS])
    thickness = np.array([bottom - top for _, top, bottom in LAMINAR_LAYERS])

    depths = np.empty(len(cell_types))
    for name in np.unique(cell_types):
        members = np.flatnonzero(cell_types == name)
        weights = np.asarray(LAMINAR_DENSITY[name]) * thickness
        layers = rng.choice(len(LAMINAR_LAYERS), size=members.size, p=weights / weights.sum())
        depths[members] = tops[layers] + rng.uniform(0.0, 1.0, size=members.size) * thickness[layers]
    return depths


def _jittered_parameters(cell_types: np.ndarray, settings: SimulationSettings, rng: np.random.Generator) -> np.ndarray:
    """Return (n_neurons, 4) float32 a, b, c, d: each type's values with per-neuron jitter.

    a, b and d are scaled by ``1 + parameter_jitter * z`` and c is shifted by
    ``reset_jitter_mv * z``, with z standard normal clipped to [-2, 2]. At the default
    5 % and 1 mV, the types stay apart: b stays within 0.18 to 0.22 for b = 0.2 and
    0.225 to 0.275 for LTS, c within -57 to -53 mV for IB and -52 to -48 mV for CH, and
    a within 0.018 to 0.022 except for FS (0.09 to 0.11).
    """
    canonical = np.array([[NEURON_TYPES[name].a, NEURON_TYPES[name].b, NEURON_TYPES[name].c, NEURON_TYPES[name].d] for name in cell_types])
    canonical = canonical.reshape(-1, 4)
    z = np.clip(rng.standard_normal(canonical.shape), -2.0, 2.0)

    jittered = canonical.copy()
    jittered[:, [0, 1, 3]] *= 1.0 + settings.parameter_jitter * z[:, [0, 1, 3]]
    jittered[:, 2] += settings.reset_jitter_mv * z[:, 2]
    return jittered.astype(np.float32)


def _synaptic_weights(
    positions_um: np.ndarray,
    excitatory: np.ndarray,
    settings: SimulationSettings,
    rng: np.random.Generator,
) -> np.ndarray:
    """Return the dense (pre, post) float32 weight matrix, scaled for the time step.

    Rows are filled in blocks of presynaptic neurons, so the distance matrix never
    takes more memory than one block.
    """
    n_neurons = len(positions_um)
    weights = np.zeros((n_neurons, n_neurons), dtype=np.float32)
    pulse_scale = 1.0 / settings.dt_ms
    block_rows = max(1, 4_000_000 // n_neurons)

    for start in range(0, n_neurons, block_rows):
        pre = np.arange(start, min(start + block_rows, n_neurons))
        distance_um = np.linalg.norm(positions_um[pre, None, :] - positions_um[None, :, :], axis=-1)
        probability = settings.connection_probability * np.exp(-distance_um / settings.connection_length_um)
        connected = rng.random(probability.shape) < probability
        connected[np.arange(len(pre)), pre] = False

        magnitude = rng.random(probability.shape)
        scale = np.where(excitatory[pre], settings.excitatory_weight, -settings.inhibitory_weight)
        weights[pre] = np.where(connected, magnitude * scale[:, None] * pulse_scale, 0.0)

    return weights


def _input_blocks(settings: SimulationSettings, rng: np.random.Generator, coupling: np.ndarray) -> Iterator[np.ndarray]:
    """Yield the external input, one (steps, n_neurons) float32 block per drift update.

    The drifts and the fast fluctuations are Ornstein-Uhlenbeck processes sampled exactly
    on a 100 ms grid and held within each block. All start from their stationary
    distribution. ``coupling`` is each neuron's population coupling k. With
    ``fast_input_sd`` at 0, nothing is drawn for the fast fluctuations, so the input
    is the same as before they existed.
    """
    n_neurons = settings.n_neurons
    total_steps = settings.n_warmup_steps + settings.n_steps
    block_steps = max(1, int(round(DRIFT_STEP_MS / settings.dt_ms)))
    noise_sd = np.float32(settings.input_noise_sd * math.sqrt(1.0 / settings.dt_ms))

    decay = math.exp(-DRIFT_STEP_MS / (1000.0 * settings.drift_tau_s))
    innovation = math.sqrt(1.0 - decay**2)
    shared = settings.drift_shared_sd * rng.standard_normal()
    private = settings.drift_private_sd * rng.standard_normal(n_neurons)

    fast = settings.fast_input_sd > 0.0
    fast_decay = math.exp(-DRIFT_STEP_MS / (1000.0 * settings.fast_input_tau_s))
    fast_innovation = math.sqrt(1.0 - fast_decay**2)
    shared_weight = settings.fast_input_sd * coupling  # (n_neurons,)
    private_weight = settings.fast_input_sd * np.sqrt(1.0 - coupling**2)  # (n_neurons,)
    fast_shared = rng.standard_normal() if fast else 0.0
    fast_private = rng.standard_normal(n_neurons) if fast else np.zeros(n_neurons)

    for start in range(0, total_steps, block_steps):
        steps = min(block_steps, total_steps - start)
        mean = settings.input_mean + shared + private
        if fast:
            mean = mean + shared_weight * fast_shared + private_weight * fast_private
        mean = mean.astype(np.float32)

        block = rng.standard_normal((steps, n_neurons), dtype=np.float32)
        block *= noise_sd
        block += mean
        yield block

        shared = decay * shared + innovation * settings.drift_shared_sd * rng.standard_normal()
        private = decay * private + innovation * settings.drift_private_sd * rng.standard_normal(n_neurons)
        if fast:
            fast_shared = fast_decay * fast_shared + fast_innovation * rng.standard_normal()
            fast_private = fast_decay * fast_private + fast_innovation * rng.standard_normal(n_neurons)


# --- NWB files -------------------------------------------------------------------------


def animal_file_name(seed: int) -> str:
    """Return the file name of an animal, ``sim-animal-<seed>.nwb``."""
    return f"sim-animal-{seed}.nwb"


def _simulation_notes(settings: SimulationSettings, seed: int) -> dict[str, object]:
    """Return everything that determines a simulated file, as JSON-ready values."""
    return {
        "generator": "neurpir_nwb.simulate",
        "model_version": MODEL_VERSION,
        "seed": int(seed),
        "integration": {
            "scheme": "forward Euler; v in two half-steps of dt_ms/2, u in one step of dt_ms",
            "dt_ms": settings.dt_ms,
            "v_peak_mv": V_PEAK_MV,
            "v_start_mv": V_START_MV,
            "drift_step_ms": DRIFT_STEP_MS,
        },
        "neuron_types": {name: asdict(values) for name, values in NEURON_TYPES.items()},
        "settings": settings.to_dict(),
    }


def read_simulation_notes(path: str | Path) -> dict[str, object] | None:
    """Return the simulation notes of a file written by ``write_animal_nwb``.

    Returns None when the file cannot be read or contains no simulation notes.
    """
    try:
        with h5py.File(path, "r") as file:
            if "general/notes" not in file:
                return None
            raw = file["general/notes"][()]
    except OSError:
        return None

    text = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
    try:
        notes = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(notes, dict) or notes.get("generator") != "neurpir_nwb.simulate":
        return None
    return notes


def write_animal_nwb(animal: SimulatedAnimal, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write one animal as an NWB file whose Units table has one row per neuron.

    The file is written under a temporary name in the same folder and renamed when
    complete, so an interrupted write never leaves a partial file at ``path``.

    Parameters
    ----------
    animal
        The simulated animal.
    path
        Output file.
    overwrite
        Replace an existing file at ``path``.

    Returns
    -------
    Path
        The written file.

    Raises
    ------
    RunDirectoryError
        When ``path`` exists and ``overwrite`` is false.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise RunDirectoryError(f"{path} already exists; pass overwrite=True (--overwrite) to replace it")

    notes = _simulation_notes(animal.settings, animal.seed)
    nwbfile = _build_nwbfile(animal, notes)

    # The temporary file has the final name, so pynwb does not warn about its suffix. It
    # sits in a hidden folder beside the target, so a glob of *.nwb never matches it.
    temporary_dir = path.parent / f".{path.name}.{os.getpid()}.partial"
    temporary_dir.mkdir(parents=True, exist_ok=True)
    temporary = temporary_dir / path.name
    try:
        with NWBHDF5IO(str(temporary), "w") as io:
            io.write(nwbfile)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
        temporary_dir.rmdir()

    logger.info("wrote %s", path)
    return path


def _build_nwbfile(animal: SimulatedAnimal, notes: dict[str, object]) -> NWBFile:
    """Build the in-memory NWB file of an animal."""
    settings = animal.settings
    notes_json = json.dumps(notes, sort_keys=True)
    # The identifier depends only on what determines the data, so rewriting a file keeps it.
    identifier = str(uuid.uuid5(uuid.NAMESPACE_URL, f"neurpir-nwb:simulate:{notes_json}"))

    nwbfile = NWBFile(
        session_description=(
            f"Simulated spiking network of {settings.n_neurons} Izhikevich neurons of types "
            f"{', '.join(settings.type_mix)}, recorded for {settings.duration_s:g} s (seed {animal.seed})."
        ),
        identifier=identifier,
        session_start_time=SESSION_START_TIME,
        session_id=f"sim-session-{animal.seed}",
        experiment_description=(
            "In silico benchmark for cell-type identification: every unit's ground-truth type is in units.cell_type."
        ),
        keywords=["simulation", "Izhikevich neuron", "spiking network", "cell type"],
        notes=notes_json,
        source_script=f"neurpir_nwb.simulate (neurpir-nwb {__version__})",
        source_script_file_name="neurpir_nwb/simulate.py",
    )
    # NOTE: nwbinspector 0.7.2 ranks a missing age or sex as CRITICAL and a species outside
    # Latin binomial form only as BEST_PRACTICE_VIOLATION. A network has no age or sex, so
    # they are given as zero and unknown ("U"), and the subject description states this.
    nwbfile.subject = Subject(
        subject_id=animal.subject_id,
        species="in silico",
        sex="U",
        age="P0D",
        description="Simulated network of Izhikevich neurons; age and sex do not apply.",
    )

    nwbfile.units = _build_units(animal, notes_json)
    return nwbfile


def _build_units(animal: SimulatedAnimal, notes_json: str) -> Units:
    """Build the Units table from whole columns, which is much faster than adding rows one by one."""
    settings = animal.settings
    n_neurons = settings.n_neurons
    counts = np.array([len(train) for train in animal.spike_times], dtype=np.int64)
    all_times = np.concatenate(animal.spike_times) if counts.sum() else np.zeros(0, dtype=np.float64)

    if len(all_times):
        # gzip with shuffle stores ascending float64 times in about 70 % of their raw size.
        all_times = H5DataIO(all_times, compression="gzip", compression_opts=4, shuffle=True)
    spike_times = VectorData(name="spike_times", description="Spike times in seconds from the recording start.", data=all_times)
    spike_times_index = VectorIndex(name="spike_times_index", data=np.cumsum(counts), target=spike_times)
    obs_intervals = VectorData(
        name="obs_intervals",
        description="Observation interval of each unit in seconds: the whole recording.",
        data=np.tile([0.0, settings.duration_s], (n_neurons, 1)),
    )
    obs_intervals_index = VectorIndex(name="obs_intervals_index", data=np.arange(1, n_neurons + 1), target=obs_intervals)

    x_um, y_um, z_um = animal.positions_um.T
    a, b, c, d = animal.parameters.astype(np.float64).T
    columns = [
        spike_times,
        spike_times_index,
        obs_intervals,
        obs_intervals_index,
        VectorData(name="cell_type", description="Ground-truth Izhikevich type: " + ", ".join(NEURON_TYPES) + ".", data=list(animal.cell_types)),
        VectorData(name="excitatory", description="Whether the neuron's synapses are excitatory.", data=animal.excitatory),
        VectorData(name="unit_x", description="x position of the neuron in micrometres.", data=x_um),
        VectorData(name="unit_y", description="y position of the neuron in micrometres.", data=y_um),
        VectorData(name="unit_z", description="z position of the neuron in micrometres.", data=z_um),
        VectorData(name="izhikevich_a", description="Recovery rate a in 1/ms, after jitter.", data=a),
        VectorData(name="izhikevich_b", description="Sensitivity b of the recovery variable to v, after jitter.", data=b),
        VectorData(name="izhikevich_c", description="Reset potential c in mV, after jitter.", data=c),
        VectorData(name="izhikevich_d", description="Reset increment d of the recovery variable, after jitter.", data=d),
    ]

    description = (
        f"Simulated Izhikevich neurons, forward Euler with dt = {settings.dt_ms:g} ms "
        f"(v in two half-steps). Simulation settings as JSON: {notes_json}"
    )
    # Spike times are interpolated within a step but accurate only to about one step.
    return Units(
        name="units",
        description=description,
        id=np.arange(n_neurons),
        columns=columns,
        resolution=settings.dt_ms / 1000.0,
    )


# --- data sets -------------------------------------------------------------------------

#: A function called with the seed and the file of each animal once the file is ready.
OnAnimal = Callable[[int, Path], None]


def simulate_dataset(
    out_dir: str | Path,
    settings: SimulationSettings,
    seeds: Sequence[int],
    *,
    overwrite: bool = False,
    on_animal: OnAnimal | None = None,
    progress: Progress | None = None,
) -> list[Path]:
    """Simulate one animal per seed and write each as ``sim-animal-<seed>.nwb``.

    A file that already exists with the same seed and settings (read from its notes)
    is kept without simulating again.

    Parameters
    ----------
    out_dir
        Folder of the files; it is created when missing.
    settings
        Settings shared by all animals.
    seeds
        One seed per animal; seeds must be distinct.
    overwrite
        Simulate again and replace existing files, whatever their settings.
    on_animal
        Called with the seed and the file of each animal once the file is ready.
    progress
        Reports the simulated seconds of all animals together.

    Returns
    -------
    list of Path
        The file of each seed, in the order of ``seeds``.

    Raises
    ------
    RunDirectoryError
        When a file exists with other settings, another model version or unreadable
        notes, and ``overwrite`` is false.
    RecipeError
        When a seed is invalid or repeated.
    """
    out_dir = Path(out_dir)
    seeds = list(seeds)
    repeated = sorted({seed for seed in seeds if seeds.count(seed) > 1})
    if repeated:
        raise RecipeError(f"seeds {repeated} are repeated; give each animal its own seed")

    progress = progress or SilentProgress()
    seconds_per_animal = max(1, int(math.ceil(settings.duration_s)))
    paths = []

    with progress.stage("simulating animals (simulated seconds)", total=seconds_per_animal * len(seeds)) as advance:
        for number, seed in enumerate(seeds):
            done_before = number * seconds_per_animal
            path = out_dir / animal_file_name(seed)

            if path.exists() and not overwrite and _has_same_simulation(path, settings, seed):
                logger.info("skipped animal %d: %s already contains it, simulated with the same settings", seed, path)
            else:
                animal = simulate_animal(settings, seed, on_time=lambda time_s: advance(done_before + int(time_s)))
                write_animal_nwb(animal, path, overwrite=True)

            advance(done_before + seconds_per_animal)
            paths.append(path)
            if on_animal is not None:
                on_animal(seed, path)

    return paths


def _has_same_simulation(path: Path, settings: SimulationSettings, seed: int) -> bool:
    """Return True when ``path`` contains this seed and these settings, or raise RunDirectoryError when it contains others."""
    notes = read_simulation_notes(path)
    if notes is None:
        raise RunDirectoryError(
            f"{path} exists but contains no readable simulation notes; "
            "pass overwrite=True (--overwrite) to replace it, or choose another output folder"
        )

    expected = _simulation_notes(settings, seed)
    differences = [key for key in ("model_version", "seed", "integration", "neuron_types") if notes.get(key) != expected[key]]
    stored_settings = notes.get("settings", {})
    if isinstance(stored_settings, dict):
        # Files written before a setting existed were simulated with its default.
        stored_settings = {**SimulationSettings().to_dict(), **stored_settings}
        differences += [
            f"settings.{key} ({stored_settings.get(key)!r} in the file, {value!r} now)"
            for key, value in expected["settings"].items()
            if stored_settings.get(key) != value
        ]
    else:
        differences.append("settings")

    if differences:
        raise RunDirectoryError(
            f"{path} was simulated with other settings: {', '.join(differences)}; "
            "pass overwrite=True (--overwrite) to replace it, or choose another output folder"
        )
    return True
