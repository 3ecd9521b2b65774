"""The worker loop in a bare process (no Ray): learning, resume, NaN stop, bad checkpoints, and
jobs/evaluate.py reproducing what the run reported.

One small run (tiny mSAM + ToRA, 32 generated training scenes, batch 4, 2 epochs) is shared by
the resume / evaluate / corrupt-checkpoint tests; the learnability test trains its own, longer;
two real gloo ranks check that each rank draws its own branch-dropout masks.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import mtsam.train.evaluate as evaluate_mod
from gloo import free_port, gloo_rank
from mtsam.adapters.dropout import BranchDropout
from mtsam.config import load_config
from mtsam.tasks import build_tasks, task_metric_directions
from mtsam.train import loop
from mtsam.train.context import local_context
from mtsam.train.data import eval_loader, open_split
from mtsam.train.evaluate import evaluate, flat_metrics
from mtsam.train.loop import (
    FAULT_NAN_ENV,
    NonFiniteLossError,
    build_model,
    data_root,
    fit,
    seed_epoch,
)
from mtsam.train.state import STATE_FILE, TrainCheckpointError, load_train_state

REPO = Path(__file__).resolve().parents[1]
NUM_TRAIN, NUM_VAL, BATCH = 32, 16, 4
STEPS_PER_EPOCH = NUM_TRAIN // BATCH


def small_config(out: Path, scenes: Path, *extra: str):
    """configs/default.yaml shrunk: dropout is 0 there, augmentation stays on (it is seeded by
    (seed, epoch, index), so it is part of what must replay exactly)."""
    return load_config(
        REPO / "configs" / "default.yaml",
        [
            "tracking.enabled=false",
            f"output_dir={out}",
            f"data.root={scenes}",
            f"data.scenes.num_train={NUM_TRAIN}",
            f"data.scenes.num_val={NUM_VAL}",
            f"train.batch_size={BATCH}",
            "train.epochs=2",
            "train.log_every=1000",
            "train.vis_samples=0",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("scenes")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, scenes):
    """An uninterrupted 2-epoch run: (config, per-epoch reports, checkpoint root, log lines)."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("reference")
    cfg = small_config(out, scenes)
    ctx = local_context(out / "ckpt")
    lines: list[str] = []
    fit(cfg, ctx, log=lines.append)
    return cfg, ctx.reports, out / "ckpt", lines


def _untrained_metrics(cfg) -> dict[str, float]:
    tasks = build_tasks(cfg.data.tasks, num_classes=cfg.data.classes)
    model = build_model(cfg, tasks=tasks, base=None)
    ds = _val_split(cfg)
    loader = eval_loader(ds, batch_size=BATCH, rank=0, world_size=1, workers=0)
    results = evaluate(model, loader, tasks, device=torch.device("cpu"))
    return flat_metrics(results, None, task_metric_directions(tasks))


def _val_split(cfg, split: str = "val"):
    return open_split(
        "scenes",
        data_root(cfg),
        split,
        fmt="files",
        tasks=cfg.data.tasks,
        num_classes=None,
        augment=False,
        seed=cfg.seed,
    )


def _constant_predictor_metrics(cfg) -> dict[str, float]:
    """The best image-independent predictions, fitted on the training split, scored on val with
    numpy (written here, independently of mtsam.tasks): the majority class, the median depth,
    the mean normal direction."""
    train, val = _val_split(cfg, "train"), _val_split(cfg, "val")

    def stack(ds, key):
        return np.stack([ds[i][key].numpy() for i in range(len(ds))])

    lab_t, lab_v = stack(train, "semantic"), stack(val, "semantic")
    majority = np.bincount(lab_t[lab_t >= 0].ravel()).argmax()
    valid = lab_v >= 0
    ious = []
    for c in range(cfg.data.classes):
        inter = np.sum(valid & (lab_v == c) & (majority == c))
        union = np.sum(valid & ((lab_v == c) | (majority == c)))
        if np.sum(valid & (lab_v == c)) > 0:  # classes absent from the split are skipped
            ious.append(inter / union)
    dep_t, dep_v = stack(train, "depth"), stack(val, "depth")
    median = np.median(dep_t[dep_t > 0])
    nrm_t = stack(train, "normal").transpose(0, 2, 3, 1).reshape(-1, 3)
    nrm_v = stack(val, "normal").transpose(0, 2, 3, 1).reshape(-1, 3)
    nrm_t = nrm_t[np.abs(nrm_t).sum(1) > 0]
    nrm_v = nrm_v[np.abs(nrm_v).sum(1) > 0]
    mean_dir = nrm_t.mean(0) / np.linalg.norm(nrm_t.mean(0))
    angles = np.degrees(np.arccos(np.clip(nrm_v @ mean_dir, -1.0, 1.0)))
    return {
        "val/semantic/miou": float(np.mean(ious)),
        "val/semantic/pixel_acc": float(np.mean(lab_v[valid] == majority)),
        "val/depth/abs_err": float(np.abs(dep_v[dep_v > 0] - median).mean()),
        "val/normal/mean_deg": float(angles.mean()),
    }


