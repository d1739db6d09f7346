"""How much a profile task's label can be told from the model's input, without any test user.

For each class task of a data root, a multinomial logistic regression on the bag of the user's T1
items (the whole input Conure's heads see) is cross-validated over the train and valid users
(k folds, repeated), for a range of L2 weights, and compared with the class prior of the training
folds. The test split is never read. Log-loss shows whether there is any signal; accuracy shows
whether it moves an arg-max off the majority class, which is what the accuracy metric scores.

    python docs/results/profile_signal.py --data runs/data/ml100k
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
import torch.nn.functional as F

from conure_dist.data.manifest import Manifest
from conure_dist.data.stream import iter_batches

L2_WEIGHTS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)


def bag_of_items(manifest: Manifest, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and valid instances of ``task``: normalised item counts [N, V] and labels [N]."""
    rows, labels = [], []
    for split in ("train", "valid"):
        for batch in iter_batches(manifest, task, split, 4096, shuffle=False, seed=0, epoch=0):
            rows.append(batch.seq)
            labels.append(batch.target)
    seqs = torch.cat(rows)
    counts = torch.zeros(len(seqs), manifest.num_seq_items).scatter_add_(1, seqs, torch.ones(seqs.shape))
    counts[:, 0] = 0  # padding
    return counts / counts.sum(1, keepdim=True).clamp(min=1), torch.cat(labels)


def fit(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-penalised logistic regression, its bias starting at the log class prior."""
    prior = torch.bincount(y, minlength=classes).float().clamp(min=1) / len(y)
    weight = torch.zeros(x.shape[1], classes, requires_grad=True)
    bias = prior.log().clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, y) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


def cross_validate(
    x: torch.Tensor, y: torch.Tensor, classes: int, folds: int, repeats: int, seed: int = 0
) -> dict[str, dict[str, float]]:
    """Mean held-out log-loss and accuracy of the prior and of each L2 weight."""
    rng = np.random.default_rng(seed)
    scores: dict[str, list[tuple[float, float]]] = {}
    for _ in range(repeats):
        order = rng.permutation(len(y))
        for held in np.array_split(order, folds):
            test = torch.as_tensor(held)
            train = torch.as_tensor(np.setdiff1d(order, held))
            prior = torch.bincount(y[train], minlength=classes).float().clamp(min=1) / len(train)
            logits = {"prior": prior.log().expand(len(test), classes)}
            for l2 in L2_WEIGHTS:
                weight, bias = fit(x[train], y[train], classes, l2)
                logits[f"l2={l2:g}"] = x[test] @ weight + bias
            for name, z in logits.items():
                loss = F.cross_entropy(z, y[test]).item()
                acc = (z.argmax(1) == y[test]).float().mean().item()
                scores.setdefault(name, []).append((loss, acc))
    out = {}
    for name, values in scores.items():
        a = np.asarray(values)
        out[name] = {
            "log_loss": float(a[:, 0].mean()),
            "log_loss_se": float(a[:, 0].std() / np.sqrt(len(a))),
            "accuracy": float(a[:, 1].mean()),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="data root (manifest.json and shards)")
    parser.add_argument("--tasks", nargs="*", help="class tasks (default: every class task)")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    manifest = Manifest.load(args.data)
    tasks = args.tasks or [t.name for t in manifest.tasks if t.kind == "class"]
    results = {}
    for task in tasks:
        x, y = bag_of_items(manifest, task)
        results[task] = cross_validate(x, y, manifest.task(task).num_outputs, args.folds, args.repeats)
        print(f"{task} ({len(y)} train+valid users, {args.repeats}x{args.folds}-fold)")
        for name, r in results[task].items():
            print(f"  {name:10s} log-loss {r['log_loss']:.4f} ± {r['log_loss_se']:.4f}   accuracy {r['accuracy']:.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
