"""Tracking against real MLflow: SQLite without a server, and `mlflow server` subprocesses on
127.0.0.1 (always killed in fixture finalizers). Expected values are what the test itself
logged, read back through MLflow's own client."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import torch

import mtsam
from mtsam.adapters.io import save_adapter
from mtsam.adapters.spec import AdapterSpec
from mtsam.model.msam import build_msam
from mtsam.tracking.client import MAX_PARAM_LENGTH, PARENT_TAG, count_params, flatten_params
from mtsam.tracking.panel import GAP, prediction_panel
from mtsam.tracking.registry import load_adapter, register_adapter
from mtsam.tracking.spool import SPOOL_FILE, Spool
from mtsam.tracking.sweep import SWEEP_PATH_TAG, finish_sweep, start_sweep_run
from mtsam.tracking.sync import sync_spool
from mtsam.tracking.tracker import RunTracker
from mtsam.tracking.uri import TrackingError, check_tracking_uri, resolve_tracking_uri

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::DeprecationWarning:sqlalchemy.*"),
    pytest.mark.filterwarnings("ignore:.*noload.*"),
]

REPO = Path(__file__).resolve().parent.parent
MLFLOW_BIN = Path(sys.executable).parent / "mlflow"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """`mlflow server` on 127.0.0.1 in its own process group (the CLI starts a uvicorn child)."""

    def __init__(self, root: Path, *, proxied: bool) -> None:
        self.root, self.port, self.proxied = root, _free_port(), proxied
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, wait_s: float = 90.0) -> None:
        artifacts = ["--default-artifact-root", str(self.root / "artifacts")]
        if self.proxied:
            artifacts = ["--artifacts-destination", str(self.root / "artifacts")]
        cmd = [str(MLFLOW_BIN), "server", "--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["--backend-store-uri", f"sqlite:///{self.root}/db.sqlite", *artifacts]
        cmd += ["--workers", "1"]
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        env.update(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_DISABLE_TELEMETRY="true")
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / "server.log", "ab") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"mlflow server exited: {(self.root / 'server.log').read_text()[-2000:]}"
                )
            try:
                if requests.get(self.uri + "/health", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.25)
        self.kill()
        raise RuntimeError(f"mlflow server not healthy after {wait_s} s")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture(scope="module")
def sqlite_uri(tmp_path_factory):
    """One SQLite store for the tests without a server (creating one costs ~3 s)."""
    uri = resolve_tracking_uri(None, tmp_path_factory.mktemp("sqlite-store"))
    check_tracking_uri(uri, timeout_s=5)
    return uri


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for the module, with proxied artifacts (uploads go over HTTP, as on a
    cluster). The outage test kills and restarts it on the same port and database."""
    s = MlflowServer(tmp_path_factory.mktemp("mlflow-server"), proxied=True)
    try:
        s.start()
        yield s
    finally:
        s.kill()


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _history(uri: str, run_id: str, key: str) -> dict[int, float]:
    hist = _client(uri).get_metric_history(run_id, key)
    steps = [m.step for m in hist]
    assert len(steps) == len(set(steps)), f"{key}: duplicated steps {sorted(steps)}"
    return {m.step: m.value for m in hist}


