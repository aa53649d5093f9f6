"""Context chunking and the encoded-context object that can be reused across prompts and processes."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import load_file, save_file
from safetensors.torch import save as st_save

from .cross_cache import CrossAttentionCache


EIGHT_BIT = ("int8", "fp8")
FLOAT_FORMATS = ("float32", "bfloat16", "float16")


def _pack_states(h: torch.Tensor, state_format: str | None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """States (B, S, He) -> the tensors and metadata a context file holds for them in `state_format`
    (None: as they are; a float format: cast; int8/fp8: 8-bit data and one float32 scale per token,
    `stored_states.quantize_states`). `_unpack_states` reads them back."""
    if state_format is None:
        return {"hidden_states": h}, {}
    if state_format in EIGHT_BIT:
        from .stored_states import quantize_states

        q = quantize_states(h, state_format)
        return ({"hidden_states": q.data, "hidden_scale": q.scale},
                {"state_format": state_format, "dtype": str(h.dtype).removeprefix("torch.")})
    if state_format not in FLOAT_FORMATS:
        raise ValueError(f"state_format must be None, float32, bfloat16, float16, int8 or fp8, got {state_format!r}")
    return {"hidden_states": h.to(getattr(torch, state_format))}, {}


def _unpack_states(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> torch.Tensor:
    """`_pack_states`'s tensors and metadata -> the states; 8-bit ones back in the dtype they came from.
    Raises ValueError for an unknown format or dtype."""
    fmt = meta.get("state_format")
    if fmt is None:
        return tensors["hidden_states"]
    if fmt not in EIGHT_BIT:
        raise ValueError(f"unknown state format {fmt!r}")
    dtype = getattr(torch, meta.get("dtype", "float32"), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype {meta.get('dtype')!r}")
    from .stored_states import QuantizedStates

    return QuantizedStates(tensors["hidden_states"], tensors["hidden_scale"], fmt, dtype).dequantize()


def chunk_token_ids(
    documents: list[list[int]],
    chunk_size: int,
    pad_id: int,
    prefix: list[int] = (),
    suffix: list[int] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split each document into chunks of `chunk_size` tokens (chunks never span two documents).

    `prefix`/`suffix` are special tokens an encoder expects around each chunk (e.g. BERT's
    [CLS]/[SEP]). Returns `input_ids` and `attention_mask`, each (n_chunks, chunk_len) with
    chunk_len = len(prefix) + chunk_size + len(suffix) (shorter chunks padded with `pad_id`).
    """
    chunks = []
    for doc in documents:
        for start in range(0, len(doc), chunk_size):
            chunks.append(list(prefix) + list(doc[start : start + chunk_size]) + list(suffix))
    width = len(prefix) + chunk_size + len(suffix)
    ids = torch.full((len(chunks), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(chunks), width), dtype=torch.long)
    for i, c in enumerate(chunks):
        ids[i, : len(c)] = torch.tensor(c, dtype=torch.long)
        mask[i, : len(c)] = 1
    return ids, mask


