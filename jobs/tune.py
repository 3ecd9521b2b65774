"""A hyperparameter sweep of mSAM fine-tuning on Ray Tune: the platform's main job.

    python jobs/tune.py                                   # embedded default (configs/default.yaml)
    python jobs/tune.py --config configs/sweeps/X.yaml --set tune.num_samples=8
    python jobs/tune.py --resume outputs/ray_results/sweep-default-20261123-120000
    python jobs/tune.py --resume s3://my-bucket/ray_results/sweep-default-20261123-120000
    ray job submit --working-dir . -- python jobs/tune.py --config configs/X.yaml

Each trial is a Ray Train run with a config sampled from the `tune.space` section. At the end
it prints one row per trial (sampled values, per-task metrics, delta_m) with the best marked,
where the best adapter is, and where the MLflow runs are.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import _bootstrap  # noqa: F401  (puts this checkout's platform/ on sys.path)
from mtsam.cli import add_config_args, add_run_args, fail, run_config_and_place

DEFAULT_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "default.yaml")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_config_args(ap, default=DEFAULT_CONFIG)
    add_run_args(ap, what="sweep", default_name="sweep-<config name>-<time>")
    args = ap.parse_args(argv)

    from mtsam.train import runner
    from mtsam.tune import sweep

    try:
        cfg, name, storage = run_config_and_place(
            args,
            lambda c: f"sweep-{c.name}-{time.strftime('%Y%m%d-%H%M%S')}",
            sweep=True,
            validate=sweep.plan,
        )
        plan = sweep.plan(cfg)
        base_weights = runner.read_base_weights(cfg)  # checked before Ray starts
        runner.prepare_data(cfg, sweep=True)
        if cfg.tracking.enabled:
            from mtsam.tracking.setup import check_tracking

            check_tracking(cfg)  # the sweep opens its parent run later, once Ray is up
        runner.init_ray(need=runner.resources_needed(cfg, sweep=True))
    except (ValueError, OSError) as e:  # OSError: a path that cannot be read or created
        return fail(e)
    base = runner.put_base_weights(base_weights)
    del base_weights  # the object store holds them now, for the whole sweep
    try:
        report = sweep.run(
            cfg, plan, name=name, storage=storage, resume=bool(args.resume), base=base
        )
    except ValueError as e:  # bad tracking URI and other start-up checks: nothing ran
        return fail(e)
    except sweep.SweepError as e:
        return fail(e, code=1)
    print(report.text)
    if report.interrupted:
        return 130  # the shell's code for a job stopped by Ctrl-C (SIGINT)
    return 0 if report.best is not None else 1


if __name__ == "__main__":
    sys.exit(main())
