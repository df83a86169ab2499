"""L0 gates on heads and FFN neuron groups, driven to an exact compression by a Lagrangian.

Louizos, Welling, Kingma. "Learning Sparse Neural Networks through L0 Regularization". ICLR 2018: every
branch m gets a gate z_m drawn from a *hard concrete* distribution with a learned location log α_m
(β = 2/3, γ = -0.1, ζ = 1.1; their Sec. 4, "hard concrete"):

    u ~ U(0, 1),  s = σ((log u - log(1 - u) + log α) / β),  s̄ = s (ζ - γ) + γ,  z = min(1, max(0, s̄))
                                                                          the sample       -> `sample_gates`
    P(z ≠ 0) = 1 - Q(s̄ ≤ 0) = σ(log α - β log(-γ / ζ))                    its expected L0  -> `prob_open`
    ẑ = min(1, max(0, σ(log α)(ζ - γ) + γ))                              test-time gate  -> `deterministic_gates`

Xia, Zhong, Chen. "Structured Pruning Learns Compact and Accurate Models" (CoFi). ACL 2022: instead
of a penalty λ E[L0] whose λ only indirectly sets the size, the expected *size* is held to a target by a
Lagrangian whose multipliers are learned by gradient ascent (min over the model and log α, max over λ):

    ŝ = expected compression = 1 - (P - Σ_m (1 - P(z_m ≠ 0)) params_m) / P_dense    -> `expected_compression`
    L_c = λ1 (ŝ - t) + λ2 (ŝ - t)²                                                   -> `lagrangian`

P = encoder linear-layer weights of the model as it is (`pruning.compression`), params_m those branch m owns
(`pruning.branches`), P_dense the dense model's count: ŝ is an expectation of the compression that
`select_for_target` measures. t ramps linearly to the target over the first `target_warmup` of the steps
(CoFi's "Lagrangian warm-up"; their scripts use 2 of 20 epochs on the large GLUE tasks, 20 of 100 on the
small ones), starting from ŝ at initialisation (CoFi's code starts from 0: the multipliers would first
push the gates *open* to meet t ≈ 0). minisnip's default warm-up is half of the steps, not CoFi's tenth: its
runs are short, and a target met early leaves the multipliers too large to stop (the measurements behind
both choices: docs/methods_structured.md, L0 gates).

Reconstructed where the papers (or this library) leave a choice:

* branches: heads and groups of FFN neurons (`kinds`, group size 2·head_dim by default), one log α each,
  without CoFi's layer-level and hidden-dimension masks (minisnip's compression counts only heads and
  neurons; a layer whose heads all go loses its block as for every method).
* ascent: λ1, λ2 are parameters of the ordinary AdamW (lr `lambda_lr`, no weight decay); the hook *negates
  their gradients* in `after_backward`, so the optimiser's descent step is an ascent step on L_c. (CoFi's
  code gives that group a negative learning rate instead, which AdamW accepts in a parameter group; the
  flipped gradient says the same in the open and keeps every rate positive.) With ŝ < t the gradient
  ∂L_c/∂λ1 = ŝ - t is negative, so λ1 *decreases* below 0; then
  ∂L_c/∂ŝ = λ1 + 2 λ2 (ŝ - t) < 0, and descent on log α raises ŝ. λ2 only grows ((ŝ - t)² ≥ 0).
* learning rates: 0.1 for log α and λ (CoFi uses 0.01 over 20 epochs; minisnip's runs are a few epochs,
  and at 0.01 a gate cannot close in a few hundred steps). Both groups follow fit's warm-up/decay schedule,
  so ŝ may overshoot the target and settle as the learning rates decay (docs/methods_structured.md).
* initialisation: log α = log((1 - p)/p) with p = `init_drop` = 0.01 (log α ≈ 4.6: the gates start open, as
  CoFi's code opens its head gates at log α = 10), plus N(0, 0.01²) noise; log α is clamped to
  ±`log_alpha_limit` = log 100 after each step (the range of the `constrain_parameters` in CoFi's L0
  module), so that a closed gate can still reopen.
* evaluation during fit (end of each epoch): `epoch_log` writes, before fit evaluates, the gates of the
  selection that would be made now (1 on the branches that `select_for_target` by log α keeps, 0 on the
  rest; `eval_gates="selection"`), so the dev scores are those of the model as it would be pruned (the
  bias of an emptied block still counts there); `eval_gates="test_time"` writes Louizos et al.'s ẑ
  instead. The next step samples again.
* ẑ and P(z ≠ 0) disagree in between: ẑ = 0 once log α < -log 11 ≈ -2.4, where P(z ≠ 0) is still 0.31,
  so when ŝ = t many ẑ may be fractional (or already 0); only the order of log α decides what is removed.
* scores = log α: ẑ is a non-decreasing function of log α, so sorting by log α is sorting by ẑ with its many
  ties at 0 and 1 broken by log α; `select_for_target` then reaches the target exactly (within one branch).
* before removal the gates go (`clear_gates`): the kept branches count in full. `fold_gates=True` instead
  folds ẑ into the weights first (head h's columns of W_O, neuron i's column of W_2 scaled by ẑ; CoFi
  multiplies the remaining weights by its z likewise); not the default, since in short runs the gates do
  not polarise: ŝ = 0.5 with gates alike means log α ≈ -1.6 each, where ẑ = 0.07, and folding would shrink
  every kept branch fourteen-fold (or, where ẑ = 0, silence a branch the selection kept).
* block biases b_O, b_2 (H numbers per block) are counted as kept in ŝ; removing a whole block removes them
  too, so the realised compression can only be higher.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..pruning.branches import list_branches
from ..pruning.compression import dense_encoder_linear_params, encoder_linear_params
from ..pruning.gates import GateLayout, clear_gates
from ..pruning.select import select_for_target
from ..surgery import encoder_of
from ..checks import check_field
from ..train import StepContext, TrainHook, the_hook

STRUCTURED = True
USES_DISTILLATION = False
NEEDS_TARGET = True  # refused without --target, before any training (the recipe checks)
SCHEDULED = True  # its gates follow a schedule (penalty warm-up / temperature): the last epoch is the one at the target
DESCRIPTION = "L0 gates (hard concrete, Louizos et al. 2018) with CoFi's Lagrangian to an exact compression"

EVAL_GATES = ("selection", "test_time")


@dataclass
class Config:
    """Hyper-parameters of L0 gating (defaults: Louizos et al. for the distribution, CoFi for the rest)."""

    lr: float = 0.1  # learning rate of log α (CoFi: 0.01 over 20 epochs; see module doc)
    lambda_lr: float = 0.1  # learning rate of the ascent on λ1, λ2
    target_warmup: float = 0.5  # share of the steps over which t ramps from the initial ŝ to the target
    init_drop: float = 0.01  # initial drop rate p: log α = log((1 - p) / p); 0.5 (CoFi's FFN start) halves every
    # branch from the first step, which STS-B does not survive (docs/methods_structured.md has the measurement)
    init_noise: float = 0.01  # std of the noise on the initial log α
    log_alpha_limit: float = math.log(100.0)  # |log α| is clamped to this after each step
    beta: float = 2.0 / 3.0  # temperature of the hard concrete distribution
    gamma: float = -0.1  # stretch: lower end (< 0)
    zeta: float = 1.1  # stretch: upper end (> 1)
    fold_gates: bool = False  # fold the test-time gates ẑ of kept branches into their weights before removal
    eval_gates: str = "selection"  # gates for fit's evaluations: "selection" (0/1 as pruned now) or "test_time" (ẑ)

    def __post_init__(self) -> None:
        check_field(self, "lr", lambda v: v > 0, "a finite number > 0")
        check_field(self, "lambda_lr", lambda v: v > 0, "a finite number > 0")
        check_field(self, "target_warmup", lambda v: 0 <= v <= 1, "a share of the steps in [0, 1]")
        check_field(self, "init_drop", lambda v: 0 < v < 1, "a probability in (0, 1)")
        check_field(self, "init_noise", lambda v: v >= 0, "a finite number >= 0")
        check_field(self, "log_alpha_limit", lambda v: v > 0, "a finite number > 0")
        check_field(self, "beta", lambda v: v > 0, "a finite number > 0")
        check_field(self, "gamma", lambda v: v < 0, "a finite number < 0")
        check_field(self, "zeta", lambda v: v > 1, "a finite number > 1")
        if not isinstance(self.fold_gates, bool):
            raise ValueError(f"fold_gates must be True or False, got fold_gates={self.fold_gates!r}")
        if self.eval_gates not in EVAL_GATES:
            raise ValueError(f"eval_gates must be one of {EVAL_GATES}, got eval_gates={self.eval_gates!r}")


# --- the hard concrete distribution (Louizos et al. 2018, Sec. 4) --------------------------------------------

def sample_gates(log_alpha: Tensor, beta: float = 2 / 3, gamma: float = -0.1, zeta: float = 1.1,
                 u: Tensor | None = None) -> Tensor:
    """z = min(1, max(0, σ((log u - log(1-u) + log α)/β)(ζ-γ) + γ)), u ~ U(0, 1); differentiable in log α."""
    if u is None:
        eps = 1e-6  # keeps log u and log(1 - u) finite
        u = torch.rand_like(log_alpha).mul_(1 - 2 * eps).add_(eps)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / beta)
    return (s * (zeta - gamma) + gamma).clamp(0.0, 1.0)


def prob_open(log_alpha: Tensor, beta: float = 2 / 3, gamma: float = -0.1, zeta: float = 1.1) -> Tensor:
    """P(z ≠ 0) = σ(log α - β log(-γ/ζ)): the expected L0 norm of each gate."""
    return torch.sigmoid(log_alpha - beta * math.log(-gamma / zeta))


def deterministic_gates(log_alpha: Tensor, gamma: float = -0.1, zeta: float = 1.1) -> Tensor:
    """The test-time gate ẑ = min(1, max(0, σ(log α)(ζ-γ) + γ))."""
    return (torch.sigmoid(log_alpha) * (zeta - gamma) + gamma).clamp(0.0, 1.0)


# --- CoFi's Lagrangian on the expected compression -----------------------------------------------------------

def expected_compression(p_open: Tensor, params: Tensor, present: int, dense: int) -> Tensor:
    """ŝ = 1 - (present - Σ_m (1 - p_m) params_m) / dense: the expected share of encoder linear weights removed."""
    return 1.0 - (present - ((1.0 - p_open) * params).sum()) / dense


def lagrangian(s_hat: Tensor, target: float, lambda1: Tensor, lambda2: Tensor) -> Tensor:
    """L_c = λ1 (ŝ - t) + λ2 (ŝ - t)²: zero at ŝ = t, minimised over log α, maximised over λ."""
    gap = s_hat - target
    return lambda1 * gap + lambda2 * gap * gap


def _check_kinds_and_target(kinds: tuple[str, ...], target) -> None:
    if ("head" in kinds and "attention" in kinds) or ("neurons" in kinds and "ffn" in kinds):
        raise ValueError(f"kinds {kinds} gate a block and its parts at once: its weights would count twice")
    if isinstance(target, bool) or not (isinstance(target, (int, float)) and 0 < target < 1):
        raise ValueError(f"L0 gates are trained toward a target compression in (0, 1), got target={target!r} "
                         "(a threshold, or no pruning at all, gives them nothing to aim at)")


class L0Gates(TrainHook):
    """Samples the gates each step, adds the Lagrangian, and turns the optimiser's λ step into an ascent step."""

    def __init__(self, model: nn.Module, cfg: Config, target: float, total_steps: int, kinds: tuple[str, ...],
                 neuron_group_size: int | None) -> None:
        _check_kinds_and_target(kinds, target)
        self.model, self.cfg, self.target = model, cfg, float(target)
        self.total_steps = max(1, int(total_steps))
        self.branches = list_branches(model, kinds, neuron_group_size if "neurons" in kinds else None)
        self.names = [b.name for b in self.branches]
        self.layout = GateLayout(model, self.branches)
        enc = encoder_of(model)
        self.present, self.dense = encoder_linear_params(enc), dense_encoder_linear_params(enc.config)
        reachable = 1 - (self.present - sum(b.params for b in self.branches)) / self.dense
        if reachable < target:
            raise ValueError(f"target {target} is out of reach: closing every gate of {kinds} gives compression "
                             f"{reachable:.4f}")
        device = next(model.parameters()).device
        init = math.log((1 - cfg.init_drop) / cfg.init_drop)
        self.log_alpha = nn.Parameter(init + cfg.init_noise * torch.randn(len(self.branches), device=device))
        self.lambda1 = nn.Parameter(torch.zeros((), device=device))
        self.lambda2 = nn.Parameter(torch.zeros((), device=device))
        self.params = torch.tensor([float(b.params) for b in self.branches], device=device)
        self.warmup_steps = round(cfg.target_warmup * self.total_steps)
        with torch.no_grad():
            self.start = min(float(self.expected_compression()), self.target)  # ŝ at initialisation
        self.target_now = self.start if self.warmup_steps else self.target

    # the distribution, with this hook's constants
    def prob_open(self) -> Tensor:
        """P(z_m ≠ 0) of every branch (differentiable in log α)."""
        return prob_open(self.log_alpha, self.cfg.beta, self.cfg.gamma, self.cfg.zeta)

    def deterministic(self) -> Tensor:
        """The test-time gates ẑ (detached)."""
        return deterministic_gates(self.log_alpha.detach(), self.cfg.gamma, self.cfg.zeta)

    def expected_compression(self) -> Tensor:
        return expected_compression(self.prob_open(), self.params, self.present, self.dense)

    def target_at(self, step: int) -> float:
        """t at a 1-based step: linear from the initial ŝ to the target over the warm-up steps, then the target."""
        if step >= self.warmup_steps:
            return self.target
        return self.start + (self.target - self.start) * step / self.warmup_steps

    # TrainHook
    def param_groups(self) -> list[dict]:
        device = next(self.model.parameters()).device  # fit has moved the model: the gates follow it
        for p in (self.log_alpha, self.lambda1, self.lambda2):
            p.data = p.data.to(device)
        self.params = self.params.to(device)
        return [{"params": [self.log_alpha], "lr": self.cfg.lr, "weight_decay": 0.0},
                {"params": [self.lambda1, self.lambda2], "lr": self.cfg.lambda_lr, "weight_decay": 0.0}]

    def before_forward(self, ctx: StepContext) -> None:
        self.layout.apply(ctx.model, sample_gates(self.log_alpha, self.cfg.beta, self.cfg.gamma, self.cfg.zeta))

    def loss(self, ctx: StepContext) -> Tensor:
        self.target_now = self.target_at(ctx.step)
        return lagrangian(self.expected_compression(), self.target_now, self.lambda1, self.lambda2)

    def after_backward(self, ctx: StepContext) -> None:
        for p in (self.lambda1, self.lambda2):  # ascent: the optimiser descends on -∂L_c/∂λ
            if p.grad is not None:
                p.grad.neg_()

    def after_step(self, ctx: StepContext) -> None:
        self.log_alpha.clamp_(-self.cfg.log_alpha_limit, self.cfg.log_alpha_limit)

    def selection_gates(self) -> Tensor:
        """1 on the branches that selecting by log α for the target keeps now, 0 on those it removes."""
        names = set(select_for_target(self.branches, dict(zip(self.names, self.log_alpha.detach().tolist())),
                                      self.target, model=self.model, allow_empty=True))
        gone = [b.name in names or b.parent in names for b in self.branches]
        return torch.tensor([0.0 if g else 1.0 for g in gone], device=self.log_alpha.device)

    def epoch_log(self) -> dict:
        """Writes the gates for the evaluation that follows (cfg.eval_gates); reports ŝ, t, λ and ẑ at 0 / 1."""
        zhat = self.deterministic()
        self.layout.apply(self.model, self.selection_gates() if self.cfg.eval_gates == "selection" else zhat)
        with torch.no_grad():
            s_hat = float(self.expected_compression())
        return {"expected_compression": s_hat, "target_now": self.target_now, "lambda1": float(self.lambda1.detach()),
                "lambda2": float(self.lambda2.detach()), "gates_closed": int((zhat == 0).sum()),
                "gates_open": int((zhat == 1).sum())}


