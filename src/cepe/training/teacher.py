"""Precomputed teachers for CEPE-Distilled (`distill.teacher=file`): the file of a teacher's top-k
next-token probabilities over the training samples, and the hash of what those samples depend on."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .config import RunConfig, to_dict
from .losses import TeacherFile, teacher_topk


def sample_data_hash(cfg: RunConfig, teacher_tokens: int) -> str:
    """What the samples depend on (a precomputed teacher file must match it)."""
    view = {k: v for k, v in to_dict(cfg.data).items() if k not in ("num_workers", "cache_dir")}
    view.update(decoder=cfg.model.decoder, teacher_tokens=teacher_tokens)
    return hashlib.sha256(json.dumps(view, sort_keys=True, default=str).encode()).hexdigest()[:16]


@torch.no_grad()
def write_teacher_file(
    cfg: RunConfig,
    path: str | Path,
    teacher: str | None = None,
    samples: int | None = None,
    batch_size: int | None = None,
    progress: bool = True,
) -> Path:
    """Precompute a teacher's top-k next-token probabilities for training samples 0..samples-1
    (default: every sample `train.max_steps` steps of one process read) into a safetensors file
    for `distill.teacher=file`. `teacher`: another decoder (name or path) sharing the decoder's
    tokenizer; default the base decoder itself."""
    from .trainer import Trainer  # the trainer builds the samples; it imports this module

    cfg.distill.kl_coef = cfg.distill.kl_coef or 1.0
    cfg.distill.teacher = "online"  # builds samples with the teacher's context prefix
    trainer = Trainer(cfg, progress=progress)
    model = trainer.unwrapped
    if teacher is not None:
        from ..model.loading import load_decoder

        model = load_decoder(teacher, dtype=cfg.model.dtype)[0].to(trainer.acc.device)
        if model.config.vocab_size != trainer.unwrapped.decoder.config.vocab_size:
            raise ValueError(f"--teacher {teacher}: vocabulary {model.config.vocab_size} differs from the decoder's")
    model.eval()
    t = cfg.train
    n = samples or t.max_steps * t.batch_size * t.grad_accum
    bs = batch_size or t.eval_batch_size or t.batch_size
    ids_out, probs_out = [], []
    for start in tqdm(range(0, n, bs), desc="teacher", disable=not progress, dynamic_ncols=True):
        batch = trainer._to_device(trainer.collate([trainer.data.train[i] for i in range(start, min(n, start + bs))]))
        with trainer.acc.autocast():
            ids, probs = teacher_topk(model, batch, cfg.distill.topk, cfg.distill.temperature)
        ids_out.append(ids.cpu())
        probs_out.append(probs.cpu())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": TeacherFile.FORMAT,
        "data": sample_data_hash(cfg, 0),
        "first_index": "0",
        "k": str(cfg.distill.topk),
        "temperature": str(cfg.distill.temperature),
        "teacher": teacher or cfg.model.decoder,
    }
    save_file({"topk_ids": torch.cat(ids_out), "topk_probs": torch.cat(probs_out)}, str(path), metadata=meta)
    return path