def _artifacts(uri: str, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for f in _client(uri).list_artifacts(run_id, path):
        out |= _artifacts(uri, run_id, f.path) if f.is_dir else {f.path}
    return out


def _metrics(step: int) -> dict[str, float]:
    # Exactly representable values, so equality after the round trip is exact.
    return {"train/loss/depth": 1.0 / (1 << step), "val/semantic/miou": step / 64.0}


def _tiny_adapter(tmp: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    model = build_msam(
        "tiny",
        [("semantic", 6), ("depth", 1)],
        adapter=AdapterSpec(method="tora", r1=4, r2=4, r3=2),
    )
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, p in model.trainable_named_parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    folder = save_adapter(model, tmp / "adapter")
    return folder, {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(model, expected: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert set(got) == set(expected)
    for k, v in expected.items():
        assert torch.equal(got[k], v), k


# ------------------------------------------------------------------ no server


def test_resolve_tracking_uri(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri(None, "out") == f"sqlite:///{tmp_path}/out/mlflow.db"
    assert resolve_tracking_uri("http://h:5000", "out") == "http://h:5000"
    assert resolve_tracking_uri("sqlite:///rel/x.db", "out") == f"sqlite:///{tmp_path}/rel/x.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:1")
    assert resolve_tracking_uri(None, "out") == "http://env:1"
    assert resolve_tracking_uri("http://cfg:2", "out") == "http://cfg:2"


def test_bad_uris_fail_fast(sqlite_uri):
    closed = f"http://127.0.0.1:{_free_port()}"
    for uri in (closed, "nonsense://x", "sqlite:///relative.db", "", "file:///tmp/mlruns"):
        t = time.monotonic()
        with pytest.raises(TrackingError) as e:
            check_tracking_uri(uri, timeout_s=3)
        assert time.monotonic() - t < 10
        assert "\n" not in str(e.value)
    with pytest.raises(TrackingError, match="unreachable"):
        check_tracking_uri(closed, timeout_s=3)
    with pytest.raises(TrackingError, match="unsupported scheme 'nonsense'"):
        check_tracking_uri("nonsense://x", timeout_s=3)
    check_tracking_uri(sqlite_uri, timeout_s=3)


def test_hanging_server_costs_one_timeout(tmp_path, caplog):
    """A server that accepts connections and never answers: the first call waits one request
    time-out, the following ones return at once (back-off) and everything is spooled."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        uri = f"http://127.0.0.1:{sock.getsockname()[1]}"
        t = time.monotonic()
        with pytest.raises(TrackingError):
            check_tracking_uri(uri, timeout_s=1)
        assert time.monotonic() - t < 5
        t = time.monotonic()
        tr = RunTracker(uri, "exp", run_name="t", spool_dir=tmp_path, request_timeout_s=1)
        assert time.monotonic() - t < 4
        for step in range(3):
            t = time.monotonic()
            tr.log_metrics(_metrics(step), step=step)
            assert time.monotonic() - t < 0.5
        rep = tr.finish("FAILED")
    assert tr.run_id is None and rep.pending == 4 and rep.pending_metrics == 6
    assert (tmp_path / SPOOL_FILE).is_file()
    assert sum("unreachable" in r.getMessage() for r in caplog.records) == 1


def test_sqlite_tracker_params_tags_metrics_images(sqlite_uri, tmp_path):
    uri = sqlite_uri
    params = {"model": {"preset": "tiny", "ranks": [4, 4, 2]}, "lr": 0.001, "long": "x" * 7000}
    tags = {"method": "tora", "dataset": "scenes"}
    tr = RunTracker(
        uri, "exp", run_name="trial_a", spool_dir=tmp_path / "a", params=params, tags=tags
    )
    tr.log_params(count_params({"adapters": (10, 10), "all": (12, 100)}))
    for step in range(4):
        tr.log_metrics(_metrics(step), step=step)
    img = np.zeros((6, 5, 3), np.uint8)
    img[2, 3] = (255, 10, 20)
    tr.log_image(img, "predictions/epoch_001.png")
    rep = tr.finish()
    assert rep.complete and rep.pending == 0 and rep.spool_path is None
    assert not (tmp_path / "a" / SPOOL_FILE).exists()

    run = _client(uri).get_run(tr.run_id)
    p = run.data.params
    assert p["model.preset"] == "tiny" and p["model.ranks"] == "[4, 4, 2]" and p["lr"] == "0.001"
    assert len(p["long"]) == MAX_PARAM_LENGTH and p["long"].startswith("x" * 5000)
    assert p["params/trainable/adapters"] == "10" and p["params/total/all"] == "100"
    assert run.data.tags["method"] == "tora" and run.data.tags["dataset"] == "scenes"
    assert run.info.status == "FINISHED"
    for key in _metrics(0):
        assert _history(uri, tr.run_id, key) == {s: _metrics(s)[key] for s in range(4)}
    local = _client(uri).download_artifacts(tr.run_id, "predictions/epoch_001.png", str(tmp_path))
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(local).convert("RGB")), img)
    # Artifacts sit next to the database, not in the current folder.
    db_dir = Path(uri[len("sqlite:///") :]).parent
    assert run.info.artifact_uri.startswith(str(db_dir / "mlartifacts" / "exp"))

    # A restarted attempt reuses the run; re-logging equal params is fine, a changed one is kept.
    tr2 = RunTracker(uri, "exp", run_name="trial_a", spool_dir=tmp_path / "a", params=params)
    tr2.log_params({"lr": 0.5})
    tr2.log_metrics(_metrics(4), step=4)
    assert tr2.finish().complete and tr2.run_id == tr.run_id
    again = _client(uri).get_run(tr.run_id).data
    assert again.params["lr"] == "0.001"  # MLflow params cannot change: the new value is a tag
    assert again.tags["mtsam.changed_param.lr"] == "0.5"
    assert not [k for k in again.tags if k.startswith("mtsam.changed_param.model")]
    assert len(_client(uri).search_runs([run.info.experiment_id])) == 1
    assert sorted(_history(uri, tr.run_id, "train/loss/depth")) == [0, 1, 2, 3, 4]


def test_bad_calls_raise_at_once(sqlite_uri, tmp_path):
    tr = RunTracker(sqlite_uri, "bad-calls", run_name="t", spool_dir=tmp_path / "s")
    with pytest.raises(ValueError, match="metric name"):
        tr.log_metrics({"bad*key": 1.0}, step=0)
    with pytest.raises(ValueError, match="not a number"):
        tr.log_metrics({"ok": "abc"}, step=0)
    with pytest.raises(ValueError, match="step"):
        tr.log_metrics({"ok": 1.0}, step=1.5)
    with pytest.raises(FileNotFoundError):
        tr.log_artifact_dir(tmp_path / "missing", "adapter")
    with pytest.raises(ValueError, match="uint8"):
        tr.log_image(np.zeros((4, 4, 3), np.float32), "x.png")
    assert tr.finish().complete


def test_crashed_attempt_spool_is_sent_first_then_synced(sqlite_uri, tmp_path):
    """A tracker that cannot reach its server and dies without finish() leaves a spool; the
    next attempt adopts it (nothing lost, nothing reordered); a sync to another back end
    delivers everything once."""
    dead = f"http://127.0.0.1:{_free_port()}"
    spool_dir = tmp_path / "trial"
    script = textwrap.dedent(f"""
        import os
        from mtsam.tracking.tracker import RunTracker
        tr = RunTracker({dead!r}, "crashed", run_name="t1", spool_dir={str(spool_dir)!r},
                        params={{"lr": 0.25}}, request_timeout_s=1)
        for s in range(3):
            tr.log_metrics({{"train/loss": s / 8.0}}, step=s)
        os._exit(3)
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO / "platform"))
    proc = subprocess.run([sys.executable, "-c", script], env=env, timeout=60, capture_output=True)
    assert proc.returncode == 3, proc.stderr.decode()[-2000:]
    assert (spool_dir / SPOOL_FILE).is_file()

    adapter, _ = _tiny_adapter(tmp_path)
    tr = RunTracker(dead, "crashed", run_name="t1", spool_dir=spool_dir, request_timeout_s=1)
    tr.log_metrics({"train/loss": 3 / 8.0}, step=3)
    tr.log_artifact_dir(adapter, "adapter")
    rep = tr.finish()
    assert rep.pending == 7 and rep.pending_metrics == 4 and len(rep.pending_artifacts) == 1

    target = sqlite_uri
    (res,) = sync_spool(tmp_path, tracking_uri=target)
    assert res.report is not None and res.report.complete, res.report
    assert not (spool_dir / SPOOL_FILE).exists()
    run = _client(target).get_run(res.report.run_id)
    assert run.info.run_name == "t1" and run.info.status == "FINISHED"
    assert run.data.params == {"lr": "0.25"}
    assert _history(target, run.info.run_id, "train/loss") == {s: s / 8.0 for s in range(4)}
    assert _artifacts(target, run.info.run_id) == {
        "adapter/adapter.json",
        "adapter/adapter.safetensors",
    }
    assert sync_spool(tmp_path, tracking_uri=target) == []


@pytest.mark.parametrize("cut", [1, 20], ids=["newline", "mid-line"])
def test_a_spool_line_cut_by_a_crash_is_repaired_before_the_next_append(tmp_path, cut):
    """A crash while appending leaves the last line cut off (or without its newline): the next
    attempt drops what is incomplete and appends on a line of its own, so the spool stays
    readable and keeps every complete operation."""
    dead = f"http://127.0.0.1:{_free_port()}"
    tr = RunTracker(dead, "cut", run_name="t", spool_dir=tmp_path, request_timeout_s=1)
    for step in range(3):
        tr.log_metrics({"train/loss": step / 8.0}, step=step)
    assert not tr.finish("FAILED").complete
    spool = tmp_path / SPOOL_FILE
    spool.write_bytes(spool.read_bytes()[:-cut])  # the terminate line, as a crash leaves it

    again = RunTracker(dead, "cut", run_name="t", spool_dir=tmp_path, request_timeout_s=1)
    again.log_metrics({"train/loss": 3 / 8.0}, step=3)
    rep = again.finish()
    _, ops = Spool(tmp_path).load()
    assert [op["step"] for op in ops if op["op"] == "metrics"] == [0, 1, 2, 3]
    kept = ["FAILED"] if cut == 1 else []  # a line that only lost its newline is complete
    assert [op["status"] for op in ops if op["op"] == "terminate"] == [*kept, "FINISHED"]
    assert len(ops) == rep.pending and spool.read_text().endswith("}\n")


def test_a_spool_that_cannot_be_repaired_is_still_read(tmp_path, monkeypatch):
    """A cut-off spool on a read-only file (or mount) loads as before: the repair is skipped."""
    import builtins

    import mtsam.tracking.spool as spool_mod

    dead = f"http://127.0.0.1:{_free_port()}"
    tr = RunTracker(dead, "ro", run_name="t", spool_dir=tmp_path, request_timeout_s=1)
    tr.log_metrics({"train/loss": 0.5}, step=0)
    tr.finish()
    path = tmp_path / SPOOL_FILE
    path.write_bytes(path.read_bytes()[:-10])
    cut = path.read_bytes()

    def read_only(file, mode="r", *args, **kwargs):
        if "+" in mode or "w" in mode or "a" in mode:
            raise PermissionError(13, "Read-only file system", str(file))
        return builtins.open(file, mode, *args, **kwargs)

    monkeypatch.setattr(spool_mod, "open", read_only, raising=False)
    _, ops = Spool(tmp_path).load()
    assert [op["op"] for op in ops][-1] == "metrics"  # the cut terminate line is dropped
    assert path.read_bytes() == cut


def test_spools_set_aside_at_the_same_time_keep_both(tmp_path, monkeypatch):
    """A run folder reused by other runs during an outage sets each old spool aside; two set
    aside within the same clock tick must not overwrite each other."""
    dead = f"http://127.0.0.1:{_free_port()}"
    monkeypatch.setattr(time, "time_ns", lambda: 1_700_000_000_000_000_000)
    for name in ("a", "b", "c"):
        tr = RunTracker(dead, "aside", run_name=name, spool_dir=tmp_path, request_timeout_s=1)
        tr.log_metrics({"train/loss": 1.0}, step=0)
        tr.finish()
    aside = sorted(p for p in tmp_path.glob("mlflow_spool.*.jsonl"))
    names = [Spool(tmp_path, file_name=p.name).load()[0]["run_name"] for p in aside]
    assert names == ["a", "b"]
    assert Spool(tmp_path).load()[0]["run_name"] == "c"


def test_a_sweep_finished_twice_in_an_outage_continues_the_spool(tmp_path):
    """finish_sweep called again while the back end is still down (a resumed sweep) queues
    what the first call left, and numbers its own operations after them."""
    dead = f"http://127.0.0.1:{_free_port()}"
    for attempt in range(2):
        rep = finish_sweep(
            dead,
            "0123abcd",
            best_metrics={"best/val/delta_m": float(attempt)},
            summary_rows=[{"trial": "t0", "trainable_params": 10, "val/delta_m": 0.5}],
            out_dir=tmp_path,
            request_timeout_s=1,
        )
    assert rep.pending == 6 and rep.pending_metrics == 2
    _, ops = Spool(tmp_path).load()
    assert [op["seq"] for op in ops] == list(range(6))
    assert [op["op"] for op in ops] == ["metrics", "artifact", "terminate"] * 2
    assert [op["metrics"] for op in ops if op["op"] == "metrics"] == [
        {"best/val/delta_m": 0.0},
        {"best/val/delta_m": 1.0},
    ]


def test_a_sync_cut_short_keeps_every_pending_operation(tmp_path, monkeypatch):
    """A spool in which operations share sequence numbers (older versions wrote such files) and
    a back end that goes down again during the sync: every operation not delivered stays in
    the file, none is dropped as if delivered."""
    from mtsam.tracking.delivery import Deliverer
    from mtsam.tracking.spool import FORMAT

    header = {"mtsam_spool": FORMAT, "tracking_uri": f"http://127.0.0.1:{_free_port()}"}
    header["run_id"] = "0123abcd"
    ops = [
        {"seq": i % 3, "op": "metrics", "metrics": {"m": float(i)}, "step": i, "timestamp": 1}
        for i in range(6)
    ]
    spool = tmp_path / SPOOL_FILE
    spool.write_text("".join(json.dumps(r) + "\n" for r in [header, *ops]))
    sent: list[int] = []

    def deliver_head(self) -> int:  # one operation per request; the fifth request fails
        if len(sent) == 4:
            raise ConnectionError("down again")
        sent.append(self.queue[0]["step"])
        return 1

    monkeypatch.setattr(Deliverer, "_open", lambda self: setattr(self, "opened", True))
    monkeypatch.setattr(Deliverer, "_deliver_head", deliver_head)
    (res,) = sync_spool(tmp_path)
    assert sent == [0, 1, 2, 3] and res.report is not None and res.report.pending == 2
    _, left = Spool(tmp_path).load()
    assert [op["step"] for op in left] == [4, 5]


def test_sync_goes_on_past_a_malformed_spool(sqlite_uri, tmp_path):
    """A malformed spool (of one trial of a sweep), or one whose header names no run, does not
    keep the spools after it from being synced; the job then ends with one line per bad file,
    exit 2."""
    from mtsam.tracking.spool import FORMAT

    dead = f"http://127.0.0.1:{_free_port()}"
    bad = tmp_path / "trial_a" / SPOOL_FILE
    bad.parent.mkdir()
    bad.write_text(json.dumps({"mtsam_spool": FORMAT, "tracking_uri": dead}) + "\nnot json\n{}\n")
    # a well-formed spool whose header names no run (no id, experiment or run name)
    nameless = tmp_path / "trial_0" / SPOOL_FILE
    nameless.parent.mkdir()
    op = {"seq": 0, "op": "metrics", "metrics": {"a": 1.0}, "step": 0, "timestamp": 0}
    nameless.write_text(
        json.dumps({"mtsam_spool": FORMAT, "tracking_uri": dead}) + "\n" + json.dumps(op) + "\n"
    )
    tr = RunTracker(
        dead, "many", run_name="trial_b", spool_dir=tmp_path / "trial_b", request_timeout_s=1
    )
    tr.log_metrics({"train/loss": 0.5}, step=0)
    assert not tr.finish().complete

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    job = [sys.executable, str(REPO / "jobs" / "sync_mlflow.py"), "--spool", str(tmp_path)]
    r = subprocess.run(
        [*job, "--tracking-uri", sqlite_uri], env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 2, r.stdout + r.stderr
    last = (r.stdout + r.stderr).strip().splitlines()[-1]
    assert last.startswith(f"error: {bad}:2: not valid JSON"), r.stdout + r.stderr
    assert f"error: {nameless}: its header names no run to send to" in r.stderr
    assert "Traceback" not in r.stderr and bad.is_file()
    assert not (tmp_path / "trial_b" / SPOOL_FILE).exists()  # delivered
    c = _client(sqlite_uri)
    (run,) = c.search_runs([c.get_experiment_by_name("many").experiment_id])
    assert _history(sqlite_uri, run.info.run_id, "train/loss") == {0: 0.5}


def test_prediction_panel_layout():
    h, w = 3, 4
    image = torch.linspace(-0.5, 1.5, 3 * h * w).reshape(3, h, w)
    rng = np.random.default_rng(0)
    tiles = {
        t: (
            rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
            rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
        )
        for t in ("semantic", "depth")
    }
    out = prediction_panel(image, tiles)
    assert out.dtype == np.uint8 and out.shape == (2 * h + GAP, 3 * w + 2 * GAP, 3)
    ref_img = np.empty((h, w, 3), np.uint8)
    for c in range(3):
        for y in range(h):
            for x in range(w):
                v = min(max(float(image[c, y, x]), 0.0), 1.0)
                ref_img[y, x, c] = int(np.floor(v * 255 + 0.5))
    for i, (pred, target) in enumerate(tiles.values()):
        y = i * (h + GAP)
        assert np.array_equal(out[y : y + h, 0:w], ref_img)
        assert np.array_equal(out[y : y + h, w + GAP : 2 * w + GAP], target)
        assert np.array_equal(out[y : y + h, 2 * (w + GAP) :], pred)
    assert (out[h : h + GAP] == 255).all() and (out[:, w : w + GAP] == 255).all()
    with pytest.raises(ValueError, match="depth target"):
        prediction_panel(image, {"depth": (tiles["depth"][0], np.zeros((h, w + 1, 3), np.uint8))})


def test_flatten_params():
    flat = flatten_params({"a": {"b": 1, "c": {"d": True}}, "e": [1, 2], "f": None, "g": {}})
    assert flat == {"a.b": "1", "a.c.d": "True", "e": "[1, 2]", "f": "None", "g": "{}"}


def test_load_adapter_from_local_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no tracking store anywhere: a folder needs none
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    folder, state = _tiny_adapter(tmp_path)
    for model in (mtsam.load_adapter(str(folder)), load_adapter(f"file://{folder}")):
        _same_state(model, state)
        assert not any(m.training for m in model.modules())  # ready for inference
    from mtsam.adapters.io import AdapterNotFoundError

    with pytest.raises(AdapterNotFoundError):
        load_adapter(tmp_path / "nope")
    assert not list(tmp_path.rglob("*.db"))


def test_load_adapter_uses_the_project_store_by_default(tmp_path, monkeypatch):
    """As in the README: without tracking_uri, runs:/ and models:/ are read from
    ./outputs/mlflow.db (the default output_dir), unless $MLFLOW_TRACKING_URI names a store."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    project = tmp_path / "project"
    uri = resolve_tracking_uri(None, project / "outputs")
    check_tracking_uri(uri, timeout_s=5)
    folder, state = _tiny_adapter(tmp_path)
    tr = RunTracker(uri, "default", run_name="trial_0", spool_dir=tmp_path / "spool")
    tr.log_artifact_dir(folder, "adapter")
    assert tr.finish().complete
    assert register_adapter(uri, run_id=tr.run_id, name="tiny-tora", alias="best") == "1"
    sources = (f"runs:/{tr.run_id}/adapter", "models:/tiny-tora/1", "models:/tiny-tora@best")

    monkeypatch.chdir(project)
    for source in sources:
        model = mtsam.load_adapter(source)
        _same_state(model, state)
        assert not any(m.training for m in model.modules())

    # $MLFLOW_TRACKING_URI wins over ./outputs/mlflow.db, from any folder.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    _same_state(load_adapter(sources[1]), state)
    monkeypatch.chdir(project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{elsewhere}/other.db")
    from mtsam.adapters.io import AdapterNotFoundError

    with pytest.raises(AdapterNotFoundError, match=r"other\.db"):
        load_adapter(sources[0])
    assert not (elsewhere / "other.db").exists()


def test_load_adapter_without_a_store_fails_in_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    from mtsam.adapters.io import AdapterNotFoundError

    for source in ("runs:/" + "0" * 32 + "/adapter", "models:/tiny-tora/1"):
        with pytest.raises(AdapterNotFoundError) as e:
            mtsam.load_adapter(source)
        msg = str(e.value)
        assert "\n" not in msg and str(tmp_path / "outputs" / "mlflow.db") in msg, msg
        assert "tracking_uri=" in msg and "MLFLOW_TRACKING_URI" in msg, msg
    assert list(tmp_path.iterdir()) == []  # neither a database nor a folder was created


# ------------------------------------------------------------------ real server


def test_sweep_trials_registry_on_server(server, tmp_path):
    uri = server.uri
    check_tracking_uri(uri, timeout_s=5)
    sweep_tags = {SWEEP_PATH_TAG: str(tmp_path / "sweep"), "mtsam.kind": "sweep"}
    parent = start_sweep_run(
        uri, "sweeps", run_name="sweep-1", params={"tune": {"num_samples": 2}}, tags=sweep_tags
    )
    folder, state = _tiny_adapter(tmp_path)
    children = {}
    for i in range(2):
        tr = RunTracker(
            uri,
            "sweeps",
            run_name=f"trial_{i}",
            parent_run_id=parent,
            spool_dir=tmp_path / f"t{i}",
            params={"adapter": {"r1": 4 + i}},
            tags={"method": "tora"},
        )
        for step in range(3):
            tr.log_metrics(_metrics(step + i), step=step)
        tr.log_artifact_dir(folder, "adapter")
        tr.log_image(np.full((4, 4, 3), 9 * i, np.uint8), "predictions/epoch_000.png")
        assert tr.finish().complete
        children[f"trial_{i}"] = tr.run_id
    # A restarted trial finds its run again.
    again = RunTracker(
        uri, "sweeps", run_name="trial_0", parent_run_id=parent, spool_dir=tmp_path / "t0"
    )
    again.log_metrics(_metrics(9), step=3)
    assert again.finish().complete and again.run_id == children["trial_0"]

    c = _client(uri)
    exp = c.get_experiment_by_name("sweeps").experiment_id
    runs = c.search_runs([exp])
    assert len(runs) == 3
    kids = {r.info.run_name: r for r in runs if r.data.tags.get(PARENT_TAG) == parent}
    assert {k: r.info.run_id for k, r in kids.items()} == children
    for i in range(2):
        rid = children[f"trial_{i}"]
        expected = {s: _metrics(s + i)["val/semantic/miou"] for s in range(3)}
        if i == 0:
            expected[3] = _metrics(9)["val/semantic/miou"]
        assert _history(uri, rid, "val/semantic/miou") == expected
        assert kids[f"trial_{i}"].data.params["adapter.r1"] == str(4 + i)
        assert kids[f"trial_{i}"].data.tags["method"] == "tora"
        assert _artifacts(uri, rid) == {
            "adapter/adapter.json",
            "adapter/adapter.safetensors",
            "predictions/epoch_000.png",
        }

    # A resumed sweep reuses its parent run; finishing writes the summary and the plot.
    assert start_sweep_run(uri, "sweeps", run_name="sweep-1", tags=sweep_tags) == parent
    rows = [
        {
            "trial_id": "trial_0",
            "method": "tora",
            "trainable_params": 1000,
            "val/delta_m": 1.5,
            "val/semantic/miou": 0.25,
        },
        {
            "trial_id": "trial_1",
            "method": "lora_stl",
            "trainable_params": 3000,
            "val/delta_m": -0.5,
            "val/semantic/miou": 0.125,
        },
    ]
    rep = finish_sweep(
        uri,
        parent,
        best_metrics={"best/val/delta_m": 1.5},
        summary_rows=rows,
        out_dir=tmp_path / "sweep",
    )
    assert rep.complete
    assert _artifacts(uri, parent) == {
        "summary/trials.csv",
        "summary/trials.parquet",
        "summary/trials.png",
    }
    import pyarrow.parquet as pq

    assert pq.read_table(tmp_path / "sweep" / "summary" / "trials.parquet").to_pylist() == rows
    run = c.get_run(parent)
    assert run.info.status == "FINISHED" and run.data.metrics == {"best/val/delta_m": 1.5}
    assert run.data.params == {"tune.num_samples": "2"}

    # Registry: one version per run and path, loadable by version, alias and run URI.
    v = register_adapter(uri, run_id=children["trial_1"], name="tiny-tora", alias="best")
    assert v == "1"
    assert register_adapter(uri, run_id=children["trial_1"], name="tiny-tora") == "1"
    assert register_adapter(uri, run_id=children["trial_0"], name="tiny-tora") == "2"
    for source in (
        "models:/tiny-tora/1",
        "models:/tiny-tora@best",
        f"runs:/{children['trial_0']}/adapter",
    ):
        _same_state(load_adapter(source, tracking_uri=uri), state)
    from mtsam.adapters.io import AdapterNotFoundError

    with pytest.raises(AdapterNotFoundError):
        load_adapter("models:/tiny-tora/9", tracking_uri=uri)
    with pytest.raises(TrackingError):
        register_adapter(uri, run_id="0" * 32, name="tiny-tora")


def test_outage_loses_nothing_and_spool_syncs(server, tmp_path, caplog):
    """Kill the server under a live tracker and start a second tracker while it is down:
    calls stay fast; after the restart the live tracker delivers everything in order; the
    second one reports what it kept, and the sync job uploads it exactly once."""
    uri = server.uri
    parent = start_sweep_run(uri, "robust", run_name="sweep-k")
    folder, _ = _tiny_adapter(tmp_path)
    live_dir, down_dir = tmp_path / "live", tmp_path / "runs" / "trial_d"
    live = RunTracker(
        uri,
        "robust",
        run_name="trial_k",
        parent_run_id=parent,
        spool_dir=live_dir,
        request_timeout_s=5,
    )
    for step in range(3):
        live.log_metrics(_metrics(step), step=step)
    server.kill()
    slowest = 0.0
    for step in range(3, 8):
        t = time.monotonic()
        live.log_metrics(_metrics(step), step=step)
        if step == 4:
            live.log_artifact_dir(folder, "adapter")
        slowest = max(slowest, time.monotonic() - t)
    assert slowest < 2  # a refused connection costs nothing; never MLflow's minutes of retries
    assert (live_dir / SPOOL_FILE).is_file()

    down = RunTracker(
        uri,
        "robust",
        run_name="trial_d",
        parent_run_id=parent,
        spool_dir=down_dir,
        params={"lr": 0.5},
        tags={"method": "tora"},
        request_timeout_s=5,
    )
    for step in range(4):
        down.log_metrics(_metrics(step), step=step)
    down.log_artifact_dir(folder, "adapter")
    down.log_image(np.full((4, 4, 3), 7, np.uint8), "predictions/epoch_000.png")
    rep = down.finish()
    assert not rep.complete and down.run_id is None
    assert rep.pending == 9 and rep.pending_metrics == 8 and len(rep.pending_artifacts) == 2
    assert rep.spool_path == down_dir / SPOOL_FILE and rep.spool_path.is_file()

    server.start()
    _client(uri).search_experiments(max_results=1)  # the first API call of a new server is slow
    time.sleep(1.1)  # past the live tracker's first back-off
    for step in range(8, 10):
        live.log_metrics(_metrics(step), step=step)
    assert not (live_dir / SPOOL_FILE).exists()  # delivered by the next call
    live_rep = live.finish()
    assert live_rep.complete, live_rep.summary()
    warned = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert sum(str(live_dir) in r.getMessage() for r in warned) == 1
    for key in _metrics(0):
        assert _history(uri, live.run_id, key) == {s: _metrics(s)[key] for s in range(10)}
    assert _artifacts(uri, live.run_id) == {"adapter/adapter.json", "adapter/adapter.safetensors"}
    assert _client(uri).get_run(live.run_id).info.status == "FINISHED"

    cmd = [sys.executable, str(REPO / "jobs" / "sync_mlflow.py"), "--spool", str(tmp_path / "runs")]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stdout + first.stderr
    assert not rep.spool_path.exists()
    c = _client(uri)
    exp = c.get_experiment_by_name("robust").experiment_id
    (run,) = c.search_runs([exp], filter_string="attributes.run_name = 'trial_d'")
    rid = run.info.run_id
    assert run.data.tags[PARENT_TAG] == parent and run.data.tags["method"] == "tora"
    assert run.data.params == {"lr": "0.5"} and run.info.status == "FINISHED"
    for key in _metrics(0):
        assert _history(uri, rid, key) == {s: _metrics(s)[key] for s in range(4)}
    stored = sorted(
        p for p in (server.root / "artifacts").rglob("*") if p.is_file() and rid in str(p)
    )
    assert [p.name for p in stored] == ["adapter.json", "adapter.safetensors", "epoch_000.png"]
    mtimes = [p.stat().st_mtime_ns for p in stored]

    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0 and "nothing to sync" in second.stdout
    assert [p.stat().st_mtime_ns for p in stored] == mtimes
    assert _artifacts(uri, rid) == {
        "adapter/adapter.json",
        "adapter/adapter.safetensors",
        "predictions/epoch_000.png",
    }
    assert len(c.search_runs([exp])) == 3  # sweep-k, trial_k, trial_d: no duplicates


def test_sync_cli_bad_input_is_one_line_and_exit_2(tmp_path):
    """A bad --tracking-uri or --timeout: one line, exit 2; a spool whose header names no
    tracking URI is skipped with a note (exit 1: something is left). The spool stays as it was."""
    import json

    from mtsam.tracking.spool import FORMAT

    run = tmp_path / "run"
    run.mkdir()
    spool = run / SPOOL_FILE
    spool.write_text(json.dumps({"mtsam_spool": FORMAT, "experiment": "e"}) + "\n")
    before = spool.read_bytes()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    job = [sys.executable, str(REPO / "jobs" / "sync_mlflow.py"), "--spool", str(run)]
    cases = [
        ([], 1, f"{spool}: skipped: its header names no tracking URI"),
        (["--tracking-uri", "bogus"], 2, "error: --tracking-uri: tracking URI 'bogus': unsupp"),
        (["--timeout", "0"], 2, "--timeout 0.0: expected a number of seconds > 0"),
        (
            ["--spool", str(tmp_path / "none"), "--tracking-uri", f"sqlite:///{tmp_path}/m.db"],
            2,
            f"error: --spool {tmp_path / 'none'}: no such spool folder or file",
        ),
    ]
    for extra, code, expect in cases:
        r = subprocess.run([*job, *extra], env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == code, r.stderr
        assert expect in (r.stdout + r.stderr).strip().splitlines()[-1], r.stdout + r.stderr
        assert "Traceback" not in r.stderr and spool.read_bytes() == before
    assert not (tmp_path / "m.db").exists()  # the missing spool was found first


def test_trials_stopped_from_outside_are_ended_with_the_sweep(sqlite_uri):
    """ASHA cuts and errors kill a trial's workers before its tracker ends its run: the sweep's
    end closes every child still RUNNING (KILLED, or FAILED for errors), and nothing else."""
    from mtsam.tracking.sweep import end_open_trials

    parent = start_sweep_run(sqlite_uri, "asha-cut", run_name="sweep-a")
    c = _client(sqlite_uri)
    exp = c.get_run(parent).info.experiment_id
    ids = {
        n: c.create_run(exp, run_name=n, tags={PARENT_TAG: parent}).info.run_id
        for n in ("t_done", "t_cut", "t_err", "t_torn_down")
    }
    c.set_terminated(ids["t_done"], "FINISHED")
    other = c.create_run(exp, run_name="not-a-trial").info.run_id
    ended = end_open_trials(sqlite_uri, parent, failed=["t_err"], finished=["t_torn_down"])
    assert ended == ["t_cut", "t_err", "t_torn_down"]
    status = {n: c.get_run(i).info.status for n, i in ids.items()}
    assert status == {
        "t_done": "FINISHED",
        "t_cut": "KILLED",
        "t_err": "FAILED",
        "t_torn_down": "FINISHED",
    }
    assert c.get_run(other).info.status == "RUNNING"
    assert end_open_trials(sqlite_uri, parent) == []  # a second call finds nothing open


def test_a_runs_spool_is_in_its_own_run_folder(sqlite_uri, tmp_path):
    """train.py's run spools into <storage>/<run name>, a trial into <storage>/train-<id> (its
    Ray Train folder); with a URI storage path, under <output_dir>/mlflow_spools on the node,
    never into a folder named after the URI inside Ray's temporary working directory."""
    from mtsam.config import build_config
    from mtsam.tracking.observer import make_observer
    from mtsam.tracking.setup import spool_root, tracking_for_run

    cfg = build_config({}, [f"output_dir={tmp_path / 'out'}", f"tracking.uri={sqlite_uri}"])
    storage = str(tmp_path / "results")
    assert spool_root(cfg, storage) == storage
    assert spool_root(cfg, "s3://bucket/runs") == str(tmp_path / "out" / "mlflow_spools")
    relative = build_config({}, ["output_dir=outputs"])  # e.g. under `ray job submit`
    assert spool_root(relative, "s3://b/r") == str(Path.home() / "mtsam_mlflow_spools")
    info = tracking_for_run(cfg, run_name="myrun", storage=storage)
    obs = make_observer(info, cfg)
    assert obs is not None
    assert obs.tracker.spool_path.parent == tmp_path / "results" / "myrun" / "mlflow_spool"
    obs.on_end("FINISHED")


def test_a_restarted_run_keeps_its_best_adapter(sqlite_uri, tmp_path):
    """The run holds the adapter of its best epoch. A worker restart resumes from a checkpoint
    carrying the observer's state: a later, worse epoch must not replace that adapter (which
    ``register_as`` would then register), as it did when the best value started afresh."""
    from mtsam.config import build_config
    from mtsam.tracking.observer import make_observer
    from mtsam.tracking.setup import tracking_for_run

    cfg = build_config(
        {},
        [
            f"output_dir={tmp_path / 'out'}",
            f"tracking.uri={sqlite_uri}",
            "tune.metric=val/semantic/miou",
        ],
    )
    info = tracking_for_run(cfg, run_name="restarted", storage=str(tmp_path / "results"))
    assert (info["metric"], info["mode"]) == ("val/semantic/miou", "max")

    def epoch(obs, n: int, miou: float) -> None:
        d = tmp_path / f"adapter_{n}"
        d.mkdir()
        (d / "adapter.json").write_text(json.dumps({"epoch": n}))
        obs.on_epoch(n, {"val/semantic/miou": miou}, pictures=None, adapter_dir=d)

    first = make_observer(info, cfg)
    epoch(first, 1, 0.5)
    epoch(first, 2, 0.6)
    saved = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
    assert saved["best"] == 0.6
    run_id = first.tracker.run_id
    assert first.tracker.flush()  # delivered; then the worker dies without ending the run

    again = make_observer(info, cfg)  # the restarted worker reopens the same run
    assert again.tracker.run_id == run_id
    again.load_state_dict(saved)
    epoch(again, 3, 0.55)
    again.on_end("FINISHED")

    c = _client(sqlite_uri)
    got = c.download_artifacts(run_id, "adapter/adapter.json", str(tmp_path / "dl"))
    assert json.loads(Path(got).read_text()) == {"epoch": 2}
    history = c.get_metric_history(run_id, "val/semantic/miou")
    assert sorted((m.step, m.value) for m in history) == [(1, 0.5), (2, 0.6), (3, 0.55)]

    # A value saved for another ranking (a resume with another tune.metric) or another store
    # is not used: the observer starts afresh.
    for changed in (
        {"metric": "val/depth/abs_err"},
        {"mode": "min"},
        {"uri": "sqlite:////x.db"},
        {"parent_run_id": "0123abcd"},  # a sweep run recreated on resume: a new trial run
    ):
        other = make_observer(info, cfg)
        other.load_state_dict(saved | changed)
        assert other.best is None, changed
        other.on_end("FINISHED")
    same = make_observer(info, cfg)
    same.load_state_dict(saved)
    assert same.best == 0.6
    same.on_end("FINISHED")
