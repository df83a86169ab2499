"""A BERT encoder (Devlin et al. 2019) whose residual branches are explicit objects.

BERT is post-LN. Each layer adds two residual branches to its input and normalises after each sum:

    h = LN_attn(x + Attn(x))        Attn(x) = W_O [head_1(x); ...; head_H(x)] + b_O
    y = LN_ffn (h + FFN(h))         FFN(h)  = W_2 act(W_1 h + b_1) + b_2

`Attention` and `FeedForward` are the branches f_m of the SNIP paper (Lin et al. 2020, Sec. 3): each can

1. return its own output f(x) (no hooks): `Attention.forward`, `FeedForward.forward`, or a full trace
   of every branch through `BertModel.forward(..., trace=[])`;
2. be gated: `head_gate` (one scale per head), `neuron_gate` (one per FFN neuron) and `gate` (one per
   block) are buffers that are None (no cost) until a test or a pruning method sets them;
3. be shrunk (`Attention.keep_heads`, `FeedForward.keep_neurons`) or removed (the layer's `attention` /
   `ffn` becomes None; see `minisnip.surgery`).

What "the branch becomes the identity" means under post-LN: when a branch outputs 0 for every input, its
sub-layer computes LN(x + 0) = LN(x). The sum is the identity, the LayerNorm after it stays. A removed
branch is exactly that: the layer still applies its LayerNorm (`LN_attn(x)` / `LN_ffn(h)`), it skips the
branch. SNIP's identity prior drives branches toward f(x) = 0 so that removing them changes nothing.

Heads are addressable but the hot path is fused: one QKV matmul whose rows are laid out as
[Q_head0 .. Q_head(n-1), K_head0 .., V_head0 ..] (`Attention.head_rows`), then one call to
`scaled_dot_product_attention` over all heads, then one output matmul. `attention_head` and `project_heads`
write the same two steps out plainly, one head at a time: references, tested equal to the fused path.

Padding costs nothing in the linear layers: when a batch has padding, the real tokens are packed into one
(tokens, hidden) matrix (`Packing`) and every matmul, LayerNorm and GELU runs on those alone; only attention
unpacks Q, K, V to the (batch, seq) layout it needs. The hidden states at padded positions are returned as 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import BertConfig


def activation(name: str) -> nn.Module:
    """The FFN non-linearity named by `hidden_act` (BERT's "gelu" is the exact erf form)."""
    return {"gelu": nn.GELU(), "gelu_new": nn.GELU(approximate="tanh"),
            "gelu_pytorch_tanh": nn.GELU(approximate="tanh"), "relu": nn.ReLU()}[name]


class Embeddings(nn.Module):
    """e = LN(E_word[ids] + E_pos[0..S-1] + E_type[token_types]), then dropout."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor) -> Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        e = self.word_embeddings(input_ids) + self.position_embeddings(positions) + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.norm(e))


@dataclass
class Packing:
    """Where the real (non-padding) tokens of a (batch, seq) layout sit: `index` into the flattened positions.

    pack:   (batch, seq, ...) -> (tokens, ...), the real tokens only, in order;
    unpack: (tokens, ...) -> (batch, seq, ...), zeros at the padded positions.
    `cls_rows`: the packed row of each sequence's position 0 ([CLS]), None when some position 0 is padding.
    """

    index: Tensor
    batch: int
    seq: int
    cls_rows: Tensor | None = None

    @classmethod
    def from_mask(cls, attention_mask: Tensor) -> Packing:
        b, s = attention_mask.shape
        real = attention_mask.to(torch.bool)
        lengths = real.sum(1)
        cls_rows = lengths.cumsum(0) - lengths if bool(real[:, 0].all()) else None
        return cls(real.reshape(-1).nonzero().squeeze(1), b, s, cls_rows)

    def pack(self, x: Tensor) -> Tensor:
        return x.reshape(self.batch * self.seq, *x.shape[2:]).index_select(0, self.index)

    def unpack(self, x: Tensor) -> Tensor:
        out = x.new_zeros(self.batch * self.seq, *x.shape[1:]).index_copy(0, self.index, x)
        return out.view(self.batch, self.seq, *x.shape[1:])


@dataclass
class HostChecks:
    """A batch's input checks and its packing, done on the host before the batch moved to the device.

    `BertModel.forward` checks its inputs and packs a padded batch itself; both read the token ids and the mask
    back, which on a GPU makes the host wait twice per forward. A loop that builds its batches on the host does
    both there (`BertModel.check_on_host`, before the copy) and passes the result as `checked=`."""

    has_padding: bool
    packing: Packing | None  # the real tokens' index, on the device (None without padding)


def attention_head(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """One attention head written out: softmax(q k^T / sqrt(d)) v, (..., S_q, d), (..., S_k, d), (..., S_k, d_v)
    -> (..., S_q, d_v), any leading (batch, heads) dimensions.

    mask: bool, broadcastable to (..., S_q, S_k), True where a query may attend to a key (the layout
    `BertModel` passes to attention; every query needs at least one key); None: attend everywhere.
    The readable reference of what `Attention.context` computes for all heads in one fused
    `scaled_dot_product_attention` call (tested equal); the model itself does not call it.
    """
    # BEGIN SOLUTION
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v
    # END SOLUTION


def project_heads(ctx: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """The output projection written out, head by head: sum_h ctx_h W_O[:, cols_h]^T + b_O,
    (batch, heads, S, d) -> (batch, S, hidden).

    weight: W_O, (hidden, heads * d), head h's columns at h*d .. (h+1)*d - 1 (`Attention.head_columns`);
    bias: b_O, (hidden,) or None. The readable reference of `Attention.project` (tested equal).
    """
    # BEGIN SOLUTION
    d = ctx.shape[-1]
    out = sum(ctx[:, h] @ weight[:, h * d:(h + 1) * d].t() for h in range(ctx.shape[1]))
    return out if bias is None else out + bias
    # END SOLUTION


class Attention(nn.Module):
    """One multi-head self-attention block: the residual branch Attn(x) = W_O concat_h head_h(x) + b_O.

    head_h(x) = softmax(Q_h K_h^T / sqrt(d)) V_h with Q_h = x W_Q,h^T + b_Q,h (likewise K, V).
    `heads` holds the original indices of the heads present, so a pruned block still says which heads it has.
    """

    head_gate: Tensor | None
    gate: Tensor | None

    def __init__(self, config: BertConfig, heads: list[int]):
        super().__init__()
        if not heads:
            raise ValueError("an Attention block needs at least one head; a layer without heads has attention=None")
        self.heads = list(heads)
        self.head_dim = config.head_dim
        inner = len(heads) * self.head_dim
        self.qkv = nn.Linear(config.hidden_size, 3 * inner)
        self.out = nn.Linear(inner, config.hidden_size)
        self.dropout_p = config.attention_probs_dropout_prob
        self.register_buffer("head_gate", None, persistent=False)
        self.register_buffer("gate", None, persistent=False)

    @property
    def num_heads(self) -> int:
        return len(self.heads)

    def head_rows(self, h: int) -> tuple[slice, slice, slice]:
        """Rows of `qkv.weight` that hold head h's (local index) query, key and value projections."""
        n, d = self.num_heads, self.head_dim
        return tuple(slice(t * n * d + h * d, t * n * d + (h + 1) * d) for t in range(3))  # type: ignore[return-value]

    def head_columns(self, h: int) -> slice:
        """Columns of `out.weight` that map head h's (local index) context into the hidden space."""
        return slice(h * self.head_dim, (h + 1) * self.head_dim)

    def context(self, x: Tensor, mask: Tensor | None = None, cls_only: bool = False,
                packing: Packing | None = None) -> Tensor:
        """All heads at once: (batch, seq, hidden) -> (batch, heads, seq, head_dim), gated per head if set.

        cls_only: attend from position 0 ([CLS]) alone, over all keys and values, giving
        (batch, heads, 1, head_dim); the queries of the other positions are never computed.
        packing: x is packed, (tokens, hidden); Q, K, V are computed for the real tokens, then unpacked.
        """
        n, d = self.num_heads, self.head_dim
        if cls_only:  # the Q rows of W_QKV for token 0, the K and V rows for every token
            b, s, _ = x.shape
            w, bias = self.qkv.weight, self.qkv.bias
            q = F.linear(x[:, :1], w[:n * d], bias[:n * d]).view(b, 1, n, d).transpose(1, 2)
            k, v = (t.transpose(1, 2) for t in F.linear(x, w[n * d:], bias[n * d:]).view(b, s, 2, n, d).unbind(2))
        else:
            qkv = self.qkv(x) if packing is None else packing.unpack(self.qkv(x))
            b, s, _ = qkv.shape
            # unbind along the Q/K/V axis of (batch, seq, 3, heads, head_dim): in backward, the three gradients
            # are stacked straight into that contiguous layout (one copy; a permute first would cost a second)
            q, k, v = (t.transpose(1, 2) for t in qkv.view(b, s, 3, n, d).unbind(2))
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=self.dropout_p if self.training else 0.0)
        if self.head_gate is not None:
            ctx = ctx * self.head_gate.view(1, -1, 1, 1).to(ctx)
        return ctx

    def project(self, ctx: Tensor, packing: Packing | None = None) -> Tensor:
        """W_O concat_h ctx_h + b_O: (batch, heads, seq, head_dim) -> (batch, seq, hidden), gated if set.

        packing: project the real tokens only, returning them packed, (tokens, hidden)."""
        b, n, s, d = ctx.shape
        merged = ctx.transpose(1, 2).reshape(b, s, n * d)
        out = self.out(merged if packing is None else packing.pack(merged))
        if self.gate is not None:
            out = out * self.gate.to(out)
        return out

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """The branch output Attn(x), before dropout and the residual sum."""
        return self.project(self.context(x, mask))

    def head_outputs(self, ctx: Tensor) -> Tensor:
        """Each head's own contribution W_O[:, cols_h] ctx_h: (batch, heads, seq, hidden), bias excluded.

        Their sum over heads plus b_O is `project(ctx)` (without the block gate). Memory grows with
        heads x hidden, so this is for measuring, not for the hot path.
        """
        b, n, s, d = ctx.shape
        w = self.out.weight.view(-1, n, d)  # (hidden, heads, head_dim)
        return torch.einsum("bnsd,ond->bnso", ctx, w)

    @torch.no_grad()
    def keep_heads(self, keep: list[int]) -> None:
        """Physically keep only the heads at local indices `keep` (shrinks `qkv` and `out`)."""
        if not keep:
            raise ValueError("keep_heads needs at least one head; remove the block instead")
        # BEGIN SOLUTION
        rows = torch.cat([torch.arange(self.qkv.out_features)[r] for t in range(3)
                          for r in (self.head_rows(h)[t] for h in keep)])
        cols = torch.cat([torch.arange(self.out.in_features)[self.head_columns(h)] for h in keep])
        self.qkv = _select_linear(self.qkv, rows, dim=0)
        self.out = _select_linear(self.out, cols, dim=1)
        if self.head_gate is not None:
            self.head_gate = self.head_gate[keep].clone()
        # END SOLUTION
        self.heads = [self.heads[h] for h in keep]


