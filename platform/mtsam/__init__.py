"""mtsam: multi-task fine-tuning of the Segment Anything Model with ToRA and baseline adapters.

The package is importable without Ray or MLflow; those are only needed by the jobs.
"""

__version__ = "0.1.0"
