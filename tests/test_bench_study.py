"""bench/study.py on the tiny GLUE fixtures: the plan, shared fine-tunes, resuming, shards and the summary
(bookkeeping only: no timing, no quality thresholds)."""

from __future__ import annotations

import json

import pytest


def test_study_runs_resumes_and_tabulates(tmp_path, glue_fixtures_dir, tiny_folder, bench_script):
    study = bench_script("study")
    out = tmp_path / "study"
    argv = ["--glue-dir", str(glue_fixtures_dir), "--model", str(tiny_folder), "--tasks", "rte", "--seeds", "1",
            "--targets", "0.5", "--unstructured-targets", "0.9", "--methods", "snip", "snip-no-prior", "magnitude",
            "magnitude-unstructured", "--max-train", "8", "--epochs", "1", "--batch-size", "4", "--max-length",
            "32", "--out", str(out)]
    assert study.main([*argv, "--shard", "1/2"]) == 0  # half of the cells
    half = study.read_records(out.with_suffix(".jsonl"))
    assert study.main([*argv, "--shard", "0/2"]) == 0  # the other half
    records = study.read_records(out.with_suffix(".jsonl"))
    keys = {(r["method"], r["target"]) for r in records}
    # dense once; four methods at 50%; the unstructured one also at 90%
    assert keys == {("dense", 0.0), ("snip", 0.5), ("snip-no-prior", 0.5), ("magnitude", 0.5),
                    ("magnitude-unstructured", 0.5), ("magnitude-unstructured", 0.9)}
    assert 0 < len(half) < len(records)
    for r in records:
        reached = r["sparsity"] if r.get("sparsity") is not None else r["compression"]  # unstructured: weights
        assert r["method"] == "dense" or reached >= r["target"] - 0.01
        assert r["method"] == "dense" or (r["speedup"] > 0 and r["speedup_cpu"] > 0)
        assert r["code"] is None or len(r["code"]) >= 7  # the commit that computed the cell (None outside git)
    assert len({r["constant_score"] for r in records}) == 1  # RTE's majority vote, the floor of every cell
    shared = {r["method"]: r["finetuned"] for r in records if r["method"] in ("dense", "snip-no-prior", "magnitude")}
    assert len(set(shared.values())) == 1  # plain methods share the dense fine-tune
    assert study.main(argv) == 0  # resumes: nothing left to run, nothing duplicated
    assert len(out.with_suffix(".jsonl").read_text().splitlines()) == len(records)
    summary = json.loads(out.with_suffix(".json").read_text())["summary"]
    assert summary["rte"]["magnitude-unstructured"]["0.9"]["n"] == 1
    md = out.with_suffix(".md").read_text()
    assert "| snip |" in md and "**" in md and (tmp_path / "study_rte.png").stat().st_size > 1000
    assert "**50% on every task**" in md  # the cross-task table with the share of dense kept
    body = md.split("\n\n", 1)[1]  # below the header line (which explains the notation)
    assert " ± " not in body and summary["rte"]["snip"]["0.5"]["std"] is None  # one seed: no spread to show


