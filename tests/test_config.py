"""Config loading: presets, overrides, and errors that name the key and the file."""

from pathlib import Path

import pytest

from conure_dist.config import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PRESETS = sorted(CONFIGS.glob("*.yaml"))
EXPERIMENTS = sorted((CONFIGS / "experiments").glob("*.yaml"))


def test_every_yaml_under_configs_is_a_preset_or_an_experiment():
    """The two parametrized tests below load every file: a YAML elsewhere would go unchecked."""
    assert sorted(CONFIGS.rglob("*.y*ml")) == sorted(PRESETS + EXPERIMENTS)
    assert {p.name for p in PRESETS} == {
        "quickstart.yaml",
        "ml100k.yaml",
        "ml100k_loo.yaml",
        "ml1m.yaml",
        "ml25m.yaml",
        "ttl.yaml",
        "paper_ttl.yaml",
        "paper_synthetic.yaml",
        "growth_12tasks.yaml",
        "ttl_cpu_scaling.yaml",
    }
    assert len(EXPERIMENTS) >= 9


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_every_preset_loads_and_validates(path):
    cfg = load_config(path)
    assert cfg.tasks, "a preset lists its tasks"
    assert cfg.tasks[0].name in ("t1",), "T1 comes first"
    assert all(0 <= t.prune_ratio < 1 for t in cfg.tasks if t.prune_ratio != "auto")


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_every_experiment_file_loads_and_validates(path):
    from conure_dist.experiment.spec import load_experiment, run_config
    from conure_dist.methods import METHODS

    experiment = load_experiment(path)  # loads every (variant, method) run config
    assert experiment.base in PRESETS, "an experiment varies one of the presets"
    assert experiment.methods and set(experiment.methods) <= set(METHODS)
    assert experiment.seeds and len(set(experiment.seeds)) == len(experiment.seeds)
    for variant in experiment.variants:
        for method in variant.methods or experiment.methods:
            cfg = run_config(experiment, variant, method, experiment.seeds[-1])
            assert cfg.method.name == method and cfg.seed == experiment.seeds[-1]
            assert cfg.tasks[0].name == "t1"


@pytest.mark.parametrize("path", sorted((CONFIGS / "deepspeed").glob("*.json")), ids=lambda p: p.name)
def test_every_deepspeed_json_agrees_with_a_run_config(path):
    import json

    from conure_dist.config import DistConfig
    from conure_dist.train.deepspeed_engine import deepspeed_config

    stage = json.loads(path.read_text())["zero_optimization"]["stage"]
    ds = deepspeed_config(32, DistConfig(engine="deepspeed", zero_stage=stage, deepspeed_config=str(path)))
    assert ds["zero_optimization"]["stage"] == stage and ds["train_micro_batch_size_per_gpu"] == 32


def test_paper_presets_use_paper_hyperparameters():
    ttl = load_config(CONFIGS / "ttl.yaml")
    assert ttl.model.channels == 256 and ttl.model.block_dilations == [1, 4] * 4
    assert [t.prune_ratio for t in ttl.tasks] == [0.7, 0.8, 0.9, 0.8, 0.9, 0.9]
    assert ttl.tasks[0].lr == 1e-3 and ttl.tasks[0].batch_size == 32
    assert all(t.lr == 1e-4 and t.batch_size == 512 for t in ttl.tasks[1:])
    assert ttl.train.negative_fraction == 0.2 and ttl.train.bpr_rho == 0.3
    ml = load_config(CONFIGS / "ml25m.yaml")
    assert ml.model.block_dilations == [1, 4] * 6
    assert [t.prune_ratio for t in ml.tasks] == [0.7, 0.8, 0.7]


@pytest.mark.parametrize("name", ["ml100k.yaml", "ml100k_loo.yaml", "ml1m.yaml", "ml25m.yaml"])
def test_movielens_presets_stop_on_validation_patience(name):
    """Data size decides how long a phase trains: patience ends it, the epochs are only a cap."""
    cfg = load_config(CONFIGS / name)
    assert cfg.train.patience is not None
    assert all(t.epochs >= 3 * cfg.train.patience for t in cfg.tasks), [t.epochs for t in cfg.tasks]
    assert all(t.retrain_epochs >= cfg.train.patience for t in cfg.tasks)


def test_ml100k_loo_preset_is_the_sequential_protocol_at_recbole_size():
    cfg = load_config(CONFIGS / "ml100k_loo.yaml")
    assert cfg.data.split_protocol == "leave_one_out" and cfg.data.t1_ratings == "all"
    assert cfg.model.channels == 64 and cfg.model.block_dilations == [1, 4] * 4  # 8 residual blocks
    assert cfg.data.seq_len == 31  # 30 items of history and the target
    assert cfg.train.negative_fraction == 1.0  # full softmax


def _write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


BASE = "tasks:\n  - {name: t1}\n  - {name: b}\n"


def test_overrides_dotted_indexed_and_star(tmp_path):
    path = _write(tmp_path, BASE)
    cfg = load_config(
        path,
        ["train.eval_batch_size=64", "tasks.1.lr=0.5", "tasks.0.lr=3e-3", "tasks.*.epochs=7", "dist.precision=bf16"],
    )
    assert cfg.train.eval_batch_size == 64
    assert cfg.tasks[1].lr == 0.5 and cfg.tasks[0].lr == 3e-3 and cfg.tasks[1].l2 == 0.0
    assert [t.epochs for t in cfg.tasks] == [7, 7]
    assert cfg.dist.precision == "bf16"


