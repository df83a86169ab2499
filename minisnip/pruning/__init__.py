"""What every pruning method shares: branches and their names, compression, selection by a score, removal,
and the recipe (fine-tune with the method's terms -> score -> select -> remove -> recover).

SNIP's own equations live in `minisnip.snip`; the methods it is compared with in `minisnip.methods`.
"""

from .branches import KINDS, Branch, branch_name, default_group_size, list_branches, parse_name
from .compression import COMPRESSION_DEFINITION, compression, dense_encoder_linear_params, encoder_linear_params
from .removal import apply_pruning, canonical_names
from .select import select_below_threshold, select_for_target

__all__ = ["COMPRESSION_DEFINITION", "KINDS", "Branch", "apply_pruning", "branch_name", "canonical_names",
           "compression", "default_group_size", "dense_encoder_linear_params", "encoder_linear_params",
           "list_branches", "parse_name", "select_below_threshold", "select_for_target"]
