#!/usr/bin/env bash
# The released SmolLM2 adapter, trained and evaluated on the lent H100 (see docs/results.md).
# Run after scripts/gpu/bootstrap.sh on the same warm machine. One step per call:
#   bash scripts/gpu/issue6.sh compare    # short long-document runs: MiniLM vs decoder-derived encoder
#   bash scripts/gpu/issue6.sh train ENC  # warmup -> long documents with encoder ENC (minilm-l6 | null)
#   bash scripts/gpu/issue6.sh distill ENC
#   bash scripts/gpu/issue6.sh eval       # perplexity curves on held-out book and code
#   bash scripts/gpu/issue6.sh ceped-released STEPS  # CEPED from the released adapter (weights/)
#   bash scripts/gpu/issue6.sh qa         # NQ, 1,000 questions, k = 1,5,10,20: CEPE, CEPED, baselines
#                                         # (needs bm25s there: here `python3 -m pip download --no-deps -d .whl
#                                         # bm25s==0.3.16`, and carry .whl; for 1,000 split the sweep, KS=1,5 then
#                                         # KS=10,20, and join them here with `cepe eval qa-merge`)
#   bash scripts/gpu/issue6.sh icl N      # intent_recognition with N demonstrations
#   bash scripts/gpu/issue6.sh scaling    # perplexity with and without cross-attention length scaling
# Outputs go to /root/runs (kept while the machine is warm) and the small files to $OUT.
set -euo pipefail
export CEPE_HOME=${CEPE_HOME:-/root/cepe_home}
export PYTHONPATH=/root/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true
OUT=${OUT:-/tmp/out}
SP=$(python3 -c 'import site; print(site.getsitepackages()[0])')
STD=$(python3 -c 'import os; print(os.path.dirname(os.__file__))')
BOOKS=/root/data/books/austen
NQ=/root/data/nq
RELEASED=$PWD/weights/cepe-smollm2-135m
CEPED=${CEPED:-/root/runs/ceped/adapter}
# training text: the six novels (persuasion.txt held out) + the GPU machine's site-packages code;
# held-out code is the standard library's email/, json/, asyncio/, which is not in site-packages
DATA="data.train=[$BOOKS,$SP] data.heldout=[persuasion.txt] data.num_workers=8"
train() { python3 -m cepe.training.cli "$@" ${EXTRA:-} --no-progress; }
keep() { local run=$1 tag=$2; for f in summary.json metrics.jsonl metrics.png; do cp "$run/$f" "$OUT/${tag}_$f" 2>/dev/null || true; done; }

case "${1:-}" in
  compare)
    steps=${2:-300}
    for enc in minilm-l6 null; do
      tag=cmp_${enc//-/_}
      train --config configs/smollm2_long.yaml $DATA model.encoder=$enc model.init_adapter=null \
        "data.mixture={long_document: 0.8, warmup: 0.2}" train.max_steps=$steps train.eval_every=0 \
        train.save_every=0 train.eval_samples=128 output_dir=/root/runs/$tag
      keep /root/runs/$tag $tag
    done
    ;;
  train)
    enc=${2:-minilm-l6}; wsteps=${3:-300}; lsteps=${4:-1500}
    train --config configs/smollm2_warmup.yaml $DATA model.encoder=$enc train.max_steps=$wsteps \
      output_dir=/root/runs/warmup
    keep /root/runs/warmup warmup
    train --config configs/smollm2_long.yaml $DATA model.encoder=$enc train.max_steps=$lsteps \
      model.init_adapter=/root/runs/warmup/adapter output_dir=/root/runs/long
    keep /root/runs/long long
    ;;
  distill)
    enc=${2:-minilm-l6}; steps=${3:-600}
    train --config configs/smollm2_distill.yaml $DATA model.encoder=$enc train.max_steps=$steps \
      model.init_adapter=/root/runs/long/adapter output_dir=/root/runs/distill
    keep /root/runs/distill distill
    ;;
  pack)
    # bf16 adapter shards (< 16 MiB each) for the trip back
    for stage in long distill; do
      python3 - "$stage" <<'PY'
