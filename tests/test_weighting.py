"""Task weighting strategies against LibMTL's own implementations (the ``libmtl`` wheel, 1.1.5),
on a small shared-encoder model: the same weights and the same combined gradient. Two real gloo
ranks with b images each must give what one process gives with all 2b images. Then the config
and search-space side, and a short run of the training loop with each strategy.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import random
import sys
import types

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from gloo import free_port, gloo_rank
from mtsam.config import ConfigError, build_config
from mtsam.train.loop import _mean_across_workers
from mtsam.train.weighting import (
    WEIGHTINGS,
    DWAWeighting,
    UncertaintyWeighting,
    WeightingOptions,
    build_weighting,
)

TASKS = ("semantic", "depth", "normal")
EQUAL = {t: 1 / 3 for t in TASKS}


def libmtl(name: str):
    """``LibMTL.weighting.<name>``'s class. LibMTL's package ``__init__`` imports its ResNet
    models, which need a torchvision API removed since; the weighting modules need only torch
    and numpy, so the two packages are registered without running their ``__init__``."""
    if "LibMTL.weighting" not in sys.modules:
        spec = importlib.util.find_spec("LibMTL")
        if spec is None:
            message = "libmtl is not installed (pip install --no-deps 'libmtl==1.1.5')"
            if os.environ.get("CI") == "true":
                pytest.fail(message)
            pytest.skip(message)
        root = spec.submodule_search_locations[0]
        for pkg, path in (("LibMTL", root), ("LibMTL.weighting", os.path.join(root, "weighting"))):
            module = types.ModuleType(pkg)
            module.__path__ = [path]
            sys.modules[pkg] = module
    return getattr(importlib.import_module(f"LibMTL.weighting.{name}"), name)


class Net(nn.Module):
    """A shared encoder and one head per task (LibMTL's hard parameter sharing)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(6, 2) for _ in TASKS)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        z = self.encoder(x)
        return [h(z) for h in self.heads]


def data(n: int = 8, seed: int = 1) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    # Targets pulling the shared encoder in different directions, so that gradients conflict.
    ys = [torch.randn(n, 2, generator=g) * s for s in (1.0, -2.0, 3.0)]
    return x, ys


def task_losses(net: nn.Module, x, ys) -> list[torch.Tensor]:
    return [((p - y) ** 2).mean() for p, y in zip(net(x), ys, strict=True)]


def reference(name: str, net: Net, **attrs):
    """A LibMTL weighting bound to ``net`` as LibMTL's trainer binds it (``rep_grad`` off)."""
    ref = libmtl(name)()
    ref.task_num, ref.task_name = len(TASKS), list(TASKS)
    ref.device, ref.rep_grad = torch.device("cpu"), False
    ref.get_share_params = net.encoder.parameters
    ref.zero_grad_share_params = lambda: net.encoder.zero_grad(set_to_none=False)
    for k, v in attrs.items():
        setattr(ref, k, v)
    ref.init_param()
    return ref


def grads(net: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in net.parameters()]


def ours(kind: str, net: Net, task_weights=EQUAL, **opts):
    return build_weighting(
        kind,
        TASKS,
        task_weights=task_weights,
        options=WeightingOptions(
            params=list(net.parameters()), shared=list(net.encoder.parameters()), **opts
        ),
    )


ONES = dict.fromkeys(TASKS, 1.0)


def test_fixed_is_libmtl_equal_weighting_over_the_task_count():
    x, ys = data()
    net = Net()
    reference("EW", net).backward(torch.stack(task_losses(net, x, ys)))
    want = grads(net)
    net.zero_grad()
    w = ours("fixed", net)
    assert w.current() == pytest.approx(EQUAL)  # fixed weights sum to 1, EW's to T
    w.combine(dict(zip(TASKS, task_losses(net, x, ys), strict=True)), ONES).backward()
    for g, e in zip(grads(net), want, strict=True):
        torch.testing.assert_close(g * len(TASKS), e)


def test_dwa_weights_and_gradient_equal_libmtl():
    x, ys = data()
    epoch_losses = np.array([[2.0, 1.0, 0.5], [1.5, 0.9, 0.6], [0.9, 0.9, 0.3], [0.8, 1.2, 0.2]])
    w = ours("dwa", Net())
    for epoch in range(len(epoch_losses)):
        net = Net()
        ref = reference("DWA", net, epoch=epoch, train_loss_buffer=epoch_losses.T.copy())
        want_w = ref.backward(torch.stack(task_losses(net, x, ys)), T=2.0)
        want = grads(net)
        net.zero_grad()
        assert list(w.current().values()) == pytest.approx(list(want_w), rel=1e-6)
        w.combine(dict(zip(TASKS, task_losses(net, x, ys), strict=True)), ONES).backward()
        for g, e in zip(grads(net), want, strict=True):
            torch.testing.assert_close(g, e)
        w.end_epoch(dict(zip(TASKS, epoch_losses[epoch].tolist(), strict=True)))
    assert w.current()["normal"] < 1 < w.current()["depth"]  # the stalled task weighs more
    # A resumed run continues from the checkpoint's last two epochs.
    again = ours("dwa", Net())
    again.import_state(w.export_state())
    assert again.current() == w.current()


def test_uncertainty_gradients_equal_libmtl_and_its_state_round_trips():
    x, ys = data()
    net = Net()
    ref = reference("UW", net)
    want_w = ref.backward(torch.stack(task_losses(net, x, ys)))
    want, want_s = grads(net), ref.loss_scale.grad.clone()
    net.zero_grad()
    w = ours("uncertainty", net)
    assert isinstance(w, UncertaintyWeighting)
    assert [p is w.log_var for p in w.parameters()] == [True]  # what the optimiser gets
    assert list(w.current().values()) == pytest.approx(list(want_w))
    w.combine(dict(zip(TASKS, task_losses(net, x, ys), strict=True)), ONES).backward()
    for g, e in zip(grads(net), want, strict=True):
        torch.testing.assert_close(g, e)
    torch.testing.assert_close(w.log_var.grad, want_s)
    # Trained values travel through a checkpoint's JSON.
    with torch.no_grad():
        w.log_var.add_(torch.tensor([0.1, -0.2, 0.3]))
    again = ours("uncertainty", Net())
    again.import_state(w.export_state())
    assert torch.equal(again.log_var, w.log_var)
    with pytest.raises(ValueError, match="2 log variances"):
        again.import_state({"log_var": [0.0, 0.0]})


def test_pcgrad_gradient_equals_libmtl():
    x, ys = data()
    net = Net()
    random.seed(3)
    want_w = reference("PCGrad", net).backward(torch.stack(task_losses(net, x, ys)))
    want = grads(net)
    net.zero_grad()
    w = ours("pcgrad", net)
    w.accumulate(dict(zip(TASKS, task_losses(net, x, ys), strict=True)), ONES)
    w.finish_step(rng=random.Random(3))
    assert any(abs(v - 1) > 1e-3 for v in want_w)  # some gradients did conflict
    for g, e in zip(grads(net), want, strict=True):
        torch.testing.assert_close(g, e)
    assert list(w.epoch_weights().values()) == pytest.approx(list(want_w), rel=1e-5)


def test_task_weights_are_a_prior_of_mean_one_for_the_adaptive_strategies():
    prior = {"semantic": 1 / 6, "depth": 1 / 6, "normal": 4 / 6}
    dwa = build_weighting("dwa", TASKS, task_weights=prior)
    assert dwa.current() == pytest.approx({"semantic": 0.5, "depth": 0.5, "normal": 2.0})
    assert build_weighting("fixed", TASKS, task_weights=prior).current() == pytest.approx(prior)
    assert isinstance(dwa, DWAWeighting) and set(WEIGHTINGS) == {
        "fixed",
        "dwa",
        "uncertainty",
        "pcgrad",
    }
    with pytest.raises(ValueError, match=r"train\.weighting = 'gradnorm'"):
        build_weighting("gradnorm", TASKS, task_weights=EQUAL)


# ---------------------------------------------------------------- two data-parallel ranks


def _step(kind: str, net: nn.Module, module: Net, parts, world: int, step: int = 5):
    """One step of ``kind`` over micro-batch ``parts`` as the loop runs it; returns
    (parameter gradients, the strategy's own gradients)."""
    w = ours(kind, module, seed=7)
    if kind == "dwa":  # two epochs seen: weights no longer all 1
        w.end_epoch(dict(zip(TASKS, [1.0, 2.0, 3.0], strict=True)))
        w.end_epoch(dict(zip(TASKS, [0.5, 2.5, 3.0], strict=True)))
    for x, ys in parts:
        losses = dict(
            zip(TASKS, task_losses(module if w.gradient_level else net, x, ys), strict=True)
        )
        scales = dict.fromkeys(TASKS, 1.0 / len(parts))
        if w.gradient_level:
            w.accumulate(losses, scales)
        else:
            w.combine(losses, scales, share=1.0 / len(parts)).backward()
    w.finish_step(world, step)
    return grads(module), [p.grad.clone() for p in w.parameters()]


def _gloo_worker(rank: int, port: int, out_dir: str, cfg) -> None:
    import mtsam.train.loop as loop

    trainable: list[torch.Tensor] = []
    real_build = loop.build_weighting

    def build(*args, **kwargs):  # keep a handle on the model's trainable parameters
        trainable.extend(kwargs["options"].params)
        return real_build(*args, **kwargs)

    loop.build_weighting = build
    with gloo_rank(rank, port) as ctx:
        x, ys = data(8)
        lo, hi = (0, 4) if rank == 0 else (4, 8)
        shard = (x[lo:hi], [y[lo:hi] for y in ys])
        out = {}
        for kind in WEIGHTINGS:
            module = Net()
            net = DistributedDataParallel(module)
            out[kind] = _step(kind, net, module, [shard], ctx.world_size)
        # DWA's epoch losses are the loop's per-rank means reduced over ranks.
        local = {t: v.item() for t, v in zip(TASKS, task_losses(Net(), *shard), strict=True)}
        out["epoch_losses"] = _mean_across_workers(local, ctx)
        # The loop's own PCGrad path (it bypasses DDP and all-reduces per-task gradients).
        loop.fit(cfg, ctx, log=lambda *_: None)
        out["fit"] = [p.detach().clone() for p in trainable]
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))


