"""ASHA vs FIFO on the generated-scene benchmark: best delta_m and trial-epochs, side by side.

Runs the same 16-trial random search twice through jobs/tune.py (same seed, so the same
sampled configs), once with FIFO and once with ASHA, and reads what each trial reported from
Tune's own result.json files. Goal: ASHA's best delta_m within noise of FIFO's at no more than
half the trial-epochs.

    .venv/bin/python benchmarks/bench_tune.py [--trials 16] [--epochs 4] [--out /tmp/bench_tune]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(scheduler: str, *, trials: int, epochs: int, out: Path) -> dict[str, float]:
    name = f"bench-{scheduler}"
    sets = [
        f"output_dir={out}",
        "tracking.enabled=false",
        f"tune.num_samples={trials}",
        f"train.epochs={epochs}",
        f"tune.scheduler={scheduler}",
        "tune.asha.grace_period=1",
        "tune.asha.reduction_factor=3",
        "tune.max_concurrent_trials=2",
        "train.log_every=1000",
        "train.vis_samples=0",
        "data.scenes.num_train=32",
        "data.scenes.num_val=16",
        "tune.space.train.lr={type: loguniform, low: 1.0e-5, high: 3.0e-2}",
    ]
    cmd = [sys.executable, str(REPO / "jobs/tune.py"), "--name", name]
    cmd += [a for s in sets for a in ("--set", s)]
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    t0 = time.time()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if r.returncode != 0:
        raise SystemExit(f"{scheduler} sweep failed:\n{r.stderr[-3000:]}")
    best, spent = float("-inf"), 0
    for result in (out / "ray_results" / name).glob("*/result.json"):
        rows = [json.loads(x) for x in result.read_text().splitlines() if x.strip()]
        spent += max((int(x.get("epoch", 0)) for x in rows), default=0)
        best = max([best, *(x["val/delta_m"] for x in rows if "val/delta_m" in x)])
    return {"best_delta_m": best, "trial_epochs": spent, "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench_tune"))
    args = ap.parse_args()
    fifo = run("fifo", trials=args.trials, epochs=args.epochs, out=args.out)
    asha = run("asha", trials=args.trials, epochs=args.epochs, out=args.out)
    print(f"{args.trials} trials x up to {args.epochs} epochs, tiny mSAM on generated scenes")
    print("| scheduler | best val/delta_m | trial-epochs | wall (s) |\n|---|---|---|---|")
    for name, r in (("FIFO", fifo), ("ASHA", asha)):
        print(f"| {name} | {r['best_delta_m']:.2f} | {r['trial_epochs']} | {r['wall_s']:.0f} |")
    ratio = asha["trial_epochs"] / fifo["trial_epochs"]
    gap = fifo["best_delta_m"] - asha["best_delta_m"]
    print(
        f"ASHA/FIFO trial-epochs: {ratio:.2f} (goal <= 0.50: {'PASS' if ratio <= 0.5 else 'MISS'})"
    )
    print(f"best delta_m gap FIFO - ASHA: {gap:.2f} points")


if __name__ == "__main__":
    main()
