"""bench/bench_finetune.py: minisnip's `fit` and a plain Hugging Face loop train the same way.

The deterministic check: with every dropout probability at 0, the same weights and the same batches, the
two implementations must give the same loss at every step. Then a smoke test of the script's --quick mode
(no timing thresholds).
"""

from __future__ import annotations

import json
import math

import pytest




pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bench(bench_script):
    pytest.importorskip("transformers")
    return bench_script("bench_finetune")


@pytest.fixture(scope="module")
def tokenizer(minilm_path):
    from minisnip import load_tokenizer
    return load_tokenizer(minilm_path)


def _check(bench, minilm_path, tokenizer, glue_dir, task, max_train, batch_size, steps):
    from minisnip.finetune import load_task_data
    from minisnip.train import TrainConfig

    data = load_task_data(task, tokenizer, glue_dir, max_train=max_train, seed=0, max_length=32, source="local")
    cfg = TrainConfig(lr=1e-4, batch_size=batch_size, max_length=32, seed=1, device="cpu", amp="off", progress=False)
    res = bench.no_dropout_check(minilm_path, tokenizer, data.task, data.train, data.dev, cfg, steps, tol=1e-4)
    a, b = res["losses"]["minisnip"], res["losses"]["transformers"]
    assert len(a) == len(b) == steps
    assert all(math.isfinite(x) for x in a + b)
    assert len(set(a)) > 1  # the weights really moved between steps
    for step, (x, y) in enumerate(zip(a, b), 1):
        assert x == pytest.approx(y, rel=1e-4), f"step {step}: minisnip loss {x} vs transformers {y}"
    assert res["passed"] and res["max_rel_diff"] <= 1e-4
    assert res["max_abs_logit_diff_before"] < 1e-4 and res["max_abs_logit_diff_after"] < 1e-3
    return res


def test_no_dropout_losses_match_step_by_step_real_glue(bench, minilm_path, tokenizer, glue_dir):
    """16 real SST-2 rows, batch 4 x 32 tokens: 4 steps (warm-up step then decay), equal losses."""
    _check(bench, minilm_path, tokenizer, glue_dir, "sst2", max_train=16, batch_size=4, steps=4)


def test_no_dropout_losses_match_step_by_step_pair_fixture(bench, minilm_path, tokenizer, glue_fixtures_dir):
    """The RTE fixture (sentence pairs: token types 0/1), one example per step."""
    _check(bench, minilm_path, tokenizer, glue_fixtures_dir, "rte", max_train=3, batch_size=1, steps=3)


def test_disable_dropout_reaches_every_dropout(bench, minilm_path):
    from minisnip.glue import get_task

    ms, hf = bench.load_pair(minilm_path, get_task("sst2"), seed=0, device="cpu")
    assert bench.dropout_probs(ms) == bench.dropout_probs(hf) == [0.1]  # MiniLM's config: 0.1 everywhere
    bench.disable_dropout(ms), bench.disable_dropout(hf)
    assert bench.dropout_probs(ms) == bench.dropout_probs(hf) == [0.0]


def test_quick_run_writes_json_and_markdown(bench, minilm_path, glue_fixtures_dir, tmp_path):
    result = bench.main(["--quick", "--threads", "1", "--glue-dir", str(glue_fixtures_dir), "--out", str(tmp_path)])
    data = json.loads((tmp_path / "finetune_cpu.json").read_text())
    assert data == json.loads(json.dumps(result))
    assert {"machine", "settings", "tasks", "wall_seconds"} <= set(data)
    for key in ("torch", "transformers", "cpu_model", "torch_threads", "device"):
        assert key in data["machine"]
    s = data["settings"]
    assert s["quick"] and s["task"] == ["sst2"] and s["seeds"] == [1, 2] and s["max_length"] == 32

    (task,) = data["tasks"]
    assert task["task"] == "sst2" and task["metric"] == "accuracy"
    assert task["dropout"]["minisnip"] == task["dropout"]["transformers"]
    assert task["no_dropout_check"]["passed"] and task["no_dropout_check"]["steps"] == 2
    runs = task["runs"]
    assert [(r["seed"], r["impl"]) for r in runs] == [(1, "minisnip"), (1, "transformers"),
                                                      (2, "transformers"), (2, "minisnip")]  # interleaved A B, B A
    for r in runs:
        assert r["initial_max_abs_logit_diff"] < 1e-4
        assert 0.0 <= r["final"] <= 1.0 and 0.0 <= r["best"] <= 1.0
        assert r["examples_per_s"] > 0 and r["tokens_per_s"] > 0 and r["cpu_seconds"] > 0
        assert r["train_examples"] == 4 and r["steps"] == 2  # the SST-2 fixture: 4 rows, batch 2
    # the same batches: both implementations saw the same number of real tokens, per seed
    by = {(r["seed"], r["impl"]): r for r in runs}
    for seed in (1, 2):
        assert by[seed, "minisnip"]["train_tokens"] == by[seed, "transformers"]["train_tokens"]

    summary = task["summary"]
    for key in ("final", "best"):
        assert {"diff_of_means", "pooled_seed_std", "se_of_diff", "paired_diff", "within_noise"} <= set(summary[key])
        assert summary[key]["minisnip"]["n"] == 2
    for key in ("examples_per_s", "examples_per_cpu_s"):
        ratio = summary[key]["ratio_median"]
        assert math.isfinite(ratio) and ratio > 0
    # with dropout on, the masks differ (minisnip skips padding and the last layer's non-[CLS] positions, so it
    # draws fewer random numbers), so the runs differ a little; the bench reports by how much
    assert 0.0 <= summary["max_rel_train_loss_diff"] < 0.5

    md = (tmp_path / "finetune_cpu.md").read_text()
    assert "| sst2 (accuracy) | minisnip |" in md and "| sst2 (accuracy) | transformers |" in md
    assert "No-dropout check" in md and "passed" in md
