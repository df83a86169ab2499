"""Distillation (Hinton et al. 2015): the loss, its T^2 scaling, and the hook against a teacher."""

import copy
import math

import pytest
import torch

import minisnip
from minisnip.pruning.distill import DistillConfig, DistillHook, distillation_loss, hidden_distillation_loss
from minisnip.train import StepContext

pytestmark = pytest.mark.usefixtures("one_thread")


def _softmax(row, T):
    e = [math.exp(v / T) for v in row]
    return [v / sum(e) for v in e]


def test_equals_hand_computation_on_2x3_logits():
    s, t, T = [[1.0, 2.0, 3.0], [0.0, 0.0, 1.0]], [[3.0, 2.0, 1.0], [1.0, 0.0, 0.0]], 2.0
    kl = 0.0
    for s_row, t_row in zip(s, t):
        ps, pt = _softmax(s_row, T), _softmax(t_row, T)
        kl += sum(q * (math.log(q) - math.log(p)) for p, q in zip(ps, pt))
    expected = T * T * kl / 2  # averaged over the batch of 2
    got = distillation_loss(torch.tensor(s), torch.tensor(t), T)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert distillation_loss(torch.tensor(t), torch.tensor(t), T).item() == pytest.approx(0.0, abs=1e-7)


def test_regression_is_mse_to_teacher():
    s, t = torch.tensor([[0.5], [2.0]]), torch.tensor([[1.0], [1.0]])
    assert distillation_loss(s, t, 4.0, regression=True).item() == pytest.approx((0.25 + 1.0) / 2)


def test_t_squared_keeps_gradient_scale():
    """Hinton et al.: soft-target gradients scale as 1/T^2; times T^2 they approach (z - v) / N for large T
    (zero-mean logits), whatever T is."""
    g = torch.Generator().manual_seed(0)
    z, v = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    z, v = z - z.mean(1, keepdim=True), v - v.mean(1, keepdim=True)
    grads = []
    for T in (50.0, 100.0):
        s = z.clone().requires_grad_(True)
        distillation_loss(s, v, T).backward()
        grads.append(s.grad)
    limit = (z - v) / 5 / 4  # / N classes / batch (batchmean)
    for grad in grads:
        assert torch.allclose(grad, limit, rtol=0, atol=2e-3)  # entries up to 0.12
    assert torch.allclose(grads[0], grads[1], rtol=0, atol=1e-3)  # T = 50 and T = 100 pull alike
    s = z.clone().requires_grad_(True)
    torch.nn.functional.kl_div(torch.log_softmax(s / 100.0, -1), torch.log_softmax(v / 100.0, -1),
                               log_target=True, reduction="batchmean").backward()
    assert torch.allclose(s.grad * 100.0 ** 2, grads[1], rtol=1e-3, atol=1e-5)  # exactly the T^2 factor


def test_hidden_loss_ignores_padding():
    s, t = torch.zeros(1, 3, 2), torch.zeros(1, 3, 2)
    t[0, 2] = 100.0  # a padded position
    t[0, 0, 0] = 2.0
    mask = torch.tensor([[1, 1, 0]])
    assert hidden_distillation_loss([s], [t], mask).item() == pytest.approx(4.0 / 4)  # 2 tokens x 2 features


@pytest.mark.parametrize("field, value", [("temperature", 0.0), ("alpha", -1.0), ("hidden_weight", float("nan"))])
def test_config_validates(field, value):
    with pytest.raises(ValueError, match=field):
        DistillConfig(**{field: value})


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 1000, (2, 7), generator=g)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
            "labels": torch.tensor([0, 2])}


def _step(student, hook, batch):
    ctx = StepContext(step=1, total_steps=1, epoch=1, model=student, batch=batch,
                      traces=[] if hook.needs_traces else None)
    ctx.logits = student(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], ctx.traces)
    return hook.loss(ctx)


def test_zero_when_student_is_teacher(tiny_model):
    student = tiny_model(minisnip.BertForSequenceClassification, num_labels=3)  # eval: no dropout
    hook = DistillHook(copy.deepcopy(student), DistillConfig(hidden_weight=1.0))
    assert hook.needs_traces
    assert _step(student, hook, _batch()).item() == pytest.approx(0.0, abs=1e-6)


def test_gradient_reaches_the_student_only(tiny_model):
    student = tiny_model(minisnip.BertForSequenceClassification, num_labels=3)
    teacher = tiny_model(minisnip.BertForSequenceClassification, seed=1, num_labels=3)
    hook = DistillHook(teacher, DistillConfig(alpha=0.5, hidden_weight=0.1))
    loss = _step(student, hook, _batch())
    assert loss.item() > 0
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert student.classifier.weight.grad.abs().sum() > 0
    assert student.bert.layers[0].ffn.up.weight.grad.abs().sum() > 0  # the hidden term reaches layer 0
    # alpha scales the whole term
    hook2 = DistillHook(teacher, DistillConfig(alpha=1.0, hidden_weight=0.1))
    assert _step(student, hook2, _batch()).item() == pytest.approx(2 * loss.item(), rel=1e-5)
    assert hook2.epoch_log()["distill_kd"] > 0 and hook2.epoch_log() == {}
