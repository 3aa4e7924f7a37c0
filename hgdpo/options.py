"""Option checks shared by every frontend: a value's type, finiteness, range and choices, as one-line errors."""

from __future__ import annotations

import math

_LIMIT_TEXT = {"at_least": ">= {}", "above": "> {}", "below": "< {}", "at_most": "<= {}"}
_LIMIT_TEST = {"at_least": lambda v, x: v >= x, "above": lambda v, x: v > x, "below": lambda v, x: v < x,
               "at_most": lambda v, x: v <= x}
_KINDS = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}


def flag_name(name: str) -> str:
    """The command-line flag of a config field: ``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


def check_value(flag: str, value, kind: str, limits: dict | None = None, choices: tuple | None = None) -> None:
    """Raise a one-line ValueError naming ``flag`` when ``value`` is not a ``kind`` within ``limits``/``choices``.

    ``kind`` is ``int``, ``float``, ``str``, ``bool`` or ``list[<kind>]`` (each element checked). Floats
    must be finite. Every frontend's options go through this check before anything is loaded.
    """
    if kind.startswith("list["):
        if not isinstance(value, (list, tuple)) or not value:
            raise ValueError(f"{flag}: expected a non-empty list, got {value!r}.")
        for item in value:
            check_value(flag, item, kind[5:-1], limits, choices)
        return
    wanted = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false"}[kind]
    if not isinstance(value, _KINDS[kind]) or (kind != "bool" and isinstance(value, bool)):
        raise ValueError(f"{flag}: expected {wanted}, got {value!r}.")
    if kind == "float" and not math.isfinite(value):
        raise ValueError(f"{flag} {value}: give a finite number.")
    if choices and value not in choices:
        raise ValueError(f"{flag} {value!r}: choose one of {', '.join(map(str, choices))}.")
    failed = [key for key, bound in (limits or {}).items() if not _LIMIT_TEST[key](value, bound)]
    if failed:
        allowed = " and ".join(_LIMIT_TEXT[key].format(bound) for key, bound in limits.items())
        raise ValueError(f"{flag} {value}: out of range; give {wanted} {allowed}.")
