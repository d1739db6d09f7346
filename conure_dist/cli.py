"""Command line: ``conure data|run|experiment|scale|eval|predict|compare|audit|export|embed|serve`` (also
``python -m conure_dist``)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys

import fsspec

from conure_dist.errors import UserError

log = logging.getLogger("conure_dist")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _seeds(text: str) -> list[int]:
    """``0-4,10``: seeds 0 to 4 and 10, each once."""
    seeds: list[int] = []
    for part in text.split(","):
        match = re.fullmatch(r"([0-9]+)(?:-([0-9]+))?", part.strip())
        if not match:
            raise argparse.ArgumentTypeError(f"expected seeds such as 0-4,10, got {part!r} in {text!r}")
        first, last = int(match[1]), int(match[2] or match[1])
        if last < first:
            raise argparse.ArgumentTypeError(f"the range {part!r} in {text!r} ends before it starts")
        seeds += range(first, last + 1)
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"{text!r} lists a seed twice")
    return seeds


def _add_data_commands(sub: argparse._SubParsersAction) -> None:
    """``conure data SOURCE``: the flags that are ``data`` config keys come from the schema
    (``config.data_flags``), so they say what a run config says."""
    from conure_dist.config.data_flags import add_data_flags

    data = sub.add_parser("data", help="convert raw data into WebDataset shards + manifest, or describe shards")
    kinds = data.add_subparsers(dest="source", required=True)
    syn = kinds.add_parser("synthetic", help="the embedded synthetic dataset (planted structure)")
    add_data_flags(syn, "synthetic")
    ttl = kinds.add_parser("ttl", help="Tencent TTL files: a pretraining file and task files (source,,targets)")
    ttl.add_argument("--pretrain", required=True, help="T1 file: one user per line, comma-separated item tokens")
    ttl.add_argument(
        "--task",
        action="append",
        default=[],
        metavar="NAME=KIND:PATH",
        help="a later task, in training order: KIND is item or class (repeat the option)",
    )
    add_data_flags(ttl, "ttl")
    ml = kinds.add_parser(
        "movielens",
        help="MovieLens in a public layout: ML-100K (u.data, u.user), ML-1M "
        "(ratings.dat, users.dat), ratings.csv (20M/25M/32M/latest) or RecBole (*.inter, *.user)",
    )
    ml.add_argument("--layout", choices=["ml-100k", "ml-1m", "csv", "recbole"], help="skip detection")
    add_data_flags(ml, "movielens")
    ds = kinds.add_parser(
        "describe",
        help="validate existing shards against their manifest and describe them: "
        "counts, sha256, sizes, a sample instance per task",
    )
    ds.add_argument("root", help="data root (directory or URL such as s3://bucket/prefix) holding manifest.json")
    ds.add_argument("--json", action="store_true", help="print the description as JSON")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="conure", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    # The deepspeed launcher passes --local_rank; the rank is read from the environment instead.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_data_commands(sub)
    run = sub.add_parser("run", help="train every task of a config in order")
    run.add_argument("--config", required=True, help="YAML preset, e.g. configs/quickstart.yaml")
    run.add_argument("--out", required=True, help="run directory or URL: checkpoints, log.jsonl, report.json")
    run.add_argument("--resume", action="store_true", help="continue from the latest valid checkpoint, if any")
    run.add_argument(
        "--force",
        action="store_true",
        help="take over --out although it records a run of another method or with other settings "
        "that change results (resumed: other than its checkpoint's); without it such a run is refused",
    )
    run.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.eval_batch_size=256")
    cf = sub.add_parser(
        "config",
        help="every config key with its type, default and meaning (with --config: "
        "that preset's values, after overrides)",
    )
    cf.add_argument("--config", help="a YAML preset whose resolved values to show instead of the defaults")
    cf.add_argument("--json", action="store_true", help="print the keys as JSON")
    cf.add_argument("overrides", nargs="*", help="key=value overrides, as for run")
    ex = sub.add_parser("experiment", help="methods x seeds (x variants): comparison table, JSON and plots")
    ex.add_argument("--config", required=True, help="experiment YAML, e.g. configs/experiments/ml100k_table2.yaml")
    ex.add_argument("--out", required=True, help="directory or URL: runs/, results.json, table.md, plots/")
    ex.add_argument(
        "--jobs",
        type=_positive,
        default=1,
        help="runs side by side, each a process of its own (default 1); give the runs "
        "train.num_threads so that jobs x threads fits the cores",
    )
    ex.add_argument(
        "--seeds", type=_seeds, help="seeds instead of the file's, e.g. 0-14 (reports already under --out are reused)"
    )
    ex.add_argument(
        "--no-share-first-task",
        dest="share_first_task",
        action="store_false",
        help="every run trains T1 itself (default: runs that would train it identically "
        "share one copy through OUT/first_task; their results are the same either way)",
    )
    ex.add_argument(
        "overrides",
        nargs="*",
        help="key=value overrides applied to every run's config after the "
        "file's, as for run (reports under --out made with other settings are refused)",
    )
    _add_scale_command(sub)
    ev = sub.add_parser("eval", help="evaluate every finished task of a checkpoint")
    ev.add_argument("--ckpt", required=True, help="run directory, its checkpoints folder, or one checkpoint folder")
    ev.add_argument(
        "--split", default="test", choices=["train", "valid", "test"], help="split to score (default: test)"
    )
    ev.add_argument("--data-root", help="shards to evaluate on (default: the run's data.root)")
    ev.add_argument("--json", action="store_true", help="print JSON instead of a table")
    pr = sub.add_parser(
        "predict",
        help="top-k items or the class of a task for given sequences (for the "
        "sequence task: the items that follow the whole sequence)",
    )
    pr.add_argument("--ckpt", required=True, help="run directory, its checkpoints folder, or one checkpoint folder")
    pr.add_argument("--task", required=True, help="a finished task of the checkpoint, e.g. t1, click, gender")
    pr.add_argument(
        "--input", help='JSONL file of {"seq": [T1 item ids]}, oldest first (default: the task\'s test split)'
    )
    pr.add_argument(
        "--raw-ids",
        action="store_true",
        help="--input holds the source's raw item ids (e.g. MovieLens movie ids), not T1 ids",
    )
    pr.add_argument("--data-root", help="shards for the default input (default: the run's data.root)")
    pr.add_argument(
        "--k", type=_positive, default=5, help="items listed per sequence, for item and sequence tasks (default: 5)"
    )
    pr.add_argument(
        "--limit", type=_positive, default=10, help="sequences taken from the test split without --input (default: 10)"
    )
    cm = sub.add_parser("compare", help="two runs side by side, epoch by epoch: same data? how far apart?")
    cm.add_argument("runs", nargs=2, metavar="RUN", help="run directories (--out of conure run)")
    cm.add_argument("--json", action="store_true", help="print the rows as JSON")
    au = sub.add_parser("audit", help="verify that no finished task's frozen weights changed")
    au.add_argument("--ckpt", required=True, help="run directory, its checkpoints folder, or one checkpoint folder")
    au.add_argument("--json", action="store_true", help="print the checksums per task as JSON")
    _add_use_commands(sub)
    return parser


def _world_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected world sizes such as 1,2,4, got {text!r}") from None
    if not sizes or min(sizes) < 1 or sorted(set(sizes)) != sizes:
        raise argparse.ArgumentTypeError(f"world sizes must be increasing and >= 1, got {text!r}")
    return sizes


def _add_scale_command(sub: argparse._SubParsersAction) -> None:
    sc = sub.add_parser(
        "scale",
        help="one config at several world sizes (torchrun, srun or sbatch): throughput, step time split, "
        "exchanged bytes, memory, MFU and final metrics per phase; table.md, results.json, plots/",
    )
    sc.add_argument("--config", required=True, help="YAML preset, e.g. configs/quickstart.yaml")
    sc.add_argument("--world-sizes", required=True, type=_world_sizes, help="increasing sizes, e.g. 1,2,4,8")
    sc.add_argument("--out", required=True, help="local directory: runs/, results.json, table.md, plots/")
    sc.add_argument(
        "--mode",
        choices=["strong", "weak"],
        default="strong",
        help="strong: the config's global batches at every size; weak: the smallest size's per-rank batch, "
        "global batch and learning rate scaled (x W/W0, x sqrt(W/W0)) (default: strong)",
    )
    sc.add_argument("--seeds", type=_seeds, default=[0], help="seeds per size, e.g. 0-2 (default: 0)")
    sc.add_argument("--no-eval", dest="evaluate", action="store_false", help="no validation after epochs")
    sc.add_argument(
        "--launcher",
        choices=["local", "srun"],
        default="local",
        help="local: torchrun on this node; srun: torchrun on each node of the current Slurm allocation",
    )
    sc.add_argument("--gpus-per-node", type=_positive, default=8, help="ranks per node under srun/sbatch (default 8)")
    sc.add_argument(
        "--warmup-steps", type=int, default=5, help="steps of each phase left out of the timings (default 5)"
    )
    sc.add_argument("--emit-sbatch", action="store_true", help="write OUT/sbatch/ws*-seed*.sbatch and stop")
    sc.add_argument("--collect", action="store_true", help="launch nothing: summarize the runs already under OUT/runs")
    sc.add_argument("overrides", nargs="*", help="key=value overrides applied to every run, as for run")


def _add_use_commands(sub: argparse._SubParsersAction) -> None:
    """What serves the learned representations outside training: export, embed, serve."""
    ckpt_help = "run directory, its checkpoints folder, or one checkpoint folder"
    ex = sub.add_parser(
        "export",
        help="one finished task as a self-contained inference artifact "
        "(safetensors weights, a loader, a torch.export program)",
    )
    ex.add_argument("--ckpt", required=True, help=ckpt_help)
    ex.add_argument("--task", required=True, help="a finished task of the checkpoint")
    ex.add_argument("--out", required=True, help="directory to write the artifact to")
    em = sub.add_parser("embed", help="every user's representation vector under a task's view, as NumPy shards")
    em.add_argument("--ckpt", required=True, help=ckpt_help)
    em.add_argument("--task", required=True, help="a finished task of the checkpoint")
    em.add_argument("--out", required=True, help="directory or URL to write the shards to")
    em.add_argument("--data-root", help="shards whose users to embed (default: the run's data.root)")
    em.add_argument("--batch-size", type=_positive, default=1024, help="users per forward pass (default: 1024)")
    em.add_argument(
        "--users-per-shard", type=_positive, default=100_000, help="users per output shard (default: 100000)"
    )
    sv = sub.add_parser("serve", help="an HTTP endpoint answering every finished task for posted item sequences")
    sv.add_argument("--ckpt", required=True, help=ckpt_help)
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    sv.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    sv.add_argument(
        "--max-batch",
        type=_positive,
        default=64,
        help="requests answered together in one forward pass, at most (default: 64)",
    )
    sv.add_argument(
        "--max-wait-ms",
        type=float,
        default=5.0,
        help="how long a request may wait for others to batch with (default: 5)",
    )
    sv.add_argument(
        "--max-body-bytes",
        type=_positive,
        default=1 << 20,
        help="larger request bodies get HTTP 413 without being read (default: 1048576)",
    )


def cmd_data(args: argparse.Namespace) -> int:
    if args.source == "describe":
        from data_tools.describe import describe_command

        return describe_command(args.root, as_json=args.json)
    from conure_dist.config.data_flags import data_config
    from data_tools.prepare import log_summary, write_shards

    data = data_config(args.source, args)
    manifest = write_shards(
        args.source,
        data,
        layout=getattr(args, "layout", None),
        pretrain=getattr(args, "pretrain", None),
        task_files=getattr(args, "task", []),
    )
    log_summary(manifest)
    print(f"wrote {len(manifest.tasks)} tasks to {data.root}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from conure_dist.config import load_config
    from conure_dist.dist import process_group
    from conure_dist.methods.run import run_method
    from conure_dist.object_store import check_output
    from conure_dist.report import format_table
    from conure_dist.train.preemption import STOP
    from data_tools.prepare import build_missing_shards

    cfg = load_config(args.config, args.overrides)
    check_output(args.out)
    fs, out = fsspec.core.url_to_fs(args.out)
    if fs.exists(out) and not fs.isdir(out):
        raise UserError(f"--out {args.out} is a file; the run needs a directory")
    # SIGTERM, SIGUSR1 and SIGINT stop the run at its next checkpoint (``train.preemption``).
    with STOP.installed(), process_group(cfg.dist) as dist:
        build_missing_shards(cfg.data, dist)
        report = run_method(cfg, args.out, dist, resume=args.resume, force=args.force)
    if dist.is_main:
        print(format_table(report))
        print(f"report: {args.out.rstrip('/')}/report.json")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from conure_dist.config import load_config
    from conure_dist.config.describe import describe, format_keys, value_at

    if args.overrides and not args.config:
        raise UserError("key=value overrides apply to a preset: add --config")
    values = load_config(args.config, args.overrides).to_dict() if args.config else None
    keys = describe()
    if args.json:
        print(
            json.dumps(
                [{**k.__dict__, **({} if values is None else {"value": value_at(values, k.key)})} for k in keys],
                indent=1,
                default=str,
            )
        )
    else:
        print(format_keys(keys, values))
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    from conure_dist.config import DistConfig
    from conure_dist.dist import process_group
    from conure_dist.experiment.harness import run_experiment
    from conure_dist.experiment.report import format_markdown
    from conure_dist.experiment.spec import load_experiment
    from data_tools.prepare import build_missing_shards

    experiment = load_experiment(args.config, args.overrides)
    if args.seeds:
        experiment.seeds = args.seeds
    with process_group(DistConfig()) as dist:
        summary = run_experiment(
            experiment,
            args.out,
            dist,
            jobs=args.jobs,
            share_first_task=args.share_first_task,
            prepare=build_missing_shards,
        )
    if dist.is_main:
        print(format_markdown(summary))
        print(f"results: {args.out.rstrip('/')}/table.md, results.json, plots/")
    return 0


def cmd_scale(args: argparse.Namespace) -> int:
    from conure_dist.config import load_config
    from conure_dist.scaling.job import ScaleSpec, emit_sbatch, run_scale
    from conure_dist.scaling.summary import format_markdown

    spec = ScaleSpec(
        args.config,
        args.world_sizes,
        args.out,
        args.mode,
        args.seeds,
        args.overrides,
        args.evaluate,
        "srun" if args.emit_sbatch else args.launcher,
        args.gpus_per_node,
        args.warmup_steps,
    )
    if args.emit_sbatch:
        for path in emit_sbatch(spec, load_config(args.config, args.overrides)):
            print(path)
        return 0
    summary = run_scale(spec, collect_only=args.collect)
    print(format_markdown(summary))
    print(f"results: {args.out.rstrip('/')}/table.md, results.json, plots/")
    return 1 if summary["failed"] else 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate every finished task; under torchrun the split is sharded over ranks."""
    from conure_dist.config import DistConfig
    from conure_dist.dist import process_group
    from conure_dist.serving.inference import evaluate_finished, load_trained, manifest_for

    run = load_trained(args.ckpt)
    manifest = manifest_for(run.ckpt, args.data_root)
    with process_group(DistConfig()) as dist:
        results = evaluate_finished(run, manifest, args.split, dist)
    if not dist.is_main:
        return 0
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        for name, metrics in results.items():
            shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "count")
            print(f"{name:14s} {shown}  (n={metrics['count']})")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from conure_dist.serving.inference import load_trained, predict

    records = predict(
        load_trained(args.ckpt),
        args.task,
        data_root=args.data_root,
        input_path=args.input,
        raw_ids=args.raw_ids,
        k=args.k,
        limit=args.limit,
    )
    for record in records:
        print(json.dumps(record))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from conure_dist.experiment.compare import compare_runs, data_note, format_comparison

    rows = compare_runs(*args.runs)
    if not rows:
        raise UserError(f"{args.runs[0]} and {args.runs[1]} have no epoch in common")
    print(json.dumps(rows, indent=1) if args.json else format_comparison(rows))
    note = data_note(*args.runs, rows)
    if note:
        print(f"\nnote: {note}", file=sys.stderr if args.json else sys.stdout)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from conure_dist.serving.export import export_task

    summary = export_task(args.ckpt, args.task, args.out)
    print(json.dumps(summary, indent=1))
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    from conure_dist.config import DistConfig
    from conure_dist.dist import process_group
    from conure_dist.serving.embed import embed_users

    with process_group(DistConfig()) as dist:
        summary = embed_users(
            args.ckpt,
            args.task,
            args.out,
            dist,
            data_root=args.data_root,
            batch_size=args.batch_size,
            users_per_shard=args.users_per_shard,
        )
    if dist.is_main:
        print(json.dumps(summary, indent=1))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from conure_dist.serving.serve import serve

    serve(
        args.ckpt,
        host=args.host,
        port=args.port,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_body_bytes=args.max_body_bytes,
    )
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from conure_dist.checkpoint.format import load_checkpoint, resolve_checkpoint
    from conure_dist.continual.audit import audit_checkpoint, recorded_elsewhere

    ckpt = load_checkpoint(resolve_checkpoint(args.ckpt))
    results = audit_checkpoint(ckpt)
    num_tasks = len(ckpt.meta["tasks"])
    # Tasks another record of the run (the report, a kept checkpoint) saw finish but this
    # checkpoint does not hold: its newer checkpoints are gone or uncommitted.
    audited = {r.task for r in results}
    missing = sorted({t for record in recorded_elsewhere(ckpt).values() for t in record} - audited)
    ok = all(r.ok for r in results) and bool(results) and not missing
    if args.json:
        print(
            json.dumps(
                {
                    "checkpoint": ckpt.url,
                    "ok": ok,
                    "checked": len(results),
                    "num_tasks": num_tasks,
                    "finished_elsewhere": missing,
                    "tasks": {r.task: {"stored": r.stored, "recomputed": r.recomputed, "ok": r.ok} for r in results},
                },
                indent=1,
            )
        )
    else:
        for r in results:
            print(f"{r.task:14s} {'ok' if r.ok else 'CHANGED'}  {r.recomputed[:16]}")
        if missing:
            print(
                f"finished according to the run's other records, absent from this checkpoint: {', '.join(missing)} "
                "(its newer checkpoints are missing or uncommitted)"
            )
        print(f"audit {'passed' if ok else 'FAILED'}: {len(results)} of {num_tasks} tasks checked, {ckpt.url}")
    return 0 if ok else 1


