#!/usr/bin/env bash
# One command for a fresh machine: set up ./.venv, then compress the embedded default model
# (SmolLM2-135M-Instruct): importance -> width pruning -> logit distillation -> HF export, on CPU or GPU.
# Extra arguments are config overrides, e.g. train.train_iters=10. NPROC / CONFIG pick the layout.
set -euo pipefail
cd "$(dirname "$0")"
./scripts/setup.sh
NPROC=${NPROC:-1}
CONFIG=${CONFIG:-configs/smollm2_cpu.yaml}
exec .venv/bin/torchrun --nproc-per-node "$NPROC" launch/compress.py --config "$CONFIG" "$@"
