"""A sweep: Ray Tune trials, each a small driver that builds and fits a ``TorchTrainer``.

Ray Train V2 shape (docs/ARCHITECTURE.md, "How a sweep flows"): the Tune trainable is
:func:`trial_driver`, wrapped with a tiny CPU share; the Train run it starts is named after the
trial id (re-runs resume from its snapshot), lives inside the sweep's folder
(``<sweep>/train-<trial id>/``, with its checkpoints, adapters and MLflow spool) and reports to
Tune through ``TuneReportCallback``. A sampled config whose
trainable-parameter count exceeds ``tune.max_trainable_params`` is rejected before it builds a
trainer: it reports ``rejected = 1`` and the worst possible value of the metric.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mtsam.config import ExperimentConfig, set_path
from mtsam.tune.space import overrides_of

REJECTED = "rejected"


def apply_sample(base: dict[str, Any], sample: dict[str, Any]) -> ExperimentConfig:
    """The base config dict with the sampled keys set, validated (tune section cleared)."""
    d = dict(base)
    for key, value in overrides_of(sample).items():
        d = set_path(d, key, value)
    return ExperimentConfig.model_validate(d)


def count_trainable(cfg: ExperimentConfig) -> int:
    """Trainable parameters of the config's mSAM, counted on the meta device (no memory)."""
    from mtsam.model.msam import build_msam
    from mtsam.tasks import build_tasks
    from mtsam.train.loop import adapter_spec_of

    tasks = build_tasks(cfg.data.tasks, num_classes=cfg.data.classes)
    with torch.device("meta"):
        model = build_msam(
            cfg.model.preset,
            [(t.name, t.channels) for t in tasks],
            adapter=adapter_spec_of(cfg),
            seed=cfg.seed,
        )
    return model.parameter_counts()["all"][0]


def worst(mode: str) -> float:
    return -1e9 if mode == "max" else 1e9


@dataclass(frozen=True)
class SweepContext:
    """What every trial driver needs besides its sample (passed via ``tune.with_parameters``)."""

    base_config: dict[str, Any]
    storage: str
    sweep_name: str
    metric: str
    mode: str
    base_ref: Any = None
    base_fingerprint: str | None = None
    tracking: dict[str, Any] | None = None
    objectives: tuple[tuple[str, str], ...] = ()  # (metric, mode) of a multi-objective sweep

    def checkpoint_metric(self) -> str | None:
        """What a trial ranks its checkpoints by: the metric, or the first ``val/`` objective
        (a parameter count is the same at every epoch)."""
        if not self.objectives:
            return self.metric
        return next((m for m, _ in self.objectives if m.startswith("val/")), None)


def trial_driver(sample: dict[str, Any], ctx: SweepContext) -> None:
    """One trial: validate the sample, check the budget, run Ray Train, report through Tune."""
    import logging

    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from mtsam.train.runner import make_trainer, outcome_of

    logging.getLogger("mtsam").setLevel(logging.INFO)
    trial_id = ray.tune.get_context().get_trial_id()
    cfg = apply_sample(ctx.base_config, sample)
    budget = cfg.tune.max_trainable_params or ctx.base_config["tune"].get("max_trainable_params")
    n_params = count_trainable(cfg)
    if budget and n_params > budget:
        print(f"trial {trial_id}: {n_params:,} trainable parameters > budget {budget:,}: rejected")
        worst_values = {m: worst(d) for m, d in ctx.objectives} or {ctx.metric: worst(ctx.mode)}
        ray.tune.report(worst_values | {REJECTED: 1, "trainable_params": n_params, "epoch": 0})
        return
    storage, name = trial_run_folder(ctx, trial_id)
    trainer = make_trainer(
        cfg,
        name=name,
        storage=storage,
        base=(ctx.base_ref, ctx.base_fingerprint) if ctx.base_ref is not None else None,
        tracking=trial_tracking(ctx, trial_id),
        callbacks=[TuneReportCallback()],
        metric=ctx.checkpoint_metric(),
    )
    error = outcome_of(trainer.fit()).error
    if error:
        raise RuntimeError(f"trial {trial_id}: {error}")