def test_snips_lead_over_the_baselines_is_read_with_the_standard_error_of_the_difference(bench_script):
    study = bench_script("study")

    def cells(method, scores, before):
        return [{"task": "sst2", "seed": s, "method": method, "target": 0.5, "score": a, "before_recovery": b,
                 "main_metric": "accuracy"} for s, (a, b) in enumerate(zip(scores, before), start=1)]
    records = (cells("snip", [0.80, 0.82], [0.78, 0.80]) + cells("magnitude", [0.78, 0.80], [0.70, 0.72])
               + cells("heads", [0.80], [0.75]) + cells("snip-no-prior", [0.78, 0.79], [0.60, 0.66]))
    summary = study.summarize(records)
    snip, mag = summary["sst2"]["snip"]["0.5"], summary["sst2"]["magnitude"]["0.5"]
    diff, se = study.lead(snip, mag)
    # both std = 0.01·sqrt(2), n = 2: se = sqrt(0.0002/2 + 0.0002/2) = 0.01414
    assert diff == pytest.approx(0.02) and se == pytest.approx(0.02 ** 0.5 / 10)
    assert study.lead(snip, summary["sst2"]["heads"]["0.5"]) == (pytest.approx(0.01), None)  # one seed: no s.e.
    bd, bse = study.lead(snip, summary["sst2"]["snip-no-prior"]["0.5"], "before_recovery")
    assert bd == pytest.approx(0.16) and bse == pytest.approx((0.0002 / 2 + 0.0018 / 2) ** 0.5)
    md = study.snip_lead(summary, [0.3, 0.5])
    [row] = [line for line in md.splitlines() if line.startswith("| sst2")]  # no snip cell at 30%: no row
    # the strongest baseline by mean (heads, one seed: no s.e.), and one of two baselines led by more than the s.e.
    # (magnitude: +2.0 against 1.4; heads cannot count)
    assert "| heads 80.0 (n=1) | +1.0 (one seed) |" in row and "| 1 of 2 |" in row and "+16.0 ± 3.2 (ahead by > s.e.)" in row
    assert study.snip_lead(study.summarize(cells("heads", [0.8], [0.7])), [0.5]) == ""  # no snip: no table
    # a distilled baseline is a baseline too (where its paper distils, that is the method as published)
    distilled = [dict(r, distill=True) for r in cells("magnitude", [0.83, 0.83], [0.80, 0.80])]
    md = study.snip_lead(study.summarize(records + distilled), [0.5])
    [row] = [line for line in md.splitlines() if line.startswith("| sst2")]
    assert "| magnitude +distill 83.0 ± 0.0 (n=2) | -2.0 ± 1.0 (behind by > s.e.) | 1 of 3 |" in row


def test_snips_lead_paired_by_seed_leaves_out_what_a_seed_does_to_both(bench_script):
    study = bench_script("study")

    def cells(method, scores):
        return [{"task": "mrpc", "seed": s, "method": method, "target": 0.5, "score": a, "before_recovery": a,
                 "main_metric": "f1"} for s, a in zip((1, 2, 3), scores) if a is not None]
    # seed 2 is good for every method: unpaired, SNIP's +1.0 is within the s.e.; per seed it is +1.0 every time
    records = (cells("snip", [0.80, 0.84, 0.81]) + cells("magnitude", [0.79, 0.83, 0.80])
               + cells("heads", [0.81, None, 0.79]))
    assert study.paired_lead(records, "mrpc", 0.5, "snip", "magnitude") == (pytest.approx(0.01), pytest.approx(0.0), 3)
    d, se, n = study.paired_lead(records, "mrpc", 0.5, "snip", "heads")  # the seeds both have: 1 and 3
    # d = [-0.01, +0.02]: mean 0.005, stdev 0.015·sqrt(2), s.e. 0.015
    assert (d, n) == (pytest.approx(0.005), 2) and se == pytest.approx(0.015)
    assert study.paired_lead(records, "mrpc", 0.3, "snip", "heads")[2] == 0  # no cells there
    summary = study.summarize(records)
    diff, unpaired_se = study.lead(summary["mrpc"]["snip"]["0.5"], summary["mrpc"]["magnitude"]["0.5"])
    assert diff == pytest.approx(0.01) and unpaired_se > 0.01
    md = study.snip_lead(summary, [0.5], records)
    assert "| paired lead | ahead, paired |" in md
    [row] = [line for line in md.splitlines() if line.startswith("| mrpc")]
    # strongest by mean: magnitude (80.67 against heads' 80.0), +1.0 ± 1.7 unpaired, +1.0 ± 0.0 paired. Each test
    # counts one of the two: unpaired heads (+1.7 ± 1.6 over all of both's seeds), paired magnitude (heads' paired
    # +0.5 on seeds 1 and 3 is within its s.e. 1.5)
    assert study.lead(summary["mrpc"]["snip"]["0.5"], summary["mrpc"]["heads"]["0.5"])[0] == pytest.approx(1 / 60)
    assert "| magnitude 80.7 ± 2.1 (n=3) | +1.0 ± 1.7 (within the s.e.) | 1 of 2 |" in row
    assert "| +1.0 ± 0.0 (ahead by > s.e.) (n=3) | 1 of 2 |" in row
    assert "paired" not in study.snip_lead(summary, [0.5])  # without the records: the table as before


