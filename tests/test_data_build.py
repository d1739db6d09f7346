"""Who builds shards: ``conure data``'s flags and the run config's ``data`` keys are one definition;
the library only reads shards and, where there are none, names the command that builds them;
``conure data describe`` validates and describes what a data root holds."""

from __future__ import annotations

import dataclasses
import json
import logging
import shlex
from pathlib import Path

import pytest
import torch

from conure_dist.cli import build_parser, main
from conure_dist.config import DataConfig, load_config
from conure_dist.config.data_flags import READ_KEYS, SOURCE_FLAGS, data_command, data_config
from conure_dist.config.describe import describe
from conure_dist.data.dataset import MissingShardsError, open_dataset
from conure_dist.data.manifest import Manifest
from conure_dist.dist import DistInfo
from data_tools.describe import describe_root
from data_tools.prepare import build_missing_shards

PRESET = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
CPU = DistInfo(0, 1, 0, torch.device("cpu"), None)
SMALL = ["data.synthetic.num_users=300", "data.synthetic.num_items=60", "data.instances_per_shard=100"]


def test_every_data_key_is_a_flag_or_a_reading_key_with_the_schemas_default_and_help():
    keys = {k.key: k for k in describe(DataConfig)}
    flagged = {f.key for flags in SOURCE_FLAGS.values() for f in flags}
    assert flagged | set(READ_KEYS) == set(keys) and not flagged & set(READ_KEYS)
    parser = build_parser()
    args = parser.parse_args(["data", "synthetic", "--out", "x"])
    assert data_config("synthetic", args) == DataConfig(source="synthetic", root="x")
    args = parser.parse_args(["data", "ttl", "--pretrain", "p", "--out", "x"])
    assert data_config("ttl", args).seq_len == 100  # TTL's own default, the one flag that differs
    sub = parser._subparsers._group_actions[0].choices["data"]._subparsers._group_actions[0].choices
    helps = {a.option_strings[0]: a.help for a in sub["movielens"]._actions if a.option_strings}
    assert helps["--min-t1-interactions"].startswith(" ".join(keys["min_t1_interactions"].doc.split()))
    assert "[config key: data.min_t1_interactions] (default: 0)" in helps["--min-t1-interactions"]


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        [
            "data.synthetic.relation=related",
            "data.synthetic.relation_strength=0.5",
            "data.split=[0.15,0.05,0.8]",
            "data.split_seed=3",
            "data.root=/tmp/a dir",
        ],
    ],
)
def test_the_command_of_a_config_describes_the_same_shards(overrides):
    cfg = load_config(PRESET, overrides)
    command = data_command(cfg.data)
    words = shlex.split(command)
    assert words[:3] == ["conure", "data", "synthetic"]
    built = data_config("synthetic", build_parser().parse_args(words[1:]))
    # Every key that builds shards comes back; how a run reads them is not the command's business.
    assert dataclasses.replace(built, **{k: getattr(cfg.data, k) for k in READ_KEYS}) == cfg.data
    if not overrides:
        assert command == "conure data synthetic --out runs/data/quickstart --instances-per-shard 2000"


def test_movielens_command_names_the_source_and_the_filter():
    cfg = load_config(PRESET.parent / "ml100k.yaml", ["data.source_dir=/data/ml 100k"])
    assert data_command(cfg.data) == (
        "conure data movielens --src '/data/ml 100k' --out runs/data/ml100k "
        "--min-t1-interactions 6 --instances-per-shard 10000"
    )


def test_the_library_names_the_command_for_missing_shards_and_the_command_makes_them(
    tmp_path, caplog, capsys, monkeypatch
):
    cfg = load_config(PRESET, [*SMALL, f"data.root={tmp_path / 'd'}"])
    with pytest.raises(MissingShardsError) as err:
        open_dataset(cfg)
    command = data_command(cfg.data)
    assert str(err.value) == (
        f"no manifest.json under data.root={tmp_path / 'd'}: build the shards with "
        f"`{command}` (`conure run` and `conure experiment` build them on first use)"
    )
    assert main(shlex.split(command)[1:]) == 0
    manifest, infos = open_dataset(cfg)  # the shards the command built are the config's
    assert [i.name for i in infos] == ["t1", "click", "like", "gender", "age"]
    assert manifest.split_info("t1", "train").num_instances == 240
    # Built on first use instead, relative roots are logged as absolute paths.
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.INFO, logger="data_tools.prepare"):
        build_missing_shards(dataclasses.replace(cfg.data, root="rel/d"), CPU)
    assert (
        f"building the synthetic shards under {Path('rel/d').resolve()} (data.root=rel/d is relative to "
        "the current directory" in caplog.text
    )
    assert Manifest.load("rel/d").split == manifest.split
    # Without a source, the error still names the data root and the command family.
    none = load_config(PRESET, ["data.source=none", f"data.root={tmp_path / 'none'}"])
    assert (
        main(
            [
                "run",
                "--config",
                str(PRESET),
                "--out",
                str(tmp_path / "r"),
                "data.source=none",
                f"data.root={tmp_path / 'none'}",
            ]
        )
        == 2
    )
    assert (
        f"no manifest.json under data.root={tmp_path / 'none'}: build shards there with `conure data "
        f"synthetic|movielens|ttl ... --out {tmp_path / 'none'}`"
    ) in capsys.readouterr().err
    with pytest.raises(MissingShardsError):
        open_dataset(none)


