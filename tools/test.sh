#!/usr/bin/env bash
# Install (into .venv) and run the test suite. CI runs exactly this (.ci/run).
# With no arguments the suite runs as three pytest processes: the quick tests, the slow end-to-end ones (-m slow),
# and tests/test_reproduce.py on its own (see below).
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
# test_reproduce gets a process of its own, with stderr left uncaptured at the file-descriptor level
# (--capture=sys): its in-process resumed SFT has aborted (SIGABRT) intermittently, and a native abort's own
# message goes to fd 2, which pytest's default capture would swallow with the process.
python -m pytest -q -m slow --ignore=tests/test_reproduce.py || status=$(( status ? status : $? ))
python -m pytest -q --capture=sys tests/test_reproduce.py || status=$(( status ? status : $? ))
exit "$status"
