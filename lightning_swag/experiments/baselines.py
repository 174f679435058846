"""The baselines the experiments compare SWAG with, each as a function from inputs to class
probabilities: the plain network (optionally temperature-scaled), a deep ensemble, and
laplace-torch's last-layer Laplace (an optional dependency, the ``examples`` extra).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["Probabilities", "ensemble", "laplace_last_layer", "softmax"]

Probabilities = Callable[[Tensor], Tensor]
"""Inputs ``[N, ...]`` to class probabilities ``[N, C]``."""


def softmax(model: nn.Module, temperature: float = 1.0) -> Probabilities:
    """``softmax(model(x) / temperature)``; ``model`` returns logits and is put in eval mode."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    model.eval()
    return lambda x: torch.softmax(model(x) / temperature, dim=-1)


def ensemble(models: Sequence[nn.Module]) -> Probabilities:
    """A deep ensemble (Lakshminarayanan et al. 2017): the mean of the members' softmax outputs."""
    if not models:
        raise ValueError("an ensemble needs at least one member")
    members = [softmax(model) for model in models]
    return lambda x: torch.stack([member(x) for member in members]).mean(dim=0)


def laplace_last_layer(
    model: nn.Module, train: tuple[Tensor, Tensor], batch_size: int = 128
) -> Probabilities | None:
    """laplace-torch's last-layer Laplace of a copy of ``model`` (KFAC Hessian fitted on ``train``,
    prior precision by the marginal likelihood, GLM predictive with the probit link), or ``None``
    when laplace-torch is not installed (the caller says the row is skipped)."""
    with warnings.catch_warnings():
        # laplace-torch's notices: a dependency's deprecated torch.jit.script, and a reminder of the
        # link approximation (probit, as used below)
        warnings.filterwarnings("ignore", message=".*torch.jit.script. is deprecated")
        warnings.filterwarnings("ignore", message="By default `link_approx` is `probit`")
        try:
            from laplace import Laplace
        except ImportError:
            return None
        la = Laplace(
            copy.deepcopy(model), "classification", subset_of_weights="last_layer", hessian_structure="kron"
        )
        la.fit(DataLoader(TensorDataset(*train), batch_size=batch_size))
        la.optimize_prior_precision(method="marglik")
    return lambda x: la(x, pred_type="glm", link_approx="probit")
