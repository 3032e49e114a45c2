"""Finding one state inside a (nested) optimizer state, for the accessors beside each state class."""
from __future__ import annotations

from typing import Any

import jax


def find_unique(tree: Any, cls: type) -> Any:
    """The one node of type ``cls`` in ``tree``; ValueError if there are none or several."""
    found = [x for x in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, cls)) if isinstance(x, cls)]
    if len(found) != 1:
        raise ValueError(f"expected exactly one {cls.__name__} in the optimizer state, found {len(found)}")
    return found[0]
