"""SparseBERT (Xu et al. 2021): gradual magnitude pruning with distillation from the fine-tuned teacher."""

import copy

import pytest
import torch

import minisnip
from minisnip.pruning.compression import encoder_linears, sparsity
from minisnip.methods import magnitude_unstructured as mu, sparsebert
from minisnip.pruning.distill import DistillConfig, DistillHook
from minisnip.train import TrainConfig, fit

pytestmark = pytest.mark.usefixtures("one_thread")


def test_contract_and_reuse(tiny_model):
    assert not sparsebert.STRUCTURED and sparsebert.USES_DISTILLATION and "5%" in sparsebert.DESCRIPTION
    assert sparsebert.PAPER_TARGET == 0.95
    model = tiny_model(minisnip.BertForSequenceClassification)
    cfg = sparsebert.Config(scope="global")
    (hook,) = sparsebert.training_hooks(model, cfg, 0.95, 10)
    assert type(hook) is mu.GradualMagnitudeHook  # magnitude's own hook, imported


@pytest.mark.parametrize("field, value", [("scope", "rows"), ("update_every", 0)])
def test_config_validates(field, value):
    with pytest.raises(ValueError, match=field):
        sparsebert.Config(**{field: value})


def test_prunes_to_95_percent_while_distilling(tiny_folder, glue_fixtures_dir):
    from minisnip.finetune import load_task_data
    tokenizer = minisnip.load_tokenizer(tiny_folder)
    data = load_task_data("rte", tokenizer, glue_fixtures_dir, max_length=32)
    torch.manual_seed(0)
    student = minisnip.BertForSequenceClassification.from_pretrained(tiny_folder, num_labels=2)
    teacher = copy.deepcopy(student).eval()  # stands in for the fine-tuned dense teacher
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    cfg = TrainConfig(epochs=6, batch_size=4, lr=1e-3, max_length=32, progress=False)
    total = cfg.steps_per_epoch(len(data.train)) * cfg.epochs
    method_cfg = sparsebert.Config(update_every=2)
    hooks = sparsebert.training_hooks(student, method_cfg, sparsebert.PAPER_TARGET, total)
    distill = DistillHook(teacher, DistillConfig(hidden_weight=0.5))
    history = fit(student, tokenizer, data.task, data.train, data.dev, cfg, hooks=[*hooks, distill],
                  restore_best=False)
    assert history.epochs[-1]["distill_kd"] > 0 and history.epochs[-1]["penalty"] > 0
    sparsebert.before_removal(student, hooks)
    linears = [lin for _, lin in encoder_linears(student)]
    slack = 0.5 * len(linears) / sum(lin.weight.numel() for lin in linears)  # per-matrix rounding
    assert sparsity(student) == pytest.approx(0.95, abs=slack)
    assert all(torch.equal(v, teacher_state[k]) for k, v in teacher.state_dict().items())  # the teacher is untouched
    assert sparsity(teacher) == 0.0
