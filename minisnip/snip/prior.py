"""The identity prior: a penalty that pushes residual branches toward the identity mapping.

Paper (Lin et al. 2020, Sec. 3), in words: instead of pushing single weights to zero, push a whole residual
module toward the identity mapping, then drop the modules whose function norm falls under a threshold.
For a residual sum x + f_m(x), "f_m is the identity of the sum" means f_m(x) = 0 for all x; under BERT's
post-LN this leaves LN(x), which is exactly what a removed branch computes (see `minisnip.model`).

Reconstruction used here (the paper publishes no formula): the prior is a group lasso on functions,

    R = sum_m w_m ||f_m||,      ||f_m|| = sqrt( mean over the batch's real tokens of ||f_m(x_t)||^2 ),

with the function norm of `minisnip.snip.norms`. The training loss is L_task + lambda * R; the caller
multiplies by lambda.

Why the norm and not its square: the squared norm is smooth at 0 and its gradient 2 f_m vanishes as f_m
shrinks, so an L2-type prior (like weight decay) makes branches small but never zero. The plain norm has a
gradient of constant size f_m / ||f_m|| however small f_m is, and a kink at 0; like the group lasso (Yuan &
Lin 2006) it sets whole groups exactly to zero output, which is what lets a thresholding operator remove
them with (almost) no change to the network. At exactly zero, sqrt has no derivative: the norm is taken as
sqrt(max(mean, 1e-20)), whose gradient is 0 there (the minimum-norm subgradient), so a gated or dead branch
yields a finite (zero) gradient instead of NaN.

Weights w_m:
    None      every branch weighs 1;
    "params"  w_m proportional to the parameters the branch owns, normalised to mean 1 over the penalised
              branches (so lambda keeps its scale): a branch is pushed in proportion to what removing it saves,
              e.g. an FFN block of BERT-base (4.7 M) harder than an attention block (2.4 M);
    dict      {name: weight} for every penalised branch (extra names, e.g. of pruned branches, are ignored).
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .. import distributed
from ..model import LayerTrace
from ..train import StepContext, TrainHook
from ..pruning.branches import DEFAULT_KINDS, branch_params, list_branches, parse_name, resolve_kinds
from ..pruning.select import select_for_target
from ..surgery import encoder_of
from .norms import NormEMA, batch_sq_norms

_EPS = 1e-20


def identity_prior(model: nn.Module, traces: Sequence[LayerTrace], attention_mask: Tensor | None,
                   kinds: Iterable[str] = DEFAULT_KINDS, weights: None | str | Mapping[str, float] = None,
                   neuron_group_size: int | None = None) -> Tensor:
    """R = sum_m w_m ||f_m|| over this batch (a scalar tensor, differentiable; multiply by lambda yourself).

    traces: the list filled by model(..., trace=[]) on this batch; attention_mask: its (batch, seq) mask
    (padding tokens are excluded from the token mean). kinds: which branches are penalised. Under torchrun the
    batch is the global one: the squared norms and the token count are summed over the ranks (every rank must
    call it), and the gradient is such that DDP's average over the ranks is this function's on one process.
    """
    kinds, neuron_group_size = resolve_kinds(model, kinds, neuron_group_size)
    names, sums, count = batch_sq_norms(model, traces, attention_mask, kinds, neuron_group_size)
    # distributed: the norms of the global batch, from every rank's sums (minisnip.distributed; one process: as is)
    sums, count = distributed.global_sum(sums), distributed.global_sum(count)
    if not names:
        return sums.new_zeros(())
    w = _weights(model, names, kinds, weights, neuron_group_size)
    # BEGIN SOLUTION
    norms = (sums / count.clamp_min(1).to(sums.dtype)).clamp_min(_EPS).sqrt()
    if w is None:
        return norms.sum()
    return (norms * w.to(device=norms.device, dtype=norms.dtype)).sum()
    # END SOLUTION


def _weights(model: nn.Module, names: list[str], kinds: tuple[str, ...], weights, neuron_group_size) -> Tensor | None:
    if weights is None:
        return None
    if isinstance(weights, str):
        if weights != "params":
            raise ValueError(f"weights must be None, 'params' or a dict of name -> weight, got {weights!r}")
        params = branch_params(model, kinds, neuron_group_size)
        p = torch.tensor([float(params[n]) for n in names], dtype=torch.float64)
        return p / p.mean()
    if isinstance(weights, Mapping):
        missing = [n for n in names if n not in weights]
        if missing:
            raise ValueError(f"weights has no entry for {len(missing)} penalised branches, e.g. {missing[:5]}")
        w = torch.tensor([float(weights[n]) for n in names], dtype=torch.float64)
        if not torch.isfinite(w).all() or (w < 0).any():
            raise ValueError("prior weights must be finite and >= 0")
        return w
    raise ValueError(f"weights must be None, 'params' or a dict of name -> weight, got {type(weights).__name__}")


class PriorPenalty(TrainHook):
    """The identity prior as a training term: λ_t Σ_m w_m ||f_m|| on each batch (`identity_prior`).

    λ_t ramps linearly from 0 to λ over the first `warmup_steps` steps (then stays at λ): at step 0 the
    classifier head is random, the task gradient reaching the encoder is weak, and a full-strength prior
    would shrink every branch before the task has said which ones it needs (docs/snip.md, "Why λ warms up",
    has the measurement). `step` counts the calls so far.

    With a `gate` (an option of minisnip's, not the paper's) λ_t is further multiplied by g_t in [0, 1], computed
    from the task loss L_t of each step (of the global batch under torchrun) through its running mean
    L̄_t = 0.98 L̄_{t-1} + 0.02 L_t, L̄_1 = L_1, so that on a task whose loss stays on its plateau the prior waits
    instead of shrinking every branch before the task is learnt (docs/snip.md, CoLA):

        "loss":      g_t = clamp(1 - L̄_t / L_1, 0, 1)                  the share of its first loss explained
        "baseline":  g_t = clamp((1 - L̄_t / B_t) / 0.25, 0, 1)         how far below a constant predictor

    B_t is the loss of the best constant prediction on the labels seen so far: the entropy -Σ_c p_c log p_c of
    their class frequencies (cross-entropy), or their variance (mean squared error, regression). "baseline" is
    0 while the model does no better than predicting the majority class (or the mean), and fully open once its
    loss is a quarter (GATE_MARGIN) below that; "loss" also counts the first steps' fall from a random head's
    loss to the majority class's as learning, and opens only in proportion.

    With a `target` compression (an option of minisnip's, not the paper's: the paper's prior does not know how
    much will be cut) the prior acts only on the branches that thresholding at that target would remove now:
    every TARGET_EVERY steps the batch's norms are folded into running ones and `select_for_target` chooses;
    those branches keep their weight w_m, every other branch gets 0. The branches to be cut are pushed toward
    zero and the ones to be kept are left to the task, so that the cut costs less before recovery; the price is
    one fine-tune per target instead of one for all targets. What it measured, and why it is off by default:
    docs/snip.md, "A prior aimed at the target".
    """

    needs_traces = True
    packed_traces = True  # the norms are sums over real tokens: a packed trace gives them without the padding
    cls_traces = True  # and they read the FFN output through LayerTrace.ffn_output
    GATES = ("none", "loss", "baseline")
    GATE_DECAY = 0.98  # the loss average's memory: about 50 steps
    GATE_MARGIN = 0.25  # "baseline": open once the loss is this share below the constant predictor's (a choice)
    TARGET_EVERY = 10  # with a target: steps between two choices of the targeted branches
    TARGET_DECAY = 0.8  # with a target: memory of the running norms, in samples (one every TARGET_EVERY steps)

    def __init__(self, lam: float, kinds: Iterable[str], neuron_group_size: int | None,
                 weights: None | str | Mapping[str, float] = "params", warmup_steps: int = 0,
                 gate: str = "none", target: float | None = None) -> None:
        if gate not in self.GATES:
            raise ValueError(f"gate must be one of {self.GATES}, got {gate!r}")
        if target is not None and not (isinstance(target, (int, float)) and 0 < target < 1):
            raise ValueError(f"target must be a compression in (0, 1) or None, got {target!r}")
        if target is not None and isinstance(weights, Mapping):
            raise ValueError("a targeted prior chooses its own branches: give weights None or 'params', not a dict")
        self.lam, self.kinds, self.neuron_group_size, self.weights = lam, tuple(kinds), neuron_group_size, weights
        self.target = target
        self.targeted: set[str] | None = None  # with a target: the branches the prior acts on now
        # with a target: running norms, sampled every TARGET_EVERY steps
        self._norms = NormEMA(self.kinds, self.TARGET_DECAY, neuron_group_size) if target is not None else None
        self._target_w: dict[str, float] = {}
        self.warmup_steps, self.step = max(0, warmup_steps), 0
        self.gate = gate
        self.first_loss: Tensor | None = None  # L_1 and L̄_t (tensors: reading them would wait for a GPU)
        self.mean_loss: Tensor | None = None
        # "baseline": the labels seen so far, as class counts (classification) or [n, Σy, Σy²] (regression)
        self.label_stats: Tensor | None = None
        self.regression: bool | None = None

    def strength(self) -> float:
        """λ_t for the current step (before the gate)."""
        if self.step >= self.warmup_steps:
            return self.lam
        return self.lam * (self.step + 1) / (self.warmup_steps + 1)

    def gate_value(self, task_loss: Tensor) -> Tensor:
        """g_t from this step's task loss (updates L̄_t; "baseline" reads the labels `observe_labels` added so
        far); see the class docstring."""
        task_loss = task_loss.detach().float()
        if self.first_loss is None:
            self.first_loss = self.mean_loss = task_loss
        else:
            self.mean_loss = self.GATE_DECAY * self.mean_loss + (1 - self.GATE_DECAY) * task_loss
        return self._gate()

    @staticmethod
    def label_stats_of(labels: Tensor, regression: bool, num_labels: int) -> Tensor:
        """B_t's statistics of a batch of labels: class counts (num_labels,), or [n, Σy, Σy²] (regression)."""
        if regression:
            y = labels.detach().double().reshape(-1)
            return torch.stack([y.new_tensor(float(y.numel())), y.sum(), (y * y).sum()])
        return torch.bincount(labels.detach().long().reshape(-1), minlength=num_labels)[:num_labels].double()

    def observe_labels(self, labels: Tensor, regression: bool, num_labels: int) -> None:
        """Add one batch's labels to B_t's statistics."""
        self._add_label_stats(self.label_stats_of(labels, regression, num_labels), regression)

    def _add_label_stats(self, stats: Tensor, regression: bool) -> None:
        self.regression = regression
        self.label_stats = stats if self.label_stats is None else self.label_stats + stats

    def baseline_loss(self) -> Tensor:
        """B_t: the loss of the best constant prediction on the labels seen so far (see the class docstring)."""
        if self.label_stats is None:
            raise ValueError('the "baseline" gate has seen no labels yet (observe_labels)')
        st = self.label_stats
        if self.regression:
            n = st[0].clamp_min(1)
            return (st[2] / n - (st[1] / n) ** 2).clamp_min(0).float()
        p = st / st.sum().clamp_min(1)
        return -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum().float()

    @classmethod
    def baseline_gate(cls, mean_loss: Tensor, baseline: Tensor) -> Tensor:
        """The "baseline" gate's g_t = clamp((1 - L̄_t / B_t) / GATE_MARGIN, 0, 1) of a running loss and B_t."""
        explained = 1 - mean_loss / baseline.to(mean_loss.device).clamp_min(1e-12)
        return (explained / cls.GATE_MARGIN).clamp(0, 1)

    def _gate(self) -> Tensor:
        """g_t from the current L̄_t (and L_1, or B_t)."""
        if self.gate == "baseline":
            return self.baseline_gate(self.mean_loss, self.baseline_loss())
        return (1 - self.mean_loss / self.first_loss.clamp_min(1e-12)).clamp(0, 1)

    def reselect(self, model: nn.Module, traces: Sequence[LayerTrace], mask: Tensor | None) -> None:
        """With a target: fold this batch's norms into the running ones (`NormEMA`, decay TARGET_DECAY) and choose
        the branches the thresholding at the target would remove now (`select_for_target` on the running norms,
        smallest first; a block it takes stands for all its heads or neuron groups)."""
        kinds, size = resolve_kinds(model, self.kinds, self.neuron_group_size)
        self._norms.update(traces, mask, model)
        scores = self._norms.norms()
        chosen = set(select_for_target(list_branches(model, kinds, size), scores, self.target, model=model))
        part = {"attention": "head", "ffn": "neurons"}  # a whole block taken: all of its heads / neuron groups
        whole = {(layer, part[kind]) for layer, kind, _ in map(parse_name, chosen) if kind in part}
        self.targeted = {n for n in scores if n in chosen or parse_name(n)[:2] in whole}

    def target_weights(self, model: nn.Module) -> dict[str, float]:
        """w_m of the targeted prior: the usual weight (1, or by parameters) on the chosen branches, 0 elsewhere."""
        kinds, size = resolve_kinds(model, self.kinds, self.neuron_group_size)
        names = list(branch_params(model, kinds, size))
        base = _weights(model, names, kinds, self.weights, size)
        base = [1.0] * len(names) if base is None else base.tolist()
        return {n: (w if n in self.targeted else 0.0) for n, w in zip(names, base)}

    def __call__(self, model: nn.Module, traces: Sequence[LayerTrace], mask: Tensor | None,
                 task_loss: Tensor | None = None) -> Tensor:
        """λ_t R on one batch's traces (times g_t with a gate, which needs `task_loss`); advances the step."""
        lam = self.strength()
        weights = self.weights
        if self.target is not None:
            if self.step % self.TARGET_EVERY == 0:
                self.reselect(model, traces, mask)
                self._target_w = self.target_weights(model)
            weights = self._target_w
        self.step += 1
        penalty = lam * identity_prior(model, traces, mask, self.kinds, weights, self.neuron_group_size)
        if self.gate == "none":
            return penalty
        if task_loss is None:
            raise ValueError(f"PriorPenalty(gate={self.gate!r}) needs the step's task loss")
        return penalty * self.gate_value(task_loss).to(penalty.dtype)

    def loss(self, ctx: StepContext) -> Tensor:
        task_loss = None
        if self.gate != "none":  # the global batch's mean task loss (one process: the loss itself)
            task_loss = distributed.global_sum(ctx.loss.detach().float() * ctx.share)
        if self.gate == "baseline":
            regression = getattr(ctx.model, "is_regression", None)
            if regression is None:
                raise ValueError('the "baseline" gate needs a classifier (BertForSequenceClassification): it reads '
                                 "the task's labels and loss")
            labels = ctx.batch["labels"] if ctx.share else ctx.batch["labels"][:0]  # share 0: no example of its own
            mine = self.label_stats_of(labels, regression, ctx.model.config.num_labels)
            self._add_label_stats(distributed.global_sum(mine), regression)  # the global batch's labels
        return self(ctx.model, ctx.traces, ctx.mask, task_loss)

    def epoch_log(self) -> dict:
        if self.gate == "none" or self.mean_loss is None:
            return {}
        out = {"prior_loss_gate": float(self._gate())}
        if self.gate == "baseline":
            out["prior_gate_baseline_loss"] = float(self.baseline_loss())
        return out


