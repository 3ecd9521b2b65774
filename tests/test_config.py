"""The config schema: every YAML under configs/ validates; bad input fails in one clear line."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mtsam.config import ConfigError, ExperimentConfig, build_config, load_config, parse_overrides

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


def test_there_are_configs():
    names = {p.name for p in CONFIGS}
    assert {"default.yaml", "nyuv2_vit_l_tora.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_every_config_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, ExperimentConfig)
    # the YAML names no key the schema dropped: a round trip keeps every value it sets
    raw = yaml.safe_load(path.read_text())
    flat = cfg.flat()
    for section, body in raw.items():
        if isinstance(body, dict):
            for key, value in body.items():
                if not isinstance(value, dict):
                    got = flat[f"{section}.{key}"]
                    assert got == value or (isinstance(got, list) and list(value) == got), key


def test_defaults_need_no_file():
    cfg = load_config(None)
    assert cfg.model.preset == "tiny" and cfg.data.dataset == "scenes"


def test_paper_config_has_the_authors_settings():
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs/nyuv2_vit_l_tora.yaml")
    a, t = cfg.adapter, cfg.train
    assert (a.method, a.r1, a.r2, a.r3, a.targets) == ("tora", 32, 32, 4, ("qkv",))
    assert (a.orth_weight, a.dropout, a.scaling) == (1.0, 0.1, 0.5)
    assert (t.lr, t.weight_decay, t.optimizer, t.warmup_frac, t.schedule, t.epochs) == (
        1e-3,
        1e-6,
        "adam",
        0.05,
        "linear",
        200,
    )
    w = cfg.weights()
    assert w["normal"] == pytest.approx(4 / 6) and w["semantic"] == pytest.approx(1 / 6)
    assert cfg.model.preset == "vit_l"


def test_overrides_parse_yaml_values():
    assert parse_overrides(["train.lr=3e-4", "adapter.targets=[qkv, proj]", "a.b=true"]) == [
        ("train.lr", 3e-4),
        ("adapter.targets", ["qkv", "proj"]),
        ("a.b", True),
    ]
    cfg = build_config({}, ["train.lr=3e-4", "adapter.targets=[qkv, mlp]", "seed=7"])
    assert cfg.train.lr == 3e-4 and cfg.adapter.targets == ("qkv", "mlp") and cfg.seed == 7


def test_override_into_search_space_and_weights():
    cfg = build_config(
        {}, ["tune.space.adapter.r1={type: choice, values: [4, 8]}", "train.task_weights.normal=4"]
    )
    assert cfg.tune.space["adapter.r1"].values == [4, 8]
    assert cfg.weights()["normal"] == pytest.approx(4 / 6)


BAD = [
    ({}, ["train.lr=fast"], r"train\.lr = 'fast'.*number"),
    ({"train": {"lrr": 1}}, [], r"train\.lrr.*Extra inputs"),
    ({}, ["adapter.method=foo"], r"adapter\.method = 'foo'.*'tora'"),
    ({}, ["model.preset=vit_x"], r"model\.preset = 'vit_x'.*'vit_l'"),
    ({}, ["data.tasks=[semantic, human_parts]"], r"data\.tasks: 'human_parts'.*'scenes'"),
    ({}, ["train.task_weights.foo=1"], r"train\.task_weights\.foo"),
    ({}, ["tune.metric=val/foo/miou"], r"tune\.metric = 'val/foo/miou'"),
    ({}, ["nope.x=1"], r"unknown section 'nope'"),
    ({}, ["train.nope=1"], r"--set train\.nope: no such config key"),
    ({}, ["train.lr"], r"expected KEY=VALUE"),
    (
        {},
        ["tune.space.adapter.rr={type: choice, values: [1]}"],
        r"tune\.space\.adapter\.rr: no such",
    ),
    (
        {},
        ["tune.space.adapter.r1={type: choice, values: [0]}"],
        r"tune\.space\.adapter\.r1: value 0",
    ),
    ({}, ["tune.space.train.lr={type: loguniform, low: 0, high: 1}"], r"low > 0"),
    ({}, ["tune.space.train.lr={type: uniform, low: 2, high: 1}"], r"low < high"),
    ({}, ["tune.space.scaling.num_workers={type: choice, values: [1]}"], r"only model/adapter"),
    ({}, ["tune.searcher=grid", "tune.space.train.lr={type: choice, values: [1]}"], r"grid"),
    ({}, ["model.base_dtype=bfloat16"], r"use_gpu"),
    (
        {},
        ["scaling.use_gpu=true", "model.base_dtype=bfloat16", "train.precision=fp32"],
        r"model\.base_dtype = 'bfloat16': needs train\.precision",
    ),
    ({}, ["data.dataset=nyuv2"], r"data\.root"),
    ({}, ["data.baseline.depth.abs_err=0"], r"data\.baseline\.depth\.abs_err"),
    (
        {},
        ["data.baseline.semantic.mIoU=0.3"],
        r"data\.baseline\.semantic\.mIoU: semantic reports no metric 'mIoU'.*'miou'",
    ),
    ({}, ["data.baseline.semantic.miou=55.0"], r"data\.baseline\.semantic\.miou = 55\.0.*frac"),
    ({}, ["data.baseline.depth.abs_err=-0.5"], r"abs_err = -0\.5: expected a finite value > 0"),
    ({}, ["data.baseline.depth.abs_err=0.5"], r"data\.baseline: no metric for tasks \['semantic'"),
    ({}, ["tune.metric=val/semantic/mIoU"], r"tune\.metric = 'val/semantic/mIoU'.*'miou'"),
    ({}, ["adapter.dropout=1.5"], r"adapter\.dropout = 1\.5"),
    ({}, ["train.lr=.inf"], r"train\.lr = inf: .*finite"),
    (
        {},
        ["tune.space.train.epochs={type: uniform, low: 1, high: 3}"],
        r"tune\.space\.train\.epochs: value 1\.63\d* is invalid: .*integer",
    ),
    ({}, ["adapter.scaling=.nan"], r"adapter\.scaling = nan: .*finite"),
    ({}, ["adapter.scaling=0"], r"adapter\.scaling = 0: .*greater than 0"),
    ({}, ["train.task_weights.depth=.inf"], r"train\.task_weights\.depth"),
    ({}, ["train.epochs=true"], r"train\.epochs = True: expected a number, not true/false"),
    ({}, ["adapter.dropout=false"], r"adapter\.dropout = False: expected a number"),
    ({}, ["data.num_classes=true"], r"data\.num_classes = True: expected a number"),
    ({}, ["data.augment=1"], r"data\.augment = 1: expected true or false"),
    ({}, ["data.augment=maybe"], r"data\.augment = 'maybe': expected true or false"),
    (
        {},
        ["tune.space.train={type: choice, values: [{batch_size: 64}]}"],
        r"tune\.space\.train: a config section; vary its fields by name",
    ),
    (
        {},
        ["tune.space.data.scenes={type: choice, values: [{num_train: 8}]}"],
        r"tune\.space\.data\.scenes: a config section",
    ),
    ({}, ["train.task_weights=true"], r"train\.task_weights = True: Input should be a valid dict"),
    ({}, ["train.task_weights.depth=true"], r"train\.task_weights: depth = True: expected a num"),
    (
        {},
        ["data.baseline.depth.abs_err=false"],
        r"data\.baseline: depth\.abs_err = False: expected a number, not true/false",
    ),
]


@pytest.mark.parametrize(("data", "overrides", "pattern"), BAD)
def test_bad_input_one_line(data, overrides, pattern):
    with pytest.raises(ConfigError, match=pattern) as e:
        build_config(data, overrides)
    assert "\n" not in str(e.value) and str(e.value).startswith("config error:")


def test_bad_files_name_the_file(tmp_path):
    missing = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError, match=r"absent\.yaml: no such file"):
        load_config(missing)
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml.*not valid YAML"):
        load_config(broken)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("train:\n  epochs: zero\n")
    with pytest.raises(ConfigError, match=r"wrong\.yaml: train\.epochs = 'zero'"):
        load_config(wrong)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00train")
    with pytest.raises(ConfigError, match=r"binary\.yaml: unreadable as UTF-8 text"):
        load_config(binary)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(scalar)


def test_config_is_read_only():
    cfg = load_config(None)
    with pytest.raises(Exception, match="frozen"):
        cfg.train.lr = 1.0  # type: ignore[misc]
