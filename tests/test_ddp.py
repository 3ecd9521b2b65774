"""Every adapter method trains under data parallelism, and its trainable set is what gets
gradients.

- One step of every method in one process: the tensors autograd reaches (a ``.grad`` exists,
  possibly all zeros) are exactly the trainable set, less what the method names as optional
  (Conv-LoRA's experts). DDP relies on it: it searches each step's graph for unused tensors
  only for a method that names some.
- The matrix: every method x {stacked, task at a time} runs ``fit`` for 2 steps on two real
  gloo ranks (tests/gloo.py; one pair of processes and one process group for the whole matrix).
  Losses are finite, both ranks end with the same tensors, and for the deterministic methods
  two workers with batch b end where one worker with batch 2b ends (the references run in the
  same two processes, before they join the group).
"""

from __future__ import annotations

import math
import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from gloo import free_port, gloo_rank
from mtsam.adapters.base import adapters_of
from mtsam.adapters.conv_lora import ConvLoRA
from mtsam.adapters.regularizers import extra_losses
from mtsam.adapters.spec import AdapterSpec
from mtsam.config import load_config
from mtsam.model.msam import build_msam
from mtsam.train.loop import data_root

REPO = Path(__file__).resolve().parents[1]
NYU = [("semantic", 13), ("depth", 1), ("normal", 3)]

# ------------------------------------------------------------------ the trainable set
SPECS = {
    "none": None,
    "tora": AdapterSpec(method="tora", r1=4, r2=4, r3=2),
    "tora_cp": AdapterSpec(method="tora", decomposition="cp", rank=3),
    "lora_stl": AdapterSpec(method="lora_stl", rank=2),
    "lora_hps": AdapterSpec(method="lora_hps", rank=2),
    "conv_lora": AdapterSpec(method="conv_lora", rank=2, conv_experts=4, dropout=0.1),
    "conv_lora_1": AdapterSpec(method="conv_lora", rank=2, conv_experts=1),
}


