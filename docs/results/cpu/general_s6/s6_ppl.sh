#!/usr/bin/env bash
# stage-5 adapter, cepe only, on the same windows as ppl_d256_s4_* / ppl_s4_* (their truncated/full rows are reused)
cd /work/main
for D in 256 512; do
 for cat in books techdocs science code; do
  if [ $D = 256 ]; then W="-W 128"; N=ppl_d256_s6_$cat; else W=""; N=ppl_s6_$cat; fi
  python3 -m cepe.cli eval ppl --data /work/data/mix/heldout/$cat/*.jsonl --adapter /work/adapter_s6 \
    -D $D $W -E 4K --windows-per-doc 4 --max-docs 4 \
    --methods cepe --threads 1 --out /work/evals --name $N --no-progress > /work/evals/$N.log 2>&1
 done
done
