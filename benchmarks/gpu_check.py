"""GPU readiness check: every GPU test and measurement in one command, for a lent GPU.

    python benchmarks/gpu_check.py --out DIR [--budget-s 480]     (also: make gpu-check)
    python benchmarks/gpu_check.py --out DIR --dry-run            (CPU, tiny preset)

Sections, each in its own try/except (a failure is recorded and the next section runs), all
under one wall-time budget (a section that no longer fits is recorded as skipped):

1. ``gpu_tests``: ``pytest -m gpu tests/test_gpu.py`` in a subprocess with a timeout.
2. ``throughput``: ViT-L at 1024 px, 3 NYUv2-like tasks (random tensors), ToRA 32/32/4 on
   qkv, bf16 autocast with the frozen base held in bf16, fused AdamW: images/s, model FLOPs
   utilisation (FLOPs of one step from ``torch.utils.flop_counter.FlopCounterMode``, divided
   by the device's dense bf16 peak from :data:`PEAK_BF16_TFLOPS`) and peak memory
   (``torch.cuda.max_memory_allocated``) for batch 1, 2, 4, with and without activation
   checkpointing. Goal: >= 40 % MFU.
3. ``tora_cost``: the same step with ToRA, with the frozen encoder (no adapter) and with the
   authors' materialised ToRA (``bench_adapters.AuthorsToRA``, form (c)), interleaved
   rounds. Goal: ToRA <= 1.05x the frozen encoder.
4. ``trials_sharing``: 4 trials of a small sweep (``jobs/tune.py``, tiny preset) sharing the
   GPU (``gpus_per_worker: 0.25``, 4 at once) against one at a time: trials per hour.

Writes ``DIR/gpu_check.json`` and ``DIR/gpu_check.md``; exits 1 if a section failed (a goal
missed is reported, not a failure). ``--dry-run`` runs the same functions on the CPU with the
tiny preset at a small size (its numbers mean nothing); there the pytest subprocess runs
(every GPU test skips), and the sweeps are planned and validated but not launched.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime as dt
import json
import os
import platform as host
import signal
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for _p in (REPO / "platform", REPO / "benchmarks"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from mtsam.adapters.spec import AdapterSpec  # noqa: E402
from mtsam.model.attention import use_sdpa_attention  # noqa: E402
from mtsam.model.msam import MSAM, build_msam, hold_frozen_in  # noqa: E402
from mtsam.model.presets import get_preset  # noqa: E402

# Dense (no sparsity) bf16 tensor-core peak, TFLOP/s, by a substring of the device name; the
# first match wins (so "H100 PCIe" before "H100"). NVIDIA's data sheets; A10G: AWS's figure.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("L4", 121.0),
    ("A10G", 70.0),
)
MFU_GOAL = 0.40
TORA_GOAL = 1.05
TASKS = (("semantic", 13), ("depth", 1), ("normal", 3))  # NYUv2's three tasks
TORA = AdapterSpec(method="tora", r1=32, r2=32, r3=4, dropout=0.1)


def peak_tflops(device_name: str) -> float | None:
    """Dense bf16 peak of a device from its name, or None when it is not in the table."""
    for key, value in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return value
    return None


# --------------------------------------------------------------------------- settings
class Setting:
    """What the sections run: the real sizes on a GPU, tiny ones in a dry run."""

    def __init__(self, dry: bool) -> None:
        self.dry = dry
        self.device = torch.device("cpu" if dry else "cuda")
        # dry: the tiny preset at 64 px (an 8 x 8 token grid: windows of 4, 2 global blocks)
        self.preset = dataclasses.replace(get_preset("tiny"), img_size=64) if dry else "vit_l"
        self.image_hw = (48, 64) if dry else (480, 640)  # NYUv2's 480 x 640
        self.batches = (1, 2) if dry else (1, 2, 4)
        self.warmup = 1 if dry else 2
        self.steps = 1 if dry else 3
        self.cost_batch = 1 if dry else 2
        self.cost_rounds = 1 if dry else 5
        self.amp = not dry  # bf16 autocast on the GPU; float32 on the CPU

    def autocast(self):
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_MODELS: dict[tuple[int, AdapterSpec | None], MSAM] = {}


def build_model(s: Setting, adapter: AdapterSpec | None) -> MSAM:
    """mSAM as training builds it on a GPU: bias-free SDPA attention, bf16 frozen base.
    Built once per setting and adapter (a random ViT-L takes a while to initialise)."""
    key = (id(s), adapter)
    if key not in _MODELS:
        model = build_msam(s.preset, TASKS, adapter=adapter, seed=0)
        use_sdpa_attention(model.image_encoder)
        if s.amp:
            hold_frozen_in(model, torch.bfloat16)
        _MODELS[key] = model.to(s.device)
    model = _MODELS[key]
    model.zero_grad(set_to_none=True)
    model.activation_checkpointing = False
    return model.train()


def batch(s: Setting, n: int, seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    h, w = s.image_hw
    images = torch.rand(n, 3, h, w, generator=g).to(s.device)
    targets = {t: torch.randn(n, c, h, w, generator=g).to(s.device) for t, c in TASKS}
    return images, targets


def train_step(model: MSAM, s: Setting, images, targets) -> Callable[[], float]:
    """One training step (forward, per-task losses, backward, fused AdamW on GPU)."""
    params = [p for _, p in model.trainable_named_parameters()]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=s.device.type == "cuda" or None)

    def step() -> float:
        with s.autocast():
            out = model(images)
        loss = sum(F.mse_loss(out[t].float(), targets[t]) for t, _ in TASKS)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def count_flops(step: Callable[[], Any]) -> int:
    """FLOPs of one call of ``step`` as ``FlopCounterMode`` counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return int(counter.get_total_flops())


