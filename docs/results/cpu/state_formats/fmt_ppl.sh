#!/usr/bin/env bash
# HELDOUT: the general mix's held-out split (scripts/gpu/general.sh prepares it); OUT: a folder.
# released (stage 5) adapter, D=256 W=128 E=4K, the windows of ppl_d256_s5_*; CEPE reads its context as stored in $1
fmt=$1
for cat in books techdocs science code; do
  N=ppl_d256_s5_${fmt}_$cat
  python3 -m cepe.cli eval ppl --data $HELDOUT/$cat/*.jsonl --adapter released \
    -D 256 -W 128 -E 4K --windows-per-doc 4 --max-docs 4 --context-format $fmt \
    --methods cepe --threads 1 --out $OUT --name $N --no-progress
done
