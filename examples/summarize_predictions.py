"""Summarise prediction files written by ``lightning-swag predict`` (the README's CLI numbers).

Regression files (with ``x``): the mean BMA std inside and outside ``|x| <= --inside``.
Classification files: accuracy (where targets are stored), the mean summed std of the class
probabilities and the mean predictive entropy.

Usage::

    python examples/summarize_predictions.py runs/sine/predictions/predictions.pt
    python examples/summarize_predictions.py runs/mnist/predictions/predictions_dataloader*.pt
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from lightning_swag import load_predictions


def summarize(path: Path, inside: float) -> str:
    """One line describing the predictions in ``path``."""
    preds = {k: torch.as_tensor(v) for k, v in load_predictions(path).items() if k != "meta"}
    mean, std = preds["mean"], preds["std"]
    if "x" in preds:  # regression over a grid of inputs
        x = preds["x"].reshape(len(mean), -1)[:, 0]
        spread = std.reshape(len(mean), -1).mean(-1)
        near = x.abs() <= inside
        return (
            f"{path}: {len(mean)} rows, mean std {float(spread[near].mean()):.2f} on |x| <= {inside:g}, "
            f"{float(spread[~near].mean()):.2f} on |x| > {inside:g}"
        )
    entropy = preds["entropy"] if "entropy" in preds else -(mean.clamp_min(1e-12).log() * mean).sum(-1)
    line = (
        f"{path}: {len(mean)} rows, mean summed std {float(std.sum(-1).mean()):.3f}, "
        f"mean entropy {float(entropy.mean()):.2f}"
    )
    targets = preds.get("targets")
    if targets is not None and targets.dtype != torch.bool and targets.numel() == len(mean):
        line += f", accuracy {float((mean.argmax(-1) == targets).float().mean()):.1%}"
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", type=Path, nargs="+")
    parser.add_argument(
        "--inside", type=float, default=5.0, help="half-width of the training range (regression)"
    )
    args = parser.parse_args()
    for path in args.files:
        print(summarize(path, args.inside))


if __name__ == "__main__":
    main()
