"""Run a sweep end to end: plan (validated before Ray starts), Tuner, summary, tracking."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtsam.cli import metrics_table
from mtsam.config import PARAM_METRICS, ExperimentConfig
from mtsam.storage import join
from mtsam.tune.driver import SweepContext, TrialRow, best_row, summarise, trial_driver
from mtsam.tune.pareto import pareto_front
from mtsam.tune.space import make_scheduler, make_searcher, tune_space


class SweepError(RuntimeError):
    """The sweep could not produce a result (every trial failed or was rejected)."""


@dataclass(frozen=True)
class Plan:
    metric: str  # the metric the best trial is picked by (the first objective)
    mode: str
    objectives: tuple[tuple[str, str], ...] = ()  # (metric, mode) pairs of a Pareto sweep

    @property
    def multi(self) -> bool:
        return len(self.objectives) > 1


def plan(cfg: ExperimentConfig) -> Plan:
    """Check what only a sweep needs, before anything starts; one-line errors name the key."""
    from mtsam.train.runner import score_order

    objectives = tuple(cfg.tune.objectives.items())
    metrics = [m for m, _ in objectives] or [cfg.tune.metric]
    # The config has checked that a per-task metric exists; delta_m also needs a baseline.
    if "val/delta_m" in metrics:
        table = cfg.data.baseline_table()
        missing = [t for t in cfg.data.tasks if t not in table]
        if missing:
            key = "tune.objectives" if objectives else "tune.metric = 'val/delta_m'"
            raise ValueError(
                f"config error: {key} needs data.baseline for every task; missing {missing}: "
                "measure single-task baselines with jobs/baselines.py --config <this config> and "
                "set data.baseline to the file it writes, or optimise a named metric "
                "(tune.metric=val/<task>/<metric>)"
            )
    if objectives:
        return Plan(metric=objectives[0][0], mode=objectives[0][1], objectives=objectives)
    return Plan(metric=cfg.tune.metric, mode=score_order(cfg, cfg.tune.metric))


@dataclass
class SweepReport:
    rows: list[TrialRow]
    best: TrialRow | None
    path: str
    text: str
    tracking: dict[str, Any] | None
    interrupted: bool = False  # stopped by Ctrl-C: resumable, not a final result


def run(
    cfg: ExperimentConfig,
    plan: Plan,
    *,
    name: str,
    storage: str,
    resume: bool = False,
    base: tuple[Any, str] | None = None,
) -> SweepReport:
    """Run (or ``resume``) the sweep; ``base`` is :func:`runner.put_base_weights`' (object
    reference, fingerprint) of the SAM base weights, or None for a random base."""
    import ray.tune

    from mtsam import storage as store
    from mtsam.train import runner

    exp_path = Path(storage) / name if not store.is_uri(storage) else None
    exp = store.join(storage, name)  # the sweep's folder: a local path or a storage URI

    tracking = None
    if cfg.tracking.enabled:
        from mtsam.tracking.setup import start_sweep_tracking
        from mtsam.tracking.uri import TrackingError

        try:
            tracking = start_sweep_tracking(
                cfg,
                sweep_name=name,
                # a URI storage has no local folder: the sweep's own URI tells sweeps apart
                sweep_path=exp,
                storage=storage,
                metric=plan.metric,
                mode=plan.mode,
            )
        except TrackingError as e:
            raise ValueError(f"tracking.uri: {e}") from None

    ctx = SweepContext(
        base_config=cfg.to_dict(),
        storage=storage,
        sweep_name=name,
        metric=plan.metric,
        mode=plan.mode,
        base_ref=base[0] if base else None,
        base_fingerprint=base[1] if base else None,
        tracking=tracking,
        objectives=plan.objectives,
    )
    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(trial_driver, ctx=ctx), {"cpu": cfg.tune.driver_cpus}
    )
    if resume:
        if not ray.tune.Tuner.can_restore(exp):
            raise SweepError(f"--resume {exp}: no restorable Tune experiment there")
        tuner = ray.tune.Tuner.restore(
            exp, trainable=trainable, resume_unfinished=True, resume_errored=True
        )
    else:
        t = cfg.tune
        # Several objectives: the searcher gets them all (Optuna's multi-objective sampler);
        # Tune itself ranks by no single metric (the config refuses ASHA with them).
        metrics = [m for m, _ in plan.objectives] or plan.metric
        modes = [m for _, m in plan.objectives] or plan.mode
        tuner = ray.tune.Tuner(
            trainable,
            param_space=tune_space(t.space),
            tune_config=ray.tune.TuneConfig(
                metric=None if plan.multi else plan.metric,
                mode=None if plan.multi else plan.mode,
                num_samples=t.num_samples,
                search_alg=make_searcher(
                    t.searcher,
                    metric=metrics,
                    mode=modes,
                    seed=cfg.seed,
                    max_concurrent=t.max_concurrent_trials,
                ),
                scheduler=make_scheduler(
                    t.scheduler,
                    max_epochs=cfg.train.epochs,
                    grace_period=t.asha.grace_period,
                    reduction_factor=t.asha.reduction_factor,
                ),
            ),
            run_config=ray.tune.RunConfig(name=name, storage_path=storage),
        )
        # Only now: the Tuner has written tuner.pkl, which marks the folder as a sweep's for
        # --resume; a failure before here leaves no folder behind.
        runner.save_run_config(exp, cfg)
    with _ctrl_c_watch() as ctrl_c:
        results = tuner.fit()
    rows = summarise(results, metric=plan.metric, mode=plan.mode)
    for r in rows:  # Ray names checkpoints in object storage by bucket/...: give the URI
        r.best_checkpoint = store.as_uri(storage, r.best_checkpoint)
    best = best_row(rows, metric=plan.metric, mode=plan.mode)
    if plan.multi:
        mark_front(rows, plan.objectives)
    exp_shown = store.as_uri(storage, str(results.experiment_path)) or exp
    text = render(rows, best, plan=plan, path=exp_shown)
    interrupted = ctrl_c.seen
    if interrupted:
        text += (
            "\ninterrupted (Ctrl-C): unfinished or unstarted trials remain, so this is no final "
            f"result; continue with: jobs/tune.py --resume {exp_shown}"
        )
    if tracking is not None:
        from mtsam.tracking.setup import finish_sweep_tracking, spool_root

        # the summary files and the parent run's spool need a local folder
        local = exp_path if exp_path is not None else Path(spool_root(cfg, storage)) / name
        if plan.multi:  # uploaded with the summary folder
            try:
                plot_front(rows, plan.objectives, local / "summary" / "pareto.png")
            except Exception as e:  # the sweep's results stand without the picture
                text += f"\nPareto plot not drawn: {e}"
        text += "\n" + finish_sweep_tracking(
            cfg,
            tracking,
            rows=rows,
            best=best,
            metric=plan.metric,
            out_dir=str(local),
            interrupted=interrupted,
        )
    if best is None and not interrupted:
        raise SweepError(f"no trial finished with a finite {plan.metric}:\n{text}")
    text += f"\noutputs in {cfg.output_dir}"
    return SweepReport(rows, best, exp_shown, text, tracking, interrupted)


class _CtrlC:
    seen = False


@contextlib.contextmanager
def _ctrl_c_watch():
    """Tell whether Ray Tune stopped ``fit()`` on a Ctrl-C (SIGINT).

    Tune installs its own SIGINT handler for the run; the first Ctrl-C makes it stop the sweep
    gracefully (state saved, running trials marked TERMINATED like finished ones) and put back
    the handler it found. So a sentinel installed before ``fit()`` that is installed again
    afterwards means Tune saw a Ctrl-C. The sentinel itself only runs when Tune does not handle
    SIGINT (``TUNE_DISABLE_SIGINT_HANDLER``), where it acts as Python's default.
    """
    watch = _CtrlC()

    def sentinel(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread() or int(
        os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0")
    ):
        yield watch  # no handler of Tune's to watch
        return
    previous = signal.signal(signal.SIGINT, sentinel)
    try:
        yield watch
    finally:
        watch.seen = signal.getsignal(signal.SIGINT) is sentinel
        signal.signal(signal.SIGINT, previous)


def mark_front(rows: list[TrialRow], objectives: tuple[tuple[str, str], ...]) -> None:
    """Set ``pareto`` on every row: True on the front of the finished trials' objective
    values (a trial's values are those of its best epoch by the first objective)."""
    nan = float("nan")
    points = [
        [_float(r.metrics.get(m)) if r.status == "TERMINATED" else nan for m, _ in objectives]
        for r in rows
    ]
    for r, on in zip(rows, pareto_front(points, [m for _, m in objectives]), strict=True):
        r.pareto = on


def plot_front(rows: list[TrialRow], objectives: tuple[tuple[str, str], ...], path: Path) -> Path:
    """The first objective against the second (e.g. delta_m against adapter parameters), with
    the Pareto front drawn through its trials (``mark_front`` first)."""
    from mtsam.tracking.sweep import plot_pareto

    (y_key, y_mode), (x_key, x_mode) = objectives[0], objectives[1]
    if x_key not in PARAM_METRICS and y_key in PARAM_METRICS:  # parameters on the x axis
        (x_key, x_mode), (y_key, y_mode) = (y_key, y_mode), (x_key, x_mode)
    return plot_pareto(
        [{x_key: r.metrics.get(x_key), y_key: r.metrics.get(y_key)} for r in rows],
        [bool(r.pareto) for r in rows],
        path,
        x_key=x_key,
        y_key=y_key,
        x_mode=x_mode,
        y_mode=y_mode,
    )


def _float(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def render(rows: list[TrialRow], best: TrialRow | None, *, plan: Plan, path: str) -> str:
    sampled = sorted({k for r in rows for k in r.sample})
    metric_cols = sorted({k for r in rows for k in r.metrics if k.startswith("val/")})
    optimised = [m for m, _ in plan.objectives] or [plan.metric]
    for m in optimised:  # the optimised metrics last, where the eye lands
        if m in metric_cols:
            metric_cols.remove(m)
            metric_cols.append(m)
    extra = ["adapter_params"] if "adapter_params" in optimised else []
    table_rows = {}
    for r in rows:
        values: dict[str, Any] = {k: _short(r.sample.get(k, "")) for k in sampled}
        values |= {k: r.metrics.get(k, float("nan")) for k in metric_cols}
        values |= {k: _int_text(r.metrics.get(k)) for k in extra}
        values |= {"params": r.trainable_params or "", "epochs": r.epochs, "status": r.status}
        if plan.multi:
            values["pareto"] = "yes" if r.pareto else ""
        table_rows[r.trial_id] = values
    what = (
        "the Pareto front of " + ", ".join(f"{m} ({d})" for m, d in plan.objectives)
        if plan.multi
        else f"{plan.metric} ({plan.mode})"
    )
    columns = [*sampled, *metric_cols, *extra, "params", "epochs", "status"]
    lines = [
        f"Sweep {path}: {len(rows)} trials, optimising {what}",
        metrics_table(
            table_rows,
            columns=[*columns, "pareto"] if plan.multi else columns,
            best=best.trial_id if best else None,
        ),
    ]
    if plan.multi:
        on = [r.trial_id for r in rows if r.pareto]
        lines.append(f"Pareto-optimal trials (pareto = yes): {', '.join(on) or 'none'}")
    if best is not None:
        lines.append(
            f"* best trial {best.trial_id}: {plan.metric} = {best.metrics[plan.metric]:.4g}"
        )
        if best.best_checkpoint:
            lines.append(f"  best adapter: {join(best.best_checkpoint, 'adapter')}")
    return "\n".join(lines)


def _int_text(v: Any) -> Any:
    f = _float(v)
    return int(f) if math.isfinite(f) else ""


def _short(v: Any) -> Any:
    if isinstance(v, float) and v != 0 and math.isfinite(v) and (abs(v) < 1e-2 or abs(v) >= 1e4):
        return f"{v:.2e}"
    return v
