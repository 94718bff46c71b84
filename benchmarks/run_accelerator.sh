#!/usr/bin/env bash
# The accelerator run: benchmarks/accelerator.py's parts (update speed, executed train-step memory,
# training throughput, the core tests on the device), each under its own time limit, <= 8 minutes
# on one H200; results in runs/accelerator/ (or $OUT): accelerator.json and accelerator.log.
#
#   python benchmarks/accelerator.py --prepare          # once, here: .accel/ (torch sources, data)
#   bash benchmarks/run_accelerator.sh --commit "$(git rev-parse HEAD)"   # on the accelerator
#   bash benchmarks/run_accelerator.sh --smoke          # every part at tiny sizes on CPU (CI)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
if [[ " $* " == *" --smoke "* ]]; then
  export JAX_PLATFORMS=cpu
fi
exec "${PYTHON:-python3}" benchmarks/accelerator.py "$@"
