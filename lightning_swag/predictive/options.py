"""``SWAGModule``'s options: each one checked in one place, and settable after construction.

Every option is an :class:`Option` descriptor on the class: assigning ``bma.scale = 1.0`` checks the
value (with the checks of :mod:`lightning_swag.checks`) and tells the module, which rebuilds its
predictive and draws new samples at the next call. So a changed option always takes effect, and a
bad value is refused when it is set.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, get_args

from lightning_swag.checks import (
    check_batch_count,
    check_choice,
    check_class_dim,
    check_int,
    check_positive,
    check_scale,
    check_seed,
)
from lightning_swag.likelihoods import Likelihood, Task
from lightning_swag.predictive import PREDICTIVES, Predictive, PredictiveFactory

__all__ = ["COVARIANCES", "Covariance", "Option", "PredictiveChoice", "check_option"]

Covariance = Literal["low_rank", "diagonal"]
PredictiveChoice = Literal["sampled", "linearized"] | Predictive | PredictiveFactory
"""A predictive's name (a key of :data:`~lightning_swag.predictive.PREDICTIVES`), an instance, or a factory."""
COVARIANCES = ("low_rank", "diagonal")


def _bool(name: str) -> Callable[[Any], bool]:
    def check(value: Any) -> bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {value!r}.")
        return value

    return check


def _int_or_none(name: str) -> Callable[[Any], int | None]:
    def check(value: Any) -> int | None:
        check_int(name, value, 1, allow_none=True)
        return value

    return check


def _choice(name: str, choices: tuple[Any, ...]) -> Callable[[Any], Any]:
    return lambda value: check_choice(name, value, choices)


def _noise(value: Any) -> float | str | None:
    if value is None or value == "heteroscedastic":
        return value
    try:
        return check_positive("noise", value)
    except ValueError:
        raise ValueError(
            f"noise must be None, a noise standard deviation σ > 0 or 'heteroscedastic', got {value!r}."
        ) from None


def _task(value: Any) -> Any:
    if isinstance(value, Likelihood):
        return value
    return check_choice("task", value, get_args(Task))


def _predictive(value: Any) -> Any:
    if isinstance(value, Predictive) or (callable(value) and not isinstance(value, str)):
        return value
    if value in PREDICTIVES:
        return value
    raise ValueError(
        f"predictive must be one of {sorted(PREDICTIVES)}, a Predictive instance or a factory that builds one "
        f"from a PredictiveContext (lightning_swag.predictive), got {value!r}."
    )


def _callable(value: Any) -> Any:
    if value is not None and not callable(value):
        raise TypeError(f"output_transform must be callable or None, got {type(value).__name__}.")
    return value


def _ignore_index(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"ignore_index must be an int, got {value!r}.")
    return value


def _batch_count(value: Any) -> Any:
    check_batch_count("bn_num_batches", value)
    return value


def _num_samples(value: Any) -> int:
    check_int("num_samples", value, 1)
    return value


_CHECKS: dict[str, Callable[[Any], Any]] = {
    "num_samples": _num_samples,
    "scale": check_scale,
    "task": _task,
    "covariance": _choice("covariance", COVARIANCES),
    "return_samples": _bool("return_samples"),
    "seed": check_seed,
    "chunk_size": _int_or_none("chunk_size"),
    "vectorize": _choice("vectorize", ("auto", "vmap", "loop", True, False)),
    "bn_loader": lambda value: value,
    "bn_num_batches": _batch_count,
    "output_transform": _callable,
    "noise": _noise,
    "memory_format": _choice("memory_format", ("auto", "channels_last", "preserve")),
    "class_dim": check_class_dim,
    "ignore_index": _ignore_index,
    "predictive": _predictive,
    "link_approx": _choice("link_approx", ("probit", "mc")),
    "split_forward": _bool("split_forward"),
}


def check_option(name: str, value: Any) -> Any:
    """``value`` checked (and normalised, e.g. ``noise`` to a float) for the option ``name``."""
    return _CHECKS[name](value)


class Option:
    """A checked, settable option of ``SWAGModule`` (see the module docstring).

    Args:
        name: the option (a key of the checks table).
        resets: whether setting it rebuilds the predictive (``return_samples`` does not need to).
    """

    def __init__(self, name: str, resets: bool = True) -> None:
        if name not in _CHECKS:
            raise KeyError(f"no check for option {name!r}")
        self.name = name
        self.attribute = f"_option_{name}"
        self.resets = resets

    def __get__(self, owner: Any, owner_type: type | None = None) -> Any:
        if owner is None:
            return self
        return owner.__dict__[self.attribute]

    def __set__(self, owner: Any, value: Any) -> None:
        owner.__dict__[self.attribute] = check_option(self.name, value)
        owner.options_changed(self.resets)
