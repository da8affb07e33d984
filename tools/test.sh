#!/usr/bin/env bash
# Install (into .venv) and run the test suite. CI runs exactly this (.ci/run).
# With no arguments the suite runs as three pytest processes: the quick tests, the slow end-to-end ones (-m slow), and
# the pipeline test (tests/test_reproduce.py) on one emulated device.
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
python -m pytest -q -m slow --ignore=tests/test_reproduce.py || status=$(( status ? status : $? ))
# The in-process pipeline test on one device: on 8 emulated CPU devices its resumed SFT step has hung in XLA:CPU's
# all-reduce rendezvous (7 of 8 device threads arrived, then abort) on loaded cores; multi-device resume is covered by
# test_dpo_resume, test_preemption and test_multihost, and the pipeline's logic does not depend on the mesh.
XLA_FLAGS=--xla_force_host_platform_device_count=1 python -m pytest -q tests/test_reproduce.py \
  || status=$(( status ? status : $? ))
exit "$status"