class FeedForward(nn.Module):
    """The feed-forward branch FFN(h) = W_2 act(W_1 h + b_1) + b_2; neuron i is row i of W_1, column i of W_2."""

    neuron_gate: Tensor | None
    gate: Tensor | None

    def __init__(self, config: BertConfig, ffn_dim: int):
        super().__init__()
        if ffn_dim < 1:
            raise ValueError("a FeedForward block needs at least one neuron; a layer without them has ffn=None")
        self.up = nn.Linear(config.hidden_size, ffn_dim)
        self.act = activation(config.hidden_act)
        self.down = nn.Linear(ffn_dim, config.hidden_size)
        self.register_buffer("neuron_gate", None, persistent=False)
        self.register_buffer("gate", None, persistent=False)

    @property
    def ffn_dim(self) -> int:
        return self.up.out_features

    def activations(self, h: Tensor) -> Tensor:
        """Post-activation values act(W_1 h + b_1), gated per neuron if set: (batch, seq, ffn_dim)."""
        z = self.act(self.up(h))
        if self.neuron_gate is not None:
            z = z * self.neuron_gate.to(z)
        return z

    def project(self, z: Tensor) -> Tensor:
        """W_2 z + b_2, gated if set."""
        out = self.down(z)
        if self.gate is not None:
            out = out * self.gate.to(out)
        return out

    def forward(self, h: Tensor) -> Tensor:
        """The branch output FFN(h), before dropout and the residual sum."""
        return self.project(self.activations(h))

    @torch.no_grad()
    def keep_neurons(self, keep: Tensor | list[int]) -> None:
        """Physically keep only the neurons at indices `keep` (shrinks `up` rows and `down` columns)."""
        keep = torch.as_tensor(keep, dtype=torch.long)
        if keep.numel() == 0:
            raise ValueError("keep_neurons needs at least one neuron; remove the block instead")
        self.up = _select_linear(self.up, keep, dim=0)
        self.down = _select_linear(self.down, keep, dim=1)
        if self.neuron_gate is not None:
            self.neuron_gate = self.neuron_gate[keep.to(self.neuron_gate.device)].clone()


