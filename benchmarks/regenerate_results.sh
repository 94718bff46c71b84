#!/usr/bin/env bash
# Regenerates every file under results/ from scratch (no finished run is reused), on this machine,
# at the committed code: each JSON file records its command, commit, versions and machine
# (examples/lm/provenance.py), and each .md page is rendered from its JSON.
#
#   bash benchmarks/regenerate_results.sh            # everything (about 2.5 hours on 2 CPU cores)
#   bash benchmarks/regenerate_results.sh compare    # one part: compare seed1 sweep family similarity finetune memory refresh memory-tpu
#                                                    memory-tpu-per-layer update
#
# On CPU a run is bit-for-bit reproducible for one commit, software stack and machine; another
# processor or core count changes the rounding, and the final losses then differ in the third
# decimal (results/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
# The paths that can change a result: examples/lm/provenance.py's CODE_PATHS.
if [ -n "$(git status --porcelain --untracked-files=no -- fira_jax examples benchmarks pyproject.toml)" ]; then
  echo "regenerate_results.sh: commit or stash your changes first (results name the commit that made them)" >&2
  exit 2
fi
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(compare seed1 sweep family similarity finetune memory refresh)  # memory-tpu*: on request
presets=(60m 130m 350m 1b 7b)

for part in "${parts[@]}"; do
  echo "== $part ($(date -u +%H:%M:%S))"
  case "$part" in
    compare)  # AdamW vs GaLore vs Fira over one lr grid, and Fira's ablations (results/compare.*)
      rm -rf results/runs/fira-* results/runs/galore-* results/runs/adamw-*
      python examples/compare.py --ablations ;;
    seed1)  # each optimizer at its seed-0 best lr, on seed 1 (results/seed1/)
      rm -rf results/seed1
      for opt in fira galore adamw; do
        lr=$(python -c "import json, sys; sys.path.insert(0, 'examples'); import compare; \
print(compare.best_runs(json.load(open('results/compare.json'))['runs'])['$opt']['lr'])")
        python examples/compare.py --seed 1 --optimizers "$opt" --lrs "$lr" --out "results/seed1/$opt"
      done ;;
    sweep)  # Fira vs GaLore at ranks 4 and 64, 3 seeds, vs AdamW (results/rank_sweep.*)
      rm -rf results/runs/rank_sweep
      python examples/compare.py --rank-sweep --ranks 4 64 ;;
    family)  # APOLLO, APOLLO-Mini and Fira's subspace refresh beside the sweep's rows (results/family_sweep.*)
      rm -rf results/runs/family_sweep
      python examples/compare.py --family-sweep --ranks 4 64 ;;
    refresh)  # the refresh's cost at the 7B MLP shape: exact SVD vs randomized, gram, subspace (results/refresh_7b.json)
      python benchmarks/bench_refresh.py --part svd --shapes 4096x11008 --ranks 1024 64 --repeats 1 \
        --json results/refresh_7b.json ;;
    similarity)  # the paper's scaling-factor observation (results/similarity.*)
      python examples/similarity.py ;;
    finetune)  # the fine-tuning demonstration: each method's lr grid on seed 0, then 5 methods x 3 seeds
      rm -rf results/runs/finetune_demo
      demo=(--cache results/runs/finetune_demo --runs results/runs/finetune_demo)
      for lr in 3e-4 1e-3 3e-3 1e-2; do
        python examples/finetune_demo.py "${demo[@]}" --lr "$lr" --seeds 0 --methods full-adamw galore fira
      done
      for lr in 1e-3 3e-3 1e-2; do
        python examples/finetune_demo.py "${demo[@]}" --lr "$lr" --seeds 0 --methods lora lora-fira
      done
      python examples/finetune_demo.py "${demo[@]}" --baseline-seeds 0 1 2 ;;
    memory)  # the compiled step's peak, CPU compiler (results/memory_*.json), and a real run's (60m)
      python examples/memory_report.py --preset "${presets[@]}" --save results/memory_float32.json
      python examples/memory_report.py --preset "${presets[@]}" --dtype bfloat16 --save results/memory_bfloat16.json
      python examples/memory_report.py --preset "${presets[@]}" --refresh-by-shape --save results/memory_float32_by_shape.json
      python examples/memory_report.py --preset 350m 1b 7b --per-layer --save results/memory_float32_per_layer.json
      python examples/memory_report.py --preset 350m 1b 7b --dtype bfloat16 --per-layer --save results/memory_bfloat16_per_layer.json
      python examples/memory_report.py --preset 60m 1b 7b --dtype bfloat16 --optimizer sgd adamw fira apollo apollo-mini \
        --save results/memory_bfloat16_family.json
      python benchmarks/measure_peak_rss.py --preset 60m --json results/memory_rss_60m.json
      python benchmarks/measure_peak_rss.py --preset 350m --json results/memory_rss_350m.json
      python benchmarks/measure_peak_rss.py --preset 350m --per-layer --json results/memory_rss_350m_per_layer.json ;;
    memory-tpu)  # the TPU compiler's peaks and compile times, without a TPU (needs jax[tpu] in this python)
      python examples/memory_report.py --platform tpu-v5e --preset 60m 130m 350m 1b --dtype bfloat16 --svd gram \
        --refresh-by-shape --save results/memory_tpu_v5e_bfloat16.json
      python examples/memory_report.py --platform tpu-v5p --preset 7b --dtype bfloat16 --svd gram \
        --refresh-by-shape --save results/memory_tpu_v5p_bfloat16.json
      python examples/memory_report.py --platform tpu-v5p --preset 7b --dtype bfloat16 --svd gram \
        --refresh-by-shape --grad-clip 1.0 --save results/memory_tpu_v5p_bfloat16_grad_clip.json
      python examples/memory_report.py --platform tpu-v5e --preset 60m --save results/memory_tpu_v5e_exact_60m.json ;;
    memory-tpu-per-layer)  # the same with per-layer updates (lm/step.py's make_layerwise_train_step)
      python examples/memory_report.py --platform tpu-v5e --preset 60m 130m 350m 1b --dtype bfloat16 --svd gram \
        --refresh-by-shape --per-layer --save results/memory_tpu_v5e_bfloat16_per_layer.json
      python examples/memory_report.py --platform tpu-v5p --preset 7b --dtype bfloat16 --svd gram \
        --refresh-by-shape --per-layer --save results/memory_tpu_v5p_bfloat16_per_layer.json
      python benchmarks/compile_time.py --step --platform tpu-v5p --preset 7b --blocks 2 32 --svd gram \
        --refresh-by-shape --optimizer sgd adamw galore fira --json results/compile_time_7b_step.json
      python benchmarks/compile_time.py --step --platform tpu-v5p --preset 7b --blocks 32 --svd gram \
        --optimizer adamw fira --json results/compile_time_7b_step_per_leaf.json ;;
    update)  # the CPU's update times and compile seconds (on an idle machine)
      python benchmarks/bench_update.py --preset 60m --layers 8 --no-torch --only fira_jax.fira fira_jax.galore \
        fira_jax.apollo fira_jax.apollo_mini optax.contrib.galore optax.adamw --json results/bench_update_60m_cpu.json
      python benchmarks/bench_update.py --preset 1b --layers 1 --rounds 1 --repeats 5 --compile-rounds 5 --no-torch \
        --only fira_jax.fira optax.contrib.galore optax.adamw --json results/bench_update_1b_cpu.json ;;
    *)
      echo "regenerate_results.sh: unknown part '$part' (compare seed1 sweep family similarity finetune memory refresh memory-tpu memory-tpu-per-layer update)" >&2
      exit 2 ;;
  esac
done
echo "== done ($(date -u +%H:%M:%S))"
