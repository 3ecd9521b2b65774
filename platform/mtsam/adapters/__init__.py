"""Adapters for mSAM's image encoder: one small module per method behind one interface.

- ``spec.AdapterSpec``: the validated description of a method and its sizes.
- ``base.AdapterModule``: the interface (forward on a task-major batch, trainable parameters
  and those a step may skip, orthogonal terms, parameter counts, merge for one task); a loss
  term of the forward (Conv-LoRA's balancing) goes to ``base.emit_aux_loss`` and comes out of
  mSAM's forward (``return_aux=True``).
- ``tora`` (Tucker and CP), ``lora`` (STL, HPS), ``conv_lora``: the methods.
- ``inject.inject_adapters``: wrap the target linears of a SAM ViT in place (registry lookup).
- ``regularizers.extra_losses``: ToRA's orthogonal term plus the forward's balancing term.
- ``io``: ``adapter.safetensors`` + ``adapter.json`` save / load / rebuild.
- ``growth``: trainable-parameter growth with the number of tasks (table and plot).
"""

from mtsam.adapters.base import AdapterModule, adapters_of, set_active_tasks
from mtsam.adapters.inject import inject_adapters, merged_copy
from mtsam.adapters.regularizers import extra_losses
from mtsam.adapters.spec import AdapterSpec

__all__ = [
    "AdapterModule",
    "AdapterSpec",
    "adapters_of",
    "extra_losses",
    "inject_adapters",
    "merged_copy",
    "set_active_tasks",
]
