"""Metric accumulators built on summable sufficient statistics, and their all-reduce.

Every metric of the platform is a function of a fixed-length vector of counts and sums over the
pixels of a split (a confusion matrix, sums of errors, a histogram of angles, ...). Adding two
such vectors is the same as having seen both sets of pixels, so accumulating over uneven
batches and summing over data-parallel workers give exactly the one-shot value, never an
average of per-batch or per-worker averages.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
import torch.distributed as dist


class MetricAccumulator(ABC):
    """Base class: a float64 state vector of ``state_size`` sums, updated batch by batch.

    The state lives on the device of the first ``update`` (no host sync per batch); ``state()``
    and ``compute()`` may be called at any time. float64 counts are exact up to 2**53 pixels.
    """

    task: str

    def __init__(self, *, task: str) -> None:
        self.task = task
        self._state: torch.Tensor = torch.zeros(self.state_size, dtype=torch.float64)

    @property
    @abstractmethod
    def state_size(self) -> int:
        """Length of the sufficient-statistics vector."""

    @abstractmethod
    def _statistics(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """One batch's (state_size,) float64 statistics, on the batch's device."""

    @abstractmethod
    def _metrics(self, state: torch.Tensor) -> dict[str, float]:
        """Metrics from a float64 CPU state vector."""

    @torch.no_grad()
    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        """Add one batch: raw model output (B, C_t, H, W) (or its activation) and its target."""
        stats = self._statistics(logits.detach(), target.detach())
        if self._state.device != stats.device:
            self._state = self._state.to(stats.device)
        self._state += stats

    def state(self) -> torch.Tensor:
        """(state_size,) float64 sufficient statistics (summed across workers to merge)."""
        return self._state.clone()

    def load_state(self, state: torch.Tensor) -> None:
        """Replace the statistics by ``state`` (e.g. the all-reduced sum of every worker's)."""
        if not torch.is_tensor(state) or state.shape != (self.state_size,):
            shape = tuple(state.shape) if torch.is_tensor(state) else type(state).__name__
            raise ValueError(
                f"{self.task}: metric state must have shape ({self.state_size},), got {shape}"
            )
        self._state = state.detach().to(device=self._state.device, dtype=torch.float64).clone()

    def merge(self, other: MetricAccumulator) -> None:
        """Add another accumulator's statistics (same type and settings) into this one."""
        if type(other) is not type(self) or other.state_size != self.state_size:
            raise ValueError(
                f"{self.task}: cannot merge {type(other).__name__} (state {other.state_size}) "
                f"into {type(self).__name__} (state {self.state_size})"
            )
        self._state += other.state().to(self._state.device)

    def reset(self) -> None:
        self._state = torch.zeros_like(self._state)

    def compute(self) -> dict[str, float]:
        """The metrics of everything accumulated so far, as plain floats."""
        return self._metrics(self._state.detach().to("cpu", torch.float64))


def all_reduce_(accumulators: Sequence[MetricAccumulator]) -> None:
    """Sum the accumulators' states over all ranks, in place (one collective for all of them).

    A no-op when ``torch.distributed`` is unavailable or no process group is initialised, so
    single-process evaluation calls it unconditionally. With NCCL the vector travels on the
    current CUDA device, otherwise on the CPU. Every rank must pass accumulators of the same
    types in the same order.
    """
    if not accumulators or not (dist.is_available() and dist.is_initialized()):
        return
    device = torch.device("cpu")
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    flat = torch.cat([a.state().to(device) for a in accumulators])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for acc in accumulators:
        acc.load_state(flat[offset : offset + acc.state_size])
        offset += acc.state_size
