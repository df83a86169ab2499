"""Post-activation statistics (minisnip.stats) against numpy on the same values."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from minisnip import BertConfig, BertModel
from minisnip.model import LayerTrace
from minisnip.stats import ActivationStats, RunningStats, collect_stats, token_values
from minisnip.surgery import remove_blocks


def small_model() -> BertModel:
    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64, max_position_embeddings=40))


def batches(n: int = 3, b: int = 4, s: int = 11) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        lengths = torch.randint(2, s + 1, (b,), generator=g)
        mask = (torch.arange(s)[None, :] < lengths[:, None]).long()
        ids = torch.randint(1, 99, (b, s), generator=g) * mask
        out.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
                    "labels": torch.zeros(b, dtype=torch.long)})
    return out


def reference_values(model: BertModel, data) -> dict[tuple[int, str], np.ndarray]:
    """Every (layer, quantity)'s values at non-padding tokens, computed directly (for numpy)."""
    model.eval()
    chunks: dict[tuple[int, str], list[np.ndarray]] = {}
    with torch.no_grad():
        for batch in data:
            trace: list[LayerTrace] = []
            model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], trace=trace)
            for layer, t in enumerate(trace):
                for quantity in ("ffn_act", "attention_out", "h", "y", "context"):
                    value = getattr(t, quantity)
                    if quantity == "context":
                        value = value.transpose(1, 2)
                    keep = value[batch["attention_mask"].bool()].reshape(-1).double().numpy()
                    chunks.setdefault((layer, quantity), []).append(keep)
    return {key: np.concatenate(c) for key, c in chunks.items()}


def test_histogram_counts_equal_numpy_with_edges_and_outliers():
    values = torch.cat([torch.randn(5000, dtype=torch.float64) * 2,
                        torch.linspace(-3, 3, 61, dtype=torch.float64),  # values exactly on bin edges
                        torch.tensor([3.0, 3.0, -3.0, 7.5, -9.0, float("nan"), float("inf")], dtype=torch.float64)])
    s = RunningStats(-3.0, 3.0, bins=60)
    for chunk in values.split(777):
        s.update(chunk)
    finite = values[torch.isfinite(values)].numpy()
    counts, _ = np.histogram(finite, bins=s.edges.numpy())
    assert s.counts.tolist() == counts.tolist()
    assert s.underflow == int((finite < -3).sum()) and s.overflow == int((finite > 3).sum())
    assert s.nonfinite == 2 and s.count == finite.size
    assert s.counts.sum() + s.underflow + s.overflow == s.count
    assert s.mean == pytest.approx(finite.mean(), rel=1e-12)
    assert s.std == pytest.approx(finite.std(), rel=1e-12)
    assert (s.min, s.max) == (finite.min(), finite.max())


def test_layer_stats_match_numpy_over_non_padding_tokens():
    model = small_model()
    data = batches()
    stats = collect_stats(model, data, quantities=("ffn_act", "attention_out", "h", "y", "context"), bins=100,
                          ranges={"ffn_act": (-0.2, 0.3)})
    refs = reference_values(model, data)
    for layer in range(2):
        for quantity in ("ffn_act", "attention_out", "h", "y", "context"):
            ref = refs[layer, quantity]
            s = stats[layer, quantity]
            assert s.count == ref.size
            counts, _ = np.histogram(ref, bins=s.edges.numpy())
            assert s.counts.tolist() == counts.tolist()
            assert s.underflow == int((ref < s.edges[0].item()).sum())
            assert s.overflow == int((ref > s.edges[-1].item()).sum())
            assert s.mean == pytest.approx(ref.mean(), rel=1e-9, abs=1e-12)
            assert s.std == pytest.approx(ref.std(), rel=1e-9)
            assert (s.min, s.max) == (ref.min(), ref.max())
            for q in (0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99):
                if s.edges[0] <= np.quantile(ref, q) <= s.edges[-1]:
                    assert abs(s.quantile(q) - np.quantile(ref, q)) <= s.bin_width, (layer, quantity, q)


def test_padding_is_excluded():
    """Huge values at padding positions must not reach any statistic."""
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    x = torch.randn(2, 4, 6)
    x[~mask.bool()] = 1e6
    trace = LayerTrace(x=x, context=None, attention_out=None, h=x, ffn_act=x.abs(), ffn_out=None, y=x)
    stats = ActivationStats(quantities=("ffn_act", "h"))
    stats.update([trace], mask)
    kept = x[mask.bool()].double().numpy()
    assert stats[0, "h"].count == 4 * 6 and stats[0, "h"].overflow == 0
    assert stats[0, "h"].max == kept.max()
    assert stats[0, "h"].mean == pytest.approx(kept.mean(), rel=1e-12)
    assert stats[0, "ffn_act"].std == pytest.approx(np.abs(kept).std(), rel=1e-12)
    assert (0, "attention_out") not in stats  # not asked for; and a None field never makes an entry
    assert token_values(x, None).shape == (8, 6)


def test_quantiles_within_one_bin_of_numpy():
    g = torch.Generator().manual_seed(0)
    values = torch.cat([torch.randn(20000, generator=g), torch.rand(5000, generator=g) * 20]).double()
    s = RunningStats(-4.0, 4.0, bins=80)  # part of the mass overflows: quantiles there use [hi, max]
    s.update(values)
    ref = values.numpy()
    for q in (0.001, 0.01, 0.05, 0.25, 0.5, 0.75, 0.8):
        assert abs(s.quantile(q) - np.quantile(ref, q)) <= s.bin_width, q
    assert s.quantile(0.0) == ref.min() and s.quantile(1.0) == ref.max()
    assert s.quantile(0.999) <= ref.max()


def test_summary_is_json_and_skips_removed_branches():
    model = small_model()
    remove_blocks(model, ffn=[1])
    model.train()
    stats = collect_stats(model, batches(n=2), max_batches=1)
    assert model.training  # mode restored
    summary = json.loads(json.dumps(stats.summary()))
    assert set(summary["layers"]) == {"0", "1"}
    assert set(summary["layers"]["0"]) == {"ffn_act", "attention_out", "ffn_out", "h", "y"}
    assert set(summary["layers"]["1"]) == {"attention_out", "h", "y"}
    entry = summary["layers"]["0"]["ffn_act"]
    assert entry["count"] == int(batches(n=1)[0]["attention_mask"].sum()) * 64
    assert sum(entry["histogram"]["counts"]) + entry["histogram"]["underflow"] + entry["histogram"]["overflow"] \
        == entry["count"]
    assert list(entry["quantiles"]) == ["0.001", "0.01", "0.05", "0.25", "0.5", "0.75", "0.95", "0.99", "0.999"]
    assert entry["min"] >= -0.17  # GELU's minimum is about -0.170
