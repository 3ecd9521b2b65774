"""Search-space parsing, sample application, the parameter budget, and the jobs' start-up
errors (no Ray cluster needed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from ray import tune

from mtsam.config import build_config
from mtsam.model.msam import build_msam
from mtsam.tasks import build_tasks
from mtsam.train.loop import adapter_spec_of
from mtsam.tune.driver import apply_sample, count_trainable
from mtsam.tune.space import make_scheduler, make_searcher, overrides_of, tune_space
from mtsam.tune.sweep import plan

REPO = Path(__file__).resolve().parents[1]


def run_job(job: str, args: list[str], cwd: Path, **kw) -> subprocess.CompletedProcess:
    """jobs/<job> with ``args`` in a fresh process; stdout and stderr captured as text."""
    cmd = [sys.executable, str(REPO / "jobs" / job), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=cwd, **kw)


SPACE = [
    "tune.space.adapter.r1={type: choice, values: [4, 8]}",
    "tune.space.adapter.method={type: grid, values: [tora, lora_hps]}",
    "tune.space.train.lr={type: loguniform, low: 1.0e-4, high: 1.0e-2}",
    "tune.space.adapter.dropout={type: uniform, low: 0.0, high: 0.3}",
    "tune.space.adapter.rank={type: randint, low: 2, high: 6}",
    "tune.space.adapter.orth_weight={type: loguniform, low: 1.0e-3, high: 1.0, include_zero: true}",
]


def test_each_distribution_maps_to_its_tune_domain():
    space = tune_space(build_config({}, SPACE).tune.space)
    assert isinstance(space["adapter.r1"], tune.search.sample.Categorical)
    assert space["adapter.r1"].categories == [4, 8]
    assert space["adapter.method"] == {"grid_search": ["tora", "lora_hps"]}
    lr = space["train.lr"]
    assert isinstance(lr, tune.search.sample.Float) and (lr.lower, lr.upper) == (1e-4, 1e-2)
    assert isinstance(lr.get_sampler(), tune.search.sample.LogUniform)
    assert isinstance(space["adapter.dropout"].get_sampler(), tune.search.sample.Uniform)
    assert isinstance(space["adapter.rank"], tune.search.sample.Integer)
    assert (space["adapter.rank"].lower, space["adapter.rank"].upper) == (2, 6)
    assert space["adapter.orth_weight@zero"].categories == [False, True]


def test_samples_stay_in_range():
    space = tune_space(build_config({}, SPACE).tune.space)
    rng = np.random.default_rng(0)
    lrs = [space["train.lr"].sample(random_state=rng) for _ in range(200)]
    assert min(lrs) >= 1e-4 and max(lrs) <= 1e-2
    # log-uniform: about half the samples below the geometric mean 1e-3
    assert 0.35 < np.mean(np.array(lrs) < 1e-3) < 0.65
    ranks = {space["adapter.rank"].sample(random_state=rng) for _ in range(200)}
    assert ranks == {2, 3, 4, 5}  # randint excludes high


def test_include_zero_companion_sets_exactly_zero():
    sample = {"adapter.orth_weight": np.float64(0.3), "adapter.orth_weight@zero": True}
    assert overrides_of(sample) == {"adapter.orth_weight": 0.0}
    sample["adapter.orth_weight@zero"] = False
    got = overrides_of(sample)
    assert got == {"adapter.orth_weight": 0.3} and type(got["adapter.orth_weight"]) is float


def test_apply_sample_validates():
    base = build_config({}).to_dict()
    cfg = apply_sample(base, {"adapter.r1": 4, "train.lr": 0.01})
    assert cfg.adapter.r1 == 4 and cfg.train.lr == 0.01
    with pytest.raises(ValueError, match="r1"):
        apply_sample(base, {"adapter.r1": 0})


def _sampled_configs(kind: str, seed: int, num_samples: int = 6) -> list[dict]:
    """The configurations Tune's own variant generator hands out (no Ray cluster needed)."""
    from ray.tune.experiment import Experiment

    gen = make_searcher(kind, metric="m", mode="max", seed=seed, max_concurrent=0)
    space = tune_space(build_config({}, SPACE).tune.space)
    gen.add_configurations(
        [Experiment("x", run=lambda config: None, config=space, num_samples=num_samples)]
    )
    configs = []
    while (trial := gen.next_trial()) is not None:
        configs.append(trial.config)
    return configs