# --------------------------------------------------------------------------- sections
def section_gpu_tests(s: Setting, out: Path, timeout_s: float) -> dict[str, Any]:
    """``pytest -m gpu`` in a subprocess, killed after ``timeout_s`` (at least 1 s)."""
    timeout_s = max(1.0, timeout_s)
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rA", "-p", "no:cacheprovider"]
    cmd += [str(REPO / "tests" / "test_gpu.py"), f"--junitxml={out / 'gpu_tests.xml'}"]
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", MLFLOW_DISABLE_TELEMETRY="true")
    # A session of its own: on a time-out the whole group goes (the tests' Ray processes too).
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, text=True, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        log, _ = proc.communicate(timeout=timeout_s)
    except BaseException:  # the time-out, or the budget's alarm
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        (out / "gpu_tests.log").write_text(log or "")
        return {"ok": False, "error": f"pytest -m gpu did not finish in {timeout_s:.0f} s"}
    (out / "gpu_tests.log").write_text(log)
    summary = [x for x in log.splitlines() if x.strip()][-1:] or [""]
    # 0: all passed; 5: nothing collected (must not happen: the file has gpu tests)
    return {"ok": proc.returncode == 0, "returncode": proc.returncode, "summary": summary[0]}


def section_throughput(s: Setting, peak: float | None) -> dict[str, Any]:
    model = build_model(s, TORA)
    # Model FLOPs of one image: counted once at batch 1 without checkpointing (recomputation
    # is not model work), every operation of the step scales with the batch.
    images, targets = batch(s, 1)
    step = train_step(model, s, images, targets)
    step()  # compile / warm up outside the counter
    try:
        flops_per_image = count_flops(step)
        flops_note = "FlopCounterMode, one step at batch 1"
    except Exception as e:  # e.g. a compiled kernel the counter cannot trace
        from mtsam.model import attention

        attention._flex["failed"] = True  # count through the blocked attention instead
        try:
            flops_per_image = count_flops(step)
        finally:
            attention._flex["failed"] = False
        flops_note = f"FlopCounterMode with the blocked attention ({type(e).__name__} with flex)"
    rows: list[dict[str, Any]] = []
    finished = True
    for ckpt, b in [(c, b) for c in (False, True) for b in s.batches]:
        model.activation_checkpointing = ckpt
        row: dict[str, Any] = {"batch": b, "checkpointing": ckpt}
        images = targets = step = None
        try:
            images, targets = batch(s, b)
            step = train_step(model, s, images, targets)
            for _ in range(s.warmup):
                step()
            if s.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(s.device)
            times = [timed(step, s.device) for _ in range(s.steps)]
            t = statistics.median(times)
            row["step_s"] = t
            row["images_per_s"] = b / t
            row["tflops_per_s"] = flops_per_image * b / t / 1e12
            row["mfu"] = row["tflops_per_s"] / peak if peak else None
            if s.device.type == "cuda":
                row["peak_mem_gib"] = torch.cuda.max_memory_allocated(s.device) / 2**30
        except torch.OutOfMemoryError:
            row["error"] = "out of memory"
        except BudgetExceeded:
            row["error"] = "the time budget ran out"
            finished = False
        finally:
            del images, targets, step
            model.zero_grad(set_to_none=True)  # an out-of-memory step leaves gradients
            if s.device.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
        if not finished:
            break
    model.activation_checkpointing = False
    mfus = [r["mfu"] for r in rows if r.get("mfu") is not None]
    best = max(mfus) if mfus else None
    return {
        "ok": finished and any("step_s" in r for r in rows),
        "flops_per_image": flops_per_image,
        "flops_note": flops_note,
        "rows": rows,
        "best_mfu": best,
        "goal_mfu": MFU_GOAL,
        "goal_met": None if best is None else best >= MFU_GOAL,
    }


