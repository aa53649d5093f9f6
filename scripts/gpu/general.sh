#!/usr/bin/env bash
# The general-purpose adapter (issue 15) on the lent GPU. One step per call, back to back on one
# warm machine (it keeps /root while warm: at most 30 minutes held):
#   earlier calls  copy the xz tar parts of the mix (`tar -C OUT -c train heldout | xz | split -b 48M`)
#                  to /root/data/ (MIX_PARTS), and the models as for bootstrap.sh (/root/smollm2.gguf;
#                  for Gemma /root/gemma3.gguf and /root/gemma3.tokenizer: scripts/gpu/pack_gemma.sh)
#   bash scripts/gpu/general.sh unpack           # mix -> /root/data/mix/{train,heldout}; models -> $CEPE_HOME
#   bash scripts/gpu/general.sh prepare STAGE    # tokenize the mix once (the token-store cache), before probe/train
#   bash scripts/gpu/general.sh train STAGE [MAX_SECONDS]
#                  STAGE: smollm2 | gemma3 (configs/general_STAGE.yaml). Resumes from the last checkpoint
#                  under /root/runs/general_STAGE; stops (SIGKILL, checkpoints are atomic) after MAX_SECONDS
#                  (default 540); brings back the latest adapter as bf16 shards < 16 MiB (WEIGHT_FORMAT=int8: 8-bit
#                  matrices, for adapters over 64 MiB in bf16) plus run_STAGE.tar.gz
#                  (its config/index, metrics.jsonl, summary, split, curve); ADAPTER=0 brings back metrics only;
#                  also kept as $ROOT/runs/general_STAGE/latest_adapter for `eval`. WORKERS (default 6) DataLoader
#                  workers, with a watchdog that goes on without them if no step is logged for STALL s
#   bash scripts/gpu/general.sh wait STAGE       # until a `train` started in the background has ended
#   bash scripts/gpu/general.sh probe STAGE      # s/step, tokens/s and peak memory at BATCHES (16 32 64)
#   bash scripts/gpu/general.sh retrieval STAGE  # pass key at 4K/16K/64K, RULER needles + variable tracking at 16K
#   bash scripts/gpu/general.sh evaluate STAGE   # retrieval and eval at once, results in OUT/evaluate_STAGE.tar.gz
#   bash scripts/gpu/general.sh eval STAGE       # held-out ppl per category at D = 256/512/1024/2048, 4K context:
#                                                # cepe vs truncated vs full (CTX, DS, WINDOWS, CATEGORIES override;
#                                                # DS and CATEGORIES: space- or comma-separated)
# EVAL_ARGS: more `cepe eval` flags for eval and retrieval, e.g. "--cross-attn-topk 16"
# Dry run on a CPU: ROOT=/tmp/g MIX=fixtures DEVICE=cpu DTYPE=float32 EXTRA="train.max_steps=4 ..." bash ... train smollm2 60
# A fresh machine loses /root/runs: a checkpoint (fp32 weights + AdamW state, about 330 MB) does not fit
# the trip back, so a later session starts from the brought-back adapter (INIT=DIR: model.init_adapter)
# with a fresh optimizer: a new stage, not an exact resume.
set -euo pipefail
ROOT=${ROOT:-/root}
export CEPE_HOME=${CEPE_HOME:-$ROOT/cepe_home}
export PYTHONPATH=$ROOT/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true
OUT=${OUT:-/tmp/out}
MIX=${MIX:-$ROOT/data/mix}
mkdir -p "$OUT" "$ROOT/runs"

case "${1:-}" in
  unpack)
    if [ ! -d "$MIX/train" ]; then
      mkdir -p "$MIX"
      cat ${MIX_PARTS:-$ROOT/data/mix.tar.xz.part*} | xz -dc -T0 | tar -x -i -C "$MIX"   # -i: also several packs, each its own tar
    fi
    du -sh "$MIX"/train "$MIX"/heldout
    bash scripts/gpu/bootstrap.sh
    if [ ! -f "$CEPE_HOME/models/gemma3-270m/config.json" ] && [ -f "$ROOT/gemma3.gguf" ]; then
      # the tokenizer shipped by pack_gemma.sh: transformers 5.17 here misreads the GGUF's (no merges, no <bos>)
      python3 -c "import sys; from pathlib import Path; from cepe.assets import _convert_gguf; _convert_gguf(*map(Path, sys.argv[1:]))" \
        "$ROOT/gemma3.gguf" "$CEPE_HOME/models/gemma3-270m" $( [ -d "$ROOT/gemma3.tokenizer" ] && echo "$ROOT/gemma3.tokenizer")
    fi
    ls "$CEPE_HOME/models"
    ;;
  prepare)
    # tokenize the mix into the token-store cache (~/.cache/cepe/tokens) once per machine, so that
    # the probe and training calls start in seconds (on this project's 2-core CPU: 197 of 211 s of
    # start-up is this tokenization; the H200 machine has 16 cores)
    stage=${2:?usage: prepare smollm2|gemma3}
    python3 - "$stage" "$MIX" <<'PY'
