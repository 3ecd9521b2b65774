"""Task weighting strategies: how a step's per-task losses become one gradient.

One small class per strategy, chosen by ``train.weighting`` through ``WEIGHTINGS``:

- ``fixed``: constant weights (``train.task_weights`` normalised to sum 1).
- ``dwa``: Dynamic Weight Average (Liu et al., MTAN, CVPR 2019). For epoch e >= 2 the weights
  are T * softmax_t(r_t / temperature), r_t = L_t(e-1) / L_t(e-2) the ratio of the task's
  mean training losses over the last two epochs (reduced over all data-parallel workers); 1
  for every task in the first two epochs.
- ``uncertainty``: homoscedastic uncertainty weighting (Kendall et al., CVPR 2018) in LibMTL's
  form: learnable log variances s_t (initialised to -0.5), loss sum_t L_t / (2 exp(s_t)) +
  s_t / 2, weights 1 / (2 exp(s_t)). The s_t are trained by the same optimiser as the model.
- ``pcgrad``: Projecting Conflicting Gradients (Yu et al., NeurIPS 2020) as LibMTL applies it:
  for each task i (in a random order of the others) its gradient of the shared parameters
  loses its component along every other task's gradient it conflicts with (negative dot
  product); the projected gradients are summed. Task-specific parameters get the plain sum.

Except ``fixed``, the strategies take ``train.task_weights`` as a fixed prior normalised to mean
1 (all 1 when equal or left out: then each method is exactly its published form).

The loop's use of a strategy ``w`` per step: for each micro-batch, ``w.combine(losses, scales,
share)`` is the loss to back-propagate (``w.accumulate(...)`` instead when
``w.gradient_level``); after the micro-batches ``w.finish_step(...)`` (averages its own
gradients over workers, or writes the combined gradient); after each epoch
``w.epoch_weights()`` (for ``train/weight/<task>``) then ``w.end_epoch(mean_losses)``.
``export_state`` / ``import_state`` carry what a resumed run needs (JSON-able).

Data-parallel exactness: ``scales`` are the loop's pixel weights (a task's share of the step's
valid pixels, times the worker count), so the mean over workers of sum_micro scale * L equals
the loss of the whole step. Loss-level strategies then need only DDP's gradient average (and
``uncertainty`` an average of its s_t gradients, done in ``finish_step``); ``pcgrad``
all-reduces each task's summed gradient before projecting, so 2 workers x b images give what
1 worker x 2b gives.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class WeightingOptions:
    """Settings some strategies need: DWA's temperature; PCGrad's parameters (all trainable
    ones, whose gradients it writes, and the shared subset it projects) and seed."""

    dwa_temperature: float = 2.0
    params: Sequence[nn.Parameter] = field(default_factory=tuple)
    shared: Sequence[nn.Parameter] = field(default_factory=tuple)
    seed: int = 0


class Weighting(nn.Module):
    """Base class: per-task weights times a fixed prior; subclasses set ``weights_now``."""

    #: Whether the strategy needs per-task gradients (``accumulate`` / ``finish_step``).
    gradient_level: ClassVar[bool] = False
    #: Whether ``train.task_weights`` enter as a prior of mean 1 (else as they are, sum 1).
    prior_mean_one: ClassVar[bool] = True

    @classmethod
    def from_options(
        cls, tasks: Sequence[str], prior: Mapping[str, float], opts: WeightingOptions
    ) -> Weighting:
        return cls(tasks, prior=prior)

    def __init__(self, tasks: Sequence[str], *, prior: Mapping[str, float]) -> None:
        super().__init__()
        self.tasks = tuple(tasks)
        self.prior = {t: float(prior[t]) for t in self.tasks}

    def weights_now(self) -> dict[str, torch.Tensor | float]:
        """The strategy's own weight per task (without the prior); tensors may carry grad."""
        return dict.fromkeys(self.tasks, 1.0)

    def regularizer(self) -> torch.Tensor | float:
        """A term added once per step (spread over micro-batches by ``share``)."""
        return 0.0

    def combine(
        self,
        losses: Mapping[str, torch.Tensor],
        scales: Mapping[str, float],
        share: float = 1.0,
    ) -> torch.Tensor:
        """sum_t prior_t * w_t * scale_t * L_t + share * regulariser: one micro-batch's loss."""
        w = self.weights_now()
        total = sum(self.prior[t] * w[t] * losses[t] * scales[t] for t in self.tasks)
        return total + share * self.regularizer()  # type: ignore[return-value]

    def current(self) -> dict[str, float]:
        """prior_t * w_t as plain floats."""
        now = self.weights_now()
        return {t: self.prior[t] * float(torch.as_tensor(w).detach()) for t, w in now.items()}

    def finish_step(self, world_size: int = 1, step: int = 0) -> None:
        """After a step's micro-batches: average this strategy's own gradients over workers."""
        own = [p for p in self.parameters() if p.grad is not None]
        if own and world_size > 1 and dist.is_initialized():
            flat = torch.cat([p.grad.reshape(-1) for p in own])
            flat = _all_reduce_mean(flat, world_size)
            offset = 0
            for p in own:
                p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
                offset += p.numel()

    def epoch_weights(self) -> dict[str, float]:
        """The weights the epoch used (logged as ``train/weight/<task>``)."""
        return self.current()

    def end_epoch(self, mean_losses: Mapping[str, float]) -> None:
        """An epoch ended with these per-task mean training losses (the same on every rank)."""

    def export_state(self) -> dict[str, Any]:
        """JSON-able state for a training checkpoint."""
        return {}

    def import_state(self, state: Mapping[str, Any]) -> None:
        """Restore ``export_state()``."""


