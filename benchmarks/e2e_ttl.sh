#!/usr/bin/env bash
# A TTL-sized run end to end on one GPU, against the benchmark's figures:
#   1. TTL-sized synthetic shards (646K T1 items, NUM_USERS users with 100-item sequences);
#   2. a capped multi-task run with the paper's TTL model (configs/ttl.yaml): t1, click, age,
#      STEPS optimizer steps per epoch, one train and one retrain epoch each;
#   3. effective sequences/s per phase (training loop, and phase end to end with validation and
#      checkpoints) next to benchmarks/run.py's fast-path figures (BENCH, if given).
#
#   bash benchmarks/e2e_ttl.sh OUTDIR
#
# Environment: PYTHON (default python3); NUM_USERS (default 400000); NUM_ITEMS (default 646K);
# STEPS (default 300);
# BENCH (a benchmarks/run.py JSON, e.g. benchmarks/results/h100.json); RUN_ARGS adds overrides
# (e.g. "dist.device=cpu model.channels=64" to try it without a GPU).
set -euo pipefail
out=$(mkdir -p "${1:?usage: bash benchmarks/e2e_ttl.sh OUTDIR}" && cd "$1" && pwd)
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

if [ ! -f "$out/data/manifest.json" ]; then
    "$py" -m data_tools.synthetic_ttl --out "$out/data" --num-users "${NUM_USERS:-400000}" ${NUM_ITEMS:+--num-items "$NUM_ITEMS"} \
        | tee "$out/data.txt"
fi
# shellcheck disable=SC2086
"$py" -m conure_dist run --config configs/ttl.yaml --out "$out/run" --resume \
    data.root="$out/data" train.progress=false train.max_steps_per_epoch="${STEPS:-300}" \
    tasks="[{name: t1, prune_ratio: 0.7, epochs: 1, retrain_epochs: 1, lr: 1.0e-3, batch_size: 256, l2: 0.02},
            {name: click, prune_ratio: 0.8, epochs: 1, retrain_epochs: 1, lr: 1.0e-4, batch_size: 4096, l2: 0.02},
            {name: age, prune_ratio: 0.8, epochs: 1, retrain_epochs: 1, lr: 1.0e-4, batch_size: 4096, l2: 0.02}]" \
    ${RUN_ARGS:-} | tee "$out/run.txt"
"$py" benchmarks/phase_throughput.py "$out/run" ${BENCH:+--bench "$BENCH"} --json "$out/phases.json"
