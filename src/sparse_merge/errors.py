"""Errors that name the bad value, what is allowed, and the config key it came from."""

from __future__ import annotations

import numbers
from typing import Any


class ConfigError(ValueError):
    """A configuration value is invalid; ``str()`` is one line a user can act on."""

    def __init__(self, key: str, value: Any, allowed: str) -> None:
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}={value!r} is not allowed: {allowed}")

    def under(self, prefix: str) -> ConfigError:
        """The same error with its key placed under a config node (``pruner`` + ``sparsity``,
        ``evolver.schedule`` + ``low``). A key that already starts with the prefix's group
        (``model.source`` raised inside ``model``) is a full path and is kept as it is."""
        group = prefix.split(".", 1)[0].split("[", 1)[0]
        if not prefix or self.key == group or self.key.startswith((f"{group}.", f"{group}[")):
            return ConfigError(self.key, self.value, self.allowed)
        return ConfigError(f"{prefix}.{self.key}", self.value, self.allowed)


class DataError(ValueError):
    """A data file (or dataset) holds something a task cannot use; ``str()`` is one line:
    where (``path:line``, or ``path row N`` for CSV, parquet and JSON arrays), what is wrong,
    and the config key that named the file."""

    def __init__(self, where: str, problem: str, key: str | None = None) -> None:
        self.where, self.problem, self.key = where, problem, key
        message = f"{where}: {problem}" + (f" (file from {key})" if key else "")
        super().__init__(" ".join(message.splitlines()))


def is_number(value: Any, *, finite: bool = False) -> bool:
    """A real number, not NaN (nor ±inf with ``finite``): bools, strings and NaN fail every
    range check as they should."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or value != value:
        return False
    return not finite or abs(value) != float("inf")


def check_finite(key: str, value: Any) -> float:
    """Return ``value`` as a float if it is a finite real number (a coefficient: one of inf
    turns every merged weight into inf/NaN)."""
    if not is_number(value, finite=True):
        raise ConfigError(key, value, "a finite number")
    return float(value)


def check_fraction(key: str, value: float, *, upper_open: bool = True) -> float:
    """Return ``value`` if it lies in [0, 1) (or [0, 1] with ``upper_open=False``)."""
    ok = is_number(value) and (0.0 <= value < 1.0 if upper_open else 0.0 <= value <= 1.0)
    if not ok:
        raise ConfigError(key, value, f"a fraction in [0, 1{')' if upper_open else ']'}")
    return float(value)


def check_positive(
    key: str, value: int | float, *, allow_zero: bool = False, finite: bool = False
) -> int | float:
    """Return ``value`` if it is a number > 0 (or >= 0 with ``allow_zero``; below infinity too
    with ``finite``); NaN, bools and strings are refused (NaN passed both comparisons and
    failed later, after the model loaded). ``finite`` for step sizes and noise stds: one of inf
    turns every genome into inf/NaN and the run into a silent zero."""
    if not is_number(value, finite=finite) or value < 0 or (value == 0 and not allow_zero):
        allowed = f"{'a finite' if finite else 'a'} number {'>=' if allow_zero else '>'} 0"
        raise ConfigError(key, value, allowed)
    return value


def check_int(key: str, value: Any, *, minimum: int = 0) -> int:
    """Return ``value`` if it is a whole number >= ``minimum`` (``2.5`` or ``"4"`` is refused,
    never truncated)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(key, value, f"a whole number >= {minimum}")
    return int(value)


def check_bool(key: str, value: Any) -> bool:
    """Return ``value`` if it is ``true`` or ``false`` (``"maybe"`` is refused, not truthy)."""
    if not isinstance(value, bool):
        raise ConfigError(key, value, "true or false")
    return value


def check_choice(key: str, value: Any, choices: tuple[Any, ...] | list[Any]) -> Any:
    """Return ``value`` if it is one of ``choices``."""
    if value not in choices:
        raise ConfigError(key, value, "one of " + ", ".join(map(repr, choices)))
    return value
