"""Smoke test of bench/bench_encoder.py: it runs, writes its files, and reports sane numbers (no timing thresholds)."""

from __future__ import annotations

import json
import math

import pytest




@pytest.fixture(scope="module")
def bench(bench_script):
    pytest.importorskip("transformers")
    import minisnip
    try:
        minisnip.default_model_path()
    except ImportError as e:
        pytest.skip(str(e))
    return bench_script("bench_encoder")


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_quick_run_writes_json_and_markdown(bench, tmp_path):
    results = bench.main(["--quick", "--device", "cpu", "--pruned", "--out", str(tmp_path)])
    assert set(results) == {"cpu"}
    data = json.loads((tmp_path / "encoder_cpu.json").read_text())
    assert data == json.loads(json.dumps(results["cpu"]))
    assert {"machine", "settings", "cases"} <= set(data)
    for key in ("torch", "transformers", "cpu_model", "torch_threads", "device"):
        assert key in data["machine"]
    assert data["machine"]["device"] == "cpu"
    assert data["machine"]["torch_threads"] >= 1
    assert data["settings"]["batch"] == 4 and data["settings"]["seq"] == 32 and data["settings"]["quick"]

    cases = {c["case"]: c for c in data["cases"]}
    assert {"forward", "forward_backward", "forward_padded", "pruned_forward"} <= set(cases)
    for c in cases.values():
        assert len(c["compare"]) == 2
        for name in c["compare"]:
            r = c["results"][name]
            for key in ("median_s", "examples_per_s", "tokens_per_s", "min_s", "cpu_median_s"):
                assert _positive(r[key]), (c["case"], name, key, r[key])
            assert len(r["samples_s"]) == data["settings"]["rounds"]
        for key in ("ratio", "ratio_paired_median", "ratio_min", "ratio_cpu"):
            assert _positive(c[key]), (c["case"], key)
    assert cases["forward"]["compare"] == ["minisnip", "transformers"]
    # same weights, same inputs: the two implementations agree
    assert cases["forward"]["max_abs_diff"] < 1e-3
    assert cases["forward_padded"]["max_abs_diff"] < 1e-3
    assert 0 < cases["forward_padded"]["pad_fraction"] < 1
    pruned = cases["pruned_forward"]
    assert pruned["ideal_ratio_linear"] == pytest.approx(2.0)
    assert pruned["params_pruned"] < pruned["params_dense"]

    table = (tmp_path / "encoder_cpu.md").read_text()
    assert "| case |" in table and "minisnip" in table and "transformers" in table


def test_padding_pattern(bench):
    ids, mask, frac = bench.make_inputs(32, 128, 30522, 0.25, 0, "cpu")
    assert ids.shape == mask.shape == (32, 128)
    assert abs(frac - 0.25) < 0.02
    assert int(mask.sum(1).max()) == 128  # padded to the longest example
    assert bool((ids[mask == 0] == 0).all()) and bool((ids[:, 0] == 101).all())
    ids, mask, frac = bench.make_inputs(4, 32, 30522, 0.0, 0, "cpu")
    assert frac == 0 and bool(mask.all())


def test_flop_count_by_hand(bench):
    import minisnip
    from minisnip.model import BertModel
    config = minisnip.BertConfig.from_dict({"vocab_size": 100, "hidden_size": 8, "num_attention_heads": 2,
                                            "num_hidden_layers": 1, "intermediate_size": 16,
                                            "max_position_embeddings": 16})
    enc = BertModel(config)
    f = bench.encoder_flops(enc, batch=2, seq=4)
    t = 2 * 4
    assert f["linear"] == 2 * t * (8 * 24 + 8 * 8 + 2 * 8 * 16)
    assert f["attention"] == 2 * 2 * 2 * 4 * 4 * 8
