"""bench/snip_grid.py on the tiny GLUE fixtures: the grid's bookkeeping (no timing, no quality thresholds)."""

from __future__ import annotations

import json





def test_grid_runs_resumes_and_tabulates(tmp_path, glue_fixtures_dir, tiny_folder, bench_script):
    folder = tiny_folder
    grid = bench_script("snip_grid")
    argv = ["--glue-dir", str(glue_fixtures_dir), "--model", str(folder), "--tasks", "rte", "--seeds", "1", "2",
            "--compressions", "0.3", "0.5", "--max-train", "8", "--epochs", "1", "--batch-size", "4",
            "--max-length", "32", "--out", str(tmp_path / "grid")]
    assert grid.main(argv) == 0
    records = [json.loads(l) for l in (tmp_path / "grid.jsonl").read_text().splitlines()]
    # per seed: dense once, three pruning methods at two compressions each
    assert len(records) == 2 * (1 + 3 * 2)
    for r in records:
        assert r["method"] == "dense" or r["compression"] >= r["target"]
    summary = json.loads((tmp_path / "grid.json").read_text())["summary"]
    assert summary["rte"]["snip"]["0.5"]["n"] == 2
    assert "| rte | accuracy | snip |" in (tmp_path / "grid.md").read_text()
    avg = json.loads((tmp_path / "grid.json").read_text())["averages"]
    assert avg["tasks"] == ["rte"] and avg["dense"]["0.5"]["of_dense"] == 1.0
    assert avg["snip"]["0.3"]["mean"] == summary["rte"]["snip"]["0.3"]["mean"]
    assert "Average over rte" in (tmp_path / "grid.md").read_text()
    assert grid.main(argv) == 0  # resumes: nothing left to run, nothing duplicated
    assert len((tmp_path / "grid.jsonl").read_text().splitlines()) == len(records)
