#!/usr/bin/env bash
# Issue 17's serving measurement on the lent H200 (docs/serving.md, "RAG load"): the released adapter
# behind `cepe serve`, NQ questions with 20 BM25 passages each, at 1/8/32/128 concurrent clients:
#   CEPE + continuous batching, captured decoding steps (--cuda-graphs auto: CUDA graphs on the GPU)
#   | CEPE + continuous batching as before paced joins (mode `unpaced`: --prefill-share 1
#     --switch-interval-ms 5, as the first 2026-12-02 run; mode `eager`: --cuda-graphs off)
#   | CEPE + continuous batching with --sdpa decode-order (mode `flash`: FlashAttention first everywhere)
#   | CEPE + continuous batching with the model in its own process (mode `process`: --worker process)
#   | CEPE + static batching (passages from the store, by id)
#   | SmolLM2 with the passages in its own window (same server, no context, captured steps)
# then the fault run (kill -9 under load, restart, every acknowledged document checked).
# One call runs continuous, static and decoder with the fault run and both step benches (~7.5 minutes,
# estimated); the comparison modes go in a second call on the same warm machine (~5 minutes):
#   STEP_BENCH=0 FAULT_RUN= MODES="process unpaced flash" bash scripts/gpu/serve_load.sh
# Each call must fit the device's 10 minutes: the 2026-12-02 run of four modes with one step bench
# took 548 s; a mode is ~90 s (a server start and 4 levels of LEVEL_S seconds plus their tails; the
# graph captures happen inside the levels, counted in rag_load.json as graph_captures /
# graph_capture_s), a step bench ~60 s, +36 s when the GGUF still has to be converted
# (scripts/gpu/bootstrap.sh; skipped when $CEPE_HOME/models already has it).
# WORKER=process runs every mode's server (and the fault run's) with --worker process (the model in a
# process of its own), so CEPE and the decoder compare under the same server.
# MODES="continuous static decoder" CUDA_GRAPHS=off gives the 2026-12-01 run's three modes.
#
# Needs on the machine: the models (/root/smollm2.gguf + /root/minilm, as ../shared/tools/gpu_pack.sh
# leaves them, or $CEPE_HOME/models already made by scripts/gpu/bootstrap.sh). Carried (ignored folders,
# 64 MiB per call with weights/ at 55 MB and the tracked files at 60 MB in all: keep these small):
#   .whl     the serving wheels for Python 3.12 (about 4 MB; the image lacks fastapi, starlette, pydantic,
#            uvicorn, python-multipart, prometheus_client and maybe httpx). Here:
#              pip download --no-deps -d .whl --python-version 3.12 --platform manylinux2014_x86_64 \
#                --platform manylinux_2_17_x86_64 --only-binary=:all: <the pins in docs/serving.md>
#   .gpu/nq  the NQ questions used, each with its BM25 ranking over the full pool, and the passages they
#            name (0.46 MB for 128 questions, instead of 10 MB). Here, after any gpu_pack.sh (it empties .gpu):
#              python3 -m cepe.serving.rag_load --questions 128 --k 20 --write-subset .gpu/nq
# Only the wheels that pip finds missing (or too old) in the image are installed, into /root/site:
# nothing the image's torch/transformers import is shadowed. If pip cannot tell, all are installed.
#   bash scripts/gpu/serve_load.sh       # writes to $OUT: step_bench_{default,decode-order}.json, rag_load.{json,png}, serve_load.log, server.log.gz
# First (STEP_BENCH=0 skips it, ~1 minute, estimated) scripts/bench_serve_step.py times one decoding step of the
# released adapter, eager and captured, at B = 1/8/32/128 with 4,096 context positions per row.
# FAULT_RUN= (empty) skips the fault run. RUN_S bounds the load run itself (seconds), so that a call
# nearing the device's limit still keeps the server log: set it ~30 s under the call's timeout.
#   QUESTIONS=64 LEVEL_S=8 CLIENTS="1 8 32 128" FAULT_CLIENTS=32 MODES="continuous static decoder" \
#     CUDA_GRAPHS=auto bash scripts/gpu/serve_load.sh   # the defaults
# CPU dry run at tiny scale (docs/serving.md; NQ=/work/shared/data/qa/nq instead runs BM25 over the full pool
# there, same rankings; MODEL="--adapter none --init zero" for zero-initialised CEPE = SmolLM2):
#   CEPE_HOME=~/.cache/cepe DEVICE=cpu DTYPE=float32 STEP_BENCH=0 \
#   QUESTIONS=4 CLIENTS="1 2 4" LEVEL_S=10 MAX_TOKENS=8 FAULT_CLIENTS=4 OUT=runs/serve_load_cpu bash scripts/gpu/serve_load.sh
set -euo pipefail
export CEPE_HOME=${CEPE_HOME:-/root/cepe_home}
export PYTHONPATH=/root/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TQDM_MININTERVAL=15
OUT=${OUT:-/tmp/out}
WHL=${WHL:-.whl}
if [ -z "${NQ:-}" ]; then
  if [ -d .gpu/nq ]; then NQ=.gpu/nq; else NQ=/root/data/nq; fi
