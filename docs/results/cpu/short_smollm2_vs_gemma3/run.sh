#!/usr/bin/env bash
# Issue 15: the same recipe on both decoder families, a short CPU run from zero-initialised
# cross-attention (fp32, 1 thread): D = 256 after 512-1,024 context tokens, batch 4, 80 steps,
# held-out loss with and without context every 40 steps (48 samples).
cd /work/main
stage=$1
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1
python3 -m cepe.training.cli --config configs/general_$stage.yaml \
  "data.train=[/work/data/mix/train,/work/data/mix/heldout]" output_dir=/work/short/$stage \
  "data.decoder_windows=[256]" data.window_block=4 train.batch_size=4 train.grad_accum=1 \
  data.context_tokens=1024 data.min_context_tokens=512 data.num_workers=0 \
  train.max_steps=80 train.warmup_steps=10 train.precision=fp32 train.cpu_threads=1 \
  train.eval_every=40 train.eval_samples=48 train.save_every=0 train.task_weight=1.0 \
  --no-progress > /work/short/$stage.log 2>&1