def authors_tora(model: MSAM) -> MSAM:
    """A copy of ``model`` whose adapted linears compute ToRA as the authors' code does (the
    full update formed on every forward: ``bench_adapters.AuthorsToRA``, form (c))."""
    from bench_adapters import AuthorsToRA
    from mtsam.adapters.tora import ToRATucker

    other = copy.deepcopy(model)
    swapped = 0
    for block in other.image_encoder.blocks:
        if isinstance(block.attn.qkv, ToRATucker):
            block.attn.qkv = AuthorsToRA(block.attn.qkv)
            swapped += 1
    if swapped != len(other.image_encoder.blocks):
        raise RuntimeError(f"expected ToRA on every block's qkv, found {swapped}")
    return other


def section_tora_cost(s: Setting) -> dict[str, Any]:
    tora = build_model(s, TORA)
    variants = {
        "frozen": build_model(s, None),
        "tora": tora,
        "authors": authors_tora(tora),
    }
    images, targets = batch(s, s.cost_batch)
    steps = {k: train_step(m, s, images, targets) for k, m in variants.items()}
    losses = {k: step() for k, step in steps.items()}  # warm-up, and the losses must be finite
    for _ in range(s.warmup - 1):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(s.cost_rounds):
        order = list(steps) if r % 2 == 0 else list(reversed(steps))
        for k in order:
            times[k].append(timed(steps[k], s.device))

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))

    vs_frozen = ratio("tora", "frozen")
    return {
        "ok": all(v == v and abs(v) != float("inf") for v in losses.values()),
        "batch": s.cost_batch,
        "rounds": s.cost_rounds,
        "step_s": {k: statistics.median(v) for k, v in times.items()},
        "tora_vs_frozen": vs_frozen,
        "authors_vs_tora": ratio("authors", "tora"),
        "goal": TORA_GOAL,
        "goal_met": vs_frozen <= TORA_GOAL,
    }


def sweep_overrides(out: Path, *, shared: bool, dry: bool) -> list[str]:
    """``--set`` values of one of the two sweeps: 4 tiny trials, one worker each, on the GPU."""
    return [
        f"output_dir={out}",
        "tracking.enabled=false",
        "tune.num_samples=4",
        "tune.scheduler=fifo",
        f"tune.max_concurrent_trials={4 if shared else 1}",
        f"scaling.use_gpu={'false' if dry else 'true'}",
        f"scaling.gpus_per_worker={0.25 if shared else 1.0}",
        "scaling.cpus_per_worker=1",
        "train.epochs=2",
        "train.log_every=1000",
        "train.vis_samples=0",
        "data.scenes.num_train=64",
        "data.scenes.num_val=16",
    ]


