"""Driver-side wiring of tracking for the jobs: URI check, the sweep's parent run, its summary.

The jobs call these; the trials receive a plain dict (``info``) that
:func:`mtsam.tracking.observer.make_observer` turns into rank 0's tracker.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from mtsam.config import ExperimentConfig
from mtsam.tasks.baselines import tracking_tags

REPO = Path(__file__).resolve().parents[3]


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def check_tracking(cfg: ExperimentConfig) -> str:
    """The resolved tracking URI, checked to answer; a ValueError naming ``tracking.uri`` if not.

    Jobs call it before Ray starts, so a bad URI costs neither a cluster start nor a folder.
    """
    from mtsam.tracking.uri import check_tracking_uri, resolve_tracking_uri

    uri = resolve_tracking_uri(cfg.tracking.uri, cfg.output_dir)
    try:
        check_tracking_uri(uri, timeout_s=min(10.0, cfg.tracking.request_timeout_s))
    except Exception as e:
        raise ValueError(f"tracking.uri: {e}") from None
    return uri


def spool_root(cfg: ExperimentConfig, storage: str) -> str:
    """Where runs keep undelivered MLflow records: beside their Ray Train folders, or, for a URI
    storage path (s3://, gs://), on the node: under ``<output_dir>/mlflow_spools`` when
    ``output_dir`` is absolute, else ``~/mtsam_mlflow_spools`` (a relative path would resolve
    into the temporary working folder of ``ray job submit`` and be lost with it)."""
    if "://" not in storage:
        return storage
    out = Path(cfg.output_dir).expanduser()
    return str(out / "mlflow_spools" if out.is_absolute() else Path.home() / "mtsam_mlflow_spools")


def _info(cfg: ExperimentConfig, *, spool_root: str) -> dict[str, Any]:
    uri = check_tracking(cfg)
    return {
        "uri": uri,
        "experiment": cfg.tracking.experiment or cfg.name,
        "request_timeout_s": cfg.tracking.request_timeout_s,
        "spool_root": spool_root,
        "git_commit": git_commit(),
        "parent_run_id": None,
        "metric": cfg.tune.metric
        if cfg.data.baseline_table() or cfg.tune.metric != "val/delta_m"
        else None,
        "mode": None,
    }


def tracking_for_run(cfg: ExperimentConfig, *, run_name: str, storage: str) -> dict[str, Any]:
    """A plain ``jobs/train.py`` run: a top-level MLflow run named ``run_name``."""
    info = _info(cfg, spool_root=spool_root(cfg, storage))
    info["run_name"] = info["run_folder"] = run_name
    if info["metric"]:
        from mtsam.tasks import metric_mode

        info["mode"] = metric_mode(info["metric"], cfg.data.tasks)
    return info


def start_sweep_tracking(
    cfg: ExperimentConfig,
    *,
    sweep_name: str,
    sweep_path: str,
    storage: str,
    metric: str,
    mode: str,
    kind: str = "sweep",
) -> dict[str, Any]:
    """Open (or, on resume, reopen) the sweep's parent run; trials nest under it. ``kind`` is
    its tag ``mtsam.kind`` (``baselines`` for the runs of jobs/baselines.py)."""
    from mtsam.tracking.sweep import SWEEP_PATH_TAG, start_sweep_run

    info = _info(cfg, spool_root=spool_root(cfg, storage))
    info.update(metric=metric, mode=mode)
    info["parent_run_id"] = start_sweep_run(
        info["uri"],
        info["experiment"],
        run_name=sweep_name,
        params=cfg.flat(),
        tags={
            SWEEP_PATH_TAG: sweep_path,
            "mtsam.kind": kind,
            "git_commit": info["git_commit"],
            "dataset": cfg.data.dataset,
            "base_preset": cfg.model.preset,
        }
        | tracking_tags(cfg.data),
        request_timeout_s=cfg.tracking.request_timeout_s,
    )
    log_baseline_file(cfg, info["uri"], info["parent_run_id"])
    return info


def log_baseline_file(cfg: ExperimentConfig, uri: str, run_id: str) -> None:
    """The baselines file the run's delta_m uses, as its artifact ``baseline/baselines.json``
    (values and provenance are params too: ``data.baseline*``)."""
    import tempfile

    from mtsam.tasks.baselines import ARTIFACT, tracking_file
    from mtsam.tracking.client import make_client
    from mtsam.tracking.uri import TrackingError, http_limits

    text = tracking_file(cfg.data)
    if text is None:
        return
    try:
        with http_limits(cfg.tracking.request_timeout_s), tempfile.TemporaryDirectory() as d:
            path = Path(d) / ARTIFACT
            path.write_text(text, encoding="utf-8")
            make_client(uri).log_artifact(run_id, str(path), "baseline")
    except Exception as e:  # the run was just created at this URI: report, do not hide
        raise TrackingError(f"MLflow {uri}: cannot log the baseline file: {e}") from None


def end_failed_run(info: dict[str, Any], message: str) -> str:
    """End a ``jobs/train.py`` run's MLflow run as FAILED, with ``message`` in the tag
    ``mtsam.error``, after its workers died (their tracker never ended it). Best effort: returns
    one line saying what was done. A later ``--resume`` reopens the same run."""
    from mtsam.tracking.client import find_run_in, make_client, one_line
    from mtsam.tracking.uri import http_limits

    try:
        with http_limits(float(info.get("request_timeout_s", 10.0))):
            client = make_client(info["uri"])
            exp = client.get_experiment_by_name(info["experiment"])
            run_id = exp and find_run_in(
                client, exp.experiment_id, run_name=info["run_name"], top_level=True
            )
            if not run_id:
                return f"MLflow: no run named {info['run_name']!r} to end"
            if client.get_run(run_id).info.status != "RUNNING":
                return f"MLflow: run {run_id} already ended"
            client.set_tag(run_id, "mtsam.error", message[:500])
            client.set_terminated(run_id, "FAILED")
        return f"MLflow: run {run_id} ended as FAILED"
    except Exception as e:  # the error itself is what the user must see
        return f"MLflow: could not end the run: {one_line(e)}"


def finish_sweep_tracking(
    cfg: ExperimentConfig,
    info: dict[str, Any],
    *,
    rows: list[Any],
    best: Any,
    metric: str,
    out_dir: str,
    interrupted: bool = False,
) -> str:
    """Best metrics, the trials table and plot on the parent run; register the best adapter.

    An ``interrupted`` sweep (Ctrl-C; it can be resumed) still logs what it has, but its run
    ends KILLED, as do its unfinished trials' runs, and nothing is registered: a resume that
    finishes the sweep does that."""
    from mtsam.tracking.client import find_run, one_line
    from mtsam.tracking.registry import register_adapter
    from mtsam.tracking.sweep import end_open_trials, finish_sweep
    from mtsam.tracking.uri import http_limits

    summary = [
        {
            "trial_id": r.trial_id,
            "status": r.status,
            "epochs": r.epochs,
            "trainable_params": r.trainable_params,
        }
        | ({"adapter_params": r.metrics["adapter_params"]} if "adapter_params" in r.metrics else {})
        | ({"pareto": bool(r.pareto)} if getattr(r, "pareto", None) is not None else {})
        | {f"param/{k}": v for k, v in r.sample.items()}
        | {k: v for k, v in r.metrics.items() if k.startswith(("val/", "train/"))}
        for r in rows
    ]
    best_metrics = (
        {k: v for k, v in best.metrics.items() if k.startswith("val/")} if best is not None else {}
    )
    report = finish_sweep(
        info["uri"],
        info["parent_run_id"],
        best_metrics=best_metrics,
        summary_rows=summary,
        out_dir=out_dir,
        status="KILLED" if interrupted else "FINISHED" if best is not None else "FAILED",
        request_timeout_s=cfg.tracking.request_timeout_s,
    )
    lines = [
        f"MLflow: experiment {info['experiment']!r}, sweep run {info['parent_run_id']} "
        f"at {info['uri']}"
    ]
    if not report.complete:
        lines.append(f"  not delivered yet: {report.summary()} (upload later: jobs/sync_mlflow.py)")
    timeout = cfg.tracking.request_timeout_s
    try:
        ended = end_open_trials(
            info["uri"],
            info["parent_run_id"],
            failed=[r.trial_id for r in rows if r.status == "ERROR"],
            finished=[
                r.trial_id
                for r in rows
                if r.status == "TERMINATED"
                and r.epochs >= int(r.sample.get("train.epochs", cfg.train.epochs))
            ],
            request_timeout_s=timeout,
        )
        if ended:
            lines.append(f"  ended the MLflow runs of {len(ended)} stopped trials: {ended}")
    except Exception as e:  # the sweep's results stand; only the bookkeeping is late
        lines.append(f"  could not end the runs of stopped trials: {one_line(e)}")
    if interrupted and cfg.tracking.register_as:
        lines.append("  not registered: the sweep was interrupted (a resume registers its best)")
    elif best is not None and cfg.tracking.register_as:
        try:
            with http_limits(timeout):
                run_id = find_run(
                    info["uri"],
                    info["experiment"],
                    run_name=best.trial_id,
                    parent_run_id=info["parent_run_id"],
                )
            if run_id is None:
                lines.append(f"  could not register: no MLflow run for trial {best.trial_id}")
            else:
                version = register_adapter(
                    info["uri"], run_id=run_id, name=cfg.tracking.register_as
                )
                lines.append(
                    f"  registered the best adapter as models:/{cfg.tracking.register_as}/{version}"
                )
        except Exception as e:  # a finished sweep must still print its table
            lines.append(f"  could not register the best adapter: {one_line(e)}")
    if info["uri"].startswith("sqlite:"):
        lines.append(
            f"  open the dashboard: mlflow ui --backend-store-uri {info['uri']} --host 127.0.0.1"
        )
    return "\n".join(lines)
