"""The recipe: a YAML file that describes what to load, how to train and where to write.

A recipe is validated by the pydantic models below. Unknown keys and wrong types are
errors that name the key, its line in the file and the allowed values. Source paths
are relative to the recipe file; the output directory is relative to the working
directory, like any command-line path.

Examples
--------
>>> recipe = load_recipe("recipes/human-mtl-regions.yaml")  # doctest: +SKIP
>>> recipe.segments.window_s                                 # doctest: +SKIP
10.24
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from neurpir_nwb.errors import RecipeError, SourceError

__all__ = ["ProblemPolicy", "Recipe", "UnitsPolicy", "bundled_recipes", "load_recipe", "recipe_json_schema"]


class _Strict(BaseModel):
    """Base of every recipe section: unknown keys are errors, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)


#: Names of the simulator's neuron types.
NeuronType = Literal["RS", "IB", "CH", "FS", "LTS"]


class Simulation(_Strict):
    """Simulated animals of Izhikevich neurons with known types, written as NWB files into the run directory."""

    animals: int = Field(default=4, ge=1, description="Number of animals; animal i uses seed first_seed + i.")
    first_seed: int = Field(default=0, ge=0, description="Seed of the first animal.")
    neurons: int = Field(default=200, ge=2, description="Neurons per animal.")
    duration_s: float = Field(default=300.0, gt=0, description="Recorded activity per animal, in seconds.")
    type_mix: dict[NeuronType, Annotated[float, Field(gt=0)]] | None = Field(
        default=None, description="Share of each neuron type (RS, IB, CH, FS, LTS); the simulator's default mix when not given."
    )
    parameter_jitter: float | None = Field(
        default=None, ge=0, description="Relative SD of each neuron's a, b and d around its type's values; the simulator's default when not given."
    )
    reset_jitter_mv: float | None = Field(
        default=None, ge=0, description="SD in mV of each neuron's reset potential c; the simulator's default when not given."
    )
    layout: Literal["uniform", "laminar"] | None = Field(
        default=None,
        description=(
            "'uniform' places every type anywhere in the volume; 'laminar' makes z cortical depth "
            "and gives each type its own layer densities. The simulator's default (uniform) when not given."
        ),
    )
    fast_input_sd: float | None = Field(
        default=None, ge=0, description="SD of the fast input fluctuations (time constant fast_input_tau_s). At 0, the default, there are none."
    )
    fast_input_tau_s: float | None = Field(
        default=None, gt=0, description="Time constant in seconds of the fast input fluctuations; the simulator's default (0.2 s) when not given."
    )
    population_coupling: dict[NeuronType, Annotated[float, Field(ge=0, le=1)]] | None = Field(
        default=None,
        description=(
            "Coupling k (0 to 1) of each type (RS, IB, CH, FS, LTS) to the fast input common to all neurons: "
            "a neuron's fast input is k times the common part plus sqrt(1 - k^2) times its own. Types left out have 0."
        ),
    )

    @model_validator(mode="after")
    def _check_coupling_has_input(self) -> Simulation:
        coupled = any(value > 0 for value in (self.population_coupling or {}).values())
        if coupled and not self.fast_input_sd:
            raise ValueError(
                "population_coupling has no effect while fast_input_sd is 0 or not given; "
                "set fast_input_sd above 0 (for example 2.5) or remove population_coupling"
            )
        return self


class OphysOptions(_Strict):
    """Selection of the ROI traces to read from an optical physiology file."""

    source: Literal["auto", "DfOverF", "Fluorescence"] = Field(
        default="auto", description="Container of the RoiResponseSeries; 'auto' takes DfOverF when present, else Fluorescence."
    )
    series: list[str] | None = Field(default=None, description="Names of the RoiResponseSeries to read; by default all of the container.")


class TimeSeriesOptions(_Strict):
    """Plain TimeSeries in `acquisition` read as one neuron each."""

    pattern: str = Field(description="Glob over the names of the TimeSeries in acquisition, such as 'Activity_*'.")


