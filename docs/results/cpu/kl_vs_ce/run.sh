#!/usr/bin/env bash
# Does distillation toward the decoder reading the context in its own window (full attention) raise
# the held-out text gain faster than cross-entropy alone? From the released stage-5 adapter, long
# documents only, D = 256 after 1,024-2,048 context tokens, batch 4, 60 steps, lr 5e-5 (CPU, fp32).
# ARM: ce | kl
cd /work/main
arm=$1
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1
extra=()
[ "$arm" = kl ] && extra=(distill.kl_coef=1.0 distill.teacher=online distill.teacher_context_tokens=2048)
python3 -m cepe.training.cli --config configs/general_smollm2.yaml \
  "data.train=[/work/data/mix/train,/work/data/mix/heldout]" output_dir=/work/kl/$arm \
  model.init_adapter=/work/adapter_s5 "data.mixture={long_document: 1.0}" \
  "data.decoder_windows=[256]" data.window_block=4 train.batch_size=4 train.grad_accum=1 \
  data.context_tokens=2048 data.min_context_tokens=1024 data.num_workers=0 \
  train.max_steps=60 train.warmup_steps=5 train.lr=5e-5 train.precision=fp32 train.cpu_threads=1 \
  train.eval_every=30 train.eval_samples=48 train.save_every=0 "${extra[@]}" \
  --no-progress > /work/kl/$arm.log 2>&1