import sys, time
from cepe.data.pipeline import build_data
from cepe.training.build import build_model
from cepe.training.config import load_config
t0 = time.perf_counter()
stage, mix = sys.argv[1:]
cfg = load_config(f"configs/general_{stage}.yaml", [f"data.train=[{mix}/train,{mix}/heldout]", "model.init_adapter=null"])
model = build_model(cfg)
data = build_data(cfg.data, model.tokenizer, model.encoder_tokenizer, progress=False)
print(f"token stores and samplers ready in {time.perf_counter() - t0:.0f} s: {data.report}")
PY
    ;;
  train)
    stage=${2:?usage: train smollm2|gemma3 [MAX_SECONDS]}; max=${3:-540}; run=$ROOT/runs/general_$stage
    t0=$(date +%s)
    # a run resumes only under the same config: remember the INIT it started from for later calls
    mkdir -p "$run"
    echo $$ > "$run/train.pid"; trap 'rm -f "$run/train.pid"' EXIT   # for `wait`, when run in the background
    if [ -n "${INIT:-}" ]; then echo "$INIT" > "$run/init_adapter.txt"
    elif [ -f "$run/init_adapter.txt" ]; then INIT=$(cat "$run/init_adapter.txt"); echo "resuming the run started from INIT=$INIT"; fi
    train() {  # $1 seconds, $2 DataLoader workers
      timeout -s KILL "$1" python3 -m cepe.training.cli --config configs/general_$stage.yaml \
        "data.train=[$MIX/train,$MIX/heldout]" output_dir=$run data.num_workers=$2 \
        ${INIT:+model.init_adapter=$INIT} ${EXTRA:-} --no-progress
    }
    set +e
    train "$max" "${WORKERS:-6}" &
    pid=$!
    # watchdog: DataLoader workers once hung (forked after JAX's threads; JAX is now kept out). No new
    # metrics line for STALL seconds once training logs: kill, go on without workers for the time left
    while kill -0 $pid 2>/dev/null; do
      sleep 10
      m=$run/metrics.jsonl; last=$( [ -f $m ] && stat -c %Y $m || echo $t0); [ $last -lt $t0 ] && last=$t0
      age=$(( $(date +%s) - last ))
      if [ "${WORKERS:-6}" != 0 ] && [ $age -gt ${STALL:-240} ]; then
        echo "no training step for ${age}s with ${WORKERS:-6} workers: restarting with none"
        pkill -KILL -f cepe.training.cli; wait $pid
        left=$(( max - ($(date +%s) - t0) )); [ $left -gt 30 ] && { train "$left" 0 & pid=$!; }
        WORKERS=0
      fi
    done
    wait $pid; rc=$?
    [ $rc = 137 ] && echo "stopped at MAX_SECONDS=$max: the last checkpoint is kept" || echo "train exit $rc"
    set -e
    # the newest adapter: the final one if the run ended, else the last checkpoint's weights
    python3 - "$run" "$OUT/adapter_$stage" "${ADAPTER:-1}" <<'PY'
import os
import sys
from pathlib import Path
import torch
from safetensors.torch import load_file
from cepe.training import checkpoint as ckpt
from cepe.training.build import build_model
from cepe.training.config import load_config
run, out, want = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1"
found = ckpt.list_checkpoints(run)
final = run / "adapter"
if not want or not (found or final.is_dir()):
    sys.exit(print("no adapter brought back" if want else "ADAPTER=0: metrics only"))
