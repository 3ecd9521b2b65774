"""mSAM against segment-anything's own modules: presets, checkpoint mapping, equivalence, shapes."""

from __future__ import annotations

import logging
from functools import partial

import pytest
import torch
from segment_anything import sam_model_registry
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)

from mtsam.adapters.spec import AdapterSpec
from mtsam.model.checkpoint import CheckpointError, check_fits_preset, read_state_dict
from mtsam.model.msam import build_msam
from mtsam.model.presets import PRESETS, get_preset, tiny

NYU = [("semantic", 13), ("depth", 1), ("normal", 3)]


def sam_like_tiny() -> Sam:
    """segment-anything's ``Sam`` built with the tiny preset's numbers, as build_sam.py does."""
    p = tiny()
    e = p.img_size // p.patch_size
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=p.depth,
            embed_dim=p.embed_dim,
            img_size=p.img_size,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=p.num_heads,
            patch_size=p.patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=p.global_attn_indexes,
            window_size=p.window_size,
            out_chans=p.prompt_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=p.prompt_dim,
            image_embedding_size=(e, e),
            input_image_size=(p.img_size, p.img_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=2, embedding_dim=p.prompt_dim, mlp_dim=p.decoder_mlp_dim, num_heads=4
            ),
            transformer_dim=p.prompt_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=p.iou_head_hidden_dim,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )


@pytest.fixture(scope="module")
def sam_tiny_ckpt(tmp_path_factory):
    torch.manual_seed(1)
    sam = sam_like_tiny()
    # make every tensor distinctive so a wrong mapping cannot pass by accident
    with torch.no_grad():
        for p in sam.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    path = tmp_path_factory.mktemp("ckpt") / "sam_tiny.pth"
    torch.save(sam.state_dict(), path)
    return sam, path


@pytest.mark.parametrize("name", ["vit_b", "vit_l", "vit_h"])
def test_sam_presets_match_segment_anything_registry(name):
    """Our preset numbers build exactly the parameter shapes of sam_model_registry[name]."""
    ours = build_msam(name, [("mask", 1)])
    theirs = sam_model_registry[name]()
    ref = {k: v.shape for k, v in theirs.image_encoder.state_dict().items()}
    got = {k: v.shape for k, v in ours.image_encoder.state_dict().items()}
    assert got == ref
    ref_dec = {k: v.shape for k, v in theirs.mask_decoder.state_dict().items()}
    assert {k: v.shape for k, v in ours.decoders["mask"].state_dict().items()} == ref_dec


def test_tiny_preset_has_windowed_and_global_blocks():
    p = tiny()
    win = [b.window_size for b in build_msam("tiny", NYU).image_encoder.blocks]
    assert 0 in win and p.window_size in win
    assert 64 <= p.embed_dim <= 128 and 2 <= p.depth <= 4 and p.img_size == 128


def test_unknown_preset_names_choices():
    with pytest.raises(ValueError, match=r"unknown model preset 'vit_x'.*tiny"):
        get_preset("vit_x")
    assert set(PRESETS) == {"vit_b", "vit_l", "vit_h", "tiny"}


def test_checkpoint_round_trip_maps_every_tensor(sam_tiny_ckpt):
    sam, path = sam_tiny_ckpt
    m = build_msam("tiny", NYU, checkpoint=path)
    ref = sam.state_dict()
    for k, v in m.image_encoder.state_dict().items():
        assert torch.equal(v, ref[f"image_encoder.{k}"]), k
    for task, _ in NYU:
        for k, v in m.decoders[task].state_dict().items():
            assert torch.equal(v, ref[f"mask_decoder.{k}"]), (task, k)
    assert torch.equal(
        m.pe_layer.positional_encoding_gaussian_matrix,
        ref["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"],
    )
    rows = m.no_mask_embed.weight
    assert rows.shape[0] == 17
    assert torch.equal(rows, ref["prompt_encoder.no_mask_embed.weight"].expand(17, -1))
    assert m.base_fingerprint.startswith("sha256:")