@pytest.mark.parametrize(
    "text,overrides,message",
    [
        (BASE + "trian: {}\n", [], "unknown key 'trian'"),
        (BASE + "train: {eval_batchsize: 3}\n", [], "unknown key 'train.eval_batchsize'"),
        (BASE, ["train.topk=0"], "key 'train.topk': must be >= 1"),
        (BASE, ["tasks.0.prune_ratio=1.5"], "key 'tasks.0.prune_ratio'"),
        (BASE, ["tasks.1.epochs=two"], "key 'tasks.1.epochs': expected an integer"),
        (BASE, ["dist.precision=fp8"], "key 'dist.precision': must be one of"),
        (BASE, ["dist.zero_stage=2"], "needs dist.engine: deepspeed"),
        (BASE, ["tasks.5.lr=1"], "not an index below 2"),
        ("tasks:\n  - {name: t1}\n  - {name: t1}\n", [], "listed twice"),
        ("tasks: []\n", [], "needs at least one task"),
        (BASE, ["train.progress"], "not of the form key=value"),
        (BASE, ["tasks.0.lr=.inf"], "key 'tasks.0.lr': expected a finite number"),
        (
            BASE,
            ["train.log_every=[1"],
            "key 'train.log_every': expected an integer, got '[1' (set by the override 'train.log_every=[1')",
        ),
        (BASE, ["train.topk=[5, 5]"], "key 'train.topk': lists a cut-off twice: [5, 5]"),
        (BASE, ["train.topk=[1"], "key 'train.topk': expected int | list[int], got '[1'"),
        (
            BASE,
            ["tasks.*.prune_ratio=1.5"],
            "key 'tasks.0.prune_ratio': must be in [0, 1) or 'auto', got 1.5 (set by the "
            "override 'tasks.*.prune_ratio=1.5')",
        ),
        (BASE, ["tasks.1.name=no"], "got False (YAML reads yes/no/on/off as true/false: quote the value)"),
        (BASE, ["seed=-3"], "key 'seed': must be >= 0"),
        (BASE, ["data.split=[0.9,0.0,0.1]"], "key 'data.split': must be three fractions > 0"),
        (BASE, ["data.synthetic.num_items=15"], "key 'data.synthetic.num_items': must be >= 20"),
        (
            BASE,
            ["dist.engine=deepspeed", "dist.deepspeed_config=nope.json"],
            "key 'dist.deepspeed_config': no such file",
        ),
        ("seed: 5\nseed: 7\n" + BASE, [], "key 'seed' is given twice (first on line 1)"),
        (BASE, ["train.bpr_rho=.nan"], "key 'train.bpr_rho': expected a finite number"),
        (BASE, ["train.eval_max_users=0"], "key 'train.eval_max_users': must be >= 1, got 0"),
        (BASE, ["train.eval_every=0"], "key 'train.eval_every': must be >= 1, got 0"),
        (BASE, ["train.eval_every=1.5"], "key 'train.eval_every': expected an integer"),
    ],
)
def test_errors_name_key_and_file(tmp_path, text, overrides, message):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    assert str(path) in str(info.value)
    assert message in str(info.value)


def test_override_values_that_are_not_yaml_stay_text(tmp_path):
    path = _write(tmp_path, BASE)
    cfg = load_config(path, ["data.root=@shards", "data.source_dir=/data/ml 100k #2"])
    assert cfg.data.root == "@shards" and cfg.data.source_dir == "/data/ml 100k #2"
    quoted = load_config(path, ['data.root="runs/#1"', "data.source_dir='a #b'"])
    assert quoted.data.root == "runs/#1" and quoted.data.source_dir == "a #b"
    in_file = load_config(path)
    with pytest.raises(ConfigError) as info:
        load_config(path, ["train.topk=0"])
    assert "set by the override 'train.topk=0'" in str(info.value) and in_file.train.topk == 5


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "tasks: [\n"))
    (tmp_path / "latin.yaml").write_bytes(b"# caf\xe9\n" + BASE.encode())
    with pytest.raises(ConfigError, match=r"latin\.yaml: not UTF-8 text"):
        load_config(tmp_path / "latin.yaml")


def test_deepspeed_json_extras_cannot_contradict_the_run_config(tmp_path):
    from conure_dist.config import DistConfig
    from conure_dist.train.deepspeed_engine import deepspeed_config

    zero2 = CONFIGS / "deepspeed" / "zero2.json"
    ds = deepspeed_config(
        16, DistConfig(engine="deepspeed", zero_stage=2, precision="bf16", deepspeed_config=str(zero2))
    )
    assert ds["train_micro_batch_size_per_gpu"] == 16 and ds["zero_optimization"]["stage"] == 2
    assert ds["zero_optimization"]["overlap_comm"] is True
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    with pytest.raises(ValueError, match="'zero_optimization.stage' is 2 but dist.zero_stage is 1"):
        deepspeed_config(16, DistConfig(engine="deepspeed", zero_stage=1, deepspeed_config=str(zero2)))
    bad = tmp_path / "bad.json"
    bad.write_text('{"train_batch_size": 64}')
    with pytest.raises(ValueError, match="bad.json: key 'train_batch_size' is set by the run config"):
        deepspeed_config(16, DistConfig(engine="deepspeed", deepspeed_config=str(bad)))


def test_cuda_without_a_cuda_device_names_the_key(monkeypatch):
    import torch

    from conure_dist.config import DistConfig
    from conure_dist.dist import init_distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="key 'dist.device': is 'cuda' but no CUDA device"):
        init_distributed(DistConfig(device="cuda"))
