"""Gradient importance of heads (and FFN neuron groups), pruned iteratively.

Michel, Levy, Neubig. "Are Sixteen Heads Really Better than One?". NeurIPS 2019, Sec. 4. Every head h gets a
gate ξ_h multiplying its output (ξ = 1 is the model as trained); its importance is the expected sensitivity
of the loss to the gate, a first-order (Taylor) estimate of what masking the head costs:

    I_h = E_x | ∂L(x) / ∂ξ_h |        at ξ = 1                                   -> `gate_importance`
    I_h <- I_h / || I_layer ||_2      over the heads of the same layer              -> `normalize_per_layer`

(the paper normalises the scores per layer by their l2 norm, after Molchanov et al. 2017). Heads are then
pruned *iteratively* ("greedy algorithms for pruning down models"): mask the least important ones,
recompute the importance on the masked model, mask again, until the wanted size is reached (the paper
prunes 10% of the heads per step).

Reconstructed where the paper is silent, or where minisnip needs more than heads:

* FFN neuron groups get the same score through their gate (`FeedForward.neuron_gate`: one ξ per group of
  2·head_dim neurons, which owns as many weights as a head), so a compression of 50% and beyond is
  reachable; the per-layer normalisation is over the branches of the same layer *and kind*.
* the gradient is taken on the task loss of the calibration batches' labels (`model.loss`, the mean over a
  batch), model in eval mode (no dropout), float32; |.| is taken per batch, as the authors' code does
  (per example, the paper's E_x, with `per_example=True`); the batches are weighted by their size.
* one iteration masks `step` = 10% of the dense encoder's linear-layer weights (the paper: 10% of the
  heads; with heads and neuron groups of equal size the two agree), chosen by `pruning.select_for_target`
  on the importance of the branches still there (those masked already count as taken first); the last
  iteration stops at the target itself, so it is met within one branch.
* a masked branch has gate 0; a layer whose heads (neurons) are all masked also has its block gate at 0, so
  the masked model is exactly the model that removing those branches gives (bias b_O / b_2 included), and
  the normalisation of the next iteration runs over the branches still there.
* plain fine-tuning: `training_hooks` adds no training term; it returns one inert hook that only carries the
  `Config` to `scores` and `select` (the method contract gives them the hooks, not the config).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from ..pruning.branches import Branch, list_branches
from ..pruning.compression import dense_encoder_linear_params, encoder_linear_params
from ..pruning.gates import GateLayout, clear_gates
from ..pruning.removal import RemovalPlan
from ..pruning.select import select_for_target
from ..surgery import encoder_of
from ..checks import check_field
from ..train import TrainHook

STRUCTURED = True
USES_DISTILLATION = False
NEEDS_TARGET = True  # refused without --target, before any training (the recipe checks)
SCHEDULED = False  # the best epoch of fine-tuning is kept
DESCRIPTION = "gradient importance |dL/dξ| of heads and neuron groups, pruned iteratively (Michel et al. 2019)"


@dataclass
class Config:
    """Hyper-parameters of iterative importance pruning (defaults: the paper's where it has them)."""

    step: float = 0.1  # share of the dense encoder's linear weights masked per iteration (paper: 10% of heads)
    normalize: bool = True  # divide by the L2 norm over the layer's branches of the same kind (paper: yes)
    per_example: bool = False  # |dL/dξ| per example (the paper's E_x) instead of per calibration batch

    def __post_init__(self) -> None:
        check_field(self, "step", lambda v: 0 < v <= 1, "a share of the dense encoder in (0, 1]")
        for name in ("normalize", "per_example"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {name}={getattr(self, name)!r}")


class Settings(TrainHook):
    """Does nothing during fine-tuning; carries the method's Config to `scores` and `select`."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg


def _cfg(hooks: Sequence[TrainHook]) -> Config:
    found = [h.cfg for h in hooks if isinstance(h, Settings)]
    return found[0] if found else Config()


# --- importance ---------------------------------------------------------------------------------------------

def _batches(calib: list[dict], per_example: bool):
    for batch in calib:
        if not per_example:
            yield batch
            continue
        for i in range(batch["input_ids"].shape[0]):
            yield {k: v[i:i + 1] for k, v in batch.items()}


def apply_mask(model: nn.Module, layout: GateLayout, gone: set[str]) -> None:
    """Gate 0 on the branches named in `gone`, 1 elsewhere; a block whose parts are all gone gets block gate 0."""
    device = next(model.parameters()).device
    values = torch.tensor([0.0 if b.name in gone else 1.0 for b in layout.branches], device=device)
    layout.apply(model, values)
    _zero_emptied_blocks(model, layout.branches, gone)


def _zero_emptied_blocks(model: nn.Module, branches: Sequence[Branch], gone: set[str]) -> None:
    enc = encoder_of(model)
    plan = RemovalPlan(enc)
    for b in branches:
        if b.name in gone:
            plan.add(b)
    device = next(model.parameters()).device
    for i, layer in enumerate(enc.layers):
        if plan.attention_gone(i):
            layer.attention.gate = torch.zeros((), device=device)
        if plan.ffn_gone(i):
            layer.ffn.gate = torch.zeros((), device=device)


def gate_importance(model: nn.Module, calib: list[dict], layout: GateLayout, gone: set[str] = frozenset(),
                    per_example: bool = False) -> Tensor:
    """E_x |∂L/∂ξ_m| for every branch of `layout` at ξ = 1 (0 for the branches in `gone`), in layout order.

    The model is put in eval mode for the measurement and left as it was, without gates."""
    if not calib:
        raise ValueError("head importance needs calibration batches (calib is empty)")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    base = torch.tensor([0.0 if b.name in gone else 1.0 for b in layout.branches], device=device)
    total, count = torch.zeros(len(layout), device=device), 0
    try:
        for batch in _batches(calib, per_example):
            xi = base.clone().requires_grad_(True)
            layout.apply(model, xi)
            _zero_emptied_blocks(model, layout.branches, gone)
            b = {k: v.to(device) for k, v in batch.items()}
            logits = model(b["input_ids"], b["attention_mask"], b["token_type_ids"])
            (grad,) = torch.autograd.grad(model.loss(logits, b["labels"]), xi)
            n = b["input_ids"].shape[0]
            total += grad.abs() * n
            count += n
    finally:
        clear_gates(model)
        model.train(was_training)
    return total / count


def normalize_per_layer(values: Tensor, branches: Sequence[Branch], active: Sequence[bool] | None = None) -> Tensor:
    """values / ||values over the (active) branches of the same layer and kind||_2; inactive ones are left as 0."""
    out = torch.zeros_like(values)
    groups: dict[tuple[int, str], list[int]] = {}
    for j, b in enumerate(branches):
        if active is None or active[j]:
            groups.setdefault((b.layer, b.kind), []).append(j)
    for idx in groups.values():
        index = torch.tensor(idx, device=values.device)
        v = values.index_select(0, index)
        out[index] = v / (v.norm() + 1e-20)
    return out


def importance(model: nn.Module, calib: list[dict], branches: Sequence[Branch], cfg: Config,
               gone: set[str] = frozenset()) -> dict[str, float]:
    """The importance of every branch not in `gone` (normalised per layer and kind if cfg.normalize)."""
    layout = GateLayout(model, branches)
    raw = gate_importance(model, calib, layout, gone, cfg.per_example)
    active = [b.name not in gone for b in branches]
    values = normalize_per_layer(raw, branches, active) if cfg.normalize else raw
    return {b.name: float(v) for b, v, a in zip(branches, values.tolist(), active) if a}


# --- iterative masking --------------------------------------------------------------------------------------

def masked_compression(model: nn.Module, gone: Sequence[Branch]) -> float:
    """The compression that removing `gone` would reach (weights removed earlier count too)."""
    enc = encoder_of(model)
    dense = dense_encoder_linear_params(enc.config)
    plan = RemovalPlan(enc)
    for b in gone:
        plan.add(b)
    removed = dense - encoder_linear_params(enc) + sum(plan.removed_params(i) for i in range(len(enc.layers)))
    return removed / dense


def iterative_selection(model: nn.Module, calib: list[dict], branches: Sequence[Branch], target: float,
                        cfg: Config) -> tuple[list[str], list[dict]]:
    """Mask ~cfg.step of the dense encoder at a time by importance, recomputed on the masked model, until
    `target`. Returns the canonical names to remove and one record per iteration (its target, the
    compression reached, how many branches were masked)."""
    gone: set[str] = set()
    reached = masked_compression(model, [])
    records: list[dict] = []
    while True:
        goal = min(target, reached + cfg.step)
        scores = importance(model, calib, branches, cfg, gone)
        scores.update({name: float("-inf") for name in gone})  # masked already: taken first
        names = select_for_target(branches, scores, goal, model=model)
        taken = set(names)
        gone = {b.name for b in branches if b.name in taken or b.parent in taken}
        reached = masked_compression(model, [b for b in branches if b.name in gone])
        records.append({"target": goal, "compression": reached, "masked": len(gone)})
        if goal >= target:
            return names, records


# --- the method contract -------------------------------------------------------------------------------------

def training_hooks(model: nn.Module, cfg: Config, target: float, total_steps: int, kinds: tuple[str, ...],
                   neuron_group_size: int) -> list[TrainHook]:
    """Plain fine-tuning: one inert hook carrying `cfg` (no training term, no gates)."""
    return [Settings(cfg)]


def _branches(model: nn.Module, kinds: tuple[str, ...], neuron_group_size: int | None) -> list[Branch]:
    return list_branches(model, kinds, neuron_group_size if "neurons" in kinds else None)


def scores(model: nn.Module, hooks: list[TrainHook], calib: list[dict], kinds: tuple[str, ...],
           neuron_group_size: int) -> dict[str, float]:
    """One-shot importance of every branch on the unmasked model (the first iteration of `select`)."""
    return importance(model, calib, _branches(model, kinds, neuron_group_size), _cfg(hooks))


def select(model: nn.Module, hooks: list[TrainHook], calib: list[dict], kinds: tuple[str, ...], neuron_group_size: int,
           target: float) -> list[str]:
    """The branches to remove: iterative masking by recomputed importance until `target` (canonical names)."""
    if isinstance(target, bool) or not (isinstance(target, (int, float)) and 0 < target < 1):
        raise ValueError(f"iterative head-importance pruning runs to a target compression in (0, 1), got "
                         f"target={target!r}; with a threshold, select by `scores` (one-shot importance)")
    names, _ = iterative_selection(model, calib, _branches(model, kinds, neuron_group_size), target, _cfg(hooks))
    return names


def before_removal(model: nn.Module, hooks: list[TrainHook]) -> None:
    """Nothing of the method's stays on the model; every gate back to None."""
    clear_gates(model)


__all__ = ["Config", "DESCRIPTION", "SCHEDULED", "STRUCTURED", "Settings", "USES_DISTILLATION", "apply_mask", "before_removal",
           "gate_importance", "importance", "iterative_selection", "masked_compression", "normalize_per_layer",
           "scores", "select", "training_hooks"]