def test_real_vit_b_state_dict_loads(tmp_path):
    """A state dict of segment-anything's own vit_b (the official key set) loads strictly."""
    torch.manual_seed(0)
    sam = sam_model_registry["vit_b"]()
    path = tmp_path / "sam_vit_b.pth"
    torch.save(sam.state_dict(), path)
    del sam
    m = build_msam("vit_b", [("semantic", 13)], checkpoint=path)
    ref = torch.load(path, map_location="cpu", weights_only=True)
    assert torch.equal(m.image_encoder.pos_embed, ref["image_encoder.pos_embed"])
    assert torch.equal(
        m.decoders["semantic"].mask_tokens.weight, ref["mask_decoder.mask_tokens.weight"]
    )


def test_equivalence_with_segment_anything_decoder(sam_tiny_ckpt):
    """One 1-channel task, same weights: mSAM's low-res mask == SAM's MaskDecoder, no prompts."""
    sam, path = sam_tiny_ckpt
    m = build_msam("tiny", [("mask", 1)], checkpoint=path).eval()
    sam.eval()
    images = torch.rand(3, 3, 96, 128)
    with torch.no_grad():
        x, _ = m.preprocess(images)
        ours = m.forward_low_res(x)["mask"]
        for b in range(images.shape[0]):
            emb = sam.image_encoder(x[b : b + 1])
            sparse, dense = sam.prompt_encoder(points=None, boxes=None, masks=None)
            ref, _ = sam.mask_decoder(
                image_embeddings=emb,
                image_pe=sam.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=False,
            )
            torch.testing.assert_close(ours[b : b + 1], ref, atol=2e-5, rtol=1e-5)


def test_preprocess_and_postprocess_match_sam(sam_tiny_ckpt):
    """Normalise+pad equals Sam.preprocess; crop+resize equals Sam.postprocess_masks."""
    sam, path = sam_tiny_ckpt
    m = build_msam("tiny", [("mask", 1)], checkpoint=path)
    img = torch.rand(2, 3, 64, 128)  # longest side 128 == img_size: no resize step
    x, input_size = m.preprocess(img)
    ref = torch.stack([sam.preprocess(i * 255.0) for i in img])
    torch.testing.assert_close(x, ref)
    low = torch.randn(2, 1, 64, 64)
    torch.testing.assert_close(
        m.postprocess(low, input_size, (64, 128)),
        sam.postprocess_masks(low, input_size, (64, 128)),
    )


@pytest.mark.parametrize("size", [(128, 128), (96, 128), (200, 75), (33, 47)])
def test_output_shapes_any_size(size):
    m = build_msam("tiny", NYU)
    out = m(torch.rand(2, 3, *size))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "semantic": (2, 13, *size),
        "depth": (2, 1, *size),
        "normal": (2, 3, *size),
    }
    assert all(torch.isfinite(v).all() for v in out.values())


def test_only_trainable_set_receives_gradients():
    m = build_msam("tiny", NYU)
    out = m(torch.rand(2, 3, 64, 64))
    sum(v.square().mean() for v in out.values()).backward()
    trainable = {n for n, _ in m.trainable_named_parameters()}
    for n, p in m.named_parameters():
        if n in trainable:
            assert p.requires_grad, n
        else:
            assert not p.requires_grad and p.grad is None, n
    # the structural set: block LayerNorms, no-mask rows, decoders (not the IoU heads, not the
    # hypernetwork MLPs of mask tokens 1..3)
    assert any(".norm1." in n for n in trainable) and "no_mask_embed.weight" in trainable
    assert not any("iou_prediction_head" in n for n in trainable)
    assert not any(n.startswith("image_encoder.neck") for n in trainable)
    mlps = {n.split(".layers.")[0] for n in trainable if ".output_hypernetworks_mlps." in n}
    assert mlps == {f"decoders.{t}.output_hypernetworks_mlps.0" for t, _ in NYU}
    # ... and it is exactly what autograd reaches
    got_grad = {n for n, p in m.named_parameters() if p.grad is not None}
    assert got_grad == trainable


