"""One config system for training: a dataclass tree, loaded from YAML, with dotted `key=value`
overrides from the command line. Types are checked; an unknown key is an error (with a guess)."""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..data.config import DataConfig


@dataclass
class TinyConfig:
    """Random tiny models for tests and the CPU recipe (`model.decoder: tiny`, `model.encoder: tiny`).
    A frozen random decoder is a fair test bed: it knows nothing, so all that is learnt is in the adapter."""

    vocab_size: int | None = None  # default: what the data needs (synthetic task or byte tokenizer)
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 4
    intermediate_size: int = 128
    init_std: float = 0.2  # large enough that the frozen random LM head can express a confident answer
    max_positions: int = 2048
    encoder_hidden_size: int = 64
    encoder_layers: int = 2
    encoder_heads: int = 4
    encoder_dropout: float = 0.0
    tie_word_embeddings: bool = False  # as SmolLM2 and Gemma 3 do (the decoder-derived encoder then shares the table)
    seed: int = 0


@dataclass
class ModelConfig:
    decoder: str = "smollm2-135m"  # asset name, HF folder, GGUF file, or `tiny`
    encoder: str | None = "minilm-l6"  # asset name, HF folder, `tiny`, or `decoder` (decoder-derived encoder)
    chunk_size: int = 256
    cross_attn_init: str = "copy"
    cross_attn_layers: str | list[int] = "all"
    cross_attn_num_kv_heads: int | None = None
    encoder_num_layers: int = 4  # decoder-derived encoder depth
    # "embeddings": keep the encoder's (large, generic) embeddings frozen and unsaved; "all": train only the
    # cross-attention. Frozen parts load from the base encoder; the adapter's config records the setting.
    encoder_frozen: str | None = None
    dtype: str = "float32"  # decoder weights: float32 or bfloat16 (bfloat16 needs train.precision=bf16)
    attn_implementation: str | None = None  # e.g. sdpa, eager, flash_attention_2
    init_adapter: str | None = None  # start from a trained adapter folder (e.g. the previous stage)
    # train with top-k cross-attention (each token reads its k best context tokens); the adapter's
    # config records it, so it also runs that way by default
    cross_attn_topk: int | None = None
    tiny: TinyConfig = field(default_factory=TinyConfig)


@dataclass
class TrainConfig:
    max_steps: int = 100
    batch_size: int = 8  # per process and micro-step; global batch = batch_size x grad_accum x processes
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1  # cosine decays to lr x min_lr_ratio
    # lr factor for the cross-attention layers that `model.init_adapter` lacks (an adapter grown by
    # this run: at the trained layers' lr the new ones disturb them at once, docs/results.md stage 9)
    grown_lr_scale: float = 1.0
    max_grad_norm: float = 1.0
    precision: str = "fp32"  # fp32 or bf16 (autocast; trainable weights stay fp32)
    gradient_checkpointing: bool = False  # the decoder's layers
    encoder_checkpointing: bool = False  # the encoder's layers: their activations grow with the context
    freeze_encoder: bool = False  # deprecated: model.encoder_frozen=all
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate only at the end
    eval_samples: int = 64
    # loss weight of copy/lookup/label answers: per row, together `task_weight` x the row's other
    # labelled tokens (0: a plain token mean; `cepe.training.losses.task_weights`)
    task_weight: float = 0.0
    eval_batch_size: int | None = None
    save_every: int = 0  # 0: no intermediate checkpoints
    keep_checkpoints: int = 2
    resume: str = "auto"  # auto (latest compatible checkpoint), none, or a checkpoint folder
    peak_tflops: float | None = None  # the hardware's peak, to report model FLOPs utilisation
    cpu_threads: int | None = None  # torch CPU threads (1 is fastest for tiny models on a busy CPU)


@dataclass
class DistillConfig:
    """CEPE-Distilled: loss = lm_coef * CE + kl_coef * KL(teacher || student) on decoder positions."""

    lm_coef: float = 1.0
    kl_coef: float = 0.0  # 0: no distillation
    temperature: float = 1.0
    teacher: str = "online"  # online (the frozen base decoder) or file (precomputed top-k)
    teacher_file: str | None = None
    teacher_context_tokens: int | None = None  # context tail the teacher reads (default: what fits its window)
    topk: int = 32  # top-k kept when writing a teacher file
    answers: bool = True  # KL on the tasks' answers too; false: on ordinary text only (losses.distilled_positions)