fi
mkdir -p "$OUT" && : > "$OUT/serve_load.log"
stamp() { echo "[serve_load] $1 at $SECONDS s" | tee -a "$OUT/serve_load.log"; }
need="fastapi uvicorn python-multipart prometheus_client httpx bm25s"
# find_spec, not import: importing bm25s where JAX is installed starts JAX on the GPU (src/cepe/data/bm25.py)
if ! python3 -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in
    ('fastapi', 'uvicorn', 'multipart', 'prometheus_client', 'httpx', 'bm25s')))"; then
  mkdir -p /root/site
  # pip's dry run resolves against what the image has; its report names the wheels still needed
  whls=$(PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install -q --dry-run --no-index --find-links "$WHL" --report - $need \
    | python3 -c 'import json, sys, urllib.parse as u
print(" ".join(u.unquote(u.urlparse(i["download_info"]["url"]).path) for i in json.load(sys.stdin)["install"]))' 2>/dev/null) \
    || whls=""
  [ -n "$whls" ] || { echo "pip's dry run named nothing: installing every wheel"; whls=$(ls "$WHL"/*.whl | grep -v /gguf-); }
  echo "installing into /root/site: $(for w in $whls; do basename "$w"; done | tr '\n' ' ')" | tee -a "$OUT/serve_load.log"
  # shellcheck disable=SC2086
  python3 -m pip install -q --no-deps --no-index --target /root/site $whls
fi
if [ ! -f "$CEPE_HOME/models/smollm2-135m/config.json" ]; then
  python3 -c "import gguf" 2>/dev/null || python3 -m pip install -q --no-deps --no-index --target /root/site "$WHL"/gguf-*.whl
  bash scripts/gpu/bootstrap.sh
fi
stamp "wheels and models ready"
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true) | tee -a "$OUT/serve_load.log"
if [ "${STEP_BENCH:-1}" = 1 ]; then  # one decoding step, eager vs captured, at B = 1/8/32/128 (docs/serving.md)
  for sdpa in ${STEP_SDPA:-default decode-order}; do  # decode-order: does cuDNN's per-shape plan cost the eager step?
    python3 scripts/bench_serve_step.py --model smollm2 --device "${DEVICE:-cuda}" --dtype "${DTYPE:-bfloat16}" \
      --batch ${STEP_BATCH:-1 8 32 128} --steps 16 --context-tokens 4096 --docs 16 --sdpa "$sdpa" \
      --json "$OUT/step_bench_$sdpa.json" 2>&1 | tee -a "$OUT/serve_load.log" \
      || echo "step bench failed (the load run goes on)" | tee -a "$OUT/serve_load.log"
  done
  stamp "step bench done"
fi
# shellcheck disable=SC2086
timeout "${RUN_S:-3600}" python3 -m cepe.serving.rag_load --data "$NQ" ${MODEL:---adapter released} --device "${DEVICE:-cuda}" ${DTYPE:+--dtype $DTYPE} \
  --modes ${MODES:-continuous static decoder} --cuda-graphs "${CUDA_GRAPHS:-auto}" --worker "${WORKER:-thread}" --concurrency ${CLIENTS:-1 8 32 128} --questions "${QUESTIONS:-64}" --k 20 \
  --max-tokens "${MAX_TOKENS:-32}" --requests 2048 --level-seconds "${LEVEL_S:-8}" --max-batch 128 \
  --batch-memory-mb 40960 ${FAULT_RUN---fault} --fault-clients "${FAULT_CLIENTS:-32}" --out "$OUT" \
  --note "scripts/gpu/serve_load.sh on ${DEVICE:-cuda}" 2>&1 | tee -a "$OUT/serve_load.log" || status=$?
stamp "done"
log=$(grep -o 'server log: .*' "$OUT/serve_load.log" | tail -1 | cut -d' ' -f3 || true)
[ -n "$log" ] && [ -f "$log" ] && gzip -c "$log" > "$OUT/server.log.gz"
exit "${status:-0}"
