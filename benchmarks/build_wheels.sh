#!/usr/bin/env bash
# The wheels a bare GPU machine (torch, Triton and numpy only) lacks to run benchmarks/gpu_suite.sh:
# pure-Python ones (webdataset, braceexpand, fsspec, tqdm, this project) and PyYAML's binary
# wheels for the CPython versions such a machine may run (3.9 to 3.13, x86-64 Linux). They go
# to benchmarks/wheels/ (git-ignored, a few MiB): carry that folder with the tree and the suite
# installs from it with `pip install --no-index --find-links`.
#
#   bash benchmarks/build_wheels.sh [DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-benchmarks/wheels}
py=${PYTHON:-python3}
mkdir -p "$dir"
"$py" -m pip wheel --quiet --no-deps --wheel-dir "$dir" . webdataset braceexpand fsspec tqdm
for version in 3.9 3.10 3.11 3.12 3.13; do
    "$py" -m pip download --quiet --no-deps --only-binary=:all: --dest "$dir" \
        --python-version "$version" --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 "pyyaml>=6"
done
du -sh "$dir"
ls "$dir"