@dataclass
class RunConfig:
    output_dir: str = "runs/cepe"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def validate(self) -> None:
        self.data.validate()
        t, d, m = self.train, self.distill, self.model
        if t.precision not in ("fp32", "bf16"):
            raise ValueError(f"train.precision must be fp32 or bf16, got {t.precision!r}")
        if m.dtype not in ("float32", "bfloat16", "fp32", "bf16"):
            raise ValueError(f"model.dtype must be float32 or bfloat16, got {m.dtype!r}")
        from ..model.loading import dtype_name

        m.dtype = dtype_name(m.dtype)  # fp32 / bf16: the old spellings, with a FutureWarning
        if t.freeze_encoder:
            # the model owns encoder trainability (recorded in the adapter's config); the old key maps onto it
            warnings.warn(
                "train.freeze_encoder is deprecated: use model.encoder_frozen=all", FutureWarning, stacklevel=2
            )
            m.encoder_frozen, t.freeze_encoder = "all", False
        if m.encoder_frozen not in (None, "embeddings", "all"):
            raise ValueError(f"model.encoder_frozen must be null, embeddings or all, got {m.encoder_frozen!r}")
        if m.dtype == "bfloat16" and t.precision != "bf16":
            raise ValueError("model.dtype=bfloat16 needs train.precision=bf16")
        for name in ("max_steps", "batch_size", "grad_accum", "eval_samples"):
            if getattr(t, name) < 1:
                raise ValueError(f"train.{name} must be at least 1, got {getattr(t, name)}")
        if d.teacher not in ("online", "file"):
            raise ValueError(f"distill.teacher must be online or file, got {d.teacher!r}")
        if d.kl_coef < 0 or d.lm_coef < 0 or d.kl_coef + d.lm_coef <= 0:
            raise ValueError(f"distill: lm_coef ({d.lm_coef}) and kl_coef ({d.kl_coef}) must be >= 0, not both 0")
        if d.kl_coef > 0 and d.teacher == "file" and not d.teacher_file:
            raise ValueError("distill.teacher=file needs distill.teacher_file")

    @property
    def distilling(self) -> bool:
        return self.distill.kl_coef > 0


# fields that do not change what is trained: a checkpoint stays valid when they change
RUNTIME_KEYS = {
    "output_dir", "train.resume", "train.log_every", "train.eval_every", "train.eval_samples", "train.eval_batch_size",
    "train.save_every", "train.keep_checkpoints", "train.peak_tflops", "train.cpu_threads", "data.num_workers",
    "data.cache_dir",
}


# ---------------------------------------------------------------------------------------------- loading
def _fail(where: str, msg: str) -> None:
    raise ValueError(f"{where}: {msg}")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        arms = typing.get_args(tp)
        if value is None:
            if type(None) in arms:
                return None
            _fail(where, "may not be null")
        errors = []
        for arm in arms:
            if arm is type(None):
                continue
            try:
                return _coerce(value, arm, where)
            except ValueError as e:
                errors.append(str(e))
        _fail(where, f"{value!r} fits none of {tp}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            _fail(where, f"expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, where)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            value = [value]  # `data.train=path` means one path
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _, item = typing.get_args(tp)
        if not isinstance(value, dict):
            _fail(where, f"expected a mapping, got {value!r}")
        return {str(k): _coerce(v, item, f"{where}.{k}") for k, v in value.items()}
    if value is None:
        _fail(where, "may not be null")
    if tp is bool:
        if isinstance(value, bool):
            return value
        _fail(where, f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        _fail(where, f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML reads `1e-4` as a string
            except ValueError:
                pass
        _fail(where, f"expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        _fail(where, f"expected a string, got {value!r}")
    return value


def from_dict(cls: type, data: dict, where: str = "config") -> Any:
    """Build dataclass `cls` from a (nested) dict, checking keys and types."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where != "config" else key
        if key not in names:
            guess = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {guess[0]!r}?)" if guess else f" (known: {', '.join(names)})"
            raise ValueError(f"unknown config key {path!r}{hint}")
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        elif not isinstance(nxt, dict):
            raise ValueError(f"override {key}: {p} is not a section")
        node = nxt
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ValueError(f"override {text!r}: expected key=value (e.g. train.max_steps=100)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ValueError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """YAML file (optional) + `key=value` overrides -> a checked `RunConfig`.

    A bare `max_steps=` is short for `train.max_steps=` (the one key people change most)."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML ({e})") from e
        if not isinstance(tree, dict):
            raise ValueError(f"{path}: expected a mapping at the top level")
    for text in overrides:
        key, value = parse_override(text)
        if key == "max_steps":
            key = "train.max_steps"
        _set_dotted(tree, key, value)
    try:
        cfg = from_dict(RunConfig, tree)
    except ValueError as e:
        raise ValueError(f"{path or 'config'}: {e}") from None
    cfg.validate()
    return cfg


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k != "mixture":
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def training_view(cfg: RunConfig | dict) -> dict[str, Any]:
    """The flat config without runtime-only keys: what a checkpoint must agree with."""
    tree = to_dict(cfg) if not isinstance(cfg, dict) else cfg
    view = {k: v for k, v in _flatten(tree).items() if k not in RUNTIME_KEYS}
    # one spelling per value, hashed as spelled before #13, so earlier checkpoints still resume
    if "model.dtype" in view:
        view["model.dtype"] = {"float32": "fp32", "bfloat16": "bf16"}.get(view["model.dtype"], view["model.dtype"])
    if "model.encoder" in view and view["model.encoder"] in ("decoder", "none", "null", "None", ""):
        view["model.encoder"] = None
    if view.get("train.freeze_encoder"):  # the old key for model.encoder_frozen=all
        view["model.encoder_frozen"], view["train.freeze_encoder"] = "all", False
    return view


def training_config_hash(cfg: RunConfig | dict) -> str:
    """Hash of what a checkpoint must agree with (`training_view`); saved as `fingerprint`."""
    return hashlib.sha256(json.dumps(training_view(cfg), sort_keys=True, default=str).encode()).hexdigest()[:16]


fingerprint = training_config_hash  # the old name


def config_diff(a: RunConfig | dict, b: RunConfig | dict) -> list[str]:
    fa, fb = training_view(a), training_view(b)
    return [f"{k}: {fa.get(k)!r} -> {fb.get(k)!r}" for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
