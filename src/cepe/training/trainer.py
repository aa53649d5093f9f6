"""The training loop: one loop for a CPU smoke run, one GPU, or many GPUs under `accelerate launch`.

Only the adapter trains (cross-attention, and the encoder unless `model.encoder_frozen=all`); the
decoder stays frozen. Data is a stream of samples indexed by a global counter (see
`cepe.data.samples`, `schedule.GlobalBatchSampler`): process r of W at step s, micro-step a, reads samples
s*G + (a*W + r)*B ... + B-1 (G = global batch), so the global batch does not depend on how it is
split across processes and the data position of a checkpoint is just its step.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from tqdm.auto import tqdm

from ..data.pipeline import build_data
from ..data.samples import Collator
from . import checkpoint as ckpt
from .build import build_model, describe, grown_layers
from .config import RunConfig, dump_yaml, to_dict, training_config_hash
from .losses import (TeacherFile, cross_entropy, distilled_positions, kl_divergence, online_teacher_logits,
                     topk_kl_divergence)
from .metrics import (ANSWER_GROUPS, Meter, MetricsLog, answer_group, answer_texts, plot_metrics, print_table,
                      step_flops, whole_answers, whole_answers_by_group)
from .schedule import GlobalBatchSampler, lr_lambda
from .teacher import sample_data_hash, write_teacher_file  # noqa: F401 (write_teacher_file: importable from here)

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
LOAD = StateDictOptions(full_state_dict=True, strict=False)


def trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` without any name of a frozen parameter. torch's `ignore_frozen_params` drops a frozen
    tensor under the one name `named_parameters()` lists, but keeps its aliases: with a tied-embedding
    decoder and the decoder-derived encoder, `decoder.lm_head.weight` and the encoder's embedding (one
    frozen tensor) would stay, and safetensors refuses to save shared tensors."""
    frozen = {
        n.removeprefix("module.") for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad
    }
    return {k: v for k, v in state.items() if k not in frozen}


