"""Matplotlib figures shared by the command line and the notebooks (written to PNG, no screen needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .config import BertConfig


def _pyplot():
    import matplotlib
    if matplotlib.get_backend().lower() not in ("agg", "module://matplotlib_inline.backend_inline"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


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
        fig.savefig(path, dpi=120)
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
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return fig
