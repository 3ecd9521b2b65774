"""Start-up of data-parallel workers on a Parquet shard set: full hashing (the old path) against
the manifest + footer check, measured side by side in one run.

What is measured: on each of 2 ranks (2 plain processes started together, one thread each, as
Ray Train's CPU workers run), the time from worker entry -- the processes have imported mtsam
and torch and wait on a barrier, so interpreter start and imports are left out -- until the
rank holds its first training batch. In between a rank does what ``loop.fit`` does with its
data before the first step: open the train and val splits with ``open_split``, build its
rank's loader (``DistributedSampler``, augmentation on) and draw one batch. The model, the
process group and DDP's first broadcast are not part of it (they do not depend on the data).
A round's start-up is the slower rank's; both variants run in alternating rounds on the same
files, which stay in the page cache (so the old path is timed at its best: hashing from memory,
not from disk or over the network).

- before (reference): the old start-up integrity check, kept here as it was -- every shard of
  both splits is stat'ed and its sha256 compared with the manifest on every rank -- followed by
  the same reader (``verify=False``), so only the check differs.
- after: ``open_split`` as the loop calls it now (sizes from one listing per split folder, the
  Parquet footers, page checksums as the first batch's pages are read).

Goal: after <= 0.2x before.

Run:  PYTHONPATH=platform python benchmarks/bench_startup.py [--quick]
"""

from __future__ import annotations

import argparse
import datetime as dt
import multiprocessing as mp
import os
import platform as host
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "platform") not in sys.path:
    sys.path.insert(0, str(REPO / "platform"))

GOAL = 0.2
WORLD = 2
TASKS = ("semantic", "depth", "normal")


class RandomNYU:
    """NYUv2-shaped samples of random values (incompressible, like photographs after zstd)."""

    def __init__(self, n: int, height: int, width: int, seed: int) -> None:
        self.n, self.height, self.width, self.seed = n, height, width, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        import numpy as np
        import torch

        rng = np.random.default_rng([self.seed, i])
        h, w = self.height, self.width
        normal = rng.normal(size=(3, h, w)).astype(np.float32)
        normal /= np.linalg.norm(normal, axis=0, keepdims=True)
        arrays = {
            "image": rng.uniform(0, 1, (3, h, w)).astype(np.float32),
            "semantic": rng.integers(-1, 13, (h, w)).astype(np.int64),
            "depth": rng.uniform(0.5, 9, (1, h, w)).astype(np.float32),
            "normal": normal,
        }
        return {"index": torch.tensor(i), **{k: torch.from_numpy(v) for k, v in arrays.items()}}


def write_set(out: Path, *, train: int, val: int, height: int, width: int) -> int:
    """Write the shard set with the project's writer; returns its size in bytes."""
    from mtsam.data import SplitSource, write_shards

    sources = {
        split: SplitSource(
            fingerprint=f"bench-{split}-{n}-{height}x{width}",
            open=lambda n=n, s=seed: RandomNYU(n, height, width, s),
        )
        for split, n, seed in (("train", train, 0), ("val", val, 1))
    }
    write_shards(out, sources, dataset="nyuv2", samples_per_shard=16, validate=False)
    return sum(p.stat().st_size for p in out.rglob("*.parquet"))


def old_check(root: Path, split: str) -> None:
    """The start-up check every worker ran before: size and sha256 of every shard."""
    import json

    from mtsam.data.shards import sha256_file

    manifest = json.loads((root / "manifest.json").read_text())
    for shard in manifest["splits"][split]["shards"]:
        file = root / shard["file"]
        if not file.is_file() or file.stat().st_size != shard["bytes"]:
            raise RuntimeError(f"{file}: missing or wrong size")
        if sha256_file(file) != shard["sha256"]:
            raise RuntimeError(f"{file}: sha256 differs")


def rank_main(rank: int, root: str, variant: str, batch_size: int, barrier, results) -> None:
    import torch

    from mtsam.train.data import open_split, train_loader

    torch.set_num_threads(1)
    common = {"fmt": "shards", "tasks": TASKS, "num_classes": 13, "seed": 0}
    barrier.wait()
    t0 = time.perf_counter()
    if variant == "before":
        for split in ("train", "val"):
            old_check(Path(root), split)
    train = open_split("nyuv2", root, "train", augment=True, **common)
    open_split("nyuv2", root, "val", augment=False, **common)
    opened = time.perf_counter() - t0
    loader, sampler = train_loader(
        train, batch_size=batch_size, rank=rank, world_size=WORLD, seed=0, workers=0
    )
    sampler.set_epoch(0)
    batch = next(iter(loader))
    elapsed = time.perf_counter() - t0
    assert batch["image"].shape[0] == batch_size
    results.put((rank, opened, elapsed))


