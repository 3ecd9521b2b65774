"""Task specs: registry, channels and activations, losses against torch.nn.functional / numpy
references (incl. batches with no valid pixel), metric directions, and the drawings."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mtsam.tasks import (
    TASK_KINDS,
    TaskInputError,
    build_task,
    build_tasks,
    metric_mode,
    task_metric_directions,
)

# ---------------------------------------------------------------- registry


def test_registry_builds_every_kind_with_its_channels_and_activation():
    assert set(TASK_KINDS) == {"semantic", "human_parts", "saliency", "depth", "normal"}
    expected = {
        "semantic": (13, "log_softmax"),
        "human_parts": (7, "log_softmax"),
        "saliency": (2, "log_softmax"),
        "depth": (1, "identity"),
        "normal": (3, "l2_normalize"),
    }
    for name, (channels, act) in expected.items():
        spec = build_task(name, num_classes=13 if name == "semantic" else None)
        assert spec.name == name and spec.channels == channels and act == spec.ACTIVATION
        assert pickle.loads(pickle.dumps(spec)) == spec  # travels to Ray workers
        # Every metric compute() returns has a direction, and nothing else does.
        logits = torch.randn(1, channels, 4, 4)
        target = {
            "depth": torch.rand(1, 1, 4, 4) + 0.5,
            "normal": F.normalize(torch.randn(1, 3, 4, 4), dim=1),
        }.get(name, torch.randint(0, channels, (1, 4, 4)))
        acc = spec.new_accumulator()
        acc.update(logits, target)
        assert list(acc.compute()) == list(spec.directions)


def test_registry_errors():
    with pytest.raises(ValueError, match=r"unknown task 'segm'; known tasks"):
        build_task("segm")
    with pytest.raises(ValueError, match="num_classes is required"):
        build_task("semantic")
    with pytest.raises(ValueError, match=r"'depth'.*1 output channel.*num_classes = 13"):
        build_task("depth", num_classes=13)
    with pytest.raises(ValueError, match=r"'saliency'.*2 output channel"):
        build_task("saliency", num_classes=3)
    assert build_task("human_parts", num_classes=5).channels == 5


def test_build_tasks_gives_dataset_classes_to_semantic_only():
    specs = build_tasks(["semantic", "depth", "normal"], num_classes=13)
    assert [s.channels for s in specs] == [13, 1, 3]
    specs = build_tasks(["semantic", "human_parts", "saliency", "normal"], num_classes=21)
    assert [s.channels for s in specs] == [21, 7, 2, 3]


def test_directions_and_metric_mode():
    specs = build_tasks(["semantic", "depth", "normal", "saliency"], num_classes=4)
    dirs = task_metric_directions(specs)
    assert dirs["semantic"] == {"miou": True, "pixel_acc": True}
    assert dirs["depth"] == {"abs_err": False, "rel_err": False}
    assert dirs["normal"] == {
        "mean_deg": False,
        "median_deg": False,
        "within_11_25": True,
        "within_22_5": True,
        "within_30": True,
    }
    assert dirs["saliency"] == {"maxf": True, "miou": True}
    assert task_metric_directions(["depth"]) == {"depth": dirs["depth"]}
    assert metric_mode("val/depth/abs_err", specs) == "min"
    assert metric_mode("val/normal/within_30", specs) == "max"
    assert metric_mode("val/delta_m", specs) == "max"
    with pytest.raises(ValueError, match=r"metric 'val/depth/miou'"):
        metric_mode("val/depth/miou", specs)


def test_fraction_metrics_are_fractions():
    """FRACTIONS (what a baseline may not give in percent) names metrics that compute() keeps in
    [0, 1]; random predictions put the other metrics (degrees, errors) well above 1."""
    gen = torch.Generator().manual_seed(0)
    normal = F.normalize(torch.randn(2, 3, 8, 8, generator=gen), dim=1)
    targets = {
        "semantic": torch.randint(0, 4, (2, 8, 8), generator=gen),
        "saliency": torch.randint(0, 2, (2, 8, 8), generator=gen),
        "depth": 0.1 + 0.1 * torch.rand(2, 1, 8, 8, generator=gen),  # errors >> 1 below
        "normal": normal,
    }
    for spec in build_tasks(list(targets), num_classes=4):
        assert set(spec.directions) >= spec.FRACTIONS, spec.name
        acc = spec.new_accumulator()
        acc.update(10 * torch.randn(2, spec.channels, 8, 8, generator=gen), targets[spec.name])
        got = acc.compute()
        assert all(0 <= got[m] <= 1 for m in spec.FRACTIONS), (spec.name, got)
        assert all(got[m] > 1 for m in set(got) - spec.FRACTIONS), (spec.name, got)


# ---------------------------------------------------------------- losses


@pytest.mark.parametrize("name,classes", [("semantic", 5), ("human_parts", 7), ("saliency", 2)])
def test_classification_loss_matches_cross_entropy(name, classes):
    torch.manual_seed(0)
    spec = build_task(name, num_classes=classes if name == "semantic" else None)
    logits = torch.randn(2, classes, 4, 5, requires_grad=True)
    target = torch.randint(-1, classes, (2, 4, 5))
    ref = F.cross_entropy(logits, target, ignore_index=-1)
    assert spec.loss(logits, target).item() == pytest.approx(ref.item(), rel=1e-6)
    # The activation is idempotent for the loss: log-softmax output gives the same value.
    assert spec.loss(spec.activate(logits), target).item() == pytest.approx(ref.item(), rel=1e-6)


def test_only_ignore_batch_gives_zero_loss_with_gradient():
    spec = build_task("semantic", num_classes=3)
    logits = torch.randn(2, 3, 2, 2, requires_grad=True)
    loss = spec.loss(logits, torch.full((2, 2, 2), -1))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))
    for name, c in (("depth", 1), ("normal", 3)):
        pred = torch.randn(1, c, 2, 2, requires_grad=True)
        loss = build_task(name).loss(pred, torch.zeros(1, c, 2, 2))
        assert loss.item() == 0.0 and loss.requires_grad
        loss.backward()
        assert torch.isfinite(pred.grad).all() and not pred.grad.any()


def test_depth_loss_l1_over_valid_pixels():
    pred = torch.tensor([[[[1.0, 5.0], [5.0, 1.5]]]], requires_grad=True)
    gt = torch.tensor([[[[2.0, 0.0], [4.0, 1.0]]]])
    loss = build_task("depth").loss(pred, gt)
    assert loss.item() == pytest.approx((1 + 1 + 0.5) / 3)
    loss.backward()
    # d/dpred of mean |pred - gt| over 3 valid pixels; 0 at the invalid one.
    assert pred.grad.flatten().tolist() == pytest.approx([-1 / 3, 0.0, 1 / 3, 1 / 3])


def test_normal_loss_against_numpy():
    rng = np.random.default_rng(1)
    pred = rng.normal(size=(2, 3, 3, 4))
    gt = rng.normal(size=(2, 3, 3, 4))
    gt /= np.linalg.norm(gt, axis=1, keepdims=True)
    gt[0, :, 1, 2] = 0.0
    gt[1, :, 0, :] = 0.0
    unit = pred / np.linalg.norm(pred, axis=1, keepdims=True)
    valid = np.any(gt != 0, axis=1)
    ref = 1.0 - np.sum(unit * gt, axis=1)[valid].mean()
    got = build_task("normal").loss(torch.tensor(pred), torch.tensor(gt))
    assert got.item() == pytest.approx(ref, rel=1e-6)


def test_valid_pixels_count_what_each_loss_averages_over():
    depth = torch.tensor([[[[2.0, 0.0], [4.0, 1.0]]]])
    assert int(build_task("depth").valid_pixels(depth)) == 3
    labels = torch.tensor([[[0, -1], [2, -1]], [[1, 1], [-1, 0]]])
    assert int(build_task("semantic", num_classes=3).valid_pixels(labels)) == 5
    normals = torch.zeros(1, 3, 2, 2)
    normals[0, 2, 0, 0] = 1.0
    normals[0, 0, 1, 1] = -1.0  # a component of -1 still marks a valid normal
    assert int(build_task("normal").valid_pixels(normals)) == 2
    # loss x count = the per-pixel sum: the depth case by hand (|1-2| + |5-4| + |1.5-1|)
    pred = torch.tensor([[[[1.0, 5.0], [5.0, 1.5]]]])
    task = build_task("depth")
    assert float(task.loss(pred, depth) * task.valid_pixels(depth)) == pytest.approx(2.5)


def test_losses_reject_bad_targets():
    with pytest.raises(TaskInputError, match=r"depth: target must be \(B, 1, H, W\)"):
        build_task("depth").loss(torch.zeros(1, 1, 2, 2), torch.zeros(1, 2, 2))
    with pytest.raises(TaskInputError, match=r"normal: prediction must be \(B, 3, H, W\)"):
        build_task("normal").loss(torch.zeros(1, 2, 2, 2), torch.zeros(1, 3, 2, 2))
    with pytest.raises(TaskInputError, match=r"saliency: target labels must be in 0\.\.1"):
        build_task("saliency").loss(torch.zeros(1, 2, 2, 2), torch.full((1, 2, 2), 255))
    with pytest.raises(TaskInputError, match="semantic: target must be an integer tensor"):
        build_task("semantic", num_classes=3).loss(torch.zeros(1, 3, 2, 2), torch.zeros(1, 2, 2))


def test_normal_activation_is_unit_length():
    out = build_task("normal").activate(torch.randn(2, 3, 4, 4))
    assert torch.allclose(out.norm(dim=1), torch.ones(2, 4, 4), atol=1e-6)


# ---------------------------------------------------------------- drawings


def _check_image(img, shape):
    assert isinstance(img, np.ndarray) and img.dtype == np.uint8 and img.shape == (*shape, 3)


def test_semantic_drawing_blacks_out_ignore_only():
    spec = build_task("semantic", num_classes=4)
    target = torch.tensor([[0, 1, -1], [2, 3, 0]])
    logits = F.one_hot(torch.tensor([[0, 1, 2], [2, 3, 3]]), 4).permute(2, 0, 1).float()
    pred_img, gt_img = spec.visualize(logits, target)
    _check_image(pred_img, (2, 3))
    _check_image(gt_img, (2, 3))
    black = (gt_img == 0).all(-1)
    assert black.tolist() == [[False, False, True], [False, False, False]]
    assert not (pred_img == 0).all(-1).any()  # the prediction is drawn everywhere
    assert (gt_img[0, 0] == gt_img[1, 2]).all() and (gt_img[0, 0] != gt_img[0, 1]).any()
    assert (pred_img[1, 0] == gt_img[1, 0]).all()  # same class, same colour
    masked, _ = spec.visualize(logits, target, mask_invalid=True)
    assert (masked == 0).all(-1).tolist() == black.tolist()


def test_depth_drawing_shares_the_range():
    spec = build_task("depth")
    gt = torch.tensor([[[1.0, 0.0, 3.0], [2.0, 5.0, 3.0]]])
    pred = torch.tensor([[[1.0, 9.0, 3.0], [0.0, 5.0, 2.0]]])
    pred_img, gt_img = spec.visualize(pred, gt)
    _check_image(pred_img, (2, 3))
    assert (gt_img[0, 1] == 0).all() and not (gt_img.reshape(-1, 3)[[0, 2, 3, 4, 5]] == 0).all(
        -1
    ).any()
    # Same value, same colour in both pictures; out-of-range predictions are clipped.
    assert (pred_img[0, 0] == gt_img[0, 0]).all() and (pred_img[0, 2] == gt_img[0, 2]).all()
    assert (pred_img[1, 2] == gt_img[1, 0]).all()  # 2.0 in both
    assert (pred_img[0, 1] == gt_img[1, 1]).all()  # 9 clipped to the max 5
    assert (pred_img[1, 0] == gt_img[0, 0]).all()  # 0 clipped to the min 1


def test_normal_drawing_formula_and_invalid():
    spec = build_task("normal")
    gt = torch.zeros(3, 1, 2)
    gt[:, 0, 0] = torch.tensor([0.0, 0.6, 0.8])
    pred = torch.zeros(3, 1, 2)
    pred[:, 0, 0] = torch.tensor([0.0, 0.0, 2.0])  # normalised to (0, 0, 1) before drawing
    pred[:, 0, 1] = torch.tensor([-1.0, 0.0, 0.0])
    pred_img, gt_img = spec.visualize(pred, gt)
    _check_image(gt_img, (1, 2))
    expected = np.round((np.array([0.0, 0.6, 0.8]) + 1) / 2 * 255)
    assert np.abs(gt_img[0, 0].astype(float) - expected).max() <= 1
    assert (gt_img[0, 1] == 0).all()
    assert np.abs(pred_img[0, 0].astype(float) - [127.5, 127.5, 255]).max() <= 1
    assert np.abs(pred_img[0, 1].astype(float) - [0, 127.5, 127.5]).max() <= 1


def test_saliency_drawing():
    spec = build_task("saliency")
    target = torch.tensor([[1, 0, -1]])
    logits = torch.tensor([[[0.0, 0.0, 0.0]], [[8.0, -8.0, 0.0]]])
    pred_img, gt_img = spec.visualize(logits, target)
    _check_image(pred_img, (1, 3))
    assert (gt_img == 0).all(-1).tolist() == [[False, False, True]]
    assert not (pred_img == 0).all(-1).any()
    # Confident predictions take the colours of the matching targets.
    assert np.abs(pred_img[0, 0].astype(int) - gt_img[0, 0]).max() <= 2
    assert np.abs(pred_img[0, 1].astype(int) - gt_img[0, 1]).max() <= 2
