"""The fine-tuning harness: batching, the fit loop, run directories, result JSON, the command line."""

from __future__ import annotations

import json

import pytest
import torch

import minisnip
from minisnip.__main__ import main
from minisnip.data import length_bucketed_batches, sorted_batches
from minisnip.finetune import load_classifier, load_task_data, run_finetune, run_seeds, summarize
from minisnip.rundir import RunDirError
from minisnip.glue import get_task
from minisnip.train import TrainConfig, TrainHook, TrainingDiverged, fit, make_optimizer


def quick_cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"epochs": 2, "batch_size": 4, "lr": 1e-3, "max_length": 32, "progress": False, **kw})


def test_length_buckets_cover_every_example_once_and_repeat_per_seed():
    lengths = [(i * 37) % 50 + 1 for i in range(203)]
    batches = length_bucketed_batches(lengths, batch_size=8, seed=3, pool=4)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(203))
    assert batches == length_bucketed_batches(lengths, batch_size=8, seed=3, pool=4)
    assert batches != length_bucketed_batches(lengths, batch_size=8, seed=4, pool=4)
    # within a pool the batches are sorted: padding waste is far below that of random batches
    waste = sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)
    assert waste < 0.25 * sum(lengths)
    assert sorted(i for b in sorted_batches(lengths, 16) for i in b) == list(range(203))


def test_schedule_warms_up_then_decays_linearly():
    model = torch.nn.Linear(2, 2)
    opt, sched = make_optimizer(model, TrainConfig(lr=1.0, warmup_ratio=0.2), total_steps=10)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125])
    # no weight decay on biases (and LayerNorm weights): 1-dim parameters are in the second group
    assert opt.param_groups[1]["weight_decay"] == 0.0 and opt.param_groups[1]["params"][0].dim() == 1


@pytest.mark.parametrize("task", ["rte", "stsb", "sst2"])
def test_finetune_run_writes_result_and_loadable_best(tiny_folder, glue_fixtures_dir, tmp_path, task):
    result = run_finetune(task, tmp_path / "run", tiny_folder, glue_fixtures_dir, quick_cfg())
    saved = json.loads((tmp_path / "run" / "result.json").read_text())
    assert saved["status"] == "completed" and saved["task"] == task
    for key in ("data", "hparams", "seed", "epochs", "best_epoch", "best_metrics", "wall_seconds",
                "examples_per_second", "environment"):
        assert saved[key] is not None, key
    assert len(saved["epochs"]) == 2 and saved["data"]["source"] == "local"
    main_metric = get_task(task).main_metric
    assert main_metric in saved["best_metrics"]["dev"]
    # the best checkpoint reproduces the best epoch's dev metric
    best = minisnip.BertForSequenceClassification.from_pretrained(tmp_path / "run" / "best")
    tokenizer = minisnip.load_tokenizer(tmp_path / "run" / "best")
    data = load_task_data(task, tokenizer, glue_fixtures_dir, max_length=32)
    from minisnip.train import evaluate
    metrics = evaluate(best, data.dev["dev"], data.task, tokenizer)
    assert metrics[main_metric] == pytest.approx(result["best_metrics"]["dev"][main_metric], abs=1e-6)


