"""The sweep's parent run: started by the Tune driver, finished with a summary of all trials.

Trials are nested under it by their :class:`~mtsam.tracking.tracker.RunTracker`
(``parent_run_id``). A resumed sweep finds its parent again by the tag ``mtsam.sweep_path``
(the Tune experiment folder) instead of starting a second one.
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException

from mtsam.tracking.client import (
    as_metric_value,
    check_key,
    experiment_id,
    find_run_in,
    flatten_params,
    log_params_once,
    make_client,
    one_line,
    set_tags,
)
from mtsam.tracking.delivery import Deliverer, DeliveryReport, RunTarget
from mtsam.tracking.spool import Spool
from mtsam.tracking.uri import TrackingError, http_limits

SWEEP_PATH_TAG = "mtsam.sweep_path"
SUMMARY_DIR = "summary"


def start_sweep_run(
    tracking_uri: str,
    experiment: str,
    *,
    run_name: str,
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, Any] | None = None,
    request_timeout_s: float = 10.0,
) -> str:
    """Start (or, for a resumed sweep, reopen) the sweep's parent run; returns its run id.

    With ``tags[SWEEP_PATH_TAG]`` set, an active top-level run of the experiment with the same
    tag is reused (marked RUNNING again) instead of creating a new one. Params are flattened
    (``{"a": {"b": 1}}`` -> ``a.b``); equal values already logged are skipped. Raises
    :class:`TrackingError` (one line) when the back end cannot be used: the driver checks the
    URI at start-up, so this is the place to stop before any trial runs.
    """
    str_tags = {str(k): str(v) for k, v in (tags or {}).items()}
    try:
        with http_limits(request_timeout_s):
            client = make_client(tracking_uri)
            exp = experiment_id(client, tracking_uri, experiment)
            run_id = None
            if SWEEP_PATH_TAG in str_tags:
                run_id = find_run_in(
                    client, exp, tags={SWEEP_PATH_TAG: str_tags[SWEEP_PATH_TAG]}, top_level=True
                )
            if run_id is None:
                run_id = client.create_run(exp, run_name=run_name, tags=str_tags).info.run_id
            else:
                client.update_run(run_id, status="RUNNING")
                set_tags(client, run_id, str_tags)
            if params:
                log_params_once(client, run_id, flatten_params(params))
    except TrackingError:
        raise
    except (MlflowException, OSError) as e:
        raise TrackingError(
            f"MLflow {tracking_uri}: cannot start sweep run {run_name!r}: {one_line(e)}"
        ) from None
    return run_id


def finish_sweep(
    tracking_uri: str,
    run_id: str,
    *,
    best_metrics: Mapping[str, float],
    summary_rows: Sequence[Mapping[str, Any]],
    out_dir: str | Path,
    plot_path: str | Path | None = None,
    status: str = "FINISHED",
    request_timeout_s: float = 10.0,
) -> DeliveryReport:
    """Record the sweep's outcome in its parent run and end it.

    Writes ``out_dir/summary/trials.csv``, ``trials.parquet`` and (unless ``plot_path`` is
    given) ``trials.png`` from ``summary_rows`` (one dict per trial), then logs ``best_metrics``
    (step 0), the ``summary`` folder as artifacts and the status. Like a trial's tracker it
    never raises for an unreachable back end: what was not delivered stays in
    ``out_dir/mlflow_spool.jsonl`` (see the returned report; ``jobs/sync_mlflow.py`` uploads it),
    and what an earlier call left there is sent first by the next one.
    """
    if status not in ("FINISHED", "FAILED", "KILLED"):
        raise ValueError(f"finish_sweep: status must be FINISHED, FAILED or KILLED, got {status!r}")
    metrics = {check_key(k, what="metric"): as_metric_value(k, v) for k, v in best_metrics.items()}
    out = Path(out_dir)
    folder = out / SUMMARY_DIR
    folder.mkdir(parents=True, exist_ok=True)
    rows = [dict(r) for r in summary_rows]
    write_csv(rows, folder / "trials.csv")
    write_parquet(rows, folder / "trials.parquet")
    if plot_path is None:
        plot_trials(rows, folder / "trials.png")
    else:
        p = Path(plot_path)
        if not p.is_file():
            raise FileNotFoundError(f"finish_sweep: plot {p} is not a file")
        (folder / p.name).write_bytes(p.read_bytes())
    d = Deliverer(
        RunTarget(tracking_uri=tracking_uri, run_id=run_id),
        Spool(out),
        request_timeout_s=request_timeout_s,
        reopen=False,
    )
    d.adopt_spool()
    now = int(time.time() * 1000)
    if metrics:
        d.submit({"op": "metrics", "metrics": metrics, "step": 0, "timestamp": now}, pump=False)
    d.submit(
        {"op": "artifact", "path": str(folder.resolve()), "artifact_path": SUMMARY_DIR}, pump=False
    )
    d.submit({"op": "terminate", "status": status, "end_time": now}, pump=False)
    d.pump(force=True)
    d.persist()
    return d.report()


def end_open_trials(
    tracking_uri: str,
    parent_run_id: str,
    *,
    failed: Sequence[str] = (),
    finished: Sequence[str] = (),
    request_timeout_s: float = 10.0,
) -> list[str]:
    """End every trial run of the sweep still RUNNING; returns their run names.

    A trial stopped from outside (an ASHA cut, an error, retries used up) has its workers
    killed, so its own tracker never ends its MLflow run; nor does a trial torn down right after
    its last report. Those in ``failed`` (run names) end as FAILED, those in ``finished`` (all
    epochs trained) as FINISHED, the others as KILLED. Raises for an unreachable back end.
    """
    from mtsam.tracking.client import PARENT_TAG, _quote

    with http_limits(request_timeout_s):
        client = make_client(tracking_uri)
        exp = client.get_run(parent_run_id).info.experiment_id
        runs = client.search_runs(
            [exp],
            filter_string=f"tags.`{PARENT_TAG}` = {_quote(parent_run_id)} "
            "and attributes.status = 'RUNNING'",
            max_results=10000,
        )
        for r in runs:
            name = r.info.run_name
            status = "FAILED" if name in failed else "FINISHED" if name in finished else "KILLED"
            client.set_terminated(r.info.run_id, status)
    return sorted(r.info.run_name for r in runs)


def _columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    cols: dict[str, None] = {}
    for r in rows:
        cols.update(dict.fromkeys(r))
    return list(cols)


def write_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    cols = _columns(rows)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in cols})
    return path


def write_parquet(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """One column per key; a column whose values do not share one type is written as text."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrays, names = [], []
    for c in _columns(rows):
        values = [r.get(c) for r in rows]
        try:
            arr = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            arr = pa.array([None if v is None else str(v) for v in values], type=pa.string())
        arrays.append(arr)
        names.append(c)
    pq.write_table(pa.Table.from_arrays(arrays, names=names), path)
    return path


