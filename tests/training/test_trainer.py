"""The training loop on tiny models: outputs, frozen decoder, exact resume, refused checkpoints."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from train_helpers import TINY, losses, same, state, tiny_config

from cepe import CepeForCausalLM
from cepe.training import Trainer, load_config
from cepe.training.checkpoint import list_checkpoints, load


def test_run_writes_adapter_metrics_summary_and_keeps_the_decoder_frozen(tmp_path):
    out = tmp_path / "run"
    trainer = Trainer(tiny_config(out), progress=False)
    decoder_before = state(trainer.unwrapped.decoder)
    summary = trainer.fit()
    assert same(decoder_before, state(trainer.unwrapped.decoder))
    assert summary["steps"] == 6 and summary["global_batch"] == 8 and summary["samples"] == 48
    for key in ("accuracy_with_context", "accuracy_without_context", "ppl_with_context", "ppl_without_context",
                "chance"):
        assert key in summary
    # every label of the key-value task is an answer read from the context
    assert summary["task_accuracy_with_context"] == summary["accuracy_with_context"]
    assert 0 <= summary["task_exact_with_context"] <= summary["task_accuracy_with_context"] + 1e-9
    assert "text_loss_with_context" not in summary  # every scored token is an answer: no text to score
    assert json.loads((out / "summary.json").read_text())["steps"] == 6
    assert sorted(losses(out)) == [1, 2, 3, 4, 5, 6]
    assert (out / "metrics.png").is_file() and any((out / "tensorboard").iterdir())
    assert (out / "config.yaml").is_file() and (out / "split.json").is_file()
    assert_adapter_reloads(out / "adapter", trainer.unwrapped)


def assert_adapter_reloads(adapter_dir, model):
    """The adapter is a save_pretrained folder that loads back onto the same decoder, with the same logits."""
    model = model.eval()
    loaded = CepeForCausalLM.from_pretrained(adapter_dir, decoder=model.decoder).eval()
    ids = torch.tensor([[2, 5, 30, 2, 7]])
    ctx = torch.randint(3, 35, (1, 8, 2))
    torch.testing.assert_close(loaded(ids, context_input_ids=ctx).logits, model(ids, context_input_ids=ctx).logits)


def test_adapter_is_written_before_the_closing_evaluation(tmp_path, monkeypatch):
    """A run stopped during its final held-out evaluation (an hour on a CPU) keeps its adapter."""
    out = tmp_path / "run"
    trainer = Trainer(tiny_config(out), progress=False)

    def stopped(*args, **kwargs):
        assert (out / "adapter" / "config.json").is_file()  # already written when evaluation starts
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "_evaluate_and_log", stopped)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert_adapter_reloads(out / "adapter", trainer.unwrapped)
    assert not (out / "summary.json").exists()


def test_killed_and_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path):
    # encoder dropout on, so the resumed run needs the checkpoint's RNG state too
    args = ("train.save_every=3", "model.tiny.encoder_dropout=0.1", "train.grad_accum=2")
    full = Trainer(tiny_config(tmp_path / "full", *args), progress=False)
    full.fit()
    killed = tmp_path / "killed"
    assert Trainer(tiny_config(killed, *args), progress=False).fit(stop_after=4) == {"stopped_at": 4}
    assert [p.name for p in list_checkpoints(killed)] == ["step_00000003"]
    # safetensors and JSON only: nothing in a checkpoint needs pickle to load
    assert {p.suffix for p in list_checkpoints(killed)[0].iterdir()} == {".safetensors", ".json"}
    (killed / "checkpoints" / ".tmp-step_00000004").mkdir()  # a save the kill interrupted
    torch.manual_seed(1234)  # a fresh process would not share this one's RNG
    resumed = Trainer(tiny_config(killed, *args), progress=False)
    resumed.fit()
    a, b = losses(tmp_path / "full"), losses(killed)
    assert sorted(b) == [1, 2, 3, 4, 5, 6]  # step 4 of the killed run was forgotten and redone
    assert all(a[s] == b[s] for s in a), (a, b)
    assert same(state(full.unwrapped.encoder), state(resumed.unwrapped.encoder))
    assert same(state(full.unwrapped.cross_attn), state(resumed.unwrapped.cross_attn))


def test_checkpoint_from_another_config_or_corrupted_is_refused(tmp_path):
    out = tmp_path / "run"
    Trainer(tiny_config(out, "train.save_every=2", "max_steps=2"), progress=False).fit()
    (ckpt,) = list_checkpoints(out)
    with pytest.raises(
        ValueError, match=r"trainer_state\.json: checkpoint was written by another config \(train\.lr: 0\.003 -> 0\.01"
    ):
        Trainer(tiny_config(out, "train.save_every=2", "max_steps=2", "train.lr=0.01"), progress=False).fit()
    with pytest.raises(ValueError, match="already has checkpoints"):
        Trainer(tiny_config(out, "train.save_every=2", "max_steps=2", "train.resume=none"), progress=False).fit()
    backup = tmp_path / "backup"
    shutil.copytree(ckpt, backup)
    raw = bytearray((ckpt / "adapter.safetensors").read_bytes())
    raw[-3] ^= 0xFF
    (ckpt / "adapter.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"adapter\.safetensors: corrupted"):
        Trainer(tiny_config(out, "train.save_every=2", "max_steps=2"), progress=False).fit()
    shutil.rmtree(ckpt)
    shutil.copytree(backup, ckpt)
    (ckpt / "manifest.json").unlink()
    with pytest.raises(ValueError, match=r"manifest\.json: missing"):
        Trainer(tiny_config(out, "train.save_every=2", "max_steps=2"), progress=False).fit()
    # a checkpoint of an older cepe (pickled optimizer state) is refused with what to do instead
    (ckpt / "optimizer.safetensors").rename(ckpt / "optimizer.pt")
    with pytest.raises(ValueError, match="older cepe.*model.init_adapter"):
        load(ckpt, rank=0)


def _books(root, n=4, words=400):
    root.mkdir(parents=True)
    vocab = "the a letter came from bath and anne read it twice before the walk to lyme".split()
    for i in range(n):
        (root / f"book{i}.txt").write_text(" ".join(vocab[(i * 5 + j * 3 + j // 7) % len(vocab)] for j in range(words)))
    return root


def test_text_run_distilled_with_retrieval_and_checkpointing(tmp_path):
    books = _books(tmp_path / "books")
    cfg = load_config(None, [
        f"output_dir={tmp_path / 'run'}", f"data.train={books}", f"data.cache_dir={tmp_path / 'cache'}",
        "model.decoder=tiny", "model.encoder=tiny", "model.chunk_size=32", "model.cross_attn_init=zero",
        "data.heldout=[book3.txt]", "data.mixture={warmup: 1, long_document: 2, retrieval: 1}",
        "data.context_tokens=96", "data.decoder_tokens=48", "data.retrieval.k=2", "data.retrieval.passage_tokens=32",
        "distill.kl_coef=1.0", "distill.teacher_context_tokens=64", "train.gradient_checkpointing=true",
        "train.encoder_checkpointing=true",
        "max_steps=3", "train.batch_size=2", "train.log_every=1", "train.eval_samples=4", "train.lr=1e-3",
    ])
    summary = Trainer(cfg, progress=False).fit()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["kl"] >= 0 and r["loss"] == pytest.approx(r["ce"] + r["kl"], rel=1e-5) for r in rows if "kl" in r)
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 3 and all(r["step_s"] > 0 and r["tokens_per_s"] > 0 for r in steps)  # throughput per step
    assert json.loads((tmp_path / "run" / "split.json").read_text())["heldout"] == ["books/book3.txt"]
    assert summary["ppl_with_context"] > 1 and summary["data"]["heldout_documents"] == 1
    # no answers in this mix: every scored token is ordinary text, so the text loss is the loss
    assert summary["text_loss_with_context"] == pytest.approx(summary["loss_with_context"], rel=1e-6)
    assert summary["text_loss_without_context"] == pytest.approx(summary["loss_without_context"], rel=1e-6)


def test_bad_corpora_stop_before_training(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    short = tmp_path / "short"
    short.mkdir()
    (short / "a.txt").write_text("too short")
    base = ["model.decoder=tiny", "model.encoder=tiny", "model.chunk_size=32", f"data.cache_dir={tmp_path / 'cache'}",
            f"output_dir={tmp_path / 'run'}", "data.context_tokens=64"]
    with pytest.raises(ValueError, match=f"{empty}: no files .* empty corpus"):
        Trainer(load_config(None, base + [f"data.train={empty}"]), progress=False)
    with pytest.raises(ValueError, match=f"{short}.*no document is long enough.*1 of 1 documents skipped"):
        Trainer(load_config(None, base + [f"data.train={short}"]), progress=False)
    assert not (tmp_path / "run" / "summary.json").exists()


def test_really_killed_process_resumes_exactly(tmp_path):
    """`cepe train` killed (SIGKILL) mid-run, then run again: the same adapter as a run never killed."""
    import os
    import signal
    import subprocess
    import sys
    import time

    args = ("max_steps=40", "train.save_every=5", "train.log_every=5")
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "cepe.cli", "train", "--config", str(TINY), f"output_dir={killed}",
           "train.batch_size=8", "train.eval_every=0", "train.eval_samples=32", *args, "--no-progress"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while not list_checkpoints(killed) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and list_checkpoints(killed), proc.stderr.read().decode()[-2000:]
    assert not (killed / "summary.json").exists()
    resumed = Trainer(tiny_config(killed, *args), progress=False)
    assert resumed.fit()["steps_this_run"] < 40  # it did resume
    full = Trainer(tiny_config(tmp_path / "full", *args), progress=False)
    full.fit()
    assert same(state(full.unwrapped.cross_attn), state(resumed.unwrapped.cross_attn))
    assert same(state(full.unwrapped.encoder), state(resumed.unwrapped.encoder))


def test_precomputed_teacher_file(tmp_path):
    from cepe.training.trainer import write_teacher_file

    books = _books(tmp_path / "books")
    base = [f"output_dir={tmp_path / 'run'}", f"data.train={books}", f"data.cache_dir={tmp_path / 'cache'}",
            "model.decoder=tiny", "model.encoder=tiny", "model.chunk_size=32", "data.context_tokens=64",
            "data.decoder_tokens=32", "distill.kl_coef=1.0", "distill.topk=8", "max_steps=2", "train.batch_size=2",
            "train.log_every=1", "train.eval_samples=2"]
    path = write_teacher_file(load_config(None, base), tmp_path / "teacher.safetensors", progress=False)
    use = [f"distill.teacher_file={path}", "distill.teacher=file"]
    Trainer(load_config(None, base + use), progress=False).fit()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"kl"' in x]
    assert len(rows) == 2 and all(r["kl"] > 0 for r in rows)
    with pytest.raises(ValueError, match=r"teacher\.safetensors: written for other data"):
        Trainer(
            load_config(None, base + use + ["data.decoder_tokens=16", f"output_dir={tmp_path / 'r2'}"]), progress=False
        )
    with pytest.raises(ValueError, match=r"teacher\.safetensors: holds 4 samples, training reads 6"):
        Trainer(load_config(None, base + use + ["max_steps=3", f"output_dir={tmp_path / 'r3'}"]), progress=False)


def test_tied_decoder_with_decoder_derived_encoder_checkpoints_and_resumes(tmp_path):
    # the frozen embedding is also the LM head and the encoder's table: three names, one tensor, which
    # safetensors refuses to save; a checkpoint holds the trainable tensors only
    args = ("train.save_every=3", "model.tiny.tie_word_embeddings=true", "model.encoder=decoder",
            "model.encoder_num_layers=2")
    full = Trainer(tiny_config(tmp_path / "full", *args), progress=False)
    full.fit()
    killed = tmp_path / "killed"
    assert Trainer(tiny_config(killed, *args), progress=False).fit(stop_after=4) == {"stopped_at": 4}
    assert [p.name for p in list_checkpoints(killed)] == ["step_00000003"]
    resumed = Trainer(tiny_config(killed, *args), progress=False)
    resumed.fit()
    a, b = losses(tmp_path / "full"), losses(killed)
    assert all(a[s] == b[s] for s in a), (a, b)
    assert same(state(full.unwrapped.cross_attn), state(resumed.unwrapped.cross_attn))


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    out = tmp_path / "run"
    Trainer(tiny_config(out, "train.save_every=1", "train.keep_checkpoints=2"), progress=False).fit()
    assert [p.name for p in list_checkpoints(out)] == ["step_00000005", "step_00000006"]


def test_heldout_exact_match_is_reported_per_kind_of_answer(tmp_path):
    # a text mix with facts and copying samples: the summary splits exact match by their kinds
    rng = torch.Generator().manual_seed(0)
    words = [f"w{i}x" for i in range(300)]
    for split in ("train", "heldout"):
        rows = [{"text": " ".join(words[j] for j in torch.randint(0, 300, (700,), generator=rng).tolist()) + "."}
                for _ in range(3)]
        (tmp_path / split).mkdir()
        (tmp_path / split / "doc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tiny_config(tmp_path / "run", f"data.train=[{tmp_path / 'train'},{tmp_path / 'heldout'}]",
                      "data.heldout=[heldout/]", "data.mixture={facts: 0.5, copying: 0.5}", "data.decoder_tokens=400",
                      "data.context_tokens=512", "data.min_context_tokens=256", "data.copying.task_tokens=200",
                      "model.chunk_size=64", "data.extensions=[.jsonl]", "max_steps=1", "train.eval_samples=16")
    summary = Trainer(cfg, progress=False).fit()
    groups = {k.removeprefix("task_exact_").removesuffix("_with_context") for k in summary
              if k.startswith("task_exact_") and k.endswith("_with_context") and k != "task_exact_with_context"}
    assert "copying" in groups and groups & {"facts_single", "facts_multi", "facts_chain"}, sorted(summary)
    for g in groups:
        assert 0 <= summary[f"task_exact_{g}_with_context"] <= 1
    # the last evaluation's answers as text, for the kinds it saw
    shown = json.loads((tmp_path / "run" / "heldout_answers.json").read_text())
    assert shown["step"] == 1 and {r["kind"] for r in shown["rows"]} <= groups
    assert "copying" in {r["kind"] for r in shown["rows"]}
    assert all(a["gold"].strip() and isinstance(a["predicted"], str) for r in shown["rows"] for a in r["answers"])
