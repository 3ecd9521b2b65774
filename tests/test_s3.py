"""Runs, sweeps and checkpoints in object storage, against a real S3 API (moto's server on
127.0.0.1) read back with boto3, an S3 client this project does not use itself.

One moto server and one local Ray (started after the AWS settings are in the environment, so
its workers and trial drivers inherit them) serve the module. The Ray scenarios:

- jobs/train.py with ``scaling.storage_path: s3://...``: a worker is SIGKILLed after the first
  checkpoint and restarts from the S3 checkpoint; the driver is then SIGKILLed and
  ``--resume s3://.../<run>`` finishes the run; jobs/evaluate.py --checkpoint and load_adapter
  on its S3 checkpoint reproduce what the run recorded;
- jobs/tune.py on S3, its driver SIGKILLed mid-trial, ``--resume``d from its S3 URI, tracked in
  MLflow (SQLite) with its spools on local disk.

Bad bucket and missing objects are one-line CLI errors, checked without Ray.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from s3server import get_bytes, keys, moto_s3, s3_client

ray = pytest.importorskip("ray")

REPO = Path(__file__).resolve().parents[1]
BUCKET = "mtsam-test"
SMALL = [
    "data.scenes.num_train=16",
    "data.scenes.num_val=8",
    "train.batch_size=4",
    "train.log_every=1000",
    "train.vis_samples=0",
    "scaling.num_workers=1",
    "scaling.cpus_per_worker=1",
    "scaling.max_failures=1",
]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def s3():
    with moto_s3(BUCKET) as settings:
        yield settings


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("scenes")


@pytest.fixture(scope="module")
def ray_address(s3):
    """A local Ray started from this process after moto's settings are in its environment."""
    from mtsam.train import runner

    if ray.is_initialized():
        ray.shutdown()
    ray.init(
        num_cpus=2,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        runtime_env=runner.ray_runtime_env(),
    )
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def sets(*items: str) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def job(name: str, args: list[str], *, address: str | None, log: Path | None = None, **kw):
    """jobs/<name>.py in a session of its own; output to ``log`` (Popen) or captured (run)."""
    env = dict(os.environ, PYTHONPATH="", OMP_NUM_THREADS="1")
    env.pop("RAY_ADDRESS", None)
    if address:
        env["RAY_ADDRESS"] = address
    cmd = [sys.executable, str(REPO / "jobs" / f"{name}.py"), *args]
    if log is not None:
        out = log.open("w")
        return subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, **kw)


def snapshot(prefix: str) -> dict | None:
    """Ray Train's checkpoint-manager snapshot of the run at ``s3://BUCKET/<prefix>``."""
    data = get_bytes(BUCKET, f"{prefix}/checkpoint_manager_snapshot.json")
    return json.loads(data) if data else None


def latest_epoch(prefix: str) -> int:
    snap = snapshot(prefix) or {}
    latest = snap.get("latest_checkpoint_result")
    return int(latest["metrics"]["epoch"]) if latest else 0


def wait_for(what: str, check, *, proc: subprocess.Popen, log: Path, timeout: float = 180):
    deadline = time.monotonic() + timeout
    while not check():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{what}: not seen; job log:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


def resumes(logs: str) -> Counter[int]:
    """How often the workers logged a resume after each epoch (log files are not in time
    order, so tests compare these counts before and after a step)."""
    return Counter(int(e) for e in re.findall(r"resumed from \S+ after epoch (\d+)", logs))


