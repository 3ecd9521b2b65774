"""Metric accumulators against hand-computed values and independent numpy references;
exact accumulation over uneven batches, simulated and real (gloo) data-parallel workers;
delta_m against LibMTL's count_improvement formula."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gloo import free_port, gloo_rank
from mtsam.tasks import (
    ConfusionAccumulator,
    DepthAccumulator,
    NormalAccumulator,
    SaliencyAccumulator,
    TaskInputError,
    all_reduce_,
    build_task,
    delta_m,
)


def one_hot_logits(pred: np.ndarray, num_classes: int) -> torch.Tensor:
    """(B, H, W) class ids -> (B, C, H, W) scores whose arg-max is ``pred``."""
    p = torch.as_tensor(pred, dtype=torch.long)
    return torch.nn.functional.one_hot(p, num_classes).permute(0, 3, 1, 2).float() * 5.0


# ---------------------------------------------------------------- segmentation


GT = np.array([[0, 0, 1, 1], [0, 2, 1, -1], [2, 2, -1, 1]])
PRED = np.array([[0, 1, 1, 1], [0, 2, 0, 3], [2, 3, 0, 1]])


def test_miou_hand_computed_with_ignore_and_absent_class():
    # 10 valid pixels, 7 correct. IoU: class 0 = 2/4, class 1 = 3/5, class 2 = 2/3,
    # class 3 (predicted once, never in gt) = 0 and counts, class 4 (nowhere) is left out.
    acc = ConfusionAccumulator(task="semantic", num_classes=5)
    acc.update(one_hot_logits(PRED[None], 5), torch.as_tensor(GT[None]))
    out = acc.compute()
    assert out["pixel_acc"] == pytest.approx(0.7)
    assert out["miou"] == pytest.approx((1 / 2 + 3 / 5 + 2 / 3 + 0) / 4)
    assert not math.isnan(out["miou"])


def test_miou_empty_split_is_nan_not_error():
    acc = ConfusionAccumulator(task="semantic", num_classes=3)
    acc.update(torch.zeros(1, 3, 2, 2), torch.full((1, 2, 2), -1))
    out = acc.compute()
    assert math.isnan(out["miou"]) and math.isnan(out["pixel_acc"])


def numpy_miou(pred: np.ndarray, gt: np.ndarray, c: int) -> tuple[float, float]:
    """Independent reference: per-class IoU with explicit boolean masks."""
    keep = gt != -1
    p, g = pred[keep], gt[keep]
    ious = []
    for k in range(c):
        inter = np.sum((p == k) & (g == k))
        union = np.sum((p == k) | (g == k))
        if union > 0:
            ious.append(inter / union)
    return float(np.mean(ious)), float(np.mean(p == g))


def test_miou_random_against_numpy():
    rng = np.random.default_rng(0)
    gt = rng.integers(-1, 6, size=(3, 7, 9))
    pred = rng.integers(0, 6, size=(3, 7, 9))
    acc = ConfusionAccumulator(task="semantic", num_classes=6)
    acc.update(one_hot_logits(pred, 6), torch.as_tensor(gt))
    miou, pa = numpy_miou(pred, gt, 6)
    assert acc.compute()["miou"] == pytest.approx(miou)
    assert acc.compute()["pixel_acc"] == pytest.approx(pa)


def test_label_out_of_range_is_rejected():
    acc = ConfusionAccumulator(task="semantic", num_classes=3)
    with pytest.raises(TaskInputError, match=r"semantic: target labels must be in 0\.\.2"):
        acc.update(torch.zeros(1, 3, 2, 2), torch.tensor([[[0, 3], [1, 2]]]))
    with pytest.raises(TaskInputError, match=r"\(B, 3, H, W\)"):
        acc.update(torch.zeros(1, 4, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(TaskInputError, match="target must be"):
        acc.update(torch.zeros(1, 3, 2, 2), torch.zeros(1, 2, 3, dtype=torch.long))


# ---------------------------------------------------------------- depth


def test_depth_errors_skip_invalid_pixels():
    # valid gt 2, 4, 1 with |d| = 1, 1, 0: abs = 2/3, rel = (1/2 + 1/4 + 0) / 3.
    gt = torch.tensor([[[[2.0, 0.0], [4.0, 1.0]]]])
    pred = torch.tensor([[[[1.0, 5.0], [5.0, 1.0]]]])
    acc = DepthAccumulator()
    acc.update(pred, gt)
    out = acc.compute()
    assert out["abs_err"] == pytest.approx(2 / 3)
    assert out["rel_err"] == pytest.approx(0.25)


def test_depth_pixel_weighted_not_mean_of_batches():
    acc = DepthAccumulator()
    # batch 1: one valid pixel, error 3; batch 2: three valid pixels, error 1 each.
    acc.update(torch.tensor([[[[4.0, 9.0]]]]), torch.tensor([[[[1.0, 0.0]]]]))
    acc.update(torch.full((1, 1, 1, 3), 2.0), torch.ones(1, 1, 1, 3))
    assert acc.compute()["abs_err"] == pytest.approx((3 + 1 + 1 + 1) / 4)  # not (3 + 1) / 2
    assert acc.compute()["rel_err"] == pytest.approx((3 + 1 + 1 + 1) / 4)


# ---------------------------------------------------------------- normal


def _unit(v):
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def normal_pair(pairs):
    """[(pred_vec, gt_vec), ...] -> (1, 3, 1, N) tensors."""
    pred = torch.tensor(np.array([p for p, _ in pairs]).T[None, :, None, :], dtype=torch.float32)
    gt = torch.tensor(np.array([g for _, g in pairs]).T[None, :, None, :], dtype=torch.float32)
    return pred, gt


def test_normal_angles_hand_computed():
    x, y = [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]
    c20 = [math.cos(math.radians(20)), math.sin(math.radians(20)), 0.0]
    pairs = [
        (x, y),  # 90 degrees
        ([2.0, 0.0, 0.0], x),  # 0 (the prediction is not unit length)
        ([1.0, 1.0, 0.0], x),  # 45
        ([-1.0, 0.0, 0.0], x),  # 180
        ([1.0, math.sqrt(3.0), 0.0], x),  # 60
        (c20, x),  # 20
        ([0.3, -0.2, 0.9], [0.0, 0.0, 0.0]),  # invalid target: ignored
    ]
    acc = NormalAccumulator()
    acc.update(*normal_pair(pairs))
    out = acc.compute()
    assert out["mean_deg"] == pytest.approx((90 + 0 + 45 + 180 + 60 + 20) / 6, abs=1e-4)
    assert out["median_deg"] == pytest.approx((45 + 60) / 2, abs=0.0101)
    assert out["within_11_25"] == pytest.approx(1 / 6)
    assert out["within_22_5"] == pytest.approx(2 / 6)
    assert out["within_30"] == pytest.approx(2 / 6)


def test_normal_only_zero_targets_gives_nan():
    acc = NormalAccumulator()
    acc.update(torch.ones(1, 3, 2, 2), torch.zeros(1, 3, 2, 2))
    assert all(math.isnan(v) for v in acc.compute().values())


def test_normal_nan_prediction_makes_mean_and_median_nan():
    x, y = [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]
    nan = [math.nan, 0.0, 0.0]
    acc = NormalAccumulator()
    acc.update(*normal_pair([(nan, x), (nan, x), (x, y)]))  # two NaN pixels and one at 90
    out = acc.compute()
    assert math.isnan(out["mean_deg"]) and math.isnan(out["median_deg"])
    assert out["within_30"] == 0.0  # a NaN angle is never within a threshold


@pytest.mark.parametrize("n", [1, 2, 999, 1000])
def test_normal_median_within_one_bin_of_numpy(n):
    rng = np.random.default_rng(n)
    gt = rng.normal(size=(n, 3))
    gt /= np.linalg.norm(gt, axis=1, keepdims=True)
    pred = gt + rng.normal(scale=0.4, size=(n, 3))
    cos = np.clip(np.sum(pred / np.linalg.norm(pred, axis=1, keepdims=True) * gt, 1), -1, 1)
    ang = np.degrees(np.arccos(cos))
    acc = NormalAccumulator()
    acc.update(*normal_pair(list(zip(pred, gt, strict=True))))
    out = acc.compute()
    assert abs(out["median_deg"] - np.median(ang)) <= 0.0101
    assert out["mean_deg"] == pytest.approx(np.mean(ang), abs=1e-3)
    assert out["within_22_5"] == pytest.approx(np.mean(ang < 22.5))


# ---------------------------------------------------------------- saliency


def saliency_logits(prob: np.ndarray) -> torch.Tensor:
    """(B, H, W) probabilities -> (B, 2, H, W) logits with softmax(.)[:, 1] == prob."""
    p = torch.as_tensor(prob, dtype=torch.float64)
    return torch.stack([torch.zeros_like(p), torch.log(p / (1 - p))], dim=1)


def test_saliency_maxf_tiny_case():
    # Thresholds 0.05 .. 0.95, prediction >= threshold. At t = 0.5 the positives are {0.9, 0.5},
    # both salient: precision 1, recall 1, maxF = 1. With p > t the best is t = 0.5 .. 0.85:
    # {0.9} alone, precision 1, recall 1/2, F = 1.3 * 0.5 / (0.3 + 0.5) = 0.8125 (at t = 0.45
    # the 0.48 joins: precision 2/3, recall 1, F = 1.3 * 2/3 / 1.2 = 0.722).
    prob = np.array([[[0.9, 0.5, 0.48, 0.1, 0.7]]])
    gt = torch.tensor([[[1, 1, 0, 0, -1]]])
    acc = SaliencyAccumulator()
    acc.update(saliency_logits(prob), gt)
    out = acc.compute()
    assert out["maxf"] == pytest.approx(1.0)
    # At 0.5 (p > 0.5 rule): pred [1, 0, 0, 0]; IoU salient 1/2, background 2/3.
    assert out["miou"] == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_saliency_default_threshold_step_is_0_05():
    # Salient at 0.93 and 0.2, background at 0.91 (P = 2). Step 0.05: t <= 0.2 takes all three
    # (precision 2/3, recall 1, F = 1.3 * 2/3 / 1.2 = 13/18); 0.25 .. 0.9 takes {0.93, 0.91}
    # (1/2, 1/2, F = 1/2); 0.95 none. Step 0.01 reaches t = 0.92: {0.93}, F = 0.65 / 0.8.
    prob = np.array([[[0.93, 0.91, 0.2]]])
    gt = torch.tensor([[[1, 0, 1]]])
    coarse, fine = SaliencyAccumulator(), SaliencyAccumulator(step=0.01)
    for acc in (coarse, fine):
        acc.update(saliency_logits(prob), gt)
    assert len(coarse.thresholds) == 19
    assert coarse.compute()["maxf"] == pytest.approx(13 / 18)
    assert fine.compute()["maxf"] == pytest.approx(13 / 16)
    assert build_task("saliency").new_accumulator().step == 0.05


def numpy_maxf(prob, gt, step=0.05, b2=0.3):
    """Independent reference: loop over thresholds with explicit counts (p >= t)."""
    keep = gt != -1
    p, g = prob[keep], gt[keep]
    best = 0.0
    for k in range(1, round(1 / step)):
        pos = p >= k * step
        tp = np.sum(pos & (g == 1))
        prec = tp / pos.sum() if pos.sum() else 0.0
        rec = tp / np.sum(g == 1)
        if prec + rec > 0:
            best = max(best, (1 + b2) * prec * rec / (b2 * prec + rec))
    return best


def test_saliency_random_against_numpy():
    rng = np.random.default_rng(3)
    gt = rng.integers(-1, 2, size=(2, 6, 7))
    prob = np.clip(0.35 * gt + rng.uniform(0, 0.65, size=gt.shape), 0.001, 0.999)
    prob = np.round(prob, 3) + 0.0004  # keep clear of the threshold grid
    acc = SaliencyAccumulator()
    acc.update(saliency_logits(prob), torch.as_tensor(gt))
    assert acc.compute()["maxf"] == pytest.approx(numpy_maxf(prob, gt))
    fine = SaliencyAccumulator(step=0.01)
    fine.update(saliency_logits(prob), torch.as_tensor(gt))
    assert fine.compute()["maxf"] == pytest.approx(numpy_maxf(prob, gt, step=0.01))


def test_saliency_without_positive_pixels_is_nan():
    acc = SaliencyAccumulator()
    acc.update(saliency_logits(np.full((1, 2, 2), 0.7)), torch.zeros(1, 2, 2, dtype=torch.long))
    assert math.isnan(acc.compute()["maxf"])


# ---------------------------------------------------------------- per-image protocol


def test_per_image_depth_hand_computed_and_unlike_pooled():
    # Image 0: valid gt 1, 2, 4 with errors 1, 0, 2: abs 1, rel (1 + 0 + 0.5) / 3 = 0.5.
    # Image 1: one valid pixel gt 2, error 3: abs 3, rel 1.5. Image 2: no valid pixel, skipped.
    gt = torch.tensor([[[1.0, 2.0], [0.0, 4.0]], [[2.0, 0.0], [0.0, 0.0]], [[0.0] * 2] * 2])
    pred = torch.tensor([[[2.0, 2.0], [5.0, 2.0]], [[5.0, 9.0], [9.0, 9.0]], [[1.0] * 2] * 2])
    per_image = build_task("depth", protocol="per_image").new_accumulator()
    per_image.update(pred[:, None], gt[:, None])
    assert per_image.compute() == pytest.approx({"abs_err": 2.0, "rel_err": 1.0})
    pooled = build_task("depth").new_accumulator()  # 4 valid pixels: 6 / 4 and 3 / 4
    pooled.update(pred[:, None], gt[:, None])
    assert pooled.compute() == pytest.approx({"abs_err": 1.5, "rel_err": 0.75})


def _tilted(deg: float) -> list[float]:
    """A unit vector ``deg`` degrees from +z (in the x-z plane)."""
    r = math.radians(deg)
    return [math.sin(r), 0.0, math.cos(r)]


def test_per_image_normal_hand_computed():
    # Image 0: angles 0, 90, 20 (+ one invalid pixel): mean 110/3, median 20, within 11.25 /
    # 22.5 / 30: 1/3, 2/3, 2/3. Image 1: angles 10, 25 (+ two invalid): mean 17.5, median 10
    # (the lower middle value, as torch.median; numpy would say 17.5), within 1/2, 1/2, 1.
    # Image 2: no valid normal, skipped.
    angles = [[0, 90, 20, None], [10, 25, None, None], [None] * 4]
    pred = torch.tensor(
        [[_tilted(45.0 if a is None else a) for a in img] for img in angles], dtype=torch.float64
    )
    gt = torch.tensor(
        [[[0.0, 0.0, 1.0] if a is not None else [0.0] * 3 for a in img] for img in angles],
        dtype=torch.float64,
    )
    # (B, 4, 3) -> (B, 3, 2, 2)
    pred, gt = (x.permute(0, 2, 1).reshape(3, 3, 2, 2) for x in (pred, gt))
    acc = build_task("normal", protocol="per_image").new_accumulator()
    acc.update(pred, gt)
    expected = {
        "mean_deg": (110 / 3 + 17.5) / 2,
        "median_deg": (20 + 10) / 2,
        "within_11_25": (1 / 3 + 1 / 2) / 2,
        "within_22_5": (2 / 3 + 1 / 2) / 2,
        "within_30": (2 / 3 + 1) / 2,
    }
    assert acc.compute() == pytest.approx(expected, abs=1e-6)
    assert math.isnan(
        build_task("normal", protocol="per_image").new_accumulator().compute()["mean_deg"]
    )


def test_protocol_applies_to_dense_tasks_only_and_is_checked():
    assert (
        build_task("semantic", num_classes=3, protocol="per_image").new_accumulator().state_size
        == 9
    )
    with pytest.raises(ValueError, match="depth: unknown protocol 'image'"):
        build_task("depth", protocol="image")


# ---------------------------------------------------------------- exact accumulation


def random_batch(task: str, n: int, rng: torch.Generator, h: int = 5, w: int = 6):
    task = task.partition(":")[0]
    if task == "semantic":
        return torch.randn(n, 4, h, w, generator=rng), torch.randint(
            -1, 4, (n, h, w), generator=rng
        )
    if task == "human_parts":
        return torch.randn(n, 7, h, w, generator=rng), torch.randint(
            -1, 7, (n, h, w), generator=rng
        )
    if task == "saliency":
        return torch.randn(n, 2, h, w, generator=rng), torch.randint(
            -1, 2, (n, h, w), generator=rng
        )
    if task == "depth":
        gt = (
            torch.rand(n, 1, h, w, generator=rng)
            * 5
            * (torch.rand(n, 1, h, w, generator=rng) > 0.3)
        )
        return torch.rand(n, 1, h, w, generator=rng) * 5, gt
    gt = torch.nn.functional.normalize(torch.randn(n, 3, h, w, generator=rng), dim=1)
    gt = gt * (torch.rand(n, 1, h, w, generator=rng) > 0.3)
    return torch.randn(n, 3, h, w, generator=rng), gt


# "<task>:per_image": the task's accumulator under the per-image protocol.
TASKS = [
    "semantic",
    "human_parts",
    "saliency",
    "depth",
    "normal",
    "depth:per_image",
    "normal:per_image",
]


def make_acc(task):
    name, _, protocol = task.partition(":")
    spec = build_task(
        name, num_classes=4 if name == "semantic" else None, protocol=protocol or "pooled"
    )
    return spec.new_accumulator()


@pytest.mark.parametrize("task", TASKS)
def test_uneven_batches_equal_one_shot(task):
    logits, target = random_batch(task, 5, torch.Generator().manual_seed(7))
    whole = make_acc(task)
    whole.update(logits, target)
    parts = make_acc(task)
    for lo, hi in [(0, 2), (2, 3), (3, 5)]:
        parts.update(logits[lo:hi], target[lo:hi])
    assert parts.compute() == pytest.approx(whole.compute(), rel=1e-12)


@pytest.mark.parametrize("task", TASKS)
def test_two_simulated_workers_sum_equals_one_shot(task):
    logits, target = random_batch(task, 5, torch.Generator().manual_seed(11))
    whole = make_acc(task)
    whole.update(logits, target)
    a, b = make_acc(task), make_acc(task)
    a.update(logits[:1], target[:1])
    b.update(logits[1:], target[1:])
    summed = make_acc(task)
    summed.load_state(a.state() + b.state())
    assert summed.state().dtype == torch.float64 and summed.state().dim() == 1
    assert summed.compute() == pytest.approx(whole.compute(), rel=1e-12)
    a.merge(b)
    assert a.compute() == pytest.approx(whole.compute(), rel=1e-12)


def test_load_state_and_merge_reject_mismatches():
    acc = ConfusionAccumulator(task="semantic", num_classes=3)
    with pytest.raises(ValueError, match=r"semantic: metric state must have shape \(9,\)"):
        acc.load_state(torch.zeros(4))
    with pytest.raises(ValueError, match="cannot merge"):
        acc.merge(DepthAccumulator())


def test_all_reduce_without_process_group_is_noop():
    assert not dist.is_initialized()
    acc = DepthAccumulator()
    acc.update(torch.ones(1, 1, 1, 2), torch.full((1, 1, 1, 2), 2.0))
    before = acc.state()
    all_reduce_([acc])
    assert torch.equal(acc.state(), before)


def _gloo_worker(rank: int, port: int, out_dir: str) -> None:
    with gloo_rank(rank, port):
        accs = []
        for task in TASKS:
            logits, target = random_batch(task, 5, torch.Generator().manual_seed(5))
            lo, hi = (0, 2) if rank == 0 else (2, 5)  # uneven shards
            acc = make_acc(task)
            acc.update(logits[lo:hi], target[lo:hi])
            accs.append(acc)
        all_reduce_(accs)
        torch.save([a.compute() for a in accs], os.path.join(out_dir, f"rank{rank}.pt"))


def test_all_reduce_over_two_gloo_processes(tmp_path):
    mp.spawn(_gloo_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    expected = []
    for task in TASKS:
        logits, target = random_batch(task, 5, torch.Generator().manual_seed(5))
        acc = make_acc(task)
        acc.update(logits, target)
        expected.append(acc.compute())
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", map_location="cpu", weights_only=True)
        for g, e in zip(got, expected, strict=True):
            assert g == pytest.approx(e, rel=1e-12)


# ---------------------------------------------------------------- delta_m


def test_delta_m_positive_when_better_than_baseline():
    base = {"semantic": {"miou": 0.5}, "depth": {"abs_err": 0.4}}
    dirs = {"semantic": {"miou": True}, "depth": {"abs_err": False}}
    better = {"semantic": {"miou": 0.55}, "depth": {"abs_err": 0.36}}
    worse = {"semantic": {"miou": 0.45}, "depth": {"abs_err": 0.44}}
    assert delta_m(better, base, dirs) == pytest.approx(10.0)
    assert delta_m(worse, base, dirs) == pytest.approx(-10.0)
    assert delta_m(base, base, dirs) == 0.0


def test_delta_m_matches_libmtl_count_improvement_example():
    # LibMTL docstring example; its weight w = 1 means higher is better, and it returns
    # mean_t mean_m (-1)**w (B - N) / B (a fraction): here by hand.
    base = {"A": {"a1": 96.0, "a2": 98.0}, "B": {"b1": 0.2}}
    new = {"A": {"a1": 93.0, "a2": 99.0}, "B": {"b1": 0.5}}
    dirs = {"A": {"a1": True, "a2": False}, "B": {"b1": True}}
    task_a = (-(96 - 93) / 96 + (98 - 99) / 98) / 2
    task_b = -(0.2 - 0.5) / 0.2
    assert delta_m(new, base, dirs) == pytest.approx(100 * (task_a + task_b) / 2)


def test_delta_m_errors_name_the_problem():
    dirs = {"depth": {"abs_err": False, "rel_err": False}}
    res = {"depth": {"abs_err": 0.3}}
    with pytest.raises(ValueError, match=r"depth/rel_err: not in the results"):
        delta_m(res, {"depth": {"abs_err": 0.4, "rel_err": 0.1}}, dirs)
    with pytest.raises(ValueError, match=r"depth/foo: unknown metric"):
        delta_m({"depth": {"foo": 1.0}}, {"depth": {"foo": 1.0}}, dirs)
    with pytest.raises(ValueError, match=r"depth/abs_err: baseline value 0"):
        delta_m(res, {"depth": {"abs_err": 0.0}}, dirs)
    with pytest.raises(ValueError, match=r"no baseline for \['normal'\]"):
        delta_m({**res, "normal": {"mean_deg": 1.0}}, {"depth": {"abs_err": 0.4}}, dirs)
