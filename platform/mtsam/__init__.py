"""mtsam: multi-task fine-tuning of the Segment Anything Model with ToRA and baseline adapters.

The package is importable without Ray or MLflow; those are only needed by the jobs.
"""

__version__ = "0.1.0"

from typing import Any as _Any


def __getattr__(name: str) -> _Any:
    # Lazy, so `import mtsam` stays light (no torch, no MLflow) until load_adapter is used.
    if name == "load_adapter":
        from mtsam.tracking.registry import load_adapter

        return load_adapter
    raise AttributeError(f"module 'mtsam' has no attribute {name!r}")
