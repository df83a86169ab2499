"""Matplotlib figures shared by the command line and the notebooks (written to PNG, no screen needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .checkpoint import write_bytes
from .config import BertConfig


def _pyplot():
    import matplotlib
    if matplotlib.get_backend().lower() not in ("agg", "module://matplotlib_inline.backend_inline"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """Write `fig` as PNG to `path`, atomically (rendered in memory, then `checkpoint.write_bytes`)."""
    import io
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return write_bytes(path, buf.getvalue())


def _layer_of(name: str) -> int:
    return int(name.split(".")[0].removeprefix("layer"))


def plot_norms_per_layer(norms: Mapping[str, float], removed: Sequence[str], path: str | Path | None = None,
                         title: str = "Function norms per branch"):
    """Every branch's ||f_m|| as a dot, one column per layer; removed ones in red (block names count for
    all their parts). Returns the figure; saves it to `path` when given."""
    plt = _pyplot()
    removed = set(removed)
    fig, ax = plt.subplots(figsize=(8, 4))
    kinds = sorted({n.split(".")[1].rstrip("0123456789") for n in norms})
    offsets = {k: (i - (len(kinds) - 1) / 2) * 0.25 for i, k in enumerate(kinds)}
    markers = {"head": "o", "neurons": "s", "attention": "^", "ffn": "D"}
    for kind in kinds:
        for gone in (False, True):
            pts = [(n, v) for n, v in norms.items() if n.split(".")[1].rstrip("0123456789") == kind
                   and ((n in removed or f"layer{_layer_of(n)}.{'attention' if kind == 'head' else 'ffn'}" in removed)
                        == gone)]
            if not pts:
                continue
            x = [_layer_of(n) + offsets[kind] for n, _ in pts]
            ax.scatter(x, [v for _, v in pts], s=14, marker=markers.get(kind, "o"), alpha=0.75,
                       color="tab:red" if gone else "tab:blue",
                       label=f"{kind} ({'removed' if gone else 'kept'})")
    ax.set_xticks(sorted({_layer_of(n) for n in norms}))
    ax.set_xlabel("layer")
    ax.set_ylabel("function norm ||f(x)|| (RMS over tokens, hidden units)")
    ax.set_title(title)
    ax.set_yscale("log")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    if path is not None:
        save_figure(fig, path)
        plt.close(fig)
    return fig


def plot_kept_map(dense: BertConfig, pruned: BertConfig, path: str | Path | None = None,
                  title: str = "Kept branches"):
    """Left: heads kept (layer x head, dark = kept). Right: share of FFN neurons kept per layer."""
    plt = _pyplot()
    heads = np.zeros((dense.num_hidden_layers, dense.num_attention_heads))
    for i, layer in enumerate(pruned.layers):
        heads[i, layer.heads] = 1
    ffn = np.array([l.ffn_dim / dense.intermediate_size for l in pruned.layers])
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5), gridspec_kw={"width_ratios": [3, 1]})
    a.imshow(heads, cmap="Greys", vmin=0, vmax=1, aspect="auto")
    a.set_xlabel("head")
    a.set_ylabel("layer")
    a.set_title("attention heads kept (black)")
    b.barh(range(len(ffn)), ffn, color="tab:blue")
    b.set_xlim(0, 1)
    b.invert_yaxis()
    b.set_xlabel("share of FFN neurons kept")
    b.set_title("FFN width")
    fig.suptitle(title)
    fig.tight_layout()
    if path is not None:
        save_figure(fig, path)
        plt.close(fig)
    return fig


# --- post-activation statistics and pruning sweeps (used by notebooks/02) ------------------------------------

def _hist_density(s) -> tuple[np.ndarray, np.ndarray]:
    """(bin centres, density) of a `minisnip.stats.RunningStats` histogram; the density is normalised by ALL
    finite values (under/overflow included), so its area is the share of values inside the range."""
    edges = s.edges.numpy()
    counts = s.counts.numpy().astype(float)
    width = edges[1] - edges[0]
    return (edges[:-1] + edges[1:]) / 2, counts / max(s.count, 1) / width


def plot_activation_ridges(stats: Mapping[str, object], quantity: str, ax=None, title: str | None = None,
                           decades: float = 4.0, xlabel: str | None = None, colors: Sequence[str] | None = None,
                           linestyles: Sequence[str] | None = None):
    """Ridge plot of one traced quantity: one ridge per layer (layer 0 at the bottom), one curve per entry of
    `stats` ({label: `minisnip.stats.ActivationStats`}), read off the fixed-bin histograms.

    Ridge height is log10 of the density, showing `decades` decades below each layer's highest density (over
    all entries, so the curves of one layer compare directly): the tails, where a change of scale shows, are
    visible next to the peak. Values outside the histogram range are left out (their share is in the
    stats' under/overflow counts). The first entry is also filled. Returns the axes.
    """
    plt = _pyplot()
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 5))
    labels = list(stats)
    colors = list(colors) if colors is not None else [f"C{i}" for i in range(len(labels))]
    linestyles = list(linestyles) if linestyles is not None else ["-"] * len(labels)
    layers = sorted({layer for st in stats.values() for (layer, q) in st.stats if q == quantity})
    if not layers:
        raise ValueError(f"no statistics for quantity {quantity!r}")
    for layer in layers:
        curves = {lab: _hist_density(st[layer, quantity]) for lab, st in stats.items() if (layer, quantity) in st}
        top = max(float(np.log10(d.max())) for _, d in curves.values() if d.max() > 0)
        for i, lab in enumerate(labels):
            if lab not in curves:
                continue
            x, d = curves[lab]
            with np.errstate(divide="ignore"):
                h = (np.log10(np.where(d > 0, d, np.nan)) - (top - decades)) / decades
            h = np.clip(np.nan_to_num(h, nan=0.0), 0.0, 1.0) * 0.9
            ax.plot(x, layer + h, color=colors[i], ls=linestyles[i], lw=1.2, label=lab if layer == layers[0] else None)
            if i == 0:
                ax.fill_between(x, layer, layer + h, color=colors[i], alpha=0.15, lw=0)
        ax.axhline(layer, color="0.85", lw=0.6, zorder=0)
    ax.set_yticks(layers, [f"layer {l}" for l in layers])
    ax.set_ylim(layers[0] - 0.1, layers[-1] + 1.45)
    ax.set_xlabel(xlabel or f"{quantity} value (hidden-state units)")
    ax.set_ylabel(f"layer; ridge height = log10 density ({decades:g} decades)")
    ax.set_title(title or f"Per-layer distribution of {quantity}")
    ax.legend(fontsize=8, loc="upper center", ncol=len(labels), frameon=False)
    return ax


def plot_quantile_bands(stats: Mapping[str, object], quantity: str, ax=None, title: str | None = None,
                        outer: tuple[float, float] = (0.01, 0.99), inner: tuple[float, float] = (0.25, 0.75),
                        ylabel: str | None = None, colors: Sequence[str] | None = None):
    """Per layer and per entry of `stats` ({label: ActivationStats}): a thin bar over the `outer` quantiles, a
    thick bar over the `inner` ones and a dot at the median (quantiles read off the histograms). Returns ax."""
    plt = _pyplot()
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4))
    labels = list(stats)
    colors = list(colors) if colors is not None else [f"C{i}" for i in range(len(labels))]
    width = 0.8 / max(len(labels), 1)
    layers = sorted({layer for st in stats.values() for (layer, q) in st.stats if q == quantity})
    for i, lab in enumerate(labels):
        st = stats[lab]
        xs = [l for l in layers if (l, quantity) in st]
        x = np.array(xs) + (i - (len(labels) - 1) / 2) * width
        q = {p: np.array([st[l, quantity].quantile(p) for l in xs]) for p in (*outer, *inner, 0.5)}
        ax.vlines(x, q[outer[0]], q[outer[1]], color=colors[i], lw=1.2)
        ax.vlines(x, q[inner[0]], q[inner[1]], color=colors[i], lw=5, alpha=0.7,
                  label=f"{lab}")
        ax.plot(x, q[0.5], "o", color="white", mec=colors[i], ms=4)
    lo, hi = ax.get_ylim()
    ax.set_ylim(lo, hi + 0.2 * (hi - lo))  # room for the legend
    ax.set_xticks(layers, [f"layer {l}" for l in layers])
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel or f"{quantity} value (hidden-state units)")
    ax.set_title(title or f"{quantity}: {int(100 * outer[0])}-{int(100 * outer[1])}% (thin), "
                          f"{int(100 * inner[0])}-{int(100 * inner[1])}% (thick), median (dot)")
    ax.legend(fontsize=8, loc="upper center", ncol=len(labels), frameon=False)
    return ax


def plot_removed_grid(removed: Mapping[str, Mapping[str, Sequence[str]]], num_layers: int, num_heads: int,
                      num_groups: int, title: str = "Branches kept (dark) and removed (light)"):
    """Which branches a selection removes, as a grid of small maps: one row per method, one column per setting
    (e.g. target compression), `removed[method][setting]` = the removed branch names (as `select_for_target`
    returns them; a block name removes all its heads / neuron groups). Each map is layers x [heads | neuron
    groups], dark = kept. Returns the figure."""
    from .pruning.branches import parse_name
    plt = _pyplot()
    rows, cols = list(removed), list(next(iter(removed.values())))
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(1.9 * len(cols) + 0.6, 1.6 * len(rows) + 0.9),
                             squeeze=False, sharex=True, sharey=True)
    for r, method in enumerate(rows):
        for c, setting in enumerate(cols):
            kept = np.ones((num_layers, num_heads + 1 + num_groups))
            kept[:, num_heads] = np.nan  # separator column
            for name in removed[method].get(setting, ()):
                layer, kind, index = parse_name(name)
                if kind == "attention":
                    kept[layer, :num_heads] = 0
                elif kind == "head":
                    kept[layer, index] = 0
                elif kind == "ffn":
                    kept[layer, num_heads + 1:] = 0
                else:
                    kept[layer, num_heads + 1 + index] = 0
            ax = axes[r, c]
            ax.imshow(kept, cmap="Greys", vmin=-0.3, vmax=1, aspect="auto", interpolation="nearest")
            if r == 0:
                ax.set_title(str(setting), fontsize=9)
            if c == 0:
                ax.set_ylabel(f"{method}\nlayer", fontsize=9)
            if r == len(rows) - 1:
                ax.set_xticks([num_heads / 2 - 0.5, num_heads + 1 + num_groups / 2 - 0.5], ["heads", "FFN groups"],
                              fontsize=8)
            ax.set_yticks(range(num_layers), [str(i) for i in range(num_layers)], fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


# --- spectral norms, score vs compression (used by notebooks/03-05) ------------------------------------------

SIGMA_TYPES = {"W_Q": "attention.qkv.q", "W_K": "attention.qkv.k", "W_V": "attention.qkv.v", "W_O": "attention.out",
               "W_1 (up)": "ffn.up", "W_2 (down)": "ffn.down"}
"""Matrix types of a layer as `minisnip.snip.spectral.spectral_norms` names them (key suffixes)."""


def plot_sigma_per_layer(sigmas: Mapping[str, Mapping[str, float]], bounds: Mapping[str, float] | None = None,
                         title: str = "Largest singular value of every branch matrix, per layer",
                         log: bool = True, colors: Sequence[str] | None = None,
                         linestyles: Sequence[str] | None = None):
    """One panel per matrix type (W_Q, W_K, W_V, W_O, W_1, W_2), σ against the layer, one line per entry of
    `sigmas` ({label: the dict `spectral_norms(model)` returns}). `bounds` ({label: c}) adds horizontal lines,
    e.g. a constant spectral-norm bound. Returns the figure."""
    plt = _pyplot()
    labels = list(sigmas)
    colors = list(colors) if colors is not None else [f"C{i}" for i in range(len(labels))]
    linestyles = list(linestyles) if linestyles is not None else ["-"] * len(labels)
    fig, axes = plt.subplots(1, len(SIGMA_TYPES), figsize=(2.55 * len(SIGMA_TYPES), 3.3), sharey=True)
    for ax, (kind, suffix) in zip(axes, SIGMA_TYPES.items()):
        for i, lab in enumerate(labels):
            pts = sorted((int(k.split(".")[1]), v) for k, v in sigmas[lab].items() if k.endswith("." + suffix))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3.5, color=colors[i],
                        ls=linestyles[i], label=lab)
        for j, (blab, c) in enumerate((bounds or {}).items()):
            ax.axhline(c, color="0.35", lw=0.9, ls=(":", "--", "-.")[j % 3], label=blab)
        ax.set_title(kind, fontsize=9)
        ax.set_xlabel("layer")
        if log:
            ax.set_yscale("log")
    axes[0].set_ylabel("σ(W) = max ||Wx|| / ||x|| (gain, no unit)")
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_score_vs_compression(records: Sequence[Mapping], ax=None, metric: str = "score",
                              title: str = "Score against compression", dense: float | None = None,
                              group: str = "method", before: str | None = "before_recovery",
                              colors: Mapping[str, str] | None = None):
    """Score against compression, one line per `group` value (default: per method).

    records: dicts with `group`, "compression" and "score" (optionally "std", drawn as error bars, and
    `before`, the score before recovery, drawn dashed in the same colour). `dense` draws the unpruned
    model's score as a horizontal line. Returns the axes."""
    plt = _pyplot()
    if ax is None:
        _, ax = plt.subplots(figsize=(7.5, 4.5))
    names = list(dict.fromkeys(r[group] for r in records))
    drew_before = False
    for i, name in enumerate(names):
        rows = sorted((r for r in records if r[group] == name), key=lambda r: r["compression"])
        x = [r["compression"] for r in rows]
        color = (colors or {}).get(name, f"C{i % 10}")
        std = [r.get("std") for r in rows]
        if all(s is not None for s in std):
            ax.errorbar(x, [r["score"] for r in rows], yerr=std, marker="o", ms=4, color=color, capsize=2,
                        label=name)
        else:
            ax.plot(x, [r["score"] for r in rows], marker="o", ms=4, color=color, label=name)
        if before and all(r.get(before) is not None for r in rows):
            ax.plot(x, [r[before] for r in rows], marker=".", ms=4, ls="--", lw=0.9, color=color, alpha=0.7)
            drew_before = True
    if drew_before:
        ax.plot([], [], ls="--", lw=0.9, color="0.4", label="dashed: before recovery")
    if dense is not None:
        ax.axhline(dense, color="0.2", lw=0.9, ls=":", label="dense (fine-tuned, unpruned)")
    ax.set_xlabel("compression (share of encoder linear-layer weights removed)")
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    return ax