@pytest.mark.parametrize("method", ["tora", "lora_stl", "conv_lora"])
@pytest.mark.parametrize("stacked", [True, False])
def test_activation_checkpointing_keeps_gradients(method, stacked):
    """Recomputing the blocks in backward gives plain autograd's gradients, on both encoder
    paths: the task-at-a-time path has moved on to the last task when backward recomputes
    task 0's blocks, so the recompute must restore the routing of the original forward. Branch
    dropout is on, so the recompute must also redraw the same masks."""
    kw = {"rank": 2} if method != "tora" else {"r1": 4, "r2": 4, "r3": 2}
    if method == "conv_lora":
        kw["conv_experts"] = 2
    spec = AdapterSpec(method=method, dropout=0.2, **kw)

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        m = build_msam("tiny", [("a", 2), ("b", 1)], adapter=spec, seed=0)
        with torch.no_grad():  # a trained-looking update (zero-init factors would hide it)
            gen = torch.Generator().manual_seed(1)
            for _, p in m.trainable_named_parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
        m.activation_checkpointing = checkpointing
        torch.manual_seed(2)
        x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
        out, aux = m(x, stacked=stacked, return_aux=True)
        balances.append(aux["balance"].detach())
        (out["a"].square().mean() + out["b"].mean() + 10 * aux["balance"]).backward()
        return {n: p.grad for n, p in m.named_parameters() if p.grad is not None}

    balances: list[torch.Tensor] = []
    ref, got = grads(False), grads(True)
    assert got.keys() == ref.keys()
    assert any(".attn.qkv." in n for n in ref)  # the adapters are in the comparison
    # Conv-LoRA's balancing term is counted once (the recompute's copy is dropped) and its
    # gradient reaches the gate through the recomputed blocks.
    assert torch.equal(balances[0], balances[1])
    assert (float(balances[0]) > 0) == (method == "conv_lora")
    assert (method == "conv_lora") == any(".gate.w_noise" in n for n in ref)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-4, atol=1e-6, msg=n)


def test_parameter_counts_by_group():
    m = build_msam("tiny", NYU)
    counts = m.parameter_counts()
    total_trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert counts["all"] == (total_trainable, sum(p.numel() for p in m.parameters()))
    groups = [g for g in counts if g != "all"]
    assert sum(counts[g][1] for g in groups) == counts["all"][1]
    assert counts["decoder_iou_heads"][0] == 0 and counts["encoder_frozen"][0] == 0
    assert counts["decoder_unused_mask_mlps"][0] == 0 < counts["decoder_unused_mask_mlps"][1]


def test_no_checkpoint_says_so(caplog):
    with caplog.at_level(logging.WARNING):
        m = build_msam("tiny", NYU, seed=5)
    assert "randomly initialised" in caplog.text
    assert m.base_fingerprint == "random-init:tiny:seed=5"


def test_same_seed_same_weights():
    a, b = build_msam("tiny", NYU, seed=3), build_msam("tiny", NYU, seed=3)
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(p, q), n


# ---------------------------------------------------------------- bad checkpoints
def test_checkpoint_of_another_preset(tmp_path, sam_tiny_ckpt):
    _, path = sam_tiny_ckpt
    with pytest.raises(
        CheckpointError,
        match=r"sam_tiny\.pth does not fit preset 'vit_b' \(it looks like a 'tiny' checkpoint\)",
    ):
        build_msam("vit_b", NYU, checkpoint=path)


def test_preset_check_without_building_the_model(sam_tiny_ckpt):
    """The driver's pre-flight check (a meta-device model): the same verdicts as loading."""
    _, path = sam_tiny_ckpt
    state = read_state_dict(path)
    check_fits_preset(state, "tiny", source="x.pth")  # segment-anything's tiny Sam fits
    with pytest.raises(CheckpointError, match=r"x\.pth does not fit preset 'vit_h' \(it looks"):
        check_fits_preset(state, "vit_h", source="x.pth")
    del state["mask_decoder.iou_token.weight"]
    with pytest.raises(CheckpointError, match=r"missing keys \[mask_decoder\.iou_token\.weight\]"):
        check_fits_preset(state, "tiny", source="x.pth")


