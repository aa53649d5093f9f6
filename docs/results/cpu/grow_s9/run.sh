#!/usr/bin/env bash
# Stage-9 question on the CPU: does cross-attention in all 30 layers take more from the context than
# in 15? Both from stage 5 (weights/), same data order, D = 256 after 512-1,024 context tokens,
# batch 4, 80 steps, lr 1e-4 (10 warmup), held-out loss with/without context every 40 steps (48 samples).
cd /work/main
name=$1; layers=$2; shift 2
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1
python3 -m cepe.training.cli --config configs/general_smollm2.yaml \
  "data.train=[/work/data/mix_small/train,/work/data/mix_small/heldout]" output_dir=/work/short9/$name \
  model.init_adapter=/work/main/weights/cepe-smollm2-135m model.cross_attn_layers=$layers \
  "data.decoder_windows=[256]" data.window_block=4 train.batch_size=4 train.grad_accum=1 \
  data.context_tokens=1024 data.min_context_tokens=512 data.num_workers=0 \
  train.max_steps=80 train.warmup_steps=10 train.precision=fp32 train.cpu_threads=1 \
  train.eval_every=40 train.eval_samples=48 train.save_every=0 \
  "$@" --no-progress > /work/short9/$name.log 2>&1
