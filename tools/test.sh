#!/usr/bin/env bash
# Install (into .venv) and run the test suite. CI runs exactly this (.ci/run).
# With no arguments the suite runs as two pytest processes: the quick tests, then the slow end-to-end ones (-m slow).
# Arguments go to a single pytest run (e.g. `bash tools/test.sh tests/test_generate.py -x`, `-m "not slow"`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh test
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [ "$#" -gt 0 ]; then
  exec python -m pytest -q "$@"
fi
status=0
python -m pytest -q -m "not slow" || status=$?
python -m pytest -q -m slow || status=$(( status ? status : $? ))
exit "$status"
