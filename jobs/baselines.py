"""Measure the single-task baselines that delta_m compares a multi-task model with.

    python jobs/baselines.py --config configs/default.yaml --out configs/baselines/default.json
    python jobs/baselines.py --config configs/nyuv2_vit_l_tora.yaml --method lora_stl
    ray job submit --working-dir . -- python jobs/baselines.py --config configs/X.yaml

Trains one single-task model per task of the config (same preset, data, schedule and adapter
settings; `--method` or `--set adapter.method=...` picks another adapter) as parallel Ray Tune
trials, logs them to MLflow (one parent run, a child run per task) and writes the baselines
file: task -> metric -> the last epoch's value, with provenance (MLflow run ids, config digest,
date, code version). Point `data.baseline` at the file (or at `runs:/<parent run id>`), then
sweep with jobs/tune.py.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import _bootstrap  # noqa: F401  (puts this checkout's platform/ on sys.path)
from mtsam.cli import add_config_args, fail, run_config_and_place

DEFAULT_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "default.yaml")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_config_args(ap, default=DEFAULT_CONFIG)
    ap.add_argument("--name", help="run name (default: baselines-<config name>-<time>)")
    ap.add_argument(
        "--method",
        help="adapter method of the single-task models (default: the config's adapter.method)",
    )
    ap.add_argument(
        "--out",
        help="baselines file to write (default: <output_dir>/baselines/<run name>.json)",
    )
    args = ap.parse_args(argv)
    # The config's own baseline is not needed (it may be the file this job writes); --method
    # goes last so that it wins over --set.
    args.set = ["data.baseline={}", *args.set]
    if args.method:
        args.set.append(f"adapter.method={args.method}")
    args.resume = None

    from mtsam.tasks.baselines import ARTIFACT, write_file
    from mtsam.train import runner
    from mtsam.tune import baselines

    try:
        cfg, name, storage = run_config_and_place(
            args, lambda c: f"baselines-{c.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        )
        cfg = baselines.base_config(cfg)
        out = Path(args.out or Path(cfg.output_dir) / "baselines" / f"{name}.json").resolve()
        if out.exists() and not out.is_file():
            raise ValueError(f"--out {out}: exists and is not a file")
        try:  # a folder that cannot be made fails now, not after the training
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"--out {out}: its folder cannot be created ({e.strerror})") from None
        base_weights = runner.read_base_weights(cfg)  # checked before Ray starts
        runner.prepare_data(cfg)
        if cfg.tracking.enabled:
            from mtsam.tracking.setup import check_tracking

            check_tracking(cfg)
        runner.init_ray(need=runner.resources_needed(cfg, sweep=True))
    except (ValueError, OSError) as e:  # OSError: a path that cannot be read or created
        return fail(e)
    base = runner.put_base_weights(base_weights)
    del base_weights
    overrides = [s for s in args.set if s != "data.baseline={}"]
    try:
        report = baselines.run(cfg, name=name, storage=storage, base=base, overrides=overrides)
    except ValueError as e:  # a bad tracking URI found when the parent run starts
        return fail(e)
    for task, error in report.errors.items():
        print(f"error: {task}: {error}", file=sys.stderr)
    if report.errors or not report.values:
        print(
            f"error: no baselines file written ({len(report.errors)} task(s) failed)",
            file=sys.stderr,
        )
        return 1
    try:
        write_file(out, report.values, report.provenance)
    except OSError as e:
        return fail(ValueError(f"--out {out}: cannot be written ({e.strerror})"), code=1)
    width = max(len(t) for t in report.values)
    for task, metrics in report.values.items():
        shown = ", ".join(f"{m} {v:.4g}" for m, v in metrics.items())
        print(f"{task:<{width}}  {shown}")
    for task, metrics in report.provenance.get("omitted_zero_or_nan", {}).items():
        print(f"{task}: left out (0 or not finite, no baseline for delta_m): {', '.join(metrics)}")
    print(f"baselines file: {out}")
    use = f"data.baseline={out}"
    if report.parent_run_id:
        print(f"MLflow: parent run {report.parent_run_id} (its artifact {ARTIFACT} is the file)")
        use += f"  (or data.baseline=runs:/{report.parent_run_id})"
    print(f"use it: jobs/tune.py --config <config> --set {use}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
