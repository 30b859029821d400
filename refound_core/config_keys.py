"""One check shared by every config dataclass's ``from_dict``: refuse keys the class does not know
(a typo in a config file, or a file written by a newer version) instead of ignoring them."""
from __future__ import annotations

import dataclasses


def unknown_keys(cls, d: dict) -> tuple:
    """``(unknown keys sorted, known field names sorted)`` of ``d`` for dataclass ``cls``."""
    known = {f.name for f in dataclasses.fields(cls)}
    return sorted(set(d) - known), sorted(known)
