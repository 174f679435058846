"""Bayesian-model-averaging summaries of per-sample outputs ``[S, B, ...]`` (sample axis first).

Pure functions of the stacked outputs of ``S`` weight samples, used by
:class:`~lightning_swag.SWAGModule` and usable on their own (e.g. on ``return_samples=True`` output).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["summarize_classification", "summarize_regression"]


def _entropy(probs: Tensor) -> Tensor:
    return -torch.special.xlogy(probs, probs).sum(dim=-1)


def summarize_regression(outputs: Tensor) -> dict[str, Tensor]:
    """Mean and standard deviation over the sample axis (dim 0) of ``[S, B, ...]`` outputs.

    The std is the spread of the Monte-Carlo mixture (``correction=0``), so ``S = 1`` gives 0.
    """
    std, mean = torch.std_mean(outputs, dim=0, correction=0)
    return {"mean": mean, "std": std}


def summarize_classification(logits: Tensor) -> dict[str, Tensor]:
    """BMA summary of ``[S, B, C]`` logits: mean and std of the softmax probabilities,
    predictive entropy of the mean, and mutual information (entropy of the mean − mean entropy)."""
    probs = torch.softmax(logits.float(), dim=-1)
    std, mean = torch.std_mean(probs, dim=0, correction=0)
    entropy = _entropy(mean)
    expected_entropy = _entropy(probs).mean(dim=0)
    return {
        "mean": mean,
        "std": std,
        "entropy": entropy,
        "mutual_information": (entropy - expected_entropy).clamp_(min=0),
    }
