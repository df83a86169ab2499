"""bench/cli_methods.py on the tiny GLUE fixtures: each row reports what its own run wrote (bookkeeping only)."""

from __future__ import annotations

import json


def test_a_failed_run_does_not_report_the_previous_runs_result(tmp_path, glue_fixtures_dir, tiny_folder, bench_script):
    cli_methods = bench_script("cli_methods")
    argv = ["--glue-dir", str(glue_fixtures_dir), "--model", str(tiny_folder), "--task", "rte", "--methods",
            "magnitude", "--max-train", "8", "--max-length", "32", "--work", str(tmp_path / "work"),
            "--out", str(tmp_path / "cli")]
    assert cli_methods.main(argv) == 0
    [row] = json.loads((tmp_path / "cli.json").read_text())["rows"]
    assert row["exit"] == 0 and row["status"] == "completed" and row["compression"] >= 0.49
    assert row["finetuned_score"] is not None and "| magnitude | 0 | completed |" in (tmp_path / "cli.md").read_text()
    # the same method again with a target the command line refuses (exit 2): the earlier result.json is still
    # in the run folder, and must not be read as this run's
    assert cli_methods.main([*argv, "--target", "1.5"]) == 1
    [row] = json.loads((tmp_path / "cli.json").read_text())["rows"]
    assert row["exit"] == 2 and row["status"] is None and row["compression"] is None and row["score"] is None
    assert "| magnitude | 2 | None | – | – | – | – |" in (tmp_path / "cli.md").read_text()
