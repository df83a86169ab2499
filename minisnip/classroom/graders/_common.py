"""What the graders share: comparisons that say what is wrong, and small models rebuilt from stored weights."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

# the sizes of the small models the graders use (hidden 16, 4 heads of 4, FFN 32, 2 layers)
SMALL = dict(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=32,
             max_position_embeddings=24, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def check_tensor(name: str, got: Any, want: Tensor, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """AssertionError unless `got` is a tensor of want's shape whose values are close to want's."""
    if not isinstance(got, Tensor):
        raise AssertionError(f"{name}: expected a tensor, got {type(got).__name__}")
    if tuple(got.shape) != tuple(want.shape):
        raise AssertionError(f"{name}: wrong shape {tuple(got.shape)}, expected {tuple(want.shape)}")
    g, w = got.detach().to(torch.float64), want.detach().to(torch.float64)
    if not torch.isfinite(g).all():
        raise AssertionError(f"{name}: contains NaN or inf")
    if not torch.allclose(g, w, rtol=rtol, atol=atol):
        diff = (g - w).abs().max().item()
        raise AssertionError(f"{name}: differs from the expected values by up to {diff:.3g} "
                             f"(tolerance rtol={rtol:g}, atol={atol:g})")


def check_equal(name: str, got: Any, want: Any) -> None:
    if got != want:
        raise AssertionError(f"{name}: got {got!r}, expected {want!r}")


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def small_config(**overrides):
    from minisnip.config import BertConfig
    return BertConfig(**{**SMALL, **overrides})


def random_state(model: torch.nn.Module, seed: int) -> dict[str, Tensor]:
    """Random weights for every parameter (matrices N(0, 0.3), vectors N(0, 0.1), LayerNorm gains near 1)."""
    g = seeded(seed)
    state = {}
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
        if p.dim() == 1 and "norm.weight" in name:
            state[name] = 1.0 + 0.1 * noise
        else:
            state[name] = noise * (0.3 if p.dim() == 2 else 0.1)
    return state


def small_model(state: dict[str, Tensor] | None = None, seed: int = 0, **overrides):
    """A small `BertModel` in eval mode with the given weights (else random ones from `seed`)."""
    from minisnip.model import BertModel
    torch.manual_seed(seed)
    model = BertModel(small_config(**overrides))
    model.load_state_dict(state if state is not None else random_state(model, seed))
    return model.eval()


def small_batch(seed: int, b: int, s: int, pad: dict[int, int] | None = None) -> dict[str, Tensor]:
    """Token ids and an attention mask; pad = {row: first padded position}."""
    g = seeded(seed)
    ids = torch.randint(1, SMALL["vocab_size"], (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    for row, start in (pad or {}).items():
        mask[row, start:] = 0
    return {"input_ids": ids * mask, "attention_mask": mask}


__all__ = ["SMALL", "check_equal", "check_tensor", "random_state", "seeded", "small_batch", "small_config",
           "small_model"]