COMMANDS = {
    "data": cmd_data,
    "run": cmd_run,
    "config": cmd_config,
    "experiment": cmd_experiment,
    "scale": cmd_scale,
    "eval": cmd_eval,
    "predict": cmd_predict,
    "compare": cmd_compare,
    "audit": cmd_audit,
    "export": cmd_export,
    "embed": cmd_embed,
    "serve": cmd_serve,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from conure_dist.checkpoint.format import CheckpointError
    from conure_dist.experiment.jobs import RunsFailed
    from conure_dist.train.preemption import EXIT_INTERRUPTED, Preempted
    from conure_dist.train.state import CapacityError, DivergedError

    try:
        code = COMMANDS[args.command](args)
    except Preempted as exc:  # a scheduler's notice or Ctrl-C: the run stopped cleanly
        print(f"conure: {exc}", file=sys.stderr)
        code = exc.exit_code
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside a run
        print("conure: interrupted", file=sys.stderr)
        code = EXIT_INTERRUPTED
    # A user's mistake (UserError: config, paths, data files, checkpoints that do not fit) gets
    # its one-line message; anything else is a bug and keeps its traceback.
    except (UserError, FileNotFoundError, CheckpointError, CapacityError, DivergedError, RunsFailed) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # A worker of a multi-process run has written and committed everything and left the
        # process group. Interpreter teardown can still abort it now and then ("terminate
        # called without an active exception" while c10d/gloo objects are destroyed), which
        # torchrun would report as a failed run: leave without that teardown.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
