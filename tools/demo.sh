#!/usr/bin/env bash
# The main job on the embedded default model (SmolLM2-135M-Instruct), offline after install: persona materials ->
# corpus -> LoRA SFT -> DPO -> exported model (merged HF dir + PEFT adapter) -> eval report, in runs/demo.
# Arguments go to `persllm reproduce` (e.g. --out DIR, --set sft.steps=60). Rerunning skips finished stages.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
start=$SECONDS
persllm reproduce configs/demo.yaml --out runs/demo "$@"
echo "demo: $((SECONDS - start)) s (after install)"
