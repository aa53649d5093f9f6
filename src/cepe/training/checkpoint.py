"""Training checkpoints: written atomically, verified on load.

A checkpoint is a folder `checkpoints/step_00000100/`:
    adapter.safetensors      trainable weights (encoder, cross-attention)
    optimizer.safetensors    optimizer state: its tensors (`state/<param>/<name>`, `group/<i>/<name>`)
    optimizer.json           ... and everything else in it (param groups, non-tensor state)
    scheduler.json           LR scheduler state
    rng_rank{r}.safetensors  each process's torch (and CUDA) RNG state
    trainer_state.json       step, counters, world size, the config and its fingerprint
    manifest.json            sha256 of every file above
It is written to `.tmp-step_...` and renamed when complete, so a run killed mid-save leaves the
previous checkpoint intact; a checkpoint whose files do not match the manifest is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import config_diff, training_config_hash

PREFIX = "step_"


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of interrupted saves are ignored)."""
    d = checkpoints_dir(run_dir)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def tmp_dir(run_dir: str | Path, step: int) -> Path:
    return checkpoints_dir(run_dir) / f".tmp-{PREFIX}{step:08d}"


def rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def write_rng(tmp: Path, rank: int) -> None:
    """Each process writes its own RNG state into the checkpoint being assembled."""
    save_file(rng_state(), str(tmp / f"rng_rank{rank}.safetensors"))


def finalize(
    tmp: Path,
    final: Path,
    adapter: dict[str, torch.Tensor],
    optimizer: dict,
    scheduler: dict,
    trainer_state: dict,
    keep: int,
) -> Path:
    """Main process: write the rest, the manifest, fsync, rename; then drop old checkpoints."""
    save_file({k: v.detach().contiguous().cpu() for k, v in adapter.items()}, str(tmp / "adapter.safetensors"))
    tensors, meta = _flatten_optimizer(optimizer)
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "optimizer.json").write_text(json.dumps(meta))
    (tmp / "scheduler.json").write_text(json.dumps(scheduler))
    (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1, default=str))
    files = sorted(p.name for p in tmp.iterdir())
    (tmp / "manifest.json").write_text(json.dumps({name: _sha256(tmp / name) for name in files}, indent=1))
    for name in files + ["manifest.json"]:
        with open(tmp / name, "rb") as f:
            os.fsync(f.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(final.parent.parent)[:-keep] if keep > 0 else []:  # final: RUN/checkpoints/step_N
        shutil.rmtree(old, ignore_errors=True)
    return final


def verify(path: Path) -> dict[str, Any]:
    """Check every file against the manifest; return the trainer state."""
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise ValueError(f"{manifest_path}: missing; {path} is not a complete checkpoint")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{manifest_path}: corrupted ({e})") from e
    for name, digest in manifest.items():
        f = path / name
        if not f.is_file():
            raise ValueError(f"{f}: missing from checkpoint {path}")
        if _sha256(f) != digest:
            raise ValueError(f"{f}: corrupted (checksum does not match {manifest_path.name})")
    return json.loads((path / "trainer_state.json").read_text())


def check_compatible(path: Path, state: dict, config: dict, world_size: int) -> None:
    """Refuse a checkpoint written by another config (listing what differs) or process count."""
    if state.get("fingerprint") != training_config_hash(config):
        diff = config_diff(state.get("config", {}), config)
        raise ValueError(
            f"{path / 'trainer_state.json'}: checkpoint was written by another config "
            f"({'; '.join(diff[:6]) or 'fingerprint differs'}); use a new output_dir, or the same config"
        )
    if state.get("world_size") != world_size:
        raise ValueError(
            f"{path / 'trainer_state.json'}: written by {state.get('world_size')} processes, resuming with "
            f"{world_size}; resume with the same number (the data order depends on it)"
        )


def load(path: Path, rank: int) -> dict[str, Any]:
    """Load a verified checkpoint's parts (tensors on CPU)."""
    try:
        adapter = load_file(str(path / "adapter.safetensors"))
        rng_path = path / f"rng_rank{rank}.safetensors"
        rng = load_file(str(rng_path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: unreadable checkpoint file ({e})") from e
    if (path / "optimizer.pt").is_file() and not (path / "optimizer.safetensors").is_file():
        raise ValueError(f"{path}: written by an older cepe (a pickled optimizer.pt); it cannot be resumed, "
                         f"but its weights can start a new run: model.init_adapter=<its adapter>")
    try:
        optimizer = _unflatten_optimizer(load_file(str(path / "optimizer.safetensors")),
                                         json.loads((path / "optimizer.json").read_text()))
    except (SafetensorError, OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable optimizer state ({e})") from e
    scheduler = json.loads((path / "scheduler.json").read_text())
    return {"adapter": adapter, "optimizer": optimizer, "scheduler": scheduler, "rng": rng}


def _flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer state dict -> (its tensors by flat name, the rest as JSON-able data): safetensors
    holds the tensors, so a checkpoint never needs pickle."""
    tensors: dict[str, torch.Tensor] = {}

    def split(entry: dict, prefix: str) -> dict:  # tensors out under prefix/name; the rest returned
        rest = {}
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}/{name}"] = value.detach().contiguous().cpu()
            else:
                rest[name] = value
        return rest

    state = {str(key): split(entry, f"state/{key}") for key, entry in state_dict["state"].items()}
    groups = [split(group, f"group/{i}") for i, group in enumerate(state_dict["param_groups"])]
    # plain optimizers key their state by parameter index, distributed state dicts by parameter name
    int_keys = all(isinstance(k, int) for k in state_dict["state"])
    return tensors, {"int_keys": int_keys, "state": state, "param_groups": groups}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """The inverse of `_flatten_optimizer`."""
    state = {k: dict(v) for k, v in meta["state"].items()}
    groups = [dict(g) for g in meta["param_groups"]]
    for flat, value in tensors.items():
        kind, rest = flat.split("/", 1)
        owner, name = rest.rsplit("/", 1)
        if kind == "state":
            state.setdefault(owner, {})[name] = value
        else:
            groups[int(owner)][name] = value
    if meta["int_keys"]:
        state = {int(k): v for k, v in state.items()}
    return {"state": state, "param_groups": groups}
