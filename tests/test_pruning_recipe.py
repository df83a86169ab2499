"""The shared recipe end to end with SNIP: prior (+ SN) fine-tuning, thresholding, physical removal, recovery, outputs."""

from __future__ import annotations

import json
import math

import pytest
import torch

import minisnip
from minisnip.__main__ import METHODS, main
from minisnip.finetune import load_task_data
from minisnip.pruning.recipe import PruneConfig, run_prune
from minisnip.snip.method import Config as SnipConfig
from minisnip.snip.prior import PriorPenalty
from minisnip.train import TrainConfig, evaluate


def quick(**kw) -> TrainConfig:
    return TrainConfig(**{"epochs": 2, "batch_size": 4, "lr": 1e-3, "max_length": 32, "progress": False, **kw})


def prune(task, out, name, cfg: PruneConfig, *args, **kwargs):
    """run_prune with the method and Config the command line gives `name`."""
    module, overrides = METHODS[name]
    return run_prune(task, out, name, module, module.Config(**overrides), cfg, *args, **kwargs)


@pytest.mark.parametrize("method", ["snip", "snip-no-sn", "snip-no-prior"])
def test_prune_reaches_target_and_writes_everything(tiny_folder, glue_fixtures_dir, tmp_path, method):
    out = tmp_path / method
    result = prune("mrpc", out, method, PruneConfig(target=0.5), tiny_folder, glue_fixtures_dir, quick())
    assert 0.5 <= result["compression"] < 0.5 + 0.1  # overshoot below one branch (a head: ~10% of this model)
    assert "embeddings and classifier excluded" in result["compression_definition"]
    pruning = json.loads((out / "pruning.json").read_text())
    branches = pruning["branches"]
    assert pruning["removed"] and {b["name"] for b in branches} == set(pruning["scores"])
    # thresholding: every removed branch had a norm no larger than every kept one
    removed = [b for b in branches if b["removed"]]
    kept = [b for b in branches if not b["removed"]]
    assert removed and kept
    assert max(b["score"] for b in removed) <= min(b["score"] for b in kept)
    assert pruning["tau_effective"] == pytest.approx(max(b["score"] for b in removed))
    # the removed parameters are what the compression says
    assert sum(b["params"] for b in removed) <= pruning["report"]["params_before"] - pruning["report"]["params_after"]
    # the saved pruned model has the smaller shapes and reproduces the final score
    pruned = minisnip.BertForSequenceClassification.from_pretrained(out / "pruned")
    assert pruned.config.layers == [minisnip.LayerShape(**l) for l in pruning["layers"]]
    tok = minisnip.load_tokenizer(out / "pruned")
    data = load_task_data("mrpc", tok, glue_fixtures_dir, max_length=32)
    assert evaluate(pruned, data.dev["dev"], data.task, tok)["f1"] == pytest.approx(result["score"], abs=1e-6)
    assert (out / "norms_per_layer.png").stat().st_size > 1000 and (out / "kept_map.png").exists()
    assert result["scores"]["finetuned"] and result["scores"]["pruned_before_recovery"]
    # the floor of "learnt": the majority class of the training labels, scored on dev as the metrics score it
    data = load_task_data("mrpc", tok, glue_fixtures_dir, max_length=32)
    assert result["scores"]["constant"] == data.constant_scores()
    c = result["constant_score"]
    assert c == data.constant_scores()["dev"]["f1"]
    assert result["learnt"] == {"finetuned": result["finetuned_score"] > c + 1e-9, "pruned": result["score"] > c + 1e-9}


def test_no_target_prunes_nothing(tiny_folder, glue_fixtures_dir, tmp_path):
    result = prune("rte", tmp_path / "d", "snip-no-prior", PruneConfig(target=None), tiny_folder,
                   glue_fixtures_dir, quick(epochs=1), plots=False)
    assert result["compression"] == 0.0 and result["score"] == result["finetuned_score"]


def test_threshold_mode_removes_exactly_the_branches_below_tau(tiny_folder, glue_fixtures_dir, tmp_path):
    probe = prune("rte", tmp_path / "probe", "snip-no-prior", PruneConfig(target=0.3, recovery_epochs=0),
                  tiny_folder, glue_fixtures_dir, quick(epochs=1), plots=False)
    norms = json.loads((tmp_path / "probe" / "pruning.json").read_text())["scores"]
    tau = sorted(norms.values())[3] + 1e-9  # the four smallest go
    prune("rte", tmp_path / "tau", "snip-no-prior", PruneConfig(target=None, threshold=tau, recovery_epochs=0),
          tiny_folder, glue_fixtures_dir, quick(epochs=1), plots=False)
    again = json.loads((tmp_path / "tau" / "pruning.json").read_text())
    assert again["scores"] == pytest.approx(norms)  # same seed, same fine-tuning: same norms
    below = {n for n, v in norms.items() if v < tau}
    assert set(again["report"]["removed"]) <= below | {f"layer{i}.{b}" for i in range(2) for b in ("attention", "ffn")}
    assert len(below) == 4 and probe["compression"] >= 0.3


def test_prior_penalty_is_lambda_times_the_prior(tiny_folder):
    model = minisnip.BertForSequenceClassification.from_pretrained(tiny_folder)
    ids = torch.randint(1000, 2000, (2, 7))
    traces: list = []
    model(ids, trace=traces)
    from minisnip.snip import identity_prior
    kinds = PruneConfig().kinds
    expected = 0.25 * identity_prior(model, traces, None, kinds, "params", 16)
    assert PriorPenalty(0.25, kinds, 16, "params")(model, traces, None).item() == pytest.approx(expected.item())
    # with a warm-up over 3 steps, λ_t = λ/4, λ/2, 3λ/4, then λ for good
    warm = PriorPenalty(0.25, kinds, 16, "params", warmup_steps=3)
    values = [warm(model, traces, None).item() / expected.item() for _ in range(5)]
    assert values == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])
    assert warm.step == 5


