#!/usr/bin/env bash
# On the lent GPU machine (no network), after the GGUF halves and MiniLM were sent (see
# docs/training.md, "Training on the lent H100"): make the asset names `smollm2-135m` and
# `minilm-l6` resolve there exactly as `cepe assets` does on a machine with PyPI.
set -euo pipefail
export CEPE_HOME=${CEPE_HOME:-/root/cepe_home}
export PYTHONPATH=/root/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$CEPE_HOME/models"
if [ ! -f "$CEPE_HOME/models/smollm2-135m/config.json" ] && [ -f /root/smollm2.gguf ]; then  # absent: a Gemma-only machine
  python3 - <<'PY'
import os
from pathlib import Path
from cepe.assets import _convert_gguf
out = Path(os.environ["CEPE_HOME"]) / "models" / "smollm2-135m"
_convert_gguf(Path("/root/smollm2.gguf"), out)
PY
fi
if [ ! -f "$CEPE_HOME/models/minilm-l6/config.json" ] && [ -d /root/minilm ]; then
  cp -r /root/minilm "$CEPE_HOME/models/minilm-l6"
fi
ls "$CEPE_HOME/models"
