"""A training step's loss is the mean over every valid pixel of the step, however the step's
images are split between data-parallel workers and micro-batches.

Two real gloo processes train a small conv net under ``DistributedDataParallel`` with two
micro-batches each, with very different numbers of valid pixels per worker and micro-batch.
Their averaged gradients must equal the gradient of the tasks' own losses on all the images at
once in a single process.
"""

from __future__ import annotations

import os
from contextlib import nullcontext

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from gloo import free_port, gloo_rank
from mtsam.tasks.checks import IGNORE_INDEX
from mtsam.tasks.spec import ClassSegmentationTask, DepthTask, NormalTask
from mtsam.train.context import local_context
from mtsam.train.loop import step_pixel_weights

TASKS = [
    ClassSegmentationTask(name="semantic", num_classes=3),
    DepthTask(name="depth"),
    NormalTask(name="normal"),
]
CHANNELS = [3, 1, 3]
# (worker, micro-batch) -> (images, fraction of invalid pixels): deliberately uneven
SHARDS = {(0, 0): (1, 0.9), (0, 1): (3, 0.1), (1, 0): (2, 0.5), (1, 1): (1, 0.0)}


def _shard(worker: int, micro: int) -> dict[str, torch.Tensor]:
    n, invalid = SHARDS[(worker, micro)]
    g = torch.Generator().manual_seed(10 * worker + micro)
    size = (n, 6, 6)
    drop = torch.rand(size, generator=g) < invalid
    semantic = torch.randint(0, 3, size, generator=g)
    depth = torch.rand(size, generator=g) + 0.5
    normal = nn.functional.normalize(torch.randn(n, 3, 6, 6, generator=g), dim=1)
    return {
        "image": torch.randn(n, 2, 6, 6, generator=g),
        "semantic": semantic.masked_fill(drop, IGNORE_INDEX),
        "depth": depth.masked_fill(drop, 0.0)[:, None],
        "normal": normal.masked_fill(drop[:, None], 0.0),
    }


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.GELU(), nn.Conv2d(8, sum(CHANNELS), 1))


def _task_losses(out: torch.Tensor, batch) -> dict[str, torch.Tensor]:
    heads = out.split(CHANNELS, dim=1)
    return {t.name: t.loss(h, batch[t.name]) for t, h in zip(TASKS, heads, strict=True)}


def _worker(rank: int, port: int, out_dir: str) -> None:
    with gloo_rank(rank, port) as ctx:
        net = DistributedDataParallel(_net())
        batches = [_shard(rank, k) for k in range(2)]
        weights = step_pixel_weights(TASKS, batches, ctx)
        for k, batch in enumerate(batches):
            with net.no_sync() if k == 0 else nullcontext():
                losses = _task_losses(net(batch["image"]), batch)
                sum(v * weights[k][n] for n, v in losses.items()).backward()
        grads = [p.grad for p in net.module.parameters()]
        torch.save({"grads": grads, "weights": weights}, os.path.join(out_dir, f"rank{rank}.pt"))


def test_step_loss_is_the_mean_over_all_valid_pixels(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)

    # Reference: one process, every image of the step in one batch, the tasks' own losses.
    whole = {
        key: torch.cat([_shard(w, k)[key] for w in (0, 1) for k in (0, 1)])
        for key in ("image", "semantic", "depth", "normal")
    }
    net = _net()
    sum(_task_losses(net(whole["image"]), whole).values()).backward()
    want = [p.grad for p in net.parameters()]

    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for rank_result in got:
        for g, w in zip(rank_result["grads"], want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)
    # The counts were uneven, so the weights are far from the naive 1 / grad_accum.
    flat = [v for r in got for micro in r["weights"] for v in micro.values()]
    assert max(flat) > 0.9 and min(flat) < 0.2


def test_equal_counts_give_one_over_grad_accum_and_empty_tasks_zero():
    ctx = local_context()
    depth = DepthTask(name="depth")
    full = {"depth": torch.ones(2, 1, 4, 4)}
    assert step_pixel_weights([depth], [full], ctx) == [{"depth": 1.0}]
    assert step_pixel_weights([depth], [full, full], ctx) == [{"depth": 0.5}, {"depth": 0.5}]
    empty = {"depth": torch.zeros(2, 1, 4, 4)}
    assert step_pixel_weights([depth], [empty], ctx) == [{"depth": 0.0}]
    # 12 of 16 valid against 4 of 16: three quarters and one quarter of the step's pixels
    a = torch.ones(1, 1, 4, 4)
    a[..., 0, :] = 0
    b = torch.zeros(1, 1, 4, 4)
    b[..., 0, :] = 1
    weights = step_pixel_weights([depth], [{"depth": a}, {"depth": b}], ctx)
    assert weights == [{"depth": pytest.approx(0.75)}, {"depth": pytest.approx(0.25)}]
