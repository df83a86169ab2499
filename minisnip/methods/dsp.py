"""Differentiable subset pruning (DSP): learned importance logits under an exact budget of k kept branches.

Li, Cotterell, Sachan. "Differentiable Subset Pruning of Transformer Heads". TACL 2021 (arXiv 2108.04657).
Every head h gets an importance logit w_h, learned with the model by SGD; the gates are a relaxed sample of
a k-subset of the heads (the Gumbel-soft top-k of Xie & Ermon 2019), so exactly k heads stay:

    r = w + g,  g_h ~ Gumbel(0, 1)                                     perturbed logits
    p^(1) = softmax(r / τ),   p^(j) = softmax((r + Σ_{i<j} log(1 - p^(i))) / τ),   j = 2..k
    gates = Σ_{j=1..k} p^(j)          (sums to k; -> the hard top-k of r as τ -> 0)  -> `soft_top_k`

(the mask log(1 - p) is added to r before the division by τ, as in the authors' code; at moderate τ a
gate can exceed 1, since each softmax only down-weights what the previous one chose).

τ is annealed geometrically from τ_0 to τ_end over the first `cooldown` of the steps, then stays at τ_end
(`temperature`). After training the k branches with the largest w stay (`select`). The paper's other
estimator, a straight-through hard top-k (forward: the k-hot vector of the top-k w, no noise; backward:
the identity to w), is `estimator="ste"` (`hard_top_k_st`).

Defaults are those of the authors' BERT/MNLI runs (their public scripts): lr of w 0.5, τ_0 = 1000,
τ_end = 1e-8, cooldown 25,000 of 36,816 steps (3 epochs; 8,333 of 12,272 for 1 epoch): `cooldown` = 0.68;
w initialised uniformly in ±0.5 (Xavier on their 12 x 12 matrix of logits). Their gates are the soft k-hot
vector itself, no straight-through (so the forward sees fractional gates until τ is small), and so are ours.

Reconstructed for minisnip:

* branches: heads *and* FFN neuron groups (of 2·head_dim neurons, as many weights as a head) in one subset,
  over all layers, so that a compression target in weights is reachable; heads only with kinds=("head",).
* budget: compression target -> k. need = target·P_dense - (weights removed already); m = the fewest branches
  whose *smallest* parameter counts add up to need; k = N - m (`keep_budget`). Any m branches removed then
  meet the target; with branches of equal size this is exact, with heads (4Hd + 3d) and groups (4Hd + 2d)
  it errs by at most one branch; emptied blocks remove their bias too, so the compression only rises.
* the relaxation runs in float64 (as the authors' code does) and clamps 1 - p at the smallest float64 before
  the log, so a chosen entry drops out without producing -inf·0. The logits themselves are float64 too: once
  they spread (Adam at lr 0.5) and τ is small, an entry can be chosen partly in one softmax and again in a
  later one, each time multiplying its derivative by about 1/τ, and the exact gradient outgrows float32
  (3.4e38; inf, then NaN after the Adam step). The gates are cast to the model's dtype only when written.
* evaluation during fit (end of each epoch) uses the noise-free relaxation at the current τ (the hard
  top-k for "ste"), written by `epoch_log`; the next step samples again.
* cost: k sequential softmaxes over N values per step, inherent in the relaxation (its measured time:
  docs/methods_structured.md).
* budget warm-up (`budget_warmup`, off by default as in the paper): the budget falls linearly from k = N
  (every gate exactly 1) to the target's k over that share of the steps (`keep_at`), as CoFi's target
  warm-up does for L0. At τ_0 = 1000 every gate is about k/N, so without it every branch is scaled by
  about one half from the first step at a 50% target (what that does to STS-B: docs/methods_structured.md);
  with it the gates start at 1 and the subset hardens as τ falls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from ..pruning.branches import Branch, list_branches
from ..pruning.compression import dense_encoder_linear_params, encoder_linear_params
from ..pruning.gates import GateLayout, clear_gates
from ..pruning.removal import canonical_names
from ..surgery import encoder_of
from ..checks import check_field
from ..train import StepContext, TrainHook, the_hook

STRUCTURED = True
USES_DISTILLATION = False
NEEDS_TARGET = True  # refused without --target, before any training (the recipe checks)
SCHEDULED = True  # its gates follow a schedule (penalty warm-up / temperature): the last epoch is the one at the target
DESCRIPTION = "differentiable subset pruning: learned logits, Gumbel-soft top-k gates keeping exactly k (Li et al. 2021)"

ESTIMATORS = ("gumbel", "ste")


@dataclass
class Config:
    """Hyper-parameters of DSP (defaults: the authors' BERT runs)."""

    lr: float = 0.5  # learning rate of the logits w ("pruning_lr")
    init_temperature: float = 1000.0  # τ_0
    final_temperature: float = 1e-8  # τ_end
    cooldown: float = 0.68  # share of the steps over which τ is annealed (25,000 of 36,816 in the paper's runs)
    estimator: str = "gumbel"  # "gumbel": Gumbel-soft top-k; "ste": straight-through hard top-k
    init_range: float = 0.5  # w ~ U(-init_range, init_range)
    budget_warmup: float = 0.0  # share of the steps over which k falls from N (all kept) to the target's k

    def __post_init__(self) -> None:
        check_field(self, "lr", lambda v: v > 0, "a finite number > 0")
        check_field(self, "init_temperature", lambda v: v > 0, "a finite number > 0")
        check_field(self, "final_temperature", lambda v: 0 < v <= self.init_temperature,
                    f"a finite number in (0, init_temperature={self.init_temperature}]")
        check_field(self, "cooldown", lambda v: 0 <= v <= 1, "a share of the steps in [0, 1]")
        check_field(self, "init_range", lambda v: v >= 0, "a finite number >= 0")
        check_field(self, "budget_warmup", lambda v: 0 <= v < 1, "a share of the steps in [0, 1)")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got estimator={self.estimator!r}")


# --- the relaxation -----------------------------------------------------------------------------------------

def gumbel_noise(like: Tensor) -> Tensor:
    """g = -log(-log u), u ~ U(0, 1): standard Gumbel noise shaped like `like`."""
    tiny = torch.finfo(like.dtype).tiny
    u = torch.rand_like(like).clamp_(tiny, 1.0 - torch.finfo(like.dtype).eps)
    return -torch.log(-torch.log(u))


def soft_top_k(logits: Tensor, k: int, temperature: float, noise: Tensor | None = None) -> Tensor:
    """Σ_{j≤k} p^(j), p^(j) = softmax((r + Σ_{i<j} log(1 - p^(i))) / τ), r = logits + noise (float64 inside).

    Sums to k; tends to the k-hot vector of the top-k of r as τ -> 0; differentiable in the logits."""
    n = logits.shape[-1]
    if not 1 <= k <= n:
        raise ValueError(f"k must lie in [1, {n}] (the number of branches), got k={k}")
    r = logits.double() + (noise.double() if noise is not None else 0.0)
    if k == n:
        return torch.ones_like(logits) + 0 * logits  # every branch kept (still connected to the logits)
    tiny = torch.finfo(torch.float64).tiny
    total = torch.zeros_like(r)
    for _ in range(k):
        p = torch.softmax(r / temperature, dim=-1)
        total = total + p
        r = r + torch.log(torch.clamp(1.0 - p, min=tiny))
    return total.to(logits.dtype)


def hard_top_k(logits: Tensor, k: int) -> Tensor:
    """The k-hot vector of the k largest logits (ties: the first ones)."""
    out = torch.zeros_like(logits)
    out[torch.topk(logits.detach(), k).indices] = 1.0
    return out


def hard_top_k_st(logits: Tensor, k: int) -> Tensor:
    """Straight-through: the hard top-k forward, the identity backward (the paper's "ste" estimator)."""
    return hard_top_k(logits, k) + logits - logits.detach()


def temperature(step: int, cfg: Config, cooldown_steps: int) -> float:
    """τ at a 0-based step: exp(log τ_0 - (step / T_c)(log τ_0 - log τ_end)) up to T_c, then τ_end."""
    if cooldown_steps <= 0 or step >= cooldown_steps:
        return cfg.final_temperature
    a, b = math.log(cfg.init_temperature), math.log(cfg.final_temperature)
    return math.exp(a - step / cooldown_steps * (a - b))


def keep_at(step: int, n: int, k: int, warmup_steps: int) -> int:
    """The budget at a 0-based step: N - round((N - k) · step / T_w) during the budget warm-up, then k."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return k
    return n - round((n - k) * step / warmup_steps)


def keep_budget(model: nn.Module, branches: Sequence[Branch], target: float) -> int:
    """k: how many of `branches` may stay so that removing *any* of the others reaches `target` (module doc)."""
    if isinstance(target, bool) or not (isinstance(target, (int, float)) and 0 < target < 1):
        raise ValueError(f"DSP keeps a budget of k branches set by a target compression in (0, 1), got "
                         f"target={target!r} (a threshold, or no pruning at all, sets no budget)")
    enc = encoder_of(model)
    dense = dense_encoder_linear_params(enc.config)
    need = target * dense - (dense - encoder_linear_params(enc))
    if need <= 1e-9:
        return len(branches)
    total = 0
    for m, p in enumerate(sorted(b.params for b in branches), start=1):
        total += p
        if total >= need - 1e-9:
            if m == len(branches):
                raise ValueError(f"target {target} needs every one of the {len(branches)} branches removed; "
                                 "DSP keeps at least one")
            return len(branches) - m
    raise ValueError(f"target {target} cannot be reached by removing these {len(branches)} branches")


class SubsetGates(TrainHook):
    """The logits w, the annealed temperature, and the relaxed k-hot gates written before every forward."""

    def __init__(self, model: nn.Module, cfg: Config, target: float, total_steps: int, kinds: tuple[str, ...],
                 neuron_group_size: int | None) -> None:
        self.branches = list_branches(model, kinds, neuron_group_size if "neurons" in kinds else None)
        self.k = keep_budget(model, self.branches, target)  # checks the target first
        self.model, self.cfg, self.target = model, cfg, float(target)
        self.names = [b.name for b in self.branches]
        self.layout = GateLayout(model, self.branches)
        self.cooldown_steps = round(cfg.cooldown * max(1, int(total_steps)))
        self.warmup_steps = round(cfg.budget_warmup * max(1, int(total_steps)))
        weight = next(model.parameters())
        self.dtype = weight.dtype  # of the gates written into the model
        w = (torch.rand(len(self.branches), device=weight.device) * 2 - 1) * cfg.init_range
        self.logits = nn.Parameter(w.double())  # float64: the gradient can outgrow float32 (module doc)
        self.tau = temperature(0, cfg, self.cooldown_steps)
        self.k_now = keep_at(0, len(self.branches), self.k, self.warmup_steps)  # the budget of this step
        self.last: Tensor | None = None  # the gates of the last step (detached)

    def gates(self, sample: bool = True) -> Tensor:
        """The relaxed k_now-hot gates at the current τ (sample=False: without Gumbel noise), in the model's dtype."""
        if self.cfg.estimator == "ste":
            return hard_top_k_st(self.logits, self.k_now).to(self.dtype)
        noise = gumbel_noise(self.logits.detach().float()) if sample else None  # drawn in float32
        return soft_top_k(self.logits, self.k_now, self.tau, noise).to(self.dtype)

    def param_groups(self) -> list[dict]:
        self.logits.data = self.logits.data.to(next(self.model.parameters()).device)  # fit moved the model
        return [{"params": [self.logits], "lr": self.cfg.lr, "weight_decay": 0.0}]

    def before_forward(self, ctx: StepContext) -> None:
        self.tau = temperature(ctx.step - 1, self.cfg, self.cooldown_steps)
        self.k_now = keep_at(ctx.step - 1, len(self.branches), self.k, self.warmup_steps)
        gates = self.gates()
        self.last = gates.detach()
        self.layout.apply(ctx.model, gates)

    def epoch_log(self) -> dict:
        """Writes the noise-free gates for the evaluation that follows; reports τ, the budget now (`keep`), and
        `subset_agreement`: the share of the last sample's k_now largest gates that are among the k_now largest
        logits (1: the sampled subset has settled on the one `select` keeps)."""
        with torch.no_grad():
            self.layout.apply(self.model, self.gates(sample=False).detach())
        record = {"temperature": self.tau, "keep": self.k_now}
        if self.last is not None:
            sampled = set(torch.topk(self.last, self.k_now).indices.tolist())
            chosen = set(torch.topk(self.logits.detach(), self.k_now).indices.tolist())
            record["subset_agreement"] = len(sampled & chosen) / self.k_now
        return record


# --- the method contract -------------------------------------------------------------------------------------

def check(model: nn.Module, cfg: Config, target: float | None, kinds: tuple[str, ...],
          neuron_group_size: int | None) -> None:
    """What `SubsetGates` would refuse (a target its budget of k cannot keep), found before any training."""
    keep_budget(model, list_branches(model, kinds, neuron_group_size if "neurons" in kinds else None), target)


def training_hooks(model: nn.Module, cfg: Config, target: float, total_steps: int, kinds: tuple[str, ...],
                   neuron_group_size: int) -> list[TrainHook]:
    """One `SubsetGates` hook: logits on every branch of `kinds`, k = keep_budget(target)."""
    return [SubsetGates(model, cfg, target, total_steps, kinds, neuron_group_size)]


def scores(model: nn.Module, hooks: list[TrainHook], calib: list[dict], kinds: tuple[str, ...],
           neuron_group_size: int) -> dict[str, float]:
    """The learned logits w by branch name (`calib` is not needed)."""
    hook = the_hook(hooks, SubsetGates)
    if [b.name for b in list_branches(model, kinds, neuron_group_size if "neurons" in kinds else None)] != hook.names:
        raise ValueError("the model's branches changed since the logits were made (pruned in between?)")
    return dict(zip(hook.names, hook.logits.detach().cpu().tolist()))


def select(model: nn.Module, hooks: list[TrainHook], calib: list[dict], kinds: tuple[str, ...], neuron_group_size: int,
           target: float) -> list[str]:
    """Remove all but the k branches with the largest logits (canonical names): exactly k stay."""
    hook = the_hook(hooks, SubsetGates)
    if target != hook.target:
        raise ValueError(f"DSP was trained for target {hook.target}, asked to select for {target}")
    w = scores(model, hooks, calib, kinds, neuron_group_size)
    kept = set(sorted(w, key=w.get, reverse=True)[:hook.k])
    return canonical_names(model, [b for b in hook.branches if b.name not in kept])


def before_removal(model: nn.Module, hooks: list[TrainHook]) -> None:
    """Every gate back to None (the kept branches were trained with gates near 1 once τ is small)."""
    clear_gates(model)


__all__ = ["Config", "DESCRIPTION", "SCHEDULED", "ESTIMATORS", "STRUCTURED", "SubsetGates", "USES_DISTILLATION",
           "before_removal", "gumbel_noise", "hard_top_k", "hard_top_k_st", "keep_at", "keep_budget", "scores", "select",
           "soft_top_k", "temperature", "training_hooks"]
