#!/usr/bin/env bash
# calibrated ICL (881ef2a) for stages 5-7: A = intent (s5 with the decoder too), B = multiemo
cd /work/main
S=../shared/data
icl() {  # $1 data, $2 stage, $3 methods
  python3 -m cepe.cli eval icl --data $S/icl/$1.jsonl --demos 8,32 --decoder-demos 2 --max-examples 100 \
    --adapter /work/adapter_s$2 --methods $3 --threads 1 --out /work/evals --name cal_$1_s$2 --no-progress > /work/evals/cal_$1_s$2.log 2>&1
}
case $1 in
A) icl intent_recognition 5 cepe,truncated; icl intent_recognition 6 cepe; icl intent_recognition 7 cepe; icl multiemo_en 6 cepe ;;
B) icl multiemo_en 7 cepe,truncated; icl multiemo_en 5 cepe ;;
esac
echo done > /work/evals/cal_$1.done