def test_tiny_msam_learns_every_task_well_beyond_untrained_and_constant(tmp_path, scenes):
    """Issue 4's learnability check: 6 epochs (48 steps of 4 images, lr 5e-3, no augmentation)
    on one CPU thread, about 20 s.

    Against the untrained model on the same val split: mIoU and pixel accuracy at least 3x, depth
    abs error at most 0.5x, normal mean angle at most 0.6x (measured: 5.3x, 5.0x, 0.26x, 0.40x).
    The untrained decoders output near-zero maps, so part of that is output scale alone; the
    model must also beat the best constant predictor of each task, computed here in numpy
    (majority class, median training depth, mean training normal): mIoU at least 2x, pixel
    accuracy +0.1, depth and normal errors at most 0.9x (measured: 3.6x, +0.21, 0.81x, 0.80x).
    """
    torch.set_num_threads(1)
    cfg = small_config(tmp_path, scenes, "train.epochs=6", "train.lr=5e-3", "data.augment=false")
    before = _untrained_metrics(cfg)
    constant = _constant_predictor_metrics(cfg)
    ctx = local_context(None)
    after = fit(cfg, ctx, log=lambda s: None)

    assert [r["epoch"] for r in ctx.reports] == [1, 2, 3, 4, 5, 6]
    shown = {k: (before[k], constant[k], after[k]) for k in constant}
    assert after["val/semantic/miou"] >= 3.0 * before["val/semantic/miou"], shown
    assert after["val/semantic/pixel_acc"] >= 3.0 * before["val/semantic/pixel_acc"], shown
    assert after["val/depth/abs_err"] <= 0.5 * before["val/depth/abs_err"], shown
    assert after["val/normal/mean_deg"] <= 0.6 * before["val/normal/mean_deg"], shown
    assert after["val/semantic/miou"] >= 2.0 * constant["val/semantic/miou"], shown
    assert after["val/semantic/pixel_acc"] >= constant["val/semantic/pixel_acc"] + 0.1, shown
    assert after["val/depth/abs_err"] <= 0.9 * constant["val/depth/abs_err"], shown
    assert after["val/normal/mean_deg"] <= 0.9 * constant["val/normal/mean_deg"], shown
    # The training loss fell too (the first epoch's mean against the last's).
    assert ctx.reports[-1]["train/loss/total"] < 0.8 * ctx.reports[0]["train/loss/total"]