def run_sweep(out: Path, *, shared: bool, dry: bool, timeout_s: float) -> dict[str, Any]:
    """One sweep through jobs/tune.py; in a dry run its config is only loaded and planned."""
    sets = sweep_overrides(out, shared=shared, dry=dry)
    if dry:
        from mtsam.config import load_config
        from mtsam.tune import sweep

        plan = sweep.plan(load_config(str(REPO / "configs" / "default.yaml"), sets))
        return {"planned": type(plan).__name__, "wall_s": None, "trials_per_hour": None}
    name = "shared" if shared else "one-at-a-time"
    cmd = [sys.executable, str(REPO / "jobs" / "tune.py"), "--name", name]
    cmd += [a for x in sets for a in ("--set", x)]
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", MLFLOW_DISABLE_TELEMETRY="true")
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, text=True, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        log, _ = proc.communicate(timeout=max(1.0, timeout_s))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)  # the job and its local Ray
        proc.communicate()
        raise RuntimeError(f"sweep {name} timed out after {timeout_s:.0f} s") from None
    wall = time.perf_counter() - t0
    (out / f"sweep-{name}.log").write_text(log)
    if proc.returncode != 0:
        raise RuntimeError(f"sweep {name} exited {proc.returncode}: {log[-500:]}")
    return {"wall_s": wall, "trials_per_hour": 4 / wall * 3600}


def section_trials_sharing(s: Setting, out: Path, timeout_s: float) -> dict[str, Any]:
    work = out / "sweeps"
    work.mkdir(parents=True, exist_ok=True)
    half = timeout_s / 2
    shared = run_sweep(work, shared=True, dry=s.dry, timeout_s=half)
    alone = run_sweep(work, shared=False, dry=s.dry, timeout_s=half)
    speedup = None
    if shared["trials_per_hour"] and alone["trials_per_hour"]:
        speedup = shared["trials_per_hour"] / alone["trials_per_hour"]
    return {"ok": True, "shared": shared, "one_at_a_time": alone, "speedup": speedup}


# --------------------------------------------------------------------------- driver
# (name, estimated seconds it needs on a GPU: skipped when less than that is left)
SECTIONS = (("gpu_tests", 60), ("throughput", 90), ("tora_cost", 45), ("trials_sharing", 90))


class BudgetExceeded(Exception):
    """The wall-time budget ran out inside a section."""


def _out_of_budget(signum, frame):
    raise BudgetExceeded("the wall-time budget ran out")


def run_all(s: Setting, out: Path, budget_s: float, pytest_timeout_s: float) -> dict[str, Any]:
    t_start = time.perf_counter()
    signal.signal(signal.SIGALRM, _out_of_budget)
    report: dict[str, Any] = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "dry_run": s.dry,
        "host": host.node(),
        "torch": torch.__version__,
        "budget_s": budget_s,
        "sections": {},
    }
    if not s.dry and not torch.cuda.is_available():
        report["error"] = "no CUDA device visible (torch.cuda.is_available() is False)"
        return report
    name = torch.cuda.get_device_name(0) if not s.dry else f"{host.machine()} CPU"
    peak = peak_tflops(name) if not s.dry else None
    report.update(device=name, peak_bf16_tflops=peak)

    def left() -> float:
        return budget_s - (time.perf_counter() - t_start)

    for section, need in SECTIONS:
        if not s.dry and left() < need:
            report["sections"][section] = {"ok": None, "skipped": f"{left():.0f} s left"}
            continue
        t0 = time.perf_counter()
        # In-process sections get the rest of the budget, then an exception at the next Python
        # line (the subprocesses have their own time-outs).
        signal.alarm(max(1, int(left())))
        try:
            if section == "gpu_tests":
                result = section_gpu_tests(s, out, min(pytest_timeout_s, left() - 30))
            elif section == "throughput":
                result = section_throughput(s, peak)
            elif section == "tora_cost":
                result = section_tora_cost(s)
            else:
                result = section_trials_sharing(s, out, left() - 10)
        except Exception as e:
            result = {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000]}
            result["traceback"] = traceback.format_exc()[-4000:]
        finally:
            signal.alarm(0)
        result["seconds"] = time.perf_counter() - t0
        report["sections"][section] = result
        print(f"[gpu_check] {section}: ok={result.get('ok')} in {result['seconds']:.0f} s")
        if s.device.type == "cuda":
            torch.cuda.empty_cache()
    _MODELS.clear()
    report["wall_s"] = time.perf_counter() - t_start
    return report


def failed(report: dict[str, Any]) -> list[str]:
    """Names of the failed parts (a section that ran and was not ok, or no device)."""
    bad = ["device"] if "error" in report else []
    return bad + [k for k, v in report["sections"].items() if v.get("ok") is False]


