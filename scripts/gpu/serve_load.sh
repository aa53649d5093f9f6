#!/usr/bin/env bash
# Issue 17's serving measurement on the lent H200 (docs/serving.md, "RAG load"): the released adapter
# behind `cepe serve`, NQ questions with 20 BM25 passages each, at 1/8/32/128 concurrent clients:
#   CEPE + continuous batching | CEPE + static batching (passages from the store, by id)
#   | SmolLM2 with the passages in its own window (same server, no context)
# then the fault run (kill -9 under load, restart, every acknowledged document checked). ~7-9 minutes.
#
# Needs on the machine (see docs/training.md, "Training on the lent H100"): the models
# (/root/smollm2.gguf + /root/minilm, or $CEPE_HOME/models already made by scripts/gpu/bootstrap.sh),
# NQ in /root/data/nq (questions.jsonl, passages.jsonl), and the serving wheels in .whl (the machine
# lacks fastapi, starlette, pydantic, uvicorn, python-multipart, bm25s; fetch them here with
#   pip download --no-deps -d .whl --python-version 3.12 --platform manylinux2014_x86_64 --only-binary=:all: \
#     fastapi starlette pydantic pydantic_core annotated-types typing-inspection python-multipart uvicorn bm25s
# and carry .whl). weights/ (the released adapter) travels with the checkout.
#   bash scripts/gpu/serve_load.sh                    # writes to $OUT: rag_load.{json,png}, serve_load.log, server.log.gz
#   QUESTIONS=128 LEVEL_S=12 CLIENTS="1 8 32 128" bash scripts/gpu/serve_load.sh
# CPU dry run at tiny scale (zero-initialised CEPE = SmolLM2; docs/serving.md):
#   CEPE_HOME=~/.cache/cepe NQ=/work/shared/data/qa/nq MODEL="--adapter none --init zero" DEVICE=cpu \
#   QUESTIONS=4 CLIENTS="1 2 4" LEVEL_S=10 MAX_TOKENS=8 FAULT_CLIENTS=4 OUT=runs/serve_load_cpu bash scripts/gpu/serve_load.sh
set -euo pipefail
export CEPE_HOME=${CEPE_HOME:-/root/cepe_home}
export PYTHONPATH=/root/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TQDM_MININTERVAL=15
OUT=${OUT:-/tmp/out}
NQ=${NQ:-/root/data/nq}
mkdir -p "$OUT"
if ! python3 -c "import fastapi, uvicorn, multipart, bm25s" 2>/dev/null; then
  mkdir -p /root/site && pip install -q --no-deps --no-index --target /root/site .whl/*.whl
fi
[ -f "$CEPE_HOME/models/smollm2-135m/config.json" ] || bash scripts/gpu/bootstrap.sh
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true) | tee "$OUT/serve_load.log"
# shellcheck disable=SC2086
python3 -m cepe.serving.rag_load --data "$NQ" ${MODEL:---adapter released} --device "${DEVICE:-cuda}" ${DTYPE:+--dtype $DTYPE} \
  --modes continuous static decoder --concurrency ${CLIENTS:-1 8 32 128} --questions "${QUESTIONS:-128}" --k 20 \
  --max-tokens "${MAX_TOKENS:-32}" --requests 2048 --level-seconds "${LEVEL_S:-12}" --max-batch 128 \
  --batch-memory-mb 40960 --fault --fault-clients "${FAULT_CLIENTS:-32}" --out "$OUT" \
  --note "scripts/gpu/serve_load.sh on ${DEVICE:-cuda}" 2>&1 | tee -a "$OUT/serve_load.log" || status=$?
log=$(grep -o 'server log: .*' "$OUT/serve_load.log" | tail -1 | cut -d' ' -f3)
[ -n "$log" ] && [ -f "$log" ] && gzip -c "$log" > "$OUT/server.log.gz"
exit "${status:-0}"
