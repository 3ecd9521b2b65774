"""Training-loop benchmarks (CPU), every comparison measured side by side in one run.

1. Ray Train overhead: the same config (tiny mSAM + ToRA, generated scenes, 16 optimizer steps
   of 4 images per epoch, 2 epochs, one thread) run by the worker loop in this bare process,
   then under Ray Train with one worker (1 CPU), then bare again. Compared: the loop's own
   ``train/step_time_s`` of the last epoch (it leaves out each epoch's first step, evaluation
   and checkpointing). Goal: Ray <= 1.10x bare.
2. Throughput of the loop's core (model forward, per-task losses + ToRA's orthogonal term,
   backward, gradient clipping, Adam step) for the tiny preset and a ViT-B-width model
   (768 wide, 12 blocks, 12 heads, 256 px input instead of 1024 so it fits a CPU), with the T=3
   tasks stacked in one encoder batch or run one task at a time. Each configuration runs in a
   fresh Python process; peak memory is that process's ``ru_maxrss`` over the steps (the
   high-water mark is reset through /proc/self/clear_refs right before the first step), also
   shown as the growth over the resident set just before it.

Run:  PYTHONPATH=platform python benchmarks/bench_train.py [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform as host
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "default.yaml"
TASKS = ("semantic", "depth", "normal")
GOAL_RAY = 1.10
SCENES = ("data.scenes.num_train=64", "data.scenes.num_val=8")  # one generated set for all


def _config(out: Path, scenes: Path, *extra: str):
    from mtsam.config import load_config

    return load_config(
        DEFAULT_CONFIG,
        [
            "tracking.enabled=false",
            f"output_dir={out}",
            f"data.root={scenes}",
            "train.log_every=100000",
            "train.vis_samples=0",
            *SCENES,
            *extra,
        ],
    )


# ----------------------------------------------------------------- 1. Ray Train vs bare process
def _ray_cmp_overrides(work: Path, steps: int) -> list[str]:
    return [
        f"output_dir={work / 'ray_cmp'}",
        f"train.max_steps_per_epoch={steps}",
        "train.batch_size=4",
        "train.epochs=2",
        "scaling.num_workers=1",
        "scaling.cpus_per_worker=1",
        "scaling.max_failures=0",
    ]


def bare_child(spec: dict) -> dict:
    """The worker loop in this fresh process, threads as a Ray worker with 1 CPU gets them."""
    torch.set_num_threads(1)
    from mtsam.train.context import local_context
    from mtsam.train.loop import fit

    work = Path(spec["work"])
    cfg = _config(work / "ray_cmp", work / "scenes", *_ray_cmp_overrides(work, spec["steps"]))
    ctx = local_context(None)
    fit(cfg, ctx, log=lambda s: None)
    return {"step_time_s": float(ctx.reports[-1]["train/step_time_s"])}


def bench_ray_overhead(work: Path, *, quick: bool) -> str:
    import ray

    from mtsam.train import runner

    steps = 8 if quick else 16
    cfg = _config(work / "ray_cmp", work / "scenes", *_ray_cmp_overrides(work, steps))
    spec = {"work": str(work), "steps": steps}
    # Ray sets OMP_NUM_THREADS=1 in a 1-CPU worker; the bare process gets the same.
    env = {"OMP_NUM_THREADS": "1"}

    t0 = time.perf_counter()
    first = run_child("--bare-child", spec, env)
    t_bare = time.perf_counter() - t0
    ray.init(
        num_cpus=2,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        runtime_env=runner.ray_runtime_env(),
        log_to_driver=False,
    )
    try:
        t0 = time.perf_counter()
        trainer = runner.make_trainer(cfg, name="bench-ray", storage=runner.storage_path(cfg))
        result = trainer.fit()
        t_ray = time.perf_counter() - t0
        if result.error is not None:
            raise RuntimeError(f"Ray run failed: {result.error}")
        # Ray stays up (idle) for the second bare run, as it was during the Ray run.
        second = run_child("--bare-child", spec, env)
    finally:
        ray.shutdown()

    on_ray = float(result.metrics["train/step_time_s"])
    bare_s = [first["step_time_s"], second["step_time_s"]]
    ratio = on_ray / statistics.mean(bare_s)
    verdict = "PASS" if ratio <= GOAL_RAY else "MISS"
    return "\n".join(
        [
            "Ray Train (1 worker, 1 CPU, so no DDP) vs the same loop in a fresh bare process "
            f"(1 thread, OMP_NUM_THREADS=1): tiny + ToRA, {steps} steps x 4 images per epoch, "
            "2 epochs; train/step_time_s of epoch 2 (the epoch's first step excluded)",
            "",
            "| run | s / step | img / s | wall s (start-up, eval, checkpoints included) |",
            "|---|---:|---:|---:|",
            f"| bare process (before) | {bare_s[0]:.3f} | {4 / bare_s[0]:.1f} | {t_bare:.0f} |",
            f"| Ray Train, 1 worker | {on_ray:.3f} | {4 / on_ray:.1f} | {t_ray:.0f} |",
            f"| bare process (after) | {bare_s[1]:.3f} | {4 / bare_s[1]:.1f} | - |",
            "",
            f"- Goal Ray <= {GOAL_RAY:.2f}x bare (steady-state step time, against the mean of "
            f"the two bare runs): {ratio:.3f}x -> {verdict}",
        ]
    )


# ------------------------------------------------------------ 2. throughput and peak memory
def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        line = next(ln for ln in f if ln.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def _reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets the high-water mark that ru_maxrss reports, so the
    peak measured afterwards is that of the steps, not of imports and model building."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _preset(name: str):
    from mtsam.model.presets import tiny, vit_b

    if name == "tiny":
        return tiny()
    # ViT-B width and depth at 256 px: a 16 x 16 token grid; windows of 8 tile it exactly
    # (SAM's 14 would pad it to 28 x 28).
    return dataclasses.replace(vit_b(), name="vit_b", img_size=256, window_size=8)


def child(spec: dict) -> dict:
    """One configuration in this (fresh) process: seconds per step, images/s, peak RSS."""
    torch.set_num_threads(spec["threads"])
    from mtsam.adapters import extra_losses
    from mtsam.model.attention import use_sdpa_attention
    from mtsam.model.msam import build_msam
    from mtsam.tasks import build_tasks
    from mtsam.train.data import open_split
    from mtsam.train.loop import adapter_spec_of, data_root

    work = Path(spec["work"])
    ranks = ["adapter.r1=32", "adapter.r2=32", "adapter.r3=4"] if spec["model"] == "vit_b" else []
    cfg = _config(work / "child", work / "scenes", *ranks)
    tasks = build_tasks(TASKS, num_classes=cfg.data.classes)
    model = build_msam(
        _preset(spec["model"]),
        [(t.name, t.channels) for t in tasks],
        adapter=adapter_spec_of(cfg),
        seed=0,
    )
    use_sdpa_attention(model.image_encoder)
    ds = open_split(
        "scenes",
        data_root(cfg),
        "train",
        fmt="files",
        tasks=TASKS,
        num_classes=None,
        augment=False,
        seed=0,
    )
    samples = [ds[i] for i in range(spec["batch"])]
    batch = {k: torch.stack([s[k] for s in samples]) for k in ("image", *TASKS)}
    params = [p for _, p in model.trainable_named_parameters()]
    opt = torch.optim.Adam(params, lr=1e-4)
    weights = cfg.weights()

    def step() -> None:
        out, aux = model(batch["image"], stacked=spec["stacked"], return_aux=True)
        extra = extra_losses(model, aux, orth_weight=cfg.adapter.orth_weight)
        total = sum(weights[t.name] * t.loss(out[t.name], batch[t.name]) for t in tasks)
        (total + extra["total"]).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    before = _rss_mib()
    _reset_peak_rss()
    for _ in range(spec["warmup"]):
        step()
    times = []
    for _ in range(spec["steps"]):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    s = statistics.median(times)
    return {
        "s_per_step": s,
        "images_per_s": spec["batch"] / s,
        "rss_before_mib": before,
        "rss_peak_mib": _maxrss_mib(),  # since the reset: the steps' peak
        "trainable": sum(p.numel() for p in params),
    }


def run_child(mode: str, spec: dict, env: dict[str, str] | None = None) -> dict:
    """Run this file with ``mode`` in a fresh process; its last stdout line is a JSON dict."""
    full_env = dict(os.environ, PYTHONPATH=str(REPO / "platform"), **(env or {}))
    proc = subprocess.run(
        [sys.executable, __file__, mode, json.dumps(spec)],
        env=full_env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child {mode} {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_throughput(work: Path, *, quick: bool) -> str:
    models = {
        "tiny": {"batch": 8, "warmup": 2, "steps": 6 if quick else 20},
        "vit_b": {"batch": 2, "warmup": 1, "steps": 2 if quick else 5},
    }
    rows = []
    for name, m in models.items():
        got = {}
        for stacked in (True, False):  # adjacent, so a burst of outside load hits both alike
            spec = {"model": name, "stacked": stacked, "threads": 1, "work": str(work), **m}
            got[stacked] = run_child("--child", spec)
        rows.append((name, m, got))
    lines = [
        "Loop core per step (forward, 3 task losses + orthogonal term, backward, clip, Adam) on "
        "1 thread, fixed batch of generated scenes, median of the timed steps; each "
        "configuration in a fresh process; peak RSS = ru_maxrss during the steps (high-water "
        "mark reset just before the first step), growth = peak minus the RSS just before it "
        "(model, data and imports already resident); tiny: ToRA 8/8/2 (configs/default.yaml), "
        "ViT-B width at 256 px: ToRA 32/32/4",
        "",
        "| model | trainable | batch | path | s / step | img / s | peak RSS MiB | "
        "growth MiB | stacked speed-up |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for name, m, got in rows:
        label = "tiny (128 px, w64, 4 blocks)" if name == "tiny" else "ViT-B width (256 px)"
        speedup = got[False]["s_per_step"] / got[True]["s_per_step"]
        for stacked in (True, False):
            r = got[stacked]
            lines.append(
                f"| {label} | {r['trainable']:,} | {m['batch']} | "
                f"{'stacked' if stacked else 'task at a time'} | {r['s_per_step']:.3f} | "
                f"{r['images_per_s']:.2f} | {r['rss_peak_mib']:.0f} | "
                f"{r['rss_peak_mib'] - r['rss_before_mib']:.0f} | "
                f"{f'{speedup:.2f}x' if stacked else ''} |"
            )
    return "\n".join(lines)


# ----------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps (~1.5 min)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--bare-child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    if args.bare_child:
        print(json.dumps(bare_child(json.loads(args.bare_child))))
        return 0
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    t0 = time.perf_counter()
    print("## Training (issue 5)\n")
    print(
        f"{dt.date.today().isoformat()}, {os.cpu_count()}-core CPU ({host.machine()}), "
        f"torch {torch.__version__}, float32{', --quick' if args.quick else ''}\n"
    )
    with tempfile.TemporaryDirectory(prefix="mtsam-bench-train-") as tmp:
        work = Path(tmp)
        from mtsam.train.loop import data_root

        data_root(_config(work / "x", work / "scenes"))  # generate the scenes once
        print(bench_ray_overhead(work, quick=args.quick), flush=True)
        print()
        print(bench_throughput(work, quick=args.quick), flush=True)
    print()
    print(
        "GPU: no GPU was available for this run, so the ViT-L (1024 px, bf16) step time, "
        "images/s and memory on GPU could not be measured here."
    )
    print(f"\n(benchmark wall time {time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
