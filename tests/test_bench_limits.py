"""Smoke tests of the benchmarks that show the encoder's limits (bench_shapes, bench_limit, bench_pruned,
bench_memory, bench_compile) on the tiny random model, 1 x 8 tokens: they run, write their files, and report
finite positive numbers with the expected keys. No timing thresholds."""

from __future__ import annotations

import json
import math

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--quick", "--threads", "1"]


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def _read(tmp_path, stem: str) -> tuple[dict, str]:
    return json.loads((tmp_path / f"{stem}.json").read_text()), (tmp_path / f"{stem}.md").read_text()


@pytest.fixture(scope="module")
def hf_folder(hf_tiny_model, tmp_path_factory):
    """A tiny random BERT saved by `transformers` (its own format), which both implementations load."""
    folder = tmp_path_factory.mktemp("hf_tiny") / "model"
    hf_tiny_model(vocab_size=2000).save_pretrained(folder)  # random ids are drawn from [1000, vocab)
    return folder


def test_shapes(bench_script, hf_folder, tmp_path):
    bench = bench_script("bench_shapes")
    results = bench.main(["--model", str(hf_folder), "--device", "cpu", "--shapes", "1x8", "2x8",
                          "--rounds", "2", "--warmup", "0", "--out", str(tmp_path), *TINY])
    data, table = _read(tmp_path, "shapes_cpu_quick")
    assert data == json.loads(json.dumps(results["cpu"]))
    assert data["settings"]["shapes"] == ["1x8", "2x8"]
    assert [c["case"] for c in data["cases"]] == ["forward 1x8", "forward_backward 1x8", "forward 2x8",
                                                  "forward_backward 2x8"]
    for c in data["cases"]:
        for key in ("ratio", "ratio_cpu", "ratio_min"):
            assert _positive(c[key])
        for r in c["results"].values():
            assert _positive(r["median_s"]) and len(r["samples_s"]) == 2
        assert c["max_abs_diff"] < 1e-3
    assert "| forward 1x8 |" in table


def test_parse_shape(bench_script):
    bench_script("bench_shapes")  # puts the checkout on sys.path, as the scripts do
    from bench.machine import parse_shape
    assert parse_shape("32x128") == (32, 128)
    for bad in ("32", "0x128", "4x1"):
        with pytest.raises(Exception, match="shape"):
            parse_shape(bad)


def test_limit(bench_script, tiny_folder, tmp_path):
    bench = bench_script("bench_limit")
    result = bench.main(["--model", str(tiny_folder), "--shapes", "1x8", "--rounds", "2", "--profile-iters", "1",
                         "--out", str(tmp_path), *TINY])
    data, table = _read(tmp_path, "limit_cpu_quick")
    assert data == json.loads(json.dumps(result))
    (case,) = data["cases"]
    assert set(case["results"]) == {"forward", "gemms", "gemms_linear"}
    for key in ("ratio_forward_over_gemms", "ratio_cpu", "gflops_forward", "gflops_gemms", "gflops_gemms_linear"):
        assert _positive(case[key]), key
    assert case["flops"]["total"] == case["flops"]["linear"] + case["flops"]["attention"] > 0
    assert sum(case["profile_shares"].values()) == pytest.approx(1.0)
    assert case["profile_shares"].get("gemm", 0) > 0
    assert "forward / GEMMs" in table


def test_gemm_plan_runs_every_product(bench_script, tiny_model):
    import torch
    bench = bench_script("bench_limit")
    model = tiny_model(num_hidden_layers=1)
    calls = []
    with torch.profiler.profile() as prof:
        bench.gemm_plan(model, 2, 8, "cpu", torch.float32)()
    for ev in prof.key_averages():
        if ev.key in ("aten::addmm", "aten::bmm"):
            calls.append((ev.key, ev.count))
    assert dict(calls) == {"aten::addmm": 4, "aten::bmm": 2}


def test_pruned(bench_script, tiny_folder, tmp_path):
    bench = bench_script("bench_pruned")
    result = bench.main(["--model", str(tiny_folder), "--batch", "1", "--seq", "8", "--levels", "0", "0.5",
                         "--blocks", "1", "--rounds", "2", "--warmup", "0", "--out", str(tmp_path), *TINY])
    data, table = _read(tmp_path, "pruned_cpu_quick")
    assert data == json.loads(json.dumps(result))
    cells = {c["cell"]: c for c in data["cells"]}
    assert set(cells) == {"dense", "heads 0% ffn 50%", "heads 50% ffn 0%", "heads 50% ffn 50%",
                          "attention blocks 1", "ffn blocks 1", "layers 1"}
    assert cells["dense"]["ideal"] == 1.0 and cells["dense"]["speedup"] == 1.0
    assert cells["heads 50% ffn 50%"]["shapes"] == [{"heads": 2, "ffn_dim": 32}] * 2
    assert cells["layers 1"]["shapes"][0] == {"heads": 0, "ffn_dim": 0}
    for c in data["cells"]:
        for key in ("median_s", "speedup", "ideal", "efficiency", "gemms_s", "gemm_speedup", "gemm_efficiency"):
            assert _positive(c[key]), (c["cell"], key)
        assert c["ideal"] >= 1.0
    assert cells["heads 50% ffn 50%"]["ideal"] == pytest.approx(2.0)
    assert "speedup / ideal" in table


def test_memory(bench_script, tiny_folder, tmp_path):
    bench = bench_script("bench_memory")
    result = bench.main(["--model", str(tiny_folder), "--batch", "1", "--seq", "8", "--out", str(tmp_path),
                         "--quick"])
    data, table = _read(tmp_path, "memory_cpu_quick")
    assert data == json.loads(json.dumps(result))
    cases = {(c["mode"], c["variant"]): c for c in data["cases"]}
    assert set(cases) == {(m, v) for m in ("inference", "training") for v in ("dense", "pruned")}
    for c in cases.values():
        assert _positive(c["param_bytes"]) and _positive(c["peak_rss_bytes"])
        assert c["peak_growth_bytes"] >= 0
    assert _positive(cases["training", "dense"]["peak_growth_bytes"])
    assert cases["training", "pruned"]["param_bytes"] < cases["training", "dense"]["param_bytes"]
    assert cases["inference", "pruned"]["heads"] == [2, 2]
    assert "| training | dense |" in table


@pytest.mark.parametrize("backend", ["eager", "no-such-backend"])
def test_compile(bench_script, tiny_folder, tmp_path, backend):
    bench = bench_script("bench_compile")
    result = bench.main(["--model", str(tiny_folder), "--batch", "1", "--seq", "8", "--backend", backend,
                         "--rounds", "2", "--out", str(tmp_path), *TINY])
    data, table = _read(tmp_path, "compile_cpu_quick")
    assert data == json.loads(json.dumps(result))
    assert _positive(data["results"]["eager"]["median_s"])
    if backend == "eager":
        assert data["compile"]["status"] == "ok"
        assert _positive(data["ratio"]) and _positive(data["compile"]["call_1_s"])
        assert data["compile"]["max_abs_diff"] < 1e-4
        assert "| compiled |" in table
    else:
        assert data["compile"]["status"].startswith("not available here: ")
        assert "compiled" not in data["results"] and "ratio" not in data
        assert "not available here" in table