@pytest.fixture(scope="module")
def small_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("describe") / "d"
    assert (
        main(
            [
                "data",
                "synthetic",
                "--out",
                str(root),
                "--num-users",
                "300",
                "--num-items",
                "60",
                "--instances-per-shard",
                "100",
            ]
        )
        == 0
    )
    return root


def test_describe_counts_shards_bytes_and_a_sample_per_task(small_root, capsys):
    d = describe_root(str(small_root))
    tasks = {t["name"]: t for t in d["tasks"]}
    assert list(tasks) == ["t1", "click", "like", "gender", "age"]
    t1 = tasks["t1"]["splits"]
    assert [t1[s]["instances"] for s in ("train", "valid", "test")] == [240, 15, 45]
    assert [t1[s]["shards"] for s in ("train", "valid", "test")] == [3, 1, 1]  # 100 instances per shard
    manifest = Manifest.load(str(small_root))
    for task in manifest.tasks:
        on_disk = sum((small_root / s.url).stat().st_size for split in task.splits.values() for s in split.shards)
        assert tasks[task.name]["bytes"] == on_disk
        for split, info in task.splits.items():
            got = tasks[task.name]["splits"][split]
            assert (got["instances"], got["sha256_verified"], got["sha256_not_recorded"]) == (
                info.num_instances,
                len(info.shards),
                0,
            )
    sample = tasks["gender"]["sample"]
    assert len(sample["seq"]) == 20 and sample["class_name"] == ["F", "M"][sample["target"]]
    assert (
        "target" not in tasks["t1"]["sample"]
        and 0 <= tasks["click"]["sample"]["target"] < tasks["click"]["num_outputs"]
    )
    assert main(["data", "describe", str(small_root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(d))
    assert main(["data", "describe", str(small_root)]) == 0
    num_shards = sum(len(split.shards) for task in manifest.tasks for split in task.splits.values())
    assert f"all {num_shards} shards verified" in capsys.readouterr().out


@pytest.mark.parametrize("damage", ["altered", "truncated", "missing"])
def test_describe_names_the_shard_at_fault(small_root, tmp_path, capsys, damage):
    import shutil

    root = tmp_path / "d"
    shutil.copytree(small_root, root)
    shard = root / "click" / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    if damage == "altered":
        data[700] ^= 1
        shard.write_bytes(bytes(data))
    elif damage == "truncated":
        shard.write_bytes(bytes(data[:1000]))
    else:
        shard.unlink()
    assert main(["data", "describe", str(root)]) == 1
    captured = capsys.readouterr()
    why = {
        "altered": "sha256 differs from the manifest",
        "truncated": "1000 bytes, the manifest says",
        "missing": "missing",
    }[damage]
    assert len(captured.err.splitlines()) == 1 and captured.err.startswith(f"error: shard {shard}: {why}")
    assert captured.out == ""


def test_describe_says_where_the_manifest_records_no_sha256(small_root, tmp_path, capsys):
    import shutil

    from data_tools.describe import main as describe_main

    root = tmp_path / "d"
    shutil.copytree(small_root, root)
    raw = json.loads((root / "manifest.json").read_text())
    unrecorded = raw["tasks"][1]["splits"]["test"]["shards"]
    for shard in unrecorded:
        shard["sha256"] = None
    (root / "manifest.json").write_text(json.dumps(raw))
    assert describe_main([str(root)]) == 0
    out = capsys.readouterr().out
    n = len(unrecorded)
    assert n == 2 and f"0 verified, {n} not recorded" in out and f"({n} shards have no sha256 in the manifest" in out
