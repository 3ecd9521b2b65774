"""mSAM: SAM without prompts, with per-task "no mask" embeddings and one mask decoder per task.

Built from segment-anything's own modules (``ImageEncoderViT``, ``MaskDecoder``,
``TwoWayTransformer``, ``PositionEmbeddingRandom``). The training forward is written here
because segment-anything's ``Sam.forward`` runs under ``no_grad`` and decodes one image at a time.

Data flow (docs/ARCHITECTURE.md): images (B, 3, H, W) in [0, 1] -> resize longest side + normalise +
pad -> encoder, run once per task on a task-major stacked batch (T*B, 3, S, S) when an adapter
is task-specific, once in total otherwise -> per task t: its decoder on its B embeddings with its
C_t no-mask rows as dense prompts (the channels ride in the decoder batch) -> low-res masks
(B, C_t, 4e, 4e) -> upsample, crop the padding, resize -> {task: (B, C_t, H, W)}.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, TwoWayTransformer
from segment_anything.modeling.prompt_encoder import PositionEmbeddingRandom
from torch import nn
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from mtsam.adapters.base import (
    AdapterModule,
    adapters_of,
    collect_aux_losses,
    set_active_tasks,
)
from mtsam.adapters.regularizers import sum_terms
from mtsam.model.presets import SamPreset, get_preset

if TYPE_CHECKING:
    from mtsam.adapters.spec import AdapterSpec

log = logging.getLogger(__name__)


def build_image_encoder(p: SamPreset) -> ImageEncoderViT:
    """segment-anything's ``ImageEncoderViT`` with the preset's sizes (as in ``build_sam.py``)."""
    return ImageEncoderViT(
        depth=p.depth,
        embed_dim=p.embed_dim,
        img_size=p.img_size,
        mlp_ratio=p.mlp_ratio,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        num_heads=p.num_heads,
        patch_size=p.patch_size,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=p.global_attn_indexes,
        window_size=p.window_size,
        out_chans=p.prompt_dim,
    )


def build_mask_decoder(p: SamPreset) -> MaskDecoder:
    """segment-anything's ``MaskDecoder`` with the preset's sizes."""
    return MaskDecoder(
        num_multimask_outputs=p.num_multimask_outputs,
        transformer=TwoWayTransformer(
            depth=p.decoder_depth,
            embedding_dim=p.prompt_dim,
            mlp_dim=p.decoder_mlp_dim,
            num_heads=p.decoder_heads,
        ),
        transformer_dim=p.prompt_dim,
        iou_head_depth=3,
        iou_head_hidden_dim=p.iou_head_hidden_dim,
    )


def validate_tasks(tasks: Sequence[tuple[str, int]]) -> tuple[tuple[str, int], ...]:
    """Check a task list of (name, channels): non-empty, unique names, channels >= 1."""
    tasks = tuple((str(n), int(c)) for n, c in tasks)
    if not tasks:
        raise ValueError("tasks: expected at least one (name, channels) pair, got none")
    names = [n for n, _ in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"tasks: names must be unique, got {names}")
    for n, c in tasks:
        if c < 1:
            raise ValueError(f"tasks: task {n!r} needs >= 1 output channel, got {c}")
    return tasks


class MSAM(nn.Module):
    """Multi-task SAM. Use :func:`build_msam` rather than constructing it directly."""

    def __init__(self, preset: SamPreset, tasks: Sequence[tuple[str, int]]) -> None:
        super().__init__()
        self.tasks = validate_tasks(tasks)
        self.preset = preset
        self.image_encoder = build_image_encoder(preset)
        self.pe_layer = PositionEmbeddingRandom(preset.prompt_dim // 2)
        # One row per output channel of every task; each starts as SAM's single no-mask row.
        self.no_mask_embed = nn.Embedding(sum(c for _, c in self.tasks), preset.prompt_dim)
        self.decoders = nn.ModuleDict({name: build_mask_decoder(preset) for name, _ in self.tasks})
        self.register_buffer(
            "pixel_mean", torch.tensor(preset.pixel_mean).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "pixel_std", torch.tensor(preset.pixel_std).view(1, 3, 1, 1), persistent=False
        )
        self.activation_checkpointing = False
        self.base_fingerprint = "random-init"
        self.adapter_spec: AdapterSpec | None = None

    # ------------------------------------------------------------------ bookkeeping
    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.tasks)

    @property
    def task_channels(self) -> dict[str, int]:
        return dict(self.tasks)

    def _no_mask_rows(self) -> dict[str, slice]:
        rows, start = {}, 0
        for name, c in self.tasks:
            rows[name] = slice(start, start + c)
            start += c
        return rows

    def trainable_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The trainable set, decided by structure (module types), in ``named_parameters`` order.

        Encoder block LayerNorms, every adapter's ``adapter_parameters()``, the no-mask
        embeddings, and the task decoders except the parts :meth:`decode` never reads (the IoU
        head and the hypernetwork MLPs of mask tokens 1..3): those would receive no gradient.
        Every tensor of the set gets a gradient in each training step, except the adapters'
        ``optional_parameters()`` (see :meth:`optional_trainable_parameters`).
        """
        chosen: set[int] = set()
        for block in self.image_encoder.blocks:
            for m in block.modules():
                if isinstance(m, nn.LayerNorm):
                    chosen.update(id(p) for p in m.parameters())
        for adapter in adapters_of(self):
            chosen.update(id(p) for p in adapter.adapter_parameters())
        chosen.update(id(p) for p in self.no_mask_embed.parameters())
        for decoder in self.decoders.values():
            unused = {id(p) for m in unused_decoder_parts(decoder) for p in m.parameters()}
            chosen.update(id(p) for p in decoder.parameters() if id(p) not in unused)
        return [(n, p) for n, p in self.named_parameters() if id(p) in chosen]

    def optional_trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The trainable tensors a training step may leave without a gradient: the adapters'
        ``optional_parameters()`` (e.g. Conv-LoRA experts its gate did not pick); usually none.
        Data-parallel training searches each step's graph for unused tensors only when this is
        not empty."""
        optional = {id(p) for a in adapters_of(self) for p in a.optional_parameters()}
        return [(n, p) for n, p in self.trainable_named_parameters() if id(p) in optional]

    def apply_trainability(self) -> None:
        """Freeze everything, then unfreeze the structural trainable set."""
        for p in self.parameters():
            p.requires_grad_(False)
        for _, p in self.trainable_named_parameters():
            p.requires_grad_(True)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Every trainable tensor (detached), keyed by its ``named_parameters`` name."""
        return {n: p.detach() for n, p in self.trainable_named_parameters()}

    def load_trainable_state_dict(
        self, state: dict[str, torch.Tensor], *, source: str = ""
    ) -> None:
        """Load exactly the trainable set; any missing, unexpected or mis-shaped key is an error."""
        own = dict(self.trainable_named_parameters())
        where = f" from {source}" if source else ""
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(
                f"trainable state{where} does not match the model: "
                f"missing {short_keys(missing)}, unexpected {short_keys(unexpected)}"
            )
        bad = [k for k, v in state.items() if tuple(v.shape) != tuple(own[k].shape)]
        if bad:
            k = bad[0]
            raise ValueError(
                f"trainable state{where}: {k} has shape {tuple(state[k].shape)}, "
                f"model expects {tuple(own[k].shape)} ({len(bad)} mismatched tensors)"
            )
        with torch.no_grad():
            for k, v in state.items():
                own[k].copy_(v.to(own[k].dtype))

    def parameter_counts(self) -> dict[str, tuple[int, int]]:
        """(trainable, total) parameter counts by group, plus ``"all"``."""
        trainable = {id(p) for _, p in self.trainable_named_parameters()}
        groups: dict[str, list[nn.Parameter]] = {
            "adapters": [p for a in adapters_of(self) for p in a.adapter_parameters()],
            "encoder_norms": [
                p
                for b in self.image_encoder.blocks
                for m in b.modules()
                if isinstance(m, nn.LayerNorm)
                for p in m.parameters()
            ],
            "no_mask_embed": list(self.no_mask_embed.parameters()),
            "decoder_iou_heads": [
                p for d in self.decoders.values() for p in d.iou_prediction_head.parameters()
            ],
            "decoder_unused_mask_mlps": [
                p
                for d in self.decoders.values()
                for mlp in d.output_hypernetworks_mlps[1:]
                for p in mlp.parameters()
            ],
        }
        grouped = {id(p) for ps in groups.values() for p in ps}
        groups["decoders"] = [
            p for d in self.decoders.values() for p in d.parameters() if id(p) not in grouped
        ]
        grouped |= {id(p) for p in groups["decoders"]}
        groups["encoder_frozen"] = [
            p for p in self.image_encoder.parameters() if id(p) not in grouped
        ]
        counts = {
            g: (sum(p.numel() for p in ps if id(p) in trainable), sum(p.numel() for p in ps))
            for g, ps in groups.items()
        }
        all_params = list(self.parameters())
        counts["all"] = (
            sum(p.numel() for p in all_params if id(p) in trainable),
            sum(p.numel() for p in all_params),
        )
        return counts

    # ------------------------------------------------------------------ forward pieces
    def preprocess(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, 3, H, W) in [0, 1] -> (B, 3, S, S) normalised and zero-padded; also (h', w').

        The longest side is resized to S = img_size (bilinear, antialiased) as SAM's
        ``ResizeLongestSide`` does, the colours normalised with SAM's mean/std (0-255 scale),
        then the image is padded bottom/right to a square.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images: expected (B, 3, H, W), got {tuple(images.shape)}")
        s = self.preset.img_size
        h, w = images.shape[-2:]
        scale = s / max(h, w)
        nh, nw = int(h * scale + 0.5), int(w * scale + 0.5)
        x = images
        if (nh, nw) != (h, w):
            x = F.interpolate(x, (nh, nw), mode="bilinear", align_corners=False, antialias=True)
        x = (x * 255.0 - self.pixel_mean) / self.pixel_std
        return F.pad(x, (0, s - nw, 0, s - nh)), (nh, nw)

    def postprocess(
        self, masks: torch.Tensor, input_size: tuple[int, int], original_size: tuple[int, int]
    ) -> torch.Tensor:
        """Low-res masks (B, C, 4e, 4e) -> (B, C, H, W), as SAM's ``postprocess_masks``."""
        s = self.preset.img_size
        masks = F.interpolate(masks, (s, s), mode="bilinear", align_corners=False)
        masks = masks[..., : input_size[0], : input_size[1]]
        return F.interpolate(masks, original_size, mode="bilinear", align_corners=False)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Image encoder: (N, 3, S, S) -> (N, prompt_dim, e, e). Same ops as ``ImageEncoderViT``."""
        enc = self.image_encoder
        x = enc.patch_embed(x)
        if enc.pos_embed is not None:
            x = x + enc.pos_embed
        for blk in enc.blocks:
            if self.activation_checkpointing and torch.is_grad_enabled():
                x = activation_checkpoint(_with_current_routing(blk), x, use_reentrant=False)
            else:
                x = blk(x)
        return enc.neck(x.permute(0, 3, 1, 2))

    def dense_pe(self) -> torch.Tensor:
        """SAM's dense positional encoding of the embedding grid: (1, prompt_dim, e, e)."""
        e = self.preset.embedding_size
        return self.pe_layer((e, e)).unsqueeze(0)

    def decode(self, task: str, embeddings: torch.Tensor) -> torch.Tensor:
        """Task ``task``'s decoder: embeddings (B, D, e, e) -> low-res masks (B, C_t, 4e, 4e).

        Each of the task's C_t no-mask rows is a dense prompt; the channels ride in the decoder
        batch (B*C_t), there are no sparse prompt tokens, and mask token 0 (SAM's single-mask
        output) is kept. Equals segment-anything's ``MaskDecoder(..., multimask_output=False)``
        per image and channel, without its per-prompt ``repeat_interleave``.
        """
        decoder = self.decoders[task]
        rows = self.no_mask_embed.weight[self._no_mask_rows()[task]]  # (C, D)
        b, d, h, w = embeddings.shape
        c = rows.shape[0]
        src = (embeddings.unsqueeze(1) + rows.view(1, c, d, 1, 1)).reshape(b * c, d, h, w)
        pos = self.dense_pe().to(src.dtype).expand(b * c, -1, -1, -1)
        tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        tokens = tokens.to(src.dtype).unsqueeze(0).expand(b * c, -1, -1)
        hs, src = decoder.transformer(src, pos, tokens)
        src = src.transpose(1, 2).reshape(b * c, d, h, w)
        upscaled = decoder.output_upscaling(src)  # (B*C, D/8, 4e, 4e)
        hyper = decoder.output_hypernetworks_mlps[0](hs[:, 1, :])  # mask token 0: (B*C, D/8)
        masks = torch.einsum("nk,nkhw->nhw", hyper, upscaled)
        return masks.reshape(b, c, *masks.shape[-2:])

    def _has_task_specific_adapters(self) -> bool:
        return any(a.task_specific for a in adapters_of(self))

    def embed_tasks(self, x: torch.Tensor, *, stacked: bool = True) -> dict[str, torch.Tensor]:
        """Per-task image embeddings for a pre-processed batch x (B, 3, S, S).

        With task-specific adapters the encoder runs on the task-major stack (T*B, 3, S, S)
        (``stacked=True``, one large product for the frozen weights) or once per task
        (``stacked=False``, lower peak memory). Otherwise one pass serves every task.
        """
        names = self.task_names
        if not self._has_task_specific_adapters():
            if adapters_of(self):
                set_active_tasks(self, [0])
            emb = self.encode(x)
            return dict.fromkeys(names, emb)
        if stacked:
            set_active_tasks(self, range(len(names)))
            emb = self.encode(x.repeat(len(names), 1, 1, 1))
            return dict(zip(names, emb.chunk(len(names), dim=0), strict=True))
        out = {}
        for t, name in enumerate(names):
            set_active_tasks(self, [t])
            out[name] = self.encode(x)
        return out

    def forward_low_res(self, x: torch.Tensor, *, stacked: bool = True) -> dict[str, torch.Tensor]:
        """Pre-processed (B, 3, S, S) -> {task: low-res masks (B, C_t, 4e, 4e)}."""
        emb = self.embed_tasks(x, stacked=stacked)
        return {name: self.decode(name, emb[name]) for name in self.task_names}

    def forward(
        self, images: torch.Tensor, *, stacked: bool = True, return_aux: bool = False
    ) -> dict[str, torch.Tensor] | tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """images (B, 3, H, W) float in [0, 1], any H, W -> {task: (B, C_t, H, W)} raw outputs.

        With ``return_aux`` also the loss terms the adapters emitted during this forward:
        ``(outputs, {"balance": L})``, L the sum of Conv-LoRA's per-layer load-balancing
        losses (0 for other methods). Training needs them in the forward's return value:
        DDP finds the tensors a step uses from it.
        """
        original = tuple(images.shape[-2:])
        x, input_size = self.preprocess(images)
        with collect_aux_losses() as terms:
            low = self.forward_low_res(x, stacked=stacked)
        out = {n: self.postprocess(m, input_size, original) for n, m in low.items()}
        if not return_aux:
            return out
        return out, {"balance": sum_terms(terms, like=x)}


