"""Nested dicts by path: the one flattener of configs (``optim.lr``) and results
(``verification/lfw/accuracy``). No magjax imports, so that every layer can use it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def flatten(
    tree: Mapping, sep: str, *, keep_empty: bool = False, prefix: str = ""
) -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{f"a{sep}b": 1}``, in ``tree``'s order. An empty mapping is
    dropped, or with ``keep_empty`` kept as a value: a config's empty field
    (``data.synthetic_options``) is a field like any other, an empty section of results holds
    no number."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and (value or not keep_empty):
            flat.update(flatten(value, sep, keep_empty=keep_empty, prefix=name + sep))
        else:
            flat[name] = value
    return flat