def test_cells_no_better_than_the_constant_predictor_are_marked(tmp_path, glue_fixtures_dir, bench_script):
    study = bench_script("study")
    cells = [{"task": "mrpc", "seed": s, "method": m, "target": t, "score": a, "before_recovery": a,
              "main_metric": "f1", "constant_score": 0.8122}
             for m, t, scores in (("dense", 0.0, (0.85, 0.86)), ("movement", 0.5, (0.8122, 0.8122)),
                                  ("magnitude", 0.5, (0.84, 0.8122)), ("snip", 0.5, (0.85, 0.85)))
             for s, a in zip((1, 2), scores)]
    md = study.table(study.summarize(cells), [0.5])
    assert "**mrpc** (f1 x100; dense 85.5 ± 0.7, n=2; constant predictor 81.2)" in md
    assert "| movement | 81.2 ± 0.0 (n=2, 2 ≤ constant) [81.2] |" in md
    assert "| magnitude | 82.6 ± 2.0 (n=2, 1 ≤ constant) [82.6] |" in md and "| snip | **85.0 ± 0.0** (n=2) [85.0] |" in md
    # records written before the runner recorded the floor get it from the data, as the runner computes it
    old = [{k: v for k, v in r.items() if k != "constant_score"} for r in cells]
    filled = study.with_constants(old, glue_fixtures_dir, 8)
    from minisnip.glue import load_split
    from minisnip.metrics import constant_scores
    train, dev = load_split("mrpc", "train", glue_fixtures_dir, max_examples=8, seed=0), load_split("mrpc", "dev",
                                                                                                  glue_fixtures_dir)
    assert {r["constant_score"] for r in filled} == {constant_scores("mrpc", train["label"], dev["label"])["f1"]}
    assert study.with_constants(cells, tmp_path, 8) == cells  # recorded floors need no data


def test_snips_parts_are_read_against_the_default_seed_by_seed(bench_script):
    study = bench_script("study")
    cells = [{"task": "sst2", "seed": s, "method": m, "target": 0.5, "score": a, "before_recovery": a - 0.01,
              "main_metric": "accuracy", "constant_score": 0.5}
             for m, scores in (("snip", (0.80, 0.84, 0.82)), ("snip-no-sn", (0.81, 0.85, None)),
                               ("snip-lambda1e-3", (0.79, 0.83, 0.80)), ("magnitude", (0.9, 0.9, 0.9)))
             for s, a in zip((1, 2, 3), scores) if a is not None]
    md = study.snip_parts(study.summarize(cells), cells, 0.5)
    lines = md.splitlines()
    assert lines[2] == "| variant | sst2 |" and lines[4] == "| snip (default) | 82.0 ± 2.0 (n=3) [81.0] |"
    # per seed: no-sn +1.0 on both its seeds; λ 1e-3 -1, -1, -2 (mean -1.33, s.e. 0.33)
    assert "| snip-lambda1e-3 | 80.7 ± 2.1 (n=3) [79.7]; -1.3 ± 0.3 |" in lines
    assert "| snip-no-sn | 83.0 ± 2.8 (n=2) [82.0]; +1.0 ± 0.0 |" in lines
    assert not any("magnitude" in line for line in lines)  # the baselines are in the lead table, not here
    assert study.snip_parts(study.summarize(cells), cells, 0.3) == ""  # no cells there


def test_share_of_dense_averages_over_sst2_mrpc_stsb_and_shows_cola_beside(bench_script):
    study = bench_script("study")
    records = [{"task": t, "seed": 1, "method": m, "target": target, "score": score, "before_recovery": score,
                "main_metric": "x"}
               for t, dense, pruned in (("sst2", 0.8, 0.76), ("mrpc", 0.8, 0.8), ("cola", 0.2, 0.1))
               for m, target, score in (("dense", 0.0, dense), ("snip", 0.5, pruned))]
    md = study.across_tasks(records, study.summarize(records), 0.5)
    assert "then over sst2, mrpc)" in md and "| snip | 76.0 (n=1) [76.0] | 80.0 (n=1) [80.0] | 10.0 (n=1) [10.0] |" in md
    assert md.rstrip().endswith("| 97.5% |")  # (0.95 + 1.0) / 2: CoLA's 0.5 is shown, not averaged