class Source(_Strict):
    """One NWB file to load, the assets of a dandiset, or a set of simulated animals.

    A file is read as a Units table unless ``ophys`` or ``timeseries`` is given.
    """

    path: Path | None = Field(
        default=None,
        description="NWB file, relative to the recipe file or absolute. With 'dandi': a glob over the asset paths, such as 'sub-*/*.nwb'.",
    )
    dandi: str | None = Field(
        default=None, description="Dandiset to read assets from: DANDI:<id>, DANDI:<id>/draft or DANDI:<id>/<version>."
    )
    mode: Literal["download", "stream"] = Field(
        default="download",
        description="With 'dandi': 'download' verified copies into the cache folder, or 'stream' the assets over HTTP range requests.",
    )
    cache: Path | None = Field(
        default=None,
        description=(
            "With 'dandi' and mode 'download': folder of the downloaded dandisets, relative to the recipe file. "
            "By default $NEURPIR_DANDI_CACHE, else the user's cache folder."
        ),
    )
    api_url: str | None = Field(
        default=None, description="With 'dandi': REST API of another DANDI instance; by default $NEURPIR_DANDI_API_URL or the public archive."
    )
    simulate: Simulation | None = Field(default=None, description="Simulated animals, written to <run directory>/simulated.")
    ophys: OphysOptions | None = Field(default=None, description="Read the file's ROI traces instead of its Units table.")
    timeseries: TimeSeriesOptions | None = Field(default=None, description="Read plain TimeSeries as neurons instead of the Units table.")

    @field_validator("dandi")
    @classmethod
    def _check_dandi_reference(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from neurpir_nwb.dandi import parse_dandi_ref  # imported here because the dandi client loads slowly

        try:
            return str(parse_dandi_ref(value))
        except SourceError as error:
            raise ValueError(str(error)) from None

    @model_validator(mode="after")
    def _check_kind(self) -> Source:
        if self.dandi is not None:
            if self.simulate is not None:
                raise ValueError("a source is either 'dandi' assets or 'simulate'd animals, not both")
        elif (self.path is None) == (self.simulate is None):
            raise ValueError("a source needs exactly one of 'path' (an NWB file), 'dandi' (a dandiset) or 'simulate' (simulated animals)")
        elif "mode" in self.model_fields_set or self.cache is not None or self.api_url is not None:
            raise ValueError("'mode', 'cache' and 'api_url' apply to 'dandi' sources only")
        if self.ophys is not None and self.timeseries is not None:
            raise ValueError("a source is read either as 'ophys' ROI traces or as 'timeseries', not both")
        if self.simulate is not None and (self.ophys is not None or self.timeseries is not None):
            raise ValueError("simulated animals have Units tables only; remove 'ophys' or 'timeseries' from that source")
        return self

    @property
    def modality(self) -> str:
        """``"ecephys"`` for Units tables, ``"ophys"`` for ROI traces and plain TimeSeries."""
        return "ophys" if self.ophys is not None or self.timeseries is not None else "ecephys"


class LabelSource(_Strict):
    """Source of one label of every neuron: a units or electrodes column, or an annotation table."""

    from_: str = Field(
        alias="from",
        pattern=r"^((units|electrodes)\.[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?|rois\.[A-Za-z_][A-Za-z0-9_]*|annotations)$",
        description=(
            "'units.<column>', 'electrodes.<column>' (through the units' electrode links), "
            "'rois.<column>' for a PlaneSegmentation column, "
            "'units.<region column>.<column>' for a units column that links to electrodes, or "
            "'annotations' for a CSV/TSV annotation table (with 'table' and 'column')."
        ),
    )
    field: str | None = Field(
        default=None,
        description="Field to take from structured values such as 'brain_region: ALM; cortical_layer: 5'.",
    )
    table: Path | None = Field(default=None, description="Annotation table (CSV or TSV), relative to the recipe file.")
    column: str | None = Field(default=None, description="Label column of the annotation table.")
    normalise: bool = Field(default=True, description="Trim and case-fold annotation labels; the raw values are kept.")
    merge: dict[str, str] | None = Field(default=None, description="Annotation label to the class it merges into, such as {pvalb: inhibitory}.")
    drop: list[str] = Field(default_factory=list, description="Annotation classes to leave unlabelled.")

    @model_validator(mode="after")
    def _check_annotation_fields(self) -> LabelSource:
        is_table = self.from_ == "annotations"
        if is_table and (self.table is None or self.column is None):
            raise ValueError("a label from 'annotations' needs 'table' (a CSV or TSV file) and 'column' (its label column)")
        if not is_table and (self.table is not None or self.column is not None or self.merge or self.drop):
            raise ValueError(f"'table', 'column', 'merge' and 'drop' apply to labels from 'annotations', not from {self.from_!r}")
        return self


class UnitsPolicy(_Strict):
    """Policy of the Units reader for irregular spike trains, and the unit of the stored spike times."""

    sort_spikes: bool = Field(
        default=False,
        description=(
            "Sort descending spike trains with a warning instead of rejecting the file; "
            "the same as problems.descending_spike_times: warn."
        ),
    )
    spike_times_unit: Literal["s", "ms", "samples"] = Field(
        default="s",
        description=(
            "Unit of the stored spike_times: 's' (seconds, as NWB requires), 'ms', or 'samples' "
            "(sample indices, with sampling_rate_hz). The reader converts them to seconds."
        ),
    )
    sampling_rate_hz: float | None = Field(
        default=None, gt=0, description="Sampling rate in Hz that spike_times count in when spike_times_unit is 'samples'."
    )

    @model_validator(mode="after")
    def _check_sampling_rate(self) -> UnitsPolicy:
        if self.spike_times_unit == "samples" and self.sampling_rate_hz is None:
            raise ValueError("spike_times_unit 'samples' needs sampling_rate_hz: the rate in Hz that the sample indices count")
        if self.spike_times_unit != "samples" and self.sampling_rate_hz is not None:
            raise ValueError("sampling_rate_hz applies only to spike_times_unit 'samples'; remove it or set spike_times_unit: samples")
        return self


#: Action of a reader on one kind of data problem.
ProblemAction = Literal["raise", "warn", "ignore"]


def _problem(default: str, description: str) -> Any:
    """Return the pydantic field of one data problem, with its default action."""
    return Field(default=default, description=description)


class ProblemPolicy(_Strict):
    """Action of the readers on each data problem they detect in a file.

    'raise' stops with an error that names the file, the neurons, the values and the fix.
    'warn' applies the repair named in the problem's description and logs it with counts
    and neuron ids. 'ignore' applies the same repair without a warning.
    ``neurpir-nwb inspect`` lists every problem and exits with status 1 when one of them is set to 'raise'.
    """

    spike_times_not_seconds: ProblemAction = _problem(
        "raise",
        "Spike times that look like sample indices (at least 20 spikes, all whole numbers) or milliseconds "
        "(a spike later than 24 h). Repair: none, the times are read as seconds; "
        "the fix is units.spike_times_unit (and units.sampling_rate_hz).",
    )
    descending_spike_times: ProblemAction = _problem(
        "raise",
        "A unit's spike times that descend, as trial-relative times do. Repair: the train is sorted.",
    )
    nonfinite_spike_times: ProblemAction = _problem(
        "warn", "NaN or infinite spike times. Repair: they are dropped."
    )
    negative_spike_times: ProblemAction = _problem(
        "warn", "Negative spike times, such as -1 sentinels. Repair: they are dropped."
    )
    duplicate_spike_times: ProblemAction = _problem(
        "warn", "A spike time equal to the one before it in the same unit. Repair: both are kept."
    )
    empty_units: ProblemAction = _problem(
        "warn", "Units with no spike times left. Repair: they are kept with all-zero activity."
    )
    spikes_outside_obs_intervals: ProblemAction = _problem(
        "warn",
        "Spike times outside the unit's obs_intervals. Repair: they are dropped, and windows outside "
        "the unit's obs_intervals are left out of training and embedding.",
    )
    unlinked_units: ProblemAction = _problem(
        "warn",
        "Units without a link to the electrodes table (no electrodes column, or an empty row), when positions "
        "or labels need one. Repair: positions of all units become unit row numbers; electrode labels are empty.",
    )
    missing_labels: ProblemAction = _problem(
        "warn",
        "Label values (such as electrode locations) that are missing, empty, 'unknown', 'none', 'n/a', 'nan' "
        "or 'null'. Repair: the neurons stay unlabelled; they train, and the probe leaves them out.",
    )
    region_out_of_bounds: ProblemAction = _problem(
        "raise",
        "Region indices (electrodes, rois or another DynamicTableRegion) that point outside their table. "
        "Repair: those links are dropped, and trace columns that point outside are left out.",
    )
    transposed_traces: ProblemAction = _problem(
        "warn", "RoiResponseSeries data stored as (ROIs, time) instead of (time, ROIs). Repair: it is transposed."
    )
    nonfinite_samples: ProblemAction = _problem(
        "warn",
        "NaN or infinite samples in traces. Repair: neurons with only such samples are dropped; other such "
        "samples become NaN, and windows that contain them are left out.",
    )
    invalid_timestamps: ProblemAction = _problem(
        "raise",
        "Trace timestamps that are NaN, or that do not increase. Repair: samples with NaN times are dropped, "
        "the others are sorted by time, and repeated times keep their first sample.",
    )
    irregular_timestamps: ProblemAction = _problem(
        "warn",
        "Trace timestamps whose intervals differ from their median by more than 1 %. Repair: traces are "
        "resampled onto a regular grid, and grid points inside gaps become NaN.",
    )
    raw_integer_data: ProblemAction = _problem(
        "warn", "Integer trace data with the default conversion 1 and offset 0, which may be raw counts. Repair: none."
    )
    naive_session_start: ProblemAction = _problem(
        "warn",
        "A session_start_time without a timezone. Repair: pynwb takes the local timezone of the machine "
        "that reads the file; times inside the file are relative to it, so they do not change.",
    )
    old_schema: ProblemAction = _problem(
        "warn",
        "A file of an NWB schema older than 2.2.0 (written by pynwb 1.2 or earlier) or without cached "
        "specifications. Repair: none; pynwb maps it to its current schema.",
    )
    uncached_extension: ProblemAction = _problem(
        "warn",
        "An extension namespace used in the file but not cached in it, which pynwb has loaded from an installed "
        "package. Repair: the installed version of the extension is used. A namespace that pynwb has not loaded "
        "makes the file unreadable, whatever this setting.",
    )


class Segments(_Strict):
    """Binning, windows and neighbourhoods."""

    bin_size_s: float = Field(default=0.02, gt=0, description="Width of one bin, in seconds.")
    bins_per_patch: int = Field(default=16, ge=1, description="Bins per patch; one patch is one token.")
    patches: int = Field(default=32, ge=1, description="Patches per window.")
    neighbours: int = Field(default=8, ge=0, description="Nearest neighbours the encoder sees with each neuron.")
    distance_bins: int = Field(default=32, ge=2, description="Distance bins of the neighbours; bin 0 is the neuron itself.")
    rate_hz: float | None = Field(
        default=None,
        gt=0,
        description="Rate in Hz that traces (ophys) are resampled to; it sets the bin width to 1 / rate_hz. Not for spike trains.",
    )
    normalise: Literal["zscore", "robust"] = Field(
        default="zscore",
        description="Per-neuron normalisation of traces (ophys): z-score, or median and scaled MAD. Spike counts are not normalised.",
    )
    store: Literal["auto", "memory", "zarr"] = Field(
        default="auto",
        description=(
            "Where the segment set of spike trains lives: in memory (saved as segments.nc), or in a zarr folder "
            "(segments.zarr) written one block of units at a time and read lazily in training. auto picks zarr "
            "when the binned activity exceeds 4 GiB. Traces (ophys) stay in memory."
        ),
    )

    @property
    def bin_width_s(self) -> float:
        """Width of one bin in seconds: ``1 / rate_hz`` when a resampling rate is given, else ``bin_size_s``."""
        return 1.0 / self.rate_hz if self.rate_hz is not None else self.bin_size_s

    @property
    def window_s(self) -> float:
        """Length of one window, in seconds."""
        return self.bin_width_s * self.bins_per_patch * self.patches


class Model(_Strict):
    """Encoder and projector sizes."""

    dim: int = Field(default=128, ge=2, description="Width of the encoder; the embedding has this many dimensions.")
    heads: int = Field(default=4, ge=1, description="Attention heads; dim / heads must be even.")
    temporal_layers: int = Field(default=2, ge=0, description="Temporal transformer blocks.")
    spatiotemporal_layers: int = Field(default=2, ge=0, description="Spatio-temporal blocks.")
    mlp_ratio: float = Field(default=4.0, gt=0, description="Hidden width of each block's MLP, as a multiple of dim.")
    dropout: float = Field(default=0.0, ge=0, lt=1, description="Dropout rate in the encoder.")
    projector: list[int] = Field(default=[256, 256], min_length=1, description="Widths of the VICReg projector's layers.")
    own_embedding: bool = Field(
        default=False,
        description=(
            "Append a second half to the embedding: the target's tokens after the temporal blocks, "
            "before spatial attention, trained by VICReg through its own projector."
        ),
    )
    batching: Literal["per-target", "population"] = Field(
        default="per-target",
        description=(
            "'per-target' encodes each target with copies of its neighbours (the published formulation). "
            "'population' encodes every neuron of a recording window once and makes each of them a target; "
            "train.batch_size is then the minimum number of targets per step. The two give the same embeddings "
            "with at most one spatio-temporal layer; with deeper stacks, population batching updates every neuron "
            "in its own neighbourhood, which is a different model."
        ),
    )

    @model_validator(mode="after")
    def _check_heads(self) -> Model:
        head_dim, remainder = divmod(self.dim, self.heads)
        if remainder or head_dim % 2:
            raise ValueError(
                f"dim {self.dim} with {self.heads} heads gives a head size of {self.dim / self.heads:g}; "
                "rotary positions need an even whole head size, so choose dim as a multiple of 2 * heads"
            )
        return self


class Loss(_Strict):
    """VICReg loss weights."""

    name: Literal["vicreg"] = Field(default="vicreg", description="Loss function.")
    invariance: float = Field(default=25.0, ge=0, description="Weight of the invariance term.")
    variance: float = Field(default=25.0, ge=0, description="Weight of the variance term.")
    covariance: float = Field(default=1.0, ge=0, description="Weight of the covariance term.")


class Train(_Strict):
    """Optimiser, schedule and device."""

    epochs: int = Field(default=30, ge=1, description="Number of epochs.")
    steps_per_epoch: int = Field(default=50, ge=1, description="Optimiser steps per epoch.")
    batch_size: int = Field(default=64, ge=2, description="Positive pairs per step.")
    lr: float = Field(default=1.0e-4, gt=0, description="Peak learning rate of AdamW.")
    weight_decay: float = Field(default=0.01, ge=0, description="AdamW weight decay.")
    warmup_fraction: float = Field(default=0.05, ge=0, lt=1, description="Share of the steps spent in linear warm-up before cosine decay.")
    grad_clip: float = Field(default=1.0, gt=0, description="Maximum norm of the gradient.")
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="'auto' takes CUDA when available.")
    precision: Literal["auto", "fp32", "bf16"] = Field(default="auto", description="'auto' is bf16 autocast on CUDA and fp32 on the CPU.")
    seed: int = Field(default=0, ge=0, description="Seed of every random draw.")
    neighbour_dropout: float = Field(
        default=0.0,
        ge=0,
        lt=1,
        description="Probability that a view hides each neighbour, independently in the two views of a pair.",
    )
    holdout_fraction: float = Field(
        default=0.0,
        ge=0,
        lt=1,
        description="Share of each neuron's windows, the last in time, kept out of training to score same-neuron retrieval.",
    )
    embed_batch_size: int = Field(default=256, ge=1, description="Windows per forward pass when computing embeddings.")
    compile: bool = Field(default=False, description="Compile the encoder and projector with torch.compile before training.")
    checkpoint_steps: int = Field(
        default=100,
        ge=0,
        description="Also save <run directory>/model/checkpoint.pt every this many steps, besides after every epoch; 0 for epochs only.",
    )


