"""cluster.yaml: valid for Ray's cluster launcher, installs what pyproject.toml lists, closed ports.

Offline only: Ray's own JSON schema and config preparation (no cloud is contacted).
"""

from __future__ import annotations

import ast
import json
import re
import shlex
from importlib import metadata
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml
from packaging.requirements import Requirement
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster.yaml"
RAY_DIR = Path(ray.autoscaler.__file__).parent
# Packages the cluster installs beyond pyproject.toml: cloud clients no local run needs.
CLOUD_ONLY = {"boto3"}
PUBLIC = {"0.0.0.0", "::", "0:0:0:0:0:0:0:0", "*", ""}


@pytest.fixture(scope="module")
def cfg() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


@pytest.fixture(scope="module")
def prepared(cfg) -> dict:
    """The config as `ray up` sees it: Ray's AWS defaults filled in, setup commands merged."""
    return prepare_config(cfg)


def _commands(config: dict, *keys: str) -> list[str]:
    return [c for k in keys for c in config.get(k) or []]


def test_valid_against_rays_schema(cfg, prepared):
    schema = json.loads((RAY_DIR / "ray-schema.json").read_text())
    jsonschema.validate(cfg, schema)  # the file as written
    validate_config(prepared)  # and after Ray's own preparation (cross-field checks too)
    assert cfg["provider"]["type"] == "aws"
    assert cfg["head_node_type"] in cfg["available_node_types"]


def test_node_types_and_autoscaling_bounds(cfg):
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0  # a CPU head
    gpu = {name: t for name, t in types.items() if t["resources"].get("GPU", 0) > 0}
    by_gpus = {t["resources"]["GPU"]: t for t in gpu.values()}
    assert set(by_gpus) == {1, 8}, "one 1-GPU type for sweeps and one 8-GPU type"
    for name, t in gpu.items():
        assert 0 <= t["min_workers"] <= t["max_workers"], name
    assert sum(t["min_workers"] for t in gpu.values()) <= cfg["max_workers"]
    assert by_gpus[1]["node_config"]["InstanceType"].startswith("g5.")
    assert by_gpus[8]["node_config"]["InstanceType"] == "p4d.24xlarge"


def test_repository_is_mounted_and_installed_from_pyproject(cfg, prepared):
    mounts = cfg["file_mounts"]
    # `ray up` resolves "." against the folder it runs in: the header says the repository root.
    remote = [r for r, local in mounts.items() if local in (".", "./")]
    assert "`ray up cluster.yaml` from the repository root" in CLUSTER.read_text()
    assert remote == ["~/mtsam"], mounts
    assert ".venv" in cfg["rsync_exclude"]  # the laptop's environment never travels

    # Every node runs the README's install in the mounted project: `make setup`, which is
    # `pip install -e ".[dev]"` in a fresh venv, so requirements come from pyproject itself.
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r'^\t\$\(PY\) -m pip install -e "\.\[dev\]"$', makefile, re.M)
    assert re.search(r"^setup: \$\(STAMP\)$", makefile, re.M)
    for role in ("head_setup_commands", "worker_setup_commands"):
        cmds = prepared[role]  # setup_commands + the role's own, as Ray merges them
        assert any(re.fullmatch(r"cd ~/mtsam && make setup", c.strip()) for c in cmds), (
            f"{role}: no `cd ~/mtsam && make setup`"
        )


def _simple_commands(cmd: str) -> list[list[str]]:
    """A shell command line split into its simple commands (at &&, ||, ;, |, parentheses)."""
    lex = shlex.shlex(cmd, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    out: list[list[str]] = [[]]
    for tok in lex:
        if tok and set(tok) <= set("&|;()<>"):
            out.append([])
        else:
            out[-1].append(tok)
    return [c for c in out if c]


def _pip_requirements(commands: list[str]) -> list[Requirement]:
    reqs = []
    for cmd in commands:
        for words in _simple_commands(cmd):
            if not words[0].endswith("pip") or words[1:2] != ["install"]:
                continue
            args = words[2:]
            assert "-r" not in args, "requirements must come from pyproject.toml"
            reqs += [Requirement(a) for a in args if not a.startswith("-")]
    return reqs


def _pyproject_requirements() -> list[Requirement]:
    """Dependencies and optional dependencies of pyproject.toml (tomllib needs Python 3.11;
    on 3.10 the installed project's metadata, written from pyproject.toml, is read)."""
    try:
        import tomllib
    except ModuleNotFoundError:
        return [Requirement(r) for r in metadata.requires("mtsam") or []]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project.get("optional-dependencies", {}).values()
    return [Requirement(r) for r in [*project["dependencies"], *(r for e in extras for r in e)]]


def test_extra_pip_installs_agree_with_pyproject(cfg):
    pinned = {r.name: r for r in _pyproject_requirements()}
    all_cmds = _commands(
        cfg,
        "initialization_commands",
        "setup_commands",
        "head_setup_commands",
        "worker_setup_commands",
        "head_start_ray_commands",
        "worker_start_ray_commands",
    )
    extra = _pip_requirements(all_cmds)
    assert extra, "the parser found the cluster's pip line (so it can see a wrong one)"
    for req in extra:
        if req.name in pinned:
            assert str(req.specifier) == str(pinned[req.name].specifier), req
        else:
            assert req.name in CLOUD_ONLY, f"{req} is neither in pyproject.toml nor cloud-only"


def _rules_from_ray_source(name: str) -> ast.AST:
    """The return expression of a function in Ray's AWS config module (read, not imported:
    importing it needs boto3)."""
    tree = ast.parse((RAY_DIR / "_private" / "aws" / "config.py").read_text())
    fn = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == name)
    return next(n for n in ast.walk(fn) if isinstance(n, ast.Return)).value