@dataclass
class LayerTrace:
    """Everything one layer computed, for measuring branches: function norms, post-activation statistics.

    A field is None where its branch is removed. `context` is (batch, heads, seq, head_dim), `ffn_act` is
    (batch, seq, ffn_dim), the rest (batch, seq, hidden). A packed trace (`BertModel.forward(...,
    pack_trace=True)` on a padded batch) has `packing` set: then every field but `context` holds the real
    tokens only, (tokens, ...) in the order of `packing.index`, as the layer computed them.
    `cls_rows` is set on the last layer of a classifier's trace taken with `cls_trace=True`: its `ffn_out` and `y`
    then hold the [CLS] positions alone, (batch, hidden), the rows `cls_rows` of the other fields flattened to
    (rows, ...); the other fields still cover every token (`ffn_output` recomputes the FFN output of all).
    """

    x: Tensor
    context: Tensor | None
    attention_out: Tensor | None
    h: Tensor
    ffn_act: Tensor | None
    ffn_out: Tensor | None
    y: Tensor
    packing: Packing | None = None
    cls_rows: Tensor | None = None


    def ffn_output(self, layer: Layer) -> Tensor | None:
        """FFN(h) at every token the trace covers: `ffn_out`, or for a [CLS]-only last layer (`cls_rows`) W_2 z + b_2
        recomputed from `ffn_act` with `layer`'s FFN (the function its forward applied)."""
        if self.cls_rows is None or self.ffn_act is None:
            return self.ffn_out
        return layer.ffn.project(self.ffn_act)


