#!/usr/bin/env bash
# Set up .venv and run the whole test suite (tiny offline models + the real SmolLM2 tests).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
# Lint first (ruff, configured in pyproject.toml: line length 120, pyflakes, pycodestyle, import order).
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest -q "$@"
