#!/usr/bin/env bash
# One command for a fresh machine: set up ./.venv, then run the main job on the embedded default model
# (SmolLM2-135M-Instruct), on CPU or GPU. Extra arguments are config overrides, e.g. eval.num_samples=4.
set -euo pipefail
cd "$(dirname "$0")"
./scripts/setup.sh
NPROC=${NPROC:-1}
CONFIG=${CONFIG:-configs/smollm2_cpu.yaml}
.venv/bin/torchrun --nproc-per-node "$NPROC" launch/evaluate.py --config "$CONFIG" "$@"
.venv/bin/torchrun --nproc-per-node "$NPROC" launch/export_hf.py --config "$CONFIG" "$@"