def test_max_train_takes_a_count_or_all(bench_script):
    study = bench_script("study")
    assert study._max_train("all") is None and study._max_train("4000") == 4000
    for bad in ("0", "-3"):
        with pytest.raises(Exception, match="max-train"):
            study._max_train(bad)


def test_recipe_variants_change_the_recipe_and_share_what_they_can(bench_script):
    study = bench_script("study")
    snip, per_param, blocks = (study.Cell("mrpc", 1, m, 0.5) for m in ("snip", "snip-per-param", "snip-blocks"))
    assert per_param.training == snip.training  # only the selection differs
    assert blocks.training != snip.training  # the prior penalises other branches: its own fine-tune
    runner = study.Study.__new__(study.Study)  # prune_cfg reads only the arguments
    runner.args = type("A", (), {"recovery_epochs": 1})()
    assert runner.prune_cfg(per_param).per_param and not runner.prune_cfg(snip).per_param
    assert runner.prune_cfg(blocks).kinds == ("attention", "ffn") and runner.prune_cfg(snip).kinds == ("head", "neurons")


def test_last_epoch_variant_prunes_the_last_epochs_model(tmp_path, glue_fixtures_dir, tiny_folder, bench_script):
    study = bench_script("study")
    out = tmp_path / "study"
    argv = ["--glue-dir", str(glue_fixtures_dir), "--model", str(tiny_folder), "--tasks", "rte", "--seeds", "1",
            "--targets", "0.5", "--unstructured-targets", "--methods", "snip", "snip-last", "--max-train", "8",
            "--epochs", "2", "--batch-size", "4", "--max-length", "32", "--recovery-epochs", "0", "--out", str(out)]
    assert study.main(argv) == 0
    records = {r["method"]: r for r in study.read_records(out.with_suffix(".jsonl"))}
    assert records["snip-last"]["finetune_epoch"] == 2  # the last of 2 epochs, whichever scored best
    assert records["snip"]["finetune_epoch"] in (1, 2) and records["dense"]["finetune_epoch"] in (1, 2)
    # the same fine-tune (same seed and terms), only the epoch kept differs: the best one scores at least as well
    best, last = records["snip"]["finetuned"], records["snip-last"]["finetuned"]
    assert best == last if records["snip"]["finetune_epoch"] == 2 else best >= last
    assert study.Cell("rte", 1, "snip-last", 0.5).training != study.Cell("rte", 1, "snip", 0.5).training
    spread = records["snip"]["activation_spread"]  # of the fine-tuned model, per layer
    layers = json.loads((tiny_folder / "config.json").read_text())["num_hidden_layers"]
    assert set(spread) == {"ffn_act_std", "attention_out_std", "ffn_out_std", "ffn_act_q999"}
    assert all(len(v) == layers and all(x > 0 for x in v) for v in spread.values())


def test_plan_runs_each_task_and_seed_together(bench_script):
    """The runner keeps one task and seed's fine-tunes in memory: the plan must not leave a task and come back."""
    study = bench_script("study")
    args = type("A", (), {"seeds": [1, 2], "tasks": ["sst2", "mrpc"], "targets": [0.3, 0.5, 0.7],
                          "unstructured_targets": [0.9], "methods": ["snip", "magnitude-unstructured"],
                          "distill": False})()
    cells = study.plan(args)
    groups = [(c.seed, c.task) for c in cells]
    runs = [g for i, g in enumerate(groups) if i == 0 or groups[i - 1] != g]
    assert runs == [(1, "sst2"), (1, "mrpc"), (2, "sst2"), (2, "mrpc")]  # each visited once, in the given order
    first = [c for c in cells if (c.seed, c.task) == (1, "sst2")]
    assert first[0].method == "dense" and [c.target for c in first[1:3]] == [0.5, 0.5]  # dense, then 50% first
    assert [c.target for c in first[-1:]] == [0.9]  # the extra targets last


