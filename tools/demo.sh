#!/usr/bin/env bash
# Set up .venv and run the main job on the built-in default: SmolLM2-135M over the
# generated sentence-transformation task (build a store, query it, print the evidence).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
.venv/bin/forvalue demo "$@"