class Evaluate(_Strict):
    """Probe settings."""

    probe: Literal["logistic", "knn"] = Field(default="logistic", description="Classifier fitted on the embeddings.")
    split: Literal["stratified", "leave-one-subject-out", "test-subjects"] = Field(
        default="stratified",
        description=(
            "'stratified': stratified k-fold over neurons. 'leave-one-subject-out': each subject is the probe's "
            "test set once. 'test-subjects': the encoder and the probe never see test_subjects, which are scored zero-shot."
        ),
    )
    folds: int = Field(default=5, ge=2, description="Folds of the stratified split.")
    test_subjects: list[str] = Field(default_factory=list, description="Subject ids of the test set of the 'test-subjects' split.")
    class_balance: bool = Field(default=True, description="Weight classes by inverse frequency in the logistic probe.")
    knn_neighbours: int = Field(default=5, ge=1, description="Neighbours of the 'knn' probe.")
    label: str | None = Field(default=None, description="Label to predict; by default the first label of the recipe.")

    @model_validator(mode="after")
    def _check_test_subjects(self) -> Evaluate:
        if self.split == "test-subjects" and not self.test_subjects:
            raise ValueError("split 'test-subjects' needs test_subjects: the subject ids to hold out, such as [sim-animal-3]")
        return self