def _number(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def plot_trials(
    rows: Sequence[Mapping[str, Any]],
    path: str | Path,
    *,
    x_key: str = "trainable_params",
    y_key: str = "val/delta_m",
    group_key: str = "param/adapter.method",
    metric_keys: Sequence[str] | None = None,
) -> Path:
    """PNG of the trials: ``y_key`` against ``x_key`` (one colour per ``group_key`` value), then
    one panel per metric of ``metric_keys`` (default: the other numeric ``val/...`` columns,
    at most 8) against ``x_key``. Trials without a number for a panel's axes are left out of it.
    Uses matplotlib's Agg canvas directly (no global backend change)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if metric_keys is None:
        metric_keys = [
            c
            for c in _columns(rows)
            if c.startswith("val/")
            and c != y_key
            and any(_number(r.get(c)) is not None for r in rows)
        ][:8]
    panels = [y_key, *metric_keys]
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.4 * nrows), dpi=100)
    FigureCanvasAgg(fig)
    groups = sorted({str(r.get(group_key, "")) for r in rows})
    for i, key in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        for g in groups:
            pts = [
                (_number(r.get(x_key)), _number(r.get(key)))
                for r in rows
                if str(r.get(group_key, "")) == g
            ]
            pts = [(x, y) for x, y in pts if x is not None and y is not None]
            if pts:
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=18, label=g or None)
        xs = [v for r in rows if (v := _number(r.get(x_key))) is not None and v > 0]
        if xs and max(xs) / min(xs) > 100:
            ax.set_xscale("log")
        ax.set_xlabel(x_key)
        ax.set_ylabel(key)
        ax.set_title(key, fontsize=9)
        ax.grid(alpha=0.3)
        if i == 0 and any(groups):
            ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def plot_pareto(
    rows: Sequence[Mapping[str, Any]],
    front: Sequence[bool],
    path: str | Path,
    *,
    x_key: str,
    y_key: str,
    x_mode: str,
    y_mode: str,
) -> Path:
    """PNG of ``y_key`` against ``x_key`` (e.g. delta_m against adapter parameters), one point
    per trial, the Pareto front (``front[i]`` for ``rows[i]``) highlighted and joined by its
    staircase: the best ``y`` reachable at each ``x``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    pts = [
        (_number(r.get(x_key)), _number(r.get(y_key)), bool(f))
        for r, f in zip(rows, front, strict=True)
    ]
    pts = [(x, y, f) for x, y, f in pts if x is not None and y is not None]
    fig = Figure(figsize=(6.0, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    others = [(x, y) for x, y, f in pts if not f]
    on = sorted(((x, y) for x, y, f in pts if f), reverse=x_mode == "max")
    if others:
        ax.scatter(
            [p[0] for p in others],
            [p[1] for p in others],
            s=22,
            color="0.6",
            label="dominated trials",
        )
    if on:
        xs_on, ys_on = [p[0] for p in on], [p[1] for p in on]
        ax.scatter(xs_on, ys_on, s=36, color="tab:red", zorder=3, label="Pareto front")
        ax.step(xs_on, ys_on, where="post", color="tab:red", alpha=0.7)
    xs = [x for x, _, _ in pts if x > 0]
    if xs and max(xs) / min(xs) > 100:
        ax.set_xscale("log")
    ax.set_xlabel(f"{x_key} ({x_mode})")
    ax.set_ylabel(f"{y_key} ({y_mode})")
    ax.set_title(
        f"{y_key} against {x_key}: {len(on)} of {len(pts)} trials on the front", fontsize=9
    )
    ax.grid(alpha=0.3)
    if pts:
        ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


__all__ = [
    "SWEEP_PATH_TAG",
    "end_open_trials",
    "finish_sweep",
    "plot_pareto",
    "plot_trials",
    "start_sweep_run",
]