def _open_to_world(rule: dict) -> bool:
    v4 = [r.get("CidrIp") for r in rule.get("IpRanges", [])]
    v6 = [r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])]
    return "0.0.0.0/0" in v4 or "::/0" in v6


def test_only_ssh_is_open_to_the_internet(cfg):
    # Every node type uses the security group Ray creates (no SecurityGroupIds of unknown rules).
    for name, t in cfg["available_node_types"].items():
        assert "SecurityGroupIds" not in t["node_config"], name
        assert "NetworkInterfaces" not in t["node_config"], name
    # Ray's group: intra-cluster traffic by group membership, SSH from anywhere, then ours.
    intracluster = ast.dump(_rules_from_ray_source("_create_default_intracluster_inbound_rules"))
    assert "UserIdGroupPairs" in intracluster and "IpRanges" not in intracluster
    ssh = ast.literal_eval(_rules_from_ray_source("_create_default_ssh_inbound_rules"))
    extra = cfg["provider"].get("security_group", {}).get("IpPermissions", [])
    for rule in [*ssh, *extra]:
        if _open_to_world(rule):
            assert (rule.get("FromPort"), rule.get("ToPort")) == (22, 22), rule
            assert rule.get("IpProtocol") == "tcp", rule
    assert any(_open_to_world(r) for r in ssh)  # the check above did see Ray's SSH rule


def _mlflow_server_args(cfg) -> tuple[str, list[str]]:
    (cmd,) = [c for c in cfg["head_start_ray_commands"] if "mlflow server" in c]
    inner = cmd[cmd.index("mlflow server") :].split("'")[0]  # the exec'd server command line
    return cmd, shlex.split(inner)


def test_mlflow_on_the_head_binds_a_private_address(cfg):
    cmd, args = _mlflow_server_args(cfg)
    opt = {args[i]: args[i + 1] for i in range(2, len(args) - 1) if args[i].startswith("--")}
    assert opt["--port"] == "5000" and opt["--workers"] == "1"
    assert opt["--backend-store-uri"] == "sqlite:////home/ubuntu/mlflow/mlflow.db"
    assert opt["--default-artifact-root"].startswith("s3://")
    assert "MLFLOW_DISABLE_TELEMETRY=true" in cmd
    host = opt["--host"]
    assert host not in PUBLIC
    # The host is the head's private address, written at setup from its default route.
    assert host == "$MLFLOW_HOST" and 'MLFLOW_HOST="$(cat ~/mlflow/host)"' in cmd
    (writer,) = [c for c in cfg["head_setup_commands"] if "> ~/mlflow/host" in c]
    assert "ip -4 route get" in writer and '"src"' in writer
    assert not any("mlflow server" in c for c in _commands(cfg, "worker_start_ray_commands"))


def test_job_environment(cfg, prepared):
    head = " ".join(prepared["head_setup_commands"])
    worker = " ".join(prepared["worker_setup_commands"])
    for text in (head, worker):
        for line in (
            "export RAY_USAGE_STATS_ENABLED=0",
            "export MLFLOW_DISABLE_TELEMETRY=true",
            "export RAY_AUTH_MODE=token",
        ):
            assert line in text
    assert "MLFLOW_TRACKING_URI=http://$RAY_HEAD_IP:5000" in worker  # the head's private IP
    assert "MLFLOW_TRACKING_URI=http://$(cat ~/mlflow/host):5000" in head
    for cmd in _commands(cfg, "head_start_ray_commands", "worker_start_ray_commands"):
        if "ray start" in cmd:
            assert "--disable-usage-stats" in cmd
    # The dashboard stays on the cluster network (the security group test covers the port).
    (start,) = [c for c in cfg["head_start_ray_commands"] if "ray start --head" in c]
    assert "--dashboard-host=127.0.0.1" in start or "--dashboard-host=0.0.0.0" in start


def test_storage_bucket_agrees_with_configs(cfg):
    _, args = _mlflow_server_args(cfg)
    bucket = args[args.index("--default-artifact-root") + 1].split("/")[2]
    assert "s3://<bucket>/ray_results" in CLUSTER.read_text()  # documented storage path
    assert any(f"s3://{bucket}/data" in c for c in cfg["worker_setup_commands"])
    s3_configs = 0
    for path in sorted((ROOT / "configs").rglob("*.yaml")):
        storage = (yaml.safe_load(path.read_text()).get("scaling") or {}).get("storage_path")
        if storage and storage.startswith("s3://"):
            s3_configs += 1
            assert storage == f"s3://{bucket}/ray_results", path.name
    assert s3_configs >= 1


def test_no_credentials_in_the_file(cfg):
    text = CLUSTER.read_text()
    assert not re.search(r"A(KI|SI)A[0-9A-Z]{16}", text)  # AWS access key ids
    assert not re.search(r"(?i)aws_secret_access_key|aws_session_token|BEGIN [A-Z ]*PRIVATE", text)
    assert "ssh_private_key" not in cfg["auth"]  # Ray makes and keeps the key pair
    # Ray's token is mounted from the user's own file, never written here.
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