def _f(x: Any, fmt: str = "{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# GPU check{' (dry run: numbers mean nothing)' if report['dry_run'] else ''}",
        "",
        f"{report['date']}, {report.get('device', '?')}, torch {report['torch']}, "
        f"peak bf16 {_f(report.get('peak_bf16_tflops'), '{:.0f}')} TFLOP/s, "
        f"wall {_f(report.get('wall_s'), '{:.0f}')} s of {report['budget_s']:.0f} s",
        "",
    ]
    if "error" in report:
        lines += [f"FAILED: {report['error']}", ""]
    sec = report["sections"]
    for name, r in sec.items():
        state = "skipped" if r.get("ok") is None else ("ok" if r["ok"] else "FAILED")
        extra = r.get("skipped") or r.get("error") or r.get("summary") or ""
        lines.append(f"- {name}: {state} {extra}".rstrip())
    lines.append("")
    th = sec.get("throughput", {})
    if th.get("rows"):
        lines += [
            f"Training step, ToRA 32/32/4 on qkv, 3 tasks ({th['flops_note']}: "
            f"{th['flops_per_image'] / 1e12:.2f} TFLOP per image)",
            "",
            "| batch | checkpointing | s / step | images / s | TFLOP/s | MFU | peak GiB |",
            "|---:|---|---:|---:|---:|---:|---:|",
        ]
        for r in th["rows"]:
            if "error" in r:
                lines.append(f"| {r['batch']} | {r['checkpointing']} | {r['error']} |||||")
                continue
            lines.append(
                f"| {r['batch']} | {r['checkpointing']} | {r['step_s']:.3f} "
                f"| {r['images_per_s']:.2f} | {r['tflops_per_s']:.1f} "
                f"| {_f(r.get('mfu'), '{:.1%}')} | {_f(r.get('peak_mem_gib'), '{:.1f}')} |"
            )
        verdict = {True: "PASS", False: "MISS", None: "not judged"}[th.get("goal_met")]
        lines += ["", f"- Goal MFU >= {MFU_GOAL:.0%}: best {_f(th.get('best_mfu'), '{:.1%}')} "
                  f"-> {verdict}", ""]  # fmt: skip
    tc = sec.get("tora_cost", {})
    if "tora_vs_frozen" in tc:
        st = tc["step_s"]
        verdict = "PASS" if tc["goal_met"] else "MISS"
        lines += [
            f"Step time at batch {tc['batch']}, {tc['rounds']} interleaved rounds: frozen "
            f"{st['frozen']:.3f} s, ToRA {st['tora']:.3f} s, authors' materialised "
            f"{st['authors']:.3f} s",
            "",
            f"- Goal ToRA <= {TORA_GOAL}x the frozen encoder: {tc['tora_vs_frozen']:.3f}x "
            f"-> {verdict}",
            f"- The authors' form: {tc['authors_vs_tora']:.2f}x ToRA's step time",
            "",
        ]
    ts = sec.get("trials_sharing", {})
    if ts.get("speedup"):
        lines += [
            f"4 tiny trials: sharing the GPU {ts['shared']['trials_per_hour']:.0f} trials/h "
            f"({ts['shared']['wall_s']:.0f} s), one at a time "
            f"{ts['one_at_a_time']['trials_per_hour']:.0f} trials/h "
            f"({ts['one_at_a_time']['wall_s']:.0f} s): {ts['speedup']:.2f}x",
            "",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path, help="folder for the report files")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny preset, small sizes")
    ap.add_argument("--budget-s", type=float, default=480.0, help="wall-time budget (480)")
    ap.add_argument(
        "--pytest-timeout-s",
        type=float,
        default=180.0,
        help="limit of pytest -m gpu (180: the measurements keep about 5 minutes)",
    )
    args = ap.parse_args(argv)
    if args.out.exists() and not args.out.is_dir():
        print(f"error: --out {args.out}: exists and is not a folder", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    if args.dry_run:  # on a busy CPU, OpenMP threads waiting on each other cost 10-50x
        torch.set_num_threads(1)
    try:
        report = run_all(Setting(args.dry_run), args.out, args.budget_s, args.pytest_timeout_s)
    finally:
        torch.set_num_threads(threads)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    (args.out / "gpu_check.md").write_text(markdown(report))
    bad = failed(report)
    print(markdown(report))
    print(f"[gpu_check] {'FAILED: ' + ', '.join(bad) if bad else 'all checks passed'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
