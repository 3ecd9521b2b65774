"""The experiment config: one typed schema (pydantic), loaded from YAML, overridden by ``--set``.

Sections: ``model``, ``adapter``, ``data``, ``train``, ``scaling``, ``tune``, ``tracking``.
Every field has a default and help text here, and nowhere else. Configs are parsed once at the
edge (the ``jobs/`` scripts) and are read-only afterwards: the library receives plain values.

Errors are one line naming the key, the bad value and what is allowed, e.g.::

    config error: train.lr = 'fast': Input should be a valid number
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

# Tasks each dataset provides, and the default class count of its semantic labels.
DATASET_TASKS: dict[str, tuple[str, ...]] = {
    "scenes": ("semantic", "depth", "normal"),
    "nyuv2": ("semantic", "depth", "normal"),
    "cityscapes": ("semantic", "depth"),
    "pascal_context": ("semantic", "human_parts", "saliency", "normal"),
}
DEFAULT_NUM_CLASSES = {"scenes": 6, "nyuv2": 13, "cityscapes": 7, "pascal_context": 21}
ADAPTER_METHODS = ("tora", "lora_stl", "lora_hps", "conv_lora", "none")


class ConfigError(ValueError):
    """An invalid config, with a one-line message naming the key."""


class _Section(BaseModel):
    model_config = ConfigDict(
        extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False
    )

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_number_mixing(cls, value: Any, info: ValidationInfo) -> Any:
        """Pydantic's lax mode reads ``epochs: true`` as 1 and ``augment: 1`` as true; a
        switch and a number are never confused here (strings such as '1e-3' still parse)."""
        field = cls.model_fields[info.field_name]  # type: ignore[index]
        tables = [
            a for a in (field.annotation, *get_args(field.annotation)) if get_origin(a) is dict
        ]
        if tables and (isinstance(value, Mapping) or get_origin(field.annotation) is dict):
            # {name: number} tables, e.g. task weights (or a table beside a file path)
            numeric = any(_numeric_values(a) for a in tables)
            if numeric and isinstance(value, Mapping) and (where := _bool_leaf(value)):
                raise ValueError(f"{where}: expected a number, not true/false")
            return value
        kinds = set(get_args(field.annotation)) or {field.annotation}
        if isinstance(value, bool) and bool not in kinds and kinds & {int, float}:
            raise ValueError("expected a number, not true/false")
        if kinds == {bool} and not isinstance(value, bool):
            raise ValueError("expected true or false")
        return value


def _numeric_values(annotation: Any) -> bool:
    """Whether a ``dict[str, ...]`` annotation's innermost values are numbers."""
    while get_origin(annotation) is dict:
        annotation = get_args(annotation)[1]
    return annotation in (int, float)


