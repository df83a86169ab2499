"""The SNIP recipe end to end: prior (+ SN) fine-tuning, thresholding, physical removal, recovery, outputs."""

from __future__ import annotations

import json

import pytest
import torch

import minisnip
from minisnip.__main__ import main
from minisnip.finetune import load_task_data
from minisnip.snip.recipe import SnipConfig, prior_penalty, run_prune
from minisnip.train import TrainConfig, evaluate


def quick(**kw) -> TrainConfig:
    return TrainConfig(**{"epochs": 2, "batch_size": 4, "lr": 1e-3, "max_length": 32, "progress": False, **kw})


@pytest.mark.parametrize("method", ["snip", "snip-no-sn", "snip-no-prior"])
def test_prune_reaches_target_and_writes_everything(tiny_folder, glue_fixtures_dir, tmp_path, method):
    out = tmp_path / method
    result = run_prune("mrpc", out, SnipConfig(method=method, target=0.5), tiny_folder, glue_fixtures_dir, quick())
    assert 0.5 <= result["compression"] < 0.5 + 0.1  # overshoot below one branch (a head: ~10% of this model)
    assert "embeddings and classifier excluded" in result["compression_definition"]
    pruning = json.loads((out / "pruning.json").read_text())
    branches = pruning["branches"]
    assert pruning["removed"] and {b["name"] for b in branches} == set(pruning["norms"])
    # thresholding: every removed branch had a norm no larger than every kept one
    removed = [b for b in branches if b["removed"]]
    kept = [b for b in branches if not b["removed"]]
    assert removed and kept
    assert max(b["norm"] for b in removed) <= min(b["norm"] for b in kept)
    assert pruning["tau_effective"] == pytest.approx(max(b["norm"] for b in removed))
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


def test_dense_method_prunes_nothing(tiny_folder, glue_fixtures_dir, tmp_path):
    result = run_prune("rte", tmp_path / "d", SnipConfig(method="dense", target=None), tiny_folder,
                       glue_fixtures_dir, quick(epochs=1), plots=False)
    assert result["compression"] == 0.0 and result["score"] == result["dense_score"]


def test_threshold_mode_removes_exactly_the_branches_below_tau(tiny_folder, glue_fixtures_dir, tmp_path):
    probe = run_prune("rte", tmp_path / "probe", SnipConfig(method="snip-no-prior", target=0.3, recovery_epochs=0),
                      tiny_folder, glue_fixtures_dir, quick(epochs=1), plots=False)
    norms = json.loads((tmp_path / "probe" / "pruning.json").read_text())["norms"]
    tau = sorted(norms.values())[3] + 1e-9  # the four smallest go
    run_prune("rte", tmp_path / "tau", SnipConfig(method="snip-no-prior", target=None, threshold=tau,
                                                  recovery_epochs=0), tiny_folder, glue_fixtures_dir,
              quick(epochs=1), plots=False)
    again = json.loads((tmp_path / "tau" / "pruning.json").read_text())
    assert again["norms"] == pytest.approx(norms)  # same seed, same fine-tuning: same norms
    below = {n for n, v in norms.items() if v < tau}
    assert set(again["report"]["removed"]) <= below | {f"layer{i}.{b}" for i in range(2) for b in ("attention", "ffn")}
    assert len(below) == 4 and probe["compression"] >= 0.3


def test_prior_penalty_is_lambda_times_the_prior(tiny_folder):
    model = minisnip.BertForSequenceClassification.from_pretrained(tiny_folder)
    ids = torch.randint(1000, 2000, (2, 7))
    traces: list = []
    model(ids, trace=traces)
    from minisnip.snip import identity_prior
    cfg = SnipConfig(prior_lambda=0.25)
    expected = 0.25 * identity_prior(model, traces, None, cfg.kinds, cfg.prior_weights, 16)
    assert prior_penalty(cfg, 16)(model, traces, None).item() == pytest.approx(expected.item())
    # with a warm-up over 3 of 10 steps, λ_t = λ/4, λ/2, 3λ/4, then λ for good
    warm = prior_penalty(SnipConfig(prior_lambda=0.25, prior_warmup=0.3), 16, total_steps=10)
    values = [warm(model, traces, None).item() / expected.item() for _ in range(5)]
    assert values == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])
    assert warm.step == 5


@pytest.mark.parametrize("kwargs, match", [
    (dict(target=0.0), "target"), (dict(target=1.0), "target"), (dict(target=None), "exactly one"),
    (dict(target=0.5, threshold=0.1), "exactly one"), (dict(method="magic"), "method"),
    (dict(prior_lambda=-1.0), "prior_lambda"), (dict(prior_warmup=1.5), "prior_warmup"),
    (dict(prior_warmup=-0.1), "prior_warmup"),
])
def test_bad_recipe_settings_are_refused(kwargs, match):
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
    assert main(["prune", "--target", "1.5", "--task", "sst2", "--glue-dir", str(glue_fixtures_dir),
                 "--out", str(tmp_path / "bad")]) == 2
    assert "target" in capsys.readouterr().err