def test_claims_are_taken_once_and_taken_over_from_dead_processes(tmp_path, bench_script):
    """--claim's queue: a unit's claim file is created by one process only; a claim whose process of this host
    is gone is taken over; one of another host is left alone."""
    import os
    import socket
    import subprocess
    import sys

    study = bench_script("study")
    folder = tmp_path / "study.claims"
    unit = ("mrpc", 1, "snip", False)
    assert study.claim(folder, unit) is True
    assert study.claim(folder, unit) is False  # this (live) process holds it
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()  # a pid that has exited
    other = ("sst2", 2, "plain", False)
    path = folder / "sst2_2_plain_False.claim"
    path.write_text(f"{socket.gethostname()} {dead}")
    assert study.claim(folder, other) is True and path.read_text() == f"{socket.gethostname()} {os.getpid()}"
    path.write_text(f"another-host {dead}")
    assert study.claim(folder, other) is False  # another host's process: not ours to judge
    assert sorted(p.name for p in folder.iterdir()) == ["mrpc_1_snip_False.claim", "sst2_2_plain_False.claim"]


def test_claiming_process_runs_the_plan_and_a_deadline_leaves_the_rest(tmp_path, glue_fixtures_dir, tiny_folder,
                                                                      bench_script):
    study = bench_script("study")
    out = tmp_path / "study"
    argv = ["--glue-dir", str(glue_fixtures_dir), "--model", str(tiny_folder), "--tasks", "rte", "--seeds", "1",
            "--targets", "0.5", "--unstructured-targets", "--methods", "snip", "magnitude", "--max-train", "8",
            "--epochs", "1", "--batch-size", "4", "--max-length", "32", "--out", str(out), "--claim",
            "--code", "abc1234"]
    assert study.main([*argv, "--deadline", "0"]) == 0  # past its deadline before the first cell
    assert not out.with_suffix(".jsonl").exists() or not out.with_suffix(".jsonl").read_text().strip()
    assert study.main(argv) == 0
    records = study.read_records(out.with_suffix(".jsonl"))
    assert {(r["method"], r["target"]) for r in records} == {("dense", 0.0), ("snip", 0.5), ("magnitude", 0.5)}
    assert all(r["device"] == "cpu" and r["amp"] == "auto" for r in records)
    assert not out.with_suffix(".md").exists()  # a claiming process leaves the summary to --summarize


def test_estimate_counts_prior_trainings_at_their_own_speed(bench_script):
    """estimate_seconds: every training's epochs over its throughput (SNIP's prior at the measured prior speed),
    plus one recovery epoch per pruned cell at the plain speed."""
    study = bench_script("study")
    args = type("A", (), {"seeds": [1], "tasks": ["sst2"], "targets": [0.5], "unstructured_targets": [],
                          "methods": ["snip", "magnitude"], "distill": False, "max_train": 100, "epochs": 3,
                          "recovery_epochs": 1})()
    cells = study.plan(args)  # dense, snip, magnitude: two trainings (plain, snip), two recoveries
    plain, prior = 10.0, 5.0
    want = 3 * 100 / plain + 3 * 100 / prior + 2 * 100 / plain
    assert study.estimate_seconds(cells, args, plain, prior) == pytest.approx(want)
    assert study.estimate_seconds(cells, args, plain) == pytest.approx((3 + 3 + 2) * 100 / plain)