def test_random_search_is_seeded():
    first, again, other = (_sampled_configs("random", s) for s in (0, 0, 1))
    # 6 samples x a 2-point grid over adapter.method
    assert len(first) == 12
    assert first == again
    assert first != other


def test_searchers_and_schedulers():
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.basic_variant import BasicVariantGenerator
    from ray.tune.search.optuna import OptunaSearch

    gen = make_searcher("random", metric="m", mode="max", seed=0, max_concurrent=3)
    assert isinstance(gen, BasicVariantGenerator) and gen.max_concurrent == 3
    optuna = make_searcher("optuna", metric="m", mode="max", seed=0, max_concurrent=2)
    assert isinstance(optuna, ConcurrencyLimiter) and optuna.max_concurrent == 2
    assert isinstance(optuna.searcher, OptunaSearch)
    with pytest.raises(ValueError, match=r"tune\.searcher"):
        make_searcher("hyperopt", metric="m", mode="max", seed=0, max_concurrent=1)
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    asha = make_scheduler("asha", max_epochs=4, grace_period=1, reduction_factor=2)
    assert isinstance(asha, ASHAScheduler)
    assert isinstance(
        make_scheduler("fifo", max_epochs=4, grace_period=1, reduction_factor=2), FIFOScheduler
    )


@pytest.mark.parametrize(
    "overrides",
    [
        ["adapter.method=tora", "adapter.r1=4", "adapter.r2=6", "adapter.r3=2"],
        ["adapter.method=lora_stl", "adapter.rank=3"],
        ["adapter.method=conv_lora", "adapter.rank=2", "adapter.conv_experts=3"],
        ["adapter.method=none"],
    ],
)
def test_meta_count_equals_built_model(overrides):
    cfg = build_config({}, overrides)
    tasks = build_tasks(cfg.data.tasks, num_classes=cfg.data.classes)
    real = build_msam("tiny", [(t.name, t.channels) for t in tasks], adapter=adapter_spec_of(cfg))
    assert count_trainable(cfg) == sum(p.numel() for p in real.parameters() if p.requires_grad)


def test_plan_checks_metric_and_baseline():
    assert (
        plan(
            build_config(
                {},
                [
                    "data.baseline.semantic.miou=0.1",
                    "data.baseline.depth.abs_err=1",
                    "data.baseline.normal.mean_deg=40",
                ],
            )
        ).mode
        == "max"
    )
    with pytest.raises(
        ValueError, match=r"needs data\.baseline for every task; missing \['semantic'"
    ):
        plan(build_config({}))
    assert plan(build_config({}, ["tune.metric=val/depth/abs_err"])).mode == "min"
    with pytest.raises(ValueError, match=r"tune\.metric = 'val/depth/miou': depth reports no"):
        build_config({}, ["tune.metric=val/depth/miou"])  # before any plan


def test_bad_space_fails_before_anything_runs(tmp_path):
    """Through the real CLI: exit 2 with one line naming the key; no Ray, no output folder."""
    out = tmp_path / "out"
    r = run_job(
        "tune.py",
        [
            "--set",
            f"output_dir={out}",
            "--set",
            "tune.space.adapter.r9={type: choice, values: [1]}",
        ],
        tmp_path,
    )
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("config error: ") and "default.yaml" in last
    assert "tune.space.adapter.r9: no such config key" in last
    assert not out.exists()


