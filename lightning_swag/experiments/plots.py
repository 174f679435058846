"""Matplotlib figures of the reference experiments (headless: the Agg backend is used)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from torch import Tensor  # noqa: E402

__all__ = [
    "plot_calibration_curves",
    "plot_entropy_histograms",
    "plot_interval_bands",
    "plot_regression",
    "plot_severity_boxes",
    "plot_shift_curves",
    "plot_std_decomposition",
    "plot_reliability_diagrams",
    "plot_uncertain_digits",
    "save_figure",
]


def _to_numpy(t: Tensor):
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
    data_range: tuple[float, float] | None = None,
    samples_label: str | None = None,
) -> Figure:
    """The notebook's two panels: sampled prediction curves, and the BMA mean ± one std band.

    One legend for both panels sits below them, so it covers no curve.

    Args:
        x_train, y_train: the observations.
        x_grid: inputs of the predictions ``[N, 1]``.
        mean, std: BMA mean and std on ``x_grid``.
        samples: per-sample predictions ``[S, N, 1]`` for the left panel: at most ``max_curves`` of
            them, evenly spaced (so every posterior of a MultiSWAG run is shown). A single sample is
            drawn as a solid line (with SWA it is the mean itself).
        title: figure title (e.g. the method and its numbers; may span several lines).
        max_curves: the most sampled curves drawn.
        true_function: optional ``(x, f(x))`` drawn dashed.
        data_range: optional ``(low, high)`` of the training inputs, shaded grey outside.
        samples_label: legend entry of the sampled curves (default: how many are drawn, of how many).
    """
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5), sharey=True)
    xg = _to_numpy(x_grid)
    x_obs, y_obs = _to_numpy(x_train), _to_numpy(y_train)
    for ax in axes:
        _draw_context(ax, xg, x_obs, y_obs, true_function, data_range)
    axes[0].set_ylabel("y (prediction)")
    axes[0].set_title("Sampled predictions (each curve: one weight sample)")
    if samples is not None:
        _draw_samples(axes[0], xg, samples, max_curves, samples_label)
    axes[1].set_title("BMA mean ± 1 std")
    m, s = _to_numpy(mean), _to_numpy(std)
    band = "± 1 std" if float(s.max()) > 0 else "± 1 std (zero everywhere: no band)"
    axes[1].fill_between(xg, m - s, m + s, color="tab:red", alpha=0.3, lw=0, zorder=1, label=band)
    axes[1].plot(xg, m, color="darkred", lw=1.5, zorder=2, label="BMA mean")
    entries: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            entries.setdefault(label, handle)
    fig.legend(entries.values(), entries.keys(), loc="lower center", ncol=len(entries), frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


def _draw_context(
    ax: Any,
    xg: Any,
    x_obs: Any,
    y_obs: Any,
    true_function: Sequence[Tensor] | None,
    data_range: tuple[float, float] | None,
) -> None:
    """One panel's observations, true function and shaded region without training data."""
    ax.plot(x_obs, y_obs, ".", color="tab:blue", ms=3, zorder=3, label="observations")
    if true_function is not None:
        x_true, y_true = _to_numpy(true_function[0]), _to_numpy(true_function[1])
        ax.plot(x_true, y_true, "g--", lw=1, zorder=4, label="3 sin x")
    if data_range is not None:
        for lo, hi in ((float(xg.min()) - 1, data_range[0]), (data_range[1], float(xg.max()) + 1)):
            ax.axvspan(lo, hi, color="0.92", zorder=0, label="no training data")
    ax.set_xlim(float(xg.min()) - 1, float(xg.max()) + 1)
    ax.set_xlabel("x")