def output_weight_groups(model: nn.Module, kinds: Iterable[str], neuron_group_size: int | None) -> list[Tensor]:
    """The output weights of every branch, grouped: per layer, W_O viewed as (hidden, heads, d) for heads and
    W_2 viewed as (hidden, groups, g) for neuron groups (the last group zero-padded is not allowed: the width
    must be a multiple of g). Views of the trainable tensors (under SN: of the weight before normalization),
    so an in-place change of a group changes the model."""
    kinds, neuron_group_size = resolve_kinds(model, kinds, neuron_group_size)
    blocks = [k for k in kinds if k in ("attention", "ffn")]
    if blocks:
        raise ValueError(f"the proximal step acts on heads and neuron groups (their output weights); kinds {blocks} "
                         "are whole blocks, which it leaves to the thresholding")
    out = []
    for layer in encoder_of(model).layers:
        if "head" in kinds and layer.attention is not None:
            a = layer.attention
            out.append(_trainable_weight(a.out).view(a.out.out_features, a.num_heads, a.head_dim))
        if "neurons" in kinds and layer.ffn is not None:
            w = _trainable_weight(layer.ffn.down)
            if w.shape[1] % neuron_group_size:
                raise ValueError(f"the proximal step needs FFN widths that are multiples of the group size "
                                 f"{neuron_group_size}, got {w.shape[1]}")
            out.append(w.view(w.shape[0], -1, neuron_group_size))
    return out