class Layer(nn.Module):
    """One post-LN encoder layer with its two residual sums written out."""

    def __init__(self, config: BertConfig, heads: list[int], ffn_dim: int):
        super().__init__()
        self.attention: Attention | None = Attention(config, heads) if heads else None
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.ffn: FeedForward | None = FeedForward(config, ffn_dim) if ffn_dim > 0 else None
        self.ffn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: Tensor, mask: Tensor | None = None, trace: list[LayerTrace] | None = None,
                cls_only: bool = False, packing: Packing | None = None, cls_rows: Tensor | None = None) -> Tensor:
        """(batch, seq, hidden) -> (batch, seq, hidden); with cls_only, the output at position 0 only
        (batch, 1, hidden), which still attends over every position of x. With `packing`, x and the result
        are the real tokens only, (tokens, hidden).

        cls_rows (the last layer of a classifier's trace): the rows of x, flattened to (rows, hidden), that hold
        each sequence's [CLS]. Attention and the FFN's activations are computed, and traced, for every token (what
        the branches' norms read), the FFN's output W_2 z and the layer's output for those rows alone:
        (batch, 1, hidden), as with cls_only."""
        # attention sub-layer: h = LN(x + Attn(x)); a removed block contributes 0, so h = LN(x)
        ctx = a = None
        if cls_only:
            x, keys = x[:, :1], x
        if self.attention is None:
            h = self.attention_norm(x)
        else:
            ctx = self.attention.context(keys, mask, cls_only=True) if cls_only \
                else self.attention.context(x, mask, packing=packing)
            a = self.attention.project(ctx, packing)
            h = self.attention_norm(x + self.dropout(a))
        # feed-forward sub-layer: y = LN(h + FFN(h)); a removed block contributes 0, so y = LN(h)
        z = f = None
        h_out = h if cls_rows is None else h.reshape(-1, h.shape[-1]).index_select(0, cls_rows)
        if self.ffn is None:
            y = self.ffn_norm(h_out)
        else:
            z = self.ffn.activations(h)
            z_out = z if cls_rows is None else z.reshape(-1, z.shape[-1]).index_select(0, cls_rows)
            f = self.ffn.project(z_out)
            y = self.ffn_norm(h_out + self.dropout(f))
        if trace is not None:
            trace.append(LayerTrace(x=x, context=ctx, attention_out=a, h=h, ffn_act=z, ffn_out=f, y=y,
                                    packing=packing, cls_rows=cls_rows))
        return y if cls_rows is None else y.unsqueeze(1)