@pytest.mark.parametrize("kwargs, match", [
    (dict(target=0.0), "target"), (dict(target=1.0), "target"), (dict(target=float("nan")), "target"),
    (dict(target=0.5, threshold=0.1), "at most one"), (dict(target=None, threshold=float("nan")), "threshold"),
    (dict(target=None, threshold=-1.0), "threshold"), (dict(neuron_group_size=0), "neuron_group_size"),
    (dict(kinds=("head",), neuron_group_size=8), "neurons"), (dict(kinds=("magic",)), "kinds"),
    (dict(recovery_epochs=-1), "recovery_epochs"), (dict(calibration_examples=0), "calibration_examples"),
])
def test_bad_recipe_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PruneConfig(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(prior_lambda=-1.0), "prior_lambda"), (dict(prior_lambda=float("nan")), "prior_lambda"),
    (dict(prior_warmup=1.5), "prior_warmup"), (dict(prior_warmup=-0.1), "prior_warmup"),
    (dict(sn_bound="abc"), "sn_bound"), (dict(sn_bound=0.0), "sn_bound"), (dict(prior_weights="size"), "prior_weights"),
])
def test_bad_snip_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SnipConfig(**kwargs)


def test_cli_prune(tiny_folder, glue_fixtures_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(["prune", "--method", "snip", "--target", "0.4", "--task", "sst2", "--glue-dir", str(glue_fixtures_dir),
                 "--model", str(tiny_folder), "--epochs", "1", "--batch-size", "4", "--max-length", "32",
                 "--out", str(out), "--no-progress", "--no-plots"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "compression" in printed and "pruned + recovery" in printed
    result = json.loads((out / "result.json").read_text())
    warned = "WARNING:" in printed and "no better than always predicting the majority class" in printed
    assert warned == (not all(result["learnt"].values()))  # a majority vote's score is said to be one
    with pytest.raises(SystemExit) as exit:
        main(["prune", "--target", "1.5", "--task", "sst2", "--glue-dir", str(glue_fixtures_dir),
              "--out", str(tmp_path / "bad")])
    assert exit.value.code == 2 and "--target" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_a_methods_first_draws_depend_on_the_seed_alone(tiny_folder, glue_fixtures_dir):
    """L0's log α noise and DSP's logits are drawn when the hooks are made: finetune_with seeds just before, so
    what ran earlier in the process (a teacher's fine-tune, another cell) does not change them."""
    from minisnip.finetune import load_classifier
    from minisnip.pruning.recipe import finetune_with

    class Stop(Exception):
        pass

    draws = []

    class Probe:
        STRUCTURED, SCHEDULED, USES_DISTILLATION = True, False, False

        @staticmethod
        def training_hooks(model, *args, **kwargs):
            draws.append(torch.rand(4))
            raise Stop

    tokenizer = minisnip.load_tokenizer(tiny_folder)
    data = load_task_data("rte", tokenizer, glue_fixtures_dir, max_length=32)
    for seed, burn in ((1, 0), (1, 7), (2, 0)):
        torch.rand(burn)  # what ran before
        with pytest.raises(Stop):
            finetune_with(load_classifier(tiny_folder, data.task), tokenizer, data, Probe, None,
                          PruneConfig(target=0.5), quick(seed=seed))
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])


def test_scores_before_recovery_are_evaluated_as_fit_evaluates(tiny_folder, glue_fixtures_dir):
    """dev_scores with the run's TrainConfig uses its autocast, as fit's evaluations do (bf16 here, on the CPU)."""
    from minisnip.finetune import new_classifier
    from minisnip.pruning.recipe import dev_scores

    tokenizer = minisnip.load_tokenizer(tiny_folder)
    data = load_task_data("stsb", tokenizer, glue_fixtures_dir, max_length=32)
    model = new_classifier(tiny_folder, data.task, 1)
    split = next(iter(data.dev))
    as_fit = evaluate(model, data.dev[split], data.task, tokenizer, 16, torch.device("cpu"), torch.bfloat16)
    assert dev_scores(model, tokenizer, data, train_cfg=quick(amp="bf16", eval_batch_size=16))[split] == as_fit
    assert dev_scores(model, tokenizer, data)[split] != as_fit  # float32: not the same numbers


@pytest.mark.parametrize("gate,task", [("loss", "sst2"), ("baseline", "sst2"), ("baseline", "stsb")])
def test_the_gated_prior_runs_through_the_recipe_and_logs_its_gate(tiny_folder, glue_fixtures_dir, tmp_path, gate,
                                                                    task):
    from minisnip.snip import method as snip_method
    result = run_prune(task, tmp_path / "gated", "snip", snip_method, SnipConfig(prior_gate=gate),
                       PruneConfig(target=0.3), tiny_folder, glue_fixtures_dir, quick(epochs=2))
    epochs = result["scores"]["finetune_history"]["epochs"]
    assert result["status"] == "completed" and len(epochs) == 2
    assert all(0.0 <= e["prior_loss_gate"] <= 1.0 for e in epochs)
    if gate == "baseline":  # the constant predictor's loss on the labels seen: an entropy, or a variance
        assert all(e["prior_gate_baseline_loss"] > 0 for e in epochs)
        if task == "sst2":
            assert all(e["prior_gate_baseline_loss"] <= math.log(2) + 1e-6 for e in epochs)
