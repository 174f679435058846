"""Regression with a noise model: aleatoric + epistemic uncertainty and calibrated intervals.

Two experiments, each with a network that predicts a Gaussian per input (``GaussianRegressor``:
mean and log-variance, trained with the Gaussian NLL). The predictive of SWAG is the equal-weight
Gaussian mixture over weight samples; it is compared on the same trained network with

* **MAP**: the pretrained network with its own learned noise ``N(μ(x), σ²(x))``;
* **SWA**, **SWAG-Diagonal**, **SWAG**: one posterior, collected after pretraining;
* **LLLA** (laplace-torch, optional): last-layer Laplace on the network's mean output, prior
  precision and a homoscedastic σ by marginal likelihood, predictive ``f_var + σ²`` (laplace-torch's
  regression predictive); and **LLLA + σ²(x)**: the same ``f_var`` plus the network's own
  heteroscedastic variance (laplace-torch 0.3 has no heteroscedastic likelihood).

1. **Heteroscedastic sine**: the sine example's 500 inputs on [-5, 5] with noise
   σ(x) = 0.1 + 0.3·|x|/5. Metrics on 1,000 fresh noisy test points on [-5, 5]; bands on [-10, 10].
2. **Diabetes** (scikit-learn's ``load_diabetes``, 442 rows, optional): 5 random 90/10 splits,
   standardised inputs and targets (training statistics), test NLL/RMSE/coverage as mean ± s.e.

Training recipe (both): Adam with a cosine schedule from ``lr`` to ``lr/100`` gives the MAP
network; then Adam at the constant ``lr`` for the collection epochs, one snapshot per epoch,
rank 20; BMA over ``--num-samples`` weight samples at scale 0.5. The diabetes MLP (one hidden layer
of 50 ReLU units, weight decay 0.1, 200 epochs) was chosen by the MAP's NLL on a validation split
held out from the training part of splits 0-2, never on test data.

    python examples/regression.py            # both experiments (about 3 minutes on 2 CPU cores)
    python examples/regression.py --fast     # reduced setting used by the tests
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_swag import SWAGCallback, SWAGModule, SWAGPosterior
from lightning_swag.experiments.data.sine import SineDataModule, noise_std, sine_function
from lightning_swag.experiments.models import GaussianRegressor
from lightning_swag.experiments.plots import (
    plot_calibration_curves,
    plot_interval_bands,
    plot_std_decomposition,
    save_figure,
)
from lightning_swag.metrics import (
    gaussian_mixture_quantile,
    regression_calibration_curve,
    regression_metrics,
)
from lightning_swag.summaries import heteroscedastic_mean_variance, summarize_gaussian_mixture

Components = tuple[Tensor, Tensor]
"""Per-sample predictive means and variances ``[S, N]`` of a Gaussian mixture."""

SWAG_METHODS = {
    # name: (covariance, scale or None for --scale, number of samples or None for --num-samples)
    "swa": ("diagonal", 0.0, 1),
    "swag_diagonal": ("diagonal", None, None),
    "swag": ("low_rank", None, None),
}
LABELS = {
    "map": "MAP (own σ²(x))",
    "swa": "SWA",
    "swag_diagonal": "SWAG-Diagonal",
    "swag": "SWAG",
    "lla": "LLLA, f_var + σ² (laplace-torch)",
    "lla_het": "LLLA, f_var + σ²(x)",
}
METRIC_COLUMNS = (
    "nll",
    "rmse",
    "crps",
    "coverage_50",
    "coverage_90",
    "coverage_95",
    "calibration_error",
    "mean_std",
)
SINE_TEST_SEED = 2024  # noise of the sine test targets; the training noise uses the notebook's 1355
SINE_REGIONS = {
    # name: (low, high, low included) of |x|
    "|x|≤1": (0.0, 1.0, True),
    "4≤|x|≤5": (4.0, 5.0, True),
    "5<|x|≤7": (5.0, 7.0, False),
    "8≤|x|≤10": (8.0, 10.0, True),
}
STD_KEYS = ("std", "epistemic_std", "aleatoric_std")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="outputs/regression", help="where figures and results go")
    parser.add_argument(
        "--experiments", default="sine,diabetes", help="comma-separated subset of sine,diabetes"
    )
    parser.add_argument("--seeds", default="0,1,2", help="sine: comma-separated training seeds")
    parser.add_argument("--splits", type=int, default=5, help="diabetes: random 90/10 splits")
    parser.add_argument("--seed", type=int, default=0, help="diabetes: base seed of the training runs")
    parser.add_argument("--num-samples", type=int, default=100, help="SWAG weight samples")
    parser.add_argument("--scale", type=float, default=0.5, help="SWAG covariance scale")
    parser.add_argument("--max-rank", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--sine-hidden", default="50,50")
    parser.add_argument("--sine-lr", type=float, default=3e-3)
    parser.add_argument("--sine-pretrain-epochs", type=int, default=300)
    parser.add_argument("--sine-collect-epochs", type=int, default=100)
    parser.add_argument("--diabetes-hidden", default="50")
    parser.add_argument("--diabetes-lr", type=float, default=1e-3)
    parser.add_argument("--diabetes-weight-decay", type=float, default=0.1)
    parser.add_argument("--diabetes-pretrain-epochs", type=int, default=200)
    parser.add_argument("--diabetes-collect-epochs", type=int, default=100)
    parser.add_argument("--no-laplace", action="store_true", help="skip the laplace-torch baselines")
    parser.add_argument("--fast", action="store_true", help="one sine seed, 2 splits, fewer epochs (tests)")
    args = parser.parse_args(argv)
    if args.fast:
        args.seeds, args.splits, args.num_samples = "0", 2, 30
        args.sine_pretrain_epochs, args.sine_collect_epochs = 150, 40
        args.diabetes_pretrain_epochs, args.diabetes_collect_epochs = 60, 20
    experiments = [name.strip() for name in args.experiments.split(",") if name.strip()]
    unknown = set(experiments) - {"sine", "diabetes"}
    if unknown or not experiments:
        parser.error(
            f"--experiments takes a comma-separated subset of sine,diabetes; got {args.experiments!r}"
        )
    args.experiments = experiments
    return args


# ------------------------------------------------------------------------------------ training
@dataclass
class TrainConfig:
    """One MAP + SWAG training run of a :class:`GaussianRegressor`."""

    in_features: int
    hidden: Sequence[int]
    lr: float
    weight_decay: float
    pretrain_epochs: int
    collect_epochs: int
    batch_size: int
    max_rank: int
    seed: int


def _trainer(epochs: int, callbacks: list[L.Callback]) -> L.Trainer:
    return L.Trainer(
        max_epochs=epochs,
        callbacks=callbacks,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def train_map_and_swag(
    config: TrainConfig, x: Tensor, y: Tensor
) -> tuple[GaussianRegressor, GaussianRegressor, SWAGPosterior]:
    """Pretrain (cosine schedule) to the MAP network, then collect SWAG at the constant peak lr.

    Returns a copy of the MAP network, the network at the end of collection (the architecture
    the posterior belongs to) and the posterior.
    """
    L.seed_everything(config.seed, verbose=False)
    loader = DataLoader(
        TensorDataset(x, y.reshape(len(y), 1)),
        batch_size=config.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(config.seed),
    )
    model = GaussianRegressor(
        in_features=config.in_features,
        hidden=list(config.hidden),
        lr=config.lr,
        weight_decay=config.weight_decay,
        lr_schedule="cosine",
    )
    _trainer(config.pretrain_epochs, []).fit(model, loader)
    map_model = copy.deepcopy(model).eval()
    model.lr_schedule = "constant"
    swag = SWAGCallback(start_epoch=0, every_n_epochs=1, max_rank=config.max_rank)
    _trainer(config.collect_epochs, [swag]).fit(model, loader)
    return map_model, model.eval(), swag.posterior


# ------------------------------------------------------------------------------------ predictives
@torch.no_grad()
def map_components(model: nn.Module, x: Tensor) -> Components:
    """The MAP network's own Gaussian ``N(μ(x), σ²(x))`` as a one-component mixture ``[1, N]``."""
    mean, variance = heteroscedastic_mean_variance(model(x))
    return mean.reshape(1, -1), variance.reshape(1, -1)


