"""Dropout on an adapter branch's input, with the 1/(1-p) rescale handed to the caller.

The branch input is the full-width activation (N*, d_in), the only large tensor an adapter
touches, so its dropout is a visible part of an adapter's cost on CPU. Two savings:

- the rescale is returned as a number for the caller to fold into a small factor (ToRA's
  R1 x R2 core, LoRA's scale) instead of a second pass over the activation;
- on CPU the keep-mask comes from raw 64-bit random words, four 15-bit lanes per word (about
  5x cheaper than ``bernoulli_``). The drop probability is then p rounded to a multiple of
  2^-15 (|error| <= 1.6e-5; 0.1 becomes 0.100006); the rescale uses that rounded value, so the
  branch stays unbiased. Other devices use ``F.dropout`` (fused there) with the exact p.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_LANES = 32768  # 15-bit lanes


class BranchDropout(nn.Module):
    """``forward(x) -> (x_masked, scale)`` with dropout(x) == scale * x_masked in distribution."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {p}")
        self.p = float(p)
        self._q = round(self.p * _LANES)  # drop when a 15-bit lane < q
        self.cpu_p = self._q / _LANES

    def extra_repr(self) -> str:
        return f"p={self.p}"

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        if not self.training or self.p == 0.0:
            return x, 1.0
        if x.device.type != "cpu":
            return F.dropout(x, self.p, training=True), 1.0
        if self._q == 0:
            return x, 1.0
        # where() keeps the bool mask as is; x * mask would convert it to float both ways.
        return torch.where(keep_mask(x.shape, self._q), x, 0.0), 1.0 / (1.0 - self.cpu_p)


def keep_mask(shape: torch.Size | tuple[int, ...], q: int) -> torch.Tensor:
    """A bool CPU mask, each entry False with probability q / 2^15, from torch's global RNG.

    ``random_()`` on int64 draws uniformly from [0, 2^63), so each of the four 16-bit lanes of
    a word carries at least 15 uniform, independent bits: keep the low 15 bits of every lane
    and compare them with q (a scalar compare on a contiguous int16 view, which vectorises).
    One 64-bit draw serves four entries.
    """
    n = 1
    for s in shape:
        n *= int(s)
    words = torch.empty((n + 3) // 4, dtype=torch.int64).random_()
    lanes = words.view(torch.int16).bitwise_and_(_LANES - 1)
    return (lanes >= q)[:n].view(shape)
