"""The default sweep through the real CLI, tracked by a real `mlflow server` on 127.0.0.1.

Queried back through MlflowClient: one parent run, one child per trial, every per-task metric
at every epoch, pictures, the best adapter (which reproduces its logged metrics when loaded
back), a registered model version loadable by URI, and no duplicate children after a resume.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_tracking import MlflowServer

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
EPOCHS = 2


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = MlflowServer(tmp_path_factory.mktemp("mlflow-e2e"), proxied=True)
    try:
        s.start()
        yield s
    finally:
        s.kill()


def run_tune(args, *, uri: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri, RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [sys.executable, str(REPO / "jobs/tune.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_default_sweep_tracked_in_mlflow(server, tmp_path):
    from mlflow import MlflowClient

    out = tmp_path / "out"
    overrides = [
        f"output_dir={out}",
        "tune.num_samples=2",
        f"train.epochs={EPOCHS}",
        "data.scenes.num_train=16",
        "data.scenes.num_val=8",
        "train.vis_every=1",
        "train.vis_samples=1",
        "tracking.register_as=tiny-tora",
        "train.log_every=1000",
    ]
    args = ["--name", "tracked", *[a for o in overrides for a in ("--set", o)]]
    r = run_tune(args, uri=server.uri, cwd=tmp_path)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert (
        "* best trial" in r.stdout
        and "registered the best adapter as models:/tiny-tora/1" in r.stdout
    )

    client = MlflowClient(tracking_uri=server.uri)
    exp = client.get_experiment_by_name("default")
    runs = client.search_runs([exp.experiment_id])
    parents = [x for x in runs if "mlflow.parentRunId" not in x.data.tags]
    children = [x for x in runs if x.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and len(children) == 2 and len(runs) == 3
    assert sorted(c.info.run_name for c in children) == sorted(
        line.split()[0].lstrip("*").strip() or line.split()[1]
        for line in r.stdout.split("optimising")[1].splitlines()[2:4]
    )
    keys = [f"val/semantic/{m}" for m in ("miou", "pixel_acc")]
    keys += [
        "val/depth/abs_err",
        "val/depth/rel_err",
        "val/normal/mean_deg",
        "val/normal/median_deg",
        "val/normal/within_11_25",
        "val/delta_m",
        "train/loss/semantic",
        "train/loss/depth",
        "train/loss/normal",
        "train/orth_reg",
        "train/step_time_s",
        "train/images_per_s",
    ]
    for child in children:
        for key in keys:
            steps = {m.step for m in client.get_metric_history(child.info.run_id, key)}
            assert steps == set(range(1, EPOCHS + 1)), (key, steps)
        assert child.data.params["adapter.method"] in ("tora", "lora_stl")
        assert child.data.tags["base_preset"] == "tiny" and child.data.tags["dataset"] == "scenes"
        assert "params.trainable.all" in child.data.params
        arts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"adapter", "predictions", "plots"} <= arts
        pics = [a.path for a in client.list_artifacts(child.info.run_id, "predictions")]
        assert len(pics) == EPOCHS and all(p.endswith(".png") for p in pics)
    parent_arts = {a.path for a in client.list_artifacts(parents[0].info.run_id, "summary")}
    assert {"summary/trials.csv", "summary/trials.parquet"} <= parent_arts

    # the registered version loads into a model that reproduces the metrics logged with it
    import mtsam
    from mtsam.config import load_config
    from mtsam.tasks import build_tasks
    from mtsam.train.data import eval_loader, open_split
    from mtsam.train.evaluate import evaluate
    from mtsam.train.loop import data_root

    os.environ["MLFLOW_TRACKING_URI"] = server.uri
    try:
        model = mtsam.load_adapter("models:/tiny-tora/1")
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI")
    version = client.get_model_version("tiny-tora", "1")
    best = client.get_run(version.run_id)
    cfg = load_config(REPO / "configs/default.yaml", overrides)
    tasks = build_tasks(cfg.data.tasks, num_classes=cfg.data.classes)
    val = open_split(
        "scenes",
        data_root(cfg),
        "val",
        fmt="files",
        tasks=cfg.data.tasks,
        num_classes=None,
        augment=False,
        seed=0,
    )
    torch.manual_seed(0)
    got = evaluate(
        model,
        eval_loader(val, batch_size=8, rank=0, world_size=1, workers=0),
        tasks,
        device=torch.device("cpu"),
    )
    history = client.get_metric_history(best.info.run_id, "val/delta_m")
    best_step = max(history, key=lambda m: m.value).step
    for task, metric in [("semantic", "miou"), ("depth", "abs_err"), ("normal", "mean_deg")]:
        logged = {
            m.step: m.value
            for m in client.get_metric_history(best.info.run_id, f"val/{task}/{metric}")
        }[best_step]
        assert got[task][metric] == pytest.approx(logged, rel=1e-3, abs=1e-4), (task, metric)

    # resuming the finished sweep reuses the parent and creates no duplicate child
    r2 = run_tune(["--resume", str(out / "ray_results" / "tracked")], uri=server.uri, cwd=tmp_path)
    assert r2.returncode == 0, (r2.stdout + r2.stderr)[-3000:]
    after = client.search_runs([exp.experiment_id])
    assert len(after) == 3
    assert {x.info.run_id for x in after} == {x.info.run_id for x in runs}