def start_up(root: Path, variant: str, batch_size: int) -> tuple[float, float]:
    """Seconds until both ranks have opened (and checked) both splits, and until both hold
    their first batch (the slower rank's times)."""
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(WORLD), ctx.Queue()
    procs = [
        ctx.Process(target=rank_main, args=(r, str(root), variant, batch_size, barrier, results))
        for r in range(WORLD)
    ]
    for p in procs:
        p.start()
    times = [results.get(timeout=600)[1:] for _ in procs]
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"rank process failed ({p.exitcode})")
    return max(t[0] for t in times), max(t[1] for t in times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small set and 1 round (smoke test)")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds per variant (5)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=1,
        help="images per rank (1, as configs/nyuv2_vit_l_*.yaml train ViT-L per GPU)",
    )
    p.add_argument(
        "--train-samples",
        type=int,
        default=80,
        help="training samples, 3.3 MiB each; val gets a fifth as many (80: 267 MiB in all)",
    )
    args = p.parse_args(argv)
    n = args.train_samples
    train, val, (h, w) = (n, n // 5, (288, 384)) if not args.quick else (16, 8, (64, 96))
    rounds = 1 if args.quick else args.rounds
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        root = Path(tmp) / "shards"
        t = time.perf_counter()
        size = write_set(root, train=train, val=val, height=h, width=w)
        print(
            f"shard set: {train} train + {val} val NYUv2-sized samples ({h}x{w}, 3 tasks), "
            f"{size / 2**20:.0f} MiB in {len(list(root.rglob('*.parquet')))} files, "
            f"written in {time.perf_counter() - t:.0f} s",
            flush=True,
        )
        opened: dict[str, list[float]] = {"before": [], "after": []}
        times: dict[str, list[float]] = {"before": [], "after": []}
        ratios, open_ratios = [], []
        for r in range(rounds):
            for variant in ("before", "after"):
                o, t = start_up(root, variant, args.batch_size)
                opened[variant].append(o)
                times[variant].append(t)
            ratios.append(times["after"][-1] / times["before"][-1])
            open_ratios.append(opened["after"][-1] / opened["before"][-1])
            print(
                f"round {r + 1}: before {opened['before'][-1]:.3f} / {times['before'][-1]:.3f} s,"
                f" after {opened['after'][-1]:.3f} / {times['after'][-1]:.3f} s "
                "(splits opened / first batch)",
                flush=True,
            )
    med = {v: (statistics.median(opened[v]), statistics.median(times[v])) for v in times}
    ratio, open_ratio = statistics.median(ratios), statistics.median(open_ratios)
    print()
    print(
        f"{dt.date.today()}, {os.cpu_count()}-core {host.machine()}, {WORLD} ranks x 1 thread, "
        f"batch {args.batch_size} per rank, augmentation on, {rounds} alternating rounds "
        "(median s of the slower rank, median of per-round ratios)"
    )
    print()
    print(
        "| variant | both splits opened and checked, s | vs before | start-up: entry -> first "
        "batch on both ranks, s | vs before |"
    )
    print("|---|---:|---:|---:|---:|")
    print(
        f"| before: sha256 of every shard on every rank (old path) | {med['before'][0]:.3f} | "
        f"1.00x | {med['before'][1]:.3f} | 1.00x |"
    )
    print(
        f"| after: sizes + footers, page checksums on read | {med['after'][0]:.3f} | "
        f"{open_ratio:.3f}x | {med['after'][1]:.3f} | {ratio:.3f}x |"
    )
    print()
    verdict = "PASS" if ratio <= GOAL else "FAIL"
    print(f"- Goal start-up after <= {GOAL}x before: {ratio:.3f}x -> {verdict}")
    return 0 if args.quick or ratio <= GOAL else 1


if __name__ == "__main__":
    sys.exit(main())
