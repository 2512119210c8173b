#!/usr/bin/env bash
# Creates ./.venv (if missing) and installs gsae_jax with the `lm` and `test` extras.
# torch==2.13.0 (the CPU wheel) is installed first so that the `lm` extra's `torch>=2.4` is
# already satisfied and pip never pulls a multi-GB CUDA build on a CPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet torch==2.13.0
.venv/bin/python -m pip install --quiet -e '.[lm,test]'
echo "gsae_jax installed in $(pwd)/.venv"
