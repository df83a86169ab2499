"""bench/snip_probes.py on the tiny GLUE fixtures: both probes run and write sane records, and the block-bias
probe's zeroing is the removal plus the biases (bookkeeping and equivalence only: no quality thresholds)."""

from __future__ import annotations

import json

import torch


def _argv(probe, glue_fixtures_dir, tiny_folder, out):
    return ["--probe", probe, "--glue-dir", str(glue_fixtures_dir), "--model", str(tiny_folder), "--task", "rte",
            "--max-train", "8", "--epochs", "2", "--batch-size", "4", "--max-length", "32", "--out", str(out)]


def test_sn_binding_probe_watches_every_step(tmp_path, glue_fixtures_dir, tiny_folder, bench_script):
    probes = bench_script("snip_probes")
    assert probes.main(_argv("sn-binding", glue_fixtures_dir, tiny_folder, tmp_path)) == 0
    r = json.loads((tmp_path / "snip_probe_sn_binding_rte.json").read_text())
    assert r["steps"] == len(r["per_step"]) >= 2  # one record per optimiser step, at least one per epoch
    layers = json.loads((tiny_folder / "config.json").read_text())["num_hidden_layers"]
    assert r["matrices"] == 6 * layers  # Q, K, V, O, W_1, W_2 of every layer
    assert 0 < r["min_scale"] <= 1 and 0 <= r["max_capped_matrices"] <= r["matrices"]
    assert (tmp_path / "snip_probe_sn_binding_rte.md").read_text().count("|") > 8


