"""bench/bench_snip_overhead.py on the tiny model and the GLUE fixtures: the bookkeeping of its --quick path
(rounds, paired steps, phases, profile attribution, files written); no timing thresholds."""

from __future__ import annotations

import json
import math

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_quick_run_writes_json_and_markdown(bench_script, tiny_folder, glue_fixtures_dir, tmp_path):
    bench = bench_script("bench_snip_overhead")
    results = bench.main(["--quick", "--model", str(tiny_folder), "--glue-dir", str(glue_fixtures_dir),
                          "--task", "sst2", "--batch-size", "2", "--max-length", "32", "--max-train", "4",
                          "--profile-steps", "1", "--threads", "1", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "snip_overhead_sst2_quick.json").read_text())
    assert data == json.loads(json.dumps(results["sst2"]))
    assert {"machine", "settings", "task", "data", "runs", "profile", "summary"} <= set(data)
    for key in ("torch", "cpu_model", "torch_threads", "device", "loadavg_1m_start"):
        assert key in data["machine"]
    s = data["settings"]
    assert s["methods"] == ["snip", "snip-no-prior"] and s["rounds"] == 2 and s["quick"]

    # rounds alternate the order: A B, B A
    assert [(r["round"], r["method"]) for r in data["runs"]] == [
        (0, "snip"), (0, "snip-no-prior"), (1, "snip-no-prior"), (1, "snip")]
    for r in data["runs"]:
        assert r["steps"] == 2 == len(r["phases"]) == len(r["step_losses"])  # 4 examples, batch 2, 1 epoch
        assert _positive(r["train_seconds"]) and _positive(r["cpu_seconds"])
        for step in r["phases"]:
            assert step["total"] >= sum(step[k] for k in bench.PHASES) * 0.999
            assert step["forward"] > 0 and step["backward"] > 0 and step["optimizer"] > 0
            assert (step["prior"] > 0) == (r["method"] == "snip")
        assert len(r["prior_values"]) == (2 if r["method"] == "snip" else 0)

    summary = data["summary"]
    for name, pm in summary["per_method"].items():
        assert pm["rounds"] == 2 and pm["steps_per_round"] == 2
        assert pm["deterministic"], name  # the same seed and batches: the same losses in every round
        assert _positive(pm["step_ms_median"]) and _positive(pm["step_cpu_ms_mean"])
    ratio = summary["ratios"]["snip / snip-no-prior"]
    for key in ("step_time", "paired_step_median", "step_cpu_time", "fit_train_seconds", "cpu_time"):
        assert _positive(ratio[key]), key
    assert len(ratio["step_time_per_round"]) == 2

    # the profile attributes every profiled op somewhere; only SNIP has SN and prior parts
    prof = {p["method"]: p for p in data["profile"]}
    assert set(prof) == {"snip", "snip-no-prior"}
    for name, p in prof.items():
        parts = p["self_cpu_ms_per_step"]
        assert set(parts) == set(bench.PROFILE_KEYS) and p["steps"] == 1
        assert parts["forward"] > 0 and parts["backward"] > 0 and parts["optimizer"] > 0
        has = name == "snip"
        for key in ("forward / SN", "prior", "backward / SN", "backward / prior"):
            assert (parts[key] > 0) == has, (name, key)
        assert parts["prior / SN"] == 0  # fit computes each normalised weight once per step: the prior reuses it
        cpu = p["cpu_ms_per_step"]  # the rounds' phase CPU times, split in the profile's proportions
        phases = summary["per_method"][name]["phase_cpu_ms_mean"]
        for phase in bench.PHASES:
            got = sum(v for k, v in cpu.items() if bench.PHASE_OF[k] == phase)
            assert got == pytest.approx(phases[phase], rel=1e-9, abs=1e-9), (name, phase)

    table = (tmp_path / "snip_overhead_sst2_quick.md").read_text()
    assert "| snip / snip-no-prior |" in table and "| snip |" in table and "backward / prior" in table


def test_arguments_refused(bench_script, glue_fixtures_dir):
    bench = bench_script("bench_snip_overhead")
    for argv in (["--steps", "0"], ["--steps", "3", "--max-train", "8"], ["--methods", "snip"], ["--rounds", "0"]):
        with pytest.raises(SystemExit):
            bench.parse_args(["--glue-dir", str(glue_fixtures_dir), *argv])
    args = bench.parse_args(["--glue-dir", str(glue_fixtures_dir), "--steps", "3", "--batch-size", "4"])
    assert args.max_train == 12 and args.epochs == 1


def test_plain_traced_records_the_traces_and_adds_no_term(bench_script, tiny_folder, glue_fixtures_dir, tmp_path,
                                                          monkeypatch):
    """plain-traced: snip-no-prior's recipe, with fit asked for the prior's packed, [CLS]-last traces (TraceOnly),
    none read; compared with the second method like any other."""
    bench = bench_script("bench_snip_overhead")
    seen = []

    class Spy(bench.TraceOnly):
        def loss(self, ctx):
            seen.append((len(ctx.traces), ctx.traces[-1].packing is not None or ctx.mask is None))
            return None

    monkeypatch.setattr(bench, "TraceOnly", Spy)
    results = bench.main(["--quick", "--model", str(tiny_folder), "--glue-dir", str(glue_fixtures_dir),
                          "--task", "sst2", "--batch-size", "2", "--max-length", "32", "--max-train", "4",
                          "--profile-steps", "0", "--threads", "1", "--out", str(tmp_path),
                          "--methods", "snip-no-sn", "snip-no-prior", "plain-traced"])
    layers = json.loads((tiny_folder / "config.json").read_text())["num_hidden_layers"]
    assert len(seen) == 2 * 2 and all(n == layers and packed for n, packed in seen)  # 2 rounds x 2 steps
    data = results["sst2"]
    runs = [r for r in data["runs"] if r["method"] == "plain-traced"]
    assert runs and all(r["prior_values"] == [] and all(s["prior"] < 0.01 for s in r["phases"]) for r in runs)
    assert set(data["summary"]["ratios"]) == {"snip-no-sn / snip-no-prior", "plain-traced / snip-no-prior"}
    assert "plain-traced: plain fine-tuning" in (tmp_path / "snip_overhead_sst2_quick.md").read_text()
