"""Measure single-task baselines: one single-task model per task of a config, as Ray Tune trials.

Every trial trains the config's model (same preset, data, schedule and adapter settings) on one
task, through the same trial machinery as a sweep (a Ray Train run per trial, inside the
experiment's folder). The metrics of each run's last epoch become that task's baseline
(no choice of epoch on the validation split). MLflow gets one parent run (``mtsam.kind =
baselines``) with a child run per task, and the parent holds the baselines file as its artifact
``baselines.json``, so ``data.baseline: runs:/<parent run id>`` reads it.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtsam.config import ExperimentConfig, set_path
from mtsam.tune.driver import SweepContext, apply_sample, trial_run_folder

TASKS_KEY = "data.tasks"
# Keys that do not change what a single-task model learns (where it is written, how it is
# logged and searched): left out of the settings digest.
_NOT_SETTINGS = (
    "name",
    "output_dir",
    "tune",
    "tracking",
    "scaling",
    "data.root",
    "data.loader_workers",
    "data.baseline",
    "data.baseline_record",
    "train.log_every",
    "train.vis_samples",
    "train.vis_every",
    "train.task_weights",
)


def base_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` made ready for single-task runs: no baseline, no task weights (one task weighs
    1), no search space or objectives, no parameter budget."""
    d = cfg.to_dict()
    for key, value in (
        ("data.baseline", {}),
        ("data.baseline_record", None),
        ("train.task_weights", {}),
        ("tune.space", {}),
        ("tune.objectives", {}),
        ("tune.metric", "val/delta_m"),
        ("tune.mode", "auto"),
        ("tune.scheduler", "fifo"),
        ("tune.max_trainable_params", None),
    ):
        d = set_path(d, key, value)
    return ExperimentConfig.model_validate(d)


