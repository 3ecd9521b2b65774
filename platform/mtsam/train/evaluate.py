"""Evaluation over a (sharded) split with exact accumulation across batches and workers."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from mtsam.tasks import all_reduce_, delta_m


def autocast_for(device: torch.device, precision: str):
    """bf16 autocast on GPU when asked (``auto`` means bf16 on GPU), nothing on CPU."""
    if device.type == "cuda" and precision in ("auto", "bf16"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    tasks: Sequence[Any],
    *,
    device: torch.device,
    precision: str = "auto",
    stacked: bool = True,
) -> dict[str, dict[str, float]]:
    """Per-task metrics over every batch this worker sees, summed over all workers.

    ``tasks`` are task specs (``name``, ``new_accumulator()``); ``batches`` yield dicts with
    ``image`` (B, 3, H, W) and one target per task. When a process group is initialised the
    accumulators' sufficient statistics are all-reduced, so every rank returns the same
    metrics as a single process evaluating the whole split.
    """
    was_training = model.training
    model.eval()
    accs = {t.name: t.new_accumulator() for t in tasks}
    for batch in batches:
        images = batch["image"].to(device, non_blocking=True)
        with autocast_for(device, precision):
            out = model(images, stacked=stacked)
        for t in tasks:
            accs[t.name].update(out[t.name].float(), batch[t.name].to(device))
    all_reduce_(list(accs.values()))
    model.train(was_training)
    return {name: acc.compute() for name, acc in accs.items()}


def flat_metrics(
    results: Mapping[str, Mapping[str, float]],
    baseline: Mapping[str, Mapping[str, float]] | None,
    directions: Mapping[str, Mapping[str, bool]],
    *,
    prefix: str = "val",
) -> dict[str, float]:
    """{task: {metric: v}} -> {"val/<task>/<metric>": v, "val/delta_m": ...}.

    delta_m is reported only when a baseline covers every task.
    """
    out = {f"{prefix}/{t}/{m}": float(v) for t, ms in results.items() for m, v in ms.items()}
    if baseline and set(baseline) >= set(results):
        subset = {t: {m: results[t][m] for m in baseline[t]} for t in results}
        out[f"{prefix}/delta_m"] = float(delta_m(subset, baseline, directions))
    return out