def unused_decoder_parts(decoder: MaskDecoder) -> list[nn.Module]:
    """The modules of a segment-anything ``MaskDecoder`` that :meth:`MSAM.decode` never reads:
    the IoU head and the hypernetwork MLPs of mask tokens 1..3 (mSAM keeps token 0, SAM's
    single-mask output). They stay frozen. (The tokens themselves are used: all of them
    attend to each other in the two-way transformer.)"""
    return [decoder.iou_prediction_head, *decoder.output_hypernetworks_mlps[1:]]


def hold_frozen_in(model: nn.Module, dtype: torch.dtype) -> None:
    """Store every frozen parameter of ``model`` in ``dtype`` (e.g. bf16 on GPU, to halve the
    base weights' memory); trainable tensors keep their dtype. The model must then run under
    autocast, which casts the activations to match."""
    for p in model.parameters():
        if not p.requires_grad:
            p.data = p.data.to(dtype)


def _with_current_routing(block: nn.Module):
    """``block`` as a function that first restores the task routing its adapters have now.

    Activation checkpointing runs a block again during backward, when the adapters may route
    other tasks (the task-at-a-time path has moved on to the last task by then): the recompute
    must see the tasks of the original forward, or it rebuilds the activations, and the
    gradients, with another task's update.
    """
    routes = [(a, a.active_tasks) for a in adapters_of(block)]

    def run(x: torch.Tensor) -> torch.Tensor:
        for adapter, tasks in routes:
            adapter.set_active_tasks(tasks)
        return block(x)

    return run


