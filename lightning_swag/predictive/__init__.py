"""Predictives: the BMA of a batch (see :mod:`lightning_swag.predictive.base` for the protocol).

:data:`PREDICTIVES` maps the names ``SWAGModule(predictive=...)`` accepts to factories;
:func:`build_predictive` also takes your own :class:`Predictive` instance, or a factory that builds
one from a :class:`PredictiveContext`, so a new predictive needs no edit of the package.
"""

from __future__ import annotations

from collections.abc import Callable

from lightning_swag.predictive.base import Predictive, PredictiveContext, RunState
from lightning_swag.predictive.linearized import LinearizedPredictive
from lightning_swag.predictive.sampled import SampledPredictive, stack_outputs

__all__ = [
    "PREDICTIVES",
    "LinearizedPredictive",
    "Predictive",
    "PredictiveContext",
    "PredictiveFactory",
    "RunState",
    "SampledPredictive",
    "build_predictive",
    "stack_outputs",
]

PredictiveFactory = Callable[[PredictiveContext], Predictive]
PREDICTIVES: dict[str, PredictiveFactory] = {
    SampledPredictive.name: SampledPredictive.from_context,
    LinearizedPredictive.name: LinearizedPredictive.from_context,
}
"""The predictives known by name."""


def build_predictive(choice: str | Predictive | PredictiveFactory, context: PredictiveContext) -> Predictive:
    """The predictive ``choice`` names (see :data:`PREDICTIVES`), builds (a factory) or is (an
    instance, used as it is)."""
    if isinstance(choice, Predictive):
        return choice
    factory = PREDICTIVES[choice] if isinstance(choice, str) else choice
    predictive = factory(context)
    if not isinstance(predictive, Predictive):
        raise TypeError(
            f"The predictive factory {choice!r} returned a {type(predictive).__name__}, not a Predictive "
            "(lightning_swag.predictive.Predictive)."
        )
    return predictive