def swag_components(bma: SWAGModule, x: Tensor) -> Components:
    """Per-weight-sample ``(mean, variance)`` of the heteroscedastic network, ``[S, N]`` each
    (``SWAGModule(noise="heteroscedastic").sample_components``: the components of the mixture)."""
    bma.reset_samples()  # every call predicts with the same weight samples (fixed seed)
    mean, variance = bma.sample_components(x)
    return mean.reshape(mean.shape[0], -1), variance.reshape(variance.shape[0], -1)


def swag_modules(
    model: nn.Module, posterior: SWAGPosterior, args: argparse.Namespace, seed: int
) -> dict[str, SWAGModule]:
    """SWA, SWAG-Diagonal and SWAG predictors over one posterior."""
    return {
        name: SWAGModule(
            model,
            posterior,
            num_samples=num_samples or args.num_samples,
            scale=args.scale if scale is None else scale,
            covariance=covariance,
            task="regression",
            noise="heteroscedastic",
            seed=seed,
        )
        for name, (covariance, scale, num_samples) in SWAG_METHODS.items()
    }


def _laplace_available() -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import laplace  # noqa: F401
    except ImportError:
        return False
    return True


def mean_head_network(model: GaussianRegressor) -> nn.Sequential:
    """A copy of ``model`` that outputs only the mean: the same hidden layers, and a ``Linear(·, 1)``
    holding row 0 (the mean) of the output layer. laplace-torch's regression likelihood is
    homoscedastic, so it is applied to the mean output of the same trained network."""
    layers = copy.deepcopy(list(model.net))
    head = layers[-1]
    mean_head = nn.Linear(head.in_features, 1)
    with torch.no_grad():
        mean_head.weight.copy_(head.weight[:1])
        mean_head.bias.copy_(head.bias[:1])
    return nn.Sequential(*layers[:-1], mean_head).eval()