def test_two_gloo_ranks_equal_one_process_with_the_whole_batch(tmp_path):
    from mtsam.train.loop import data_root

    cfg = _tiny_run(tmp_path / "run", "pcgrad", "train.epochs=1", "train.max_steps_per_epoch=1")
    data_root(cfg)  # generate the scenes once, before the ranks read them
    mp.spawn(_gloo_worker, args=(free_port(), str(tmp_path), cfg), nprocs=2, join=True)
    x, ys = data(8)
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for kind in WEIGHTINGS:
        module = Net()
        want, want_own = _step(kind, module, module, [(x, ys)], 1)
        for rank in got:
            g, own = rank[kind]
            for a, b in zip(g + own, want + want_own, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=kind)
    whole = [v.item() for v in task_losses(Net(), x, ys)]
    # The loop's PCGrad step left the model the same on both ranks.
    assert all(torch.equal(a, b) for a, b in zip(got[0]["fit"], got[1]["fit"], strict=True))
    for rank in got:  # equal shards: the mean of the ranks' means is the whole batch's mean
        assert list(rank["epoch_losses"].values()) == pytest.approx(
            [whole[TASKS.index(t)] for t in rank["epoch_losses"]]
        )


def test_two_micro_batches_equal_one_batch():
    x, ys = data(8)
    halves = [(x[:4], [y[:4] for y in ys]), (x[4:], [y[4:] for y in ys])]
    for kind in WEIGHTINGS:
        a, b = Net(), Net()
        want, want_own = _step(kind, a, a, [(x, ys)], 1)
        got, got_own = _step(kind, b, b, halves, 1)
        for g, e in zip(got + got_own, want + want_own, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7, msg=kind)


