#!/usr/bin/env bash
# One node, N processes (GPUs, or CPU processes with gloo).
#   launch/torchrun_single.sh NPROC CONFIG OUT [key=value ...]
# --max-restarts with --resume: a crashed worker restarts the group from the last checkpoint.
set -euo pipefail
nproc=${1:?number of processes}; config=${2:?config}; out=${3:?output dir or URL}; shift 3
exec torchrun --standalone --nproc_per_node "$nproc" --max-restarts "${MAX_RESTARTS:-3}" \
    -m conure_dist run --config "$config" --out "$out" --resume "$@"
