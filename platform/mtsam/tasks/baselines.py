"""Measured single-task baselines: the file ``jobs/baselines.py`` writes and ``data.baseline``
reads.

delta_m weighs every task by its single-task baseline, so the baseline decides which trial of
a sweep wins. A baselines file holds, for each task, the metrics one single-task model of the
same settings reached, and where they came from::

    {
      "format": "mtsam-baselines/1",
      "baseline": {"depth": {"abs_err": 1.21, "rel_err": 0.31}, ...},
      "provenance": {"produced_by": "jobs/baselines.py", "date": "...", "config_digest": "...",
                     "code_version": {"git_commit": "...", "mtsam": "0.1.0"},
                     "mlflow": {"parent_run_id": "...", "runs": {"depth": "..."}, ...}, ...}
    }

``data.baseline`` names such a file (a path; relative to the YAML file that names it, or to
the current folder when given with ``--set``) or the MLflow run of ``jobs/baselines.py``
(``runs:/<run id>``, whose artifact ``baselines.json`` is the file; ``runs:/<id>/<path>`` for
another artifact). The config keeps what was read in ``data.baseline_record``.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

FORMAT = "mtsam-baselines/1"
ARTIFACT = "baselines.json"  # the file's name in the MLflow run of jobs/baselines.py
RUNS_PREFIX = "runs:/"


class BaselineError(ValueError):
    """A baselines file or reference that cannot be used; the message is one line."""


def document(values: Mapping[str, Mapping[str, float]], provenance: Mapping[str, Any]) -> str:
    """The file's text: canonical JSON (sorted keys, 2-space indent, newline at the end), so
    reading a file and writing its content again gives the same bytes (and sha256)."""
    doc = {
        "format": FORMAT,
        "baseline": {t: {m: float(v) for m, v in ms.items()} for t, ms in values.items()},
        "provenance": dict(provenance),
    }
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def write_file(
    path: str | Path, values: Mapping[str, Mapping[str, float]], provenance: Mapping[str, Any]
) -> Path:
    """Write a baselines file atomically (a temporary file renamed into place)."""
    check_values(values, where=str(path))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(document(values, provenance), encoding="utf-8")
    tmp.replace(out)
    return out


def check_values(values: Any, *, where: str) -> dict[str, dict[str, float]]:
    """``values`` as {task: {metric: float}}; one-line BaselineError naming ``where`` if not."""
    if not isinstance(values, Mapping) or not values:
        raise BaselineError(f"{where}: 'baseline' must be a non-empty {{task: {{metric: value}}}}")
    out: dict[str, dict[str, float]] = {}
    for task, metrics in values.items():
        if not isinstance(metrics, Mapping) or not metrics:
            raise BaselineError(f"{where}: baseline.{task} must be a non-empty {{metric: value}}")
        out[str(task)] = {}
        for m, v in metrics.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise BaselineError(f"{where}: baseline.{task}.{m} = {v!r}: expected a number")
            out[str(task)][str(m)] = float(v)
    return out


def parse(text: str, *, where: str) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
    """(values, provenance) of a baselines file's text."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise BaselineError(
            f"{where}: not a baselines file (invalid JSON at line {e.lineno})"
        ) from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise BaselineError(
            f'{where}: not a baselines file (expected "format": "{FORMAT}"; write one with '
            "jobs/baselines.py)"
        )
    provenance = doc.get("provenance")
    if not isinstance(provenance, dict):
        raise BaselineError(f"{where}: 'provenance' must be a mapping")
    return check_values(doc.get("baseline"), where=where), provenance


def read_reference(
    ref: str, *, base_dir: str | Path, tracking_uri: str | None = None
) -> dict[str, Any]:
    """Read what ``data.baseline = ref`` names: a file path (relative ones from ``base_dir``)
    or ``runs:/<run id>[/<artifact path>]`` in the MLflow store at ``tracking_uri``.

    Returns the fields of ``data.baseline_record``: ref, source, sha256, values, provenance.
    """
    if ref.startswith(RUNS_PREFIX):
        text, source = _read_run_artifact(ref, tracking_uri)
    elif "://" in ref:
        raise BaselineError(
            f"data.baseline = {ref!r}: expected a local file path or runs:/<run id> of "
            "jobs/baselines.py"
        )
    else:
        path = Path(ref).expanduser()
        if not path.is_absolute():
            path = Path(base_dir) / path
        path = path.resolve()
        source = str(path)
        if not path.is_file():
            raise BaselineError(
                f"data.baseline = {ref!r}: {path}: no such file (measure the baselines with "
                "jobs/baselines.py)"
            )
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise BaselineError(f"data.baseline = {ref!r}: {path}: cannot be read ({e})") from None
    values, provenance = parse(text, where=f"data.baseline = {ref!r} ({source})")
    return {
        "ref": ref,
        "source": source,
        "sha256": sha256_text(text),
        "values": values,
        "provenance": provenance,
    }


def _read_run_artifact(ref: str, tracking_uri: str | None) -> tuple[str, str]:
    rest = ref[len(RUNS_PREFIX) :].strip("/")
    run_id, _, artifact = rest.partition("/")
    if not run_id:
        raise BaselineError(f"data.baseline = {ref!r}: expected runs:/<run id>")
    artifact = artifact or ARTIFACT
    source = f"{RUNS_PREFIX}{run_id}/{artifact}"
    import tempfile

    from mlflow.exceptions import MlflowException

    from mtsam.tracking.client import make_client, one_line
    from mtsam.tracking.uri import http_limits

    try:
        with http_limits(10.0), tempfile.TemporaryDirectory() as d:
            client = make_client(tracking_uri or "")
            local = client.download_artifacts(run_id, artifact, d)
            text = Path(local).read_text(encoding="utf-8")
    except (MlflowException, OSError, UnicodeDecodeError) as e:
        raise BaselineError(
            f"data.baseline = {ref!r}: cannot read {artifact} of run {run_id} at "
            f"{tracking_uri}: {one_line(e)}"
        ) from None
    return text, source


def tracking_tags(data: Any) -> dict[str, str]:
    """MLflow tags naming the baseline a run's delta_m uses (``data`` is ``cfg.data``)."""
    record = data.baseline_record
    if record is not None:
        return {"mtsam.baseline": record.source, "mtsam.baseline_sha256": record.sha256}
    return {"mtsam.baseline": "inline table" if data.baseline_table() else "none"}


def tracking_file(data: Any) -> str | None:
    """The text of the baselines file a run uses, to log as its artifact ``baseline/``: the file
    read (written again canonically: the same bytes for a file of ``jobs/baselines.py``), or an
    inline table as a file of its own; None without a baseline."""
    record = data.baseline_record
    if record is not None:
        provenance = dict(record.provenance)
        return document(record.values, provenance)
    table = data.baseline_table()
    if not table:
        return None
    return document(table, {"produced_by": "inline table in the config (data.baseline)"})