def fit_last_layer_laplace(
    model: GaussianRegressor, x: Tensor, y: Tensor, steps: int = 200
) -> Callable[[Tensor], tuple[Tensor, Tensor, float]]:
    """laplace-torch's last-layer Laplace (full Hessian) on the mean output of ``model``.

    The prior precision and the noise σ maximise the Laplace marginal likelihood (Adam on their
    logs, as laplace-torch's documentation does). Returns ``predict(x) -> (f_mean, f_var, σ²)``,
    ``f_*`` of shape ``[N]``.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from laplace import Laplace

    network = mean_head_network(model)
    la = Laplace(network, "regression", subset_of_weights="last_layer", hessian_structure="full")
    la.fit(DataLoader(TensorDataset(x, y.reshape(len(y), 1)), batch_size=256))
    log_prior = torch.zeros(1, requires_grad=True)
    log_sigma = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.Adam([log_prior, log_sigma], lr=0.1)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = -la.log_marginal_likelihood(log_prior.exp(), log_sigma.exp())
        loss.backward()
        optimizer.step()
    noise_variance = float(la.sigma_noise.detach()) ** 2

    def predict(inputs: Tensor) -> tuple[Tensor, Tensor, float]:
        f_mean, f_var = la(inputs, pred_type="glm")
        return f_mean.detach().reshape(-1), f_var.detach().reshape(-1), noise_variance

    return predict


def evaluate_methods(
    map_model: GaussianRegressor,
    model: GaussianRegressor,
    posterior: SWAGPosterior,
    laplace: Callable[[Tensor], tuple[Tensor, Tensor, float]] | None,
    inputs: Tensor,
    args: argparse.Namespace,
    seed: int,
) -> dict[str, Components]:
    """Mixture components of every method on ``inputs``."""
    components = {"map": map_components(map_model, inputs)}
    for name, bma in swag_modules(model, posterior, args, seed).items():
        components[name] = swag_components(bma, inputs)
    if laplace is not None:
        f_mean, f_var, noise_variance = laplace(inputs)
        _, own_variance = map_components(map_model, inputs)
        components["lla"] = (f_mean[None], f_var[None] + noise_variance)
        components["lla_het"] = (f_mean[None], f_var[None] + own_variance)
    return components


def summaries_on(components: dict[str, Components]) -> dict[str, dict[str, Tensor]]:
    """Mean, total, epistemic and aleatoric std of every method's mixture."""
    return {
        name: summarize_gaussian_mixture(means, variances) for name, (means, variances) in components.items()
    }


def intervals_on(
    components: Components, levels: Sequence[float] = (0.5, 0.9)
) -> dict[float, tuple[Tensor, Tensor]]:
    """Central intervals of the mixture at every point (quantiles by bisection)."""
    tails = [q for level in levels for q in ((1 - level) / 2, (1 + level) / 2)]
    quantiles = gaussian_mixture_quantile(*components, tails)
    return {level: (quantiles[2 * i], quantiles[2 * i + 1]) for i, level in enumerate(levels)}


