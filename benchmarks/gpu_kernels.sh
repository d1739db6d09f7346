#!/usr/bin/env bash
# The fused Triton kernels on one CUDA GPU, in under 5 minutes, with only torch, Triton and numpy
# installed (none of the package's other dependencies; the repository is put on PYTHONPATH):
#   1. check: the kernels on CUDA against the chunked softmax and target_ranks, in fp32 and in
#      bf16 (odd sizes, accidental hits, repeated negatives, tied scores); fails past the
#      tolerances of tests/test_kernels.py;
#   2. bench: sampled softmax, ranking over 646K items and a whole T1 step (batch 256, seq 50,
#      compiled backbone) at the paper's sizes, chunked vs fused: throughput and peak memory;
#   3. sweep: other tile sizes per kernel, in the time left.
# Each step writes OUTDIR/<step>.json and OUTDIR/<step>.log (a step that times out keeps the
# sections it finished); a failing step does not stop the later ones, and the script exits
# non-zero if any failed.
#
#   bash benchmarks/gpu_kernels.sh OUTDIR        # or OUT=... bash benchmarks/gpu_kernels.sh
#
# Environment: PYTHON (default python3); DEVICE=cpu tries the script on a machine without a GPU
# (tiny sizes, the kernels in Triton's interpreter, the backbone not compiled).
set -uo pipefail
out=$(mkdir -p "${1:-${OUT:?usage: bash benchmarks/gpu_kernels.sh OUTDIR}}" && cd "${1:-$OUT}" && pwd)
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
device=${DEVICE:-cuda}
compile=$([ "$device" = cuda ] && echo --compile)
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
failed=0

step() {  # step NAME TIMEOUT ARGS...: benchmarks/kernels.py --device DEVICE ARGS, to OUTDIR/NAME.{json,log}
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    echo "== $name: benchmarks/kernels.py --device $device $*" | tee -a "$out/$name.log"
    timeout "$limit" "$py" benchmarks/kernels.py --device "$device" "$@" --json "$out/$name.json" >>"$out/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$out/$name.log"
    [ "$rc" -eq 0 ] || failed=1
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$py" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} 2>&1 | tee "$out/gpu.txt"

step check 80 --only check
# shellcheck disable=SC2086
step bench 170 --only softmax ranking t1_step $compile
step sweep 40 --only sweep --steps 3
exit "$failed"