def settings_digest(cfg: ExperimentConfig) -> str:
    """sha256 of the settings that decide what a single-task model learns (seed, model,
    adapter, data, train), to tell which config a baselines file was measured with."""
    d = cfg.to_dict()
    for key in _NOT_SETTINGS:
        section, _, leaf = key.rpartition(".")
        (d.get(section) if section else d).pop(leaf, None)
    text = json.dumps(d, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def baseline_trial(sample: dict[str, Any], ctx: SweepContext) -> None:
    """One task's single-task run (a Tune trainable like the sweep's trial driver); its MLflow
    run is named after the task."""
    import logging

    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from mtsam.train.runner import make_trainer, outcome_of

    logging.getLogger("mtsam").setLevel(logging.INFO)
    trial_id = ray.tune.get_context().get_trial_id()
    cfg = apply_sample(ctx.base_config, sample)
    storage, name = trial_run_folder(ctx, trial_id)
    tracking = None
    if ctx.tracking is not None:
        task = cfg.data.tasks[0]
        tracking = dict(ctx.tracking, run_name=task, run_folder=f"{ctx.sweep_name}/{name}")
    trainer = make_trainer(
        cfg,
        name=name,
        storage=storage,
        base=(ctx.base_ref, ctx.base_fingerprint) if ctx.base_ref is not None else None,
        tracking=tracking,
        callbacks=[TuneReportCallback()],
        metric=None,  # no choice of epoch: the last one is the baseline
    )
    error = outcome_of(trainer.fit()).error
    if error:
        raise RuntimeError(f"trial {trial_id} ({cfg.data.tasks[0]}): {error}")


@dataclass
class BaselinesReport:
    values: dict[str, dict[str, float]]
    provenance: dict[str, Any]
    path: str  # the Ray Tune experiment folder
    errors: dict[str, str] = field(default_factory=dict)  # task -> error of a failed run
    parent_run_id: str | None = None


def values_of(task: str, metrics: dict[str, Any]) -> tuple[dict[str, float], list[str]]:
    """(baseline metrics, metrics left out) of a task's last report: every metric the task
    reports; a value of 0 (or not finite) cannot be a baseline for delta_m and is left out."""
    import math

    from mtsam.tasks import task_metric_directions

    values, omitted = {}, []
    for m in task_metric_directions([task])[task]:
        v = metrics.get(f"val/{task}/{m}")
        if isinstance(v, (int, float)) and math.isfinite(v) and v > 0:
            values[m] = float(v)
        else:
            omitted.append(m)
    return values, omitted


def run(
    cfg: ExperimentConfig,
    *,
    name: str,
    storage: str,
    base: tuple[Any, str] | None = None,
    overrides: list[str] | None = None,
    log=print,
) -> BaselinesReport:
    """Train one single-task model per task of ``cfg`` (``base_config(cfg)``) as a grid of Ray
    Tune trials and collect their last-epoch metrics with their provenance."""
    import ray.tune
    from ray.tune.schedulers import FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from mtsam.tracking.setup import git_commit

    tasks = list(cfg.data.tasks)
    exp_path = Path(storage) / name if "://" not in storage else None
    tracking = None
    if cfg.tracking.enabled:
        from mtsam.tracking.setup import start_sweep_tracking
        from mtsam.tracking.uri import TrackingError

        try:
            tracking = start_sweep_tracking(
                cfg,
                sweep_name=name,
                sweep_path=str(exp_path or f"{storage.rstrip('/')}/{name}"),
                storage=storage,
                metric="",
                mode="",
                kind="baselines",
            )
        except TrackingError as e:
            raise ValueError(f"tracking.uri: {e}") from None
        tracking.update(metric=None, mode=None)
    ctx = SweepContext(
        base_config=cfg.to_dict(),
        storage=storage,
        sweep_name=name,
        metric="",
        mode="max",
        base_ref=base[0] if base else None,
        base_fingerprint=base[1] if base else None,
        tracking=tracking,
    )
    tuner = ray.tune.Tuner(
        ray.tune.with_resources(
            ray.tune.with_parameters(baseline_trial, ctx=ctx), {"cpu": cfg.tune.driver_cpus}
        ),
        param_space={TASKS_KEY: ray.tune.grid_search([[t] for t in tasks])},
        tune_config=ray.tune.TuneConfig(
            num_samples=1,
            search_alg=BasicVariantGenerator(max_concurrent=cfg.tune.max_concurrent_trials),
            scheduler=FIFOScheduler(),
        ),
        run_config=ray.tune.RunConfig(name=name, storage_path=storage),
    )
    results = tuner.fit()
    values: dict[str, dict[str, float]] = {}
    omitted: dict[str, list[str]] = {}
    errors: dict[str, str] = {}
    rows = []
    for r in results:
        task = (r.config or {}).get(TASKS_KEY, ["?"])[0]
        metrics = dict(r.metrics or {})
        if r.error or not any(k.startswith(f"val/{task}/") for k in metrics):
            errors[task] = str(r.error or "no metrics reported").strip().splitlines()[0]
            continue
        values[task], left = values_of(task, metrics)
        if left:
            omitted[task] = left
        rows.append({"task": task, "epochs": metrics.get("epoch")} | values[task])
    provenance: dict[str, Any] = {
        "produced_by": "jobs/baselines.py",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config_name": cfg.name,
        "config_digest": settings_digest(cfg),
        "overrides": list(overrides or []),
        "settings": {
            "model.preset": cfg.model.preset,
            "adapter.method": cfg.adapter.method,
            "data.dataset": cfg.data.dataset,
            "train.epochs": cfg.train.epochs,
            "seed": cfg.seed,
        },
        "selection": "metrics of each single-task run's last epoch",
        "code_version": {"git_commit": git_commit(), "mtsam": _version()},
        "ray_results": str(results.experiment_path),
    }
    if omitted:
        provenance["omitted_zero_or_nan"] = omitted
    ordered = {t: values[t] for t in tasks if t in values}
    report = BaselinesReport(ordered, provenance, str(results.experiment_path), errors)
    if tracking is not None:
        report.parent_run_id = tracking["parent_run_id"]
        provenance["mlflow"] = _finish_tracking(cfg, tracking, report, rows, exp_path, storage)
    return report


def _version() -> str:
    import mtsam

    return mtsam.__version__


def _finish_tracking(cfg, tracking, report, rows, exp_path, storage) -> dict[str, Any]:
    """Child run ids into the provenance, the file as the parent's artifact, the parent
    ended; returns the provenance's ``mlflow`` entry."""
    import tempfile

    from mtsam.tasks.baselines import ARTIFACT, document
    from mtsam.tracking.client import find_run, make_client
    from mtsam.tracking.setup import spool_root
    from mtsam.tracking.sweep import end_open_trials, finish_sweep
    from mtsam.tracking.uri import http_limits

    uri, parent = tracking["uri"], tracking["parent_run_id"]
    timeout = cfg.tracking.request_timeout_s
    with http_limits(timeout):
        runs = {
            t: find_run(uri, tracking["experiment"], run_name=t, parent_run_id=parent)
            for t in report.values
        }
    entry = {
        "tracking_uri": uri,
        "experiment": tracking["experiment"],
        "parent_run_id": parent,
        "runs": {t: r for t, r in runs.items() if r},
    }
    with tempfile.TemporaryDirectory() as d, http_limits(timeout):
        path = Path(d) / ARTIFACT
        path.write_text(document(report.values, report.provenance | {"mlflow": entry}))
        make_client(uri).log_artifact(parent, str(path))
    local = (
        exp_path
        if exp_path is not None
        else Path(spool_root(cfg, storage)) / Path(report.path).name
    )
    finish_sweep(
        uri,
        parent,
        best_metrics={
            f"baseline/{t}/{m}": v for t, ms in report.values.items() for m, v in ms.items()
        },
        summary_rows=rows or [{"task": t, "error": e} for t, e in report.errors.items()],
        out_dir=str(local),
        status="FAILED" if report.errors or not report.values else "FINISHED",
        request_timeout_s=timeout,
    )
    with contextlib.suppress(Exception):  # the baselines stand; only bookkeeping is late
        end_open_trials(uri, parent, failed=list(report.errors), finished=list(report.values))
    return entry