# ------------------------------------------------------------------------------------ aggregation
def mean_and_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error (sample std / √n; 0 for a single value)."""
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return mean, se


def aggregate(runs: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, list[float]]]:
    """``{method: {metric: [mean, s.e.]}}`` over runs, plus the paired NLL difference to MAP."""
    table: dict[str, dict[str, list[float]]] = {}
    for method in runs[0]:
        table[method] = {
            metric: list(mean_and_se([run[method][metric] for run in runs])) for metric in METRIC_COLUMNS
        }
        table[method]["nll_minus_map"] = list(
            mean_and_se([run[method]["nll"] - run["map"]["nll"] for run in runs])
        )
    return table


def _cell(value: Sequence[float], runs: int, percent: bool = False) -> str:
    mean, se = value
    factor, digits, unit = (100, 1, "%") if percent else (1, 3, "")
    text = f"{factor * mean:.{digits}f}{unit}"
    return f"{text} ± {factor * se:.{digits}f}" if runs > 1 else text


def markdown_table(table: dict[str, dict[str, list[float]]], runs: int) -> str:
    """One row per method: every metric as mean ± standard error over ``runs``."""
    lines = [
        "| method | NLL | NLL − MAP's (paired) | RMSE | CRPS | 50% cov. | 90% cov. | 95% cov. | cal. error | mean std |",
        "|" + "---|" * 10,
    ]
    for method, values in table.items():
        cells = [_cell(values[m], runs) for m in ("nll", "nll_minus_map", "rmse", "crps")]
        cells += [_cell(values[m], runs, percent=True) for m in ("coverage_50", "coverage_90", "coverage_95")]
        cells += [_cell(values[m], runs) for m in ("calibration_error", "mean_std")]
        lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _concat(parts: list[Components]) -> Components:
    return torch.cat([m for m, _ in parts], dim=1), torch.cat([v for _, v in parts], dim=1)


# ------------------------------------------------------------------------------------ experiments
CalibrationPanel = dict[str, tuple[Tensor, Tensor]]


def region_means(x: Tensor, summary: dict[str, Tensor]) -> dict[str, dict[str, float]]:
    """Mean total/epistemic/aleatoric std over the regions of ``|x|`` in :data:`SINE_REGIONS`."""
    distance = x.reshape(-1).abs()
    result = {}
    for region, (low, high, include_low) in SINE_REGIONS.items():
        above = distance >= low if include_low else distance > low
        inside = above & (distance <= high)
        result[region] = {key: float(summary[key].reshape(-1)[inside].mean()) for key in STD_KEYS}
    return result


def run_sine(
    args: argparse.Namespace, out_dir: Path, laplace_on: bool
) -> tuple[dict[str, Any], CalibrationPanel]:
    """The heteroscedastic sine experiment over ``--seeds``; figures and calibration curves from
    the first seed."""
    datamodule = SineDataModule(noise="heteroscedastic")
    x_train, y_train = datamodule.x, datamodule.y
    x_test = torch.linspace(-5, 5, 1000).unsqueeze(1)
    y_test = datamodule.sample_targets(x_test, seed=SINE_TEST_SEED)
    x_grid = torch.linspace(-10, 10, 401).unsqueeze(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    runs, regions, calibration = [], [], {}
    for seed in seeds:
        config = TrainConfig(
            in_features=1,
            hidden=[int(h) for h in args.sine_hidden.split(",")],
            lr=args.sine_lr,
            weight_decay=0.0,
            pretrain_epochs=args.sine_pretrain_epochs,
            collect_epochs=args.sine_collect_epochs,
            batch_size=args.batch_size,
            max_rank=args.max_rank,
            seed=seed,
        )
        start = time.perf_counter()
        map_model, model, posterior = train_map_and_swag(config, x_train, y_train)
        laplace = fit_last_layer_laplace(map_model, x_train, y_train) if laplace_on else None
        test = evaluate_methods(map_model, model, posterior, laplace, x_test, args, seed)
        runs.append({name: regression_metrics(*parts, y_test) for name, parts in test.items()})
        grid = evaluate_methods(map_model, model, posterior, laplace, x_grid, args, seed)
        summaries = summaries_on(grid)
        regions.append({name: region_means(x_grid, summary) for name, summary in summaries.items()})
        print(
            f"sine seed {seed}: {time.perf_counter() - start:.1f} s; test NLL SWAG {runs[-1]['swag']['nll']:.4f}, "
            f"MAP {runs[-1]['map']['nll']:.4f}"
        )
        if seed == seeds[0]:
            sine_figures(out_dir, datamodule, x_grid, grid, summaries)
            calibration = {
                LABELS[name]: regression_calibration_curve(*parts, y_test) for name, parts in test.items()
            }
    region_table = {
        name: {
            region: {key: statistics.fmean(r[name][region][key] for r in regions) for key in STD_KEYS}
            for region in SINE_REGIONS
        }
        for name in regions[0]
    }
    result = {
        "seeds": seeds,
        "runs": runs,
        "table": aggregate(runs),
        "regions": region_table,
        "per_seed_regions": regions,
    }
    return result, calibration


def sine_figures(
    out_dir: Path,
    datamodule: SineDataModule,
    x_grid: Tensor,
    grid: dict[str, Components],
    summaries: dict[str, dict[str, Tensor]],
) -> None:
    """Interval bands and the std decomposition on the prediction grid."""
    shown = [name for name in ("map", "swag_diagonal", "swag", "lla_het") if name in grid]
    true_sigma = noise_std(x_grid, "heteroscedastic")
    outside = x_grid.abs() > 5
    z90 = math.sqrt(2) * float(torch.special.erfinv(torch.tensor(0.9, dtype=torch.float64)))
    true_90 = (
        (sine_function(x_grid) - z90 * true_sigma).masked_fill(outside, float("nan")),
        (sine_function(x_grid) + z90 * true_sigma).masked_fill(outside, float("nan")),
    )
    bands = {LABELS[name]: (summaries[name]["mean"], intervals_on(grid[name])) for name in shown}
    save_figure(
        plot_interval_bands(
            datamodule.x,
            datamodule.y,
            x_grid,
            bands,
            true_function=(x_grid, sine_function(x_grid)),
            true_intervals={0.9: true_90},
            data_range=(-5.0, 5.0),
            title="Heteroscedastic sine: 50% and 90% predictive intervals (dotted: the true 90% interval)",
        ),
        out_dir / "sine_intervals.png",
    )
    save_figure(
        plot_std_decomposition(
            x_grid,
            {LABELS[name]: summaries[name] for name in ("map", "swag_diagonal", "swag")},
            true_noise=(x_grid, true_sigma.masked_fill(outside, float("nan"))),
            data_range=(-5.0, 5.0),
            title="Heteroscedastic sine: predictive std = √(epistemic² + aleatoric²)",
        ),
        out_dir / "sine_std.png",
    )


def load_diabetes_tensors() -> tuple[Tensor, Tensor]:
    """scikit-learn's diabetes data (442 × 10 inputs, disease progression target) as float32 tensors."""
    from sklearn.datasets import load_diabetes

    inputs, targets = load_diabetes(return_X_y=True)
    return torch.tensor(inputs, dtype=torch.float32), torch.tensor(targets, dtype=torch.float32)


