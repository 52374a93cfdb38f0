#!/usr/bin/env bash
# Create ./.venv with megaslim and its dependencies (idempotent). CPU machines get the CPU torch build
# pinned here; pip is never allowed to swap an installed torch (constraints file).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q -U pip
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q "torch==2.13.0"
fi
CONSTRAINTS=$(mktemp)
python -c "import torch; print('torch==' + torch.__version__)" > "$CONSTRAINTS"
python -m pip install -q -c "$CONSTRAINTS" -e ".[test]"
rm -f "$CONSTRAINTS"
python -c "import megaslim, megatron.core, torch; print('megaslim ready: torch', torch.__version__, '| megatron-core', megatron.core.__version__)"