def short_keys(keys: Sequence[str], n: int = 5) -> str:
    """'[a, b, c, d, e] (+N more)' for error messages; 'none' when empty."""
    keys = list(keys)
    if not keys:
        return "none"
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return "[" + ", ".join(keys[:n]) + "]" + more


def build_msam(
    preset: str | SamPreset,
    tasks: Sequence[tuple[str, int]],
    *,
    checkpoint: str | Path | None = None,
    adapter: AdapterSpec | None = None,
    seed: int = 0,
    base_state: tuple[Mapping[str, torch.Tensor], str] | None = None,
) -> MSAM:
    """Build mSAM: base weights from a SAM checkpoint (or random, said in the log), then adapters.

    Args:
        preset: a preset name (``vit_b``, ``vit_l``, ``vit_h``, ``tiny``) or a ``SamPreset``.
        tasks: (name, output channels) per task, in the order of the task-major batch.
        checkpoint: path of an official SAM state dict of the same preset, or None.
        adapter: the adapter to inject into the encoder's blocks, or None (decoders, norms and
            no-mask embeddings only).
        seed: seeds the random initialisation of everything not read from the checkpoint.
        base_state: (SAM state dict, fingerprint) already in memory, e.g. fetched once per
            node from Ray's object store; used instead of ``checkpoint``.
    """
    p = get_preset(preset) if isinstance(preset, str) else preset
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MSAM(p, tasks)
        if base_state is not None:
            from mtsam.model.checkpoint import load_sam_state

            load_sam_state(model, base_state[0], source="base weights", fingerprint=base_state[1])
        elif checkpoint is not None:
            from mtsam.model.checkpoint import load_sam_checkpoint

            load_sam_checkpoint(model, checkpoint)
        else:
            model.base_fingerprint = f"random-init:{p.name}:seed={seed}"
            log.warning(
                "no SAM checkpoint given: the %s base weights are randomly initialised (seed %d)",
                p.name,
                seed,
            )
        if adapter is not None:
            from mtsam.adapters.inject import inject_adapters

            inject_adapters(model.image_encoder, adapter, len(model.tasks))
            model.adapter_spec = adapter
    model.apply_trainability()
    return model


__all__ = ["MSAM", "AdapterModule", "build_image_encoder", "build_mask_decoder", "build_msam"]
