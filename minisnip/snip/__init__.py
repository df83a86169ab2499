"""SNIP: residual branches, their function norms, the identity prior and the thresholding operator.

Lin et al., "Pruning Redundant Mappings in Transformer Models via Spectral-Normalized Identity Prior",
Findings of EMNLP 2020. The paper published no code; every formula here is a reconstruction, written down
in the docstrings of `branches`, `prior` and `threshold`.
"""

from .branches import (KINDS, Branch, NormEMA, branch_name, branch_sq_norms, function_norms, list_branches,
                       parse_name)
from .prior import identity_prior
from .threshold import (COMPRESSION_DEFINITION, apply_pruning, canonical_names, compression,
                        dense_encoder_linear_params, encoder_linear_params, select_below_threshold,
                        select_for_target)

__all__ = ["COMPRESSION_DEFINITION", "KINDS", "Branch", "NormEMA", "apply_pruning", "branch_name",
           "branch_sq_norms", "canonical_names", "compression", "dense_encoder_linear_params",
           "encoder_linear_params", "function_norms", "identity_prior", "list_branches", "parse_name",
           "select_below_threshold", "select_for_target"]
