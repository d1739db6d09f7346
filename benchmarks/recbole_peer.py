"""RecBole's NextItNet on exactly this project's leave-one-out split of MovieLens (the peer of
docs/results/ml100k_loo.md).

Two steps:

``export``: the T1 histories that built a leave-one-out data root (``configs/ml100k_loo.yaml``)
as RecBole atomic files with the split given (``benchmark_filename``): ``NAME.train.inter`` holds
every training prefix (a history of at most ``--max-len`` items and the next item), and
``NAME.valid.inter`` / ``NAME.test.inter`` one row per user, whose target and history are checked
against the data root's own validation and test shards before anything is written. Runs with the
project's Python::

    python benchmarks/recbole_peer.py export --data runs/data/ml100k_loo --out runs/recbole/atomic

``train``: RecBole's NextItNet on those files, in pieces: each call trains whole epochs until
``--budget-s`` would run out, saves model, optimizer, random state and early-stopping state, and
the next call goes on from there; after the last epoch (``--epochs``, or ``--stopping-step``
validations without a better MRR@5) the best epoch is tested with full ranking (``--finish``
tests the best epoch so far, and the result says training was cut short). Runs in a
virtual environment holding RecBole (never the project's own environment)::

    /work/venv-recbole/bin/python benchmarks/recbole_peer.py train --atomic runs/recbole/atomic \\
        --work runs/recbole/seed0 --seed 0

It prints and writes ``{work}/result.json``: settings, RecBole's version, per-epoch validation,
the best epoch's test MRR@5 / NDCG@5 / HR@5 and training throughput (prefixes per second).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

NAME = "ml100k_loo"
SPLITS = ("train", "valid", "test")


# --- export (the project's Python) ---


def _histories(data_root: str) -> tuple[list[np.ndarray], Any]:
    """Each T1 row's whole chronological history, rebuilt from the raw files with the recipe the
    manifest records, and the manifest."""
    from conure_dist.data.manifest import Manifest
    from data_tools.movielens import read_movielens

    manifest = Manifest.load(data_root)
    if manifest.split.get("protocol") != "leave_one_out":
        sys.exit(f"{data_root}: not a leave-one-out split (manifest split: {manifest.split})")
    recipe = manifest.source["recipe"]
    _, tasks, _, _ = read_movielens(
        manifest.source["src"],
        seq_len=manifest.seq_len,
        layout=manifest.source["layout"],
        min_t1_interactions=recipe["min_t1_interactions"],
        t1_ratings="all" if recipe["t1"] == "most recent ratings, all of them" else "below_4",
        full_history=True,
    )
    assert tasks[0].histories is not None
    return tasks[0].histories, manifest


def _held_out(manifest: Any, split: str) -> dict[int, np.ndarray]:
    """User -> the non-padding items of its one sequence in ``split`` of T1 (target last)."""
    from conure_dist.data.stream import iter_batches

    rows: dict[int, np.ndarray] = {}
    for batch in iter_batches(manifest, "t1", split, 1024, shuffle=False, seed=0, epoch=0):
        for user, seq in zip(batch.user.tolist(), batch.seq.numpy(), strict=True):
            rows[user] = seq[seq > 0]
    return rows


def export(data_root: str, out: str, max_len: int) -> dict[str, int]:
    histories, manifest = _histories(data_root)
    held = {split: _held_out(manifest, split) for split in ("valid", "test")}
    rows: dict[str, list[str]] = {split: [] for split in SPLITS}
    for user, history in enumerate(histories):
        n = len(history)
        train_end = n - 2 if n >= 3 else n
        for i in range(1, train_end):
            rows["train"].append(_row(user, history[max(0, i - max_len) : i], history[i]))
        for split, end in (("valid", n - 2), ("test", n - 1)):
            if n < 3:
                assert user not in held[split], f"user {user} has {n} items but a {split} instance"
                continue
            ours = held[split][user]
            # The data root's sequence ends with the same target after the same history (it holds
            # the last seq_len items, the export the last max_len before the target).
            shared = min(len(ours), max_len + 1, end + 1)
            if not np.array_equal(ours[-shared:], history[: end + 1][-shared:]):
                sys.exit(f"user {user}: the {split} shard does not end with the exported history")
            rows[split].append(_row(user, history[max(0, end - max_len) : end], history[end]))
    for split in ("valid", "test"):
        assert len(rows[split]) == len(held[split]), f"{split}: {len(rows[split])} rows for {len(held[split])} users"
    folder = Path(out) / NAME
    folder.mkdir(parents=True, exist_ok=True)
    header = "user_id:token\titem_id_list:token_seq\titem_id:token\n"
    for split in SPLITS:
        (folder / f"{NAME}.{split}.inter").write_text(header + "\n".join(rows[split]) + "\n")
    return {split: len(rows[split]) for split in SPLITS}


def _row(user: int, history: np.ndarray, target: int) -> str:
    return f"{user}\t{' '.join(str(int(i)) for i in history)}\t{int(target)}"


# --- train (RecBole's environment) ---


def recbole_config(atomic: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """NextItNet at 64 channels, 8 residual blocks (dilations [1, 4] x block_num 4), history of
    at most 30, cross-entropy over every item at each prefix's last position, batch 256, full
    ranking; RecBole's defaults otherwise (Adam, lr 1e-3, reg_weight 1e-5)."""
    return {
        "model": "NextItNet",
        "dataset": NAME,
        "data_path": atomic,
        "benchmark_filename": list(SPLITS),
        "USER_ID_FIELD": "user_id",
        "ITEM_ID_FIELD": "item_id",
        "load_col": {"inter": ["user_id", "item_id_list", "item_id"]},
        "MAX_ITEM_LIST_LENGTH": args.max_len,
        "embedding_size": 64,
        "block_num": 4,
        "dilations": [1, 4],
        "kernel_size": 3,
        "reg_weight": 1e-5,
        "loss_type": "CE",
        "train_neg_sample_args": None,
        "learning_rate": 1e-3,
        "train_batch_size": 256,
        "eval_batch_size": 256,
        "epochs": args.epochs,
        "stopping_step": args.stopping_step,
        "eval_args": {"group_by": "user", "order": "TO", "mode": "full"},
        "metrics": ["MRR", "NDCG", "Hit"],
        "topk": [5],
        "valid_metric": "MRR@5",
        "seed": seed,
        "reproducibility": True,
        "device": "cpu",
        "use_gpu": False,
        "show_progress": False,
        "checkpoint_dir": str(Path(args.work) / "saved"),
        "log_wandb": False,
    }


