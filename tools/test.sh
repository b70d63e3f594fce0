#!/usr/bin/env bash
# Set up .venv and run the whole test suite (tiny offline models + the real SmolLM2 tests).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
.venv/bin/python -m pytest -q "$@"
