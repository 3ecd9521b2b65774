"""Extra loss terms contributed by the adapters of a model.

- ``orth_reg`` (ToRA): the mean of the list, over every adapted layer, of ||U1^T U1 - I||_F,
  ||U2^T U2 - I||_F and ||G[:, :, v]^T G[:, :, v] - I||_F for each v < R3 (Frobenius norms,
  not squared; U3 not regularised), as the authors define it. CP: ||A^T A - I||, ||B^T B - I||.
- ``balance`` (Conv-LoRA): the per-layer load-balancing losses of a forward, summed over
  layers (each already carries its 1e-2 coefficient). They depend on the forward's input, so
  the model's forward returns them (``MSAM(..., return_aux=True)``); the orthogonal term
  depends on the parameters only and is computed here.
- the LoRA methods contribute nothing (both terms are 0).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from mtsam.adapters.base import adapters_of


def _zero(model: nn.Module) -> torch.Tensor:
    p = next(model.parameters(), None)
    return torch.zeros((), device=p.device if p is not None else "cpu")


def orthogonal_regularizer(model: nn.Module) -> torch.Tensor:
    """Mean of every adapter's ``orth_terms()`` (0 when no adapter has any): a scalar.

    Computed in the factors' own dtype (float32) even under bf16 autocast: near an orthogonal
    factor the Gram matrix is I plus a small residual that bf16 would round away.
    """
    p = next(model.parameters(), None)
    with torch.autocast(p.device.type if p is not None else "cpu", enabled=False):
        terms = [t for a in adapters_of(model) for t in a.orth_terms()]
        if not terms:
            return _zero(model)
        return torch.stack(terms).mean()


def sum_terms(terms: Sequence[torch.Tensor], *, like: torch.Tensor) -> torch.Tensor:
    """The sum of scalar loss terms in float32 (0 on ``like``'s device when there are none)."""
    if not terms:
        return torch.zeros((), device=like.device)
    return torch.stack([t.reshape(()).float() for t in terms]).sum()


def extra_losses(
    model: nn.Module, aux: Mapping[str, torch.Tensor], *, orth_weight: float
) -> dict[str, torch.Tensor]:
    """The adapters' loss terms of one step, for logging and for the loss.

    ``aux`` is what the model's forward returned besides its outputs (``{"balance": L}``).
    Returns ``{"orth_reg": R, "balance": L, "total": orth_weight * R + L}``: ``orth_reg`` and
    ``balance`` are unweighted (log them); add ``total`` to the task loss. Every key is always
    present (0 for methods without the term).
    """
    if orth_weight < 0:
        raise ValueError(f"orth_weight must be >= 0, got {orth_weight}")
    if "balance" not in aux:
        raise ValueError(f"aux: expected the forward's {{'balance': ...}}, got keys {sorted(aux)}")
    orth = orthogonal_regularizer(model)
    balance = aux["balance"].to(orth.device)
    return {"orth_reg": orth, "balance": balance, "total": orth_weight * orth + balance}
