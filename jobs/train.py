"""One fine-tuning run of mSAM on Ray Train.

    python jobs/train.py --config configs/default.yaml [--set train.epochs=2 ...]
    python jobs/train.py --resume outputs/ray_results/train-default-20261123-120000  # continue
    python jobs/train.py --resume s3://my-bucket/ray_results/train-default-20261123-120000

Connects to a running Ray cluster (RAY_ADDRESS, automatically inside `ray job submit`, or one
started by `ray start` on this machine), else starts a local one. Prints the final per-task
metrics and where the checkpoint is.
"""

from __future__ import annotations

import argparse
import sys
import time

import _bootstrap  # noqa: F401  (puts this checkout's platform/ on sys.path)
from mtsam.cli import add_config_args, add_run_args, fail, metrics_table, run_config_and_place


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_config_args(ap)
    add_run_args(ap, what="run", default_name="train-<config name>-<time>")
    args = ap.parse_args(argv)

    from mtsam.train import runner

    try:
        cfg, name, storage = run_config_and_place(
            args, lambda c: f"train-{c.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        )
        base_weights = runner.read_base_weights(cfg)  # checked before Ray starts
        runner.prepare_data(cfg)
        tracking = None
        if cfg.tracking.enabled:
            from mtsam.tracking.setup import tracking_for_run

            tracking = tracking_for_run(cfg, run_name=name, storage=storage)
        runner.init_ray(need=runner.resources_needed(cfg))
    except (ValueError, OSError) as e:  # OSError: a path that cannot be read or created
        return fail(e)

    base = runner.put_base_weights(base_weights)
    del base_weights  # the object store holds them now
    if base is not None:
        print(f"base weights of {cfg.model.checkpoint} put in the object store ({base[1]})")
    trainer = runner.make_trainer(cfg, name=name, storage=storage, base=base, tracking=tracking)
    from mtsam import storage as store

    try:
        runner.save_run_config(store.join(storage, name), cfg)
    except (ValueError, OSError) as e:  # e.g. write access denied on the bucket
        return fail(e)
    t0 = time.time()
    metric = "val/delta_m" if cfg.data.baseline_table() else None
    from ray.train import TrainingFailedError

    try:
        result = trainer.fit()
    except TrainingFailedError as e:  # a worker raised (after scaling.max_failures restarts)
        message = runner.failure_line(e)
        if tracking is not None:
            from mtsam.tracking.setup import end_failed_run

            print(end_failed_run(tracking, message))
        run = store.join(storage, name)
        print(
            f"error: {message} (run {run}; after a fix, continue it with --resume)", file=sys.stderr
        )
        return 1
    out = runner.outcome_of(result, metric=metric, mode="max")
    if out.error:
        print(f"error: {out.error}; last good checkpoint: {out.checkpoint}", file=sys.stderr)
        return 1
    print(metrics_table({name: out.metrics}))
    print(f"finished in {time.time() - t0:.0f} s; run folder {out.path}")
    print(f"best checkpoint {out.checkpoint} (adapter in its adapter/ folder)")
    print(f"outputs in {cfg.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
