"""CE and CEPE-Distilled's KL(teacher || student): values, masking, where gradients go."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_cepe

from cepe.training.losses import (cross_entropy, distilled_positions, kl_divergence, online_teacher_logits,
                                  task_weights, topk_kl_divergence)


def _logits(seed: int, shape=(2, 6, 20)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 3


def test_kl_is_zero_when_equal_and_positive_otherwise():
    labels = torch.randint(0, 20, (2, 6))
    s, t = _logits(0), _logits(1)
    assert kl_divergence(s, s.clone(), labels).abs() < 1e-6
    assert kl_divergence(s, t, labels) > 0.1
    for temp in (0.5, 2.0):
        assert kl_divergence(s, s.clone(), labels, temp).abs() < 1e-6
        assert kl_divergence(s, t, labels, temp) > 0
    # only positions that predict a labelled token count
    labels[:, 1:4] = -100
    t2 = t.clone()
    t2[:, 0:3] = 100 * torch.randn(2, 3, 20)
    torch.testing.assert_close(kl_divergence(s, t, labels), kl_divergence(s, t2, labels))
    # KL(t || s) by hand at one position
    p, q = t[0, 0].softmax(-1), s[0, 0].softmax(-1)
    one = torch.full((1, 2), -100)
    one[0, 1] = 3
    torch.testing.assert_close(kl_divergence(s[:1, :2], t[:1, :2], one), (p * (p / q).log()).sum())


def test_kl_on_text_only_leaves_the_answers_to_cross_entropy():
    """A teacher that cannot see an answer's fact differs from the student only there: with
    answers=False the KL reads the text alone and is zero; with answers=True it is not."""
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 6, 11, generator=g)
    teacher = student.clone()
    task = torch.zeros(2, 6, dtype=torch.bool)
    task[:, 4:] = True  # the answer: the last two tokens of each row
    teacher[:, 3:5] = torch.randn(2, 2, 11, generator=g)  # logits predicting tokens 4 and 5
    labels = torch.randint(0, 11, (2, 6), generator=g)
    labels[0, 0] = -100
    text_only = distilled_positions(labels, task, answers=False)
    assert kl_divergence(student, teacher, text_only).item() == pytest.approx(0.0, abs=1e-6)
    assert kl_divergence(student, teacher, distilled_positions(labels, task, answers=True)).item() > 0.01
    assert torch.equal(distilled_positions(labels, None, answers=False), labels)  # no tasks: every position


def test_topk_kl_zero_when_student_matches_the_teacher():
    labels = torch.randint(0, 20, (2, 6))
    s = _logits(0)
    probs, ids = s.softmax(-1).topk(5, dim=-1)
    assert topk_kl_divergence(s, ids, probs.half().float(), labels).abs() < 1e-3
    other = _logits(3).softmax(-1).topk(5, dim=-1)
    assert topk_kl_divergence(s, other.indices, other.values, labels) > 0.1
    # with every token kept it is the full KL
    t = _logits(4)
    full = t.softmax(-1).topk(20, dim=-1)
    torch.testing.assert_close(
        topk_kl_divergence(s, full.indices, full.values, labels), kl_divergence(s, t, labels), rtol=1e-4, atol=1e-5
    )


def test_cross_entropy_matches_the_decoder_loss():
    m = tiny_cepe("llama", "bert")
    ids = torch.randint(3, 90, (2, 9))
    out = m.decoder(input_ids=ids, labels=ids)
    ce, n = cross_entropy(out.logits, ids)
    torch.testing.assert_close(ce, out.loss)
    assert n == 2 * 8


def test_task_answers_weigh_task_weight_times_the_rest_of_their_row():
    labels = torch.arange(12).repeat(3, 1)
    labels[:, :2] = -100  # positions 0-1 unlabelled: loss positions 1.. are 10 labelled tokens
    task = torch.zeros(3, 12, dtype=torch.bool)
    task[0, 10:] = True  # row 0: 2 answer tokens after 8 text tokens
    task[1, 2:12] = True  # row 1: answers only, nothing to balance: weight 1 each
    # row 2: no task tokens
    w = task_weights(labels, task, 1.0)
    assert w.shape == (3, 11)
    assert w[0, 9:].tolist() == [4.0, 4.0] and w[0, 1:9].eq(1).all() and w[0, 0] == 0
    assert w[1, 1:].eq(1).all() and w[2, 1:].eq(1).all() and w[:, 0].eq(0).all()
    assert task_weights(labels, task, 0.0).eq(labels[:, 1:] != -100).all()
    assert w[0, 9:].sum() == 1.0 * w[0, 1:9].sum()  # the answers weigh as much as the text
    # the weighted mean: answers' losses count four times
    logits = _logits(3, (3, 12, 20))
    labels[:, 2:] %= 20
    ce, n = cross_entropy(logits, labels, task, 1.0)
    per = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 20), labels[:, 1:].reshape(-1),
                                            ignore_index=-100, reduction="none").view(3, 11)
    assert n == 30
    torch.testing.assert_close(ce, (per * w).sum() / w.sum())
    torch.testing.assert_close(cross_entropy(logits, labels, task, 0.0)[0], cross_entropy(logits, labels)[0])


def _batch(b=2, d=7, t=5):
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(3, 90, (b, t), generator=g)
    mask = torch.ones_like(prefix)
    mask[1, :2] = 0  # the second example's context tail is shorter: left padding
    prefix[1, :2] = 0
    return {
        "input_ids": torch.randint(3, 90, (b, d), generator=g),
        "labels": torch.randint(3, 90, (b, d), generator=g),
        "context_input_ids": torch.randint(3, 60, (b, 2, 8), generator=g),
        "context_attention_mask": torch.ones((b, 2, 8), dtype=torch.long),
        "teacher_prefix_ids": prefix,
        "teacher_prefix_mask": mask,
    }


def test_online_teacher_is_the_base_decoder_reading_the_context_tail():
    m = tiny_cepe("llama", "bert")
    batch = _batch()
    teacher = online_teacher_logits(m, batch)
    assert teacher.shape == (2, 7, m.decoder.config.vocab_size)
    for i in range(2):
        keep = batch["teacher_prefix_mask"][i].bool()
        seq = torch.cat([batch["teacher_prefix_ids"][i][keep], batch["input_ids"][i]])[None]
        ref = m.decoder(input_ids=seq).logits[0, -7:]
        torch.testing.assert_close(teacher[i], ref, rtol=1e-4, atol=1e-4)


def test_distillation_gradients_reach_only_trainable_parameters():
    m = tiny_cepe("llama", "bert").train()
    batch = _batch()
    teacher = online_teacher_logits(m, batch)
    assert not teacher.requires_grad
    out = m(
        batch["input_ids"],
        context_input_ids=batch["context_input_ids"],
        context_attention_mask=batch["context_attention_mask"],
    )
    ce, _ = cross_entropy(out.logits, batch["labels"])
    (ce + 2.0 * kl_divergence(out.logits, teacher, batch["labels"])).backward()
    trainable = {id(p) for p in m.adapter_parameters()}
    for name, p in m.named_parameters():
        if id(p) in trainable:
            assert p.grad is not None, name
        else:
            assert p.grad is None and not p.requires_grad, name
    assert any(p.grad.abs().sum() > 0 for n, p in m.named_parameters() if n.startswith("cross_attn."))
    assert all(p.grad is None for p in m.decoder.parameters())


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_online_teacher_may_run_before_or_after_the_student(checkpointing):
    """The context is an argument of the student's forward: a teacher forward (no context) after it
    changes no gradient, with gradient checkpointing recomputing the student's layers in backward too."""
    m = tiny_cepe("llama", "bert").train()
    if checkpointing:
        m.gradient_checkpointing_enable()
    batch = _batch()

    def grads(teacher_first: bool) -> dict[str, torch.Tensor]:
        m.zero_grad(set_to_none=True)
        teacher = online_teacher_logits(m, batch) if teacher_first else None
        torch.manual_seed(0)  # the same encoder dropout
        out = m(batch["input_ids"], context_input_ids=batch["context_input_ids"],
                context_attention_mask=batch["context_attention_mask"], use_cache=False)
        if teacher is None:
            teacher = online_teacher_logits(m, batch)
        (cross_entropy(out.logits, batch["labels"])[0] + kl_divergence(out.logits, teacher, batch["labels"])).backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    first, after = grads(True), grads(False)
    assert first and first.keys() == after.keys()
    for name in first:
        torch.testing.assert_close(after[name], first[name], rtol=0, atol=0, msg=name)


