"""Matplotlib figures of the reference experiments (headless: the Agg backend is used)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from torch import Tensor  # noqa: E402

__all__ = ["plot_regression", "save_figure"]


def _np(t: Tensor):
    return t.detach().cpu().float().reshape(-1).numpy()


def plot_regression(
    x_train: Tensor,
    y_train: Tensor,
    x_grid: Tensor,
    mean: Tensor,
    std: Tensor,
    samples: Tensor | None = None,
    title: str = "",
    max_curves: int = 100,
    true_function: Sequence[Tensor] | None = None,
) -> Figure:
    """The notebook's two panels: sampled prediction curves, and the BMA mean ± one std band.

    Args:
        x_train, y_train: the observations.
        x_grid: inputs of the predictions ``[N, 1]``.
        mean, std: BMA mean and std on ``x_grid``.
        samples: per-sample predictions ``[S, N, 1]`` for the left panel (at most ``max_curves``).
        title: figure title (e.g. the method).
        true_function: optional ``(x, f(x))`` drawn dashed.
    """
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5), sharey=True)
    xg = _np(x_grid)
    axes[0].set_title("Sampled predictions")
    axes[0].plot(_np(x_train), _np(y_train), "b.", ms=3, label="observations")
    if samples is not None:
        for curve in samples[:max_curves]:
            axes[0].plot(xg, _np(curve), "r", alpha=0.08, lw=1)
    axes[1].set_title("BMA mean ± 1 std")
    axes[1].plot(_np(x_train), _np(y_train), "b.", ms=3, label="observations")
    m, s = _np(mean), _np(std)
    axes[1].plot(xg, m, "r", label="BMA mean")
    axes[1].fill_between(xg, m - s, m + s, color="r", alpha=0.3, label="± 1 std")
    if true_function is not None:
        for ax in axes:
            ax.plot(_np(true_function[0]), _np(true_function[1]), "g--", lw=1, label="3 sin x")
    for ax in axes:
        ax.set_xlim(float(xg.min()) - 1, float(xg.max()) + 1)
        ax.set_xlabel("x")
        ax.legend(loc="upper left")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, path: str | os.PathLike[str]) -> None:
    """Save ``fig`` (creating the folder) and close it."""
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