@pytest.fixture
def one_thread():
    """Tiny ops gain nothing from a second thread; on a busy machine it only spins."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _step_grads(model, x, *, stacked: bool) -> set[int]:
    """One training step's backward from the forward's outputs alone (task losses plus the
    balancing term it returns, no orthogonal term): the ids of the tensors given a .grad."""
    for p in model.parameters():
        p.grad = None
    out, aux = model(x, stacked=stacked, return_aux=True)
    loss = sum(v.square().mean() for v in out.values())
    loss = loss + extra_losses(model, aux, orth_weight=0.0)["balance"]
    loss.backward()
    return {id(p) for p in model.parameters() if p.grad is not None}


@pytest.mark.parametrize(
    ("name", "stacked"),
    # the task-at-a-time path differs only for task-specific updates
    [(n, True) for n in SPECS] + [(n, False) for n in ("tora", "tora_cp", "lora_stl")],
)
def test_autograd_reaches_exactly_the_trainable_set(name, stacked, one_thread):
    """Two steps (the second after an Adam update, when ToRA's core is no longer 0): every
    trainable tensor gets a gradient except the optional ones, nothing frozen gets one."""
    model = build_msam("tiny", NYU, seed=0, adapter=SPECS[name]).train()
    trainable = {id(p): n for n, p in model.trainable_named_parameters()}
    optional = {id(p) for _, p in model.optional_trainable_parameters()}
    opt = torch.optim.Adam([p for _, p in model.trainable_named_parameters()], lr=1e-2)
    torch.manual_seed(0)
    x = torch.rand(2, 3, 48, 64, generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        got = _step_grads(model, x, stacked=stacked)
        missing = sorted(trainable[i] for i in set(trainable) - optional - got)
        assert not missing, f"trainable tensors without a gradient: {missing}"
        assert got <= set(trainable)
        opt.step()
    # Optional tensors are named by the adapters themselves, and only where a step may skip
    # them: Conv-LoRA's experts when the gate has more than one to choose from.
    experts = {
        id(p) for a in adapters_of(model) if isinstance(a, ConvLoRA) for p in a.experts.parameters()
    }
    assert optional == (experts if name == "conv_lora" else set())
    if name == "conv_lora":
        assert got & experts  # some expert was picked ...
        gates = {id(p) for a in adapters_of(model) for p in a.gate.parameters()}
        assert gates <= got  # ... and the gate learns from the balancing term
    if name == "conv_lora_1":  # one expert: no choice, no balancing term: the gate is frozen
        gates = [p for a in adapters_of(model) for p in a.gate.parameters()]
        assert gates and not any(p.requires_grad for p in gates)
        assert all(a.num_parameters() == a.num_parameters_formula() for a in adapters_of(model))


# ------------------------------------------------------------------ the DDP matrix
NUM_TRAIN, NUM_VAL, BATCH = 8, 4, 2
METHODS = {
    "tora": ["adapter.method=tora"],
    "tora_cp": ["adapter.method=tora", "adapter.decomposition=cp", "adapter.rank=4"],
    "lora_stl": ["adapter.method=lora_stl"],
    "lora_hps": ["adapter.method=lora_hps"],
    # the paper's rank 3 / alpha 32 with 4 experts: the two global-attention blocks route 2
    # maps per step, so experts go unused
    "conv_lora": [
        "adapter.method=conv_lora",
        "adapter.rank=3",
        "adapter.alpha=32",
        "adapter.conv_experts=4",
        "adapter.dropout=0.1",
    ],
}
DETERMINISTIC = ("tora", "tora_cp", "lora_stl", "lora_hps")  # no dropout, no gate noise
MODES = {"stacked": "true", "task_at_a_time": "false"}
JOBS = [(m, mode) for m in METHODS for mode in MODES]  # Conv-LoRA last (see _matrix_worker)
# Two half-batch gradients all-reduced against one full-batch gradient: float rounding only,
# which Adam's normalised first steps amplify where a gradient is float noise (LoRA's B and
# ToRA's G start at 0; a decoder k_proj bias shifts a query's logits alike, which softmax
# cancels). Measured after 2 steps: val metrics within 1.1e-7 relative, trainable tensors within
# 7.5e-5 (relative Frobenius error per tensor; LoRA-HPS's B), k_proj biases 2.3e-5.
DP_METRIC_RTOL, DP_TENSOR_RTOL = 1e-4, 1e-3


def _config(out: Path, scenes: Path, method: str, mode: str, batch: int):
    return load_config(
        REPO / "configs" / "default.yaml",
        [
            "tracking.enabled=false",
            f"output_dir={out}",
            f"data.root={scenes}",
            f"data.scenes.num_train={NUM_TRAIN}",
            f"data.scenes.num_val={NUM_VAL}",
            f"train.batch_size={batch}",
            "train.epochs=1",
            "train.max_steps_per_epoch=2",
            "train.log_every=1000",
            "train.vis_samples=0",
            f"train.stacked={MODES[mode]}",
            *METHODS[method],
        ],
    )


def _matrix_worker(rank: int, port: int, plan: dict, out_dir: str) -> None:
    """Rank ``rank`` of 2: its share of the one-worker references (no process group yet:
    evaluation all-reduces whenever one exists), then every DDP job of the plan. Saves per job
    the metrics, this rank's final trainable tensors, and DDP's find_unused_parameters."""
    import torch.nn as nn

    from mtsam.train import loop
    from mtsam.train.context import local_context

    torch.set_num_threads(1)
    models, ddp_flags = [], []
    build = loop.build_model
    loop.build_model = lambda *a, **k: models.append(build(*a, **k)) or models[-1]
    ddp_init = nn.parallel.DistributedDataParallel.__init__

    def record_init(self, *args, **kwargs):
        ddp_flags.append(bool(kwargs.get("find_unused_parameters", False)))
        ddp_init(self, *args, **kwargs)

    nn.parallel.DistributedDataParallel.__init__ = record_init
    results: dict[str, dict] = {}

    def run(key: str, cfg, ctx) -> bool:
        try:
            metrics = loop.fit(cfg, ctx, log=lambda s: None)
        except Exception as e:  # reported to the test, which fails on it
            results[key] = {"error": f"{type(e).__name__}: {e}"[:2000]}
            return False
        results[key] = {
            "metrics": {k: float(v) for k, v in metrics.items()},
            "trainable": models[-1].trainable_state_dict(),
            "find_unused": ddp_flags[-1] if ctx.world_size > 1 else None,
        }
        return True

    for i, (key, cfg) in enumerate(plan["references"]):
        if i % 2 == rank:
            run(key, cfg, local_context())
    with gloo_rank(rank, port, timeout=timedelta(seconds=300)) as ctx:
        for key, cfg in plan["ddp"]:
            # After a failed step the ranks' collectives may be out of step: stop there.
            if not run(key, cfg, ctx):
                break
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    """{rank: {job key: result}} from one spawn of two gloo ranks."""
    tmp = tmp_path_factory.mktemp("ddp_matrix")
    scenes = tmp / "scenes"
    plan = {
        "references": [
            (f"ref/{m}/{mode}", _config(tmp / "o", scenes, m, mode, 2 * BATCH))
            for m, mode in JOBS
            if m in DETERMINISTIC
        ],
        "ddp": [
            (f"ddp/{m}/{mode}", _config(tmp / "o", scenes, m, mode, BATCH)) for m, mode in JOBS
        ],
    }
    data_root(plan["ddp"][0][1])  # generate the scenes once, before the ranks read them
    mp.spawn(_matrix_worker, args=(free_port(), plan, str(tmp)), nprocs=2, join=True)
    return {r: torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in (0, 1)}


def _result(matrix, rank: int, key: str) -> dict:
    got = matrix[rank].get(key)
    assert got is not None, f"{key} did not run on rank {rank} (an earlier job failed)"
    assert "error" not in got, f"{key} on rank {rank}: {got['error']}"
    return got


@pytest.mark.parametrize(("method", "mode"), JOBS)
def test_every_method_trains_on_two_gloo_ranks(matrix, method, mode):
    """Finite losses; DDP searches for unused tensors only for Conv-LoRA; both ranks hold the
    same tensors afterwards (every gradient was all-reduced, the experts one rank's gate did
    not pick included), and training moved them."""
    key = f"ddp/{method}/{mode}"
    r0, r1 = _result(matrix, 0, key), _result(matrix, 1, key)
    losses = {k: v for k, v in r0["metrics"].items() if k.startswith("train/loss/")}
    assert set(losses) == {f"train/loss/{t}" for t in ("semantic", "depth", "normal", "total")}
    assert all(math.isfinite(v) for v in losses.values()), losses
    assert all(math.isfinite(v) for k, v in r0["metrics"].items() if k.startswith("val/"))
    assert r0["find_unused"] is r1["find_unused"] is (method == "conv_lora")
    assert r0["trainable"].keys() == r1["trainable"].keys()
    for k, v in r0["trainable"].items():
        assert torch.equal(v, r1["trainable"][k]), k
    if method == "conv_lora":
        assert r0["metrics"]["train/balance"] > 0  # the balancing term reached the loss ...
        gate = [v for k, v in r0["trainable"].items() if k.endswith(".gate.w_gate")]
        assert gate and all(v.abs().sum() > 0 for v in gate)  # ... and moved the zero gates


@pytest.mark.parametrize(("method", "mode"), [j for j in JOBS if j[0] in DETERMINISTIC])
def test_two_workers_batch_b_equal_one_worker_batch_2b(matrix, method, mode):
    got = _result(matrix, 0, f"ddp/{method}/{mode}")
    ref_rank = [m for m in JOBS if m[0] in DETERMINISTIC].index((method, mode)) % 2
    want = _result(matrix, ref_rank, f"ref/{method}/{mode}")
    val = [k for k in want["metrics"] if k.startswith("val/")]
    assert val and set(val) <= set(got["metrics"])
    for k in val:
        assert got["metrics"][k] == pytest.approx(want["metrics"][k], rel=DP_METRIC_RTOL), k
    assert got["trainable"].keys() == want["trainable"].keys()
    assert any(".qkv." in k for k in want["trainable"])  # the adapters are in the comparison
    for k, v in want["trainable"].items():
        err = float((got["trainable"][k] - v).norm() / v.norm().clamp_min(1e-12))
        assert err <= DP_TENSOR_RTOL, (k, err)
