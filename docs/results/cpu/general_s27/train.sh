#!/usr/bin/env bash
# CPU mechanism test of data.retrieval.in_window: passage_qa-only fine-tune from stage 22
# usage: train.sh NAME IN_WINDOW    (STEPS, default 160; batch 4; window 512; k drawn in [1,24])
set -uo pipefail
cd /work/main
A="data.mixture.facts=0 data.mixture.long_document=0 data.mixture.passage_qa=1.0 data.mixture.retrieval=0 data.mixture.copying=0 data.mixture.demonstrations=0 data.mixture.warmup=0 data.decoder_windows=[512] data.retrieval.k=[1,24] data.retrieval.max_passages=20000"
env OMP_NUM_THREADS=${THREADS:-2} python3 -m cepe.training.cli --config configs/general_smollm2.yaml "data.train=[/work/data/mix/train,/work/data/mix/heldout]" output_dir=/work/s27/cpu/$1 data.num_workers=0 model.init_adapter=/work/s25/a22 $A data.retrieval.in_window=$2 train.batch_size=4 data.window_block=4 train.precision=fp32 train.max_steps=${STEPS:-160} train.log_every=10 train.eval_every=100000 train.save_every=${STEPS:-160} train.warmup_steps=20 train.lr=1e-4 --no-progress > /work/s27/cpu/$1.log 2>&1
echo "done rc=$?" >> /work/s27/cpu/$1.log
