"""Experiment tracking: the one place that talks to MLflow.

- :mod:`~mtsam.tracking.uri`: resolve and check the tracking URI (fails fast at start-up).
- :class:`~mtsam.tracking.tracker.RunTracker`: rank 0's run; buffers to a spool file when the
  server is unreachable and delivers in order once it is back.
- :mod:`~mtsam.tracking.sweep`: the sweep's parent run, its summary table and plot.
- :mod:`~mtsam.tracking.registry`: register an adapter, load one back as a ready mSAM.
- :mod:`~mtsam.tracking.sync`: upload a spool later (``jobs/sync_mlflow.py``).

Names are re-exported lazily so ``import mtsam.tracking`` does not import MLflow (slow).
"""

from __future__ import annotations

import importlib
import os
from typing import Any

# Set before MLflow is imported anywhere through this package: no telemetry (the platform
# never reaches the internet at run time) and no progress bars or links in worker logs.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# Otherwise every run ended on a server prints two "View run" lines (and costs a request).
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

_EXPORTS = {
    "TrackingError": "uri",
    "check_tracking_uri": "uri",
    "resolve_tracking_uri": "uri",
    "get_or_create_experiment": "client",
    "find_run": "client",
    "flatten_params": "client",
    "count_params": "client",
    "DeliveryReport": "delivery",
    "RunTracker": "tracker",
    "start_sweep_run": "sweep",
    "finish_sweep": "sweep",
    "plot_trials": "sweep",
    "register_adapter": "registry",
    "load_adapter": "registry",
    "prediction_panel": "panel",
    "sync_spool": "sync",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
