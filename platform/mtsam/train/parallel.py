"""Data parallelism for the worker loop: how mSAM is wrapped in DDP.

DDP all-reduces a tensor's gradient once autograd has produced it. A trainable tensor that a
step leaves without a gradient must be declared, or DDP waits for it; DDP's cure,
``find_unused_parameters=True``, walks the autograd graph back from the forward's outputs
after every forward. mSAM's trainable set is built so that every tensor gets a gradient in
every step (the decoder parts it never reads are frozen), so the graph search is switched on
only for a method that names tensors it may skip (``MSAM.optional_trainable_parameters``:
Conv-LoRA's experts). Every other method runs with a fixed set of used tensors and no search;
DDP then fails loudly (at the next step) if a trainable tensor ever gets no gradient.

``static_graph=True`` is not used: together with ``no_sync`` (gradient accumulation) it fails
at the first backward in torch 2.14 (an ``expect_autograd_hooks_`` internal assert), and it
would also accept unused tensors without a word.
"""

from __future__ import annotations

import torch
from torch import nn

from mtsam.model.msam import MSAM


def find_unused_needed(model: MSAM) -> bool:
    """Whether DDP must search each step's graph for trainable tensors the step left unused."""
    return bool(model.optional_trainable_parameters())


def data_parallel(model: MSAM, device: torch.device) -> nn.parallel.DistributedDataParallel:
    """``model`` (already on ``device``) in DDP, searching for unused tensors only if needed."""
    return nn.parallel.DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=find_unused_needed(model),
    )
