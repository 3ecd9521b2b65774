"""Two Ray nodes on one machine: a 2-worker training spread over both, base weights shipped
once through the object store, and the loss of the second node's raylet survived.

The head and the second node are separate `ray start` processes on 127.0.0.1 with one CPU
each, so the two 1-CPU workers must land on different nodes. Checkpoints go to a storage path
both reach (a local folder: both nodes share this machine's disk, as NFS would on a cluster).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mtsam.model.presets import tiny

REPO = Path(__file__).resolve().parents[1]
BIN = str(Path(sys.executable).parent)
pytestmark = pytest.mark.slow
PORT = "6393"


def env(tmp: Path) -> dict[str, str]:
    e = dict(os.environ)
    e["PATH"] = BIN + os.pathsep + e.get("PATH", "")
    e.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token", PYTHONUNBUFFERED="1")
    e.pop("RAY_ADDRESS", None)
    return e


def ray(*args: str, tmp: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [f"{BIN}/ray", *args], env=env(tmp), capture_output=True, text=True, timeout=120
    )


def start_second_node(tmp: Path) -> None:
    r = ray(
        "start",
        "--address",
        f"127.0.0.1:{PORT}",
        "--num-cpus",
        "1",
        "--resources",
        '{"second_node": 1}',
        tmp=tmp,
    )
    assert r.returncode == 0, r.stderr[-2000:]


def sam_checkpoint(path: Path) -> Path:
    """A SAM-format state dict of the tiny preset, made with segment-anything's own modules."""
    from test_model import sam_like_tiny

    torch.manual_seed(0)
    torch.save(sam_like_tiny().state_dict(), path)
    assert tiny().img_size == 128
    return path


def raylet_pids() -> dict[int, str]:
    out = subprocess.run(["ps", "-eww", "-o", "pid,args"], capture_output=True, text=True).stdout
    return {
        int(line.split()[0]): line
        for line in out.splitlines()
        if "/raylet " in line or line.rstrip().endswith("/raylet")
    }


@pytest.fixture
def two_nodes(tmp_path):
    r = ray(
        "start",
        "--head",
        "--node-ip-address",
        "127.0.0.1",
        "--port",
        PORT,
        "--num-cpus",
        "1",
        "--include-dashboard",
        "true",
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        "8268",
        "--disable-usage-stats",
        tmp=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    head_raylets = set(raylet_pids())
    try:
        start_second_node(tmp_path)
        deadline = time.time() + 30
        while not (second := set(raylet_pids()) - head_raylets) and time.time() < deadline:
            time.sleep(0.5)
        assert len(second) == 1, raylet_pids()
        yield f"127.0.0.1:{PORT}", second.pop()
    finally:
        ray("stop", "--force", tmp=tmp_path)


def test_two_node_training_survives_losing_a_node(two_nodes, tmp_path):
    address, second_raylet = two_nodes
    ckpt = sam_checkpoint(tmp_path / "sam_tiny.pth")
    out = tmp_path / "out"
    overrides = [
        f"output_dir={out}",
        f"model.checkpoint={ckpt}",
        "scaling.num_workers=2",
        "scaling.cpus_per_worker=1",
        "scaling.max_failures=2",
        "train.epochs=4",
        "data.scenes.num_train=32",
        "data.scenes.num_val=8",
        "train.batch_size=4",
        "tracking.enabled=false",
        "train.vis_samples=0",
        "train.log_every=1000",
    ]
    cmd = [sys.executable, str(REPO / "jobs/train.py"), "--name", "two-nodes"]
    cmd += [a for o in overrides for a in ("--set", o)]
    e = env(tmp_path) | {"RAY_ADDRESS": address}
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: list[str] = []
    killed = False
    moved = False
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "put in the object store" in line and not moved:
                # from here on nobody may read the file: the workers get the weights via Ray
                ckpt.rename(ckpt.with_suffix(".moved"))
                moved = True
            if not killed and "[epoch 2/4]" in line:
                time.sleep(1.5)  # let Train register the epoch-2 checkpoint
                os.kill(second_raylet, signal.SIGKILL)
                killed = True
                time.sleep(3)
                start_second_node(tmp_path)  # capacity comes back, as an autoscaler would add it
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = "".join(lines)
    assert proc.returncode == 0, log[-4000:]
    assert moved and killed
    # the two ranks ran on two different nodes, both fed from the object store
    nodes = set(re.findall(r"worker rank \d/2 on node (\w+) .*base weights: object store", log))
    assert len(nodes) >= 2, log[-3000:]
    # the run restarted from a checkpoint after the node loss and finished all epochs
    assert "resumed from" in log
    assert "[epoch 4/4]" in log
    assert not re.search(r"\[epoch 1/4\]", log.split("resumed from")[1])
