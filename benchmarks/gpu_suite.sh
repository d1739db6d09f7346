#!/usr/bin/env bash
# Every performance target on one GPU in under 6 minutes (the steps' time limits add up to 355 s):
#   0. wheels: what a bare GPU machine lacks, from benchmarks/wheels/ (build_wheels.sh), offline;
#   1. probe: the fused kernels' self-check (compiled, launched, compared with the torch path);
#   2. kernels: the fused kernels against the chunked softmax and target_ranks, fp32 and bf16;
#   3. targets: T1 and later-task steps as runs train them, evaluation as runs evaluate, peak
#      memory (benchmarks/targets.py; its JSON is rewritten after each section);
#   4. e2e: a short TTL-sized run (646K items, batch 256, 100-item sequences) end to end, its
#      training loop's sequences/s against step 3's;
#   5. stall: how long a T1 checkpoint at TTL's sizes stops training (asynchronous writes);
#   6. table: each target, the measured figure and the step model's prediction for this card.
# Each step has its own time limit and writes OUTDIR/<step>.log (and .json); a failing step does
# not stop the later ones, and the script exits non-zero if any failed. The limits are estimates
# (no GPU has run the suite yet): a step that times out says so in its log, its JSON keeps the
# sections it finished.
#
#   bash benchmarks/build_wheels.sh          # once, on a machine with an index; carry benchmarks/wheels
#   bash benchmarks/gpu_suite.sh OUTDIR
#
# Environment: PYTHON (default python3). SUITE_DEVICE=cpu runs the same steps on CPU at tiny
# sizes (the kernels in Triton's interpreter) in about a minute: a smoke test of the script and
# its table, not figures.
set -uo pipefail
out=$(mkdir -p "${1:?usage: bash benchmarks/gpu_suite.sh OUTDIR}" && cd "$1" && pwd)
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
device=${SUITE_DEVICE:-cuda}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
failed=0
if [ "$device" = cpu ]; then
    preset=smoke users=400 items=2000 steps=3 stall_items=2000 stall_channels=16
    run_args="dist.device=cpu model.channels=16 model.block_dilations=[1,4] train.eval_batch_size=256"
    probe_env="TRITON_INTERPRET=1"  # the probe's and the kernel checks' interpreter setting
else
    preset=ttl users=40000 items=646000 steps=30 stall_items=646000 stall_channels=256
    run_args="dist.device=cuda dist.precision=bf16"
    probe_env="TRITON_INTERPRET=0"
fi

step() {  # step NAME TIMEOUT CMD...: run CMD with a time limit, output to OUTDIR/NAME.log
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    echo "== $name (limit $limit s): $*" | tee -a "$out/$name.log"
    timeout "$limit" "$@" >>"$out/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$out/$name.log"
    [ "$rc" -eq 0 ] || failed=1
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    "$py" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
    git rev-parse HEAD 2>/dev/null || true
} 2>&1 | tee "$out/machine.txt"

if ! "$py" -c "import yaml, webdataset, fsspec, tqdm, braceexpand" 2>/dev/null; then
    step wheels 20 "$py" -m pip install --quiet --no-index --find-links benchmarks/wheels \
        pyyaml webdataset fsspec tqdm braceexpand
fi

step probe 30 env "$probe_env" "$py" -c "
import json, torch
from conure_dist.kernels.self_check import kernel_works
device = torch.device('$device')
found = {k: kernel_works(k, device, torch.bfloat16, 256 if device.type == 'cuda' else 16) for k in ('softmax', 'rank')}
print(json.dumps(found)); json.dump(found, open('$out/probe.json', 'w'))
assert all(found.values()), found"

step kernels 40 env "$probe_env" "$py" benchmarks/kernels.py --device "$device" --only check --json "$out/kernels.json"

step targets 110 "$py" benchmarks/targets.py --device "$device" --preset "$preset" --json "$out/targets.json"

step e2e 120 env NUM_USERS="$users" NUM_ITEMS="$items" STEPS="$steps" \
    RUN_ARGS="$run_args train.sinks=[] train.async_checkpoint=true" bash benchmarks/e2e_ttl.sh "$out/e2e"
cp "$out/e2e/phases.json" "$out/phases.json" 2>/dev/null

step stall 25 "$py" benchmarks/checkpoint_stall.py --device "$device" --items "$stall_items" \
    --channels "$stall_channels" --repeats 2 --compute-steps 2 --json "$out/stall.json"

step table 10 "$py" benchmarks/suite_table.py "$out"
cat "$out/table.log" | grep -v "^==" || true
exit "$failed"
