"""The adapter benchmark's reference formulations compute what ToRA computes.

The speed goal of the adapter benchmark compares ToRA with the authors' materialised form, so
that form must be the same function: here both materialised variants are checked against
tensorly's Tucker product (through a hand-written x @ (W0 + dW_t)^T) in float64, with only some
rows adapted and a subset of tasks active, and the benchmark's own equality check must catch a
variant that routes the wrong task.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import tensorly as tl
import torch
import torch.nn.functional as F
from torch import nn

from mtsam.adapters.tora import ToRATucker

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_adapters.py"
_spec = importlib.util.spec_from_file_location("bench_adapters", _PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

D_IN, D_OUT, T = 6, 12, 3
SLICES = ((4, 8), (8, 12))  # "k" and "v" of a fused qkv of width 4


def tora() -> ToRATucker:
    torch.manual_seed(0)
    base = nn.Linear(D_IN, D_OUT).double()
    adapter = ToRATucker(base, T, ranks=(3, 2, 2), scaling=0.5, out_slices=SLICES).double()
    with torch.no_grad():
        adapter.G.normal_()
    return adapter.eval()


def reference(adapter: ToRATucker, x: torch.Tensor) -> torch.Tensor:
    """x @ (W0 + dW_t)^T + b per task chunk, dW_t from tensorly's (d_in, d_sel, T) tensor."""
    tl.set_backend("pytorch")
    full = tl.tucker_to_tensor((adapter.G, [adapter.U1, adapter.U2, adapter.U3]))
    rows = torch.cat([torch.arange(a, b) for a, b in SLICES])
    n = len(adapter.active_tasks)
    outs = []
    for t, xc in zip(adapter.active_tasks, x.chunk(n), strict=True):
        dw = torch.zeros(D_OUT, D_IN, dtype=x.dtype)
        dw[rows] = adapter.scaling * full[:, :, t].T
        outs.append(F.linear(xc, adapter.base.weight + dw, adapter.base.bias))
    return torch.cat(outs)


@pytest.mark.parametrize("cls", [bench.AuthorsToRA, bench.CheapestMaterialisedToRA])
@pytest.mark.parametrize("active", [(0, 1, 2), (2, 0)])
def test_materialised_variants_equal_tensorly_reference(cls, active):
    adapter = tora()
    adapter.set_active_tasks(active)
    x = torch.randn(len(active) * 2, 3, 3, D_IN, dtype=torch.float64)
    got = cls(adapter)(x)
    torch.testing.assert_close(got, reference(adapter, x), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got, adapter(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cls", [bench.AuthorsToRA, bench.CheapestMaterialisedToRA])
def test_benchmark_check_passes_for_the_same_function(cls):
    adapter = tora()
    x = torch.randn(T * 2, 3, 3, D_IN, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(T * 2, 3, 3, D_OUT, dtype=torch.float64)
    bench.check_same_function(adapter, cls(adapter), x, gy)


def test_benchmark_check_catches_a_wrong_task():
    class WrongTask(nn.Module):
        """Task 0's chunk gets task 1's update."""

        def __init__(self, adapter: ToRATucker) -> None:
            super().__init__()
            self.inner = bench.CheapestMaterialisedToRA(adapter)

        def forward(self, x):
            self.inner.tora.set_active_tasks((1, 1, 2))
            try:
                return self.inner(x)
            finally:
                self.inner.tora.set_active_tasks((0, 1, 2))

    adapter = tora()
    x = torch.randn(T * 2, 3, 3, D_IN, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(T * 2, 3, 3, D_OUT, dtype=torch.float64)
    with pytest.raises(AssertionError, match="output differs"):
        bench.check_same_function(adapter, WrongTask(adapter), x, gy)