def _trainable(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_train_state(ckpt)["trainable"]


def test_reference_run_reports_and_checkpoints_every_epoch(reference):
    cfg, reports, root, lines = reference
    assert [r["epoch"] for r in reports] == [1, 2]
    for r in reports:
        assert all(math.isfinite(v) for k, v in r.items() if isinstance(v, float)), r
        assert r["train/step_time_s"] > 0
    # train/lr is the rate of each epoch's last step: warm-up round(0.05 * 16) = 1 step, then
    # linear decay 1 - (s - 1) / 15 at step s (steps 7 and 15; the rate *after* the run is 0).
    assert (cfg.train.schedule, cfg.train.warmup_frac, STEPS_PER_EPOCH) == ("linear", 0.05, 8)
    expected = [cfg.train.lr * (1 - (s - 1) / 15) for s in (7, 15)]
    assert [r["train/lr"] for r in reports] == pytest.approx(expected, rel=1e-12)
    state = load_train_state(root / "checkpoint_0002")
    assert state["epoch"] == 1 and state["step"] == 2 * STEPS_PER_EPOCH
    assert state["config"] == cfg.to_dict()
    assert (root / "checkpoint_0002" / "adapter" / "adapter.safetensors").is_file()
    assert sum(line.startswith("[epoch ") for line in lines) == 2


def test_resume_after_stop_is_bit_exact(reference, tmp_path, monkeypatch):
    """Resuming from the epoch-1 checkpoint replays epoch 2 exactly (CPU, same thread count):
    identical trainable tensors, optimizer moments and every reported metric but timings."""
    cfg, reports, root, _ = reference
    ctx = local_context(tmp_path / "ckpt", resume=root / "checkpoint_0001")
    lines: list[str] = []
    seeded: list[tuple[int, int, int]] = []
    monkeypatch.setattr(
        loop, "seed_epoch", lambda *a: (seeded.append(a), seed_epoch(*a))[-1], raising=True
    )
    fit(cfg, ctx, log=lines.append)
    assert seeded == [(cfg.seed, 1, 0)]  # epoch 2 of rank 0 draws its own stream

    assert [r["epoch"] for r in ctx.reports] == [2]
    assert any(line.startswith(f"resumed from {root / 'checkpoint_0001'}") for line in lines)
    timing = ("train/step_time_s", "train/images_per_s", "checkpoint_path")
    got = {k: v for k, v in ctx.reports[0].items() if k not in timing}
    want = {k: v for k, v in reports[1].items() if k not in timing}
    assert got == want
    a = load_train_state(tmp_path / "ckpt" / "checkpoint_0002")
    b = load_train_state(root / "checkpoint_0002")
    assert a["step"] == b["step"]
    for k in b["trainable"]:
        assert torch.equal(a["trainable"][k], b["trainable"][k]), k
    for i, s in b["optimizer"]["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(a["optimizer"]["state"][i][name], s[name]), (i, name)


class _CountingObserver:
    """A loop observer whose state is the number of epochs it has seen."""

    def __init__(self) -> None:
        self.seen, self.loaded = 0, None

    def on_start(self, model, param_counts) -> None:
        pass

    def on_epoch(self, epoch, metrics, *, pictures, adapter_dir) -> None:
        self.seen += 1
        self.pictures = pictures

    def on_end(self, status, message="") -> None:
        pass

    def state_dict(self) -> dict:
        return {"seen": self.seen}

    def load_state_dict(self, state) -> None:
        self.loaded = dict(state)
        self.seen = state["seen"]


def test_observer_state_travels_in_checkpoints(reference, tmp_path):
    """Each checkpoint holds the observer's state after that epoch's hook; a resumed run hands
    it back before training (the tracker's best value survives a worker restart)."""
    cfg, _, _, _ = reference
    first = _CountingObserver()
    fit(cfg, local_context(tmp_path / "a"), log=lambda s: None, observer=first)
    states = [load_train_state(tmp_path / "a" / f"checkpoint_000{e}")["extra"] for e in (1, 2)]
    assert [s["observer"] for s in states] == [{"seen": 1}, {"seen": 2}]
    resumed = _CountingObserver()
    ctx = local_context(tmp_path / "b", resume=tmp_path / "a" / "checkpoint_0001")
    fit(cfg, ctx, log=lambda s: None, observer=resumed)
    assert resumed.loaded == {"seen": 1} and resumed.seen == 2


def test_nan_stops_with_task_and_step_and_keeps_last_good_checkpoint(
    reference, tmp_path, monkeypatch
):
    cfg, _, ref_root, _ = reference
    bad_step = STEPS_PER_EPOCH + 2  # the third optimizer step of epoch 2
    monkeypatch.setenv(FAULT_NAN_ENV, f"{bad_step}:depth")
    ctx = local_context(tmp_path / "ckpt")
    with pytest.raises(NonFiniteLossError, match=rf"task 'depth' at step {bad_step}\b"):
        fit(cfg, ctx, log=lambda s: None)
    kept = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert kept == ["checkpoint_0001"]
    assert ctx.reports[-1]["epoch"] == 2 and "depth" in ctx.reports[-1]["error"]
    # The kept checkpoint is the good epoch-1 state (equal to the uninterrupted run's).
    good, ref = (
        _trainable(tmp_path / "ckpt" / "checkpoint_0001"),
        _trainable(ref_root / "checkpoint_0001"),
    )
    assert all(torch.equal(good[k], ref[k]) for k in ref)


def _load_job(name: str):
    jobs = str(REPO / "jobs")
    if jobs not in sys.path:
        sys.path.insert(0, jobs)
    spec = importlib.util.spec_from_file_location(f"mtsam_job_{name}", REPO / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _config_help(job: str, capsys) -> str:
    """The ``--config`` entry of ``jobs/<job>.py --help``, whitespace folded."""
    with pytest.raises(SystemExit) as e:
        _load_job(job).main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    entry = out.split("\n  --config CONFIG", 1)[1].split("\n  --set KEY=VALUE", 1)[0]
    return " ".join(entry.split())


def test_evaluate_help_gives_the_config_defaults_it_uses(capsys):
    """--checkpoint falls back to the config stored in the run, --adapter to
    configs/default.yaml: neither to the built-in defaults, which train.py's help names."""
    evaluate_help = _config_help("evaluate", capsys)
    assert "built-in defaults" not in evaluate_help, evaluate_help
    assert "with --checkpoint: only its data section is used" in evaluate_help, evaluate_help
    assert "(default: the config stored in the checkpoint)" in evaluate_help, evaluate_help
    assert "with --adapter: data and evaluation settings" in evaluate_help, evaluate_help
    assert "(default: configs/default.yaml)" in evaluate_help, evaluate_help
    assert _load_job("evaluate").DEFAULT_CONFIG.endswith("/configs/default.yaml")
    assert _config_help("train", capsys) == "experiment YAML (default: built-in defaults)"


def test_corrupt_checkpoint_gives_a_clear_error(reference, tmp_path, capsys):
    cfg, _, root, _ = reference
    broken = tmp_path / "broken"
    shutil.copytree(root / "checkpoint_0002", broken)
    path = broken / STATE_FILE
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])

    with pytest.raises(TrainCheckpointError, match=rf"{path}: unreadable"):
        load_train_state(broken)
    with pytest.raises(TrainCheckpointError, match=str(path)):
        fit(cfg, local_context(None, resume=broken), log=lambda s: None)

    evaluate_job = _load_job("evaluate")
    capsys.readouterr()
    assert evaluate_job.main(["--checkpoint", str(broken)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and str(path) in err and "\n" not in err
    assert evaluate_job.main(["--checkpoint", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert "nowhere: no such folder" in err and "\n" not in err
    good = str(root / "checkpoint_0002")
    assert evaluate_job.main(["--checkpoint", good, "--set", "data.num_classes=4"]) == 2
    err = capsys.readouterr().err.strip()
    assert "trained for tasks ['semantic', 'depth', 'normal'] with 6 classes" in err
    assert "\n" not in err
    # another random base (seed) would give other metrics without a word: refused
    assert evaluate_job.main(["--checkpoint", good, "--set", "seed=5"]) == 2
    err = capsys.readouterr().err.strip()
    assert "trained on base weights random-init:tiny:seed=0, this evaluation would use " in err
    assert "random-init:tiny:seed=5" in err and "\n" not in err
    # a data root that is a file: one line naming it
    (tmp_path / "afile").write_text("x")
    assert evaluate_job.main(["--checkpoint", good, "--set", f"data.root={tmp_path}/afile"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and f"{tmp_path}/afile" in err and "\n" not in err
    # a --json path that cannot be written fails before the evaluation, leaving nothing
    assert evaluate_job.main(["--checkpoint", good, "--json", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: --json {tmp_path}: expected a file in an existing folder"
    assert sorted(
        p.name for p in tmp_path.parent.iterdir() if p.name.startswith(tmp_path.name)
    ) == [tmp_path.name]
    if not torch.cuda.is_available():  # --device cuda without a GPU: refused up front
        assert evaluate_job.main(["--checkpoint", good, "--device", "cuda"]) == 2
        err = capsys.readouterr().err.strip()
        assert err == "error: --device cuda: no GPU is visible (torch.cuda.is_available() is False)"


def test_evaluate_cli_reproduces_the_metrics_the_run_reported(
    reference, tmp_path, capsys, monkeypatch
):
    """jobs/evaluate.py in a fresh process, on the epoch-1 checkpoint and on its adapter folder,
    gives the val metrics reported for epoch 1 (same split, same batches: equal to 1e-9)."""
    cfg, reports, root, _ = reference
    want = {k: v for k, v in reports[0].items() if k.startswith("val/")}
    env = dict(os.environ, PYTHONPATH="", OMP_NUM_THREADS="1")
    out = tmp_path / "metrics.json"
    proc = subprocess.run(
        [
            sys.executable,
            "jobs/evaluate.py",
            "--checkpoint",
            str(root / "checkpoint_0001"),
            "--json",
            str(out),
            "--device=cpu",  # the run trained on the CPU in fp32 (a GPU would evaluate in bf16)
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "val/semantic/miou" in proc.stdout and "checkpoint_0001 (epoch 1)" in proc.stdout
    got = json.loads(out.read_text())
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-9, abs=1e-12), k

    # The adapter folder alone (plus data settings) rebuilds the same model.
    evaluate_job = _load_job("evaluate")
    data_args = [
        "--device=cpu",
        f"--set=output_dir={cfg.output_dir}",
        f"--set=data.root={cfg.data.root}",
        f"--set=data.scenes.num_train={NUM_TRAIN}",
        f"--set=data.scenes.num_val={NUM_VAL}",
        f"--set=train.batch_size={BATCH}",
    ]
    out2 = tmp_path / "adapter.json"
    adapter = str(root / "checkpoint_0001" / "adapter")
    assert evaluate_job.main(["--adapter", adapter, "--json", str(out2), *data_args]) == 0
    got2 = json.loads(out2.read_text())
    for k, v in want.items():
        assert got2[k] == pytest.approx(v, rel=1e-9, abs=1e-12), k
    # The adapter fixes the model: a model or adapter override would be ignored, so refused.
    capsys.readouterr()
    for key in ("adapter.r1=8", "model.preset=vit_b"):
        assert evaluate_job.main(["--adapter", adapter, f"--set={key}", *data_args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: --set {key.partition('=')[0]}: --adapter fixes the model")
    # ... but the attention kernel still applies (segment-anything's own: the same metrics).
    import mtsam.model.attention

    switched: list[object] = []
    monkeypatch.setattr(mtsam.model.attention, "use_sdpa_attention", switched.append)
    out3 = tmp_path / "sam_attention.json"
    args = ["--adapter", adapter, "--set=model.attention=sam", "--json", str(out3), *data_args]
    assert evaluate_job.main(args) == 0
    assert switched == []  # kept segment-anything's attention
    got3 = json.loads(out3.read_text())
    for k, v in want.items():
        assert got3[k] == pytest.approx(v, rel=1e-5, abs=1e-7), k


def test_each_rank_and_epoch_draws_its_own_dropout_masks():
    """Data-parallel ranks start from one seed (to build one model): the per-epoch seeding
    gives each (epoch, rank) its own branch-dropout masks, and the same masks again when
    replayed (a resumed run)."""
    drop = BranchDropout(0.5).train()
    x = torch.ones(64, 32)

    def mask(epoch: int, rank: int) -> torch.Tensor:
        torch.manual_seed(0)  # what every rank did before building the model
        seed_epoch(0, epoch, rank)
        return drop(x)[0]

    masks = {(e, r): mask(e, r) for e in (0, 1) for r in (0, 1)}
    keys = list(masks)
    for i, a in enumerate(keys):
        for b in keys[i + 1 :]:
            assert not torch.equal(masks[a], masks[b]), (a, b)
    assert torch.equal(mask(1, 1), masks[(1, 1)])


def _two_rank_worker(rank: int, port: int, cfg, out_dir: str) -> None:
    """One of two gloo ranks running ``fit``; saves the first branch-dropout mask of each epoch
    and the (seed, epoch, rank) the loop seeded with."""
    import mtsam.adapters.dropout as dropout_mod

    seeded: list[tuple[int, int, int]] = []
    first_masks: dict[int, torch.Tensor] = {}
    real_keep_mask = dropout_mod.keep_mask

    def seed(*args):
        seeded.append(args)
        return seed_epoch(*args)

    def keep_mask(*args, **kwargs):
        m = real_keep_mask(*args, **kwargs)
        first_masks.setdefault(seeded[-1][1], m.clone())
        return m

    loop.seed_epoch, dropout_mod.keep_mask = seed, keep_mask
    with gloo_rank(rank, port) as ctx:
        fit(cfg, ctx, log=lambda s: None)
    torch.save({"seeded": seeded, "masks": first_masks}, os.path.join(out_dir, f"rank{rank}.pt"))


def test_two_data_parallel_ranks_draw_different_dropout_masks(scenes, tmp_path):
    """``fit`` on two real gloo ranks seeds each epoch with its own rank, so the ranks' first
    branch-dropout masks differ (same model seed, same mask shape), and differ across epochs."""
    cfg = small_config(tmp_path / "o", scenes, "adapter.dropout=0.3", "train.max_steps_per_epoch=1")
    data_root(cfg)  # generate the scenes once, before the ranks read them
    mp.spawn(_two_rank_worker, args=(free_port(), cfg, str(tmp_path)), nprocs=2, join=True)
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for r in (0, 1):
        assert got[r]["seeded"] == [(cfg.seed, 0, r), (cfg.seed, 1, r)]
        assert sorted(got[r]["masks"]) == [0, 1]
    for e in (0, 1):
        a, b = got[0]["masks"][e], got[1]["masks"][e]
        assert a.shape == b.shape and not torch.equal(a, b), e
    assert not torch.equal(got[0]["masks"][0], got[0]["masks"][1])


@pytest.mark.parametrize(
    ("method", "base_dtype"),
    [("tora", "float32"), ("tora", "bfloat16"), ("lora_hps", "float32")],
)
def test_fit_under_bf16_autocast(scenes, tmp_path, monkeypatch, method, base_dtype):
    """The GPU default (bf16 autocast, the frozen base in float32 or held in bf16), run on CPU
    autocast: training, evaluation and the prediction pictures go through (with activation
    checkpointing), and the losses and metrics stay close to the float32 run's."""
    extra = [f"adapter.method={method}", "train.max_steps_per_epoch=2", "train.epochs=1"]
    extra.append("train.vis_samples=1")
    cfg = small_config(tmp_path / "o", scenes, *extra, "train.activation_checkpointing=true")
    want = fit(cfg, local_context(), log=lambda s: None)

    def cpu_bf16(device, precision):
        return torch.autocast("cpu", dtype=torch.bfloat16)

    monkeypatch.setattr(loop, "autocast_for", cpu_bf16)
    monkeypatch.setattr(evaluate_mod, "autocast_for", cpu_bf16)
    # base_dtype=bfloat16 is refused without a GPU: set it past the config's check
    model = cfg.model.model_copy(update={"base_dtype": base_dtype})
    observer = _CountingObserver()
    got = fit(
        cfg.model_copy(update={"model": model}),
        local_context(),
        observer=observer,
        log=lambda s: None,
    )
    assert list(observer.pictures) == ["sample0"]
    # the run did compute in bf16 (the losses and metrics differ, if only slightly)
    assert any(got[k] != want[k] for k in want if k.startswith(("train/loss/", "val/")))
    for k in (k for k in want if k.startswith(("train/loss/", "val/"))):
        assert got[k] == pytest.approx(want[k], rel=5e-2, abs=1e-2), k


def test_resume_with_branch_dropout_replays_its_masks(scenes, tmp_path):
    """The default config trains without dropout; with it, a resumed run must draw the masks
    the uninterrupted run drew (equal tensors after epoch 2), and the masks must matter (the
    dropout-free run ends elsewhere)."""
    torch.set_num_threads(1)
    short = ["adapter.dropout=0.3", "train.max_steps_per_epoch=2"]
    cfg = small_config(tmp_path / "o", scenes, *short)
    fit(cfg, local_context(tmp_path / "a"), log=lambda s: None)
    ctx = local_context(tmp_path / "b", resume=tmp_path / "a" / "checkpoint_0001")
    fit(cfg, ctx, log=lambda s: None)
    a, b = (_trainable(tmp_path / d / "checkpoint_0002") for d in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    plain = small_config(tmp_path / "o", scenes, "train.max_steps_per_epoch=2")
    fit(plain, local_context(tmp_path / "c"), log=lambda s: None)
    c = _trainable(tmp_path / "c" / "checkpoint_0002")
    assert any(not torch.equal(a[k], c[k]) for k in a if "adapter" in k or ".U" in k)
