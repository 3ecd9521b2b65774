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
from mtsam.config import ExperimentConfig
from mtsam.storage import join
from mtsam.tune.driver import SweepContext, TrialRow, best_row, summarise, trial_driver
from mtsam.tune.space import make_scheduler, make_searcher, tune_space


class SweepError(RuntimeError):
    """The sweep could not produce a result (every trial failed or was rejected)."""


@dataclass(frozen=True)
class Plan:
    metric: str
    mode: str


def plan(cfg: ExperimentConfig) -> Plan:
    """Check what only a sweep needs, before anything starts; one-line errors name the key."""
    from mtsam.train.runner import score_order

    metric = cfg.tune.metric
    # The config has checked that a per-task metric exists; delta_m also needs a baseline.
    if metric == "val/delta_m":
        missing = [t for t in cfg.data.tasks if t not in cfg.data.baseline]
        if missing:
            raise ValueError(
                f"config error: tune.metric = 'val/delta_m' needs data.baseline for every task; "
                f"missing {missing}"
            )
    return Plan(metric=metric, mode=score_order(cfg, metric))


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
        tuner = ray.tune.Tuner(
            trainable,
            param_space=tune_space(t.space),
            tune_config=ray.tune.TuneConfig(
                metric=plan.metric,
                mode=plan.mode,
                num_samples=t.num_samples,
                search_alg=make_searcher(
                    t.searcher,
                    metric=plan.metric,
                    mode=plan.mode,
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


def render(rows: list[TrialRow], best: TrialRow | None, *, plan: Plan, path: str) -> str:
    sampled = sorted({k for r in rows for k in r.sample})
    metric_cols = sorted({k for r in rows for k in r.metrics if k.startswith("val/")})
    if plan.metric in metric_cols:  # the optimised metric last, where the eye lands
        metric_cols.remove(plan.metric)
        metric_cols.append(plan.metric)
    table_rows = {}
    for r in rows:
        values: dict[str, Any] = {k: _short(r.sample.get(k, "")) for k in sampled}
        values |= {k: r.metrics.get(k, float("nan")) for k in metric_cols}
        values |= {"params": r.trainable_params or "", "epochs": r.epochs, "status": r.status}
        table_rows[r.trial_id] = values
    lines = [
        f"Sweep {path}: {len(rows)} trials, optimising {plan.metric} ({plan.mode})",
        metrics_table(
            table_rows,
            columns=[*sampled, *metric_cols, "params", "epochs", "status"],
            best=best.trial_id if best else None,
        ),
    ]
    if best is not None:
        lines.append(
            f"* best trial {best.trial_id}: {plan.metric} = {best.metrics[plan.metric]:.4g}"
        )
        if best.best_checkpoint:
            lines.append(f"  best adapter: {join(best.best_checkpoint, 'adapter')}")
    return "\n".join(lines)


def _short(v: Any) -> Any:
    if isinstance(v, float) and v != 0 and math.isfinite(v) and (abs(v) < 1e-2 or abs(v) >= 1e4):
        return f"{v:.2e}"
    return v
