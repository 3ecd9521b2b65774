"""CUDA, bf16 and Ray-on-GPU paths: run by ``pytest -m gpu`` (and benchmarks/gpu_check.py).

Every test here is marked ``gpu`` and skipped where CUDA is not available (CI has no GPU).
They cover: the encoder attention against segment-anything's on CUDA in float32 and bf16
(forward and gradients, FlexAttention and the blocked fallback); a bf16-autocast training
step for every adapter method (finite loss, gradients exactly where the CPU float32 step puts
them, all of them trainable); the bf16 frozen base; fused AdamW; activation checkpointing;
``jobs/evaluate.py`` on CUDA; a 1-GPU Ray Train run; a 4-trial sweep sharing one GPU.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Attention

from mtsam.adapters.io import save_adapter
from mtsam.adapters.spec import AdapterSpec
from mtsam.model import attention
from mtsam.model.attention import SdpaAttention, use_sdpa_attention
from mtsam.model.msam import build_msam, hold_frozen_in

REPO = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (pytest -m gpu on a GPU machine)"),
]

TASKS = [("semantic", 6), ("depth", 1), ("normal", 3)]
METHODS = {
    "tora": AdapterSpec(method="tora", r1=8, r2=8, r3=2, dropout=0.0),
    "tora_cp": AdapterSpec(method="tora", decomposition="cp", rank=8, dropout=0.0),
    "lora_stl": AdapterSpec(method="lora_stl", rank=4, dropout=0.0),
    "lora_hps": AdapterSpec(method="lora_hps", rank=4, dropout=0.0),
    "conv_lora": AdapterSpec(method="conv_lora", rank=4, conv_experts=2, dropout=0.0),
}


def _env() -> dict[str, str]:
    return dict(
        os.environ, RAY_USAGE_STATS_ENABLED="0", MLFLOW_DISABLE_TELEMETRY="true", PYTHONPATH=""
    )


def _close(actual: torch.Tensor, expected: torch.Tensor, rel: float, what: str) -> None:
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(
        actual.float(), expected.float(), atol=rel * scale, rtol=0, msg=lambda m: f"{what}: {m}"
    )


# ---------------------------------------------------------------- attention
@pytest.mark.parametrize("kernel", ["flex", "blocked", "mask"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_attention_on_cuda_matches_segment_anything(monkeypatch, kernel, dtype):
    """segment-anything's Attention in float32 on CUDA is the reference; the global block's
    bias-free kernels (FlexAttention, the blocked function) and the mask path, in float32 and
    under bf16 autocast, forward and gradients."""
    torch.manual_seed(0)
    ref = Attention(128, num_heads=4, use_rel_pos=True, input_size=(16, 16)).cuda()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    fast = SdpaAttention.from_attention(copy.deepcopy(ref), bias_free=kernel != "mask")
    monkeypatch.setitem(attention._flex, "failed", kernel == "blocked")
    x = torch.randn(2, 16, 16, 128, device="cuda")
    w = torch.randn_like(x)
    params = ["qkv.weight", "proj.weight", "rel_pos_h", "rel_pos_w"]

    def run(module, autocast: bool):
        xx = x.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            out = module(xx)
        grads = torch.autograd.grad(
            (out.float() * w).sum(), [xx, *map(module.get_parameter, params)]
        )
        return out, grads

    out_ref, g_ref = run(ref, False)
    out, g = run(fast, dtype == "bf16")
    if kernel == "flex":
        assert not attention._flex["failed"], "FlexAttention fell back to the blocked kernel"
    rel = 1e-4 if dtype == "fp32" else 3e-2
    _close(out, out_ref, rel, "output")
    for name, a, b in zip(["input", *params], g, g_ref, strict=True):
        assert b.abs().max() > 0, name
        _close(a, b, rel * 2, f"grad {name}")


# ---------------------------------------------------------------- training steps
def _step(model, images, targets, *, device: str, amp: bool) -> float:
    with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
        out = model(images)
    loss = sum(F.mse_loss(out[t].float(), targets[t]) for t, _ in TASKS)
    loss.backward()
    return float(loss.detach())


def _data(device: str, n: int = 2):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, 3, 96, 128, generator=g)
    targets = {t: torch.randn(n, c, 96, 128, generator=g) for t, c in TASKS}
    return images.to(device), {k: v.to(device) for k, v in targets.items()}


def _with_grad(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method", list(METHODS))
def test_bf16_training_step_for_every_adapter(method):
    cpu = build_msam("tiny", TASKS, adapter=METHODS[method], seed=0)
    use_sdpa_attention(cpu.image_encoder)
    gpu = copy.deepcopy(cpu).cuda()
    _step(cpu, *_data("cpu"), device="cpu", amp=False)
    loss = _step(gpu, *_data("cuda"), device="cuda", amp=True)
    assert torch.isfinite(torch.tensor(loss))
    trainable = {n for n, _ in gpu.trainable_named_parameters()}

    # Conv-LoRA's gate noise (training only) comes from each device's own RNG: which experts
    # a step uses may differ, every other gradient must be where the CPU step put it.
    def routed(names: set[str]) -> set[str]:
        return {n for n in names if ".experts." not in n}

    assert routed(_with_grad(gpu)) == routed(_with_grad(cpu))
    if method == "conv_lora":
        assert _with_grad(gpu) - routed(_with_grad(gpu))  # some expert was used and trained
    assert _with_grad(gpu) <= trainable
    assert all(torch.isfinite(p.grad).all() for p in gpu.parameters() if p.grad is not None)


def test_bf16_frozen_base():
    model = build_msam("tiny", TASKS, adapter=METHODS["tora"], seed=0)
    use_sdpa_attention(model.image_encoder)
    ref = copy.deepcopy(model).cuda()
    hold_frozen_in(model, torch.bfloat16)
    model.cuda()
    trainable = {id(p) for _, p in model.trainable_named_parameters()}
    for p in model.parameters():
        assert p.dtype == (torch.float32 if id(p) in trainable else torch.bfloat16)
    data = _data("cuda")
    loss = _step(model, *data, device="cuda", amp=True)
    loss_ref = _step(ref, *data, device="cuda", amp=True)
    assert loss == pytest.approx(loss_ref, rel=5e-2)
    assert _with_grad(model) == _with_grad(ref)


def test_fused_adamw_matches_the_loop_implementation():
    torch.manual_seed(0)
    a = [torch.randn(64, 32, device="cuda", requires_grad=True) for _ in range(3)]
    b = [p.detach().clone().requires_grad_(True) for p in a]
    fused = torch.optim.AdamW(a, lr=1e-2, weight_decay=0.01, fused=True)
    loop = torch.optim.AdamW(b, lr=1e-2, weight_decay=0.01, foreach=False)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in a]
        for p, q, gr in zip(a, b, grads, strict=True):
            p.grad, q.grad = gr.clone(), gr.clone()
        fused.step()
        loop.step()
    for p, q in zip(a, b, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_activation_checkpointing_equals_no_checkpointing():
    model = build_msam("tiny", TASKS, adapter=METHODS["tora"], seed=0)
    use_sdpa_attention(model.image_encoder)
    model.cuda()
    other = copy.deepcopy(model)
    other.activation_checkpointing = True
    data = _data("cuda")
    loss = _step(model, *data, device="cuda", amp=False)
    loss_ckpt = _step(other, *data, device="cuda", amp=False)
    assert loss_ckpt == pytest.approx(loss, rel=1e-6)
    grads = dict(model.named_parameters())
    for n, p in other.named_parameters():
        if p.grad is None:
            assert grads[n].grad is None, n
            continue
        torch.testing.assert_close(p.grad, grads[n].grad, rtol=1e-4, atol=1e-6, msg=n)


# ---------------------------------------------------------------- jobs on the GPU
def _run(args: list[str], timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=_env(), capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def _small(out: Path) -> list[str]:
    sets = [
        f"output_dir={out}",
        "tracking.enabled=false",
        "data.scenes.num_train=16",
        "data.scenes.num_val=8",
        "train.epochs=1",
        "train.batch_size=4",
        "train.vis_samples=0",
        "scaling.use_gpu=true",
        "scaling.cpus_per_worker=1",
    ]
    return [a for s in sets for a in ("--set", s)]


def test_evaluate_job_on_cuda(tmp_path):
    model = build_msam("tiny", TASKS, adapter=METHODS["tora"], seed=0)
    adapter = save_adapter(model, tmp_path / "adapter")
    out = tmp_path / "metrics.json"
    sets = [f"--set=output_dir={tmp_path}", "--set=data.scenes.num_val=8"]
    proc = _run(
        [
            "jobs/evaluate.py",
            "--adapter",
            str(adapter),
            "--device",
            "cuda",
            "--json",
            str(out),
            *sets,
        ],
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads(out.read_text())
    assert metrics and all(v == v for v in metrics.values() if isinstance(v, float))


def test_ray_train_on_one_gpu(tmp_path):
    proc = _run(["jobs/train.py", "--name", "gpu", *_small(tmp_path)], timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "on cuda" in proc.stdout + proc.stderr  # the worker's start line names its device


def test_four_trials_share_one_gpu(tmp_path):
    sets = _small(tmp_path) + [
        a
        for s in (
            "scaling.gpus_per_worker=0.25",
            "tune.num_samples=4",
            "tune.max_concurrent_trials=4",
            "tune.scheduler=fifo",
        )
        for a in ("--set", s)
    ]
    proc = _run(["jobs/tune.py", "--name", "share", *sets], timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = list((tmp_path / "ray_results" / "share").glob("*/result.json"))
    assert len(results) == 4
    for r in results:
        rows = [json.loads(x) for x in r.read_text().splitlines() if x.strip()]
        assert any("val/delta_m" in x for x in rows), r