def trial_run_folder(ctx: SweepContext, trial_id: str) -> tuple[str, str]:
    """(storage path, name) of a trial's Ray Train run: ``train-<trial id>`` inside the sweep's
    own folder, so that one folder holds the whole sweep (``jobs/sync_mlflow.py --spool
    <sweep>`` finds every trial's spool there)."""
    if "://" in ctx.storage:
        return f"{ctx.storage.rstrip('/')}/{ctx.sweep_name}", f"train-{trial_id}"
    return str(Path(ctx.storage) / ctx.sweep_name), f"train-{trial_id}"


def trial_tracking(ctx: SweepContext, trial_id: str) -> dict[str, Any] | None:
    """The trial's tracking info: a child run named by the trial id, whose spool is in the
    trial's Ray Train folder (for URI storage, its node-local counterpart under the spool
    root), so that the sweep's folder holds every trial's spool."""
    if ctx.tracking is None:
        return None
    _, name = trial_run_folder(ctx, trial_id)
    return dict(ctx.tracking, run_name=trial_id, run_folder=f"{ctx.sweep_name}/{name}")


@dataclass
class TrialRow:
    trial_id: str
    status: str
    sample: dict[str, Any]
    metrics: dict[str, Any]
    best_checkpoint: str | None
    epochs: int
    trainable_params: int | None
    pareto: bool | None = None  # on the Pareto front (multi-objective sweeps only)


def summarise(results: Any, *, metric: str, mode: str) -> list[TrialRow]:
    """One row per trial: the sampled values, the metrics of its best epoch and its checkpoint."""
    rows = []
    for r in results:
        df = r.metrics_dataframe
        sample = overrides_of(r.config or {})
        status = "ERROR" if r.error else "TERMINATED"
        metrics: dict[str, Any] = dict(r.metrics or {})
        ckpt = None
        epochs = 0
        if df is not None and len(df) and metric in df:
            valid = df[df[metric].notna()]
            if len(valid):
                idx = valid[metric].idxmax() if mode == "max" else valid[metric].idxmin()
                metrics = {k: v for k, v in df.loc[idx].items() if isinstance(k, str)}
                ckpt = metrics.get("checkpoint_path")
            epochs = int(df["epoch"].max()) if "epoch" in df else len(df)
        if metrics.get(REJECTED):
            status = "REJECTED"
        n = metrics.get("trainable_params")
        rows.append(
            TrialRow(
                trial_id=(r.metrics or {}).get("trial_id") or trial_id_of_folder(r.path),
                status=status,
                sample=sample,
                metrics=metrics,
                best_checkpoint=ckpt if isinstance(ckpt, str) else None,
                epochs=epochs,
                trainable_params=_int_or_none(n),
            )
        )
    return rows


def best_row(rows: list[TrialRow], *, metric: str, mode: str) -> TrialRow | None:
    ok = [
        r
        for r in rows
        if r.status == "TERMINATED"
        and isinstance(r.metrics.get(metric), (int, float))
        and math.isfinite(r.metrics[metric])
    ]
    if not ok:
        return None
    key = lambda r: r.metrics[metric]  # noqa: E731
    return max(ok, key=key) if mode == "max" else min(ok, key=key)


def trial_id_of_folder(path: Any) -> str:
    """The trial id in a Tune trial folder's name, ``trial_driver_<id>_<index>_<tag>_<date>``
    (ids look like ``e1d52_00000`` in a sweep, ``764d4869`` alone): for a trial that failed
    before its first report, whose metrics hold no ``trial_id``. The folder name otherwise."""
    name = Path(str(path)).name
    m = re.match(rf"{trial_driver.__name__}_([0-9a-f]+(?:_\d{{5}})?)_\d+_", name)
    return m.group(1) if m else name


def _int_or_none(v: Any) -> int | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return int(f) if math.isfinite(f) else None