# ---------------------------------------------------------------- config and search space


def test_weighting_is_a_config_choice_and_a_search_space_choice():
    from ray import tune

    from mtsam.tune.driver import apply_sample
    from mtsam.tune.space import tune_space

    cfg = build_config(
        {}, ["tune.space.train.weighting={type: choice, values: [fixed, dwa, uncertainty, pcgrad]}"]
    )
    assert cfg.train.weighting == "fixed" and cfg.data.eval_protocol == "pooled"
    domain = tune_space(cfg.tune.space)["train.weighting"]
    assert isinstance(domain, tune.search.sample.Categorical)
    sampled = {domain.sample(random_state=np.random.default_rng(s)) for s in range(40)}
    assert sampled == {"fixed", "dwa", "uncertainty", "pcgrad"}
    trial = apply_sample(cfg.to_dict() | {"tune": {}}, {"train.weighting": np.str_("dwa")})
    assert trial.train.weighting == "dwa"
    with pytest.raises(ConfigError, match=r"tune\.space\.train\.weighting: value 'gradnorm'"):
        build_config({}, ["tune.space.train.weighting={type: choice, values: [dwa, gradnorm]}"])
    with pytest.raises(ConfigError, match=r"train\.weighting = 'ew'"):
        build_config({}, ["train.weighting=ew"])
    with pytest.raises(ConfigError, match=r"data\.eval_protocol = 'image'"):
        build_config({}, ["data.eval_protocol=image"])