def pad_chunk_batch(
    per_example: list[tuple[torch.Tensor, torch.Tensor]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack per-example (n_i, L) chunk tensors into (B, max n_i, L); missing chunks are all padding."""
    width = max((ids.shape[1] for ids, _ in per_example), default=1)
    n = max((ids.shape[0] for ids, _ in per_example), default=0)
    n = max(n, 1)
    ids_out = torch.full((len(per_example), n, width), pad_id, dtype=torch.long)
    mask_out = torch.zeros((len(per_example), n, width), dtype=torch.long)
    for b, (ids, mask) in enumerate(per_example):
        ids_out[b, : ids.shape[0], : ids.shape[1]] = ids
        mask_out[b, : mask.shape[0], : mask.shape[1]] = mask
    return ids_out, mask_out


def chunk_specials(tokenizer, encoder_type: str) -> tuple[list[int], list[int], int]:
    """What an encoder expects around each chunk: prefix ids, suffix ids, padding id. A Hugging
    Face encoder with [CLS] / [SEP] gets them; the decoder-derived encoder gets none."""
    tok = tokenizer
    if encoder_type == "hf" and tok is not None and tok.cls_token_id is not None and tok.sep_token_id is not None:
        return [tok.cls_token_id], [tok.sep_token_id], tok.pad_token_id or 0
    pad = getattr(tok, "pad_token_id", None) if tok is not None else None
    return [], [], pad if pad is not None else 0


def tokenize_documents(
    batch: list[list[str] | list[list[int]]], tokenizer, chunk_size: int, specials: tuple[list[int], list[int], int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """One list of documents per example -> chunk ids and mask (B, N, L). Documents are strings
    (tokenized with the encoder's `tokenizer`) or lists of token ids; each is chunked on its own,
    empty ones are dropped, and examples with fewer chunks are padded with empty chunks."""
    prefix, suffix, pad_id = specials
    per_example = []
    for docs in batch:
        token_docs = []
        for doc in docs:
            if isinstance(doc, str):
                if tokenizer is None:
                    raise ValueError("string context needs an encoder tokenizer (pass encoder_tokenizer=)")
                token_docs.append(tokenizer(doc, add_special_tokens=False)["input_ids"])
            else:
                token_docs.append([int(t) for t in doc])
        per_example.append(chunk_token_ids([d for d in token_docs if d], chunk_size, pad_id, prefix, suffix))
    return pad_chunk_batch(per_example, pad_id)


@dataclass
class ContextStates:
    """Encoder outputs for a batch of contexts, ready for cross-attention.

    hidden_states: (B, S, He) with S = n_chunks * chunk_len (chunks laid end to end).
    attention_mask: (B, S) bool, True for real tokens.
    encoder_hash: hash of the encoder (weights, type, chunk size) that produced the states
        (`CepeForCausalLM.encoder_hash`); a model refuses states from another encoder. Saved as
        the context file's `fingerprint` metadata.
        states from another encoder.
    cross_cache: what cross-attention derived from these states (`CrossAttentionCache`: keys/values
        under the `cache` policy, key mask, logit scale); not saved.
    parent: the context this one repeats (`expand_to`): its keys/values are projected once there.
    """

    hidden_states: torch.Tensor
    attention_mask: torch.Tensor
    encoder_hash: str | None = None
    cross_cache: CrossAttentionCache = field(default_factory=CrossAttentionCache, repr=False, compare=False)
    parent: ContextStates | None = field(default=None, repr=False, compare=False)

    @property
    def batch_size(self) -> int:
        return self.hidden_states.shape[0]

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    @property
    def fingerprint(self) -> str | None:
        """Old name of `encoder_hash`."""
        return self.encoder_hash

    def nbytes(self) -> int:
        """Bytes held: states, mask, and whatever the model cached for them (`cross_cache`). A
        broadcast view (stride 0 over the batch: `expand_to` of one example) holds none of its own."""
        tensors = (self.hidden_states, self.attention_mask)
        own = sum(t.numel() * t.element_size() for t in tensors if t.shape[0] == 1 or t.stride(0) != 0)
        return own + self.cross_cache.nbytes()

    def expanded(self, batch_size: int) -> ContextStates:
        """`expand_to(batch_size)`, kept in `cross_cache`: the expansion's cached keys/values
        survive from one decoding step to the next."""
        if batch_size == self.batch_size:
            return self
        return self.cross_cache.expansion(batch_size, lambda: self.expand_to(batch_size))

    def to(self, *args, **kwargs) -> ContextStates:
        h = self.hidden_states.to(*args, **kwargs)
        return ContextStates(h, self.attention_mask.to(h.device), self.encoder_hash)

    def expand_to(self, batch_size: int) -> ContextStates:
        """Repeat each example's context for `batch_size // B` consecutive rows (beams, samples,
        or one document shared by many prompts); one example is repeated as a broadcast view."""
        b = self.batch_size
        if b == batch_size:
            return self
        if batch_size % b:
            raise ValueError(f"context batch {b} does not divide input batch {batch_size}")
        r = batch_size // b
        if b == 1:  # a view, no copy: the model reads an expansion's states through its parent
            states, mask = self.hidden_states.expand(r, -1, -1), self.attention_mask.expand(r, -1)
        else:
            states = self.hidden_states.repeat_interleave(r, dim=0)
            mask = self.attention_mask.repeat_interleave(r, dim=0)
        # cached cross keys/values are computed once on the parent and repeated
        return ContextStates(states, mask, self.encoder_hash, parent=self)

    @staticmethod
    def concat(parts: list[ContextStates]) -> ContextStates:
        """Join several single-example contexts (e.g. stored documents) into one example's context."""
        if not parts:
            raise ValueError("no context to concatenate")
        fps = {p.encoder_hash for p in parts}
        if len(fps) > 1:
            raise ValueError(f"contexts come from different encoders: {sorted(map(str, fps))}")
        if any(p.batch_size != 1 for p in parts):
            raise ValueError("concat joins single-example contexts")
        return ContextStates(
            torch.cat([p.hidden_states for p in parts], dim=1),
            torch.cat([p.attention_mask for p in parts], dim=1),
            parts[0].encoder_hash,
        )

    @staticmethod
    def stack_padded(rows: list[ContextStates | None], device=None) -> ContextStates | None:
        """Single-example contexts (1, S_i, He), one per row (None: a row without context), right-padded
        into one (B, max S_i, He) batch on `device` (default: the first context's). A row without
        context keeps an all-padding mask, so its cross-attention adds nothing; no context at all: None."""
        present = [c for c in rows if c is not None]
        if not present:
            return None
        ref = present[0].hidden_states
        device = ref.device if device is None else device
        width = max(c.hidden_states.shape[1] for c in present)
        hidden = torch.zeros((len(rows), width, ref.shape[-1]), dtype=ref.dtype, device=device)
        mask = torch.zeros((len(rows), width), dtype=torch.bool, device=device)
        for i, c in enumerate(rows):
            if c is not None:
                s = c.hidden_states.shape[1]
                hidden[i, :s] = c.hidden_states[0].to(device)
                mask[i, :s] = c.attention_mask[0].to(device)
        return ContextStates(hidden, mask, present[0].encoder_hash)

    def _tensors(self, state_format: str | None) -> tuple[dict, dict]:
        """(tensors on the CPU, metadata) as `save` and `to_bytes` write them."""
        meta = {"format": "cepe-context", "fingerprint": self.encoder_hash or "", "batch_size": str(self.batch_size)}
        h, m = self.hidden_states.detach(), self.attention_mask
        if self.batch_size == 1:  # padding carries nothing: drop it
            h, m = h[:, m[0]], m[:, m[0]]
        packed, extra = _pack_states(h, state_format)
        tensors = {name: t.contiguous().cpu() for name, t in packed.items()}
        tensors["attention_mask"] = m.to(torch.uint8).contiguous().cpu()
        return tensors, {**meta, **extra}

    def save(self, path: str | Path, state_format: str | None = None) -> None:
        """Write to one safetensors file (only real tokens are kept). state_format: None keeps the
        states' dtype; "float32" / "bfloat16" / "float16" cast them; "int8" / "fp8" store 8 bits
        per value with one float32 scale per token (`stored_states.quantize_states`: half of bf16),
        restored to the states' dtype by `load`."""
        tensors, meta = self._tensors(state_format)
        save_file(tensors, str(path), metadata=meta)

    def to_bytes(self, state_format: str | None = None) -> bytes:
        """What `save` writes, as bytes (e.g. to cross a pipe); `from_bytes` reads them."""
        tensors, meta = self._tensors(state_format)
        return st_save(tensors, metadata=meta)

    @classmethod
    def from_bytes(cls, blob: bytes, device: str | torch.device = "cpu") -> ContextStates:
        """`to_bytes`'s inverse. Raises ValueError for anything else."""
        try:
            (n,) = struct.unpack("<Q", blob[:8])
            meta = json.loads(blob[8:8 + n]).get("__metadata__") or {}
            tensors = {k: t.to(device) for k, t in st_load(blob).items()}
        except (SafetensorError, struct.error, ValueError, UnicodeDecodeError, AttributeError) as e:
            raise ValueError(f"not a readable context ({e})") from None
        return cls._from_tensors(tensors, meta, "bytes")

    @classmethod
    def _from_tensors(cls, tensors: dict, meta: dict, where: str) -> ContextStates:
        names = {"hidden_states", "attention_mask"} | ({"hidden_scale"} if meta.get("state_format") in EIGHT_BIT
                                                        else set())
        if meta.get("format") != "cepe-context" or set(tensors) != names:
            raise ValueError(f"{where}: not a CEPE context file")
        try:
            hidden = _unpack_states(tensors, meta)
        except ValueError as e:
            raise ValueError(f"{where}: not a CEPE context file ({e})") from None
        return cls(hidden, tensors["attention_mask"].bool(), meta.get("fingerprint") or None)

    def stored_as(self, state_format: str | None) -> ContextStates:
        """The values `save(..., state_format)` then `load` would give back, in these states' own dtype
        and on their device, without a file (padding kept): what storing them in that format costs."""
        if state_format is None:
            return self
        h = _unpack_states(*_pack_states(self.hidden_states.detach(), state_format))
        return ContextStates(h.to(self.hidden_states.dtype), self.attention_mask, self.encoder_hash)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> ContextStates:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no context file at {path}")
        try:
            tensors = load_file(str(path), device=str(device))
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
        except (SafetensorError, OSError, RuntimeError, json.JSONDecodeError) as e:
            if not path.exists():  # removed meanwhile (safetensors says so with a RuntimeError)
                raise FileNotFoundError(f"context file {path} was removed while being read") from e
            if isinstance(e, RuntimeError) and not isinstance(e, SafetensorError):
                raise  # not the file's fault (e.g. device memory)
            raise ValueError(f"{path}: not a readable context file ({e})") from e
        return cls._from_tensors(tensors, meta, str(path))
