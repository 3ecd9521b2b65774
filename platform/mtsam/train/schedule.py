"""Learning-rate schedule: linear warm-up, then linear or cosine decay to 0 (or constant)."""

from __future__ import annotations

import math

import torch


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, kind: str) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based).

    Warm-up rises linearly from 1/(warmup+1) to 1 over ``warmup_steps`` steps; afterwards
    ``linear`` falls to 0 at ``total_steps``, ``cosine`` follows half a cosine to 0, and
    ``constant`` stays at 1.
    """
    if kind not in ("linear", "cosine", "constant"):
        raise ValueError(f"schedule: unknown kind {kind!r}; expected linear, cosine or constant")
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if kind == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_frac: float, kind: str
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` applying :func:`lr_factor`; step it once per optimizer step."""
    warmup = round(warmup_frac * total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_factor(s, total_steps=total_steps, warmup_steps=warmup, kind=kind),
    )