class Output(_Strict):
    """Location of the run directory."""

    dir: Path | None = Field(default=None, description="Run directory; 'runs/<name>' when not given.")


class Recipe(_Strict):
    """A whole recipe: data, labels, segments, model, loss, training, evaluation and output."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Name of the run.")
    sources: list[Source] = Field(min_length=1, description="NWB files to learn from.")
    labels: dict[str, LabelSource] = Field(default_factory=dict, description="Label name to where its values come from.")
    units: UnitsPolicy = Field(default_factory=UnitsPolicy)
    problems: ProblemPolicy = Field(
        default_factory=ProblemPolicy,
        description="Data problem name to 'raise', 'warn' or 'ignore'; see neurpir-nwb inspect.",
    )
    segments: Segments = Field(default_factory=Segments)
    model: Model = Field(default_factory=Model)
    loss: Loss = Field(default_factory=Loss)
    train: Train = Field(default_factory=Train)
    evaluate: Evaluate = Field(default_factory=Evaluate)
    output: Output = Field(default_factory=Output)
    separate_models: bool = Field(
        default=False,
        description="Train one model per modality when the sources mix Units tables and ophys traces, each in <run directory>/<modality>.",
    )

    #: Folder the relative source paths are resolved against; set by :func:`load_recipe`.
    base_dir: Path = Field(default=Path("."), exclude=True)

    @field_validator("labels")
    @classmethod
    def _check_label_names(cls, labels: dict[str, LabelSource]) -> dict[str, LabelSource]:
        for name in labels:
            if not name.isidentifier():
                raise ValueError(f"label name {name!r} must be a Python identifier, such as 'region' or 'cell_type'")
        return labels

    @model_validator(mode="after")
    def _check_modalities(self) -> Recipe:
        modalities = {source.modality for source in self.sources}
        if self.segments.rate_hz is not None and "ecephys" in modalities:
            raise ValueError("segments.rate_hz resamples traces of ophys sources; spike trains are binned with segments.bin_size_s")
        if len(modalities) > 1 and not self.separate_models:
            raise ValueError(
                "sources mix ecephys Units tables and ophys traces; set separate_models: true to train one model "
                "per modality, or use one recipe per modality"
            )
        return self

    @property
    def modality(self) -> str:
        """Modality of the sources: ``"ecephys"`` or ``"ophys"``; see :meth:`split_by_modality` for mixed sources."""
        return self.sources[0].modality

    def split_by_modality(self) -> dict[str, Recipe]:
        """Return one recipe per modality of the sources, each writing to ``<run directory>/<modality>``."""
        recipes = {}
        for modality in dict.fromkeys(source.modality for source in self.sources):
            part = self.model_copy(deep=True)
            part.sources = [source for source in self.sources if source.modality == modality]
            part.name = f"{self.name}-{modality}"
            part.output = Output(dir=self.output_dir / modality)
            part.separate_models = False
            part.base_dir = self.base_dir
            recipes[modality] = part
        return recipes

    @model_validator(mode="after")
    def _check_probe_label(self) -> Recipe:
        if self.evaluate.label is not None and self.evaluate.label not in self.labels:
            allowed = ", ".join(self.labels) or "none defined"
            raise ValueError(f"evaluate.label {self.evaluate.label!r} is not a label of the recipe (labels: {allowed})")
        return self

    @property
    def source_paths(self) -> list[Path]:
        """Paths of the local NWB file sources, resolved against the recipe's folder; simulated and DANDI sources are left out."""
        return [(self.base_dir / source.path).resolve() for source in self.sources if source.path is not None and source.dandi is None]

    @property
    def annotation_tables(self) -> list[Path]:
        """Paths of the annotation tables that labels come from, resolved against the recipe's folder."""
        return [(self.base_dir / spec.table).resolve() for spec in self.labels.values() if spec.table is not None]

    @property
    def simulations(self) -> list[Simulation]:
        """The simulated sources."""
        return [source.simulate for source in self.sources if source.simulate is not None]

    @property
    def output_dir(self) -> Path:
        """The run directory."""
        return self.output.dir if self.output.dir is not None else Path("runs") / self.name

    @property
    def probe_label(self) -> str | None:
        """The label the probe predicts, or None when the recipe has no labels."""
        if self.evaluate.label is not None:
            return self.evaluate.label
        return next(iter(self.labels), None)

    def resolved(self) -> dict[str, Any]:
        """Return the recipe with every default filled in and absolute source paths."""
        data = self.model_dump(mode="json", by_alias=True, exclude_none=True)
        for source, entry in zip(self.sources, data["sources"]):
            if source.dandi is None:
                entry.pop("mode", None)
            if source.dandi is None and source.path is not None:
                entry["path"] = str((self.base_dir / source.path).resolve())
            if source.cache is not None:
                entry["cache"] = str((self.base_dir / source.cache).resolve())
        data["output"] = {"dir": str(self.output_dir)}
        return data

    def sha256(self) -> str:
        """Return the sha256 of the resolved recipe, in canonical JSON."""
        return _sha256_json(self.resolved())

    def data_sha256(self, source_files: list[Path] | None = None) -> str:
        """Return the sha256 of the parts that decide the segment set: sources, labels, units, problems and segments.

        Each source file counts by its path, size and modification time: the files
        given in ``source_files`` (those the sources resolved to, DANDI assets and
        simulated animals included), else the recipe's local files.
        """
        data = self.resolved()
        part = {key: data[key] for key in ("sources", "labels", "units", "problems", "segments")}
        # Where the set is stored does not change its contents.
        part["segments"] = {key: value for key, value in part["segments"].items() if key != "store"}
        files = list(source_files) if source_files is not None else self.source_paths
        part["source_files"] = [_file_signature(path) for path in files + self.annotation_tables]
        return _sha256_json(part)


