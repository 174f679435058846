"""Likelihoods: one class per task (see :mod:`lightning_swag.likelihoods.likelihood` for the protocol).

:func:`likelihood_for` builds the one a ``SWAGModule`` asks for from its ``task``, ``noise``,
``class_dim`` and ``ignore_index``; it is the only place that maps those options to a class.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from lightning_swag.likelihoods.bernoulli import Binary, Multilabel
from lightning_swag.likelihoods.categorical import Categorical
from lightning_swag.likelihoods.gaussian import GaussianNoise, Heteroscedastic, Regression, regression_targets
from lightning_swag.likelihoods.likelihood import (
    PER_SAMPLE_KEYS,
    Likelihood,
    LinkApprox,
    Outputs,
    TestMetrics,
)

__all__ = [
    "PER_SAMPLE_KEYS",
    "Binary",
    "Categorical",
    "GaussianNoise",
    "Heteroscedastic",
    "Likelihood",
    "LinkApprox",
    "Multilabel",
    "Noise",
    "Outputs",
    "Regression",
    "Task",
    "TestMetrics",
    "infer_task",
    "likelihood_for",
    "regression_targets",
]

Task = Literal["regression", "classification", "binary", "multilabel"]
Noise = float | Literal["heteroscedastic"] | None


def infer_task(model: Any) -> Task:
    """The BMA task of ``model``: its ``task`` attribute when it names one of :data:`Task`,
    ``"classification"`` for a model with a ``num_classes`` hyperparameter, else ``"regression"``.
    Used by ``SWAGModule(task=None)``, the CLI and the prediction writer."""
    task = getattr(model, "task", None)
    if isinstance(task, Likelihood):
        return task.task  # type: ignore[return-value]
    if isinstance(task, str) and task in get_args(Task):
        return task  # type: ignore[return-value]
    hparams = getattr(model, "hparams", {})
    return "classification" if "num_classes" in hparams else "regression"


def likelihood_for(
    task: Task | Likelihood, noise: Noise, class_dim: int | None, ignore_index: int
) -> Likelihood:
    """The likelihood of a task (options already checked by :mod:`lightning_swag.checks`); a
    :class:`Likelihood` instance is used as it is (it holds its own options)."""
    if isinstance(task, Likelihood):
        if noise is not None or class_dim is not None:
            raise ValueError(
                f"task is a likelihood instance ({type(task).__name__}), which holds its own options: leave "
                "noise and class_dim unset (they build the package's own likelihoods)."
            )
        return task
    if task != "regression" and noise is not None:
        raise ValueError(
            f"noise={noise!r} is a noise model for regression, but task is {task!r}. Leave noise=None "
            "for classification (the softmax or sigmoid is its likelihood), or pass task='regression'."
        )
    if class_dim is not None and task != "classification":
        raise ValueError(
            f"class_dim is for task='classification' (a softmax over that dimension); task={task!r} "
            "treats every output element on its own."
        )
    if task == "classification":
        return Categorical(class_dim, ignore_index)
    if task == "binary":
        return Binary(ignore_index)
    if task == "multilabel":
        return Multilabel(ignore_index)
    if noise == "heteroscedastic":
        return Heteroscedastic()
    return GaussianNoise(noise) if noise is not None else Regression()