cfg = load_config(str(run / "config.yaml"), ["model.init_adapter=null"])
model = build_model(cfg)
if final.is_dir() and (not found or final.stat().st_mtime >= found[-1].stat().st_mtime):
    model.load_adapter_weights(final); src = final
else:
    model.load_state_dict(load_file(str(found[-1] / "adapter.safetensors")), strict=False); src = found[-1]
fmt = os.environ.get("WEIGHT_FORMAT", "float")  # int8: weight matrices in 8 bits (an adapter over 64 MiB in bf16)
model.save_pretrained(out, dtype=torch.bfloat16, max_shard_size=15 * 2**20, weight_format=fmt)
size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
print(f"adapter from {src}: {size / 1e6:.1f} MB in {'bf16' if fmt == 'float' else fmt} -> {out}")
PY
    python3 scripts/gpu/general_curve.py "$run" --out "$run/curve.png" || true
    # small files in one archive (at most 8 files come back); the shards beside it
    tar -czf "$OUT/run_$stage.tar.gz" -C "$run" $(cd "$run" && ls metrics.jsonl summary.json metrics.png split.json \
      data_report.json config.yaml curve.png curve.json heldout_answers.json 2>/dev/null) \
      $( [ -d "$OUT/adapter_$stage" ] && echo -C "$OUT/adapter_$stage" $(cd "$OUT/adapter_$stage" && ls | grep -v '^model.*safetensors$') ) \
      || echo "nothing to archive yet"
    if [ -d "$OUT/adapter_$stage" ]; then
      rm -rf "$run/latest_adapter" && cp -r "$OUT/adapter_$stage" "$run/latest_adapter"  # for `eval` on this machine
      (cd "$OUT/adapter_$stage" && ls | grep -v '^model.*safetensors$' | xargs rm -f && mv model*.safetensors "$OUT"/ && cd .. && rmdir "adapter_$stage")
    fi
    ls -la "$OUT"
    ;;
  wait)
    # until a `train` started in the background (same ROOT and STAGE) has brought its adapter back:
    # a pid file, since `pgrep -f "general.sh train"` also matches the calling command's own line
    stage=${2:?usage: wait smollm2|gemma3}; pidfile=$ROOT/runs/general_$stage/train.pid
    while [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; do sleep 5; done
    ;;
  eval)
    stage=${2:?usage: eval smollm2|gemma3}; adapter=${ADAPTER_DIR:-$ROOT/runs/general_$stage/latest_adapter}
    [ -d "$adapter" ] || python3 -c "print('no final adapter at $adapter: set ADAPTER_DIR')"
    cats=${CATEGORIES:-$(ls "$MIX/heldout")}; ds=${DS:-256 512 1024 2048}
    for cat in ${cats//,/ }; do         # CATEGORIES and DS: space- or comma-separated
      for d in ${ds//,/ }; do
        timeout ${EVAL_TIMEOUT:-900} python3 -m cepe.cli eval ppl --data "$MIX/heldout/$cat"/*.jsonl --adapter "$adapter" \
          --device ${DEVICE:-cuda} --dtype ${DTYPE:-bfloat16} -D $d -W $((d / 2)) --context-tokens ${CTX:-0,4K} \
          --windows-per-doc ${WINDOWS:-8} --max-docs ${DOCS:-4} --methods ${METHODS:-cepe,truncated,full} ${EVAL_ARGS:-} \
          --out "$OUT" --name ppl_${stage}_${cat}_D$d --no-progress
      done
    done
    ;;
  probe)
    # throughput and memory of the training step per batch size, at the longest window (WINDOW) and
    # context: STEPS steps each, from INIT if given, in a scratch run (the stage's run is not touched);
    # EXTRA (after the probe's own settings) e.g. for facts-only batches at their longest context.
    # Start-up (data, BM25 pool, model) took over 110 s in stage 6 (a probe killed then, unreported); batch 16 peaks
    # at 55 GB at window 2,048 and 8K context (stage 6), so batch 32 fits the H200 and 64 does not
    stage=${2:?usage: probe smollm2|gemma3}
    for b in ${BATCHES:-16 32 64}; do
      run=$ROOT/runs/probe_${stage}_$b; rm -rf "$run"
      timeout -s KILL ${PROBE_TIMEOUT:-240} python3 -m cepe.training.cli --config configs/general_$stage.yaml \
        "data.train=[$MIX/train,$MIX/heldout]" output_dir=$run data.num_workers=${WORKERS:-6} \
        train.batch_size=$b data.window_block=$b "data.decoder_windows=[${WINDOW:-2048}]" \
        data.min_context_tokens=${CONTEXT:-8192} train.max_steps=${STEPS:-20} train.log_every=1 \
        train.eval_samples=$b train.save_every=0 ${INIT:+model.init_adapter=$INIT} ${EXTRA:-} --no-progress > "$run.log" 2>&1 \
        || echo "batch $b: stopped after PROBE_TIMEOUT=${PROBE_TIMEOUT:-240} s"  # set -e would end the loop here
      python3 - "$run/metrics.jsonl" "$b" <<'PY' || tail -3 "$run.log"
import json, statistics, sys
rows = [json.loads(x) for x in open(sys.argv[1]) if '"step_s"' in x][3:]  # the first steps warm up
print(f"batch {sys.argv[2]:>3}: {statistics.median(r['step_s'] for r in rows):.3f} s/step, "
      f"{statistics.median(r['tokens_per_s'] for r in rows):,.0f} decoder tokens/s, "
      f"peak {max(r.get('peak_memory_gb', 0) for r in rows):.1f} GB over {len(rows)} steps")
PY
    done
    ;;
  retrieval)
    # issue 15's retrieval targets through the encoder: pass key (key in the encoder, D = 256) at
    # 4K/16K/64K, depths 0-0.9; RULER's single/multi-key needles and variable tracking at 16K
    # (32 RULER samples per task: at 16 one sample moved a score by 6 points and two stages 19 apart)
    stage=${2:?usage: retrieval smollm2|gemma3}; adapter=${ADAPTER_DIR:-$ROOT/runs/general_$stage/latest_adapter}
    common=(--adapter "$adapter" --device ${DEVICE:-cuda} --dtype ${DTYPE:-bfloat16} --out "$OUT" --no-progress ${EVAL_ARGS:-})
    python3 -m cepe.cli eval passkey "${common[@]}" --lengths ${PK_LENGTHS:-4K,16K,64K} -D 256 \
      --depths 0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9 --trials ${PK_TRIALS:-4} --methods cepe,truncated \
      --name passkey_${stage}
    # the same key in running text (a held-out book) instead of the repeated sentences
    python3 -m cepe.cli eval passkey "${common[@]}" --lengths ${PK_LENGTHS:-4K,16K,64K} -D 256 \
      --depths 0,0.2,0.4,0.6,0.8,0.9 --trials ${PK_BOOK_TRIALS:-4} --methods cepe \
      --filler src/cepe/resources/moby_dick_ch1-3.txt --name passkey_book_${stage}
    python3 -m cepe.cli eval ruler "${common[@]}" --lengths ${RULER_LENGTHS:-16K} \
      --tasks ${RULER_TASKS:-niah_single,niah_multikey,niah_multivalue,vt} --samples ${RULER_SAMPLES:-32} \
      --methods cepe --name ruler_${stage}
    ;;
  evaluate)
    # `retrieval` and `eval` at once: neither keeps the GPU busy (a SmolLM2 forward is small), so
    # together they take about the longer one's time instead of the sum. Their JSON and plots come
    # back in one archive (a call brings back at most 8 files); the tables are printed here
    stage=${2:?usage: evaluate smollm2|gemma3}; tmp=$(mktemp -d)
    OUT=$tmp/retrieval bash "$0" retrieval "$stage" > "$tmp/retrieval.log" 2>&1 & r=$!
    OUT=$tmp/ppl bash "$0" eval "$stage" > "$tmp/ppl.log" 2>&1 & p=$!
    set +e; wait $r; rr=$?; wait $p; rp=$?; set -e
    grep -h -B1 -A8 -- '^---' "$tmp/retrieval.log" "$tmp/ppl.log" || true
    tar -czf "$OUT/evaluate_$stage.tar.gz" -C "$tmp" .
    echo "retrieval exit $rr, eval exit $rp: $(find "$tmp" -name '*.json' | wc -l) result files in $OUT/evaluate_$stage.tar.gz"
    [ $rr = 0 ] && [ $rp = 0 ]
    ;;
  *) echo "usage: $0 unpack | train smollm2|gemma3 [MAX_SECONDS] | prepare|probe|eval|retrieval|evaluate smollm2|gemma3"; exit 2 ;;
esac