def diabetes_split(x: Tensor, y: Tensor, split: int, test_fraction: float = 0.1) -> dict[str, Tensor]:
    """A random train/test split (seeded by ``split``), standardised with the training statistics."""
    permutation = torch.randperm(len(x), generator=torch.Generator().manual_seed(split))
    num_test = int(len(x) * test_fraction)
    test, train = permutation[:num_test], permutation[num_test:]
    x_mean, x_std = x[train].mean(0), x[train].std(0)
    y_mean, y_std = y[train].mean(), y[train].std()
    return {
        "x_train": (x[train] - x_mean) / x_std,
        "y_train": (y[train] - y_mean) / y_std,
        "x_test": (x[test] - x_mean) / x_std,
        "y_test": (y[test] - y_mean) / y_std,
    }


def run_diabetes(
    args: argparse.Namespace, laplace_on: bool
) -> tuple[dict[str, Any], CalibrationPanel] | None:
    """The diabetes experiment over ``--splits`` random splits; None without scikit-learn."""
    try:
        x, y = load_diabetes_tensors()
    except ImportError:
        print(
            "diabetes: scikit-learn is not installed (pip install scikit-learn, or the [examples] extra); "
            "skipping this experiment."
        )
        return None
    runs: list[dict[str, dict[str, float]]] = []
    pooled: dict[str, list[Components]] = {}
    targets: list[Tensor] = []
    for split in range(args.splits):
        data = diabetes_split(x, y, split)
        config = TrainConfig(
            in_features=x.shape[1],
            hidden=[int(h) for h in args.diabetes_hidden.split(",")],
            lr=args.diabetes_lr,
            weight_decay=args.diabetes_weight_decay,
            pretrain_epochs=args.diabetes_pretrain_epochs,
            collect_epochs=args.diabetes_collect_epochs,
            batch_size=args.batch_size,
            max_rank=args.max_rank,
            seed=args.seed + split,
        )
        start = time.perf_counter()
        map_model, model, posterior = train_map_and_swag(config, data["x_train"], data["y_train"])
        laplace = fit_last_layer_laplace(map_model, data["x_train"], data["y_train"]) if laplace_on else None
        test = evaluate_methods(map_model, model, posterior, laplace, data["x_test"], args, args.seed + split)
        runs.append({name: regression_metrics(*parts, data["y_test"]) for name, parts in test.items()})
        for name, parts in test.items():
            pooled.setdefault(name, []).append(parts)
        targets.append(data["y_test"])
        print(
            f"diabetes split {split}: {time.perf_counter() - start:.1f} s; test NLL SWAG "
            f"{runs[-1]['swag']['nll']:.4f}, MAP {runs[-1]['map']['nll']:.4f}"
        )
    all_targets = torch.cat(targets)
    calibration = {
        LABELS[name]: regression_calibration_curve(*_concat(parts), all_targets)
        for name, parts in pooled.items()
    }
    return {"splits": args.splits, "runs": runs, "table": aggregate(runs)}, calibration


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the selected experiments; writes ``results.json``, ``results.md`` and figures.

    Runs with one intra-op thread (restored afterwards): the models are so small that more
    threads only add synchronisation, which on a busy 2-core machine made runs 10 times slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> dict[str, Any]:
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    laplace_on = not args.no_laplace and _laplace_available()
    if not args.no_laplace and not laplace_on:
        print(
            "laplace-torch is not installed (pip install 'laplace-torch==0.3.*', or the [examples] extra); "
            "skipping the last-layer Laplace baselines, running the rest."
        )
    start = time.perf_counter()
    results: dict[str, Any] = {"laplace": laplace_on}
    panels: dict[str, CalibrationPanel] = {}
    if "sine" in args.experiments:
        results["sine"], panels[f"heteroscedastic sine (seed {args.seeds.split(',')[0]})"] = run_sine(
            args, out_dir, laplace_on
        )
    if "diabetes" in args.experiments:
        diabetes = run_diabetes(args, laplace_on)
        if diabetes is not None:
            results["diabetes"], panels[f"diabetes ({args.splits} splits pooled)"] = diabetes
    if panels:
        save_figure(plot_calibration_curves(panels), out_dir / "calibration.png")
    results["seconds"] = time.perf_counter() - start
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    (out_dir / "results.md").write_text(results_markdown(results, args))
    print(results_markdown(results, args))
    return results