def test_cpu_run_repeats_exactly_for_a_seed(tiny_folder, glue_fixtures_dir, tmp_path):
    a = run_finetune("rte", tmp_path / "a", tiny_folder, glue_fixtures_dir, quick_cfg(seed=7))
    b = run_finetune("rte", tmp_path / "b", tiny_folder, glue_fixtures_dir, quick_cfg(seed=7))
    c = run_finetune("rte", tmp_path / "c", tiny_folder, glue_fixtures_dir, quick_cfg(seed=8))
    assert [e["train_loss"] for e in a["epochs"]] == [e["train_loss"] for e in b["epochs"]]
    assert [e["train_loss"] for e in a["epochs"]] != [e["train_loss"] for e in c["epochs"]]
    wa = minisnip.BertForSequenceClassification.from_pretrained(tmp_path / "a" / "best").state_dict()
    wb = minisnip.BertForSequenceClassification.from_pretrained(tmp_path / "b" / "best").state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_training_learns_a_separable_toy_task(tiny_folder, glue_fixtures_dir):
    """The loop really optimises: on the tiny SST-2 fixture the train loss falls well below log(2)."""
    tokenizer = minisnip.load_tokenizer(tiny_folder)
    data = load_task_data("sst2", tokenizer, glue_fixtures_dir, max_length=32)
    model = load_classifier(tiny_folder, data.task)
    history = fit(model, tokenizer, data.task, data.train, {"train": data.train}, quick_cfg(epochs=40, lr=1e-2, warmup_ratio=0.0))
    assert history.epochs[-1]["train_loss"] < 0.05
    assert history.epochs[-1]["dev"]["train"]["accuracy"] == 1.0
    assert history.epochs[-1]["dev"]["train"]["loss"] < 0.05


