#!/usr/bin/env bash
# stage-4 adapter (now /work/adapter_s6) on NQ (100 q) and ICL intent / multiemo, CPU fp32
cd /work/main
S=../shared/data
case $1 in
nq) python3 -m cepe.cli eval qa --questions $S/qa/nq/questions.jsonl --passages $S/qa/nq/passages.jsonl -m 1 -k 1,20 \
      --max-examples 100 --adapter /work/adapter_s6 --methods cepe --threads 1 --gen-batch 16 --out /work/evals --name qa_nq100_s6 --no-progress > /work/evals/qa_s6.log 2>&1 ;;
intent) python3 -m cepe.cli eval icl --data $S/icl/intent_recognition.jsonl --demos 8,32 --decoder-demos 2 --max-examples 100 \
      --adapter /work/adapter_s6 --methods cepe --threads 1 --out /work/evals --name icl_intent_s6 --no-progress > /work/evals/icl_intent_s6.log 2>&1 ;;
multiemo) python3 -m cepe.cli eval icl --data $S/icl/multiemo_en.jsonl --demos 8,32 --decoder-demos 2 --max-examples 100 \
      --adapter /work/adapter_s6 --methods cepe --threads 1 --out /work/evals --name icl_multiemo_s6 --no-progress > /work/evals/icl_multiemo_s6.log 2>&1 ;;
esac