def load_recipe(
    path: str | Path,
    *,
    sources: list[str | Path] | None = None,
    output: str | Path | None = None,
) -> Recipe:
    """Read and validate a recipe file.

    Parameters
    ----------
    path
        The YAML recipe.
    sources
        Paths that replace the recipe's sources. Relative paths are taken from the
        working directory, since they come from the command line.
    output
        Run directory that replaces the recipe's ``output.dir``.

    Raises
    ------
    RecipeError
        When the file is missing, is not YAML, or fails validation. The message names
        the key, its line and the allowed values.
    """
    path = _find_recipe(Path(path))

    text = path.read_text(encoding="utf-8")
    try:
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise RecipeError(f"recipe {path} is not valid YAML: {' '.join(str(error).split())}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {path} must be a mapping of keys such as 'name' and 'sources', not {type(data).__name__}")

    if sources:
        # Paths from the command line are read like the recipe's first file source (Units, ophys or timeseries).
        template = next((dict(item) for item in data.get("sources") or [] if isinstance(item, dict) and "path" in item), {})
        options = {key: value for key, value in template.items() if key in ("ophys", "timeseries")}
        data["sources"] = [{"path": str(Path(source).resolve()), **options} for source in sources]
    if output is not None:
        data.setdefault("output", {})
        if not isinstance(data["output"], dict):
            data["output"] = {}
        data["output"]["dir"] = str(output)

    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as error:
        raise RecipeError(_describe_validation_error(path, root, error)) from None

    recipe.base_dir = path.resolve().parent
    return recipe


