"""Post-activation statistics per layer, collected cheaply: fixed-bin histograms and running moments.

SNIP (Lin et al. 2020, Sec. 3) adds spectral normalization "to stabilise the distribution of post-activation
values" of the layers. To look at that distribution (the GELU outputs of every FFN, the branch outputs, with
and without SN, through fine-tuning) one needs statistics over millions of values per layer and batch. This
module streams them: each `LayerTrace` of a batch is reduced at once to

- a histogram over fixed bins (given up front, so histograms from different batches, checkpoints and models
  add up and compare bin for bin), with the values below / above the range counted as underflow / overflow;
- count, mean, standard deviation (population, ddof=0, as numpy), min and max, merged across batches with
  Chan, Golub & LeVeque's pairwise update (numerically stable, no sum of squares);
- quantiles read off the histogram (`RunningStats.quantile`).

Only non-padding tokens count (attention_mask = 1), and no whole tensor is kept.

Quantities (fields of `minisnip.model.LayerTrace`): "ffn_act" (post-GELU values act(W_1 h + b_1), one per
neuron and token), "attention_out" (Attn(x)), "ffn_out" (FFN(h)), "h" and "y" (the post-LN sums), and also
"x" (the layer input) and "context" (per-head attention context). A removed branch has no entry.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from .model import LayerTrace
from .surgery import encoder_of

QUANTITIES = ("ffn_act", "attention_out", "ffn_out", "h", "y")
ALL_QUANTITIES = QUANTITIES + ("x", "context")

# Ranges chosen from all-MiniLM-L6-v2 on short English sentences: post-GELU values lie in [-0.17, 3] for 99.9%
# of them (a few outliers reach 25); branch outputs and LN outputs have rare large outliers (|ffn_out| up to
# ~200) that land in the overflow counts, while min / max keep their exact values.
DEFAULT_RANGES: dict[str, tuple[float, float]] = {
    "ffn_act": (-0.25, 4.75), "attention_out": (-4.0, 4.0), "ffn_out": (-10.0, 10.0),
    "h": (-10.0, 10.0), "y": (-10.0, 10.0), "x": (-10.0, 10.0), "context": (-4.0, 4.0)}
DEFAULT_QUANTILES = (0.001, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 0.999)


class RunningStats:
    """Histogram over fixed bins plus running count / mean / std / min / max of a stream of values.

    Bins follow `numpy.histogram`: bin i holds edges[i] <= v < edges[i+1], the last bin also holds v == hi.
    Non-finite values (NaN, ±inf) are counted in `nonfinite` and left out of everything else.
    """

    def __init__(self, lo: float, hi: float, bins: int = 200):
        if not hi > lo or bins < 1:
            raise ValueError(f"need lo < hi and bins >= 1, got lo={lo}, hi={hi}, bins={bins}")
        self.edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
        self.counts = torch.zeros(bins, dtype=torch.int64)
        self.underflow = self.overflow = self.nonfinite = 0
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0  # sum of squared deviations from the mean
        self.min, self.max = math.inf, -math.inf

    @property
    def bins(self) -> int:
        return self.counts.numel()

    @property
    def std(self) -> float:
        """Population standard deviation (ddof=0), as numpy.std."""
        return math.sqrt(self.m2 / self.count) if self.count else math.nan

    @property
    def bin_width(self) -> float:
        return float(self.edges[1] - self.edges[0])

    @torch.no_grad()
    def update(self, values: Tensor) -> None:
        """Add every element of `values` (any shape, any device)."""
        v = values.detach().reshape(-1).to(torch.float64)
        finite = torch.isfinite(v)
        self.nonfinite += int((~finite).sum())
        v = v[finite]
        n = v.numel()
        if n == 0:
            return
        # histogram: bucketize(right=True) - 1 is i with edges[i] <= v < edges[i+1]; v == hi joins the last bin
        edges = self.edges.to(v.device)
        lo, hi = float(edges[0]), float(edges[-1])
        idx = torch.bucketize(v, edges, right=True) - 1
        idx[v == hi] = self.bins - 1
        inside = (v >= lo) & (v <= hi)
        self.counts += torch.bincount(idx[inside], minlength=self.bins).cpu()
        self.underflow += int((v < lo).sum())
        self.overflow += int((v > hi).sum())
        # moments: merge (count, mean, m2) with the batch's own (Chan, Golub & LeVeque 1979)
        mean_b = float(v.mean())
        m2_b = float(((v - mean_b) ** 2).sum())
        total = self.count + n
        delta = mean_b - self.mean
        self.mean += delta * n / total
        self.m2 += m2_b + delta ** 2 * self.count * n / total
        self.count = total
        self.min = min(self.min, float(v.min()))
        self.max = max(self.max, float(v.max()))

    def quantile(self, q: float) -> float:
        """The q-quantile read off the histogram, linearly interpolated inside its bin.

        The under/overflow counts are spread over [min, lo] and [hi, max]. The element of rank q·(N-1)
        (numpy's default quantile) is located in its bin, so for data dense enough that neighbouring values
        share a bin (or sit in adjacent ones) the error is at most about one bin width.
        """
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"q must lie in [0, 1], got {q}")
        if self.count == 0:
            return math.nan
        if q == 0.0:
            return self.min
        if q == 1.0:
            return self.max
        lo, hi = float(self.edges[0]), float(self.edges[-1])
        edges = [min(self.min, lo)] + self.edges.tolist() + [max(self.max, hi)]
        counts = [self.underflow] + self.counts.tolist() + [self.overflow]
        rank = q * (self.count - 1) + 0.5  # the middle of element floor(q (N-1))'s unit of mass
        below = 0
        for j, c in enumerate(counts):
            if c and below + c > rank:
                value = edges[j] + (rank - below) / c * (edges[j + 1] - edges[j])
                return min(max(value, self.min), self.max)
            below += c
        return self.max

    def to_dict(self, quantiles: Sequence[float] = DEFAULT_QUANTILES, histogram: bool = True) -> dict:
        """JSON-serialisable summary (plain floats, ints and lists)."""
        d = {"count": self.count, "mean": self.mean if self.count else math.nan, "std": self.std,
             "min": self.min if self.count else math.nan, "max": self.max if self.count else math.nan,
             "nonfinite": self.nonfinite, "quantiles": {str(q): self.quantile(q) for q in quantiles}}
        if histogram:
            d["histogram"] = {"range": [float(self.edges[0]), float(self.edges[-1])], "bins": self.bins,
                              "counts": self.counts.tolist(), "underflow": self.underflow,
                              "overflow": self.overflow}
        return d


def token_values(value: Tensor, attention_mask: Tensor | None, quantity: str = "") -> Tensor:
    """The entries of a traced tensor at non-padding tokens only: (n_tokens, ...).

    Every trace field is (batch, seq, ...) except "context", which is (batch, heads, seq, head_dim).
    """
    if quantity == "context":
        value = value.transpose(1, 2)  # (batch, seq, heads, head_dim)
    if attention_mask is None:
        return value.reshape(-1, *value.shape[2:])
    return value[attention_mask.to(device=value.device, dtype=torch.bool)]


class ActivationStats:
    """`RunningStats` per (layer, quantity), fed with the `LayerTrace`s of one batch at a time.

    bins: the number of bins of every histogram. ranges: {quantity: (lo, hi)}, overriding `DEFAULT_RANGES`.
    """

    def __init__(self, quantities: Sequence[str] = QUANTITIES, bins: int = 200,
                 ranges: Mapping[str, tuple[float, float]] | None = None):
        unknown = set(quantities) - set(ALL_QUANTITIES)
        if unknown:
            raise ValueError(f"unknown quantities {sorted(unknown)}; choose from {ALL_QUANTITIES}")
        self.quantities = tuple(quantities)
        self.bins = bins
        self.ranges = {**DEFAULT_RANGES, **(ranges or {})}
        self.stats: dict[tuple[int, str], RunningStats] = {}

    def __getitem__(self, key: tuple[int, str]) -> RunningStats:
        return self.stats[key]

    def __contains__(self, key: tuple[int, str]) -> bool:
        return key in self.stats

    def update(self, traces: Sequence[LayerTrace], attention_mask: Tensor | None = None) -> None:
        """Add one batch: `traces` from `BertModel.forward(..., trace=[])`, mask (batch, seq), 1 = real token."""
        for layer, trace in enumerate(traces):
            for quantity in self.quantities:
                value = getattr(trace, quantity)
                if value is None:  # removed branch
                    continue
                if (layer, quantity) not in self.stats:
                    self.stats[layer, quantity] = RunningStats(*self.ranges[quantity], bins=self.bins)
                self.stats[layer, quantity].update(token_values(value, attention_mask, quantity))

    def summary(self, quantiles: Sequence[float] = DEFAULT_QUANTILES, histogram: bool = True) -> dict:
        """{"bins", "quantities", "layers": {"0": {"ffn_act": {count, mean, std, min, max, quantiles,
        histogram}, ...}, ...}}; layer keys are strings so the dict survives a JSON round trip."""
        layers: dict[str, dict] = {}
        for (layer, quantity), s in sorted(self.stats.items()):
            layers.setdefault(str(layer), {})[quantity] = s.to_dict(quantiles, histogram)
        return {"bins": self.bins, "quantities": list(self.quantities), "layers": layers}


@torch.no_grad()
def collect_stats(model: nn.Module, batches: Iterable[Mapping[str, Tensor]], quantities: Sequence[str] = QUANTITIES,
                  bins: int = 200, ranges: Mapping[str, tuple[float, float]] | None = None,
                  max_batches: int | None = None) -> ActivationStats:
    """Run the encoder in eval mode without gradients over `batches` and return the accumulated statistics.

    batches: dicts with input_ids and optionally attention_mask, token_type_ids (as `Tokenizer.__call__` or a
    GLUE loader yields them; other keys such as labels are ignored). The model's training mode is restored.
    """
    enc = encoder_of(model)
    device = next(enc.parameters()).device
    stats = ActivationStats(quantities, bins, ranges)
    was_training = model.training
    model.eval()
    try:
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            mask, types = batch.get("attention_mask"), batch.get("token_type_ids")
            trace: list[LayerTrace] = []
            enc(batch["input_ids"].to(device), None if mask is None else mask.to(device),
                None if types is None else types.to(device), trace=trace)
            stats.update(trace, mask)
    finally:
        model.train(was_training)
    return stats


__all__ = ["ALL_QUANTITIES", "ActivationStats", "DEFAULT_QUANTILES", "DEFAULT_RANGES", "QUANTITIES",
           "RunningStats", "collect_stats", "token_values"]