def _draw_samples(ax: Any, xg: Any, samples: Tensor, max_curves: int, samples_label: str | None) -> None:
    """At most ``max_curves`` evenly spaced sampled curves (a single one drawn solid)."""
    curves = samples[:: -(-len(samples) // max_curves)]  # evenly spaced, at most max_curves
    label = samples_label or f"sampled predictions ({len(curves)} of {len(samples)} drawn)"
    single = len(curves) == 1
    for i, curve in enumerate(curves):
        ax.plot(
            xg,
            _to_numpy(curve),
            color="tab:red",
            alpha=1.0 if single else 0.25,
            lw=1.5 if single else 0.8,
            zorder=2,
            label=label if i == 0 else None,
        )


def plot_uncertain_digits(
    images: Tensor,
    probs: Tensor,
    std: Tensor,
    targets: Tensor,
    num_images: int = 20,
    columns: int = 5,
    title: str = "",
) -> Figure:
    """The notebook's grid of the most uncertain test digits.

    Digits are ranked by the summed std of their class probabilities over the weight samples (the
    notebook's criterion). Each title shows the predicted and true class and the std of the
    predicted class; a wrong prediction also shows the runner-up class ("could be").

    Args:
        images: ``[N, 1, 28, 28]`` or ``[N, 784]`` test images (any normalisation).
        probs: BMA probabilities ``[N, C]``.
        std: per-class std of the probabilities over samples ``[N, C]``.
        targets: true classes ``[N]``.
    """
    order = std.sum(dim=1).argsort(descending=True)[:num_images]
    rows = max(1, -(-len(order) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 3.1 * rows))
    axes = axes.reshape(-1) if hasattr(axes, "reshape") else [axes]
    for ax in axes:
        ax.axis("off")
    for ax, idx in zip(axes, order.tolist(), strict=False):
        ax.imshow(images[idx].detach().cpu().float().reshape(28, 28).numpy(), cmap="gray")
        top2 = probs[idx].topk(2).indices.tolist()
        pred, actual = top2[0], int(targets[idx])
        text = f"Pred: {pred}  True: {actual}\nstd: {float(std[idx, pred]):.2f}"
        if pred != actual:
            text += f"\nCould be {top2[1]}"
        ax.set_title(text, fontsize=9, color="black" if pred == actual else "darkred")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_reliability_diagrams(curves: dict[str, object], ece: dict[str, float] | None = None) -> Figure:
    """One reliability diagram per method: accuracy vs confidence per bin, with bin counts shaded.

    Args:
        curves: ``{method: lightning_swag.metrics.ReliabilityCurve}``.
        ece: optional ``{method: ECE}`` shown in the panel titles.
    """
    fig, axes = plt.subplots(1, len(curves), figsize=(3.6 * len(curves), 3.8), sharey=True, squeeze=False)
    for ax, (name, curve) in zip(axes[0], curves.items(), strict=True):
        edges = curve.bin_edges.cpu().numpy()
        centers = (edges[:-1] + edges[1:]) / 2
        width = edges[1] - edges[0]
        acc = curve.accuracy.cpu().numpy()
        ax.bar(centers, acc, width=width, edgecolor="k", color="tab:blue", alpha=0.8, label="accuracy")
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence")
        label = name if ece is None else f"{name} (ECE {100 * ece[name]:.2f}%)"
        ax.set_title(label, fontsize=10)
    axes[0][0].set_ylabel("accuracy")
    axes[0][0].legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return fig


def plot_entropy_histograms(in_entropy: dict[str, Tensor], out_entropy: dict[str, Tensor]) -> Figure:
    """Histograms of predictive entropy on in-distribution (MNIST) vs OOD (Fashion-MNIST) test inputs."""
    names = list(in_entropy)
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.4), sharey=True, squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        hi = max(float(in_entropy[name].max()), float(out_entropy[name].max()), 1e-3)
        bins = [hi * i / 30 for i in range(31)]
        ax.hist(_to_numpy(in_entropy[name]), bins=bins, alpha=0.6, density=True, label="MNIST (in)")
        ax.hist(_to_numpy(out_entropy[name]), bins=bins, alpha=0.6, density=True, label="Fashion-MNIST (OOD)")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("predictive entropy (nats)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_interval_bands(
    x_train: Tensor,
    y_train: Tensor,
    x_grid: Tensor,
    bands: Mapping[str, tuple[Tensor, Mapping[float, tuple[Tensor, Tensor]]]],
    true_function: Sequence[Tensor] | None = None,
    true_intervals: Mapping[float, tuple[Tensor, Tensor]] | None = None,
    data_range: tuple[float, float] | None = None,
    title: str = "",
) -> Figure:
    """One panel per method: predictive mean and central interval bands against the data.

    Args:
        x_train, y_train: the observations.
        x_grid: inputs of the predictions ``[N, 1]`` (or ``[N]``).
        bands: ``{method: (mean [N], {level: (lower [N], upper [N])})}``, e.g. the 50% and 90%
            intervals of the predictive mixture (``lightning_swag.metrics.gaussian_mixture_quantile``).
        true_function: optional ``(x, f(x))`` drawn dashed.
        true_intervals: optional ``{level: (lower, upper)}`` of the true noise on ``x_grid``, drawn
            as thin dotted lines.
        data_range: optional ``(low, high)`` of the training inputs, shaded grey outside.
        title: figure title.
    """
    names = list(bands)
    fig, axes = plt.subplots(1, len(names), figsize=(5.2 * len(names), 4.4), sharey=True, squeeze=False)
    xg = _to_numpy(x_grid)
    for ax, name in zip(axes[0], names, strict=True):
        mean, intervals = bands[name]
        ax.plot(
            _to_numpy(x_train),
            _to_numpy(y_train),
            ".",
            color="tab:blue",
            ms=2,
            alpha=0.6,
            label="observations",
        )
        _fill_intervals(ax, xg, intervals)
        ax.plot(xg, _to_numpy(mean), color="darkred", lw=1.2, label="predictive mean")
        if true_function is not None:
            ax.plot(
                _to_numpy(true_function[0]), _to_numpy(true_function[1]), "g--", lw=1, label="true function"
            )
        if true_intervals is not None:
            for lower, upper in true_intervals.values():
                for bound in (lower, upper):
                    ax.plot(xg, _to_numpy(bound), ":", color="k", lw=0.8)
        if data_range is not None:
            for lo, hi in ((float(xg.min()), data_range[0]), (data_range[1], float(xg.max()))):
                ax.axvspan(lo, hi, color="0.9", zorder=0)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("x")
    axes[0][0].legend(loc="upper left", fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def _fill_intervals(ax: Any, xg: Any, intervals: Mapping[float, tuple[Tensor, Tensor]]) -> None:
    """Shade each central interval, the widest first."""
    colours = ["tab:red", "tab:orange", "tab:olive"]
    for i, level in enumerate(sorted(intervals, reverse=True)):
        lower, upper = intervals[level]
        ax.fill_between(
            xg,
            _to_numpy(lower),
            _to_numpy(upper),
            color=colours[i % 3],
            alpha=0.25,
            lw=0,
            label=f"{100 * level:g}% interval",
        )


def plot_std_decomposition(
    x_grid: Tensor,
    summaries: Mapping[str, Mapping[str, Tensor]],
    true_noise: Sequence[Tensor] | None = None,
    data_range: tuple[float, float] | None = None,
    title: str = "",
) -> Figure:
    """Total, epistemic and aleatoric predictive std against ``x``, one panel per method.

    Args:
        x_grid: inputs ``[N, 1]`` (or ``[N]``).
        summaries: ``{method: summary}`` with ``std``, ``epistemic_std`` and ``aleatoric_std`` on
            ``x_grid`` (the output of ``lightning_swag.likelihoods.summaries.summarize_gaussian_mixture``).
        true_noise: optional ``(x, σ(x))`` of the data's noise, drawn dashed.
        data_range: optional ``(low, high)`` of the training inputs, shaded grey outside.
        title: figure title.
    """
    names = list(summaries)
    fig, axes = plt.subplots(1, len(names), figsize=(5.2 * len(names), 3.6), sharey=True, squeeze=False)
    xg = _to_numpy(x_grid)
    for ax, name in zip(axes[0], names, strict=True):
        summary = summaries[name]
        ax.plot(xg, _to_numpy(summary["std"]), "k", lw=1.5, label="total std")
        ax.plot(xg, _to_numpy(summary["epistemic_std"]), color="tab:purple", lw=1.2, label="epistemic")
        ax.plot(xg, _to_numpy(summary["aleatoric_std"]), color="tab:orange", lw=1.2, label="aleatoric")
        if true_noise is not None:
            ax.plot(_to_numpy(true_noise[0]), _to_numpy(true_noise[1]), "g--", lw=1, label="true noise σ(x)")
        if data_range is not None:
            for lo, hi in ((float(xg.min()), data_range[0]), (data_range[1], float(xg.max()))):
                ax.axvspan(lo, hi, color="0.9", zorder=0)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("x")
        ax.set_ylim(bottom=0)
    axes[0][0].set_ylabel("predictive std")
    axes[0][0].legend(loc="upper left", fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_calibration_curves(panels: Mapping[str, Mapping[str, tuple[Tensor, Tensor]]]) -> Figure:
    """Regression calibration curves: observed against nominal quantile level, one panel per data set.

    Args:
        panels: ``{panel title: {method: (nominal [L], observed [L])}}``, e.g. from
            ``lightning_swag.metrics.regression_calibration_curve``. A calibrated predictive lies
            on the diagonal; above it the predictive is too wide on that side, below too narrow.
            A method has the same colour in every panel.
    """
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.0), squeeze=False)
    methods = list(dict.fromkeys(method for curves in panels.values() for method in curves))
    colours = {method: f"C{i % 10}" for i, method in enumerate(methods)}  # the same in every panel
    for ax, (panel, curves) in zip(axes[0], panels.items(), strict=True):
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="calibrated")
        for method, (nominal, observed) in curves.items():
            ax.plot(
                _to_numpy(nominal),
                _to_numpy(observed),
                "o-",
                ms=3,
                lw=1.2,
                color=colours[method],
                label=method,
            )
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("nominal quantile level p")
        ax.set_ylabel("observed fraction of targets ≤ p-quantile")
        ax.set_title(panel, fontsize=10)
        ax.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    return fig


