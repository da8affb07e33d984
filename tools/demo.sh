#!/usr/bin/env bash
# Install (into .venv) and run the demo on the embedded default model, offline after install.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
persllm generate --prompt "Who wrote Hamlet?" --max-new-tokens 64
