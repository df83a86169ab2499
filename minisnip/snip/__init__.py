"""SNIP: function norms, the identity prior, spectral normalization, and SNIP as a method on the shared recipe.

Lin et al., "Pruning Redundant Mappings in Transformer Models via Spectral-Normalized Identity Prior",
Findings of EMNLP 2020. The paper published no code; every formula here is a reconstruction, written down
in the docstrings of `norms`, `prior` and `spectral`. What SNIP shares with the other methods (branches,
compression, selection, removal, the recipe) lives in `minisnip.pruning`.
"""

from .norms import NormEMA, branch_sq_norms, function_norms
from .prior import identity_prior

__all__ = ["NormEMA", "branch_sq_norms", "function_norms", "identity_prior"]
