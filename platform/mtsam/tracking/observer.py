"""Rank 0's loop observer: records one training run (one Tune trial) in MLflow.

Per epoch: metrics at step = epoch; prediction pictures on drawing epochs; the adapter
whenever the optimised metric improves (so the run holds its best adapter; the best value
travels in each checkpoint, so a restarted run keeps it). At the start:
params (the flattened resolved config and trainable counts by group), tags, and the
parameter-growth plot. Never raises for the back end (see :class:`RunTracker`).
"""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mtsam.config import ExperimentConfig
from mtsam.tasks.baselines import ARTIFACT as BASELINE_ARTIFACT
from mtsam.tasks.baselines import tracking_file, tracking_tags

log = logging.getLogger("mtsam.tracking")


def spool_dir_of(info: Mapping[str, Any]) -> Path:
    """Where a run's undelivered records wait: ``<spool root>/<run folder>/mlflow_spool``."""
    return Path(info["spool_root"]) / str(info["run_folder"]) / "mlflow_spool"


def _guarded(fn):
    """Tracking must never stop training: a hook that fails logs one warning and returns."""

    def wrapper(self, *args, **kwargs):
        try:
            return fn(self, *args, **kwargs)
        except Exception as e:
            log.warning("MLflow: %s failed: %s", fn.__name__, e)
            return None

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


class TrackingObserver:
    def __init__(self, info: Mapping[str, Any], cfg: ExperimentConfig) -> None:
        from mtsam.tracking.tracker import RunTracker

        self.cfg = cfg
        self.metric: str | None = info.get("metric")
        self.mode: str = info.get("mode") or "max"
        self.best: float | None = None
        run_name = str(info["run_name"])
        self._run = {
            "uri": info["uri"],
            "experiment": info["experiment"],
            "run_name": run_name,
            "parent_run_id": info.get("parent_run_id"),  # a sweep's run (None for train.py)
        }
        spool = spool_dir_of(info)
        self.tracker = RunTracker(
            info["uri"],
            info["experiment"],
            run_name=run_name,
            parent_run_id=info.get("parent_run_id"),
            spool_dir=spool,
            request_timeout_s=float(info.get("request_timeout_s", 10.0)),
            tags={
                "method": cfg.adapter.method,
                "decomposition": cfg.adapter.decomposition if cfg.adapter.method == "tora" else "-",
                "base_preset": cfg.model.preset,
                "dataset": cfg.data.dataset,
                "git_commit": info.get("git_commit", "unknown"),
            }
            | tracking_tags(cfg.data),
            params=cfg.flat(),
        )

    @_guarded
    def on_start(self, model: Any, param_counts: Mapping[str, tuple[int, int]]) -> None:
        from mtsam.adapters.growth import plot_param_growth

        self.tracker.log_params(
            {f"params.trainable.{g}": t for g, (t, _) in param_counts.items()}
            | {f"params.total.{g}": n for g, (_, n) in param_counts.items()}
        )
        with tempfile.TemporaryDirectory() as d:
            try:
                path = plot_param_growth(Path(d) / "param_growth.png")
                self.tracker.log_artifact_file(path, "plots")
            except Exception as e:
                log.warning("param-growth plot not logged: %s", e)
            if (text := tracking_file(self.cfg.data)) is not None:  # the baseline delta_m used
                (Path(d) / BASELINE_ARTIFACT).write_text(text, encoding="utf-8")
                self.tracker.log_artifact_file(Path(d) / BASELINE_ARTIFACT, "baseline")

    @_guarded
    def on_epoch(
        self,
        epoch: int,
        metrics: Mapping[str, float],
        *,
        pictures: Mapping[str, Any] | None,
        adapter_dir: Path | None,
    ) -> None:
        from mtsam.tracking.panel import prediction_panel

        numeric = {
            k: float(v)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and math.isfinite(v) and k != "epoch"
        }
        self.tracker.log_metrics(numeric, step=epoch)
        for sample, entry in (pictures or {}).items():
            preds = {k: v for k, v in entry.items() if k != "image"}
            self.tracker.log_image(
                prediction_panel(entry["image"], preds),
                f"predictions/epoch_{epoch:03d}_{sample}.png",
            )
        if adapter_dir is not None and self._improved(metrics):
            self.tracker.log_artifact_dir(adapter_dir, "adapter")

    def _improved(self, metrics: Mapping[str, float]) -> bool:
        if self.metric is None:
            return True  # nothing to rank by: keep the latest
        value = metrics.get(self.metric)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        if self.best is None or (value > self.best if self.mode == "max" else value < self.best):
            self.best = float(value)
            return True
        return False

    def _identity(self) -> dict[str, Any]:
        """Which MLflow run and ranking a saved best value belongs to."""
        return {**self._run, "metric": self.metric, "mode": self.mode}

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs: the best value whose adapter the MLflow run holds."""
        return {"best": self.best, **self._identity()}

    @_guarded
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """After a restart, only an epoch better than the pre-restart best replaces the
        run's adapter (``register_as`` then registers the best one). A value saved for
        another run or ranking (a resume with another ``tracking.uri`` or ``tune.metric``)
        is not used: the run then starts afresh, keeping its first epoch's adapter."""
        if any(state.get(k) != v for k, v in self._identity().items()):
            return
        best = state.get("best")
        if isinstance(best, (int, float)) and not isinstance(best, bool) and math.isfinite(best):
            self.best = float(best)

    @_guarded
    def on_end(self, status: str, message: str = "") -> None:
        if message:
            self.tracker.set_tags({"mtsam.error": message[:500]})
        report = self.tracker.finish(status, wait_s=30.0)
        if not report.complete:
            print(f"MLflow: not delivered: {report.summary()}; spool {self.tracker.spool_path}")


def make_observer(info: Mapping[str, Any], cfg: ExperimentConfig) -> TrackingObserver | None:
    try:
        return TrackingObserver(info, cfg)
    except Exception as e:
        log.warning("MLflow tracking disabled for this run: %s", e)
        return None
