"""MNIST: SGD vs SWA vs SWAG over several seeds, collection learning rates and covariance scales.

A single run of ``examples/mnist.py`` compares methods whose differences in ECE and OOD AUROC are
of the same size as the run-to-run noise. This sweep repeats the protocol (one run per seed, no
MultiSWAG unless ``--runs`` > 1) and reports, per setting, the mean ± standard deviation over seeds and in how many seeds
each method beats the SGD model of the same seed.

    python benchmarks/mnist_seeds.py --data-dir ../shared/data                 # ~5 min on 2 CPU cores
    python benchmarks/mnist_seeds.py --seeds 3 --collect-lrs 0.01 --scales 0.5  # quicker
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from lightning_swag.experiments import mnist
from lightning_swag.experiments.machine import cpu_name

METRICS = {"accuracy": "higher", "nll": "lower", "ece": "lower", "ood_auroc": "higher"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=os.environ.get("LIGHTNING_SWAG_DATA", "./data"))
    parser.add_argument("--seeds", type=int, default=8, help="N seeds: 0, R, 2R, ... with R = --runs")
    parser.add_argument("--collect-lrs", default="0.005,0.01,0.02")
    parser.add_argument("--scales", default="0.25,0.5,1", help="covariance scales; 0.5 is the default")
    parser.add_argument(
        "--tune-scale",
        default="",
        help="candidate scales: SWAG-Diagonal/SWAG/MultiSWAG use the one with the lowest NLL on --val-size "
        "held-out training images (rows '(tuned)'); --scales rows stay as fixed-scale references",
    )
    parser.add_argument("--val-size", type=int, default=5000, help="held-out images when tuning")
    parser.add_argument("--runs", type=int, default=1, help="runs per seed; > 1 adds a MultiSWAG row")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("extra", nargs="*", help="further examples/mnist.py options, after --")
    return parser.parse_args(argv)


def one_protocol(args: argparse.Namespace, seed: int, lr: float, scales: list[float]) -> dict[str, dict]:
    """One run of the example; rows renamed to ``SWAG (scale s)`` for every scale."""
    tuning = ["--val-size", str(args.val_size), "--tune-scale", args.tune_scale] if args.tune_scale else []
    sweep = ",".join(str(s) for s in scales if args.tune_scale or s != 0.5)
    with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(io.StringIO()):
        table = mnist.run(
            mnist.parse_args(
                [
                    "--data-dir",
                    args.data_dir,
                    "--output-dir",
                    out,
                    "--runs",
                    str(args.runs),
                    "--seed",
                    str(seed),
                    "--collect-lr",
                    str(lr),
                    "--scale",
                    "0.5",
                    "--scale-sweep",
                    sweep,
                    "--no-figures",
                    *tuning,
                    *args.extra,
                ]
            )
        )
        chosen = json.loads((Path(out) / "results.json").read_text())["tuned_scales"]
    label = "tuned" if args.tune_scale else "scale 0.5"
    renamed = {"SGD": table["SGD"], "SWA": table["SWA"]}
    renamed[f"SWAG-Diagonal ({label})"] = table["SWAG-Diagonal"]
    if args.tune_scale:
        renamed["SWAG (tuned)"] = table["SWAG"]
    for scale in scales:
        key = "SWAG" if scale == 0.5 and not args.tune_scale else f"SWAG (scale {scale:g})"
        renamed[f"SWAG (scale {scale:g})"] = table[key]
    if args.runs > 1:
        renamed[f"MultiSWAG, {args.runs} runs ({label})"] = table[f"MultiSWAG ({args.runs} runs)"]
    if chosen:
        print(f"seed {seed}: tuned scales {chosen}", file=sys.stderr)
    return renamed


def summarize(per_seed: list[dict[str, dict]]) -> list[str]:
    """Markdown rows: mean ± std over seeds, and wins against the same seed's SGD model."""
    n = len(per_seed)
    rows = []
    for method in per_seed[0]:
        cells = []
        for metric, better in METRICS.items():
            values = [run[method][metric] for run in per_seed]
            sgd = [run["SGD"][metric] for run in per_seed]
            wins = sum((v > s) if better == "higher" else (v < s) for v, s in zip(values, sgd, strict=True))
            factor, digits = (100, 2) if metric in ("accuracy", "ece") else (1, 4)
            spread = statistics.stdev(values) * factor if n > 1 else 0.0
            text = f"{statistics.mean(values) * factor:.{digits}f} ± {spread:.{digits}f}"
            cells.append(text if method == "SGD" else f"{text} ({wins}/{n})")
        rows.append(f"| {method} | " + " | ".join(cells) + " |")
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    lrs = [float(v) for v in args.collect_lrs.split(",")]
    scales = [float(v) for v in args.scales.split(",")]
    print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}")
    print(
        f"{args.seeds} seeds, {args.runs} run(s) each; (k/N): seeds in which the method beats that seed's SGD model\n"
    )
    results: dict[str, list[dict[str, dict]]] = {}
    start = time.perf_counter()
    for lr in lrs:
        # Run r of seed s is seeded s + r, so seeds step by --runs: no run is shared between seeds.
        seeds = range(0, args.seeds * args.runs, args.runs)
        results[str(lr)] = [one_protocol(args, seed, lr, scales) for seed in seeds]
        print(f"collection learning rate {lr:g}\n")
        print("| method | accuracy % | NLL | ECE % | OOD AUROC |\n|---|---|---|---|---|")
        print("\n".join(summarize(results[str(lr)])) + "\n", flush=True)
    print(f"total {time.perf_counter() - start:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