def _numpy_2_aliases() -> None:
    """RecBole 1.2.1 assigns ``np.float = np.float_`` and the like, names NumPy 2 removed; give it
    the same types under those names (no numerical change)."""
    for name, alias in (("float_", np.float64), ("complex_", np.complex128), ("unicode_", np.str_)):
        if name not in np.__dict__:
            setattr(np, name, alias)


def train(args: argparse.Namespace) -> dict[str, Any] | None:
    _numpy_2_aliases()
    import recbole
    import torch
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.model.sequential_recommender import NextItNet
    from recbole.trainer import Trainer
    from recbole.utils import init_seed

    started = time.monotonic()
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    args.atomic = str(Path(args.atomic).resolve())
    os.chdir(work)  # RecBole writes its logs and TensorBoard files under the current directory
    state_path, best_path = work / "state.pt", work / "best.pt"
    config = Config(model="NextItNet", config_dict=recbole_config(args.atomic, args.seed, args))
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    init_seed(config["seed"], config["reproducibility"])
    model = NextItNet(config, train_data.dataset)
    trainer = Trainer(config, model)
    record: dict[str, Any] = {"epochs": [], "best_epoch": None, "best_valid": -1.0, "since_best": 0, "done": False}
    if state_path.exists():
        saved = torch.load(state_path, weights_only=False)
        model.load_state_dict(saved["model"])
        trainer.optimizer.load_state_dict(saved["optimizer"])
        torch.set_rng_state(saved["rng"])
        record = saved["record"]
    trainer.eval_collector.data_collect(train_data)
    while not record["done"] and not args.finish:
        epoch = len(record["epochs"])
        spent = time.monotonic() - started
        last = record["epochs"][-1]["train_s"] + record["epochs"][-1]["valid_s"] if record["epochs"] else 0.0
        if spent + 1.05 * last > args.budget_s:
            break
        t0 = time.monotonic()
        loss = trainer._train_epoch(train_data, epoch)
        t1 = time.monotonic()
        score, result = trainer._valid_epoch(valid_data)
        t2 = time.monotonic()
        record["epochs"].append(
            {
                "epoch": epoch,
                "loss": float(loss),
                "train_s": t1 - t0,
                "valid_s": t2 - t1,
                "threads": torch.get_num_threads(),
                "valid": {k: float(v) for k, v in result.items()},
            }
        )
        if score > record["best_valid"]:
            record.update(best_epoch=epoch, best_valid=float(score), since_best=0)
            torch.save(model.state_dict(), best_path)
        else:
            record["since_best"] += 1
        record["done"] = record["since_best"] >= args.stopping_step or epoch + 1 >= args.epochs
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": trainer.optimizer.state_dict(),
                "rng": torch.get_rng_state(),
                "record": record,
            },
            state_path,
        )
        print(f"epoch {epoch}: loss {loss:.4f}, valid {dict(result)}, {t1 - t0:.0f}s", flush=True)
    if not record["done"] and not args.finish:
        print(f"{len(record['epochs'])} epochs so far; run the same command again to go on", flush=True)
        return None
    model.load_state_dict(torch.load(best_path, weights_only=True))
    test = trainer.evaluate(test_data, load_best_model=False)
    num_train = len(train_data.dataset)
    train_s = sum(e["train_s"] for e in record["epochs"])
    report = {
        "recbole": recbole.__version__,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "settings": {k: v for k, v in recbole_config(args.atomic, args.seed, args).items() if k != "data_path"},
        "num_train_prefixes": num_train,
        "num_valid": len(valid_data.dataset),
        "num_test": len(test_data.dataset),
        "epochs_run": len(record["epochs"]),
        "stopped": "early stopping or the epoch cap" if record["done"] else "--finish, before early stopping",
        "best_epoch": record["best_epoch"],
        "best_valid": record["epochs"][record["best_epoch"]]["valid"],
        "test": {k: float(v) for k, v in test.items()},
        "train_prefixes_per_s": num_train * len(record["epochs"]) / train_s,
        "train_prefixes_per_s_by_threads": {
            str(n): num_train * len(on) / sum(e["train_s"] for e in on)
            for n in sorted({e.get("threads", 1) for e in record["epochs"]})
            if (on := [e for e in record["epochs"] if e.get("threads", 1) == n])
        },
        "epochs": record["epochs"],
    }
    (work / "result.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: report[k] for k in ("best_epoch", "test", "train_prefixes_per_s")}), flush=True)
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="write the atomic files of a leave-one-out data root")
    ex.add_argument("--data", required=True, help="data root built with data.split_protocol: leave_one_out")
    ex.add_argument("--out", required=True, help="folder for the atomic files (a subfolder per dataset)")
    ex.add_argument("--max-len", type=int, default=30, help="items of history before a target (RecBole's 30)")
    tr = sub.add_parser("train", help="train and test RecBole's NextItNet on the exported files, in pieces")
    tr.add_argument("--atomic", required=True, help="the export's --out")
    tr.add_argument("--work", required=True, help="folder of this seed's state and result.json")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--max-len", type=int, default=30)
    tr.add_argument("--epochs", type=int, default=50, help="cap on epochs")
    tr.add_argument("--stopping-step", type=int, default=5, help="validations without a better MRR@5 before stopping")
    tr.add_argument(
        "--finish", action="store_true", help="train no further: test the best epoch so far (cut short, said so)"
    )
    tr.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    tr.add_argument("--budget-s", type=float, default=540, help="start no epoch that would end after this many seconds")
    args = parser.parse_args(argv)
    if args.command == "export":
        print(json.dumps(export(args.data, args.out, args.max_len)))
    else:
        os.environ.setdefault("PYTHONHASHSEED", str(args.seed))
        train(args)


if __name__ == "__main__":
    main()