class Pooler(nn.Module):
    """pooled = tanh(W_p e_[CLS] + b_p), BERT's sentence representation for classification."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden: Tensor) -> Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))


class BertModel(nn.Module):
    """Embeddings, the stack of layers, and the pooler. `forward` returns the last hidden states."""

    def __init__(self, config: BertConfig, add_pooling_layer: bool = True):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList(Layer(config, s.heads, s.ffn_dim) for s in config.layers)
        self.pooler = Pooler(config) if add_pooling_layer else None
        self.apply(lambda m: init_weights(m, config.initializer_range))

    def check_inputs(self, input_ids: Tensor, attention_mask: Tensor | None,
                     token_type_ids: Tensor | None) -> bool:
        """Raise ValueError naming the argument and value for inputs the model cannot take.

        Returns whether the attention mask hides any token (padding present). The value checks read one
        small tensor back from the device, so a GPU forward pays a single synchronisation for all of them.
        """
        c = self.config
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        if input_ids.numel() == 0:
            raise ValueError(f"empty batch: input_ids has shape {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.long, torch.int32):
            raise ValueError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
        if input_ids.shape[1] > c.max_position_embeddings:
            raise ValueError(f"sequence length {input_ids.shape[1]} exceeds max_position_embeddings "
                             f"{c.max_position_embeddings}; truncate with the tokenizer's max_length")
        for name, t in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
            if t is not None and t.shape != input_ids.shape:
                raise ValueError(f"{name} has shape {tuple(t.shape)} but input_ids has shape {tuple(input_ids.shape)}")
        if token_type_ids is not None and token_type_ids.dtype not in (torch.long, torch.int32):
            raise ValueError(f"token_type_ids must be integer segment ids (torch.long or torch.int32), "
                             f"got dtype {token_type_ids.dtype}")
        if attention_mask is not None and (attention_mask.dtype.is_floating_point or attention_mask.dtype.is_complex):
            raise ValueError(f"attention_mask must hold 1 (real token) / 0 (padding) as integers or booleans, "
                             f"got dtype {attention_mask.dtype}")
        types = token_type_ids if token_type_ids is not None else input_ids.new_zeros(())
        mask = attention_mask if attention_mask is not None else input_ids.new_ones(())
        lo, hi, tlo, thi, mlo, mhi = torch.stack([input_ids.min().long(), input_ids.max().long(), types.min().long(),
                                                  types.max().long(), mask.min().long(), mask.max().long()]).tolist()
        if lo < 0 or hi >= c.vocab_size:
            raise ValueError(f"token id {hi if hi >= c.vocab_size else lo} is outside the vocabulary "
                             f"[0, {c.vocab_size}) of this model")
        if tlo < 0 or thi >= c.type_vocab_size:
            raise ValueError(f"token_type_ids must lie in [0, {c.type_vocab_size}), got values in [{tlo}, {thi}]")
        if mlo < 0 or mhi > 1:
            raise ValueError(f"attention_mask must hold only 1 (real token) and 0 (padding), "
                             f"got values in [{mlo}, {mhi}]")
        return mlo == 0  # some token is padding

    def check_on_host(self, input_ids: Tensor, attention_mask: Tensor | None, token_type_ids: Tensor | None,
                      device: torch.device) -> HostChecks:
        """`check_inputs` and the packing index on host (CPU) tensors, the index then sent to `device` without
        blocking: for `forward(..., checked=)`, so that the forward reads nothing back from the device."""
        if input_ids.device.type != "cpu" or (attention_mask is not None and attention_mask.device.type != "cpu"):
            raise ValueError("check_on_host takes the batch as it is on the host, before it moves to the device")
        has_padding = self.check_inputs(input_ids, attention_mask, token_type_ids)
        if not has_padding:
            return HostChecks(False, None)
        packing = Packing.from_mask(attention_mask)
        to = lambda t: None if t is None else (t.pin_memory() if device.type == "cuda" else t).to(  # noqa: E731
            device, non_blocking=True)
        return HostChecks(True, Packing(to(packing.index), packing.batch, packing.seq, to(packing.cls_rows)))

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None, trace: list[LayerTrace] | None = None,
                cls_only: bool = False, pack_trace: bool = False, checked: HostChecks | None = None,
                cls_trace: bool = False) -> Tensor:
        """(batch, seq) token ids -> (batch, seq, hidden) last hidden states.

        attention_mask: 1 for real tokens, 0 for padding (default: all real). token_type_ids: segment A/B
        (default 0). trace: pass an empty list to receive one `LayerTrace` per layer.
        cls_only: return (batch, 1, hidden), the [CLS] position only, which is all a classifier reads: the last
        layer then computes its queries, attention output and FFN for that one position (its keys and values
        still for all), about 5/6 of one layer's work saved. With a `trace`, cls_only is ignored, unless cls_trace:
        then the last layer computes everything its branches' norms read for every token, and its FFN output and
        output for [CLS] alone (`LayerTrace.cls_rows`; about a third of that layer's work saved). Where position 0
        of some sequence is padding, the last layer is traced whole.
        With padding, the layers run on the real tokens only (see `Packing`), unless a trace is asked for
        without `pack_trace`: that trace records the unpacked computation, every position of the batch. With
        pack_trace the layers run packed and so does the trace (`LayerTrace.packing`), which is cheaper
        where a reader wants the real tokens only. The returned hidden states are 0 at padded positions.
        checked: these inputs' `check_on_host` result; the forward then checks nothing and packs with its index.
        """
        has_padding = self.check_inputs(input_ids, attention_mask, token_type_ids) if checked is None \
            else checked.has_padding
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        mask = None
        if has_padding:  # without padding, attention needs no mask (and takes its fastest kernel)
            mask = attention_mask.bool()[:, None, None, :]  # (batch, 1, 1, seq): True = may attend
        x = self.embeddings(input_ids, token_type_ids)
        traced_cls = cls_only and cls_trace and trace is not None and len(self.layers) > 0
        cls_only = cls_only and trace is None and len(self.layers) > 0
        packing = None
        if has_padding and (trace is None or pack_trace):
            packing = Packing.from_mask(attention_mask) if checked is None else checked.packing
        if packing is not None:
            x = packing.pack(x)
        cls_rows = None
        if traced_cls:  # where each sequence's position 0 sits among the rows the last layer computes
            b, s = input_ids.shape
            cls_rows = torch.arange(b, device=x.device) * s if packing is None else packing.cls_rows
        for i, layer in enumerate(self.layers):
            last = i == len(self.layers) - 1
            if cls_only and last:  # the last layer, for [CLS] only, on the padded layout
                x = x if packing is None else packing.unpack(x)
                return layer(x, mask, cls_only=True)
            if cls_rows is not None and last:  # traced, its FFN output for [CLS] only: (batch, 1, hidden)
                return layer(x, mask, trace, packing=packing, cls_rows=cls_rows)
            x = layer(x, mask, trace, packing=packing)
        if packing is not None:
            return packing.unpack(x)
        return x.masked_fill(~attention_mask.bool()[..., None], 0.0) if has_padding else x  # an unpacked trace

    @classmethod
    def from_pretrained(cls, path_or_name: str | Path, **config_overrides) -> BertModel:
        """Load a Hugging Face BERT folder (or hub name, when online) or a minisnip checkpoint."""
        from .checkpoint import load_pretrained
        return load_pretrained(cls, path_or_name, **config_overrides)

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write config.json + model.safetensors atomically (see `minisnip.checkpoint.save_pretrained`)."""
        from .checkpoint import save_pretrained
        return save_pretrained(self, folder)


class BertForSequenceClassification(nn.Module):
    """BERT + pooler + dropout + a linear head: logits (batch, num_labels); num_labels = 1 is regression."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.bert = BertModel(config, add_pooling_layer=True)
        p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(p)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        init_weights(self.classifier, config.initializer_range)

    @property
    def is_regression(self) -> bool:
        return self.config.problem_type == "regression" or self.config.num_labels == 1

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None, trace: list[LayerTrace] | None = None,
                pack_trace: bool = False, checked: HostChecks | None = None, cls_trace: bool = False) -> Tensor:
        """Logits (batch, num_labels). trace / pack_trace / cls_trace / checked: as `BertModel.forward` (the
        encoder runs with cls_only: the classifier reads [CLS] alone)."""
        hidden = self.bert(input_ids, attention_mask, token_type_ids, trace, cls_only=True, pack_trace=pack_trace,
                           checked=checked, cls_trace=cls_trace)
        return self.classifier(self.dropout(self.bert.pooler(hidden)))

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Mean squared error for regression (STS-B), cross-entropy otherwise, as Hugging Face computes it."""
        if self.is_regression:
            return F.mse_loss(logits.squeeze(-1).float(), labels.float())
        return F.cross_entropy(logits.float(), labels.long())

    @classmethod
    def from_pretrained(cls, path_or_name: str | Path, **config_overrides) -> BertForSequenceClassification:
        """Load a fine-tuned classifier, or a plain BERT folder with a freshly initialised head.

        config_overrides set config fields, e.g. `num_labels=3`; a head whose shape no longer fits is re-initialised.
        """
        from .checkpoint import load_pretrained
        return load_pretrained(cls, path_or_name, **config_overrides)

    def save_pretrained(self, folder: str | Path) -> Path:
        from .checkpoint import save_pretrained
        return save_pretrained(self, folder)


def init_weights(module: nn.Module, std: float) -> None:
    """BERT's initialisation: N(0, std) for weights, zeros for biases, LayerNorm at (1, 0)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def _select_linear(linear: nn.Linear, index: Tensor, dim: int) -> nn.Linear:
    """A new Linear holding only the output rows (dim=0) or input columns (dim=1) at `index`."""
    w = linear.weight.index_select(dim, index.to(linear.weight.device))
    new = nn.Linear(w.shape[1], w.shape[0], bias=linear.bias is not None,
                    device=w.device, dtype=w.dtype)
    new.weight.copy_(w)
    if linear.bias is not None:
        new.bias.copy_(linear.bias.index_select(0, index.to(linear.bias.device)) if dim == 0 else linear.bias)
    new.weight.requires_grad_(linear.weight.requires_grad)
    return new


__all__ = ["Attention", "BertForSequenceClassification", "BertModel", "Embeddings", "FeedForward", "Layer",
           "LayerTrace", "Packing", "Pooler", "activation", "attention_head", "init_weights", "project_heads"]