def _trainable_weight(linear: nn.Linear) -> Tensor:
    if parametrize.is_parametrized(linear, "weight"):
        return linear.parametrizations.weight.original
    return linear.weight


@torch.no_grad()
def group_prox_(groups: Sequence[Tensor], thresholds: Sequence[Tensor | float]) -> None:
    """The proximal operator of t ||W_g|| for every group g, in place (block soft-thresholding):

        W_g <- W_g * max(0, 1 - t_g / ||W_g||)

    It shrinks each group toward zero and sets it exactly to zero when ||W_g|| <= t_g. `groups` are
    (rows, n_groups, cols) views (`output_weight_groups`); a group is W[:, g, :]; thresholds broadcast over
    the groups of each tensor."""
    for w, t in zip(groups, thresholds):
        norms = w.pow(2).sum(dim=(0, 2)).sqrt()
        scale = (1 - torch.as_tensor(t, dtype=w.dtype, device=w.device) / norms.clamp_min(1e-30)).clamp_min(0)
        w.mul_(scale.view(1, -1, 1))


class ProximalPrior(TrainHook):
    """The identity prior as a proximal step instead of a loss term: after every optimiser step, the group
    lasso λ_t Σ_m w_m ||W_m|| on each branch's OUTPUT weights (W_O's columns of a head, W_2's columns of a
    neuron group) is applied by its proximal operator with the step's learning rate η (`group_prox_` with
    t_m = η λ_t w_m). Unlike the subgradient of λ||f_m|| through AdamW, which shrinks norms but leaves them near
    their size, it sets a branch's output weights, and so its function, EXACTLY to zero once they are small
    enough: the thresholding then removes it without changing the network. λ_t warms up as in PriorPenalty.
    Its λ lives on the scale of the output weights' norms, not of function norms: `Config.prox_lambda`."""

    def __init__(self, lam: float, kinds: Iterable[str], neuron_group_size: int | None,
                 weights: None | str = "params", warmup_steps: int = 0) -> None:
        self.ramp = PriorPenalty(lam, kinds, neuron_group_size, weights, warmup_steps)  # the same λ_t schedule
        self._w: list[Tensor] | None = None

    def _group_weights(self, model: nn.Module) -> list[Tensor]:
        """w_m per group tensor, in the order of `output_weight_groups`: as the loss-term prior weighs them
        (`_weights`: parameters of the branch, mean 1; or 1 each)."""
        groups = output_weight_groups(model, self.ramp.kinds, self.ramp.neuron_group_size)
        kinds, size = resolve_kinds(model, self.ramp.kinds, self.ramp.neuron_group_size)
        names = list(branch_params(model, kinds, size))  # per layer: its heads, then its neuron groups
        w = _weights(model, names, kinds, self.ramp.weights, size)
        w = torch.ones(len(names)) if w is None else w.float()
        return list(w.split([g.shape[1] for g in groups]))

    def after_step(self, ctx: StepContext) -> None:
        lam = self.ramp.strength()
        self.ramp.step += 1
        if self._w is None:
            self._w = self._group_weights(ctx.model)
        groups = output_weight_groups(ctx.model, self.ramp.kinds, self.ramp.neuron_group_size)
        group_prox_(groups, [ctx.lr * lam * w for w in self._w])

    def epoch_log(self) -> dict:
        return {"prox_lambda_now": self.ramp.strength()}


__all__ = ["PriorPenalty", "ProximalPrior", "group_prox_", "identity_prior", "output_weight_groups"]
