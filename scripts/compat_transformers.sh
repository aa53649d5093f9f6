#!/usr/bin/env bash
# Run the core model tests against the oldest supported transformers (5.17, what the GPU machine
# has) without touching the main install: it goes to a side folder put first on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:-5.17.0}
side=${CEPE_COMPAT_DIR:-/tmp/cepe-compat-transformers-$version}
if [ ! -f "$side/transformers/__init__.py" ]; then
  python3 -m pip install -q --no-deps --target "$side" "transformers==$version" "huggingface-hub>=1.5,<2"
fi
PYTHONPATH="$side" python3 -c "import transformers; print('transformers', transformers.__version__)"
PYTHONPATH="$side" python3 -m pytest -q -p no:cacheprovider tests/model -m "not real"
