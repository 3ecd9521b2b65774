"""RunTracker: what rank 0 of a training run uses to record it in MLflow.

A tracker owns one MLflow run, found by its name under its parent (a restarted or resumed
trial reuses its run instead of creating a second one) or created nested under the parent.
Calls never raise because of the back end and never block a training step for much longer
than ``request_timeout_s``: what cannot be delivered waits in ``spool_dir`` (see
:mod:`~mtsam.tracking.delivery`). Invalid input (a metric name MLflow would refuse, a missing
file) raises ``ValueError`` / ``FileNotFoundError`` at the call.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mtsam.tracking.client import as_metric_value, as_text, check_key, flatten_params
from mtsam.tracking.delivery import Deliverer, DeliveryReport, RunTarget
from mtsam.tracking.spool import Spool

log = logging.getLogger("mtsam.tracking")

STATUSES = ("FINISHED", "FAILED", "KILLED")
LOCK_FILE = ".mlflow_spool.lock"


class RunTracker:
    """One MLflow run, written to by one process (rank 0 of a training run).

    Args:
        tracking_uri: server URL or ``sqlite:////abs/path.db`` (see ``resolve_tracking_uri``).
        experiment: experiment name (created if missing).
        run_name: the run's name, e.g. the Tune trial id; the identity used to find it again.
        parent_run_id: the sweep's run; the new run is nested under it.
        tags, params: logged at start (params flattened: ``{"a": {"b": 1}}`` -> ``a.b``).
        spool_dir: folder for the spool of undelivered operations (one tracker per folder).
        request_timeout_s: time-out of one MLflow request (no retries).
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        *,
        run_name: str,
        spool_dir: str | Path,
        parent_run_id: str | None = None,
        tags: Mapping[str, Any] | None = None,
        params: Mapping[str, Any] | None = None,
        request_timeout_s: float = 10.0,
    ) -> None:
        if not run_name:
            raise ValueError("RunTracker: run_name must not be empty")
        if request_timeout_s <= 0:
            raise ValueError(f"RunTracker: request_timeout_s must be > 0, got {request_timeout_s}")
        self._lock = threading.Lock()
        self._closed = False
        self._report: DeliveryReport | None = None
        spool = Spool(spool_dir)
        spool.directory.mkdir(parents=True, exist_ok=True)
        self._lock_fd = _try_lock(spool.directory / LOCK_FILE)
        target = RunTarget(
            tracking_uri=tracking_uri,
            experiment=experiment,
            run_name=run_name,
            parent_run_id=parent_run_id,
        )
        self._d = Deliverer(target, spool, request_timeout_s=request_timeout_s, reopen=True)
        self._d.adopt_spool()  # what a previous attempt of this run left, before anything new
        if tags:
            self._d.submit({"op": "tags", "tags": _texts(tags, what="tag")}, pump=False)
        if params:
            self._d.submit({"op": "params", "params": _params(params)}, pump=False)
        self._d.pump(budget_s=request_timeout_s)
        self._d.persist()

    # ------------------------------------------------------------------ public

    @property
    def run_id(self) -> str | None:
        """The MLflow run id; None while the back end has not been reached yet."""
        return self._d.target.run_id

    @property
    def spool_path(self) -> Path:
        return self._d.spool.path

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params (nested mappings flattened with dots; values cut to MLflow's 6000
        characters). Re-logging an equal value is a no-op; a different value for an existing
        key is kept as it was, with a warning (MLflow params are immutable)."""
        self._submit({"op": "params", "params": _params(params)})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags (e.g. method, decomposition, base preset, dataset, git commit)."""
        self._submit({"op": "tags", "tags": _texts(tags, what="tag")})

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log ``{key: value}`` at ``step`` (keys like ``val/semantic/miou``, ``train/loss/depth``)."""
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
            raise ValueError(f"log_metrics: step must be an int, got {step!r}")
        values = {check_key(k, what="metric"): as_metric_value(k, v) for k, v in metrics.items()}
        if not values:
            return
        op = {"op": "metrics", "metrics": values, "step": int(step), "timestamp": _now_ms()}
        self._submit(op)

    def log_artifact_dir(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        """Upload the files of ``local_dir`` under ``artifact_path`` (e.g. an adapter folder to
        ``adapter``). What the folder holds now is what gets uploaded, even if delivery waits."""
        p = Path(local_dir)
        if not p.is_dir():
            raise FileNotFoundError(f"log_artifact_dir: {p} is not a directory")
        self._submit({"op": "artifact", "path": str(p.resolve()), "artifact_path": artifact_path})

    def log_artifact_file(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload one file into the folder ``artifact_path`` of the run's artifacts."""
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"log_artifact_file: {p} is not a file")
        self._submit({"op": "artifact", "path": str(p.resolve()), "artifact_path": artifact_path})

    log_figure_file = log_artifact_file

    def log_image(self, rgb: np.ndarray, artifact_file: str) -> None:
        """Upload an (H, W, 3) uint8 RGB image as PNG to ``artifact_file`` (e.g.
        ``predictions/epoch_003.png``)."""
        from PIL import Image

        arr = np.asarray(rgb)
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(
                f"log_image: expected an (H, W, 3) uint8 array, got {arr.dtype} {arr.shape}"
            )
        name = Path(artifact_file)
        if name.suffix.lower() != ".png" or name.is_absolute() or ".." in name.parts:
            raise ValueError(
                f"log_image: artifact_file {artifact_file!r} must be a relative .png path"
            )
        with self._lock:
            self._check_open()
            seq = self._d.next_seq
            target = self._d.spool.slot(seq) / name.name
            Image.fromarray(arr).save(target, format="PNG")
            parent = name.parent.as_posix()
            op = {
                "op": "artifact",
                "path": str(target),
                "artifact_path": None if parent == "." else parent,
                "owned": True,
            }
            self._d.submit(op)

    def flush(self) -> bool:
        """Try to deliver everything now (ignoring the back-off); True if nothing is left."""
        with self._lock:
            ok = self._d.pump(force=True)
            self._d.persist()
            return ok

    def finish(self, status: str = "FINISHED", *, wait_s: float = 0.0) -> DeliveryReport:
        """End the run with ``status`` (FINISHED, FAILED or KILLED); deliver what is pending
        (retrying for up to ``wait_s`` seconds), then say what was not delivered (also logged
        as a warning). Calling it again returns the same report."""
        if status not in STATUSES:
            raise ValueError(f"finish: status must be one of {STATUSES}, got {status!r}")
        with self._lock:
            if self._report is not None:
                return self._report
            self._d.submit({"op": "terminate", "status": status, "end_time": _now_ms()}, pump=False)
            deadline = time.monotonic() + wait_s
            while not self._d.pump(force=True) and time.monotonic() < deadline:
                time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
            self._d.persist()
            self._report = self._d.report()
            self._closed = True
            _unlock(self._lock_fd)
        if self._report.complete:
            log.info(self._report.summary())
        else:
            log.warning(self._report.summary())
        return self._report

    def __enter__(self) -> RunTracker:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.finish("FAILED" if exc_type is not None else "FINISHED")

    # --------------------------------------------------------------- internals

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"RunTracker for run {self.run_id}: already finished")

    def _submit(self, op: dict[str, Any]) -> None:
        with self._lock:
            self._check_open()
            self._d.submit(op)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _texts(values: Mapping[str, Any], *, what: str) -> dict[str, str]:
    return {check_key(str(k), what=what): as_text(v) for k, v in values.items()}


def _params(params: Mapping[str, Any]) -> dict[str, str]:
    flat = flatten_params(params)
    for k in flat:
        check_key(k, what="param")
    return flat


def _try_lock(path: Path) -> int | None:
    # Keeps jobs/sync_mlflow.py from uploading a spool that a live tracker is still writing.
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        log.warning("MLflow spool folder %s is locked by another process", path.parent)
        return None
    return fd


def _unlock(fd: int | None) -> None:
    if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


__all__ = ["RunTracker"]
