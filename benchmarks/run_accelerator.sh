#!/usr/bin/env bash
# Runs the benchmarks, plus 200 steps of the 60m example with Fira and AdamW, on whatever
# accelerator JAX sees (GPU or TPU; CPU works too, slowly). Prints everything; writes runs/accel/.
#   bash benchmarks/run_accelerator.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import jax; print(jax.__version__, jax.devices())"
python benchmarks/bench_update.py --preset 60m 130m 350m --layers 1 --repeats 30
python benchmarks/bench_refresh.py --part svd stagger --repeats 3
python benchmarks/long_run.py --steps 5000
for opt in fira adamw; do
  lr=$([ "$opt" = fira ] && echo 0.01 || echo 0.001)
  python examples/train_lm.py --preset 60m --optimizer "$opt" --lr "$lr" --steps 200 --batch-size 64 \
    --seq-len 256 --eval-every 100 --no-progress --out "runs/accel/60m-$opt"
done
