"""The order of the training data and the learning-rate schedule: both functions of the step alone,
so a checkpoint's data position and learning rate are just its step."""

from __future__ import annotations

import math

import torch


class GlobalBatchSampler(torch.utils.data.Sampler):
    """Yields this process's micro-batches of global sample indices from `start_step` on."""

    def __init__(self, start_step: int, max_steps: int, batch_size: int, grad_accum: int, world: int, rank: int):
        self.start, self.stop = start_step, max_steps
        self.b, self.accum, self.world, self.rank = batch_size, grad_accum, world, rank

    @property
    def global_batch(self) -> int:
        return self.b * self.accum * self.world

    def __iter__(self):
        for step in range(self.start, self.stop):
            for a in range(self.accum):
                base = step * self.global_batch + (a * self.world + self.rank) * self.b
                yield list(range(base, base + self.b))

    def __len__(self) -> int:
        return (self.stop - self.start) * self.accum


def lr_lambda(warmup: int, max_steps: int, min_ratio: float):
    """Linear warmup, then cosine decay to `min_ratio` of the peak."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, max_steps - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f
