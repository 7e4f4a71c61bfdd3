"""Validation of hyper-parameters: one place, one message style (``ValueError`` naming the argument)."""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable
from typing import Any


def _is_real(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def positive(name: str, value: Any, *, allow_zero: bool = False) -> float:
    """A finite real number ``> 0`` (``>= 0`` with ``allow_zero``)."""
    if not _is_real(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return float(value)


def fraction(name: str, value: Any) -> float:
    """A decay or momentum coefficient in ``[0, 1)``."""
    if not _is_real(value) or not 0 <= value < 1:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return float(value)


def closed_fraction(name: str, value: Any) -> float:
    """A number in ``(0, 1]``."""
    if not _is_real(value) or not 0 < value <= 1:
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")
    return float(value)


def count(name: str, value: Any, *, minimum: int = 1) -> int:
    """An integer ``>= minimum`` (bools are rejected)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def choice(name: str, value: Any, options: Iterable[str] | type[enum.Enum]) -> str:
    """One of a fixed set of strings (an ``Enum``'s values or an iterable)."""
    allowed = [e.value for e in options] if isinstance(options, type) else list(options)  # type: ignore[union-attr]
    if isinstance(value, enum.Enum):
        value = value.value
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


#: the hyper-parameters every method names alike (docs/design.md), with their one validation rule
_SHARED: dict[str, Any] = {
    "lr": lambda v: positive("lr", v, allow_zero=True),
    "damping": lambda v: positive("damping", v),
    "momentum": lambda v: fraction("momentum", v),
    "stat_decay": lambda v: fraction("stat_decay", v),
    "weight_decay": lambda v: positive("weight_decay", v, allow_zero=True),
    "update_freq": lambda v: count("update_freq", v),
    "inverse_freq": lambda v: count("inverse_freq", v),
}


def shared(**values: Any) -> dict[str, Any]:
    """Validate the shared hyper-parameters given (``lr``, ``damping``, ``momentum``, ``stat_decay``,
    ``weight_decay``, ``update_freq``, ``inverse_freq``), each by its one rule; returns them."""
    unknown = set(values) - set(_SHARED)
    if unknown:
        raise TypeError(f"not shared hyper-parameters: {sorted(unknown)}")
    return {name: _SHARED[name](value) for name, value in values.items()}


def reject_unknown(method: str, unknown: dict[str, Any], known: Iterable[str]) -> None:
    """Raise for keyword arguments a method does not take, listing the ones it does."""
    if unknown:
        names = ", ".join(sorted(unknown))
        raise ValueError(
            f"{method}: unknown hyper-parameter(s) {names}; accepted: {', '.join(sorted(known))}"
        )