import sys, torch
from cepe import CepeForCausalLM
stage = sys.argv[1]
m = CepeForCausalLM.from_pretrained(f"/root/runs/{stage}/adapter", decoder="smollm2-135m")
m.save_pretrained(f"/root/release/{stage}", dtype=torch.bfloat16, max_shard_size=15 * 2**20)
PY
    done
    ;;
  eval)
    adapter=${2:-/root/runs/long/adapter}; name=${3:-long}
    # held-out code as one long document: every .py of the stdlib's email/, json/, asyncio/, sorted
    find "$STD"/email "$STD"/json "$STD"/asyncio -name '*.py' | sort | xargs cat > /root/heldout_code.py
    for corpus in book code; do
      if [ $corpus = book ]; then data=$BOOKS/persuasion.txt; else data=/root/heldout_code.py; fi
      timeout ${EVAL_TIMEOUT:-900} python3 -m cepe.cli eval ppl --data $data --adapter "$adapter" --device ${DEVICE:-cuda} --dtype ${DTYPE:-bfloat16} \
        -D 512 -W 256 --context-tokens ${CTX:-0,512,1K,2K,4K,7680,16K,32K} --windows-per-doc ${WINDOWS:-8} --max-docs 1 \
        --methods cepe,truncated,full,streamingllm,replug --out "$OUT" --name ppl_${corpus}_${name} --no-progress
    done
    ;;
  ceped-released)
    steps=${2:-300}
    train --config configs/smollm2_distill.yaml $DATA model.encoder=null train.max_steps=$steps \
      model.init_adapter=$RELEASED output_dir=/root/runs/ceped
    keep /root/runs/ceped ceped
    ;;
  qa)
    if ! python3 -c 'import bm25s' 2>/dev/null; then
      python3 -m pip install -q --no-index --no-deps --target /root/site .whl/*.whl
    fi
    # BM25 over the 13,833 passages; m = 1 passage in the decoder, the next k in the encoder
    python3 -m cepe.cli eval qa --questions $NQ/questions.jsonl --passages $NQ/passages.jsonl \
      -m ${M:-1} -k ${KS:-1,5,10,20} --max-examples ${QUESTIONS:-1000} --adapter "$RELEASED" \
      $( [ -d "$CEPED" ] && echo --compare-adapter ceped=$CEPED ) --device ${DEVICE:-cuda} --dtype ${DTYPE:-bfloat16} \
      --methods cepe,truncated,full,replug --gen-batch ${GEN_BATCH:-64} --batch-size 32 \
      --out "$OUT" --name qa_nq_m${M:-1}_k$(echo ${KS:-1,5,10,20} | tr , _) --no-progress
    ;;
  icl)
    n=${2:-32}
    python3 -m cepe.cli eval icl --data /root/data/intent_recognition.jsonl --demos $n --decoder-demos 2 \
      --max-examples ${EXAMPLES:-300} --adapter "$RELEASED" $( [ -d "$CEPED" ] && echo --compare-adapter ceped=$CEPED ) \
      --device ${DEVICE:-cuda} --dtype ${DTYPE:-bfloat16} --methods cepe,truncated,full --out "$OUT" --name icl_intent_n$(echo $n | tr , _) --no-progress
    ;;
  scaling)
    # the released adapter with and without cross-attention length scaling (L = 2,048, its training context)
    find "$STD"/email "$STD"/json "$STD"/asyncio -name '*.py' | sort | xargs cat > /root/heldout_code.py
    for corpus in book code; do
      if [ $corpus = book ]; then data=$BOOKS/persuasion.txt; else data=/root/heldout_code.py; fi
      for ls in off 2048; do
        python3 -m cepe.cli eval ppl --data $data --adapter "$RELEASED" --device ${DEVICE:-cuda} --dtype ${DTYPE:-bfloat16} -D 512 -W 256 \
          --context-tokens ${CTX:-0,512,1K,2K,4K,7680,16K,32K} --windows-per-doc ${WINDOWS:-4} --max-docs 1 \
          --methods cepe,truncated --length-scaling $ls --out "$OUT" --name ppl_${corpus}_ls$ls --no-progress
      done
    done
    ;;
  *) echo "usage: $0 compare|train ENC|distill ENC|ceped-released [STEPS]|pack|eval [ADAPTER NAME]|qa|icl [N]|scaling"; exit 2 ;;
esac