# ---------------------------------------------------------------- the training loop


def _tiny_run(out, kind: str, *extra: str):
    """A few steps of tiny mSAM + ToRA on 8 generated 32 x 32 scenes, batch 2."""
    return build_config(
        {},
        [
            "tracking.enabled=false",
            f"output_dir={out}",
            "data.scenes.num_train=8",
            "data.scenes.num_val=2",
            "data.scenes.height=32",
            "data.scenes.width=32",
            "data.eval_protocol=per_image",
            "train.batch_size=2",
            "train.max_steps_per_epoch=2",
            "train.epochs=3",
            "train.vis_samples=0",
            f"train.weighting={kind}",
            *extra,
        ],
    )


@pytest.mark.parametrize("kind", ["dwa", "uncertainty", "pcgrad"])
def test_fit_logs_the_weights_and_checkpoints_the_strategy(kind, tmp_path):
    from mtsam.train.context import local_context
    from mtsam.train.loop import fit
    from mtsam.train.state import load_train_state

    torch.set_num_threads(1)
    cfg = _tiny_run(tmp_path, kind)
    ctx = local_context(tmp_path / "ckpt")
    fit(cfg, ctx, log=lambda *_: None)
    reports = ctx.reports
    weights = [[r[f"train/weight/{t}"] for t in TASKS] for r in reports]
    assert len(weights) == 3 and all(math.isfinite(v) for row in weights for v in row)
    if kind == "dwa":  # equal for two epochs, then from the loss ratios (summing to T)
        assert weights[0] == weights[1] == [1.0, 1.0, 1.0]
        assert sum(weights[2]) == pytest.approx(3.0) and weights[2] != [1.0, 1.0, 1.0]
    if kind == "uncertainty":  # trained by the optimiser from 1 / (2 exp(-0.5))
        assert weights[0] != weights[1] != weights[2]
        assert abs(weights[0][0] - 1 / (2 * math.exp(-0.5))) < 0.05
    saved = load_train_state(tmp_path / "ckpt" / "checkpoint_0002")["extra"]["weighting"]
    assert list(saved) == {"dwa": ["history"], "uncertainty": ["log_var"], "pcgrad": []}[kind]
    if kind != "pcgrad":
        # Resumed after epoch 2, the last epoch runs with the weights the whole run had.
        again = local_context(resume=tmp_path / "ckpt" / "checkpoint_0002")
        fit(cfg, again, log=lambda *_: None)
        assert [again.reports[-1][f"train/weight/{t}"] for t in TASKS] == weights[2]
