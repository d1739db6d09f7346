#!/usr/bin/env bash
# Several nodes: run this same line on every node.
#   NNODES=4 NPROC_PER_NODE=8 HEAD=node0.example:29500 RDZV_ID=exp42 \
#     launch/torchrun_multinode.sh CONFIG OUT [key=value ...]
# c10d rendezvous on HEAD (any node's address); elastic restarts resume from the last checkpoint.
set -euo pipefail
config=${1:?config}; out=${2:?output dir or URL}; shift 2
exec torchrun \
    --nnodes "${NNODES:?set NNODES}" --nproc_per_node "${NPROC_PER_NODE:-8}" \
    --rdzv_backend c10d --rdzv_endpoint "${HEAD:?set HEAD=host:port}" --rdzv_id "${RDZV_ID:-conure}" \
    --max-restarts "${MAX_RESTARTS:-3}" \
    -m conure_dist run --config "$config" --out "$out" --resume "$@"
