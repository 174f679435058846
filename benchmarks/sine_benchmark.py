"""Sine experiment: lightning-swag against the reference notebook, measured side by side in one run.

1. Quality over several seeds: RMSE of the BMA mean against 3 sin x on [-5, 5] and the mean
   predicted std inside (|x| ≤ 5) and outside (|x| > 5) the data, for the notebook's own code
   (SWAG, its protocol) and for ``examples/sine.py`` (same protocol, correct formulas).
2. Speed of BMA with 500 samples over 500 points on the *same* posterior: ``SWAGModule``
   (vectorised with torch.func) vs the notebook's one-sample-at-a-time loop.
3. Overhead of ``SWAGCallback`` collecting every epoch during ``fit`` vs the same fit without it.

    python benchmarks/sine_benchmark.py            # ~3 minutes on 2 CPU cores
    python benchmarks/sine_benchmark.py --seeds 2 --repeats 2
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from pathlib import Path

import lightning as L
import notebook_reference as nb  # the benchmarks' one helper module, beside this script
import torch
from torch.utils.data import TensorDataset

from lightning_swag import SWAGCallback, SWAGModule, SWAGPosterior
from lightning_swag.experiments import sine
from lightning_swag.experiments.data import SineDataModule, sine_function
from lightning_swag.experiments.machine import machine_description
from lightning_swag.experiments.models import SineRegressor


def machine() -> str:
    return machine_description()


def notebook_quality(seed: int) -> dict[str, float]:
    """The notebook's protocol with its own code: pretrain, swag_low_rank(0.01, 100, 10, K=25), BMA 500."""
    dm = SineDataModule(seed=1355)
    torch.manual_seed(seed)
    train_set = TensorDataset(dm.x, dm.y)
    model = nb.pretrain(train_set)
    w_swa, var, D = nb.swag_low_rank(model.state_dict(), train_set, 0.01, 100, 10, 25)  # noqa: N806
    grid_mean, grid_std, _ = nb.bma(dm.predict_x, w_swa, var, D, n_samples=500)
    test_mean, _, _ = nb.bma(dm.test_x, w_swa, var, D, n_samples=500)
    inside = dm.predict_x.abs().squeeze(1) <= 5
    rmse = torch.sqrt(torch.mean((test_mean - sine_function(dm.test_x)) ** 2)).item()
    std_in, std_out = grid_std[inside].mean().item(), grid_std[~inside].mean().item()
    return {"rmse": rmse, "std_in": std_in, "std_out": std_out, "ratio": std_out / std_in}


def ours_quality(seed: int, out_dir: Path) -> dict[str, float]:
    # --runs 1: SWAG from one run; no MultiSWAG runs, which would only add time here
    args = sine.parse_args(["--seed", str(seed), "--runs", "1", "--output-dir", str(out_dir / f"seed{seed}")])
    m = sine.run(args)["swag"]
    return {
        "rmse": m["rmse_vs_true_function"],
        "std_in": m["mean_std_inside"],
        "std_out": m["mean_std_outside"],
        "ratio": m["std_ratio_outside_inside"],
    }


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bma_speed(repeats: int) -> tuple[float, float]:
    """Both BMA implementations on one posterior collected by SWAGCallback (rank 10 of 25)."""
    dm = SineDataModule()
    torch.manual_seed(0)
    model = SineRegressor(lr=0.001)
    swag = SWAGCallback(start_epoch=100, every_n_epochs=10, max_rank=25, swa_lr=0.01)
    _trainer(200, [swag]).fit(model, datamodule=dm)
    post: SWAGPosterior = swag.posterior
    x = dm.predict_x
    # the notebook's layout: D as [P, K] in float64, its model with the same weight order
    w_swa, var, D = post.mean, post.variance, post.deviations.double().T  # noqa: N806
    ours = SWAGModule(model, post, num_samples=500, scale=0.5, seed=0)

    def run_ours() -> None:
        ours.reset_samples()
        ours(x)

    def run_notebook() -> None:
        nb.bma(x, w_swa, var, D, n_samples=500)

    run_ours(), run_notebook()  # warm-up
    return best_time(run_ours, repeats), best_time(run_notebook, repeats)


def _trainer(epochs: int, callbacks: list) -> L.Trainer:
    return L.Trainer(
        max_epochs=epochs,
        callbacks=callbacks,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def fit_overhead(repeats: int, epochs: int = 100) -> dict[str, float]:
    """Median fit time with no callback, with an empty ``L.Callback`` (Lightning's cost of having
    any callback) and with SWAGCallback (every epoch, rank 20); the variants run interleaved."""
    variants = {
        "none": list,
        "empty callback": lambda: [L.Callback()],
        "SWAGCallback": lambda: [SWAGCallback(start_epoch=0, every_n_epochs=1, max_rank=20)],
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(repeats):
        for name, callbacks in variants.items():
            torch.manual_seed(r)
            model, dm = SineRegressor(lr=0.01), SineDataModule()
            trainer = _trainer(epochs, callbacks())
            start = time.perf_counter()
            trainer.fit(model, datamodule=dm)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def quality(seeds: int, out_dir: Path) -> None:
    """Part 1: RMSE and std ratio of the notebook's code and of ours over ``seeds`` seeds."""
    print("1. Quality (SWAG, notebook protocol; BMA 500 samples)")
    print(f"{'seed':>4} | {'notebook RMSE':>13} {'ratio':>6} | {'ours RMSE':>9} {'ratio':>6}")
    rows = []
    for seed in range(seeds):
        theirs, ours = notebook_quality(seed), ours_quality(seed, out_dir)
        rows.append((theirs, ours))
        print(
            f"{seed:>4} | {theirs['rmse']:13.3f} {theirs['ratio']:6.2f} | {ours['rmse']:9.3f} {ours['ratio']:6.2f}"
        )
    for label, idx in (("notebook", 0), ("ours", 1)):
        rmse = statistics.mean(r[idx]["rmse"] for r in rows)
        ratio = statistics.mean(r[idx]["ratio"] for r in rows)
        std_in = statistics.mean(r[idx]["std_in"] for r in rows)
        std_out = statistics.mean(r[idx]["std_out"] for r in rows)
        print(
            f"mean {label:>8}: RMSE {rmse:.3f}, std |x|<=5 {std_in:.3f}, std |x|>5 {std_out:.3f}, ratio {ratio:.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output-dir", default="outputs/sine_benchmark")
    parser.add_argument("--parts", default="1,2,3", help="parts to run, e.g. '3' for the fit overhead alone")
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    print(f"machine: {machine()}\n")
    parts = set(args.parts.split(","))
    if "1" in parts:
        quality(args.seeds, Path(args.output_dir))
    if "2" in parts:
        print("\n2. BMA, 500 samples x 500 points, same posterior (best of repeats)")
        ours_s, nb_s = bma_speed(args.repeats)
        print(
            f"SWAGModule: {ours_s * 1e3:.1f} ms | notebook loop: {nb_s * 1e3:.1f} ms | speed-up {nb_s / ours_s:.1f}x"
        )
    if "3" in parts:
        print("\n3. fit, 100 epochs of the sine model, median of interleaved repeats")
        t = fit_overhead(args.repeats)
        base = t["none"]
        print(
            f"no callback: {base:.2f} s | empty L.Callback: {t['empty callback']:.2f} s "
            f"({100 * (t['empty callback'] / base - 1):+.1f}%) | SWAGCallback every epoch: "
            f"{t['SWAGCallback']:.2f} s ({100 * (t['SWAGCallback'] / base - 1):+.1f}%)"
        )


if __name__ == "__main__":
    main()