def plot_shift_curves(
    x: Sequence[float],
    curves: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float]]]],
    xlabel: str,
) -> Figure:
    """One panel per metric, one line per method against the amount of shift (Ovadia et al.'s
    Figure 2): ``curves[metric][method] = (means, stds)`` at the points ``x``; the band is ± std."""
    fig, axes = plt.subplots(1, len(curves), figsize=(5.2 * len(curves), 4.2), squeeze=False)
    for ax, (metric, methods) in zip(axes[0], curves.items(), strict=True):
        for method, (means, stds) in methods.items():
            mean, std = np.asarray(means, dtype=float), np.asarray(stds, dtype=float)
            ax.plot(x, mean, "-", marker="o", ms=3, lw=1.4, label=method)
            ax.fill_between(x, mean - std, mean + std, alpha=0.15)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(5, len(labels)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return fig


def plot_severity_boxes(
    values: Mapping[str, Mapping[str, Sequence[Sequence[float]]]], severities: Sequence[str]
) -> Figure:
    """One panel per metric, a group of boxes per severity, a box per method:
    ``values[metric][method][i]`` are the values at ``severities[i]`` (over corruption kinds and
    seeds)."""
    fig, axes = plt.subplots(len(values), 1, figsize=(11, 3.6 * len(values)), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (metric, methods) in zip(axes[:, 0], values.items(), strict=True):
        width = 0.8 / len(methods)
        for index, (method, per_severity) in enumerate(methods.items()):
            positions = [i + (index - (len(methods) - 1) / 2) * width for i in range(len(severities))]
            box = ax.boxplot(
                [list(v) for v in per_severity],
                positions=positions,
                widths=width * 0.85,
                patch_artist=True,
                medianprops={"color": "black"},
            )
            color = colors[index % len(colors)]
            for patch in box["boxes"]:
                patch.set(facecolor=color, alpha=0.6)
            ax.plot([], [], "s", color=color, label=method)
        ax.set_xticks(range(len(severities)), list(severities))
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3, axis="y")
    axes[-1, 0].set_xlabel("corruption severity")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(5, len(labels)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig


def save_figure(fig: Figure, path: str | os.PathLike[str]) -> None:
    """Save ``fig`` (creating the folder) and close it."""
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