def test_readme_blocks_get_the_summarys_tables_and_a_readme_without_them_is_refused(tmp_path, bench_script):
    study = bench_script("study")
    out = tmp_path / "study"
    records = [{"task": "sst2", "seed": s, "method": m, "target": target, "distill": False, "score": score,
                "before_recovery": score, "main_metric": "accuracy", "constant_score": 0.5}
               for s in (1, 2) for m, target, score in (("dense", 0.0, 0.85), ("snip", 0.5, 0.83 + s / 100),
                                                         ("magnitude", 0.5, 0.82), ("snip-no-prior", 0.5, 0.8))]
    out.with_suffix(".jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- study-table: the 50% table -->\nold\n<!-- /study-table -->\nmiddle\n"
                      "<!-- study-lead-table: lead -->\n| old |\n<!-- /study-lead-table -->\nend\n")
    argv = ["--glue-dir", str(tmp_path), "--summarize", "--out", str(out), "--readme", str(readme)]
    assert study.main(argv) == 0
    text = readme.read_text()
    assert text.startswith("intro\n<!-- study-table: the 50% table -->\n| method | sst2 | share of dense |")
    assert "| snip | 84.5 ± 0.7 (n=2) [84.5] | 99.4% |\n| snip-no-prior | 80.0 ± 0.0 (n=2) [80.0] | 94.1% |\n" \
           "<!-- /study-table -->\nmiddle\n" in text
    lead = text.split("<!-- study-lead-table: lead -->\n")[1].split("<!-- /study-lead-table -->")[0]
    assert lead.startswith("| task | target | snip | strongest baseline |") and "| old |" not in lead
    assert "| sst2 | 50% | 84.5 ± 0.7 (n=2) | magnitude 82.0 ± 0.0 (n=2) | +2.5 ± 0.5 (ahead by > s.e.) |" in lead
    assert text.endswith("\nend\n") and not list(tmp_path.glob(".README.md.tmp"))
    assert study.main(argv) == 0 and readme.read_text() == text  # idempotent
    broken = tmp_path / "BROKEN.md"
    broken.write_text("<!-- study-table -->\n<!-- /study-table -->\n")  # no lead-table block
    before = out.with_suffix(".md").read_text()
    with pytest.raises(SystemExit):
        study.main([*argv[:-1], str(broken)])
    assert broken.read_text() == "<!-- study-table -->\n<!-- /study-table -->\n"
    assert out.with_suffix(".md").read_text() == before  # refused before anything was written
    for other in ("--claim", "--quick"):  # a claiming process never summarizes; --quick is not the study
        with pytest.raises(SystemExit):
            study.main([*argv, other])
    assert readme.read_text() == text and out.with_suffix(".md").read_text() == before


@pytest.mark.parametrize("variant", ["snip-target", "snip-gradual"])
def test_per_target_variant_fine_tunes_once_per_target(tmp_path, glue_fixtures_dir, tiny_folder, bench_script,
                                                       variant):
    """snip-target's prior and snip-gradual's cut depend on the cell's target: each target is its own fine-tune
    (pruned at its last epoch), where snip cuts every target from one."""
    study = bench_script("study")
    cells = [study.Cell("rte", 1, m, t) for m in ("snip", variant) for t in (0.3, 0.5)]
    assert cells[0].training == cells[1].training
    assert cells[2].training != cells[3].training and cells[2].training == cells[2].key
    out = tmp_path / "study"
    argv = ["--glue-dir", str(glue_fixtures_dir), "--model", str(tiny_folder), "--tasks", "rte", "--seeds", "1",
            "--targets", "0.3", "0.5", "--unstructured-targets", "--methods", variant, "--max-train", "8",
            "--epochs", "2", "--batch-size", "4", "--max-length", "32", "--recovery-epochs", "0", "--out", str(out)]
    assert study.main(argv) == 0
    records = [r for r in study.read_records(out.with_suffix(".jsonl")) if r["method"] == variant]
    assert sorted(r["target"] for r in records) == [0.3, 0.5]
    assert all(r["finetune_epoch"] == 2 and r["compression"] >= r["target"] for r in records)


def test_removed_is_stored_by_layer_and_kind_and_read_back_as_names(bench_script):
    study = bench_script("study")
    names = ["layer0.head0", "layer0.head3", "layer0.neurons2", "layer1.attention", "layer2.neurons0",
             "layer2.neurons5", "layer3.ffn"]
    stored = study.compact_removed(names)
    assert stored == {"layer0.head": [0, 3], "layer0.neurons": [2], "layer1.attention": None,
                      "layer2.neurons": [0, 5], "layer3.ffn": None}
    assert study.expand_removed(json.loads(json.dumps(stored))) == names
    assert study.expand_removed(names) == names and study.compact_removed([]) == {}