# --- the method contract -------------------------------------------------------------------------------------

def check(model: nn.Module, cfg: Config, target: float | None, kinds: tuple[str, ...],
          neuron_group_size: int | None) -> None:
    """What `L0Gates` would refuse, found before any training (the recipe calls it)."""
    _check_kinds_and_target(kinds, target)


def training_hooks(model: nn.Module, cfg: Config, target: float, total_steps: int, kinds: tuple[str, ...],
                   neuron_group_size: int) -> list[TrainHook]:
    """One `L0Gates` hook: hard concrete gates on every branch of `kinds`, held to `target` by the Lagrangian."""
    return [L0Gates(model, cfg, target, total_steps, kinds, neuron_group_size)]


def scores(model: nn.Module, hooks: list[TrainHook], calib: list[dict], kinds: tuple[str, ...],
           neuron_group_size: int) -> dict[str, float]:
    """log α of every branch: sorts as the test-time gate ẑ does, ties at ẑ = 0 and 1 broken by log α.

    `calib` is not needed (the gates were learned during fine-tuning)."""
    hook = the_hook(hooks, L0Gates)
    names = [b.name for b in list_branches(model, kinds, neuron_group_size if "neurons" in kinds else None)]
    if names != hook.names:
        raise ValueError("the model's branches changed since the gates were made (pruned in between?)")
    return dict(zip(hook.names, hook.log_alpha.detach().cpu().tolist()))


