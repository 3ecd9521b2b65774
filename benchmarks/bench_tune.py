"""ASHA vs FIFO on the generated-scene benchmark: best delta_m and trial-epochs, side by side.

Runs the same 16-trial random search twice through jobs/tune.py (same seed, so the same
sampled configs: checked), once with FIFO and once with ASHA, and reads what each trial reported
from Tune's own result.json files. Goal: ASHA's best delta_m within noise of FIFO's at no more
than half the trial-epochs. ASHA's defaults here are the platform's own (``tune.asha``: grace
period 1, reduction factor 2). Training is seeded, so a trial that both schedulers run to the
end reaches the same delta_m in both; a per-trial table shows which trials ASHA stopped and
what they would have reached.

    .venv/bin/python benchmarks/bench_tune.py [--trials 16] [--epochs 8] [--reduction-factor 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(scheduler: str, *, trials: int, epochs: int, grace: int, rf: float, out: Path) -> dict:
    name = f"bench-{scheduler}"
    sets = [
        f"output_dir={out}",
        "tracking.enabled=false",
        f"tune.num_samples={trials}",
        f"train.epochs={epochs}",
        f"tune.scheduler={scheduler}",
        f"tune.asha.grace_period={grace}",
        f"tune.asha.reduction_factor={rf}",
        "tune.max_concurrent_trials=2",
        "train.log_every=1000",
        "train.vis_samples=0",
        "data.scenes.num_train=32",
        "data.scenes.num_val=16",
        "tune.space.train.lr={type: loguniform, low: 1.0e-5, high: 3.0e-2}",
    ]
    shutil.rmtree(out / "ray_results" / name, ignore_errors=True)  # count this run's trials only
    cmd = [sys.executable, str(REPO / "jobs/tune.py"), "--name", name]
    cmd += [a for s in sets for a in ("--set", s)]
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    t0 = time.time()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if r.returncode != 0:
        raise SystemExit(f"{scheduler} sweep failed:\n{r.stderr[-3000:]}")
    best, spent, trials_seen = float("-inf"), 0, {}
    for trial_dir in (out / "ray_results" / name).iterdir():
        result = trial_dir / "result.json"
        if not result.is_file():
            continue
        rows = [json.loads(x) for x in result.read_text().splitlines() if x.strip()]
        epochs_run = max((int(x.get("epoch", 0)) for x in rows), default=0)
        trial_best = max((x["val/delta_m"] for x in rows if "val/delta_m" in x), default=None)
        spent += epochs_run
        if trial_best is not None:
            best = max(best, trial_best)
        sample = json.loads((trial_dir / "params.json").read_text())
        trials_seen[json.dumps(sample, sort_keys=True)] = (epochs_run, trial_best)
    return {"best_delta_m": best, "trial_epochs": spent, "wall_s": wall, "trials": trials_seen}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--grace-period", type=int, default=1)
    ap.add_argument("--reduction-factor", type=float, default=2.0)
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench_tune"))
    args = ap.parse_args()
    kw = dict(trials=args.trials, epochs=args.epochs, grace=args.grace_period, out=args.out)
    fifo = run("fifo", rf=args.reduction_factor, **kw)
    asha = run("asha", rf=args.reduction_factor, **kw)
    same = fifo["trials"].keys() == asha["trials"].keys()
    print(f"{args.trials} trials x up to {args.epochs} epochs, tiny mSAM on generated scenes;")
    print(
        f"ASHA grace period {args.grace_period}, reduction factor {args.reduction_factor:g}; "
        f"both runs sampled the same configurations: {same}"
    )
    print("| scheduler | best val/delta_m | trial-epochs | wall (s) |\n|---|---|---|---|")
    for name, r in (("FIFO", fifo), ("ASHA", asha)):
        print(f"| {name} | {r['best_delta_m']:.2f} | {r['trial_epochs']} | {r['wall_s']:.0f} |")
    ratio = asha["trial_epochs"] / fifo["trial_epochs"]
    gap = fifo["best_delta_m"] - asha["best_delta_m"]
    print(
        f"ASHA/FIFO trial-epochs: {ratio:.2f} (goal <= 0.50: {'PASS' if ratio <= 0.5 else 'MISS'})"
    )
    print(f"best delta_m gap FIFO - ASHA: {gap:.2f} points")
    print("\nper trial (same sampled config): epochs run and best val/delta_m")
    print(
        "| config | FIFO epochs | FIFO best | ASHA epochs | ASHA best |\n|---|---:|---:|---:|---:|"
    )
    for key, (f_ep, f_best) in sorted(
        fifo["trials"].items(), key=lambda kv: float("inf") if kv[1][1] is None else -kv[1][1]
    ):
        a_ep, a_best = asha["trials"].get(key, (0, None))
        print(f"| {_short(key)} | {f_ep} | {_fmt(f_best)} | {a_ep} | {_fmt(a_best)} |")


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _short(key: str) -> str:
    return ", ".join(
        f"{k.split('.')[-1]}={v:.3g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
        for k, v in json.loads(key).items()
    )


if __name__ == "__main__":
    main()
