#!/usr/bin/env bash
# Runs the benchmarks, the memory report, and the 60m recipe (Fira vs AdamW, 300 steps each,
# a BPE tokenizer of 32,000 tokens trained here on the built-in corpus: nothing is downloaded)
# on whatever accelerator JAX sees (GPU or TPU; CPU works too, slowly). Prints tokens/s, MFU and
# peak memory; writes runs/accel/.
#   bash benchmarks/run_accelerator.sh
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p runs/accel
python -c "import jax; print(jax.__version__, jax.devices())"
python benchmarks/bench_update.py --preset 60m 130m 350m --layers 1 --repeats 30
python benchmarks/bench_refresh.py --part svd stagger --repeats 3
python examples/memory_report.py --preset 60m 130m 350m 1b 7b --dtype bfloat16
python - <<'PY'
import pathlib, sysconfig
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
files = sorted(pathlib.Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))[:1500]
tok = Tokenizer(models.BPE(unk_token="<unk>"))
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
trainer = trainers.BpeTrainer(vocab_size=32000, special_tokens=["<unk>", "</s>"],
                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
tok.train_from_iterator((p.read_text(errors="replace") for p in files), trainer)
tok.save("runs/accel/tokenizer.json")
PY
python examples/prepare_data.py --tokenizer runs/accel/tokenizer.json --out runs/accel/stdlib-bpe --no-progress
for opt in fira adamw; do
  lr=$([ "$opt" = fira ] && echo 0.01 || echo 0.001)
  python examples/train_lm.py --recipe paper-60m --data runs/accel/stdlib-bpe --optimizer "$opt" --lr "$lr" \
    --steps 300 --eval-every 100 --no-progress --out "runs/accel/60m-$opt"  # prints tokens/s, MFU, peak memory
done