class FixedWeighting(Weighting):
    """Constant weights: the prior itself (``train.task_weights`` normalised to sum 1)."""

    prior_mean_one: ClassVar[bool] = False


class DWAWeighting(Weighting):
    """Dynamic Weight Average; ``history`` holds each finished epoch's mean loss per task."""

    def __init__(
        self, tasks: Sequence[str], *, prior: Mapping[str, float], temperature: float = 2.0
    ) -> None:
        super().__init__(tasks, prior=prior)
        if not temperature > 0:
            raise ValueError(f"dwa: temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.history: list[list[float]] = []

    @classmethod
    def from_options(
        cls, tasks: Sequence[str], prior: Mapping[str, float], opts: WeightingOptions
    ) -> Weighting:
        return cls(tasks, prior=prior, temperature=opts.dwa_temperature)

    def weights_now(self) -> dict[str, torch.Tensor | float]:
        if len(self.history) < 2:
            return dict.fromkeys(self.tasks, 1.0)
        last = torch.tensor(self.history[-1], dtype=torch.float64)
        before = torch.tensor(self.history[-2], dtype=torch.float64)
        # A task whose loss was 0 (no valid pixel in an epoch) counts as unchanged.
        ratio = torch.where(before > 0, last / before.clamp_min(1e-300), torch.ones_like(last))
        w = len(self.tasks) * torch.softmax(ratio / self.temperature, dim=0)
        return {t: float(v) for t, v in zip(self.tasks, w.tolist(), strict=True)}

    def end_epoch(self, mean_losses: Mapping[str, float]) -> None:
        self.history.append([float(mean_losses[t]) for t in self.tasks])

    def export_state(self) -> dict[str, Any]:
        return {"history": [list(h) for h in self.history[-2:]]}

    def import_state(self, state: Mapping[str, Any]) -> None:
        self.history = [[float(v) for v in h] for h in state.get("history", [])]


class UncertaintyWeighting(Weighting):
    """Learned log variances ``log_var`` (T,): weights 1 / (2 exp(s_t)), regulariser sum s_t / 2."""

    def __init__(self, tasks: Sequence[str], *, prior: Mapping[str, float]) -> None:
        super().__init__(tasks, prior=prior)
        self.log_var = nn.Parameter(torch.full((len(self.tasks),), -0.5))

    def weights_now(self) -> dict[str, torch.Tensor | float]:
        w = 1.0 / (2.0 * self.log_var.exp())
        return {t: w[i] for i, t in enumerate(self.tasks)}

    def regularizer(self) -> torch.Tensor:
        return self.log_var.sum() / 2.0

    def export_state(self) -> dict[str, Any]:
        return {"log_var": [float(v) for v in self.log_var.detach().cpu().tolist()]}

    def import_state(self, state: Mapping[str, Any]) -> None:
        if "log_var" in state:
            values = torch.tensor(state["log_var"], dtype=self.log_var.dtype)
            if values.shape != self.log_var.shape:
                raise ValueError(
                    f"uncertainty: checkpoint has {values.numel()} log variances, "
                    f"the run has {len(self.tasks)} tasks"
                )
            with torch.no_grad():
                self.log_var.copy_(values)


class PCGradWeighting(Weighting):
    """PCGrad on the shared parameters: ``params`` are all trainable parameters (their
    gradients are written by ``finish_step``), ``shared`` the subset that is projected."""

    gradient_level: ClassVar[bool] = True

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        prior: Mapping[str, float],
        params: Sequence[nn.Parameter],
        shared: Sequence[nn.Parameter],
        seed: int = 0,
    ) -> None:
        super().__init__(tasks, prior=prior)
        self._params = list(params)
        shared_ids = {id(p) for p in shared}
        self._shared = (
            torch.cat([torch.full((p.numel(),), id(p) in shared_ids) for p in self._params])
            if self._params
            else torch.zeros(0, dtype=torch.bool)
        )
        self.seed = seed
        self._buffer: torch.Tensor | None = None  # (T + 1, D): per task, then the extra loss
        self._coef_sum = torch.zeros(len(self.tasks), dtype=torch.float64)
        self._steps = 0

    @classmethod
    def from_options(
        cls, tasks: Sequence[str], prior: Mapping[str, float], opts: WeightingOptions
    ) -> Weighting:
        return cls(tasks, prior=prior, params=opts.params, shared=opts.shared, seed=opts.seed)

    def accumulate(
        self,
        losses: Mapping[str, torch.Tensor],
        scales: Mapping[str, float],
        extra: torch.Tensor | float = 0.0,
    ) -> None:
        """Add one micro-batch's per-task gradients (prior * scale * L_t) and the gradient of
        ``extra`` (not projected, e.g. an adapter's regulariser) to the step's sums."""
        terms = [self.prior[t] * losses[t] * scales[t] for t in self.tasks]
        if torch.is_tensor(extra) and extra.requires_grad:
            terms.append(extra)
        rows = []
        for k, term in enumerate(terms):
            grads = torch.autograd.grad(
                term, self._params, retain_graph=k + 1 < len(terms), allow_unused=True
            )
            rows.append(_flat(grads, self._params))
        if len(rows) == len(self.tasks):
            rows.append(torch.zeros_like(rows[0]))
        stacked = torch.stack(rows)
        self._buffer = stacked if self._buffer is None else self._buffer + stacked

    def finish_step(
        self, world_size: int = 1, step: int = 0, rng: random.Random | None = None
    ) -> None:
        """Average the step's gradients over workers, project, and write ``p.grad``."""
        if self._buffer is None:
            return
        buf, self._buffer = self._buffer, None
        if world_size > 1 and dist.is_initialized():
            buf = _all_reduce_mean(buf, world_size)
        grads, extra = buf[:-1], buf[-1]
        mask = self._shared.to(buf.device)
        # The same order on every rank (and on a resumed run): seeded by (seed, step).
        rng = rng or random.Random(self.seed * 1_000_003 + step)
        projected, coef = pcgrad(grads[:, mask], rng)
        combined = grads.sum(dim=0) + extra
        combined[mask] = projected + extra[mask]
        offset = 0
        for p in self._params:
            g = combined[offset : offset + p.numel()].view_as(p).to(p.dtype)
            p.grad = g.clone()
            offset += p.numel()
        self._coef_sum += coef
        self._steps += 1

    def epoch_weights(self) -> dict[str, float]:
        """prior_t times the mean over the epoch's steps of LibMTL's effective weight of task t
        (1 minus its projection coefficients)."""
        mean = self._coef_sum / max(1, self._steps)
        return {t: self.prior[t] * float(mean[i]) for i, t in enumerate(self.tasks)}

    def end_epoch(self, mean_losses: Mapping[str, float]) -> None:
        self._coef_sum.zero_()
        self._steps = 0