def test_whole_answers_counts_answers_with_every_token_right():
    from cepe.training.metrics import whole_answers

    task = torch.tensor([[0, 1, 1, 0, 1, 1, 1, 0], [1, 1, 0, 0, 0, 1, 0, 1]], dtype=torch.bool)
    correct = torch.tensor([[1, 1, 1, 0, 1, 0, 1, 1], [1, 1, 0, 0, 0, 0, 1, 1]], dtype=torch.bool)
    # row 0: answers [1:3] right, [4:7] one wrong; row 1: [0:2] right, [5] wrong, [7] right
    assert whole_answers(correct, task) == (5, 3)
    assert whole_answers(torch.ones_like(task), task) == (5, 5)
    assert whole_answers(correct, torch.zeros_like(task)) == (0, 0)


def test_exact_match_is_split_by_the_kind_of_answer():
    from cepe.training.metrics import ANSWER_GROUPS, answer_group, whole_answers_by_group

    samples = [{"kind": "facts", "copy_format": "facts_multi"}, {"kind": "copying", "copy_format": "table"},
               {"kind": "facts", "copy_format": "facts_multi"}, {"kind": "long_document"}]
    groups = torch.tensor([answer_group(s) for s in samples])
    assert groups.tolist() == [ANSWER_GROUPS.index("facts_multi"), ANSWER_GROUPS.index("copying"),
                               ANSWER_GROUPS.index("facts_multi"), -1]
    task = torch.tensor([[0, 1, 1, 0], [1, 1, 0, 1], [0, 0, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    correct = torch.tensor([[1, 1, 1, 1], [1, 0, 1, 1], [1, 1, 0, 1], [1, 1, 1, 1]], dtype=torch.bool)
    out = whole_answers_by_group(correct, task, groups)
    # facts_multi: two answers, the second has a wrong token; copying: [0:2] wrong, [3] right
    assert out[ANSWER_GROUPS.index("facts_multi")].tolist() == [2, 1]
    assert out[ANSWER_GROUPS.index("copying")].tolist() == [2, 1]
    assert out.sum().item() == 6
    # passage questions with the top passage in the window are told apart from the encoder-only ones
    qa = [{"kind": "passage_qa", "copy_format": f} for f in ("passage_qa", "passage_qa_in_window")]
    assert [ANSWER_GROUPS[answer_group(s)] for s in qa] == ["passage_qa", "passage_qa_in_window"]


def test_answer_texts_show_gold_and_argmax_per_answer_and_kind():
    from cepe.training.metrics import ANSWER_GROUPS, answer_texts

    multi, copying = ANSWER_GROUPS.index("facts_multi"), ANSWER_GROUPS.index("copying")
    labels = torch.tensor([[9, 10, 11, 9, 12, 13], [9, 20, 21, 9, 9, 9], [9, 30, 9, 9, 9, 9], [9, 40, 9, 9, 9, 9]])
    pred = labels.clone()
    pred[0, 4] = 99  # row 0's second answer has a wrong token
    task = torch.tensor([[0, 1, 1, 0, 1, 1], [0, 1, 1, 0, 0, 0], [0, 1, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0]]).bool()
    groups = torch.tensor([multi, multi, -1, copying])
    taken = [0] * len(ANSWER_GROUPS)
    rows = answer_texts(pred, labels, task, groups, lambda ids: " ".join(map(str, ids)), taken, per_group=1)
    # one row per kind at most: row 1 (a second facts_multi) and row 2 (no kind) are left out
    assert rows == [
        {"kind": "facts_multi",
         "answers": [{"gold": "10 11", "predicted": "10 11"}, {"gold": "12 13", "predicted": "99 13"}]},
        {"kind": "copying", "answers": [{"gold": "40", "predicted": "40"}]},
    ]
    assert taken[multi] == 1 and taken[copying] == 1
    # the kinds already full stay full across batches
    assert answer_texts(pred, labels, task, groups, str, taken, per_group=1) == []
