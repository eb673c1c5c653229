#!/usr/bin/env bash
# Set up a fresh virtual environment and run the whole test suite (CPU; Triton kernels run in
# TRITON_INTERPRET mode). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# The CPU build of torch first, so the dependency resolver does not pull a CUDA build.
python -m pip install -q torch==2.13.0
python -m pip install -q -c constraints.txt -e ".[test]"
export TRITON_INTERPRET=1
set +e
python -m pytest -q -ra "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    # pytest's "no tests collected": a suite that runs nothing is a failure, not a pass.
    echo "error: pytest collected no tests" >&2
    exit 1
fi
exit "$rc"