def test_truncated_checkpoint(tmp_path, sam_tiny_ckpt):
    _, path = sam_tiny_ckpt
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"truncated\.pth.*truncated, corrupt"):
        build_msam("tiny", NYU, checkpoint=bad)


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
@pytest.mark.parametrize("keep", [1, 40, 0.5], ids=["1-byte", "40-bytes", "half"])
def test_truncated_checkpoint_is_one_short_line(tmp_path, sam_tiny_ckpt, zipped, keep):
    """A real state dict cut short: one line naming the file and the preset, without torch's
    advice paragraphs (a 1-byte file makes torch explain ``weights_only`` at length)."""
    sam, _ = sam_tiny_ckpt
    full = tmp_path / "full.pth"
    torch.save(sam.state_dict(), full, _use_new_zipfile_serialization=zipped)
    data = full.read_bytes()
    bad = tmp_path / "cut.pth"
    bad.write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep])
    with pytest.raises(CheckpointError) as e:
        build_msam("tiny", NYU, checkpoint=bad)
    msg = str(e.value)
    assert "\n" not in msg and str(bad) in msg and "preset 'tiny'" in msg, msg
    assert "could not be read as a PyTorch checkpoint" in msg, msg
    assert "weights_only" not in msg and "miniz" not in msg and len(msg) < 300, msg


def test_garbage_and_missing_checkpoint(tmp_path):
    bad = tmp_path / "garbage.pth"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match=r"garbage\.pth"):
        build_msam("tiny", NYU, checkpoint=bad)
    with pytest.raises(CheckpointError, match="no such file"):
        build_msam("tiny", NYU, checkpoint=tmp_path / "absent.pth")


def test_missing_and_unexpected_keys_are_named(tmp_path, sam_tiny_ckpt):
    sam, _ = sam_tiny_ckpt
    sd = dict(sam.state_dict())
    del sd["image_encoder.neck.0.weight"]
    sd["extra.weight"] = torch.zeros(1)
    path = tmp_path / "edited.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as e:
        build_msam("tiny", NYU, checkpoint=path)
    msg = str(e.value)
    assert "image_encoder.neck.0.weight" in msg and "extra.weight" in msg and "\n" not in msg


class Evil:
    """Any non-tensor Python object; weights_only=True must refuse to unpickle it."""


def test_pickled_object_is_refused(tmp_path):
    """weights_only=True: a checkpoint carrying arbitrary Python objects is not unpickled."""
    path = tmp_path / "evil.pth"
    torch.save({"x": Evil()}, path)
    with pytest.raises(CheckpointError, match=r"evil\.pth"):
        build_msam("tiny", NYU, checkpoint=path)


def test_trainable_state_round_trip_and_mismatch():
    a, b = build_msam("tiny", NYU, seed=1), build_msam("tiny", NYU, seed=2)
    b.load_trainable_state_dict(a.trainable_state_dict())
    for (n, p), (_, q) in zip(
        a.trainable_named_parameters(), b.trainable_named_parameters(), strict=True
    ):
        assert torch.equal(p, q), n
    c = build_msam("tiny", [("semantic", 13), ("depth", 1)])
    with pytest.raises(ValueError, match=r"unexpected.*decoders\.normal"):
        c.load_trainable_state_dict(a.trainable_state_dict())


def test_bad_task_lists():
    with pytest.raises(ValueError, match="unique"):
        build_msam("tiny", [("a", 1), ("a", 2)])
    with pytest.raises(ValueError, match="channel"):
        build_msam("tiny", [("a", 0)])
    with pytest.raises(ValueError, match="at least one"):
        build_msam("tiny", [])
