#!/usr/bin/env bash
# CUDA checks on one GPU, in a few minutes:
#   1. throughput and memory at the paper's TTL sizes in bf16 (benchmarks/run.py --device cuda);
#   2. the quick start end to end on the GPU in bf16 with the DDP engine, then audited;
#   3. the same with DeepSpeed ZeRO-1 on one process (a one-rank NCCL group), then audited;
#   4. whether the two runs froze bit-identical weights (their audit checksums).
# Each step's output goes to OUTDIR (at most 8 files); a failing step does not stop the later
# ones, and the script exits non-zero if any failed.
#
#   bash benchmarks/cuda_check.sh OUTDIR
#
# Environment: PYTHON (default python3); SKIP_BENCH=1 skips step 1; QUICK_ARGS adds overrides to
# both quick starts (e.g. "dist.compile=never"); DEVICE=cpu with BENCH_ARGS="--items 5000 --skip
# memory comm" tries the script on a machine without a GPU.
set -uo pipefail
out=$(mkdir -p "${1:?usage: bash benchmarks/cuda_check.sh OUTDIR}" && cd "$1" && pwd)
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
device=${DEVICE:-cuda}
runs=$(mktemp -d)
trap 'rm -rf "$runs"' EXIT
export PYTHONUNBUFFERED=1
failed=0

step() {  # step LOG TIMEOUT CMD...: run CMD, append its output to OUTDIR/LOG.log, record failure
    local log=$out/$1.log limit=$2
    shift 2
    echo "== $*" | tee -a "$log"
    local start=$SECONDS
    timeout "$limit" "$@" >>"$log" 2>&1
    local rc=$?
    echo "== exit $rc after $((SECONDS - start)) s" | tee -a "$log"
    [ "$rc" -eq 0 ] || failed=1
    return "$rc"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
"$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/gpu.txt"

if [ -z "${SKIP_BENCH:-}" ]; then
    # shellcheck disable=SC2086
    step bench 300 "$py" benchmarks/run.py --device "$device" --skip comm ${BENCH_ARGS:-} --json "$out/$device.json"
fi

quick() {  # quick NAME OVERRIDES...: the quick start in bf16 on $device, then its audit
    local name=$1
    shift
    # shellcheck disable=SC2086
    step "quickstart_$name" 300 "$py" -m conure_dist run --config configs/quickstart.yaml --out "$runs/$name" \
        train.progress=false data.root="$runs/data" dist.device="$device" dist.precision=bf16 "$@" ${QUICK_ARGS:-} \
        || return
    cp "$runs/$name/report.json" "$out/quickstart_$name.json" || { failed=1; return; }
    step audit 120 "$py" -m conure_dist audit --ckpt "$runs/$name"
}
quick ddp
quick deepspeed dist.engine=deepspeed dist.zero_stage=1

checksums() {  # the stored per-task checksums of a run's last checkpoint
    "$py" -m conure_dist audit --ckpt "$runs/$1" --json |
        "$py" -c "import json, sys; print({k: v['stored'] for k, v in json.load(sys.stdin)['tasks'].items()})"
}
if ddp=$(checksums ddp) && ds=$(checksums deepspeed); then
    if [ "$ddp" = "$ds" ]; then same="identical"; else same="different"; fi
    echo "ddp and deepspeed runs froze $same weights" | tee -a "$out/audit.log"
fi
exit "$failed"
