"""The per-worker training loop (Ray Train's ``train_loop_per_worker``, or a bare process).

One epoch: sharded batches -> stacked T-task forward -> weighted per-task losses + the
adapter's extra loss -> backward into the trainable set (DDP all-reduces gradients) ->
clip, step, schedule. Then the whole validation split is evaluated with exact metric
accumulation across workers, rank 0 writes a checkpoint, and every rank reports.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from mtsam.adapters import AdapterSpec, extra_losses
from mtsam.adapters.io import save_adapter
from mtsam.config import ExperimentConfig
from mtsam.model.msam import MSAM, build_msam, hold_frozen_in
from mtsam.storage import is_uri
from mtsam.tasks import build_tasks, task_metric_directions
from mtsam.train.context import WorkerContext, scratch_dir
from mtsam.train.data import eval_loader, open_split, scenes_root, train_loader
from mtsam.train.evaluate import autocast_for, evaluate, flat_metrics
from mtsam.train.parallel import data_parallel
from mtsam.train.schedule import build_scheduler
from mtsam.train.state import load_train_state, save_train_state, set_rng_state
from mtsam.train.weighting import WeightingOptions, build_weighting

# Fault injection for tests: "<step>:<task>" makes that task's loss NaN at that global step.
FAULT_NAN_ENV = "MTSAM_FAULT_NAN_STEP"


class NonFiniteLossError(RuntimeError):
    """A loss or gradient became NaN/inf; the message names the task and the step."""


class LoopObserver(Protocol):
    """Rank 0's hooks (experiment tracking). Every method must be cheap and never raise."""

    def on_start(self, model: MSAM, param_counts: Mapping[str, tuple[int, int]]) -> None: ...

    def on_epoch(
        self,
        epoch: int,
        metrics: Mapping[str, float],
        *,
        pictures: Mapping[str, Any] | None,
        adapter_dir: Path | None,
    ) -> None: ...

    def on_end(self, status: str, message: str = "") -> None: ...

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state saved in each checkpoint (after that epoch's ``on_epoch``)."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict()`` of the checkpoint a run resumes from."""
        ...


@dataclass
class BaseWeights:
    """SAM base weights already read (e.g. from Ray's object store), with their fingerprint."""

    state: Mapping[str, torch.Tensor]
    fingerprint: str


def adapter_spec_of(cfg: ExperimentConfig) -> AdapterSpec | None:
    a = cfg.adapter
    if a.method == "none":
        return None
    return AdapterSpec(**a.model_dump(exclude={"orth_weight"}))


def build_model(cfg: ExperimentConfig, *, tasks: Sequence[Any], base: BaseWeights | None) -> MSAM:
    """mSAM for a config: base weights from ``base``, else the checkpoint path, else random."""
    channels = [(t.name, t.channels) for t in tasks]
    model = build_msam(
        cfg.model.preset,
        channels,
        checkpoint=None if base is not None else cfg.model.checkpoint,
        base_state=None if base is None else (base.state, base.fingerprint),
        adapter=adapter_spec_of(cfg),
        seed=cfg.seed,
    )
    if cfg.model.attention == "sdpa":
        from mtsam.model.attention import use_sdpa_attention

        use_sdpa_attention(model.image_encoder)
    return model


def data_root(cfg: ExperimentConfig) -> Path | str:
    d = cfg.data
    if d.dataset != "scenes" or d.format == "shards":
        if d.root and is_uri(d.root):
            return d.root  # shards on s3:// / gs://, read in place
        return Path(d.root or "")
    cache = Path(d.root) if d.root else Path(cfg.output_dir) / "cache" / "scenes"
    s = d.scenes
    return scenes_root(
        cache, num_train=s.num_train, num_val=s.num_val, height=s.height, width=s.width, seed=s.seed
    )


@dataclass
class EpochStats:
    losses: dict[str, float] = field(default_factory=dict)
    step_time_s: float = 0.0
    images_per_s: float = 0.0
    steps: int = 0
    lr: float = 0.0  # the learning rate the epoch's last optimizer step used


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Seed torch's RNG for one epoch of one rank from (seed, epoch, rank).

    The training steps draw from it (branch-dropout masks, Conv-LoRA's gate noise). Every rank
    is seeded alike to build the same model; without this, data-parallel ranks would then draw
    the same masks for their different samples. Seeding per epoch also makes a resumed run
    draw what the uninterrupted one did, whichever rank's RNG state the checkpoint saved.
    """
    words = np.random.SeedSequence([seed % 2**64, epoch, rank]).generate_state(2, np.uint32)
    torch.manual_seed(int(words[0]) << 32 | int(words[1]))


def _fault_step() -> tuple[int, str] | None:
    raw = os.environ.get(FAULT_NAN_ENV)
    if not raw:
        return None
    step, _, task = raw.partition(":")
    return int(step), task


def fit(
    cfg: ExperimentConfig,
    ctx: WorkerContext,
    *,
    base: BaseWeights | None = None,
    observer: LoopObserver | None = None,
    log=print,
) -> dict[str, float]:
    """Train ``cfg`` on this worker; returns the last reported metrics (all ranks)."""
    torch.manual_seed(cfg.seed)
    device = ctx.device
    t_cfg = cfg.train
    tasks = build_tasks(
        cfg.data.tasks, num_classes=cfg.data.classes, protocol=cfg.data.eval_protocol
    )
    directions = task_metric_directions(tasks)

    model = build_model(cfg, tasks=tasks, base=base)
    if cfg.model.base_dtype == "bfloat16":
        hold_frozen_in(model, torch.bfloat16)
    model.activation_checkpointing = t_cfg.activation_checkpointing
    model.to(device)
    params = [p for _, p in model.trainable_named_parameters()]
    shared = {id(p) for p in model.image_encoder.parameters()}  # PCGrad's shared parameters
    weighting = build_weighting(
        t_cfg.weighting,
        cfg.data.tasks,
        task_weights=cfg.weights(),
        options=WeightingOptions(
            dwa_temperature=t_cfg.dwa_temperature,
            params=params,
            shared=[p for p in params if id(p) in shared],
            seed=cfg.seed,
        ),
    ).to(device)
    net: nn.Module = model
    if ctx.world_size > 1:
        net = data_parallel(model, device)  # finds unused tensors only for methods that skip some

    root = data_root(cfg)
    common = {
        "fmt": cfg.data.format,
        "tasks": cfg.data.tasks,
        "num_classes": cfg.data.classes,
        "seed": cfg.seed,
    }
    train_ds = open_split(cfg.data.dataset, root, "train", augment=cfg.data.augment, **common)
    val_ds = open_split(cfg.data.dataset, root, "val", augment=False, **common)
    loader, sampler = train_loader(
        train_ds,
        batch_size=t_cfg.batch_size,
        rank=ctx.rank,
        world_size=ctx.world_size,
        seed=cfg.seed,
        workers=cfg.data.loader_workers,
    )
    val_loader = eval_loader(
        val_ds,
        batch_size=t_cfg.batch_size,
        rank=ctx.rank,
        world_size=ctx.world_size,
        workers=cfg.data.loader_workers,
    )
    if ctx.is_main:
        log(f"data: {root} ({len(train_ds)} train, {len(val_ds)} val samples)")
    micro_per_epoch = len(loader)
    steps_per_epoch = micro_per_epoch // t_cfg.grad_accum
    if t_cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, t_cfg.max_steps_per_epoch)
    if steps_per_epoch < 1:
        raise ValueError(
            f"train.batch_size={t_cfg.batch_size} x grad_accum={t_cfg.grad_accum} x "
            f"{ctx.world_size} workers exceeds the {len(train_ds)} training samples"
        )

    opt_cls = torch.optim.AdamW if t_cfg.optimizer == "adamw" else torch.optim.Adam
    optimizer = opt_cls(
        params + list(weighting.parameters()),  # uncertainty's log variances train too
        lr=t_cfg.lr,
        weight_decay=t_cfg.weight_decay,
        fused=device.type == "cuda" or None,
    )
    scheduler = build_scheduler(
        optimizer,
        total_steps=steps_per_epoch * t_cfg.epochs,
        warmup_frac=t_cfg.warmup_frac,
        kind=t_cfg.schedule,
    )

    start_epoch, step = 0, 0
    final_metrics: dict[str, float] = {}
    with ctx.resume_from() as ckpt_dir:
        if ckpt_dir is not None:
            state = load_train_state(ckpt_dir)
            model.load_trainable_state_dict(state["trainable"], source=str(ckpt_dir))
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            start_epoch, step = state["epoch"] + 1, state["step"]
            set_rng_state(state["rng"])
            weighting.import_state(state["extra"].get("weighting") or {})
            final_metrics = state["extra"].get("metrics") or {}
            if observer is not None and ctx.is_main:
                observer.load_state_dict(state["extra"].get("observer") or {})
            if ctx.is_main:
                log(f"resumed from {ckpt_dir} after epoch {state['epoch'] + 1}")

    log(
        f"worker rank {ctx.rank}/{ctx.world_size} on node {ctx.node_id} (pid {os.getpid()}); "
        f"base weights: {'object store' if base is not None else cfg.model.checkpoint or 'random'}"
    )
    if ctx.is_main:
        counts = model.parameter_counts()
        log(
            f"mSAM {cfg.model.preset} + {cfg.adapter.method}: "
            f"{counts['all'][0]:,} trainable of {counts['all'][1]:,} parameters; "
            f"{len(train_ds)} train / {len(val_ds)} val samples; {ctx.world_size} worker(s) "
            f"on {device}; mtsam from {Path(__file__).resolve().parents[1]}"
        )
        if observer is not None:
            observer.on_start(model, counts)

    if start_epoch >= t_cfg.epochs and final_metrics:
        # A finished run restarted (e.g. a sweep resumed from a snapshot taken just before
        # the trial ended): report its final metrics again so Tune records the result.
        if ctx.is_main:
            log(f"run already complete ({t_cfg.epochs} epochs): reporting its final metrics")
            if observer is not None:  # its tracker reopened the finished MLflow run: end it
                observer.on_end("FINISHED")
        ctx.report(dict(final_metrics), None)
        return dict(final_metrics)
    fault = _fault_step()
    n_trainable = sum(p.numel() for p in params)
    n_adapter = model.parameter_counts()["adapters"][0]  # the adapters' share (a sweep objective)
    metrics: dict[str, float] = {}
    for epoch in range(start_epoch, t_cfg.epochs):
        seed_epoch(cfg.seed, epoch, ctx.rank)
        sampler.set_epoch(epoch)
        if hasattr(train_ds, "set_epoch"):
            train_ds.set_epoch(epoch)
        net.train()
        stats, step, failure = _train_epoch(
            net,
            model,
            loader,
            tasks,
            weighting,
            optimizer,
            scheduler,
            cfg=cfg,
            ctx=ctx,
            epoch=epoch,
            step=step,
            steps_per_epoch=steps_per_epoch,
            fault=fault,
            log=log,
        )
        if failure:
            if ctx.is_main:
                log(f"error: {failure}")
                if observer is not None:
                    observer.on_end("FAILED", failure)
            ctx.report({"epoch": epoch + 1, "error": failure}, None)
            raise NonFiniteLossError(failure)

        results = evaluate(
            model,
            val_loader,
            tasks,
            device=device,
            precision=t_cfg.precision,
            stacked=t_cfg.stacked,
        )
        metrics = flat_metrics(results, cfg.data.baseline_table() or None, directions)
        for k, v in stats.losses.items():  # train/loss/<task>, train/loss/total, train/orth_reg
            metrics[f"train/{k}" if k in ("orth_reg", "balance") else f"train/loss/{k}"] = v
        metrics.update({f"train/weight/{n}": w for n, w in weighting.epoch_weights().items()})
        weighting.end_epoch({t.name: stats.losses[t.name] for t in tasks})  # reduced over ranks
        metrics.update(
            {
                "train/step_time_s": stats.step_time_s,
                "train/images_per_s": stats.images_per_s,
                "train/lr": stats.lr,
                "trainable_params": n_trainable,
                "adapter_params": n_adapter,
                "epoch": epoch + 1,
            }
        )
        report = (cfg, ctx, model, optimizer, scheduler, epoch, step, metrics, val_ds, tasks)
        _report_epoch(*report, observer, more={"weighting": weighting.export_state()})
        if ctx.is_main:
            log(_epoch_line(epoch, t_cfg.epochs, metrics))
    if ctx.is_main and observer is not None:
        observer.on_end("FINISHED")
    return metrics


def _train_epoch(
    net,
    model,
    loader,
    tasks,
    weighting,
    optimizer,
    scheduler,
    *,
    cfg,
    ctx,
    epoch,
    step,
    steps_per_epoch,
    fault,
    log,
) -> tuple[EpochStats, int, str | None]:
    t_cfg = cfg.train
    device = ctx.device
    sums = {t.name: 0.0 for t in tasks} | {"total": 0.0, "orth_reg": 0.0, "balance": 0.0}
    n_steps, images, busy = 0, 0, 0.0
    local_loss = 0.0  # this worker's own mean loss, for the progress line only
    lr = optimizer.param_groups[0]["lr"]
    it = iter(loader)
    for s in range(steps_per_epoch):
        t0 = time.perf_counter()
        local_bad: list[str] = []
        micro_batches = [next(it) for _ in range(t_cfg.grad_accum)]
        pixel_weights = step_pixel_weights(tasks, micro_batches, ctx)
        for micro, batch in enumerate(micro_batches):
            x = batch["image"].to(device, non_blocking=True)
            last = micro == t_cfg.grad_accum - 1
            # A gradient-level weighting (pcgrad) reduces its per-task gradients itself.
            fwd = model if weighting.gradient_level else net
            sync = net.no_sync() if (ctx.world_size > 1 and not last) else nullcontext()
            with sync:
                with autocast_for(device, t_cfg.precision):
                    # The adapters' per-forward terms (Conv-LoRA's balancing) come out of the
                    # (wrapped) forward, so that DDP sees the tensors they reach.
                    out, aux = fwd(x, stacked=t_cfg.stacked, return_aux=True)
                    extra = extra_losses(model, aux, orth_weight=cfg.adapter.orth_weight)
                per_task = {
                    t.name: t.loss(out[t.name].float(), batch[t.name].to(device)) for t in tasks
                }
                if fault is not None and fault[0] == step and fault[1] in per_task:
                    per_task[fault[1]] = per_task[fault[1]] * float("nan")
                # Each task's mean, weighted to its share of the step's valid pixels (over
                # micro-batches and workers): DDP's average of the workers' gradients is then
                # the gradient of the mean over every valid pixel of the step.
                pw = pixel_weights[micro]
                share = 1.0 / t_cfg.grad_accum
                total = weighting.combine(per_task, pw, share) + extra["total"] * share
                if weighting.gradient_level:
                    weighting.accumulate(per_task, pw, extra["total"] * share)
                else:
                    total.backward()
            values = {n: v.item() for n, v in per_task.items()}
            local_bad += [n for n, value in values.items() if not math.isfinite(value)]
            for n, value in values.items():
                sums[n] += value * pw[n]
            sums["total"] += total.item()
            weights = weighting.current()
            local_loss += (
                sum(weights[n] * value for n, value in values.items()) + extra["total"].item()
            ) / t_cfg.grad_accum
            sums["orth_reg"] += extra["orth_reg"].detach().item() / t_cfg.grad_accum
            sums["balance"] += extra["balance"].detach().item() / t_cfg.grad_accum
            images += x.shape[0]
        weighting.finish_step(ctx.world_size, step)
        with_grad = [p for p in model.parameters() if p.grad is not None]
        norm = (
            torch.nn.utils.clip_grad_norm_(with_grad, t_cfg.grad_clip)
            if t_cfg.grad_clip
            else torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in with_grad]))
        )
        failure = _agree_on_failure(tasks, local_bad, norm, ctx, step)
        if failure:
            optimizer.zero_grad(set_to_none=True)
            return EpochStats(), step, failure
        lr = optimizer.param_groups[0]["lr"]  # the scheduler has set this step's value
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step += 1
        n_steps += 1
        dt = time.perf_counter() - t0
        if s > 0 or steps_per_epoch == 1:  # the first step pays warm-up costs
            busy += dt
        if ctx.is_main and t_cfg.log_every and (s + 1) % t_cfg.log_every == 0:
            log(
                f"  epoch {epoch + 1} step {s + 1}/{steps_per_epoch} "
                f"loss {local_loss / n_steps:.4f} {dt:.3f} s/step "
                f"{x.shape[0] * t_cfg.grad_accum * ctx.world_size / dt:.1f} img/s"
            )
    timed = max(1, n_steps - 1) if steps_per_epoch > 1 else 1
    step_time = busy / timed
    per_step_images = images / max(1, n_steps) * ctx.world_size
    losses = _mean_across_workers({k: v / max(1, n_steps) for k, v in sums.items()}, ctx)
    return (
        EpochStats(
            losses=losses,
            step_time_s=step_time,
            images_per_s=per_step_images / step_time if step_time > 0 else 0.0,
            steps=n_steps,
            lr=lr,
        ),
        step,
        None,
    )


def step_pixel_weights(
    tasks: Sequence[Any], micro_batches: Sequence[Mapping[str, Any]], ctx: WorkerContext
) -> list[dict[str, float]]:
    """Per micro-batch and task: n_local * world_size / N_step, N_step = the task's valid pixels
    in the whole step (all micro-batches of all workers, one small all-reduce).

    A task loss is a mean over its batch's valid pixels; multiplied by this weight and summed
    over micro-batches, DDP's mean over workers of the gradients equals the gradient of the
    mean over all N_step pixels. Equal counts everywhere give 1 / grad_accum (1.0 without
    accumulation); a task with no valid pixel in the step gets weight 0 (its loss is 0 anyway).
    """
    local = torch.tensor(
        [[float(t.valid_pixels(b[t.name])) for t in tasks] for b in micro_batches],
        dtype=torch.float64,
    )
    totals = local.sum(dim=0)
    if ctx.world_size > 1 and dist.is_initialized():
        totals = totals.to(ctx.device) if dist.get_backend() == "nccl" else totals
        dist.all_reduce(totals)
        totals = totals.cpu()
    w = local * ctx.world_size / totals.clamp_min(1.0)
    return [{t.name: float(w[k, i]) for i, t in enumerate(tasks)} for k in range(len(local))]


def _agree_on_failure(tasks, local_bad, norm, ctx, step) -> str | None:
    """All ranks decide together whether this step failed (else some would hang in a collective)."""
    flags = torch.tensor(
        [1.0 if t.name in local_bad else 0.0 for t in tasks]
        + [0.0 if math.isfinite(float(norm)) else 1.0]
    )
    if ctx.world_size > 1 and dist.is_initialized():
        flags = flags.to(ctx.device) if dist.get_backend() == "nccl" else flags
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        flags = flags.cpu()
    bad = [t.name for t, f in zip(tasks, flags[:-1].tolist(), strict=True) if f > 0]
    if bad:
        return f"non-finite loss for task {bad[0]!r} at step {step} (tasks {bad})"
    if flags[-1] > 0:
        return f"non-finite gradient norm at step {step} (losses were finite)"
    return None


def _mean_across_workers(values: dict[str, float], ctx: WorkerContext) -> dict[str, float]:
    if ctx.world_size == 1 or not dist.is_initialized():
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.to(ctx.device)
    dist.all_reduce(t)
    return {k: float(v) / ctx.world_size for k, v in zip(keys, t.tolist(), strict=True)}


def _report_epoch(
    cfg, ctx, model, optimizer, scheduler, epoch, step, metrics, val_ds, tasks, observer, more=None
) -> None:
    if not ctx.is_main:
        ctx.report(metrics, None)
        return
    with scratch_dir() as d:
        save_adapter(model, d / "adapter", overwrite=True)
        extra: dict[str, Any] = {
            "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
            **(more or {}),  # e.g. the task weighting's state
        }
        if observer is not None:
            last = epoch + 1 == cfg.train.epochs
            pictures = None
            if cfg.train.vis_samples and ((epoch + 1) % cfg.train.vis_every == 0 or last):
                pictures = draw_predictions(
                    model,
                    val_ds,
                    tasks,
                    count=cfg.train.vis_samples,
                    device=ctx.device,
                    stacked=cfg.train.stacked,
                    precision=cfg.train.precision,
                )
            observer.on_epoch(epoch + 1, metrics, pictures=pictures, adapter_dir=d / "adapter")
            extra["observer"] = observer.state_dict()  # e.g. the best value its run holds
        save_train_state(
            d,
            trainable=model.trainable_state_dict(),
            optimizer=optimizer,
            scheduler=scheduler,
            epoch=epoch,
            step=step,
            config=cfg.to_dict(),
            extra=extra,
        )
        ctx.report(metrics, d)


@torch.no_grad()
def draw_predictions(
    model, dataset, tasks, *, count, device, stacked=True, precision="auto"
) -> dict[str, Any]:
    """{"sample<i>": {"image": (3,H,W) float, task: (pred_rgb, target_rgb)}} for the first
    ``count`` validation samples (a fixed set, the same every epoch), predicted under the
    training's autocast (a bf16 base needs it)."""
    was = model.training
    model.eval()
    out: dict[str, Any] = {}
    for i in range(min(count, len(dataset))):
        sample = dataset[i]
        with autocast_for(device, precision):
            pred = model(sample["image"].unsqueeze(0).to(device), stacked=stacked)
        entry: dict[str, Any] = {"image": sample["image"]}
        for t in tasks:
            entry[t.name] = t.visualize(pred[t.name][0].float().cpu(), sample[t.name])
        out[f"sample{int(sample.get('index', i))}"] = entry
    model.train(was)
    return out


def _epoch_line(epoch: int, epochs: int, m: Mapping[str, float]) -> str:
    val = " ".join(
        f"{k.removeprefix('val/')} {v:.4g}" for k, v in m.items() if k.startswith("val/")
    )
    return (
        f"[epoch {epoch + 1}/{epochs}] loss {m.get('train/loss/total', float('nan')):.4f} | "
        f"{val} | {m['train/step_time_s']:.3f} s/step {m['train/images_per_s']:.1f} img/s"
    )


def _worker_log(message: str) -> None:
    """One progress line from a Ray Train worker, shown once on the driver.

    Train V2 replaces ``print`` in its workers: a line printed to ``sys.stdout`` goes to the
    root logger, and also to the original print when ``sys.stdout`` has been wrapped (as it
    is in the workers), so each line reached the driver twice. Writing to the process's own
    stdout takes one of the two paths, whichever the worker has.
    """
    print(message, file=sys.__stdout__, flush=True)


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, str] | None:
    """Ray Train entry point. ``loop_config``: {"config": ExperimentConfig dict, "base": ...}.

    Returns {"error": message} after a NaN stop (Ray Train hands rank 0's return value to the
    driver as ``Result.return_value``), else None.
    """
    from mtsam.train.context import ray_context

    torch.set_num_threads(max(1, int(loop_config.get("threads", 1))))
    cfg = ExperimentConfig.model_validate(loop_config["config"])
    ctx = ray_context()
    base = None
    if loop_config.get("base_ref") is not None:
        import ray

        state = ray.get(loop_config["base_ref"])
        base = BaseWeights(state, loop_config["base_fingerprint"])
    observer = None
    if ctx.is_main and loop_config.get("tracking") is not None:
        from mtsam.tracking.observer import make_observer

        observer = make_observer(loop_config["tracking"], cfg)
    try:
        fit(cfg, ctx, base=base, observer=observer, log=_worker_log)
    except NonFiniteLossError as e:
        # Retrying from the last checkpoint would hit the same NaN, so end the run normally.
        # The "error" metric reaches Tune's callback, but Ray Train's Result.metrics holds only
        # checkpointed reports: the return value is how the driver learns of the failure.
        return {"error": str(e)}
    return None