class Trainer:
    def __init__(self, cfg: RunConfig, accelerator: Accelerator | None = None, progress: bool = True):
        cfg.validate()
        self.cfg = cfg
        # cpu=True without a GPU: several CPU processes (torchrun) then join through gloo
        self.acc = accelerator or Accelerator(mixed_precision="bf16" if cfg.train.precision == "bf16" else "no",
                                              cpu=not torch.cuda.is_available())
        self.progress = progress and self.acc.is_main_process
        self.run_dir = Path(cfg.output_dir)
        t = cfg.train
        if t.cpu_threads:
            torch.set_num_threads(t.cpu_threads)
        torch.manual_seed(t.seed)
        model = build_model(cfg)  # frozen encoder parts (`model.encoder_frozen`) are frozen by the model itself
        self.params = model.adapter_parameters()
        if t.gradient_checkpointing or t.encoder_checkpointing:
            model.gradient_checkpointing_enable(decoder=t.gradient_checkpointing, encoder=t.encoder_checkpointing)
        self.description = describe(model)
        self.description["trainable_params"] = sum(p.numel() for p in self.params)

        self.teacher_tokens = 0
        self.teacher_file = None
        if cfg.distilling and cfg.distill.teacher == "online":
            window = getattr(model.decoder.config, "max_position_embeddings", 2048)
            room = window - cfg.data.decoder_tokens
            wanted = cfg.distill.teacher_context_tokens
            self.teacher_tokens = max(0, min(wanted if wanted is not None else room, room))
        self.data = build_data(cfg.data, model.tokenizer, model.encoder_tokenizer, teacher_tokens=self.teacher_tokens,
                               progress=self.progress, main_process_first=self.acc.main_process_first)
        if cfg.distilling and cfg.distill.teacher == "file":
            self.teacher_file = TeacherFile(cfg.distill.teacher_file, sample_data_hash(cfg, 0))
        # the model knows which special tokens its encoder expects around each chunk
        prefix, suffix, pad = model._chunk_specials()
        self.collate = Collator(model.config.chunk_size, prefix, suffix, pad, model.decoder.config.pad_token_id or 0)
        self.candidates = None if self.data.candidates is None else torch.as_tensor(self.data.candidates)

        if t.grown_lr_scale <= 0:
            raise ValueError(f"train.grown_lr_scale must be positive, got {t.grown_lr_scale}")
        grown = set()
        if t.grown_lr_scale != 1.0:
            grown = {id(p) for i in grown_layers(model, cfg.model.init_adapter)
                     for p in model.cross_attn[str(i)].parameters()}
        def split(params: list, lr: float) -> list[dict]:  # matrices decay, vectors do not
            return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": t.weight_decay, "lr": lr},
                    {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "lr": lr}]

        groups = split([p for p in self.params if id(p) not in grown], t.lr)
        if grown:  # only then more groups: a run without grown layers keeps the two (its checkpoints match)
            groups += split([p for p in self.params if id(p) in grown], t.lr * t.grown_lr_scale)
        optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.betas))
        schedule = lr_lambda(t.warmup_steps, t.max_steps, t.min_lr_ratio)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        self.model, self.optimizer = self.acc.prepare(model, optimizer)
        # FSDP replaces parameters by sharded ones: clip what the optimizer now holds
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]
        if self.teacher_file is not None:
            needed = t.max_steps * t.batch_size * t.grad_accum * self.acc.num_processes
            if self.teacher_file.first > 0 or self.teacher_file.rows < needed:
                raise ValueError(f"{self.teacher_file.path}: holds {self.teacher_file.rows} samples, "
                                 f"training reads {needed} "
                                 "(max_steps x global batch); write more with --teacher-samples")
        self.step = 0
        self.counters = {"samples": 0, "decoder_tokens": 0, "context_tokens": 0}
        self._eval_no_context: dict[str, float] | None = None

    # ------------------------------------------------------------------ helpers
    @property
    def unwrapped(self):
        return self.acc.unwrap_model(self.model)

    def _loader(self, start_step: int) -> torch.utils.data.DataLoader:
        t = self.cfg.train
        sampler = GlobalBatchSampler(start_step, t.max_steps, t.batch_size, t.grad_accum, self.acc.num_processes,
                                     self.acc.process_index)
        return torch.utils.data.DataLoader(
            self.data.train, batch_sampler=sampler, collate_fn=self.collate, num_workers=self.cfg.data.num_workers,
            pin_memory=self.acc.device.type == "cuda",
            # its own generator: creating the iterator must not draw from the global RNG, or a
            # resumed run's dropout would be one draw off
            generator=torch.Generator().manual_seed(self.cfg.data.seed),
        )

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.acc.device, non_blocking=True) for k, v in batch.items()}

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """lm_coef * CE (+ kl_coef * KL(teacher || student) when distilling)."""
        d = self.cfg.distill
        out = self.model(
            input_ids=batch["input_ids"], context_input_ids=batch["context_input_ids"],
            context_attention_mask=batch["context_attention_mask"], use_cache=False,
        )
        # the context is an argument of the student's forward, so the teacher may run after it
        online = self.cfg.distilling and self.teacher_file is None
        teacher = online_teacher_logits(self.model, batch) if online else None
        ce, _ = cross_entropy(out.logits, batch["labels"], batch.get("task_mask"), self.cfg.train.task_weight)
        parts = {"ce": ce.detach()}
        loss = d.lm_coef * ce
        if self.cfg.distilling:
            labels = distilled_positions(batch["labels"], batch.get("task_mask"), d.answers)
            if teacher is None:
                ids, probs = self.teacher_file.lookup(batch["index"].cpu())
                dev = out.logits.device
                kl = topk_kl_divergence(out.logits, ids.to(dev), probs.to(dev), labels, d.temperature)
            else:
                kl = kl_divergence(out.logits, teacher, labels, d.temperature)
            parts["kl"] = kl.detach()
            loss = loss + d.kl_coef * kl
        return loss, parts

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> None:
        acc = self.acc
        tmp = ckpt.tmp_dir(self.run_dir, self.step)
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        ckpt.write_rng(tmp, acc.process_index)
        adapter = trainable_state(self.model, get_model_state_dict(self.model, options=FULL))  # collective under FSDP
        optim = get_optimizer_state_dict(self.model, self.optimizer.optimizer, options=FULL)
        acc.wait_for_everyone()
        if acc.is_main_process:
            state = {"step": self.step, "counters": self.counters, "world_size": acc.num_processes,
                     "fingerprint": training_config_hash(self.cfg), "config": to_dict(self.cfg)}
            final = ckpt.checkpoints_dir(self.run_dir) / f"{ckpt.PREFIX}{self.step:08d}"
            keep = self.cfg.train.keep_checkpoints
            ckpt.finalize(tmp, final, adapter, optim, self.scheduler.state_dict(), state, keep)
        acc.wait_for_everyone()

    def _resume_from(self) -> Path | None:
        mode = self.cfg.train.resume
        found = ckpt.list_checkpoints(self.run_dir)
        if mode == "none":
            if found:
                raise ValueError(
                    f"{found[-1]}: output_dir already has checkpoints; use a new output_dir or train.resume=auto"
                )
            return None
        if mode == "auto":
            return found[-1] if found else None
        path = Path(mode)
        if not path.is_dir():
            raise FileNotFoundError(f"train.resume: checkpoint folder {path} does not exist")
        return path

    def maybe_resume(self) -> None:
        path = self._resume_from()
        if path is None:
            return
        state = ckpt.verify(path)
        ckpt.check_compatible(path, state, to_dict(self.cfg), self.acc.num_processes)
        parts = ckpt.load(path, self.acc.process_index)
        set_model_state_dict(self.model, parts["adapter"], options=LOAD)
        set_optimizer_state_dict(self.model, self.optimizer.optimizer, parts["optimizer"], options=LOAD)
        self.scheduler.load_state_dict(parts["scheduler"])
        ckpt.set_rng_state(parts["rng"])
        self.step = int(state["step"])
        self.counters = dict(state["counters"])
        if self.progress:
            tqdm.write(f"resumed from {path} at step {self.step}")

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, shown: list[dict] | None = None) -> dict[str, float]:
        """Held-out perplexity and next-token accuracy, with the context and without it (the
        frozen base decoder alone; computed once, it cannot change). `shown`, if given, receives
        up to 2 held-out answers per kind as text, read with the context (`metrics.answer_texts`)."""
        if self.data.heldout is None:
            return {}
        t = self.cfg.train
        bs = t.eval_batch_size or t.batch_size
        # every process runs the same number of batches (wrapped models may sync on each forward):
        # eval_samples is rounded up to a multiple of the process count
        world = self.acc.num_processes
        mine = list(range(self.acc.process_index, -(-t.eval_samples // world) * world, world))
        self.model.eval()
        results = {}
        modes = (True,) if self._eval_no_context is not None else (True, False)
        for with_context in modes:
            # loss, tokens, correct; tokens and correct among the tasks' answers (copy, facts, labels);
            # answers, answers all right; loss and tokens of ordinary text (what perplexity targets read)
            sums = torch.zeros(9, dtype=torch.float64, device=self.acc.device)
            by_group = torch.zeros(len(ANSWER_GROUPS), 2, dtype=torch.float64, device=self.acc.device)
            taken = [0] * len(ANSWER_GROUPS)
            for i in range(0, len(mine), bs):
                samples = [self.data.heldout[j] for j in mine[i : i + bs]]
                groups = torch.tensor([answer_group(s) for s in samples], device=self.acc.device)
                batch = self._to_device(self.collate(samples))
                keys = ("context_input_ids", "context_attention_mask") if with_context else ()
                kwargs = {k: batch[k] for k in keys}
                logits = self.model(input_ids=batch["input_ids"], use_cache=False, **kwargs).logits[:, :-1].float()
                labels = batch["labels"][:, 1:]
                valid = labels != -100
                flat = logits.reshape(-1, logits.shape[-1])
                ce = F.cross_entropy(flat, labels.reshape(-1), ignore_index=-100, reduction="none").view_as(labels)
                sums[0] += ce.sum().double()
                sums[1] += valid.sum()
                if self.candidates is not None:
                    cand = self.candidates.to(logits.device)
                    pred = cand[logits[..., cand].argmax(-1)]
                else:
                    pred = logits.argmax(-1)
                sums[2] += ((pred == labels) & valid).sum()
                task = batch["task_mask"][:, 1:] & valid
                sums[3] += task.sum()
                sums[4] += ((pred == labels) & task).sum()
                answers, whole = whole_answers(pred == labels, task)
                sums[5] += answers
                sums[6] += whole
                by_group += whole_answers_by_group(pred == labels, task, groups)
                if shown is not None and with_context and i < 4 * bs:  # a host sync: first batches only
                    shown += answer_texts(pred, labels, task, groups, self._decode, taken)
                text = valid & ~task
                sums[7] += (ce * text).sum().double()  # a product, not a boolean index: no host sync
                sums[8] += text.sum()
            sums = self.acc.reduce(sums, reduction="sum")
            by_group = self.acc.reduce(by_group, reduction="sum")
            loss, n, correct, n_task, task_correct, answers, whole, text_loss, n_text = (float(x) for x in sums)
            tag = "with_context" if with_context else "without_context"
            results[f"loss_{tag}"] = loss / max(n, 1)
            results[f"ppl_{tag}"] = math.exp(min(loss / max(n, 1), 50))
            results[f"accuracy_{tag}"] = correct / max(n, 1)
            if n_text:
                results[f"text_loss_{tag}"] = text_loss / n_text
            if n_task:  # next-token accuracy on the answers only: does the adapter read the context?
                results[f"task_accuracy_{tag}"] = task_correct / n_task
                results[f"task_exact_{tag}"] = whole / max(answers, 1)  # = greedy exact match
                for name, (n_answers, n_whole) in zip(ANSWER_GROUPS, by_group.tolist()):
                    if n_answers:
                        results[f"task_exact_{name}_{tag}"] = n_whole / n_answers
        self.model.train()
        if self._eval_no_context is None:
            self._eval_no_context = {k: v for k, v in results.items() if k.endswith("without_context")}
        results.update(self._eval_no_context)
        return results

    # ------------------------------------------------------------------ the loop
    def fit(self, stop_after: int | None = None) -> dict[str, Any]:
        """Train to `train.max_steps` (resuming if a checkpoint is there) and write the adapter,
        `summary.json`, `metrics.jsonl` and a plot. `stop_after` ends the run early right after
        that step's checkpoint, as a kill would (for tests)."""
        t = self.cfg.train
        self._start_run()
        log = MetricsLog(self.run_dir, self.step, self.acc.is_main_process)
        meter = Meter(self.step, t.max_steps, self.counters, self.progress)
        batches = iter(self._loader(self.step))
        self.model.train()
        while self.step < t.max_steps:
            values = self.train_step(batches)
            meter.update(self.step, values, self.counters)
            if self.step % t.log_every == 0 or self.step == t.max_steps:
                log.log(self.step, values)
            if t.eval_every and self.step % t.eval_every == 0 and self.step < t.max_steps:
                self._evaluate_and_log(log, meter)
            if t.save_every and (self.step % t.save_every == 0 or self.step == t.max_steps):
                self.save_checkpoint()
            if stop_after is not None and self.step >= stop_after:
                meter.close()
                log.close()
                return {"stopped_at": self.step}
        meter.close()
        # the adapter first: the closing held-out evaluation can take an hour on a CPU, and a run
        # stopped during it keeps its result
        adapter_dir = self._save_adapter()
        summary = self._finish(self._evaluate_and_log(log), meter, adapter_dir)
        log.close()
        return summary

    def train_step(self, batches) -> dict[str, float]:
        """One optimizer step over `grad_accum` micro-batches (gradients synced on the last one):
        the step's mean loss and ce (and kl), the learning rate and the gradient norm."""
        t, acc = self.cfg.train, self.acc
        totals = torch.zeros(4, device=acc.device)  # loss, ce, kl, context tokens
        for micro in range(t.grad_accum):
            batch = self._to_device(next(batches))
            with contextlib.nullcontext() if micro == t.grad_accum - 1 else acc.no_sync(self.model):
                loss, parts = self.compute_loss(batch)
                acc.backward(loss / t.grad_accum)
            totals += torch.stack([loss.detach(), parts["ce"], parts.get("kl", torch.zeros_like(parts["ce"])),
                                   batch["context_attention_mask"].sum().float()])
        grad_norm = acc.clip_grad_norm_(self.params, t.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        totals = acc.reduce(totals, reduction="sum")
        n_micro, g = t.grad_accum * acc.num_processes, t.batch_size * t.grad_accum * acc.num_processes
        self.counters["samples"] += g
        self.counters["decoder_tokens"] += g * batch["input_ids"].shape[1]
        self.counters["context_tokens"] += int(totals[3])
        values = {"loss": float(totals[0]) / n_micro, "ce": float(totals[1]) / n_micro,
                  "lr": self.scheduler.get_last_lr()[0],
                  "grad_norm": float(grad_norm) if grad_norm is not None else float("nan")}
        if self.cfg.distilling:
            values["kl"] = float(totals[2]) / n_micro
        return values

    def _start_run(self) -> None:
        """Resume if a checkpoint is there; write the run's config, data split and data report."""
        main = self.acc.is_main_process
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.maybe_resume()
        if main:
            (self.run_dir / "config.yaml").write_text(dump_yaml(self.cfg))
            (self.run_dir / "split.json").write_text(json.dumps(self.data.split, indent=1))
            (self.run_dir / "data_report.json").write_text(json.dumps(self.data.report, indent=1, default=str))

    def _decode(self, ids: list[int]) -> str:
        """Token ids as text; as the ids themselves for a model without a tokenizer (token-id data)."""
        tok = self.unwrapped.tokenizer
        return tok.decode(ids) if tok is not None else " ".join(map(str, ids))

    def _evaluate_and_log(self, log: MetricsLog, meter: Meter | None = None) -> dict[str, float]:
        shown: list[dict] | None = [] if self.acc.is_main_process else None
        ev = self.evaluate(shown)
        if shown:  # the latest evaluation's answers as text, beside metrics.jsonl
            record = {"step": self.step, "rows": shown}
            (self.run_dir / "heldout_answers.json").write_text(json.dumps(record, indent=1))
        if ev:
            log.log(self.step, {f"eval/{k}": v for k, v in ev.items()})
            if meter is not None:
                task = "".join(f", answers {ev[f'task_accuracy_{t}']:.1%} (exact {ev[f'task_exact_{t}']:.1%}) "
                               f"{t.replace('_', ' ')}"
                               for t in ("with_context", "without_context") if f"task_accuracy_{t}" in ev)
                text = "" if "text_loss_with_context" not in ev else (
                    f", text loss {ev['text_loss_with_context']:.4f} ({ev['text_loss_without_context']:.4f} without)")
                meter.write(f"step {self.step}: held-out ppl {ev['ppl_with_context']:.3f} with context, "
                            f"{ev['ppl_without_context']:.3f} without{text}{task}")
        return ev

    def _save_adapter(self) -> Path:
        """Write `run_dir/adapter` (save_pretrained) and return it."""
        cfg, acc = self.cfg, self.acc
        adapter_dir = self.run_dir / "adapter"
        if acc.distributed_type == DistributedType.FSDP:
            # the live parameters are shards: gather them into a fresh CPU copy to save
            full = get_model_state_dict(self.model, options=FULL)
            if acc.is_main_process:
                copy = build_model(cfg)
                set_model_state_dict(copy, full, options=LOAD)
                copy.save_pretrained(adapter_dir)
        elif acc.is_main_process:
            self.unwrapped.save_pretrained(adapter_dir)
        acc.wait_for_everyone()
        return adapter_dir

    def _finish(self, ev: dict, meter: Meter, adapter_dir: Path) -> dict[str, Any]:
        """Write and print the run's summary."""
        cfg, acc = self.cfg, self.acc
        elapsed, steps_run, tokens_run = meter.elapsed(), meter.steps_run(self.step), meter.tokens_run(self.counters)
        summary: dict[str, Any] = {
            "steps": self.step,
            "steps_this_run": steps_run,
            "global_batch": cfg.train.batch_size * cfg.train.grad_accum * acc.num_processes,
            "processes": acc.num_processes,
            **self.counters,
            "seconds": round(elapsed, 2),
            "tokens_per_s": tokens_run / max(elapsed, 1e-9),
            "final_loss": meter.last_loss,
            **ev,
            "model": self.description,
            "adapter": str(adapter_dir),
            "config_fingerprint": training_config_hash(cfg),
            "data": {k: v for k, v in self.data.report.items() if k != "skipped_unreadable"},
        }
        if self.candidates is not None:
            summary["chance"] = 1.0 / len(self.candidates)
        flops = self._flops_per_step()
        if flops and steps_run and elapsed > 0:
            summary["model_tflops_per_s"] = flops * steps_run / elapsed / 1e12
            if cfg.train.peak_tflops:
                summary["mfu"] = summary["model_tflops_per_s"] / cfg.train.peak_tflops
        if acc.is_main_process:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
            plot_metrics(self.run_dir)
            print_table(summary)
        return summary

    def _flops_per_step(self) -> float:
        """`metrics.step_flops` at this run's mean decoder, context and teacher tokens per step."""
        steps = max(self.step, 1)
        dec_tok = self.counters["decoder_tokens"] / steps
        online = self.cfg.distilling and self.teacher_file is None
        teacher_tok = dec_tok + self.teacher_tokens * self.cfg.train.batch_size if online else 0
        return step_flops(self.description, self.cfg, dec_tok, self.counters["context_tokens"] / steps, teacher_tok)


def train(cfg: RunConfig, stop_after: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Build a trainer from `cfg` and run it."""
    return Trainer(cfg, progress=progress).fit(stop_after=stop_after)
