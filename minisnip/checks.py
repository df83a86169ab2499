"""Value checks shared by every dataclass of settings (BertConfig, PruneConfig, each method's Config).

One rule for what a number is: a finite int or float, never a bool (True is an int to Python, not a size to us).
"""

from __future__ import annotations

import math
from typing import Any, Callable


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_field(cfg: object, name: str, ok: Callable[[float], bool], what: str) -> None:
    """ValueError naming the field and its value unless it is a finite number for which ok(v) holds."""
    v = getattr(cfg, name)
    if not is_number(v) or not ok(v):
        raise ValueError(f"{type(cfg).__name__}.{name} must be {what}, got {name}={v!r}")


__all__ = ["check_field", "is_int", "is_number"]
