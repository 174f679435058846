"""Argument checks shared by every public entry point, in one place.

Each check raises a ``ValueError`` (``TypeError`` for a wrong kind of object) whose message names
the argument, what it must be and what was given, prefixed with the owner (``"SWAGCallback: "``)
when one is named. Plain Python and torch; nothing here imports Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any

import torch

__all__ = [
    "MAX_SEED",
    "check_batch_count",
    "check_choice",
    "check_class_dim",
    "check_int",
    "check_positive",
    "check_scale",
    "check_seed",
    "parse_dtype",
]

MAX_SEED = 2**63 - 1
"""The largest seed: seeds are 64-bit signed integers, as ``torch.Generator.manual_seed`` takes."""

_DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def _prefix(owner: str | None) -> str:
    return f"{owner}: " if owner else ""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(
    name: str, value: Any, minimum: int, *, allow_none: bool = False, owner: str | None = None
) -> None:
    """``value`` is an int ``>= minimum`` (or ``None`` when ``allow_none``)."""
    if value is None and allow_none:
        return
    if not _is_int(value) or value < minimum:
        extra = " or None" if allow_none else ""
        raise ValueError(f"{_prefix(owner)}{name} must be an int >= {minimum}{extra}, got {value!r}.")


def check_scale(value: Any, name: str = "scale", owner: str | None = None) -> float:
    """``value`` is a finite number ``>= 0``; returned as a float."""
    if isinstance(value, bool) or not (
        isinstance(value, (int, float)) and math.isfinite(value) and value >= 0
    ):
        raise ValueError(f"{_prefix(owner)}{name} must be a finite number >= 0, got {value!r}.")
    return float(value)


def check_positive(
    name: str, value: Any, *, allow_none: bool = False, owner: str | None = None
) -> float | None:
    """``value`` is a finite number ``> 0`` (or ``None`` when ``allow_none``); returned as a float."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not (
        isinstance(value, (int, float)) and math.isfinite(value) and value > 0
    ):
        extra = " or None" if allow_none else ""
        raise ValueError(f"{_prefix(owner)}{name} must be a finite number > 0{extra}, got {value!r}.")
    return float(value)


def check_class_dim(value: Any) -> int | None:
    """``None`` or a non-zero int: the class dimension of dense classification outputs."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value == 0):
        raise ValueError(f"class_dim must be None or a non-zero int (1 or -1), got {value!r}.")
    return value


def check_seed(value: Any, *, allow_none: bool = True, owner: str | None = None) -> int | None:
    """``value`` is an int in ``[0, 2**63 - 1]`` (or ``None``)."""
    if value is None and allow_none:
        return None
    if not _is_int(value) or not 0 <= value <= MAX_SEED:
        extra = " or None" if allow_none else ""
        raise ValueError(f"{_prefix(owner)}seed must be an int in [0, 2**63 - 1]{extra}, got {value!r}.")
    return value


def check_choice(name: str, value: Any, choices: Collection[Any], owner: str | None = None) -> Any:
    """``value`` is one of ``choices`` (compared with ``==``, so ``True`` is not ``1`` here)."""
    if isinstance(value, bool) and not any(isinstance(c, bool) for c in choices):
        valid = False
    else:
        valid = any(value == c and type(value) is type(c) for c in choices)
    if not valid:
        listed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{_prefix(owner)}{name} must be one of {listed}; got {value!r}.")
    return value


def check_batch_count(name: str, value: Any, owner: str | None = None) -> None:
    """``value`` is ``None``, a number of batches (int ``>= 1``) or a fraction (float in ``(0, 1]``)."""
    if value is None:
        return
    valid = not isinstance(value, bool) and (
        (isinstance(value, int) and value >= 1) or (isinstance(value, float) and 0 < value <= 1)
    )
    if not valid:
        raise ValueError(
            f"{_prefix(owner)}{name} must be an int >= 1, a float in (0, 1] or None, got {value!r}."
        )


def parse_dtype(
    name: str, value: Any, allowed: Collection[str] | None = None, owner: str | None = None
) -> torch.dtype:
    """A floating ``torch.dtype`` from its name (``"float32"``) or itself, limited to ``allowed`` names."""
    names = list(allowed) if allowed is not None else list(_DTYPES)
    if isinstance(value, torch.dtype):
        value = str(value).removeprefix("torch.")
    if value not in names:
        raise ValueError(f"{_prefix(owner)}{name} must be one of {names}, got {value!r}.")
    return _DTYPES[value]
