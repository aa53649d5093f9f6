#!/usr/bin/env bash
# pass key in Moby-Dick, each trial from its own sentence (f5e917e), CPU fp32, stages 5-7
cd /work/main
for s in 5 6 7; do
  python3 -m cepe.cli eval passkey --adapter /work/adapter_s$s --lengths 4K,16K -D 256 \
    --depths 0,0.2,0.4,0.6,0.8,0.9 --trials 4 --methods cepe --threads 1 \
    --filler src/cepe/resources/moby_dick_ch1-3.txt --out /work/evals --name pk_book_varied_s$s --no-progress > /work/evals/pk_book_varied_s$s.log 2>&1
done
echo done > /work/evals/pk_varied.done