def _bool_leaf(value: Any, prefix: str = "") -> str | None:
    """``"key.sub = True"`` for the first true/false value inside nested mappings, or None."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            if where := _bool_leaf(v, f"{prefix}{k}."):
                return where
    elif isinstance(value, bool):
        return f"{prefix.rstrip('.')} = {value}"
    return None


class ModelConfig(_Section):
    preset: Literal["tiny", "vit_b", "vit_l", "vit_h"] = Field(
        "tiny",
        description="Model size: SAM's vit_b / vit_l / vit_h (1024 px) or the CPU-sized tiny.",
    )
    checkpoint: str | None = Field(
        None,
        description="Local path of an official SAM checkpoint of the same preset "
        "(e.g. sam_vit_l_0b3195.pth). None: random base weights (the run says so).",
    )
    attention: Literal["sam", "sdpa"] = Field(
        "sdpa",
        description="Encoder attention kernel: segment-anything's own ('sam') or "
        "torch scaled_dot_product_attention with SAM's relative-position bias ('sdpa').",
    )
    base_dtype: Literal["float32", "bfloat16"] = Field(
        "float32",
        description="dtype of the frozen base weights (bfloat16 saves memory on GPU; needs "
        "scaling.use_gpu and train.precision auto or bf16).",
    )


class AdapterConfig(_Section):
    method: Literal["tora", "lora_stl", "lora_hps", "conv_lora", "none"] = Field(
        "tora", description="Adapter method: tora, lora_stl, lora_hps, conv_lora or none."
    )
    decomposition: Literal["tucker", "cp"] = Field(
        "tucker", description="ToRA's tensor form: Tucker (ranks r1, r2, r3) or CP (rank)."
    )
    r1: int = Field(32, ge=1, description="ToRA Tucker rank along the input dimension.")
    r2: int = Field(32, ge=1, description="ToRA Tucker rank along the output dimension.")
    r3: int = Field(
        4, ge=1, description="ToRA Tucker rank along the task dimension (the paper: 4 for 3 tasks)."
    )
    rank: int = Field(4, ge=1, description="Rank of LoRA / Conv-LoRA, and ToRA's CP rank.")
    alpha: float = Field(8.0, gt=0, description="LoRA / Conv-LoRA alpha (scale = alpha / rank).")
    scaling: float = Field(0.5, gt=0, description="ToRA's scaling s of the update.")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Dropout on the adapter branch input.")
    targets: tuple[Literal["qkv", "proj", "mlp"], ...] = Field(
        ("qkv",), min_length=1, description="Encoder linears to adapt: qkv, proj, mlp."
    )
    qkv_parts: tuple[Literal["q", "k", "v"], ...] = Field(
        ("q", "k", "v"), min_length=1, description="Which thirds of the fused qkv to adapt."
    )
    orth_weight: float = Field(
        1.0, ge=0.0, description="Weight lambda of ToRA's orthogonal regulariser (0 disables)."
    )
    conv_experts: int = Field(8, ge=1, description="Conv-LoRA: number of experts M.")

    @model_validator(mode="after")
    def _check(self) -> AdapterConfig:
        if len(set(self.targets)) != len(self.targets):
            raise ValueError(f"adapter.targets: duplicate entries in {list(self.targets)}")
        if len(set(self.qkv_parts)) != len(self.qkv_parts):
            raise ValueError(f"adapter.qkv_parts: duplicate entries in {list(self.qkv_parts)}")
        return self


class ScenesConfig(_Section):
    num_train: int = Field(64, ge=1, description="Generated training scenes.")
    num_val: int = Field(32, ge=1, description="Generated validation scenes.")
    height: int = Field(96, ge=16, description="Scene image height in pixels.")
    width: int = Field(128, ge=16, description="Scene image width in pixels.")
    seed: int = Field(0, description="Generator seed (same seed, same bytes).")


class BaselineRecord(_Section):
    ref: str = Field(description="data.baseline as written (a file path or runs:/ URI).")
    source: str = Field(description="What was read: the absolute file path or the runs:/ URI.")
    sha256: str = Field(description="sha256 of the file's text.")
    values: dict[str, dict[str, float]] = Field(
        description="The file's {task: {metric: value}} (every task it holds)."
    )
    provenance: dict[str, Any] = Field(
        default_factory=dict,
        description="Where the values came from (MLflow runs, config digest, date, code).",
    )


class DataConfig(_Section):
    dataset: Literal["scenes", "nyuv2", "cityscapes", "pascal_context"] = Field(
        "scenes",
        description="Benchmark reader: scenes (generated), nyuv2, cityscapes, pascal_context.",
    )
    root: str | None = Field(
        None,
        description="Dataset folder (raw layout, or Parquet shards when format=shards; shards "
        "may also be an s3:// or gs:// URI, read in place). For scenes: the cache folder "
        "(default: <output_dir>/cache/scenes).",
    )
    format: Literal["files", "shards"] = Field(
        "files", description="Read the raw layout ('files') or Parquet shards ('shards')."
    )
    tasks: tuple[str, ...] = Field(
        ("semantic", "depth", "normal"), min_length=1, description="Tasks to learn, in order."
    )
    num_classes: int | None = Field(
        None,
        ge=2,
        description="Semantic classes (default: the dataset's: nyuv2 13, "
        "cityscapes 7 or 19, pascal_context 21, scenes 6).",
    )
    augment: bool = Field(True, description="Random scale-crop and horizontal flip in training.")
    loader_workers: int = Field(0, ge=0, description="DataLoader worker processes per trainer.")
    scenes: ScenesConfig = Field(default_factory=ScenesConfig, description="Generated scenes.")
    baseline: dict[str, dict[str, float]] | str = Field(
        default_factory=dict,
        description="Single-task baseline for delta_m: the file jobs/baselines.py writes (a "
        "path, relative to the YAML file that names it), its MLflow run (runs:/<run id>), or "
        "an inline {task: {metric: value}} table in the units the metrics are logged in "
        "(fractions such as miou 0.42, not percent).",
    )
    baseline_record: BaselineRecord | None = Field(
        None,
        description="Filled when the config is loaded, for a file or runs:/ data.baseline: the "
        "values read and their provenance (not written by hand).",
    )
    eval_protocol: Literal["pooled", "per_image"] = Field(
        "pooled",
        description="How depth and normal metrics are averaged: 'pooled' over every valid "
        "pixel of the split (LibMTL's benchmark tables) or 'per_image' (per-image errors and "
        "normal medians, then the mean over images: the MTSAM authors' batch-1 evaluation). "
        "mIoU, pixel accuracy and saliency maxF are pooled in both. A baseline must be "
        "measured under the same protocol.",
    )

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        allowed = DATASET_TASKS[self.dataset]
        for t in self.tasks:
            if t not in allowed:
                raise ValueError(
                    f"data.tasks: {t!r} is not provided by dataset {self.dataset!r}; "
                    f"allowed: {list(allowed)}"
                )
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"data.tasks: duplicate entries in {list(self.tasks)}")
        if self.dataset == "cityscapes" and self.num_classes not in (None, 7, 19):
            raise ValueError(f"data.num_classes = {self.num_classes}: cityscapes has 7 or 19")
        if self.dataset not in ("scenes",) and self.root is None:
            raise ValueError(f"data.root: dataset {self.dataset!r} needs a local folder path")
        if self.format == "shards" and self.root is None:
            raise ValueError("data.root: data.format = 'shards' needs the shard folder's path")
        if self.format == "files" and self.root is not None and "://" in self.root:
            raise ValueError(
                f"data.root = {self.root!r}: only Parquet shards are read from a URI; "
                "set data.format = shards (see jobs/prepare_data.py)"
            )
        if isinstance(self.baseline, str):
            if not self.baseline.strip():
                raise ValueError(
                    "data.baseline: empty; expected a file path, runs:/<run id> or a table"
                )
            if self.baseline_record is not None and self.baseline_record.ref != self.baseline:
                raise ValueError(
                    f"data.baseline_record: read for data.baseline = "
                    f"{self.baseline_record.ref!r}, not {self.baseline!r}"
                )
        elif self.baseline_record is not None:
            raise ValueError("data.baseline_record: only with a file or runs:/ data.baseline")
        table = self.baseline_table(missing_ok=True)
        if table:
            from mtsam.tasks.registry import check_baseline  # the task specs import torch

            try:
                check_baseline(table, self.tasks)
            except ValueError as e:
                if self.baseline_record is None:
                    raise
                raise ValueError(f"{e} (read from {self.baseline_record.source})") from None
        return self

    def baseline_table(self, *, missing_ok: bool = False) -> dict[str, dict[str, float]]:
        """The baseline values for ``tasks`` ({} when there is none): the inline table, or the
        tasks of the file ``data.baseline`` names. A file not read yet (a config validated
        without :func:`build_config`) raises unless ``missing_ok``."""
        if not isinstance(self.baseline, str):
            return {t: dict(ms) for t, ms in self.baseline.items()}
        if self.baseline_record is None:
            if missing_ok:
                return {}
            raise ValueError(
                f"data.baseline = {self.baseline!r}: not read yet (load the config with "
                "load_config / build_config, which read it)"
            )
        values = self.baseline_record.values
        return {t: dict(values[t]) for t in self.tasks if t in values}

    @property
    def classes(self) -> int:
        return self.num_classes or DEFAULT_NUM_CLASSES[self.dataset]


class TrainConfig(_Section):
    epochs: int = Field(4, ge=1, description="Training epochs.")
    batch_size: int = Field(8, ge=1, description="Images per worker per step.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(1e-6, ge=0, description="Weight decay.")
    optimizer: Literal["adam", "adamw"] = Field("adam", description="Adam (L2) or AdamW.")
    schedule: Literal["linear", "cosine", "constant"] = Field(
        "linear", description="Decay after warm-up: linear to 0, cosine to 0, or constant."
    )
    warmup_frac: float = Field(0.05, ge=0, lt=1, description="Fraction of steps for warm-up.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    grad_clip: float | None = Field(1.0, gt=0, description="Max gradient norm (None: no clip).")
    task_weights: dict[str, float] = Field(
        default_factory=dict,
        description="Loss weight per task (missing tasks weigh 1); normalised to sum 1. With "
        "another train.weighting they are a fixed prior, normalised to mean 1, multiplying "
        "that strategy's weights (leave them out or equal for the published methods).",
    )
    weighting: Literal["fixed", "dwa", "uncertainty", "pcgrad"] = Field(
        "fixed",
        description="Task weighting: 'fixed' (train.task_weights), 'dwa' (Dynamic Weight "
        "Average: T * softmax of the ratio of the last two epochs' mean losses / "
        "train.dwa_temperature; equal for the first two epochs), 'uncertainty' (learned log "
        "variances s_t: sum_t L_t / (2 exp(s_t)) + s_t / 2) or 'pcgrad' (per-task gradients of "
        "the shared encoder parameters projected off each other's conflicting directions).",
    )
    dwa_temperature: float = Field(
        2.0, gt=0, description="Softmax temperature of train.weighting = 'dwa'."
    )
    stacked: bool = Field(
        True, description="Run the T tasks as one stacked encoder batch (else one at a time)."
    )
    activation_checkpointing: bool = Field(
        False, description="Recompute encoder blocks in backward to save memory."
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 autocast on GPU, fp32 on CPU."
    )
    max_steps_per_epoch: int | None = Field(
        None, ge=1, description="Cap optimizer steps per epoch (smoke tests)."
    )
    vis_samples: int = Field(2, ge=0, description="Validation samples drawn as pictures.")
    vis_every: int = Field(2, ge=1, description="Draw predictions every N epochs (and last).")
    log_every: int = Field(10, ge=1, description="Progress line every N steps within an epoch.")

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        for task, w in self.task_weights.items():
            if w < 0 or not math.isfinite(w):
                raise ValueError(f"train.task_weights.{task} = {w}: expected a finite value >= 0")
        return self


class ScalingConfig(_Section):
    num_workers: int = Field(1, ge=1, description="Ray Train workers (data-parallel ranks).")
    use_gpu: bool = Field(False, description="One GPU per worker (NCCL); CPU workers use gloo.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per worker.")
    gpus_per_worker: float = Field(
        1.0,
        gt=0,
        le=1,
        description="GPU share per worker when use_gpu (fractions only with one worker).",
    )
    max_failures: int = Field(1, ge=-1, description="Worker-group restarts (-1: unlimited).")
    storage_path: str | None = Field(
        None,
        description="Where runs and checkpoints go: an absolute path shared by all nodes, or a "
        "URI (s3://, gs://). Default: <output_dir>/ray_results.",
    )


class SpaceEntry(_Section):
    type: Literal["choice", "grid", "uniform", "loguniform", "randint"] = Field(
        description="Distribution: choice / grid (values), uniform / loguniform / randint (low, high)."
    )
    values: list[Any] | None = Field(None, description="Candidates for choice and grid.")
    low: float | None = Field(None, description="Lower bound for uniform / loguniform / randint.")
    high: float | None = Field(
        None, description="Upper bound (randint: exclusive, as in Ray Tune)."
    )
    include_zero: bool = Field(
        False, description="loguniform only: also try exactly 0 (e.g. orth_weight off)."
    )

    @model_validator(mode="after")
    def _check(self) -> SpaceEntry:
        if self.type in ("choice", "grid"):
            if not self.values:
                raise ValueError(f"{self.type} needs a non-empty 'values' list")
            if self.low is not None or self.high is not None:
                raise ValueError(f"{self.type} takes 'values', not low/high")
        else:
            if self.low is None or self.high is None:
                raise ValueError(f"{self.type} needs 'low' and 'high'")
            if not self.low < self.high:
                raise ValueError(f"{self.type} needs low < high, got {self.low} >= {self.high}")
            if self.type == "loguniform" and self.low <= 0:
                raise ValueError(f"loguniform needs low > 0, got {self.low}")
            if self.values is not None:
                raise ValueError(f"{self.type} takes low/high, not 'values'")
        if self.include_zero and self.type != "loguniform":
            raise ValueError("include_zero applies to loguniform only")
        return self


class AshaConfig(_Section):
    grace_period: int = Field(1, ge=1, description="Epochs every trial runs before it can stop.")
    reduction_factor: float = Field(2.0, gt=1, description="ASHA's halving rate.")


class TuneConfig(_Section):
    num_samples: int = Field(4, ge=1, description="Trials to sample (per grid point for grid).")
    searcher: Literal["random", "grid", "optuna"] = Field(
        "random",
        description="random, grid (all combinations of 'grid' entries; the other entries "
        "sampled for each), or optuna (TPE).",
    )
    scheduler: Literal["fifo", "asha"] = Field("fifo", description="fifo or asha early stopping.")
    asha: AshaConfig = Field(default_factory=AshaConfig, description="ASHA settings.")
    metric: str = Field(
        "val/delta_m", description="Metric to optimise: val/delta_m or val/<task>/<metric>."
    )
    mode: Literal["auto", "max", "min"] = Field(
        "auto", description="auto: from the metric's direction (delta_m: max)."
    )
    objectives: dict[str, Literal["max", "min"]] = Field(
        default_factory=dict,
        description="Two or more metrics to optimise together, with their directions, e.g. "
        "{val/delta_m: max, adapter_params: min}: the sweep reports the Pareto front (tune.metric "
        "and tune.mode are then unused). Metrics: val/delta_m, val/<task>/<metric>, "
        "adapter_params, trainable_params.",
    )
    max_concurrent_trials: int = Field(1, ge=1, description="Trials running at once.")
    driver_cpus: float = Field(
        0.05, gt=0, description="CPU share of each trial's driver (workers are reserved apart)."
    )
    max_trainable_params: int | None = Field(
        None, ge=1, description="Reject sampled configs with more trainable parameters."
    )
    space: dict[str, SpaceEntry] = Field(
        default_factory=dict, description="Search space: {config.key: distribution}."
    )

    @model_validator(mode="after")
    def _check(self) -> TuneConfig:
        for key in self.space:
            if key.split(".")[0] in ("tune", "tracking", "scaling"):
                raise ValueError(f"tune.space.{key}: only model/adapter/data/train keys can vary")
        if self.searcher == "grid" and not any(e.type == "grid" for e in self.space.values()):
            # other entries are sampled once per grid point (Tune's own rule), so a grid
            # search can pin a few keys of a space that samples the rest
            raise ValueError("tune.searcher = 'grid': tune.space has no entry of type 'grid'")
        if self.searcher == "optuna" and any(e.type == "grid" for e in self.space.values()):
            bad = [k for k, e in self.space.items() if e.type == "grid"]
            raise ValueError(f"tune.space.{bad[0]}: optuna cannot take 'grid' (use choice)")
        if len(self.objectives) == 1:
            raise ValueError(
                f"tune.objectives: names one metric {list(self.objectives)}; name two or more, "
                "or use tune.metric and tune.mode for one"
            )
        if self.objectives and self.scheduler == "asha":
            raise ValueError(
                f"tune.scheduler = 'asha' stops trials by one metric, but tune.objectives names "
                f"{len(self.objectives)} ({', '.join(self.objectives)}); use tune.scheduler=fifo"
            )
        if self.objectives and self.metric != "val/delta_m" and self.metric not in self.objectives:
            raise ValueError(
                f"tune.metric = {self.metric!r} is not one of tune.objectives "
                f"{list(self.objectives)}; with tune.objectives the sweep optimises those "
                "(set tune.objectives={} to optimise tune.metric alone)"
            )
        return self


class TrackingConfig(_Section):
    enabled: bool = Field(True, description="Record runs in MLflow.")
    uri: str | None = Field(
        None,
        description="MLflow tracking URI (server URL or sqlite:///abs/path). Default: "
        "$MLFLOW_TRACKING_URI, else sqlite:///<output_dir>/mlflow.db.",
    )
    experiment: str | None = Field(None, description="MLflow experiment (default: config name).")
    register_as: str | None = Field(
        None, description="Register the sweep's best adapter as this MLflow model name."
    )
    request_timeout_s: float = Field(
        10.0, gt=0, description="Per-request timeout before a metric is buffered for later."
    )


class ExperimentConfig(_Section):
    name: str = Field("default", min_length=1, description="Experiment name (MLflow experiment).")
    seed: int = Field(0, description="Seed of model init, data order and augmentation.")
    output_dir: str = Field(
        "outputs", description="Folder for results, caches and the default MLflow store."
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _check(self) -> ExperimentConfig:
        tasks = self.data.tasks
        for task in self.train.task_weights:
            if task not in tasks:
                raise ValueError(f"train.task_weights.{task}: not one of data.tasks {list(tasks)}")
        if self.train.task_weights and sum(self.weights().values()) <= 0:
            raise ValueError("train.task_weights: at least one task needs a positive weight")
        if self.scaling.use_gpu is False and self.model.base_dtype == "bfloat16":
            raise ValueError("model.base_dtype = 'bfloat16': needs scaling.use_gpu = true")
        if self.model.base_dtype == "bfloat16" and self.train.precision == "fp32":
            raise ValueError(
                "model.base_dtype = 'bfloat16': needs train.precision = 'auto' or 'bf16' "
                "(a bf16 base runs under autocast)"
            )
        if self.train.precision == "bf16" and not self.scaling.use_gpu:
            raise ValueError("train.precision = 'bf16': needs scaling.use_gpu = true (CPU is fp32)")
        _check_metric_name(self.tune.metric, tasks)
        for metric in self.tune.objectives:
            if metric not in PARAM_METRICS:
                _check_metric_name(metric, tasks, key=f"tune.objectives.{metric}")
        for key, entry in self.tune.space.items():
            _check_space_key(self, key, entry)
        return self

    # Derived, read-only views used at the edge.
    def weights(self) -> dict[str, float]:
        """Per-task loss weights normalised to sum 1 (missing tasks weigh 1)."""
        raw = {t: float(self.train.task_weights.get(t, 1.0)) for t in self.data.tasks}
        total = sum(raw.values())
        return {t: w / total for t, w in raw.items()} if total > 0 else raw

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def flat(self) -> dict[str, Any]:
        """The config as {"section.key": value} (for MLflow params and Tune spaces)."""
        return flatten(self.to_dict())


# Parameter counts every trial reports beside its metrics (lower is cheaper): objectives too.
PARAM_METRICS = ("adapter_params", "trainable_params")


def _check_metric_name(metric: str, tasks: Iterable[str], key: str = "tune.metric") -> None:
    if metric == "val/delta_m":
        return
    parts = metric.split("/")
    if len(parts) != 3 or parts[0] != "val" or parts[1] not in tasks:
        also = f", {' or '.join(PARAM_METRICS)}" if key != "tune.metric" else ""
        raise ValueError(
            f"{key} = {metric!r}: expected 'val/delta_m' or 'val/<task>/<metric>' "
            f"with a task in {list(tasks)}{also}"
        )
    from mtsam.tasks.registry import task_metric_directions  # the task specs import torch

    known = list(task_metric_directions([parts[1]])[parts[1]])
    if parts[2] not in known:
        raise ValueError(
            f"{key} = {metric!r}: {parts[1]} reports no metric {parts[2]!r}; "
            f"expected one of {known}"
        )


def _check_space_key(cfg: ExperimentConfig, key: str, entry: SpaceEntry) -> None:
    """The key must name an existing field, and every candidate value (for a range: its ends
    and a point inside) must validate there."""
    flat = cfg.flat()
    if key not in flat and not any(k.startswith(key + ".") for k in flat):
        raise ValueError(f"tune.space.{key}: no such config key")
    section: Any = ExperimentConfig
    for part in key.split("."):
        fields = getattr(section, "model_fields", {})
        section = fields[part].annotation if part in fields else None
    if get_origin(section) is None and isinstance(section, type) and issubclass(section, BaseModel):
        # a sampled section would replace every field of it (the unnamed ones by defaults)
        raise ValueError(f"tune.space.{key}: a config section; vary its fields by name")
    probes: list[Any]
    if entry.type in ("choice", "grid"):
        probes = list(entry.values or [])
    elif entry.type == "randint":
        probes = [int(entry.low), int(entry.high) - 1]  # type: ignore[arg-type]
    else:
        # an inner point with a fractional part too: an integer field refuses what these draw
        inner = entry.low + (entry.high - entry.low) / math.pi  # type: ignore[operator]
        probes = [entry.low, inner, entry.high] + ([0.0] if entry.include_zero else [])
    base = cfg.to_dict()
    base["tune"] = {}
    for value in probes:
        try:
            ExperimentConfig.model_validate(set_path(base, key, value))
        except ValidationError as e:
            raise ValueError(f"tune.space.{key}: value {value!r} is invalid: {_first(e)}") from None


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v and k not in ("space",):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def set_path(d: Mapping[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """A deep copy of nested dict ``d`` with ``dotted`` (a.b.c) set to ``value``."""
    import copy

    out = copy.deepcopy(dict(d))
    node = out
    parts = dotted.split(".")
    for p in parts[:-1]:
        child = node.get(p)
        if not isinstance(child, dict):
            child = {} if child is None else child
            if not isinstance(child, dict):
                raise ConfigError(f"config error: {dotted}: {p!r} is not a section")
            node[p] = child
        node = child
    node[parts[-1]] = value
    return out


def _first(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    expected = (err.get("ctx") or {}).get("expected")
    allowed = f" (allowed: {expected})" if expected and str(expected) not in msg else ""
    if not loc or msg.startswith(loc.split(".")[0] + ".") or msg.startswith("tune.space."):
        return msg + allowed  # a cross-field check that names its own key
    value = err.get("input")
    shown = "" if isinstance(value, dict) else f" = {value!r}"
    return f"{loc}{shown}: {msg}{allowed}"


# Fields holding free-form mappings: ``--set`` may add keys below them (a dotted space key
# such as ``tune.space.adapter.r1`` is one key of ``tune.space``).
_DICT_FIELDS = ("train.task_weights", "data.baseline", "tune.space")


def parse_overrides(items: Iterable[str]) -> list[tuple[str, Any]]:
    """``["train.lr=3e-4", ...]`` -> [("train.lr", 0.0003), ...]; values are parsed as YAML."""
    out = []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(
                f"config error: --set {item!r}: expected KEY=VALUE, e.g. train.lr=3e-4"
            )
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str) and value.strip().lower() not in ("nan", "inf", "-inf"):
            with contextlib.suppress(ValueError):  # YAML 1.1 reads 3e-4 as a string
                value = float(value)
        out.append((key.strip(), value))
    return out


def build_config(
    data: Mapping[str, Any], overrides: Iterable[str] = (), *, base_dir: str | Path | None = None
) -> ExperimentConfig:
    """Validate a config dict plus ``--set`` overrides; raise ``ConfigError`` (one line).

    A ``data.baseline`` naming a file or ``runs:/`` run is read here (into
    ``data.baseline_record``): a relative path from ``base_dir`` (the folder of the YAML file
    ``data`` came from), or from the current folder when an override set it.
    """
    d: dict[str, Any] = dict(data)
    known = ExperimentConfig().flat()
    baseline_dir = Path(base_dir) if base_dir is not None else Path.cwd()
    for key, value in parse_overrides(overrides):
        if key == "data.baseline":
            baseline_dir = Path.cwd()
        top = key.split(".")[0]
        if top not in ExperimentConfig.model_fields:
            raise ConfigError(
                f"config error: --set {key}: unknown section {top!r}; "
                f"expected one of {list(ExperimentConfig.model_fields)}"
            )
        field = next((f for f in _DICT_FIELDS if key.startswith(f + ".")), None)
        if field is not None:
            section, name = field.split(".")
            sub = key[len(field) + 1 :]
            current = (d.get(section) or {}).get(name) or {}
            if not isinstance(current, Mapping):
                raise ConfigError(
                    f"config error: --set {key}: {field} = {current!r} names a file, not a "
                    f"table; set {field} as a whole"
                )
            current = dict(current)
            if field == "tune.space":  # a space key is itself a dotted config key
                current[sub] = value
            else:
                current = set_path(current, sub, value)
            d = set_path(d, field, current)
            continue
        if key not in known and not any(k.startswith(key + ".") for k in known):
            raise ConfigError(f"config error: --set {key}: no such config key")
        d = set_path(d, key, value)
    d = _read_baseline(d, baseline_dir)
    try:
        return ExperimentConfig.model_validate(d)
    except ValidationError as e:
        raise ConfigError(f"config error: {_first(e)}") from None


def _read_baseline(d: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    """``d`` with ``data.baseline_record`` matching ``data.baseline``: read for a file or
    ``runs:/`` reference (unless the record of that very reference is there already, as in a
    resumed run's saved config), dropped for a table."""
    data = d.get("data")
    if not isinstance(data, Mapping):
        return d
    ref = data.get("baseline")
    record = data.get("baseline_record")
    if not isinstance(ref, str) or not ref.strip():
        return set_path(d, "data.baseline_record", None) if record is not None else d
    if isinstance(record, Mapping) and record.get("ref") == ref:
        return d
    from mtsam.tasks.baselines import BaselineError, read_reference

    tracking_uri = None
    if ref.startswith("runs:/"):
        from mtsam.tracking.uri import resolve_tracking_uri

        tracking = d.get("tracking") if isinstance(d.get("tracking"), Mapping) else {}
        output_dir = d.get("output_dir") or ExperimentConfig.model_fields["output_dir"].default
        tracking_uri = resolve_tracking_uri(tracking.get("uri"), output_dir)
    try:
        got = read_reference(ref, base_dir=base_dir, tracking_uri=tracking_uri)
    except BaselineError as e:
        raise ConfigError(f"config error: {e}") from None
    return set_path(d, "data.baseline_record", got)


def load_config(path: str | Path | None, overrides: Iterable[str] = ()) -> ExperimentConfig:
    """Load a YAML experiment (None: all defaults) and apply ``--set`` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config error: {path}: no such file")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            line = getattr(getattr(e, "problem_mark", None), "line", None)
            where = f" line {line + 1}" if line is not None else ""
            raise ConfigError(f"config error: {path}{where}: not valid YAML") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"config error: {path}: unreadable as UTF-8 text ({e})") from None
        except OSError as e:
            raise ConfigError(f"config error: {path}: cannot be read ({e.strerror})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config error: {path}: expected a mapping of sections at top level")
        data = loaded
    try:
        return build_config(data, overrides, base_dir=path.parent if path is not None else None)
    except ConfigError as e:
        if path is None:
            raise
        raise ConfigError(str(e).replace("config error: ", f"config error: {path}: ", 1)) from None