def pcgrad(grads: torch.Tensor, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
    """Project conflicting gradients. grads (T, D) -> (the sum of the projected gradients (D,),
    the effective weight of each original gradient in that sum (T,) float64).

    For each task i, the other tasks j are visited in ``rng``'s shuffled order; whenever the
    running projected g_i has a negative dot product with the *original* g_j, g_i loses its
    component along g_j. One ``rng.shuffle`` per task, as LibMTL's PCGrad calls it.
    """
    t = grads.shape[0]
    out = grads.clone()
    coef = torch.ones(t, dtype=torch.float64)
    sq = grads.pow(2).sum(dim=1)
    for i in range(t):
        order = list(range(t))
        rng.shuffle(order)
        for j in order:
            dot = torch.dot(out[i], grads[j])
            if dot < 0:
                out[i] -= dot * grads[j] / sq[j]
                coef[j] -= float(dot / sq[j])
    return out.sum(dim=0), coef


def _flat(grads: Sequence[torch.Tensor | None], params: Sequence[nn.Parameter]) -> torch.Tensor:
    return torch.cat(
        [
            (g if g is not None else torch.zeros_like(p)).reshape(-1).float()
            for g, p in zip(grads, params, strict=True)
        ]
    )


def _all_reduce_mean(t: torch.Tensor, world_size: int) -> torch.Tensor:
    backend_cuda = dist.get_backend() == "nccl"
    moved = t.to(torch.device("cuda", torch.cuda.current_device())) if backend_cuda else t
    moved = moved.contiguous()
    dist.all_reduce(moved)
    return (moved / world_size).to(t.device)


#: train.weighting value -> strategy class.
WEIGHTINGS: Mapping[str, type[Weighting]] = {
    "fixed": FixedWeighting,
    "dwa": DWAWeighting,
    "uncertainty": UncertaintyWeighting,
    "pcgrad": PCGradWeighting,
}


def build_weighting(
    kind: str,
    tasks: Sequence[str],
    *,
    task_weights: Mapping[str, float],
    options: WeightingOptions | None = None,
) -> Weighting:
    """The strategy ``kind`` (a ``WEIGHTINGS`` key) for ``tasks``. ``task_weights``: per-task
    weights normalised to sum 1; ``fixed`` uses them as they are, the others as a prior
    normalised to mean 1."""
    if kind not in WEIGHTINGS:
        raise ValueError(f"train.weighting = {kind!r}: expected one of {sorted(WEIGHTINGS)}")
    cls = WEIGHTINGS[kind]
    prior = {t: float(task_weights[t]) for t in tasks}
    if cls.prior_mean_one:
        total = sum(prior.values())
        if not (total > 0 and math.isfinite(total)):
            raise ValueError(f"train.task_weights: cannot be normalised ({dict(task_weights)})")
        prior = {t: len(tasks) * w / total for t, w in prior.items()}
    return cls.from_options(tasks, prior, options or WeightingOptions())
