"""Test-wide settings: no telemetry, no usage stats, loopback only, small thread pools."""

from __future__ import annotations

import os

# Set before ray / mlflow are imported anywhere in the test session.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")

import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
