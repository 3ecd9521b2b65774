"""Where runs are recorded: resolving the tracking URI, checking it at start-up, HTTP limits.

Only ``requests`` is imported at module level; MLflow is imported inside the functions that
need it, so resolving and checking a URI stays cheap.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

ENV_URI = "MLFLOW_TRACKING_URI"
DEFAULT_DB = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
# Database back ends that MLflow's SQL store accepts besides SQLite.
_SQL_SCHEMES = ("postgresql", "mysql", "mssql")


class TrackingError(RuntimeError):
    """The tracking back end is misconfigured or unreachable; the message is one line."""


def _absolute_sqlite(uri: str) -> str:
    # sqlite:///rel.db is relative to the current folder, which inside a Ray worker is a
    # session folder: pin it to the folder of the process that resolves the URI.
    path = uri[len("sqlite:///") :]
    if path and not path.startswith("/") and path != ":memory:":
        return "sqlite:///" + str(Path(path).resolve())
    return uri


def resolve_tracking_uri(uri: str | None, output_dir: str | Path) -> str:
    """The tracking URI to use: ``uri``, else ``$MLFLOW_TRACKING_URI``, else
    ``sqlite:///<absolute output_dir>/mlflow.db``. Relative SQLite paths are made absolute."""
    chosen = uri or os.environ.get(ENV_URI) or ""
    if not chosen:
        return "sqlite:///" + str(Path(output_dir).resolve() / DEFAULT_DB)
    if chosen.startswith("sqlite:///"):
        return _absolute_sqlite(chosen)
    return chosen


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, else None."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///") :].split("?", 1)[0])


def default_artifact_location(uri: str, experiment: str) -> str | None:
    """Artifact folder for a new experiment: ``<db folder>/mlartifacts/<experiment>`` for SQLite
    (MLflow's own default, ``./mlruns``, depends on the current folder), None otherwise (the
    server decides)."""
    db = sqlite_path(uri)
    if db is None:
        return None
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in experiment) or "default"
    return str(db.parent / ARTIFACTS_DIR / safe)


def is_http(uri: str) -> bool:
    return urlparse(uri).scheme in ("http", "https")


def check_tracking_uri(uri: str, *, timeout_s: float = 5.0) -> None:
    """Fail fast, with one line, when ``uri`` cannot work; return quietly when it can.

    - ``http(s)://host:port``: ``GET /health`` and one experiment search, each within
      ``timeout_s`` and without retries (MLflow's own retries would block ~4 minutes).
    - ``sqlite:////abs/path.db``: the path must be absolute; its folder is created.
    - ``postgresql://``, ``mysql://``, ``mssql://``: one experiment search.
    Anything else (including MLflow's deprecated file store) raises :class:`TrackingError`.
    """
    if not isinstance(uri, str) or not uri.strip():
        raise TrackingError("tracking URI is empty: give a server URL or sqlite:////abs/path.db")
    parsed = urlparse(uri)
    scheme = parsed.scheme.split("+", 1)[0]
    if scheme in ("http", "https"):
        if not parsed.hostname:
            raise TrackingError(f"tracking URI {uri!r}: no host name")
        _check_server(uri, timeout_s)
    elif scheme == "sqlite":
        db = sqlite_path(uri)
        if db is None or not db.is_absolute():
            raise TrackingError(
                f"tracking URI {uri!r}: SQLite path must be absolute (sqlite:////abs/path.db): "
                "Ray workers run in other folders"
            )
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TrackingError(f"tracking URI {uri!r}: cannot create {db.parent} ({e})") from None
        if db.exists() and not db.is_file():
            raise TrackingError(f"tracking URI {uri!r}: {db} is not a file")
        # Opens (and on first use creates) the database: catches a file that is not one.
        _check_with_client(uri, timeout_s)
    elif scheme in _SQL_SCHEMES:
        _check_with_client(uri, timeout_s)
    else:
        raise TrackingError(
            f"tracking URI {uri!r}: unsupported scheme {parsed.scheme or '(none)'!r}; expected "
            "http(s)://host:port, sqlite:////abs/path.db, postgresql://, mysql:// or mssql://"
        )


def _check_server(uri: str, timeout_s: float) -> None:
    import requests

    url = uri.rstrip("/") + "/health"
    try:
        resp = requests.get(url, timeout=timeout_s)
    except requests.RequestException as e:
        reason = type(e).__name__
        raise TrackingError(
            f"MLflow server {uri} unreachable ({reason} on GET /health within {timeout_s:g} s); "
            "start it or fix tracking.uri / $MLFLOW_TRACKING_URI"
        ) from None
    if resp.status_code != 200:
        raise TrackingError(
            f"MLflow server {uri}: GET /health answered HTTP {resp.status_code}, expected 200"
        )
    _check_with_client(uri, timeout_s)


def _check_with_client(uri: str, timeout_s: float) -> None:
    from mlflow import MlflowClient

    try:
        with http_limits(timeout_s):
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TrackingError(f"tracking URI {uri!r}: {first[:300]}") from None


_LIMITS_LOCK = threading.RLock()
_LIMIT_VARS = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")


@contextmanager
def http_limits(timeout_s: float) -> Iterator[None]:
    """Within the block, MLflow HTTP calls make one attempt with a ``timeout_s`` time-out.

    MLflow reads these settings from the environment on every request and has no per-client
    option; the environment is restored afterwards, and a lock keeps two threads from
    interleaving their changes.
    """
    with _LIMITS_LOCK:
        saved = {k: os.environ.get(k) for k in _LIMIT_VARS}
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
        os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(max(1, math.ceil(timeout_s)))
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


__all__ = [
    "TrackingError",
    "check_tracking_uri",
    "default_artifact_location",
    "http_limits",
    "is_http",
    "resolve_tracking_uri",
    "sqlite_path",
]