@torch.no_grad()
def fold_gates(model: nn.Module) -> None:
    """Scale the weights by the gates set on the model, exactly: head h's columns of W_O by its head gate,
    neuron i's column of W_2 by its neuron gate, a block's output matrix and bias by its block gate."""
    for layer in encoder_of(model).layers:
        attn, ffn = layer.attention, layer.ffn
        if attn is not None and attn.head_gate is not None:
            g = attn.head_gate.detach().to(attn.out.weight).repeat_interleave(attn.head_dim)
            attn.out.weight.mul_(g)
        if attn is not None and attn.gate is not None:
            attn.out.weight.mul_(attn.gate.detach().to(attn.out.weight))
            attn.out.bias.mul_(attn.gate.detach().to(attn.out.bias))
        if ffn is not None and ffn.neuron_gate is not None:
            ffn.down.weight.mul_(ffn.neuron_gate.detach().to(ffn.down.weight))
        if ffn is not None and ffn.gate is not None:
            ffn.down.weight.mul_(ffn.gate.detach().to(ffn.down.weight))
            ffn.down.bias.mul_(ffn.gate.detach().to(ffn.down.bias))


def before_removal(model: nn.Module, hooks: list[TrainHook]) -> None:
    """Fold the test-time gates ẑ into the weights (cfg.fold_gates), then take every gate off the model."""
    hook = the_hook(hooks, L0Gates)
    if hook.cfg.fold_gates:
        hook.layout.apply(model, hook.deterministic())
        fold_gates(model)
    clear_gates(model)


__all__ = ["Config", "DESCRIPTION", "EVAL_GATES", "SCHEDULED", "L0Gates", "STRUCTURED", "USES_DISTILLATION", "before_removal",
           "deterministic_gates", "expected_compression", "fold_gates", "lagrangian", "prob_open", "sample_gates",
           "scores", "training_hooks"]