def bundled_recipes() -> dict[str, Path]:
    """Return the recipes shipped with the package, by name.

    An installed wheel carries them in ``neurpir_nwb/recipes``; a source checkout has
    them in ``recipes/`` beside the package.
    """
    package = Path(__file__).resolve().parent
    for folder in (package / "recipes", package.parent / "recipes"):
        if folder.is_dir():
            return {path.stem: path for path in sorted(folder.glob("*.yaml"), key=lambda path: path.stem)}
    return {}


def _find_recipe(path: Path) -> Path:
    """Return ``path`` if it is a file, else the bundled recipe of that name, else raise RecipeError."""
    if path.is_file():
        return path

    bundled = bundled_recipes()
    if path.suffix in ("", ".yaml") and path.stem in bundled and len(path.parts) <= 2:
        return bundled[path.stem]

    names = ", ".join(bundled) or "none found"
    raise RecipeError(f"recipe {path} not found; give the path of a YAML recipe, or the name of a bundled recipe ({names})")


def recipe_json_schema() -> dict[str, Any]:
    """Return the JSON Schema of the recipe, as exported to ``schemas/recipe.schema.json``."""
    schema = Recipe.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "neurpir-nwb recipe"
    return schema


def _describe_validation_error(path: Path, root: yaml.Node | None, error: ValidationError) -> str:
    """Turn the first pydantic error into one line with the file, the line, the key and the fix."""
    errors = error.errors()
    first = errors[0]
    # Pydantic marks an invalid mapping key with a trailing "[key]", which is not part of the YAML path.
    location = [part for part in first["loc"] if isinstance(part, (str, int)) and part != "[key]"]
    key = ".".join(str(part) for part in location) or "(top level)"
    line = _line_of(root, location)
    where = f"{path}, line {line}" if line else str(path)

    if first["type"] == "extra_forbidden":
        model = _model_at(Recipe, location[:-1])
        allowed = sorted(_field_keys(model)) if model else []
        bad = str(location[-1])
        close = difflib.get_close_matches(bad, allowed, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        message = f"{where}: unknown key '{key}'; allowed keys here: {', '.join(allowed)}{hint}"
    elif first["type"] == "missing":
        message = f"{where}: missing required key '{key}'"
    elif isinstance(first.get("input"), (dict, list)):
        reason = first["msg"].removeprefix("Value error, ")
        message = f"{where}: invalid '{key}': {reason}"
    else:
        message = f"{where}: invalid value {first['input']!r} for '{key}': {first['msg']}"

    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return message


def _line_of(root: yaml.Node | None, location: list[str | int]) -> int | None:
    """Return the 1-based line of the deepest YAML node on the path, or None."""
    node = root
    line = node.start_mark.line + 1 if node is not None else None
    for part in location:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if getattr(k, "value", None) == str(part)), None)
            if match is None:
                break
            line = match[0].start_mark.line + 1
            node = match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _model_at(model: type[BaseModel], location: list[str | int]) -> type[BaseModel] | None:
    """Return the pydantic model that contains the keys at ``location``, or None."""
    parts = [part for part in location if isinstance(part, str)]
    index = 0
    while index < len(parts):
        field = next((f for name, f in model.model_fields.items() if parts[index] in (name, f.alias)), None)
        if field is None:
            return None

        # A mapping such as `labels` is followed by a free key (the label name), which names no field.
        annotation = field.annotation
        is_mapping = getattr(annotation, "__origin__", None) is dict
        inner = _inner_model(annotation)
        if inner is None:
            return None
        model = inner
        index += 2 if is_mapping else 1
    return model


def _inner_model(annotation: Any) -> type[BaseModel] | None:
    """Return the pydantic model inside an annotation such as ``Source``, ``list[Source]`` or ``Simulation | None``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for argument in getattr(annotation, "__args__", ()):
        found = _inner_model(argument)
        if found is not None:
            return found
    return None


def _field_keys(model: type[BaseModel]) -> list[str]:
    """Return the YAML keys a model accepts (aliases where set)."""
    return [field.alias or name for name, field in model.model_fields.items() if not field.exclude]


def _file_signature(path: Path) -> dict[str, Any]:
    """Return what identifies a source file's content cheaply: its path, size and modification time."""
    try:
        stat = path.stat()
    except OSError:
        return {"path": str(path), "size": None, "mtime_ns": None}
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _sha256_json(data: Any) -> str:
    """Return the sha256 of ``data`` as canonical JSON."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


if __name__ == "__main__":
    import sys

    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("schemas") / "recipe.schema.json"
    target.write_text(json.dumps(recipe_json_schema(), indent=2) + "\n", encoding="utf-8")
    print(f"wrote {target}")
