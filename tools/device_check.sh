#!/usr/bin/env bash
# Accelerator check, one script for a lent GPU (or TPU VM): parity of the trainer on the chip vs the CPU, the
# model-parity tests against transformers when PyTorch is there, then SFT and DPO step timings of a ~1B
# Llama-shaped model in bf16 (tokens/s, MFU against the chip's measured bf16 matmul peak).
#   bash tools/device_check.sh                 # on the accelerator host; results also in $OUT or ./device_check.json
#   bash tools/device_check.sh --cpu-smoke     # dry run on the CPU with tiny shapes
# Extra arguments go to tools/device_check.py (e.g. --shape llama-3b --batch 4 --remat).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
out_dir="${OUT:-.}"
smoke=0
for a in "$@"; do [ "$a" = "--cpu-smoke" ] && smoke=1; done

echo "== environment"
"$PY" -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())" || exit 2
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

status=0
if [ "$smoke" = 0 ] && "$PY" -c "import torch, transformers" 2>/dev/null; then
  echo "== model parity tests vs transformers (on the accelerator)"
  # tests/conftest.py asks for 8 host devices; on an accelerator host JAX's default device is the chip.
  "$PY" -m pytest -q -p no:cacheprovider tests/test_model_parity.py || status=1
elif [ "$smoke" = 1 ]; then
  echo "== model parity tests vs transformers: skipped (--cpu-smoke; the CPU test suite runs them)"
else
  echo "== model parity tests vs transformers: skipped (no torch/transformers in $PY)"
fi

echo "== trainer parity and step timings"
"$PY" tools/device_check.py --out "$out_dir/device_check.json" "$@" || status=1
echo "results: $out_dir/device_check.json"
exit $status