def kill_group(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def test_helpers_name_the_uri_for_a_missing_bucket_or_object(s3, tmp_path):
    from mtsam import storage

    with pytest.raises(storage.StorageError, match=r"s3://no-such-bucket/x: no such bucket"):
        storage.check_bucket("s3://no-such-bucket/x", what="scaling.storage_path")
    storage.check_bucket(f"s3://{BUCKET}/runs", what="scaling.storage_path")
    uri = storage.join(f"s3://{BUCKET}/runs", "r1", "note.txt")
    assert uri == f"s3://{BUCKET}/runs/r1/note.txt"
    storage.write_text(uri, "hello")
    assert get_bytes(BUCKET, "runs/r1/note.txt") == b"hello"  # read back by boto3
    assert storage.is_file(uri) and storage.exists(f"s3://{BUCKET}/runs/r1")
    assert not storage.exists(f"s3://{BUCKET}/runs/r2")
    missing = pytest.raises(
        storage.StorageError, match=rf"--checkpoint s3://{BUCKET}/nope: no such"
    )
    with missing, storage.local_copy(f"s3://{BUCKET}/nope", what="--checkpoint"):
        pass
    with storage.local_copy(f"s3://{BUCKET}/runs/r1", what="x") as d:
        assert (d / "note.txt").read_text() == "hello"
    assert not d.exists()  # the download is removed
    assert storage.as_uri("s3://b/runs", "b/runs/x/checkpoint_1") == "s3://b/runs/x/checkpoint_1"
    assert storage.as_uri("/local", "/local/x") == "/local/x"
    assert storage.parent_and_name("s3://b/runs/r1/") == ("s3://b/runs", "r1")


def load_job(name: str):
    """jobs/<name>.py as a module, to call its main() in this process (no interpreter start)."""
    jobs = str(REPO / "jobs")
    if jobs not in sys.path:
        sys.path.insert(0, jobs)
    spec = importlib.util.spec_from_file_location(f"mtsam_job_{name}", REPO / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_bad_bucket_and_missing_objects_are_one_line_errors(s3, tmp_path, capsys):
    """Checked before Ray starts: no Ray is started or connected to."""
    bad = "s3://no-such-bucket-x/runs"
    train, evaluate = load_job("train"), load_job("evaluate")
    args = sets(*SMALL, f"output_dir={tmp_path}", f"scaling.storage_path={bad}")
    assert train.main(args) == 2
    out, err = capsys.readouterr()
    assert err.strip() == f"error: scaling.storage_path {bad}: no such bucket 'no-such-bucket-x'"
    assert "Ray" not in out and not ray.is_initialized()
    assert train.main(["--resume", f"s3://{BUCKET}/runs/never"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --resume s3://{BUCKET}/runs/never: no mtsam_config.yaml there (not a folder "
        "written by jobs/train.py or jobs/tune.py?)"
    )
    for uri, why in (
        (f"s3://{BUCKET}/runs/missing", "no such folder or object"),
        ("s3://no-such-bucket-x/runs/c", "no such bucket 'no-such-bucket-x'"),
    ):
        assert evaluate.main(["--checkpoint", uri, "--device=cpu"]) == 2
        assert capsys.readouterr().err.strip() == f"error: --checkpoint {uri}: {why}"
        assert evaluate.main(["--adapter", f"{uri}/adapter", "--device=cpu"]) == 2
        assert capsys.readouterr().err.strip() == f"error: --adapter {uri}/adapter: {why}"
    # a damaged checkpoint in the bucket is named by its URI, not by its temporary download
    s3_client().put_object(Bucket=BUCKET, Key="runs/bad/ckpt/train_state.pt", Body=b"garbage")
    uri = f"s3://{BUCKET}/runs/bad/ckpt"
    assert evaluate.main(["--checkpoint", uri, "--device=cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: checkpoint {uri}/train_state.pt: unreadable"), err
    assert not ray.is_initialized()


def test_denied_access_is_one_line_naming_the_uri(s3, tmp_path, capsys):
    """moto checks credentials (IAM simulation): the fake keys are refused."""
    from moto.core import enable_iam_authentication

    train, evaluate = load_job("train"), load_job("evaluate")
    where = f"s3://{BUCKET}/runs"
    with enable_iam_authentication():
        assert (
            train.main(sets(*SMALL, f"output_dir={tmp_path}", f"scaling.storage_path={where}")) == 2
        )
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: scaling.storage_path {where}: access denied"), err
        assert evaluate.main(["--checkpoint", f"{where}/c", "--device=cpu"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: --checkpoint {where}/c: access denied"), err
    assert "\n" not in err


def test_train_on_s3_survives_a_killed_worker_and_a_killed_driver(
    ray_address, s3, scenes, tmp_path, capsys
):
    from ray.util.state import list_actors
    from safetensors.torch import load as load_safetensors

    import mtsam
    from test_train_ray import worker_log_text

    storage_uri, name, epochs = f"s3://{BUCKET}/runs", "s3run", 5
    prefix = f"runs/{name}"
    args = sets(
        *SMALL,
        f"output_dir={tmp_path / 'out'}",
        f"data.root={scenes}",
        f"scaling.storage_path={storage_uri}",
        f"train.epochs={epochs}",
        "tracking.enabled=false",
    )
    log = tmp_path / "train.log"
    before = resumes(worker_log_text())
    proc = job("train", [*args, "--name", name], address=ray_address, log=log)
    try:
        wait_for("epoch-1 checkpoint on S3", lambda: latest_epoch(prefix) >= 1, proc=proc, log=log)
        alive = list_actors(
            address=ray_address,
            filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
            detail=True,
        )
        assert len(alive) == 1, alive
        killed_at = latest_epoch(prefix)
        os.kill(alive[0].pid, signal.SIGKILL)
        # two epochs later the restarted group has checkpointed (the dying worker's last
        # report may still be registered: then the restart resumes from that one)
        wait_for(
            "a checkpoint after the restart",
            lambda: latest_epoch(prefix) > killed_at + 1,
            proc=proc,
            log=log,
        )
        assert proc.poll() is None, "the run finished before its driver could be killed"
        stopped_at = latest_epoch(prefix)
        assert stopped_at < epochs
    finally:
        kill_group(proc)
    assert get_bytes(BUCKET, f"{prefix}/mtsam_config.yaml")  # saved for --resume

    r = job("train", ["--resume", f"{storage_uri}/{name}/"], address=ray_address, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    time.sleep(1.0)  # let the log monitor flush the worker's last lines
    # two resumes: the restart after the worker's kill, --resume after the driver's, each from
    # the last checkpoint registered before the kill (or one registered as it died)
    restart, resume = sorted((resumes(worker_log_text()) - before).elements())
    assert restart in (killed_at, killed_at + 1) and resume in (stopped_at, stopped_at + 1)
    snap = snapshot(prefix)
    assert snap and int(snap["latest_checkpoint_result"]["metrics"]["epoch"]) == epochs
    best = re.search(r"best checkpoint (\S+)", r.stdout).group(1)
    last = snap["latest_checkpoint_result"]["checkpoint_dir_name"]
    assert best == f"{storage_uri}/{name}/{last}", best
    assert f"outputs in {tmp_path / 'out'}" in r.stdout

    # jobs/evaluate.py on the S3 checkpoint: the val metrics Ray Train recorded for it
    out = tmp_path / "metrics.json"
    capsys.readouterr()
    code = load_job("evaluate").main(["--checkpoint", best, "--json", str(out), "--device=cpu"])
    assert code == 0, capsys.readouterr().err[-2000:]
    assert f"{last} (epoch {epochs})" in capsys.readouterr().out
    want = {
        k: v for k, v in snap["latest_checkpoint_result"]["metrics"].items() if k.startswith("val/")
    }
    got = json.loads(out.read_text())
    assert want and set(got) == set(want)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-6, abs=1e-9), k

    # load_adapter on the S3 adapter: the tensors boto3 reads from the same object
    model = mtsam.load_adapter(f"{best}/adapter")
    saved = load_safetensors(get_bytes(BUCKET, f"{prefix}/{last}/adapter/adapter.safetensors"))
    state = model.trainable_state_dict()
    assert set(state) == set(saved)
    for k, v in saved.items():
        assert state[k].equal(v), k


def test_sweep_on_s3_resumes_after_its_driver_is_killed(ray_address, s3, scenes, tmp_path):
    from mlflow import MlflowClient

    from test_train_ray import worker_log_text

    storage_uri, name = f"s3://{BUCKET}/sweeps", "s3sweep"
    out = tmp_path / "out"
    args = sets(
        *SMALL,
        f"output_dir={out}",
        f"data.root={scenes}",
        f"scaling.storage_path={storage_uri}",
        "train.epochs=2",
        "tune.num_samples=1",
        "tune.max_concurrent_trials=1",
        "tracking.enabled=true",
    )
    prefix = f"sweeps/{name}"

    def trial_runs() -> list[str]:
        return sorted({k.split("/")[2] for k in keys(BUCKET, f"{prefix}/train-")})

    def state_names_trial() -> bool:
        runs = trial_runs()
        trial = runs[0].removeprefix("train-") if runs else None
        return bool(trial) and any(
            trial in (get_bytes(BUCKET, k) or b"").decode()
            for k in keys(BUCKET, f"{prefix}/experiment_state")
        )

    log = tmp_path / "tune.log"
    before = resumes(worker_log_text())
    proc = job("tune", [*args, "--name", name], address=ray_address, log=log)
    try:
        wait_for(
            "the trial's epoch-1 checkpoint on S3",
            lambda: trial_runs() and latest_epoch(f"{prefix}/{trial_runs()[0]}") >= 1,
            proc=proc,
            log=log,
        )
        wait_for("Tune's state naming the trial on S3", state_names_trial, proc=proc, log=log)
        assert proc.poll() is None
        stopped_at = latest_epoch(f"{prefix}/{trial_runs()[0]}")
    finally:
        kill_group(proc)
    assert stopped_at in (1, 2)

    r = job("tune", ["--resume", f"{storage_uri}/{name}"], address=ray_address, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "* best trial" in r.stdout
    (run,) = trial_runs()  # the resumed trial continued its own Train run
    if stopped_at == 1:
        time.sleep(1.0)
        assert resumes(worker_log_text()) - before == Counter([1])
    assert latest_epoch(f"{prefix}/{run}") == 2
    adapter = re.search(r"best adapter: (\S+)", r.stdout).group(1)
    assert adapter.startswith(f"{storage_uri}/{name}/{run}/checkpoint_")
    key = adapter.removeprefix(f"s3://{BUCKET}/") + "/adapter.safetensors"
    assert get_bytes(BUCKET, key)
    # MLflow (SQLite, local) holds the sweep and its trial; the spools stayed on local disk
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("default").experiment_id])
    by_parent = {"mlflow.parentRunId" in x.data.tags: x for x in runs}
    assert len(runs) == 2 and by_parent[False].info.status == "FINISHED"
    assert by_parent[True].info.status == "FINISHED"
    assert "val/depth/abs_err" in by_parent[True].data.metrics
    assert not keys(BUCKET, f"{prefix}/mlflow")  # nothing of MLflow's went to the bucket