def results_markdown(results: dict[str, Any], args: argparse.Namespace) -> str:
    """The results tables (mean ± standard error over seeds or splits) as Markdown."""
    parts = []
    if "sine" in results:
        sine = results["sine"]
        parts.append(
            f"### Heteroscedastic sine ({len(sine['seeds'])} seeds; test: 1,000 noisy points on [-5, 5])\n\n"
            + markdown_table(sine["table"], len(sine["seeds"]))
        )
        header = "| method | " + " | ".join(f"std {r} (epi / alea)" for r in SINE_REGIONS) + " |"
        rows = [header, "|" + "---|" * (len(SINE_REGIONS) + 1)]
        for name, regions in sine["regions"].items():
            cells = [
                f"{v['std']:.3f} ({v['epistemic_std']:.3f} / {v['aleatoric_std']:.3f})"
                for v in regions.values()
            ]
            rows.append(f"| {LABELS[name]} | " + " | ".join(cells) + " |")
        true = {
            region: statistics.fmean(noise_std(torch.linspace(lo, hi, 101), "heteroscedastic").tolist())
            for region, (lo, hi, _) in SINE_REGIONS.items()
        }
        rows.append("| true noise σ(x) | " + " | ".join(f"{v:.3f}" for v in true.values()) + " |")
        parts.append("Mean predictive std by region of |x| (data on [-5, 5]):\n\n" + "\n".join(rows))
    if "diabetes" in results:
        diabetes = results["diabetes"]
        parts.append(
            f"### Diabetes ({diabetes['splits']} random 90/10 splits, standardised targets)\n\n"
            + markdown_table(diabetes["table"], diabetes["splits"])
        )
    if not results.get("laplace"):
        parts.append("(laplace-torch not installed: no LLLA rows.)")
    parts.append(f"{results['seconds']:.0f} s in all; SWAG: {args.num_samples} samples, scale {args.scale}.")
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point (``python examples/regression.py [options]``)."""
    run(parse_args(argv))


if __name__ == "__main__":
    main()
