"""A synthetic task whose answers exist only in the context: key-value recall.

Each example draws `num_facts` distinct keys and a random value for each. The context (encoder
side) lists the facts as `key value` token pairs; the decoder reads `QUERY key` and must predict
that key's value. The mapping is redrawn for every example, so nothing can be memorised: without
the context the best possible accuracy is chance (1 / num_values).

Token ids (no tokenizer needed): 0 pad, 1 bos, 2 QUERY, then `num_keys` key ids, then
`num_values` value ids; `vocab_size` must cover them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PAD, BOS, QUERY = 0, 1, 2
FIRST_KEY = 3


@dataclass
class SyntheticConfig:
    num_keys: int = 64
    num_values: int = 16
    num_facts: int = 16  # facts per example (in the context)
    num_queries: int = 1  # queried facts per example (each adds `QUERY key value` to the decoder)


def vocab_needed(cfg: SyntheticConfig) -> int:
    return FIRST_KEY + cfg.num_keys + cfg.num_values


def value_ids(cfg: SyntheticConfig) -> np.ndarray:
    return np.arange(FIRST_KEY + cfg.num_keys, FIRST_KEY + cfg.num_keys + cfg.num_values)


def make_example(cfg: SyntheticConfig, rng: np.random.Generator) -> dict:
    """One example: `context` (2 * num_facts,) encoder ids, `input_ids` (3 * num_queries,) decoder
    ids and `labels` (same shape, -100 except on the value tokens)."""
    if cfg.num_facts > cfg.num_keys:
        raise ValueError(f"synthetic: num_facts {cfg.num_facts} > num_keys {cfg.num_keys}")
    if cfg.num_queries > cfg.num_facts:
        raise ValueError(f"synthetic: num_queries {cfg.num_queries} > num_facts {cfg.num_facts}")
    keys = rng.choice(cfg.num_keys, size=cfg.num_facts, replace=False) + FIRST_KEY
    values = rng.integers(0, cfg.num_values, size=cfg.num_facts) + FIRST_KEY + cfg.num_keys
    context = np.stack([keys, values], axis=1).reshape(-1)
    asked = rng.choice(cfg.num_facts, size=cfg.num_queries, replace=False)
    input_ids = np.stack([np.full(cfg.num_queries, QUERY), keys[asked], values[asked]], axis=1).reshape(-1)
    labels = np.full_like(input_ids, -100)
    labels[2::3] = input_ids[2::3]
    return {
        "context": context.astype(np.int64),
        "input_ids": input_ids.astype(np.int64),
        "labels": labels.astype(np.int64),
    }