def test_after_step_hook_sees_every_step_and_changes_no_result(tiny_folder, glue_fixtures_dir):
    """`after_step` gets each step's number, the model after the update, the layer traces and the mask; with
    dropout off (traces make the last layer compute every position, so dropout draws would differ) the run's
    losses and weights equal those of a run without the hook."""
    tokenizer = minisnip.load_tokenizer(tiny_folder)
    data = load_task_data("rte", tokenizer, glue_fixtures_dir, max_length=32)
    runs = []
    for hooked in (False, True):
        torch.manual_seed(0)
        model = minisnip.BertForSequenceClassification.from_pretrained(
            tiny_folder, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        seen = []

        class Probe(TrainHook):
            needs_traces = True

            def after_step(self, ctx):
                m, traces = ctx.model, ctx.traces
                assert m is model and not torch.is_grad_enabled()
                assert len(traces) == len(m.bert.layers) and traces[0].x.shape[:2] == ctx.mask.shape
                assert ctx.logits.shape == (ctx.batch["input_ids"].shape[0], 2) and ctx.loss.dim() == 0
                seen.append((ctx.step, m.classifier.weight.clone()))
        history = fit(model, tokenizer, data.task, data.train, {"dev": data.dev["dev"]}, quick_cfg(),
                      hooks=[Probe()] if hooked else [], restore_best=False)
        runs.append((history, model, seen))
    (plain, m0, _), (hooked, m1, seen) = runs
    assert [s for s, _ in seen] == list(range(1, hooked.steps + 1))
    assert torch.equal(seen[-1][1], m1.classifier.weight)  # called after the optimiser step
    assert [e["train_loss"] for e in plain.epochs] == pytest.approx([e["train_loss"] for e in hooked.epochs], rel=1e-5)
    for (name, a), b in zip(m0.state_dict().items(), m1.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), name


def test_kept_metrics_are_those_of_the_model_fit_leaves(tiny_folder, glue_fixtures_dir):
    from minisnip.pruning.recipe import dev_scores
    from minisnip.train import History
    # by hand: the best epoch is the first; without a restore the model holds the last one's weights
    epochs = [{"epoch": 1, "dev": {"dev": {"accuracy": 0.9}}}, {"epoch": 2, "dev": {"dev": {"accuracy": 0.5}}}]
    h = History(epochs=epochs, best_epoch=1, best_metrics=epochs[0]["dev"])
    assert (h.kept_epoch, h.kept_metrics) == (2, epochs[1]["dev"])
    h.restored_best = True
    assert (h.kept_epoch, h.kept_metrics) == (1, epochs[0]["dev"])
    # and fit says which it did: the kept scores are what the model scores after fit
    tokenizer = minisnip.load_tokenizer(tiny_folder)
    data = load_task_data("sst2", tokenizer, glue_fixtures_dir, max_length=32)
    for restore in (True, False):
        torch.manual_seed(0)
        model = load_classifier(tiny_folder, data.task)
        history = fit(model, tokenizer, data.task, data.train, {"dev": data.dev["dev"]}, quick_cfg(epochs=3),
                      restore_best=restore)
        assert history.restored_best is restore
        assert history.kept_epoch == (history.best_epoch if restore else 3)
        now = dev_scores(model, tokenizer, data)["dev"]["accuracy"]
        assert now == pytest.approx(history.kept_metrics["dev"]["accuracy"], abs=1e-6)


def test_nan_loss_stops_naming_the_step_and_keeps_last_good_checkpoint(tiny_folder, glue_fixtures_dir, tmp_path):
    tokenizer = minisnip.load_tokenizer(tiny_folder)
    data = load_task_data("rte", tokenizer, glue_fixtures_dir, max_length=32)
    model = load_classifier(tiny_folder, data.task)
    steps_per_epoch = -(-len(data.train) // 4)
    calls = {"n": 0}

    class NanAfterEpoch1(TrainHook):  # finite through epoch 1, then NaN
        def loss(self, ctx):
            calls["n"] += 1
            return torch.tensor(float("nan") if calls["n"] > steps_per_epoch else 0.0)

    with pytest.raises(TrainingDiverged, match=rf"step {steps_per_epoch + 1} \(epoch 2, batch 1\).*best"):
        fit(model, tokenizer, data.task, data.train, data.dev, quick_cfg(), out_dir=tmp_path, hooks=[NanAfterEpoch1()])
    reloaded = minisnip.BertForSequenceClassification.from_pretrained(tmp_path / "best")
    assert all(torch.isfinite(p).all() for p in reloaded.parameters())


def test_ctrl_c_leaves_result_and_checkpoint_loadable(tiny_folder, glue_fixtures_dir, tmp_path, monkeypatch):
    import minisnip.finetune as ft
    real_fit = ft.fit

    def interrupted_fit(model, tokenizer, task, train, *args, **kwargs):
        calls, steps_per_epoch = {"n": 0}, -(-len(train) // 4)

        class CtrlC(TrainHook):
            def before_forward(self, ctx):
                calls["n"] += 1
                if calls["n"] > steps_per_epoch:  # Ctrl-C in epoch 2, after epoch 1 saved its checkpoint
                    raise KeyboardInterrupt
        return real_fit(model, tokenizer, task, train, *args, **kwargs, hooks=[CtrlC()])

    monkeypatch.setattr(ft, "fit", interrupted_fit)
    with pytest.raises(KeyboardInterrupt):
        run_finetune("rte", tmp_path / "run", tiny_folder, glue_fixtures_dir, quick_cfg())
    assert json.loads((tmp_path / "run" / "result.json").read_text())["status"] == "interrupted"
    minisnip.BertForSequenceClassification.from_pretrained(tmp_path / "run" / "best")
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_run_dir_holding_a_run_is_refused_unless_overwrite(tiny_folder, glue_fixtures_dir, tmp_path):
    run_finetune("wnli", tmp_path / "run", tiny_folder, glue_fixtures_dir, quick_cfg(epochs=1))
    with pytest.raises(RunDirError, match="already holds a run.*--overwrite"):
        run_finetune("wnli", tmp_path / "run", tiny_folder, glue_fixtures_dir, quick_cfg(epochs=1))
    run_finetune("wnli", tmp_path / "run", tiny_folder, glue_fixtures_dir, quick_cfg(epochs=1), overwrite=True)


def test_multi_seed_summary_reports_mean_and_std(tiny_folder, glue_fixtures_dir, tmp_path):
    summary = run_seeds("mrpc", tmp_path / "seeds", [1, 2], tiny_folder, glue_fixtures_dir, quick_cfg(epochs=1))
    f1 = summary["metrics"]["dev"]["f1"]
    saved = json.loads((tmp_path / "seeds" / "summary.json").read_text())
    assert saved["constant"] == summary["constant"]
    assert f1["n"] == 2 and len(f1["values"]) == 2
    assert (tmp_path / "seeds" / "seed-1" / "result.json").exists() and (tmp_path / "seeds" / "summary.json").exists()
    s = summarize([{"dev": {"accuracy": 0.5}}, {"dev": {"accuracy": 0.7}}, {"dev": {"accuracy": 0.9}}])
    assert s["dev"]["accuracy"]["mean"] == pytest.approx(0.7)
    assert s["dev"]["accuracy"]["std"] == pytest.approx(0.2)  # sample std of 0.5, 0.7, 0.9
    seed_result = json.loads((tmp_path / "seeds" / "seed-1" / "result.json").read_text())
    assert summary["constant"] == seed_result["constant"]  # the floor of every seed: one majority vote


def test_a_score_no_better_than_the_majority_vote_is_said_to_be_one():
    from minisnip.finetune import format_result
    from minisnip.pruning.recipe import format_prune_result
    base = {"task": "mrpc", "model": "m", "data": {"train_examples": 8}, "seed": 1, "constant": {"dev": {"f1": 0.8122}}}
    learnt = format_result({**base, "best_metrics": {"dev": {"f1": 0.85}}})
    majority = format_result({**base, "best_metrics": {"dev": {"f1": 0.8122}}})
    assert "WARNING" not in learnt
    assert "WARNING: the fine-tuned model scores f1 81.22, no better than always predicting the majority class " \
           "(81.22): the task was not learnt" in majority
    seeds = format_result({**base, "seeds": [1, 2], "metrics": {"dev": {"f1": {"mean": 0.83, "std": 0.02, "n": 2,
                                                                               "values": [0.81, 0.85]}}}})
    assert "WARNING: on 1 of 2 seeds, the fine-tuned model scores f1 81.00" in seeds
    assert "WARNING" not in format_result({k: v for k, v in base.items() if k != "constant"}
                                          | {"best_metrics": {"dev": {"f1": 0.5}}})  # older results: no floor known
    pruned = {"task": "mrpc", "method": "movement", "model": "m", "data": {"train_examples": 8}, "wall_seconds": 1.0,
              "main_metric": "f1", "compression": 0.5, "compression_definition": "c",
              "scores": {"finetuned": {"dev": {"f1": 0.86}}, "pruned_before_recovery": {"dev": {"f1": 0.5}},
                         "pruned": {"dev": {"f1": 0.8122}}, "constant": {"dev": {"f1": 0.8122}}}}
    assert "WARNING: the pruned model scores f1 81.22" in format_prune_result(pruned)
    assert "lost the task" in format_prune_result(pruned)
    fine = {**pruned, "scores": {**pruned["scores"], "pruned": {"dev": {"f1": 0.84}}}}
    assert "WARNING" not in format_prune_result(fine)  # before recovery at the floor: expected, not warned


def test_cli_finetune_then_evaluate(tiny_folder, glue_fixtures_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["finetune", "--task", "RTE", "--glue-dir", str(glue_fixtures_dir), "--model", str(tiny_folder),
                 "--epochs", "1", "--batch-size", "4", "--max-length", "32", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "RTE" in printed and "accuracy" in printed
    assert main(["evaluate", "--task", "rte", "--glue-dir", str(glue_fixtures_dir), "--model", str(out / "best"),
                 "--out", str(tmp_path / "eval.json")]) == 0
    saved = json.loads((tmp_path / "eval.json").read_text())
    result = json.loads((out / "result.json").read_text())
    assert saved["metrics"]["dev"]["accuracy"] == pytest.approx(result["best_metrics"]["dev"]["accuracy"])


def test_cli_errors_are_clear(glue_fixtures_dir, tmp_path, capsys):
    assert main(["finetune", "--task", "nosuchtask", "--glue-dir", str(glue_fixtures_dir),
                 "--out", str(tmp_path / "x")]) == 2
    assert "nosuchtask" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["finetune", "--help"])
    assert e.value.code == 0
    assert "--max-train" in capsys.readouterr().out


def test_bad_hyper_parameters_are_refused():
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=0)
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="amp"):
        TrainConfig(amp="fp8")


def test_bf16_autocast_path_runs_and_learns(tiny_folder, glue_fixtures_dir):
    """The autocast branch (bf16 on CUDA by default) exercised on the CPU, where autocast supports bf16 too."""
    from minisnip.train import amp_dtype, resolve_device
    assert amp_dtype(torch.device("cpu"), "auto") is None and amp_dtype(torch.device("cpu"), "bf16") == torch.bfloat16
    tokenizer = minisnip.load_tokenizer(tiny_folder)
    data = load_task_data("sst2", tokenizer, glue_fixtures_dir, max_length=32)
    model = load_classifier(tiny_folder, data.task)
    history = fit(model, tokenizer, data.task, data.train, {"train": data.train},
                  quick_cfg(epochs=30, lr=1e-2, warmup_ratio=0.0, amp="bf16"))
    assert history.epochs[-1]["train_loss"] < 0.1
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
    assert resolve_device("cpu").type == "cpu"


def test_traces_are_packed_only_when_every_reader_takes_packed_traces(tiny_folder, glue_fixtures_dir):
    """fit records packed traces (real tokens only) when every hook that needs traces sets packed_traces, and
    traces on the batch layout as soon as one reader does not."""
    tokenizer = minisnip.load_tokenizer(tiny_folder)
    data = load_task_data("rte", tokenizer, glue_fixtures_dir, max_length=32)

    class Reader(TrainHook):
        needs_traces = True

        def __init__(self, packed: bool):
            self.packed_traces, self.seen = packed, []

        def after_step(self, ctx):
            padded = bool((ctx.mask == 0).any())
            t = ctx.traces[0]
            self.seen.append((padded, t.packing is not None, t.x.dim()))

    for flags in ([True], [True, False]):
        readers = [Reader(f) for f in flags]
        fit(load_classifier(tiny_folder, data.task), tokenizer, data.task, data.train, {"dev": data.dev["dev"]},
            quick_cfg(epochs=1), hooks=readers)
        seen = readers[0].seen
        assert any(padded for padded, _, _ in seen)  # the fixture's batches carry padding
        for padded, packed, dim in seen:
            assert packed == (padded and all(flags))  # without padding there is nothing to pack
            assert dim == (2 if packed else 3)  # (tokens, hidden) or (batch, seq, hidden)


def test_the_last_layer_is_traced_for_cls_only_when_every_reader_takes_it(tiny_folder, glue_fixtures_dir):
    """fit asks for a last layer whose FFN output is computed at [CLS] alone (LayerTrace.cls_rows) when every hook
    that needs traces sets cls_traces (SNIP's prior does), and for the whole layer as soon as one reader does not
    (hidden-state distillation reads every token's output)."""
    tokenizer = minisnip.load_tokenizer(tiny_folder)
    data = load_task_data("rte", tokenizer, glue_fixtures_dir, max_length=32)

    class Reader(TrainHook):
        needs_traces = packed_traces = True

        def __init__(self, cls: bool):
            self.cls_traces, self.seen = cls, []

        def after_step(self, ctx):
            last, first = ctx.traces[-1], ctx.traces[0]
            batch, real = ctx.batch["input_ids"].shape[0], int(ctx.mask.sum())
            expect = batch if last.cls_rows is not None or last.packing is None else real  # y's rows (tokens, packed)
            self.seen.append((last.cls_rows is not None, first.cls_rows is None, last.y.shape[0], expect))

    from minisnip.snip.prior import PriorPenalty
    assert PriorPenalty.cls_traces
    for flags in ([True], [True, False]):
        readers = [Reader(f) for f in flags]
        fit(load_classifier(tiny_folder, data.task), tokenizer, data.task, data.train, {"dev": data.dev["dev"]},
            quick_cfg(epochs=1), hooks=readers)
        for cls, first_whole, rows, expect in readers[0].seen:
            assert cls == all(flags) and first_whole and rows == expect
