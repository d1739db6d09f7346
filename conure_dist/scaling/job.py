"""``conure scale``: one config at several world sizes, timed, and side by side.

Each (world size, seed) is a real ``conure run`` with ``train.step_timing`` on: launched here
through ``torchrun`` on this node, or through ``srun`` inside the current Slurm allocation, or
written as one sbatch script per size (``--emit-sbatch``) whose runs ``--collect`` reads back.

* ``strong`` scaling keeps the config's global batches: each rank takes 1/W of them (a size whose
  batches do not split is recorded as failed, with the setting to change).
* ``weak`` scaling keeps the per-rank batch of the smallest size W0: ``tasks.*.batch_size`` becomes
  ``batch_size / W0 * W`` and the learning rate follows the square-root rule for Adam,
  ``lr * sqrt(W / W0)`` (the update's noise scale stays that of the smaller batch).

A failed size is recorded with its error and the others still run. A size whose run finished
under ``OUT`` earlier is not run again, if it ran the same settings (else it is refused). Results go to
``OUT/results.json``, ``OUT/table.md`` and ``OUT/plots/``; every run's output stays in
``OUT/runs/wsW-seedS`` and its console in ``OUT/runs/wsW-seedS.log``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conure_dist.config import RunConfig, changes_since, load_config
from conure_dist.errors import UserError

log = logging.getLogger(__name__)

TIMING = ["train.step_timing=true", "train.progress=false", "train.sinks=[]"]


@dataclass
class ScaleSpec:
    """What ``conure scale`` runs."""

    config: str
    world_sizes: list[int]
    out: str
    mode: str = "strong"
    seeds: list[int] = field(default_factory=lambda: [0])
    overrides: list[str] = field(default_factory=list)
    evaluate: bool = True
    """False: no validation after epochs (``train.validation=false``; test metrics still computed)."""
    launcher: str = "local"
    """``local`` (torchrun on this node) or ``srun`` (inside the current Slurm allocation)."""
    gpus_per_node: int = 8
    warmup_steps: int = 5

    def run_dir(self, world: int, seed: int) -> Path:
        return Path(self.out) / "runs" / f"ws{world}-seed{seed}"


def scaled_overrides(cfg: RunConfig, world: int, base: int, mode: str) -> list[str]:
    """The batch and learning-rate overrides of one size: none for strong scaling; for weak
    scaling the per-rank batch of ``base`` ranks times ``world``, and lr x sqrt(world / base)."""
    if mode == "strong":
        return []
    out = []
    for i, task in enumerate(cfg.tasks):
        if task.batch_size % base:
            raise UserError(
                f"--mode weak: tasks.{i}.batch_size={task.batch_size} does not split over the smallest "
                f"world size {base}; give a multiple of {base}"
            )
        out.append(f"tasks.{i}.batch_size={task.batch_size // base * world}")
        out.append(f"tasks.{i}.lr={task.lr * math.sqrt(world / base)!r}")
    return out


def run_overrides(spec: ScaleSpec, cfg: RunConfig, world: int, seed: int) -> list[str]:
    extra = [f"seed={seed}", f"train.timing_warmup_steps={spec.warmup_steps}", *TIMING]
    if not spec.evaluate:
        extra.append("train.validation=false")
    return [*spec.overrides, *extra, *scaled_overrides(cfg, world, min(spec.world_sizes), spec.mode)]


def torchrun_args(world: int, nodes: int, per_node: int, rdzv: str | None) -> list[str]:
    if nodes == 1:
        return ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world)]
    return [
        "-m",
        "torch.distributed.run",
        "--nnodes",
        str(nodes),
        "--nproc_per_node",
        str(per_node),
        "--rdzv_backend",
        "c10d",
        "--rdzv_endpoint",
        rdzv or "$HEAD_ADDR:29500",
        "--rdzv_id",
        f"scale-ws{world}",
    ]


def layout(spec: ScaleSpec, world: int) -> tuple[int, int]:
    """(nodes, ranks per node) of a size: one node locally; ``gpus_per_node`` a node under Slurm."""
    if spec.launcher == "local":
        return 1, world
    per_node = min(world, spec.gpus_per_node)
    if world % per_node:
        raise UserError(f"world size {world} is not a whole number of {per_node}-GPU nodes (--gpus-per-node)")
    return world // per_node, per_node


def launch_command(spec: ScaleSpec, cfg: RunConfig, world: int, seed: int, rdzv: str | None = None) -> list[str]:
    """The command of one run: ``python -m conure_dist run`` for one local process, else under
    torchrun (behind ``srun``, one task per node, for the Slurm launcher)."""
    nodes, per_node = layout(spec, world)
    run = ["-m", "conure_dist", "run", "--config", spec.config, "--out", str(spec.run_dir(world, seed))]
    run += run_overrides(spec, cfg, world, seed)
    if world == 1 and spec.launcher == "local":
        return [sys.executable, *run]
    cmd = [sys.executable, *torchrun_args(world, nodes, per_node, rdzv), *run]
    if spec.launcher == "srun":
        cmd = ["srun", f"--nodes={nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1", *cmd]
    return cmd


def slurm_head() -> str:
    """The first node of the current allocation, where the rendezvous listens."""
    nodelist = os.environ.get("SLURM_JOB_NODELIST")
    if not nodelist:
        raise UserError("--launcher srun runs inside a Slurm allocation (salloc/sbatch): SLURM_JOB_NODELIST is unset")
    hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return hosts.stdout.split()[0] + ":29500"


def run_size(spec: ScaleSpec, cfg: RunConfig, world: int, seed: int, rdzv: str | None) -> dict[str, Any]:
    """Launch one run (unless its report is already there) and return its figures or its error."""
    out = spec.run_dir(world, seed)
    entry: dict[str, Any] = {"world_size": world, "seed": seed, "run": str(out)}
    earlier = finished_run(spec, cfg, world, seed)
    if earlier is not None:
        return {**entry, **earlier}
    if out.exists():  # an unfinished earlier attempt: start again
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        cmd = launch_command(spec, cfg, world, seed, rdzv)
    except UserError as exc:
        return {**entry, "error": str(exc)}
    entry["command"] = shlex.join(cmd)
    log.info("world size %d, seed %d: %s", world, seed, entry["command"])
    console = out.parent / f"{out.name}.log"
    with open(console, "w") as f:
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=run_env()).returncode
    if code != 0:
        return {**entry, "error": failure_line(console, code)}
    return {**entry, **read_run(out)}


def finished_run(spec: ScaleSpec, cfg: RunConfig, world: int, seed: int) -> dict[str, Any] | None:
    """The figures of the run of this size already under ``OUT/runs`` (``read_run``), None if it
    has not finished. It is reused only if it ran exactly the config this size would run now:
    any other setting (``dist.*`` and the step timing included, since they change the figures)
    is refused, naming the run and the keys."""
    out = spec.run_dir(world, seed)
    if not (out / "report.json").exists():
        return None
    report = json.loads((out / "report.json").read_text())
    if "config" not in report:
        raise UserError(f"{out}/report.json records no config, so it cannot be reused: delete {out} to run it again")
    now = load_config(spec.config, run_overrides(spec, cfg, world, seed)).to_dict()
    changes, _ = changes_since(report["config"], now)
    if changes:
        differ = ", ".join(f"{k}={value} (the run: {saved})" for k, (saved, value) in changes.items())
        raise UserError(
            f"{out} holds a finished run with other settings: {differ}; delete it to run it again, "
            "or give another --out"
        )
    return read_run(out, report)


def run_env() -> dict[str, str]:
    """The runs import this checkout and print as they go."""
    root = str(Path(__file__).resolve().parents[2])
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": root if not path else f"{root}{os.pathsep}{path}"}


def failure_line(console: Path, code: int) -> str:
    """The error a failed run printed (``error: ...`` or an exception's last line), and its code."""
    lines = [ln.strip() for ln in console.read_text(errors="replace").splitlines() if ln.strip()]
    picked = next((ln for ln in reversed(lines) if ln.startswith("error:")), None)
    if picked is None:
        picked = next((ln for ln in reversed(lines) if "Error" in ln and not ln.startswith("File")), "")
    return f"exit code {code}: {picked}".strip()


def read_run(out: Path, report: dict[str, Any] | None = None) -> dict[str, Any]:
    """A finished run's phase timings (rank 0's ``phase_timing`` events) and final test metrics
    (from its ``report``, read from ``out`` unless given)."""
    if report is None:
        report = json.loads((out / "report.json").read_text())
    phases = {}
    for line in (out / "log.jsonl").read_text().splitlines():
        event = json.loads(line)
        if event.get("event") == "phase_timing":
            phases[f"{event['task']}/{event['phase']}"] = {
                k: v for k, v in event.items() if k not in ("event", "time", "task", "phase")
            }
    metrics = {t["name"]: t["primary_metric"] for t in report["tasks"]}
    final = {name: report["test_metrics"].get(name, {}).get(metric) for name, metric in metrics.items()}
    return {"phases": phases, "final_metrics": final, "metric_names": metrics, "wall_seconds": report["wall_seconds"]}


def emit_sbatch(spec: ScaleSpec, cfg: RunConfig) -> list[Path]:
    """One sbatch script per (size, seed) under ``OUT/sbatch``; their runs land where ``--collect``
    reads them."""
    folder = Path(spec.out) / "sbatch"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for world in spec.world_sizes:
        nodes, per_node = layout(spec, world)
        for seed in spec.seeds:
            cmd = launch_command(spec, cfg, world, seed, rdzv="$HEAD_ADDR:29500")
            path = folder / f"ws{world}-seed{seed}.sbatch"
            path.write_text(
                "#!/usr/bin/env bash\n"
                f"#SBATCH --job-name=conure-scale-ws{world}\n"
                f"#SBATCH --nodes={nodes}\n#SBATCH --ntasks-per-node=1\n#SBATCH --gpus-per-node={per_node}\n"
                "#SBATCH --output=%x-%j.out\nset -euo pipefail\n"
                'HEAD_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)\n'
                + " ".join(a if a.startswith("$") or "$HEAD" in a else shlex.quote(a) for a in cmd)
                + "\n"
            )
            paths.append(path)
    return paths


def run_scale(spec: ScaleSpec, collect_only: bool = False) -> dict[str, Any]:
    """Every (size, seed) in order, then the summary (``scaling.summary``), written under ``out``."""
    from conure_dist.provenance import environment
    from conure_dist.scaling.summary import summarize, write_outputs

    if sorted(set(spec.world_sizes)) != spec.world_sizes or spec.world_sizes[0] < 1:
        raise UserError(f"--world-sizes must be increasing and >= 1, got {spec.world_sizes}")
    cfg = load_config(spec.config, spec.overrides)
    rdzv = slurm_head() if spec.launcher == "srun" and not collect_only else None
    runs = []
    for world in spec.world_sizes:
        for seed in spec.seeds:
            if collect_only:
                entry = {"world_size": world, "seed": seed, "run": str(spec.run_dir(world, seed))}
                found = finished_run(spec, cfg, world, seed)
                runs.append({**entry, **found} if found is not None else {**entry, "error": "no report.json"})
            else:
                runs.append(run_size(spec, cfg, world, seed, rdzv))
            if "error" in runs[-1]:
                log.error("world size %d, seed %d failed: %s", world, seed, runs[-1]["error"])
    summary = summarize(spec, cfg, runs, environment("cpu"))
    write_outputs(summary, spec.out)
    return summary
