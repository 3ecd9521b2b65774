"""Adapters inside mSAM: no-op at init, only-trainable updates, counts, and save / load."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from mtsam.adapters import io as adapter_io
from mtsam.adapters.base import adapters_of
from mtsam.adapters.io import (
    AdapterFileError,
    AdapterNotFoundError,
    build_from_adapter,
    load_adapter,
    read_adapter_meta,
    save_adapter,
)
from mtsam.adapters.regularizers import extra_losses
from mtsam.adapters.spec import AdapterSpec
from mtsam.model.msam import build_msam
from mtsam.model.presets import get_preset

NYU = [("semantic", 13), ("depth", 1), ("normal", 3)]
SPECS = {
    "tora": AdapterSpec(method="tora", r1=4, r2=4, r3=2),
    "tora_cp": AdapterSpec(method="tora", decomposition="cp", rank=3),
    "lora_stl": AdapterSpec(method="lora_stl", rank=2),
    "lora_hps": AdapterSpec(method="lora_hps", rank=2),
    "conv_lora": AdapterSpec(method="conv_lora", rank=2, conv_experts=2),
}


def images(seed: int = 0, b: int = 1) -> torch.Tensor:
    return torch.rand(b, 3, 48, 64, generator=torch.Generator().manual_seed(seed))


def randomise_trainable(model, seed: int = 7) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.trainable_named_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))


@pytest.mark.parametrize("name", list(SPECS))
def test_msam_output_unchanged_by_adapters_at_init(name):
    plain = build_msam("tiny", NYU, seed=3).eval()
    adapted = build_msam("tiny", NYU, seed=3, adapter=SPECS[name]).eval()
    assert len(adapters_of(adapted)) == 4
    x = images()
    with torch.no_grad():
        want = plain(x)
        got = adapted(x, stacked=False)
        stacked = adapted(x, stacked=True)
    for task in want:
        assert torch.equal(got[task], want[task]), task
        # The stacked path multiplies a T-times larger batch: BLAS may round differently.
        torch.testing.assert_close(stacked[task], want[task], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["tora", "conv_lora"])
def test_msam_step_changes_only_trainable_tensors(name):
    model = build_msam("tiny", NYU, seed=0, adapter=SPECS[name]).train()
    trainable = dict(model.trainable_named_parameters())
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if n not in trainable}
    assert all(not model.get_parameter(n).requires_grad for n in frozen)
    assert any(".base." in n for n in frozen)  # the wrapped encoder linears are frozen
    before = {n: p.detach().clone() for n, p in trainable.items()}
    opt = torch.optim.Adam(trainable.values(), lr=1e-3)
    out, aux = model(images(b=2), return_aux=True)
    loss = sum(v.square().mean() for v in out.values())
    loss = loss + extra_losses(model, aux, orth_weight=1e-3)["total"]
    loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    changed = {n for n, p in trainable.items() if not torch.equal(p, before[n])}
    assert any(n.startswith("decoders.") for n in changed)
    assert any(".qkv." in n for n in changed)  # the adapters learn from the first step


@pytest.mark.parametrize("name", list(SPECS))
def test_save_load_round_trip_exact(tmp_path, name):
    a = build_msam("tiny", NYU, seed=1, adapter=SPECS[name])
    randomise_trainable(a)
    path = save_adapter(a, tmp_path / "run" / "adapter")
    assert sorted(os.listdir(path)) == ["adapter.json", "adapter.safetensors"]
    saved = load_file(str(path / "adapter.safetensors"))
    assert set(saved) == {n for n, _ in a.trainable_named_parameters()}
    assert not any(".base." in k or "patch_embed" in k or "neck" in k for k in saved)

    b = build_msam("tiny", NYU, seed=1, adapter=SPECS[name])
    load_adapter(b, path)
    for (n, p), (_, q) in zip(
        a.trainable_named_parameters(), b.trainable_named_parameters(), strict=True
    ):
        assert torch.equal(p, q), n
    a.eval()
    b.eval()
    with torch.no_grad():
        oa, ob = a(images()), b(images())
    assert all(torch.equal(oa[t], ob[t]) for t in oa)

    c = build_from_adapter(path)
    assert c.adapter_spec == SPECS[name] and c.task_channels == dict(NYU)
    assert all(torch.equal(p, b.get_parameter(n)) for n, p in c.trainable_named_parameters())


def test_json_describes_the_adapter(tmp_path):
    a = build_msam("tiny", NYU, seed=1, adapter=SPECS["tora"])
    path = save_adapter(a, tmp_path / "ad")
    d = json.loads((path / "adapter.json").read_text())
    assert d["format_version"] == 2
    assert d["method"] == "tora" and d["decomposition"] == "tucker"
    assert d["ranks"] == {"r1": 4, "r2": 4, "r3": 2}
    assert d["targets"] == ["qkv"] and d["scaling"] == 0.5
    assert d["tasks"] == [{"name": n, "channels": c} for n, c in NYU]
    assert d["preset"] == "tiny" and d["base_fingerprint"] == "random-init:tiny:seed=1"
    assert d["num_parameters"] == a.parameter_counts()["all"][0]
    assert read_adapter_meta(path).spec == SPECS["tora"]


def test_no_adapter_model_round_trips(tmp_path):
    a = build_msam("tiny", NYU, seed=1)
    randomise_trainable(a)
    path = save_adapter(a, tmp_path / "ad")
    assert json.loads((path / "adapter.json").read_text())["method"] == "none"
    b = build_from_adapter(path)
    assert b.adapter_spec is None
    assert all(torch.equal(p, a.get_parameter(n)) for n, p in b.trainable_named_parameters())


def test_mismatches_fail_clearly(tmp_path):
    a = build_msam("tiny", NYU, seed=1, adapter=SPECS["tora"])
    path = save_adapter(a, tmp_path / "ad")
    other_preset = dataclasses.replace(get_preset("tiny"), name="tiny_b")
    cases = [
        (build_msam(other_preset, NYU, seed=1, adapter=SPECS["tora"]), "preset 'tiny'"),
        (build_msam("tiny", NYU[:2], seed=1, adapter=SPECS["tora"]), r"tasks \[semantic:13"),
        (build_msam("tiny", NYU, seed=1, adapter=SPECS["lora_stl"]), "method: saved 'tora'"),
        (
            build_msam("tiny", NYU, seed=1, adapter=dataclasses.replace(SPECS["tora"], r3=3)),
            "r3: saved 2",
        ),
        (build_msam("tiny", NYU, seed=1), "method: saved 'tora', the model has 'none'"),
        (build_msam("tiny", NYU, seed=2, adapter=SPECS["tora"]), "allow_other_base"),
    ]
    for model, msg in cases:
        with pytest.raises(AdapterFileError, match=msg):
            load_adapter(model, path)
    # A different base is accepted on request; dropout may differ (not part of the weights).
    load_adapter(cases[-1][0], path, allow_other_base=True)
    load_adapter(
        build_msam("tiny", NYU, seed=1, adapter=dataclasses.replace(SPECS["tora"], dropout=0.0)),
        path,
    )


def test_bad_files(tmp_path):
    a = build_msam("tiny", NYU, seed=1, adapter=SPECS["lora_hps"])
    with pytest.raises(AdapterNotFoundError, match="nope"):
        load_adapter(a, tmp_path / "nope")
    path = save_adapter(a, tmp_path / "ad")
    meta = path / "adapter.json"
    good = meta.read_text()

    meta.write_text("{not json")
    with pytest.raises(AdapterFileError, match=r"adapter\.json: not valid JSON"):
        load_adapter(a, path)
    meta.write_text(json.dumps({**json.loads(good), "format_version": 9}))
    with pytest.raises(AdapterFileError, match="format_version 9"):
        load_adapter(a, path)
    d = json.loads(good)
    del d["tasks"]
    meta.write_text(json.dumps(d))
    with pytest.raises(AdapterFileError, match="missing field 'tasks'"):
        load_adapter(a, path)
    meta.write_text(good)

    weights = path / "adapter.safetensors"
    blob = weights.read_bytes()
    weights.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(AdapterFileError, match=r"adapter\.safetensors"):
        load_adapter(a, path)
    weights.unlink()
    with pytest.raises(AdapterNotFoundError, match=r"adapter\.safetensors"):
        load_adapter(a, path)


def test_version_1_adapter_with_the_now_frozen_decoder_tensors_loads(tmp_path):
    """Version 1 also stored the hypernetwork MLPs of mask tokens 1..3 (and a one-expert
    Conv-LoRA's gate), which training never changed: loading skips them, and only them."""
    spec = AdapterSpec(method="conv_lora", rank=2, conv_experts=1)
    a = build_msam("tiny", NYU, seed=1, adapter=spec)
    randomise_trainable(a)
    path = save_adapter(a, tmp_path / "ad")
    state = load_file(str(path / "adapter.safetensors"))
    frozen = {
        n: p.detach().clone()
        for n, p in a.named_parameters()
        if (".output_hypernetworks_mlps." in n and ".output_hypernetworks_mlps.0." not in n)
        or ".gate." in n
    }
    assert len(frozen) == 3 * 3 * 6 + 4 * 2 and not set(frozen) & set(state)
    from safetensors.torch import save_file

    save_file({**state, **frozen}, str(path / "adapter.safetensors"))
    meta = json.loads((path / "adapter.json").read_text())
    (path / "adapter.json").write_text(json.dumps({**meta, "format_version": 1}))
    b = build_msam("tiny", NYU, seed=1, adapter=spec)
    assert load_adapter(b, path).format_version == 1
    for n, p in a.named_parameters():
        assert torch.equal(p, b.get_parameter(n)), n
    # a tensor that is no parameter at all is still refused
    save_file(
        {**state, **frozen, "decoders.extra": torch.zeros(1)}, str(path / "adapter.safetensors")
    )
    with pytest.raises(ValueError, match=r"unexpected \[decoders\.extra\]"):
        load_adapter(b, path)
    # version 2 files hold exactly the trainable set: the frozen tensors are refused there
    save_file({**state, **frozen}, str(path / "adapter.safetensors"))
    (path / "adapter.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"output_hypernetworks_mlps\.1"):
        load_adapter(b, path)


def test_tensor_set_mismatch_is_named(tmp_path):
    a = build_msam("tiny", NYU, seed=1, adapter=SPECS["lora_hps"])
    path = save_adapter(a, tmp_path / "ad")
    from safetensors.torch import save_file

    state = load_file(str(path / "adapter.safetensors"))
    state.pop("no_mask_embed.weight")
    save_file(state, str(path / "adapter.safetensors"))
    with pytest.raises(ValueError, match=r"missing.*no_mask_embed\.weight"):
        load_adapter(a, path)


def test_save_is_atomic_and_refuses_to_clobber(tmp_path, monkeypatch):
    a = build_msam("tiny", NYU, seed=1, adapter=SPECS["lora_hps"])
    target = tmp_path / "ad"

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(adapter_io, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(a, target)
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()

    save_adapter(a, target)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_adapter(a, target)
    randomise_trainable(a)
    monkeypatch.setattr(adapter_io, "save_file", broken)
    with pytest.raises(OSError):
        save_adapter(a, target, overwrite=True)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["ad"]  # the old adapter is untouched, no temp left
    old = load_file(str(target / "adapter.safetensors"))
    assert not torch.equal(old["no_mask_embed.weight"], a.no_mask_embed.weight)

    save_adapter(a, target, overwrite=True)
    assert os.listdir(tmp_path) == ["ad"]
    new = load_file(str(target / "adapter.safetensors"))
    assert torch.equal(new["no_mask_embed.weight"], a.no_mask_embed.weight.detach())

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an adapter directory"):
        save_adapter(a, tmp_path / "other", overwrite=True)


def test_vit_l_nyuv2_trainable_counts():
    # The authors' NYUv2 setting, counted on segment-anything's ViT-L sizes (one big build).
    spec = AdapterSpec(method="tora", r1=32, r2=32, r3=4)
    model = build_msam("vit_l", NYU, adapter=spec)
    counts = model.parameter_counts()
    assert counts["adapters"][0] == 3_244_320
    assert counts["encoder_norms"][0] == 98_304
    assert counts["no_mask_embed"][0] == 17 * 256
    # The authors' trainable set (three full decoders of 4,058,340 each, with the IoU heads):
    # 15,521,996. mSAM freezes what it never reads: the IoU heads and, per decoder, the
    # hypernetwork MLPs of mask tokens 1..3 (segment-anything's MLP 256 -> 256 -> 256 -> 32).
    mlp = (256 * 256 + 256) * 2 + 256 * 32 + 32
    assert counts["decoder_unused_mask_mlps"] == (0, 3 * 3 * mlp) == (0, 1_258_272)
    assert counts["all"][0] == 15_521_996 - counts["decoder_iou_heads"][1] - 3 * 3 * mlp
    assert counts["all"][0] == 13_865_888