def test_block_bias_probe_zeroing_is_removal_plus_the_bias(tmp_path, glue_fixtures_dir, tiny_folder, bench_script):
    probes = bench_script("snip_probes")
    assert probes.main(_argv("block-bias", glue_fixtures_dir, tiny_folder, tmp_path)) == 0
    r = json.loads((tmp_path / "snip_probe_block_bias_rte.json").read_text())
    layers = json.loads((tiny_folder / "config.json").read_text())["num_hidden_layers"]
    assert [x["layer"] for x in r["layers"]] == list(range(layers)) and r["selection_50"]
    assert all(0 <= x["removed"] <= 1 and 0 <= x["zeroed_bias_kept"] <= 1 for x in r["layers"])
    # without the bias, zeroing a block's heads and removing the block are the same network
    from minisnip.finetune import new_classifier
    from minisnip.glue import TASKS
    from minisnip.surgery import encoder_of
    model = new_classifier(tiny_folder, TASKS["rte"], 0).eval()
    enc = encoder_of(model)
    ids = torch.randint(1000, 2000, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        enc.layers[0].attention.out.bias.zero_()
        b = enc.layers[1].attention.out.bias  # a fresh tiny model's biases are 0; not a constant (LN removes those)
        b.copy_(torch.linspace(-1, 1, b.numel()))
        group = 2 * enc.layers[0].attention.head_dim
        names = ["layer0.attention", "layer1.head1", "layer1.neurons0"]
        a = probes._zeroed(model, names, group)(ids)
        b = probes._removed(model, names, group)(ids)
        bias_kept = probes._zeroed(model, ["layer1.attention"], group)(ids)
        bias_gone = probes._removed(model, ["layer1.attention"], group)(ids)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(bias_kept, bias_gone)  # layer 1's b_O is not zero: removing the block drops it


def test_prox_zeros_probe_counts_groups_every_epoch(tmp_path, glue_fixtures_dir, tiny_folder, bench_script):
    probes = bench_script("snip_probes")
    # a λ so large that the first step zeroes every group the task does not hold up
    argv = [*_argv("prox-zeros", glue_fixtures_dir, tiny_folder, tmp_path), "--prox-lambda", "1e6"]
    assert probes.main(argv) == 0
    r = json.loads((tmp_path / "snip_probe_prox_zeros_rte.json").read_text())
    layers = json.loads((tiny_folder / "config.json").read_text())["num_hidden_layers"]
    assert [e["epoch"] for e in r["epochs"]] == [1, 2] and r["kept_epoch"] in (1, 2)
    # the tiny model: 4 heads and 64 / 16 = 4 neuron groups per layer
    assert all(e["groups"] == 8 * layers and e["exact_zero_groups"] == e["groups"] for e in r["epochs"])


def test_grad_balance_probe_measures_both_gradients_without_changing_the_training(tmp_path, glue_fixtures_dir,
                                                                                 tiny_folder, bench_script):
    probes = bench_script("snip_probes")
    argv = _argv("grad-balance", glue_fixtures_dir, tiny_folder, tmp_path)
    assert probes.main([*argv, "--every", "2", "--prior-lambda", "0.01"]) == 0
    r = json.loads((tmp_path / "snip_probe_grad_balance_rte_lambda0.01.json").read_text())
    steps = [x["step"] for x in r["steps"]]
    assert steps[0] == 1 and all(s % 2 == 0 for s in steps[1:]) and len(r["epochs"]) == 2
    assert all(x["grad_task"] > 0 and x["grad_prior"] > 0 and x["R"] > 0 for x in r["steps"])
    assert r["steps"][0]["lambda_t"] < r["steps"][-1]["lambda_t"] <= 0.01  # the warm-up, step by step
    assert probes.main([*argv, "--every", "2", "--prior-lambda", "0"]) == 0  # plain: the prior only measured
    plain = json.loads((tmp_path / "snip_probe_grad_balance_rte_lambda0.json").read_text())
    assert all(x["grad_prior"] == 0 and x["R"] > 0 for x in plain["steps"])
    # measuring changes nothing: the plain probe's dev scores are a plain fine-tune's
    from minisnip.finetune import load_task_data, new_classifier
    from minisnip.glue import TASKS
    from minisnip.train import TrainConfig, fit
    import minisnip
    tok = minisnip.load_tokenizer(tiny_folder)
    data = load_task_data("rte", tok, glue_fixtures_dir, 8, seed=0, max_length=32)
    model = new_classifier(tiny_folder, TASKS["rte"], 1)
    cfg = TrainConfig(epochs=2, lr=1e-4, batch_size=4, max_length=32, seed=1, progress=False)
    history = fit(model, tok, data.task, data.train, data.dev, cfg)
    assert [e["dev"]["dev"]["accuracy"] for e in history.epochs] == [e["dev"] for e in plain["epochs"]]


def test_gate_probe_follows_the_prior_gate_step_by_step(tmp_path, glue_fixtures_dir, tiny_folder, bench_script):
    probes = bench_script("snip_probes")
    argv = [a if a != "rte" else "stsb" for a in _argv("gate", glue_fixtures_dir, tiny_folder, tmp_path)]
    assert probes.main([*argv, "--every", "1"]) == 0
    r = json.loads((tmp_path / "snip_probe_gate_stsb_baseline.json").read_text())
    rows = r["steps"]
    assert [x["step"] for x in rows] == list(range(1, len(rows) + 1)) and len(r["epochs"]) == 2
    first = rows[0]
    # step 1: L̄_1 = L_1; the clamped mean starts at min(L_1, B_1); the gates as PriorPenalty defines them
    assert first["mean_loss"] == first["loss"] and first["clamped_mean_loss"] == min(first["loss"],
                                                                                       first["baseline_loss"])
    for x in rows:
        for mean, g in ((x["mean_loss"], x["gate"]), (x["clamped_mean_loss"], x["clamped_gate"])):
            expect = min(1.0, max(0.0, (1 - mean / x["baseline_loss"]) / 0.25))
            assert abs(g - expect) < 1e-5
        assert x["clamped_mean_loss"] <= x["mean_loss"] + 1e-6  # clamping can only lower the mean
        assert abs(x["lambda_gated"] - x["lambda_t"] * x["gate"]) < 1e-12
    assert rows[0]["lambda_t"] < rows[-1]["lambda_t"]  # the warm-up
    for i in range(1, len(rows)):  # the running mean's recursion, on the clamped losses
        c = min(rows[i]["loss"], rows[i]["baseline_loss"])
        assert abs(rows[i]["clamped_mean_loss"] - (0.98 * rows[i - 1]["clamped_mean_loss"] + 0.02 * c)) < 1e-9
