"""Small MLflow client operations shared by the run tracker, the sweep run and the spool sync.

Everything goes through an explicit ``MlflowClient(tracking_uri=...)`` (no global ``mlflow.*``
state), so several trackers can live in one process.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag, ViewType
from mlflow.exceptions import MlflowException

from mtsam.tracking.uri import TrackingError, default_artifact_location, sqlite_path

PARENT_TAG = "mlflow.parentRunId"
# MLflow's limits (mlflow.utils.validation): longer values are rejected by the server.
MAX_KEY_LENGTH = 250
MAX_PARAM_LENGTH = 6000
MAX_TAG_LENGTH = 8000
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
_KEY_RE = re.compile(r"^[/\w.\- :]+$")
_TRUNCATED = "...[truncated]"


def make_client(tracking_uri: str) -> MlflowClient:
    db = sqlite_path(tracking_uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def check_key(key: str, *, what: str) -> str:
    """Raise ValueError unless ``key`` is a valid MLflow metric/param/tag name."""
    if not isinstance(key, str) or not _KEY_RE.match(key) or len(key) > MAX_KEY_LENGTH:
        raise ValueError(
            f"{what} name {key!r}: must be 1-{MAX_KEY_LENGTH} characters of letters, digits, "
            "'_', '-', '.', ' ', ':' or '/'"
        )
    if key.startswith("/") or ".." in key.split("/") or key.endswith("/"):
        raise ValueError(f"{what} name {key!r}: must not look like an absolute or '..' path")
    return key


def truncate(value: str, limit: int) -> str:
    """``value`` cut to ``limit`` characters with a visible marker (deterministic, so a resumed
    run re-logs the identical string)."""
    if len(value) <= limit:
        return value
    return value[: limit - len(_TRUNCATED)] + _TRUNCATED


def as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, Path):
        return str(value)
    try:
        return json.dumps(value, sort_keys=True, default=str)
    except (TypeError, ValueError):
        return str(value)


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mappings -> ``{"a.b.c": "value"}``; lists and tuples become JSON text."""
    out: dict[str, str] = {}
    for k, v in params.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            if v:
                out.update(flatten_params(v, prefix=f"{key}."))
            else:
                out[key] = "{}"
        else:
            out[key] = as_text(v)
    return out


def count_params(counts: Mapping[str, tuple[int, int]]) -> dict[str, int]:
    """``MSAM.parameter_counts()`` -> ``{"params/trainable/<group>": n, "params/total/<group>": n}``."""
    out: dict[str, int] = {}
    for group, (trainable, total) in counts.items():
        out[f"params/trainable/{group}"] = int(trainable)
        out[f"params/total/{group}"] = int(total)
    return out


def is_transient(exc: BaseException) -> bool:
    """True when retrying later may succeed (server down, time-out, 5xx, locked database);
    False when the back end refused the request itself (4xx: bad value, deleted run)."""
    if isinstance(exc, MlflowException):
        status = exc.get_http_status_code()
        return status >= 500 or status in (408, 429)
    return not isinstance(exc, (FileNotFoundError, NotADirectoryError, ValueError, TypeError))


def one_line(exc: BaseException, limit: int = 240) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first[:limit]}"


def get_or_create_experiment(tracking_uri: str, name: str) -> str:
    """The id of experiment ``name``, created if missing (with its artifacts next to a SQLite
    database, ``<db folder>/mlartifacts/<name>``). A deleted experiment raises TrackingError."""
    client = make_client(tracking_uri)
    return experiment_id(client, tracking_uri, name)


def experiment_id(client: MlflowClient, tracking_uri: str, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(
                name, artifact_location=default_artifact_location(tracking_uri, name)
            )
        except MlflowException as e:
            # Another trial created it between our two calls.
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        raise TrackingError(
            f"MLflow experiment {name!r} ({tracking_uri}) is deleted: restore it "
            "(mlflow experiments restore) or choose another tracking.experiment"
        )
    return exp.experiment_id


def _quote(value: str) -> str:
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ValueError(f"run name or tag {value!r}: may not contain both ' and \"")


def find_run_in(
    client: MlflowClient,
    experiment_id: str,
    *,
    run_name: str | None = None,
    parent_run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
    top_level: bool = False,
) -> str | None:
    """Oldest active run of the experiment matching all given fields, or None.

    ``parent_run_id=None`` matches any parent unless ``top_level`` (then: runs with no parent).
    """
    clauses = []
    if run_name is not None:
        clauses.append(f"attributes.run_name = {_quote(run_name)}")
    if parent_run_id is not None:
        clauses.append(f"tags.`{PARENT_TAG}` = {_quote(parent_run_id)}")
    for k, v in (tags or {}).items():
        clauses.append(f"tags.`{k}` = {_quote(v)}")
    runs = client.search_runs(
        [experiment_id],
        filter_string=" and ".join(clauses),
        run_view_type=ViewType.ACTIVE_ONLY,
        max_results=1000,
        order_by=["attributes.start_time ASC"],
    )
    if top_level:
        runs = [r for r in runs if PARENT_TAG not in r.data.tags]
    return runs[0].info.run_id if runs else None


def find_run(
    tracking_uri: str,
    experiment: str,
    *,
    run_name: str | None = None,
    parent_run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> str | None:
    """Id of the oldest active run named ``run_name`` (under ``parent_run_id``, with ``tags``)
    in experiment ``experiment``; None if the experiment or the run does not exist."""
    client = make_client(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    return find_run_in(
        client, exp.experiment_id, run_name=run_name, parent_run_id=parent_run_id, tags=tags
    )


def log_params_once(client: MlflowClient, run_id: str, params: Mapping[str, str]) -> list[str]:
    """Log the params the run does not have yet; MLflow params are immutable, so equal values
    already there are skipped and different ones are left alone. Returns the conflicting keys."""
    existing = client.get_run(run_id).data.params
    todo: list[Param] = []
    conflicts: list[str] = []
    for k, v in params.items():
        v = truncate(v, MAX_PARAM_LENGTH)
        if k not in existing:
            todo.append(Param(k, v))
        elif existing[k] != v:
            conflicts.append(k)
    for i in range(0, len(todo), MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=todo[i : i + MAX_PARAMS_PER_BATCH])
    return conflicts


def set_tags(client: MlflowClient, run_id: str, tags: Mapping[str, str]) -> None:
    items = [RunTag(k, truncate(v, MAX_TAG_LENGTH)) for k, v in tags.items()]
    for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, tags=items[i : i + MAX_PARAMS_PER_BATCH])


def log_metric_rows(
    client: MlflowClient, run_id: str, rows: list[tuple[str, float, int, int]]
) -> None:
    """rows: (key, value, timestamp ms, step); sent in batches of MLflow's maximum size."""
    metrics = [Metric(k, v, ts, step) for k, v, ts, step in rows]
    for i in range(0, len(metrics), MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=metrics[i : i + MAX_METRICS_PER_BATCH])


def as_metric_value(key: str, value: Any) -> float:
    """``value`` as a float (0-d tensors and numpy scalars included); NaN and inf are kept."""
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"metric {key!r}: value {value!r} is not a number") from None


__all__ = [
    "as_text",
    "check_key",
    "count_params",
    "find_run",
    "find_run_in",
    "flatten_params",
    "get_or_create_experiment",
    "is_transient",
    "log_params_once",
    "make_client",
]
