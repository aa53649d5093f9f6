#!/usr/bin/env bash

cd /work/main
python3 -m cepe.cli eval ppl --data /work/data/mix/heldout/books/moby_dick.jsonl -D 512 -W 256 -E 2K,8K,32K,128K   --windows-per-doc 4 --max-docs 1 --adapter /work/adapter_s6 --methods cepe --threads 1 --out /work/evals --name lengthgen_moby_s6 --no-progress > /work/evals/lengthgen_s6.log 2>&1