@pytest.mark.parametrize("job", ["train.py", "tune.py"])
def test_resume_of_a_folder_that_is_no_run_fails_in_one_line(job, tmp_path):
    """`--resume` on a folder without the saved config: exit 2, one line naming the folder and
    the missing file and both jobs; nothing is written into the folder."""
    folder = tmp_path / "not-a-run"
    folder.mkdir()
    r = run_job(job, ["--resume", str(folder)], tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr[-2000:]
    assert lines[0].startswith(f"error: --resume {folder.resolve()}: no mtsam_config.yaml there")
    assert "jobs/train.py or jobs/tune.py" in lines[0]
    assert list(folder.iterdir()) == []


def _refusal_case(case: str, job: str, tmp_path):
    """(extra CLI args, what the one-line error must contain, a check that nothing changed)."""
    import torch

    out = tmp_path / "out"
    if case == "existing name":
        run = out / "ray_results" / "r1"
        run.mkdir(parents=True)
        (run / "keep.txt").write_text("old run")
        return (
            ["--set", f"output_dir={out}", "--name", "r1"],
            f"--name r1: {run} already exists; pass --resume",
            lambda: sorted(p.name for p in run.iterdir()) == ["keep.txt"],
        )
    if case == "resume with name":
        run = out / "ray_results" / "r1"
        run.mkdir(parents=True)
        (run / "mtsam_config.yaml").write_text("{}\n")
        return (
            ["--resume", str(run), "--name", "r2"],
            "--resume takes the config and name of the run it continues; drop --name",
            lambda: (
                sorted(p.name for p in out.rglob("*")) == ["mtsam_config.yaml", "r1", "ray_results"]
            ),
        )
    if case == "resume of the other job's folder":
        run = out / "ray_results" / "r1"
        run.mkdir(parents=True)
        (run / "mtsam_config.yaml").write_text("{}\n")
        if job == "train.py":  # a sweep folder
            (run / "tuner.pkl").write_bytes(b"")
        expect = (
            "a sweep folder; continue it with jobs/tune.py --resume"
            if job == "train.py"
            else "not a sweep folder (no tuner.pkl); continue a run of jobs/train.py with"
        )
        before = sorted(p.name for p in run.iterdir())
        return (
            ["--resume", str(run)],
            expect,
            lambda: sorted(p.name for p in run.iterdir()) == before,
        )
    if case == "output_dir is a file":
        out.write_text("not a folder")
        return (
            ["--set", f"output_dir={out}"],
            f"output_dir {out}: exists and is not a folder",
            lambda: out.read_text() == "not a folder",
        )
    if case == "unreachable tracking server":
        return (
            ["--set", f"output_dir={out}", "--set", "tracking.uri=http://127.0.0.1:9"],
            "tracking.uri: ",
            lambda: not (out / "ray_results").exists() and not (out / "mlflow.db").exists(),
        )
    if case == "GPU shares for several workers":
        sets = [f"output_dir={out}", "scaling.use_gpu=true", "scaling.num_workers=2"]
        sets.append("scaling.gpus_per_worker=0.5")
        return (
            [a for s in sets for a in ("--set", s)],
            "scaling.gpus_per_worker = 0.5 with scaling.num_workers = 2: NCCL needs a whole GPU",
            lambda: not out.exists(),
        )
    if case == "name with a slash":
        return (
            ["--set", f"output_dir={out}", "--name", "../escape"],
            "run name '../escape' (from --name or the config's name): expected a plain folder",
            lambda: not out.exists() and not (tmp_path / "escape").exists(),
        )
    if case == "raw folder as shards":
        (tmp_path / "raw" / "train").mkdir(parents=True)
        sets = ["data.dataset=nyuv2", f"data.root={tmp_path / 'raw'}", "data.format=shards"]
        return (
            [a for s in [f"output_dir={out}", *sets] for a in ("--set", s)],
            f"{tmp_path / 'raw' / 'manifest.json'}",
            lambda: not out.exists(),
        )
    if case == "too few samples":
        sets = [f"output_dir={out}", "data.scenes.num_train=2", "data.scenes.num_val=1"]
        sets += ["data.scenes.height=16", "data.scenes.width=16", "train.batch_size=3"]
        return (
            [a for s in sets for a in ("--set", s)],
            "train.batch_size = 3 x train.grad_accum = 1 x 1 workers needs 3 training samples",
            lambda: not (out / "ray_results").exists(),  # the scenes cache is complete and kept
        )
    ckpt = tmp_path / "sam.pth"
    if case == "truncated checkpoint":
        torch.save({"image_encoder.pos_embed": torch.zeros(1, 4, 4, 64)}, ckpt)
        ckpt.write_bytes(ckpt.read_bytes()[:100])
        expect = f"checkpoint {ckpt} (preset 'tiny'): could not be read as a PyTorch checkpoint"
    else:  # a readable state dict that is not the preset's
        torch.save({"image_encoder.pos_embed": torch.zeros(1, 4, 4, 64)}, ckpt)
        expect = f"model.checkpoint {ckpt} does not fit preset 'tiny'"
    return (
        ["--set", f"output_dir={out}", "--set", f"model.checkpoint={ckpt}"],
        expect,
        lambda: not out.exists(),
    )


@pytest.mark.parametrize("job", ["train.py", "tune.py"])
@pytest.mark.parametrize(
    "case",
    [
        "existing name",
        "resume with name",
        "resume of the other job's folder",
        "name with a slash",
        "GPU shares for several workers",
        "output_dir is a file",
        "unreachable tracking server",
        "truncated checkpoint",
        "checkpoint of no preset",
        "raw folder as shards",
        "too few samples",
    ],
)
def test_bad_start_fails_in_one_line_before_ray(job, case, tmp_path):
    """A run never reuses a folder (Ray would silently continue or mix into it), and a bad base
    checkpoint or dataset is refused in the driver: exit 2, one line, no Ray started, nothing
    written."""
    args, expect, unchanged = _refusal_case(case, job, tmp_path)
    r = run_job(job, args, tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0], r.stderr[-2000:]
    assert "Ray" not in r.stdout + r.stderr
    assert unchanged()


@pytest.mark.parametrize("job", ["train.py", "tune.py"])
def test_more_cpus_than_the_local_ray_has_fails_instead_of_waiting(job, tmp_path):
    """A local Ray never grows: asking it for more CPUs than the machine has would wait forever
    (Ray's autoscaler only warns). The job shuts its Ray down and names the fields."""
    import os

    cpus = os.cpu_count() or 1
    sets = [
        f"output_dir={tmp_path / 'out'}",
        "data.scenes.num_train=8",
        "data.scenes.num_val=2",
        f"scaling.cpus_per_worker={cpus + 1}",
    ]
    r = run_job(
        job,
        [a for s in sets for a in ("--set", s)],
        tmp_path,
        env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
    )
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: scaling: one run needs {cpus + 1}") and "local Ray" in last
    assert not (tmp_path / "out" / "ray_results").exists()


def test_checkpoints_rank_by_their_metric_in_its_direction():
    """An explicit tune.mode is the direction of tune.metric only: train.py ranks checkpoints
    by delta_m (higher is better) even when the sweep metric is an error to minimise."""
    from mtsam.train.runner import score_order

    full = [
        "data.baseline.semantic.miou=0.1",
        "data.baseline.depth.abs_err=1",
        "data.baseline.normal.mean_deg=40",
    ]
    cfg = build_config({}, [*full, "tune.metric=val/depth/abs_err", "tune.mode=min"])
    assert score_order(cfg, "val/delta_m") == "max"
    assert score_order(cfg, "val/depth/abs_err") == "min"
    forced = build_config({}, ["tune.metric=val/semantic/miou", "tune.mode=min"])
    assert score_order(forced, "val/semantic/miou") == "min"  # as the user asked
    assert score_order(build_config({}), "val/normal/within_30") == "max"


def test_trial_id_is_read_from_tune_folder_names():
    """A trial that failed before reporting has no trial_id in its metrics: the summary and
    the MLflow bookkeeping (ending its run FAILED) read it from the folder Ray Tune names."""
    import ray.tune
    from ray.tune.experiment import Trial

    from mtsam.tune.driver import trial_driver, trial_id_of_folder

    ray.tune.register_trainable(trial_driver.__name__, lambda config: None)  # no Ray started
    tag = "0_adapter_method=tora,train_lr=0.0019"
    for trial in (
        Trial(trial_driver.__name__, config={}, experiment_tag=tag, trial_id="e1d52_00003"),
        Trial(trial_driver.__name__, config={}, experiment_tag=tag),  # Ray's own id form
    ):
        folder = f"/results/sweep/{trial._generate_dirname()}"
        assert trial_id_of_folder(folder) == trial.trial_id, folder
    assert trial_id_of_folder("/results/sweep/elsewhere") == "elsewhere"


def test_a_sweep_checks_the_largest_batch_its_space_can_sample(tmp_path):
    """A batch size the search space can sample but the dataset cannot fill would fail every
    such trial in its workers: the sweep is refused up front, naming the space entry."""
    from mtsam.config import build_config
    from mtsam.train import runner

    sets = [f"output_dir={tmp_path}", "data.scenes.num_train=6", "data.scenes.num_val=1"]
    sets += ["data.scenes.height=16", "data.scenes.width=16", "train.batch_size=2"]
    grid = build_config({}, [*sets, "tune.space.train.batch_size={type: grid, values: [2, 4]}"])
    runner.prepare_data(grid, sweep=True)  # 4 x 1 x 1 <= 6
    accum = build_config(
        {},
        [
            *sets,
            "tune.space.train.batch_size={type: choice, values: [2, 4]}",
            "tune.space.train.grad_accum={type: randint, low: 1, high: 3}",  # 1 or 2
        ],
    )
    with pytest.raises(
        ValueError,
        match=r"^tune\.space\.train\.batch_size up to 4 x tune\.space\.train\.grad_accum up "
        r"to 2 x 1 workers needs 8 training samples; .* has 6$",
    ):
        runner.prepare_data(accum, sweep=True)
    runner.prepare_data(accum)  # a plain run ignores the space: 2 x 1 x 1


@pytest.mark.parametrize("storage", ["local", "s3://bucket/results"])
def test_a_trials_run_folder_and_spool_are_inside_the_sweeps_folder(tmp_path, storage):
    """One folder holds a whole sweep: each trial's Ray Train run is ``<sweep>/train-<id>``,
    and its MLflow spool sits in that run folder (for URI storage, in the node-local spool
    folder of the sweep), so ``sync_mlflow.py --spool <sweep folder>`` finds every trial's."""
    from mtsam.tracking.observer import spool_dir_of
    from mtsam.tracking.spool import Spool, find_spools
    from mtsam.tune.driver import SweepContext, trial_run_folder, trial_tracking

    storage = str(tmp_path / "ray_results") if storage == "local" else storage
    spool_root = str(tmp_path / "ray_results") if "://" not in storage else str(tmp_path / "sp")
    ctx = SweepContext(
        base_config={},
        storage=storage,
        sweep_name="sweep-1",
        metric="val/delta_m",
        mode="max",
        tracking={"uri": "http://127.0.0.1:1", "spool_root": spool_root},
    )
    run_storage, name = trial_run_folder(ctx, "e1d52_00003")
    assert (run_storage, name) == (f"{storage.rstrip('/')}/sweep-1", "train-e1d52_00003")
    info = trial_tracking(ctx, "e1d52_00003")
    assert info["run_name"] == "e1d52_00003" and info["uri"] == "http://127.0.0.1:1"
    spool = spool_dir_of(info)
    sweep_spools = Path(spool_root) / "sweep-1"
    assert spool == sweep_spools / "train-e1d52_00003" / "mlflow_spool"
    if "://" not in storage:
        assert spool.parent == Path(run_storage) / name  # in the trial's own Ray Train folder
    Spool(spool).append({"run_name": "e1d52_00003"}, [])
    assert [s.path for s in find_spools(sweep_spools)] == [Spool(spool).path]
    assert trial_tracking(SweepContext({}, storage, "sweep-1", "m", "max"), "x") is None


def test_launch_makes_relative_local_paths_absolute(tmp_path, monkeypatch):
    """Ray Train runs workers in their run's folder, so the job resolves relative paths against
    the folder it was launched from before any worker sees the config; URIs stay as given."""
    from mtsam.train.runner import with_absolute_paths

    monkeypatch.chdir(tmp_path)
    cfg = build_config(
        {},
        [
            "output_dir=out",
            "data.root=data/scenes",
            "model.checkpoint=~/ckpt/sam.pth",
            "scaling.storage_path=runs",
        ],
    )
    got = with_absolute_paths(cfg)
    assert got.output_dir == str(tmp_path / "out")
    assert got.data.root == str(tmp_path / "data" / "scenes")
    assert got.model.checkpoint == str(Path("~/ckpt/sam.pth").expanduser())
    assert got.scaling.storage_path == str(tmp_path / "runs")
    for key in ("train", "adapter", "tune", "tracking"):
        assert getattr(got, key) == getattr(cfg, key)
    absolute = build_config({}, [f"output_dir={tmp_path}"])
    assert with_absolute_paths(absolute) is absolute  # nothing to change


def test_relative_outputs_go_to_a_durable_root_inside_a_submitted_job(tmp_path, monkeypatch):
    """``ray job submit`` runs the job in Ray's temporary copy of the working folder: there a
    relative output_dir (and storage path) resolve under ~/mtsam_outputs, or
    $MTSAM_OUTPUT_ROOT, while inputs (data.root) still resolve against the working folder.
    Outside a job $MTSAM_OUTPUT_ROOT applies too; without it, the launch folder."""
    from mtsam.storage import local_output_dir
    from mtsam.tracking.setup import spool_root
    from mtsam.train.runner import storage_path, with_absolute_paths

    work = tmp_path / "ray" / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_1"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    monkeypatch.delenv("MTSAM_OUTPUT_ROOT", raising=False)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")  # what Ray sets for a job's driver
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    sets = ["output_dir=outputs", "data.root=d", "scaling.storage_path=runs"]
    cfg = with_absolute_paths(build_config({}, sets))
    durable = tmp_path / "home" / "mtsam_outputs"
    assert cfg.output_dir == str(durable / "outputs")
    assert cfg.scaling.storage_path == str(durable / "runs")
    assert cfg.data.root == str(work / "d")
    uri = with_absolute_paths(
        build_config({}, ["output_dir=outputs", "scaling.storage_path=s3://b/r"])
    )
    assert uri.output_dir == str(durable / "outputs") and uri.scaling.storage_path == "s3://b/r"
    assert spool_root(uri, storage_path(uri)) == str(durable / "outputs" / "mlflow_spools")
    # readers of the default MLflow store (evaluate.py --adapter models:/..., load_adapter) look
    # where the jobs wrote
    assert local_output_dir("outputs") == durable / "outputs"

    monkeypatch.setenv("MTSAM_OUTPUT_ROOT", str(tmp_path / "mine"))
    assert with_absolute_paths(build_config({}, sets)).output_dir == str(
        tmp_path / "mine" / "outputs"
    )
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    monkeypatch.chdir(tmp_path)
    assert with_absolute_paths(build_config({}, sets)).output_dir == str(
        tmp_path / "mine" / "outputs"
    )
    monkeypatch.delenv("MTSAM_OUTPUT_ROOT")
    assert with_absolute_paths(build_config({}, sets)).output_dir == str(tmp_path / "outputs")
