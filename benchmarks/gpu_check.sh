#!/usr/bin/env bash
# The one prepared command for a lent CUDA machine (and a dry run on any other):
#
#   bash benchmarks/gpu_check.sh [run_gpu.py options, e.g. --no-compile --pytest-limit 300]
#
# Installs the wheels carried in .whl/ that the machine lacks, makes vermeer importable, runs
# `pytest benchmarks` (CUDA cases) and benchmarks/gpu_attention_check.py, and leaves the results
# JSON files plus this log (gpu_check.log) in $OUT (else benchmarks/results). Without CUDA it
# says so and runs the CPU benchmarks only. Details: benchmarks/run_gpu.py, benchmarks/README.md.
set -o pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
dest="${OUT:-benchmarks/results}"
mkdir -p "$dest" || exit 2
"${PYTHON:-python3}" benchmarks/run_gpu.py --out "$dest" "$@" 2>&1 | tee "$dest/gpu_check.log"
