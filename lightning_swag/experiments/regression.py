"""Regression with a noise model: aleatoric + epistemic uncertainty and calibrated intervals.

Two experiments, each with a network that predicts a Gaussian per input (``GaussianRegressor``:
mean and log-variance, trained with the Gaussian NLL). The SWAG predictive is the equal-weight
Gaussian mixture over weight samples (``SWAGModule(..., task="regression", noise="heteroscedastic")``);
it is compared on the same trained networks with

* **MAP**: the pretrained network with its own learned noise ``N(μ(x), σ²(x))``;
* **SWA**, **SWAG-Diagonal**, **SWAG**: one posterior, collected after pretraining;
* **MultiSWAG** and, as its reference, a **deep ensemble of MAPs** (``--runs`` independent runs,
  diabetes only): the posteriors of all runs pooled, and the mixture of the runs' own Gaussians;
* **LLLA** (laplace-torch, optional): last-layer Laplace on the network's mean output, prior
  precision and a homoscedastic σ by marginal likelihood, predictive ``f_var + σ²`` (laplace-torch's
  regression predictive); and **LLLA + σ²(x)**: the same ``f_var`` plus the network's own
  heteroscedastic variance (laplace-torch 0.3 has no heteroscedastic likelihood).

Every SWAG scale is chosen by ``SWAGModule.tune_scale`` (the mixture NLL) on a validation part held
out from the *training* data (``--val-fraction``); test data is used for the reported metrics only.
All models are trained on the rest of the training data. SWAG rows are scored with
``trainer.test(bma, test_loader)``; the other rows with the same definitions
(:func:`lightning_swag.metrics.regression_metrics`).

1. **Heteroscedastic sine**: the sine example's 500 inputs on [-5, 5] with noise
   σ(x) = 0.1 + 0.3·|x|/5. Metrics on 1,000 fresh noisy test points on [-5, 5]; bands on [-10, 10].
2. **Diabetes** (scikit-learn's ``load_diabetes``, 442 rows, optional): 5 random 90/10 train/test
   splits, standardised inputs and targets (statistics of the rows the models are trained on),
   test NLL/RMSE/coverage as mean ± standard error over the splits.

Training recipe (both): Adam with a cosine schedule from ``lr`` to ``lr/100`` gives the MAP
network; then Adam at the constant ``lr`` for the collection epochs, one snapshot per epoch,
rank 20; BMA over ``--num-samples`` weight samples per posterior. The diabetes MLP (one hidden
layer of 50 ReLU units, weight decay 0.1, 200 epochs) was chosen by the MAP's NLL on a validation
split held out from the training part of splits 0-2, never on test data.

    python examples/regression.py                            # both experiments, about 2 minutes on 2 CPU cores
    python examples/regression.py --figures-dir docs/images  # also the README's figures
    python examples/regression.py --fast                     # reduced setting used by the tests
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
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
from lightning_swag.experiments.machine import machine_description
from lightning_swag.experiments.models import GaussianRegressor
from lightning_swag.experiments.plots import (
    plot_calibration_curves,
    plot_interval_bands,
    plot_std_decomposition,
    save_figure,
)
from lightning_swag.experiments.trainer import quiet_trainer
from lightning_swag.lightning.quiet import quiet_lightning
from lightning_swag.likelihoods.summaries import heteroscedastic_mean_variance, summarize_gaussian_mixture
from lightning_swag.metrics import (
    gaussian_mixture_quantile,
    regression_calibration_curve,
    regression_metrics,
)

Predictive = dict[str, Tensor]
"""A method's predictive on some inputs: the mixture summary (``mean``, ``std``, ``epistemic_std``,
``aleatoric_std``, ``[N]`` each) and its components ``samples`` / ``sample_variances`` ``[S, N]``."""

SWAG_METHODS = {
    # name: (covariance, fixed scale or None for the tuned one, number of samples or None for --num-samples)
    "swa": ("diagonal", 0.0, 1),
    "swag_diagonal": ("diagonal", None, None),
    "swag": ("low_rank", None, None),
}
LABELS = {
    "map": "MAP (own σ²(x))",
    "ensemble": "Deep ensemble of MAPs",
    "swa": "SWA",
    "swag_diagonal": "SWAG-Diagonal",
    "swag": "SWAG",
    "multiswag": "MultiSWAG",
    "lla": "LLLA, f_var + σ² (laplace-torch)",
    "lla_het": "LLLA, f_var + σ²(x)",
}
"""Row labels, in table order."""
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
OPTIONS: dict[str, tuple[Callable[[str], Any], str]] = {
    # per-experiment option: (type, help), given as --<experiment>-<option>
    "hidden": (str, "hidden widths"),
    "lr": (float, "peak learning rate (Adam)"),
    "weight_decay": (float, "L2 penalty"),
    "pretrain_epochs": (int, "epochs of the cosine schedule to the MAP network"),
    "collect_epochs": (int, "SWAG collection epochs at the constant peak learning rate"),
    "scales": (str, "candidate SWAG covariance scales, chosen by the validation NLL (one value: fixed)"),
}
# Scales: powers of 2 around the paper's 0.5. The sine grid stops at 64 (at 128 some weight samples'
# log-variance overflows float32 in exp() and tune_scale stops with an error); the diabetes grid goes
# on to 256 (its posterior, collected with Adam, is so narrow that the validation NLL of some splits
# keeps falling up to scales of 64-128).
_DEFAULTS_TABLE = {
    # experiment: defaults in OPTIONS order: hidden, lr, weight_decay, pretrain/collect epochs, scales
    "sine": ("50,50", 3e-3, 0.0, 300, 100, "0.125,0.25,0.5,1,2,4,8,16,32,64"),
    "diabetes": ("50", 1e-3, 0.1, 200, 100, "0.125,0.25,0.5,1,2,4,8,16,32,64,128,256"),
}
EXPERIMENT_DEFAULTS = {
    experiment: dict(zip(OPTIONS, values, strict=True)) for experiment, values in _DEFAULTS_TABLE.items()
}
"""``{experiment: {option: default}}`` of the per-experiment options."""
SINE_TEST_SEED = 2024  # noise of the sine test targets; the training noise uses the notebook's 1355
SINE_VAL_SEED = 7  # which sine training points are held out for validation
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
    parser.add_argument("--output-dir", default="outputs/regression", help="where results and figures go")
    parser.add_argument(
        "--figures-dir", default=None, help="where the figures go (default --output-dir), e.g. docs/images"
    )
    parser.add_argument(
        "--experiments", default="sine,diabetes", help="comma-separated subset of sine,diabetes"
    )
    parser.add_argument("--seeds", default="0,1,2", help="sine: comma-separated training seeds")
    parser.add_argument("--splits", type=int, default=5, help="diabetes: random 90/10 splits")
    parser.add_argument(
        "--runs", type=int, default=3, help="diabetes: independent runs per split (MultiSWAG)"
    )
    parser.add_argument("--seed", type=int, default=0, help="diabetes: base seed of the training runs")
    parser.add_argument(
        "--val-fraction", type=float, default=0.2, help="training data held out to tune the SWAG scale"
    )
    parser.add_argument("--num-samples", type=int, default=100, help="SWAG weight samples per posterior")
    parser.add_argument("--max-rank", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    for experiment, defaults in EXPERIMENT_DEFAULTS.items():
        for option, (kind, text) in OPTIONS.items():
            flag = f"--{experiment}-{option.replace('_', '-')}"
            parser.add_argument(flag, type=kind, default=defaults[option], help=f"{experiment}: {text}")
    parser.add_argument("--no-laplace", action="store_true", help="skip the laplace-torch baselines")
    parser.add_argument(
        "--fast", action="store_true", help="one sine seed, 2 splits of 2 runs, fewer epochs (tests)"
    )
    args = parser.parse_args(argv)
    if args.fast:
        args.seeds, args.splits, args.runs, args.num_samples = "0", 2, 2, 30
        args.sine_pretrain_epochs, args.sine_collect_epochs = 150, 40
        args.diabetes_pretrain_epochs, args.diabetes_collect_epochs = 60, 20
    experiments = [name.strip() for name in args.experiments.split(",") if name.strip()]
    unknown = set(experiments) - {"sine", "diabetes"}
    if unknown or not experiments:
        parser.error(
            f"--experiments takes a comma-separated subset of sine,diabetes; got {args.experiments!r}"
        )
    args.experiments = experiments
    for experiment in EXPERIMENT_DEFAULTS:
        option = f"{experiment}_scales"
        text = getattr(args, option)
        try:
            candidates = [float(v) for v in text.split(",") if v.strip()]
        except ValueError:
            candidates = []
        if not candidates or not all(math.isfinite(v) and v > 0 for v in candidates):
            parser.error(
                f"--{experiment}-scales takes comma-separated numbers > 0 (scale 0 is the SWA row), got {text!r}"
            )
        setattr(args, option, candidates)
    if not 0 < args.val_fraction < 1:
        parser.error(f"--val-fraction must lie in (0, 1), got {args.val_fraction}")
    if args.runs < 1:
        parser.error(f"--runs must be >= 1, got {args.runs}")
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


@dataclass
class Run:
    """What one training run leaves: the MAP network (end of the cosine schedule), the network at
    the end of collection (the architecture the posterior belongs to) and the SWAG posterior."""

    map_model: GaussianRegressor
    model: GaussianRegressor
    posterior: SWAGPosterior


def _loader(x: Tensor, y: Tensor, batch_size: int | None = None, seed: int | None = None) -> DataLoader:
    """``(x, y[:, None])`` batches: shuffled by a generator seeded with ``seed``, or in order (one
    batch unless ``batch_size`` is given) when ``seed`` is None."""
    dataset = TensorDataset(x, y.reshape(len(y), 1))
    if seed is None:
        return DataLoader(dataset, batch_size=batch_size or len(y))
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator)


def train_map_and_swag(config: TrainConfig, x: Tensor, y: Tensor) -> Run:
    """Pretrain (cosine schedule) to the MAP network, then collect SWAG at the constant peak lr."""
    L.seed_everything(config.seed, verbose=False)
    loader = _loader(x, y, config.batch_size, seed=config.seed)
    model = GaussianRegressor(
        in_features=config.in_features,
        hidden=list(config.hidden),
        lr=config.lr,
        weight_decay=config.weight_decay,
        lr_schedule="cosine",
    )
    quiet_trainer(config.pretrain_epochs).fit(model, loader)
    map_model = copy.deepcopy(model).eval()
    model.lr_schedule = "constant"
    swag = SWAGCallback(start_epoch=0, every_n_epochs=1, max_rank=config.max_rank)
    quiet_trainer(config.collect_epochs, [swag]).fit(model, loader)
    return Run(map_model, model.eval(), swag.posterior)


def train_config(args: argparse.Namespace, experiment: str, in_features: int, seed: int) -> TrainConfig:
    """The training run of ``experiment`` set by its ``--<experiment>-*`` options."""

    def option(name: str) -> Any:
        return getattr(args, f"{experiment}_{name}")

    return TrainConfig(
        in_features=in_features,
        hidden=[int(h) for h in option("hidden").split(",")],
        lr=option("lr"),
        weight_decay=option("weight_decay"),
        pretrain_epochs=option("pretrain_epochs"),
        collect_epochs=option("collect_epochs"),
        batch_size=args.batch_size,
        max_rank=args.max_rank,
        seed=seed,
    )


def holdout(num_rows: int, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Indices ``(kept, held_out)`` of a random split of ``range(num_rows)``, ``fraction`` held out."""
    permutation = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed))
    num_held_out = max(1, round(num_rows * fraction))
    return permutation[num_held_out:], permutation[:num_held_out]


# ------------------------------------------------------------------------------------ predictives
def _predictive(means: Tensor, variances: Tensor) -> Predictive:
    """The summary and components of the mixture of ``N(means[s], variances[s])``, ``[S, N]`` each."""
    return {**summarize_gaussian_mixture(means, variances), "samples": means, "sample_variances": variances}


@torch.no_grad()
def map_predictive(models: Sequence[nn.Module], x: Tensor) -> Predictive:
    """The networks' own Gaussians ``N(μ(x), σ²(x))``, one mixture component each: the MAP (one
    network) or a deep ensemble of MAPs."""
    parts = [heteroscedastic_mean_variance(model(x)) for model in models]
    return _predictive(torch.stack([m for m, _ in parts]), torch.stack([v for _, v in parts]))


def swag_predictors(runs: Sequence[Run], num_samples: int, seed: int) -> dict[str, SWAGModule]:
    """SWA, SWAG-Diagonal and SWAG over the first run's posterior, and MultiSWAG over all runs'.

    One network serves every posterior (MultiSWAG too): each posterior carries full weight vectors,
    and the network has no buffers, so its own weights are never used. The SWAG scales start at the
    paper's 0.5 (:func:`tune_scales` sets them).
    """
    first = runs[0]
    common: dict[str, Any] = {"task": "regression", "noise": "heteroscedastic", "seed": seed}
    predictors = {
        name: SWAGModule(
            first.model,
            first.posterior,
            num_samples=samples or num_samples,
            scale=0.5 if scale is None else scale,
            covariance=covariance,
            return_samples=True,
            **common,
        )
        for name, (covariance, scale, samples) in SWAG_METHODS.items()
    }
    if len(runs) > 1:
        predictors["multiswag"] = SWAGModule(
            first.model,
            [run.posterior for run in runs],
            num_samples=num_samples,
            return_samples=True,
            **common,
        )
    return predictors


def tune_scales(
    predictors: dict[str, SWAGModule], x_val: Tensor, y_val: Tensor, candidates: Sequence[float]
) -> dict[str, float]:
    """Set every SWAG predictor's scale (not SWA's) by ``tune_scale`` on the validation data; the
    chosen scales."""
    chosen = {}
    for name, bma in predictors.items():
        fixed_scale = SWAG_METHODS.get(name, ("low_rank", None, None))[1]
        if fixed_scale is None:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", ".*at the edge of the candidates.*")  # reported instead
                bma.tune_scale(_loader(x_val, y_val), candidates)
            chosen[name] = bma.scale
    return chosen


def swag_predictive(bma: SWAGModule, x: Tensor) -> Predictive:
    """``bma(x)``: the mixture summary and (``return_samples``) its components ``[S, N]``."""
    bma.reset_samples()
    return bma(x)


def swag_test_metrics(bma: SWAGModule, x: Tensor, y: Tensor) -> dict[str, float]:
    """``trainer.test(bma, ...)``'s logged regression metrics, without the ``test_`` prefix."""
    (logged,) = quiet_trainer().test(bma, _loader(x, y), verbose=False)
    return {key.removeprefix("test_"): float(value) for key, value in logged.items()}


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


LaplacePredict = Callable[[Tensor], tuple[Tensor, Tensor, float]]


def fit_last_layer_laplace(
    model: GaussianRegressor, x: Tensor, y: Tensor, steps: int = 200
) -> LaplacePredict:
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
    la.fit(_loader(x, y, batch_size=256))
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


def laplace_predictives(laplace: LaplacePredict, map_model: nn.Module, x: Tensor) -> dict[str, Predictive]:
    """laplace-torch's ``f_var + σ²``, and ``f_var`` plus the MAP network's own ``σ²(x)``."""
    f_mean, f_var, noise_variance = laplace(x)
    own_variance = map_predictive([map_model], x)["sample_variances"][0]
    return {
        "lla": _predictive(f_mean[None], (f_var + noise_variance)[None]),
        "lla_het": _predictive(f_mean[None], (f_var + own_variance)[None]),
    }


@dataclass
class Evaluation:
    """Every method of one trained split or seed: the predictives it can compute on any inputs."""

    runs: list[Run]
    predictors: dict[str, SWAGModule]
    laplace: LaplacePredict | None
    scales: dict[str, float]

    def predictives(self, x: Tensor) -> dict[str, Predictive]:
        """Every method's predictive on ``x``, in :data:`LABELS` order."""
        out = {"map": map_predictive([self.runs[0].map_model], x)}
        if len(self.runs) > 1:
            out["ensemble"] = map_predictive([run.map_model for run in self.runs], x)
        out.update({name: swag_predictive(bma, x) for name, bma in self.predictors.items()})
        if self.laplace is not None:
            out.update(laplace_predictives(self.laplace, self.runs[0].map_model, x))
        return {name: out[name] for name in LABELS if name in out}

    def test_metrics(self, x: Tensor, y: Tensor) -> tuple[dict[str, dict[str, float]], dict[str, Predictive]]:
        """Test metrics of every method (``trainer.test`` for the SWAG ones) and the predictives."""
        predictives = self.predictives(x)
        metrics = {}
        for name, predictive in predictives.items():
            if name in self.predictors:
                metrics[name] = swag_test_metrics(self.predictors[name], x, y)
            else:
                metrics[name] = regression_metrics(predictive["samples"], predictive["sample_variances"], y)
        return metrics, predictives


def evaluate_trained(
    configs: Sequence[TrainConfig],
    data: dict[str, Tensor],
    scales: Sequence[float],
    num_samples: int,
    laplace_on: bool,
    seed: int,
) -> Evaluation:
    """Train one run per config on ``data["x_train"]``, tune the SWAG scales on the validation
    part, and fit the Laplace baseline (on the first run's MAP network)."""
    runs = [train_map_and_swag(config, data["x_train"], data["y_train"]) for config in configs]
    predictors = swag_predictors(runs, num_samples, seed)
    chosen = tune_scales(predictors, data["x_val"], data["y_val"], scales)
    laplace = (
        fit_last_layer_laplace(runs[0].map_model, data["x_train"], data["y_train"]) if laplace_on else None
    )
    return Evaluation(runs, predictors, laplace, chosen)


def intervals_on(
    predictive: Predictive, levels: Sequence[float] = (0.5, 0.9)
) -> dict[float, tuple[Tensor, Tensor]]:
    """Central intervals of the mixture at every point (quantiles by bisection)."""
    tails = [q for level in levels for q in ((1 - level) / 2, (1 + level) / 2)]
    quantiles = gaussian_mixture_quantile(predictive["samples"], predictive["sample_variances"], tails)
    return {level: (quantiles[2 * i], quantiles[2 * i + 1]) for i, level in enumerate(levels)}


def calibration_curves(
    predictives: Sequence[dict[str, Predictive]], targets: Sequence[Tensor], methods: Sequence[str]
) -> dict[str, tuple[Tensor, Tensor]]:
    """Calibration curve of each of ``methods``, over the concatenated test sets."""
    pooled_targets = torch.cat(list(targets))
    curves = {}
    for name in methods:
        if name in predictives[0]:
            parts = [p[name] for p in predictives]
            means = torch.cat([p["samples"] for p in parts], dim=1)
            variances = torch.cat([p["sample_variances"] for p in parts], dim=1)
            curves[LABELS[name]] = regression_calibration_curve(means, variances, pooled_targets)
    return curves


# ------------------------------------------------------------------------------------ aggregation
def mean_and_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error (sample std / √n; 0 for a single value)."""
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return mean, se


def aggregate(runs: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, list[float]]]:
    """``{method: {metric: [mean, s.e.]}}`` over runs, plus the paired NLL differences to MAP and
    to laplace-torch's LLLA (where present)."""
    table: dict[str, dict[str, list[float]]] = {}
    for method in runs[0]:
        table[method] = {
            metric: list(mean_and_se([run[method][metric] for run in runs])) for metric in METRIC_COLUMNS
        }
        for reference in ("map", "lla", "lla_het"):
            if reference in runs[0]:
                table[method][f"nll_minus_{reference}"] = list(
                    mean_and_se([run[method]["nll"] - run[reference]["nll"] for run in runs])
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


def goal_lines(table: dict[str, dict[str, list[float]]], runs: int) -> list[str]:
    """The issue's goals for the SWAG row: NLL below MAP's and no worse than LLLA's (a paired
    difference more than two standard errors below zero counts as below, within two as a tie),
    and 90% coverage within 85-95%."""

    def verdict(mean: float, se: float) -> str:
        if runs > 1 and abs(mean) <= 2 * se:
            return "tie (within 2 s.e.)"
        return "below" if mean < 0 else "above"

    swag = table["swag"]
    lines = []
    for reference in ("map", "lla", "lla_het"):
        key = f"nll_minus_{reference}"
        if key in swag:
            mean, se = swag[key]
            lines.append(f"SWAG NLL − {LABELS[reference]} NLL: {mean:+.3f} ± {se:.3f} → {verdict(mean, se)}")
    coverage = swag["coverage_90"][0]
    inside = "within" if 0.85 <= coverage <= 0.95 else "outside"
    lines.append(f"SWAG 90% coverage {100 * coverage:.1f}% → {inside} 85-95%")
    return lines


# ------------------------------------------------------------------------------------ sine
def region_means(x: Tensor, predictive: Predictive) -> dict[str, dict[str, float]]:
    """Mean total/epistemic/aleatoric std over the regions of ``|x|`` in :data:`SINE_REGIONS`."""
    distance = x.reshape(-1).abs()
    result = {}
    for region, (low, high, include_low) in SINE_REGIONS.items():
        above = distance >= low if include_low else distance > low
        inside = above & (distance <= high)
        result[region] = {key: float(predictive[key].reshape(-1)[inside].mean()) for key in STD_KEYS}
    return result


CalibrationPanel = dict[str, tuple[Tensor, Tensor]]
CALIBRATION_METHODS = ("map", "ensemble", "swag", "multiswag", "lla", "lla_het")


def sine_data(args: argparse.Namespace) -> dict[str, Tensor]:
    """The heteroscedastic sine data: training points less a held-out validation part, fresh noisy
    test points on the training range, and the prediction grid on [-10, 10]."""
    datamodule = SineDataModule(noise="heteroscedastic")
    kept, held_out = holdout(len(datamodule.x), args.val_fraction, SINE_VAL_SEED)
    kept = kept.sort().values
    x_test = torch.linspace(-5, 5, 1000).unsqueeze(1)
    return {
        "x_train": datamodule.x[kept],
        "y_train": datamodule.y[kept].reshape(-1),
        "x_val": datamodule.x[held_out],
        "y_val": datamodule.y[held_out].reshape(-1),
        "x_test": x_test,
        "y_test": datamodule.sample_targets(x_test, seed=SINE_TEST_SEED).reshape(-1),
        "x_grid": torch.linspace(-10, 10, 401).unsqueeze(1),
    }


def run_sine(
    args: argparse.Namespace, figures_dir: Path, laplace_on: bool
) -> tuple[dict[str, Any], CalibrationPanel]:
    """The heteroscedastic sine experiment over ``--seeds``; figures and calibration curves from
    the first seed."""
    data = sine_data(args)
    seeds = [int(s) for s in args.seeds.split(",")]
    runs, regions, scales, calibration = [], [], [], {}
    for seed in seeds:
        config = train_config(args, "sine", in_features=1, seed=seed)
        start = time.perf_counter()
        evaluation = evaluate_trained([config], data, args.sine_scales, args.num_samples, laplace_on, seed)
        metrics, test = evaluation.test_metrics(data["x_test"], data["y_test"])
        runs.append(metrics)
        scales.append(evaluation.scales)
        grid = evaluation.predictives(data["x_grid"])
        regions.append({name: region_means(data["x_grid"], predictive) for name, predictive in grid.items()})
        print(
            f"sine seed {seed}: {time.perf_counter() - start:.1f} s; scales {evaluation.scales}; test NLL "
            f"SWAG {metrics['swag']['nll']:.4f}, MAP {metrics['map']['nll']:.4f}"
        )
        if seed == seeds[0]:
            sine_figures(figures_dir, data, grid)
            calibration = calibration_curves([test], [data["y_test"]], CALIBRATION_METHODS)
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
        "scales": scales,
        "table": aggregate(runs),
        "regions": region_table,
        "per_seed_regions": regions,
    }
    return result, calibration


def sine_figures(figures_dir: Path, data: dict[str, Tensor], grid: dict[str, Predictive]) -> None:
    """Interval bands against the data, and the std decomposition, on the prediction grid."""
    x_grid = data["x_grid"]
    shown = [name for name in ("map", "swag_diagonal", "swag", "lla_het") if name in grid]
    true_sigma = noise_std(x_grid, "heteroscedastic")
    outside = x_grid.abs() > 5
    z90 = math.sqrt(2) * float(torch.special.erfinv(torch.tensor(0.9, dtype=torch.float64)))
    true_90 = (
        (sine_function(x_grid) - z90 * true_sigma).masked_fill(outside, float("nan")),
        (sine_function(x_grid) + z90 * true_sigma).masked_fill(outside, float("nan")),
    )
    bands = {LABELS[name]: (grid[name]["mean"], intervals_on(grid[name])) for name in shown}
    save_figure(
        plot_interval_bands(
            data["x_train"],
            data["y_train"],
            x_grid,
            bands,
            true_function=(x_grid, sine_function(x_grid)),
            true_intervals={0.9: true_90},
            data_range=(-5.0, 5.0),
            title="Heteroscedastic sine: 50% and 90% predictive intervals (dotted: the true 90% interval)",
        ),
        figures_dir / "regression_sine_intervals.png",
    )
    save_figure(
        plot_std_decomposition(
            x_grid,
            {LABELS[name]: grid[name] for name in ("map", "swag_diagonal", "swag")},
            true_noise=(x_grid, true_sigma.masked_fill(outside, float("nan"))),
            data_range=(-5.0, 5.0),
            title="Heteroscedastic sine: predictive std = √(epistemic² + aleatoric²)",
        ),
        figures_dir / "regression_sine_std.png",
    )


# ------------------------------------------------------------------------------------ diabetes
def load_diabetes_tensors() -> tuple[Tensor, Tensor]:
    """scikit-learn's diabetes data (442 × 10 inputs, disease progression target) as float32 tensors."""
    from sklearn.datasets import load_diabetes

    inputs, targets = load_diabetes(return_X_y=True)
    return torch.tensor(inputs, dtype=torch.float32), torch.tensor(targets, dtype=torch.float32)


def diabetes_split(
    x: Tensor, y: Tensor, split: int, test_fraction: float = 0.1, val_fraction: float = 0.2
) -> dict[str, Tensor]:
    """A random train/test split (seeded by ``split``) whose training part is split again into
    the rows the models are trained on and a validation part (``val_fraction`` of it, for the
    SWAG scale). Everything is standardised with the statistics of the rows trained on."""
    permutation = torch.randperm(len(x), generator=torch.Generator().manual_seed(split))
    num_test = int(len(x) * test_fraction)
    test, train_part = permutation[:num_test], permutation[num_test:]
    kept, held_out = holdout(len(train_part), val_fraction, seed=10_000 + split)
    train, val = train_part[kept], train_part[held_out]
    x_mean, x_std = x[train].mean(0), x[train].std(0)
    y_mean, y_std = y[train].mean(), y[train].std()
    return {
        f"{key}_{part}": (values[rows] - mean) / std
        for part, rows in (("train", train), ("val", val), ("test", test))
        for key, values, mean, std in (("x", x, x_mean, x_std), ("y", y, y_mean, y_std))
    }


def run_diabetes(
    args: argparse.Namespace, laplace_on: bool
) -> tuple[dict[str, Any], CalibrationPanel] | None:
    """The diabetes experiment over ``--splits`` random splits, ``--runs`` runs each; None without
    scikit-learn."""
    try:
        x, y = load_diabetes_tensors()
    except ImportError:
        print(
            "diabetes: scikit-learn is not installed (pip install scikit-learn, or the [examples] extra); "
            "skipping this experiment."
        )
        return None
    runs: list[dict[str, dict[str, float]]] = []
    scales: list[dict[str, float]] = []
    tests: list[dict[str, Predictive]] = []
    targets: list[Tensor] = []
    for split in range(args.splits):
        data = diabetes_split(x, y, split, val_fraction=args.val_fraction)
        configs = [
            train_config(args, "diabetes", in_features=x.shape[1], seed=args.seed + split + 1000 * run)
            for run in range(args.runs)
        ]
        start = time.perf_counter()
        evaluation = evaluate_trained(
            configs, data, args.diabetes_scales, args.num_samples, laplace_on, args.seed + split
        )
        metrics, test = evaluation.test_metrics(data["x_test"], data["y_test"])
        runs.append(metrics)
        scales.append(evaluation.scales)
        tests.append(test)
        targets.append(data["y_test"])
        print(
            f"diabetes split {split}: {time.perf_counter() - start:.1f} s; scales {evaluation.scales}; "
            f"test NLL SWAG {metrics['swag']['nll']:.4f}, MAP {metrics['map']['nll']:.4f}"
        )
    calibration = calibration_curves(tests, targets, CALIBRATION_METHODS)
    result = {"splits": args.splits, "runs_per_split": args.runs, "runs": runs, "scales": scales}
    result["table"] = aggregate(runs)
    return result, calibration


# ------------------------------------------------------------------------------------ driver
def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the selected experiments; writes ``results.json``, ``results.md`` and figures.

    Runs with one intra-op thread (restored afterwards): the models are so small that more
    threads only add synchronisation, which on a busy 2-core machine made runs 10 times slower.
    Lightning's informational messages are silenced meanwhile (each experiment builds many Trainers).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    lightning_logger = logging.getLogger("lightning.pytorch")
    level = lightning_logger.level
    lightning_logger.setLevel(logging.WARNING)  # not the "GPU available" lines of every Trainer
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)
        lightning_logger.setLevel(level)


def _run(args: argparse.Namespace) -> dict[str, Any]:
    out_dir = Path(args.output_dir)
    figures_dir = Path(args.figures_dir) if args.figures_dir else out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    laplace_on = not args.no_laplace and _laplace_available()
    if not args.no_laplace and not laplace_on:
        print(
            "laplace-torch is not installed (pip install 'laplace-torch==0.3.*', or the [examples] extra); "
            "skipping the last-layer Laplace baselines, running the rest."
        )
    start = time.perf_counter()
    results: dict[str, Any] = {"machine": machine_description(), "laplace": laplace_on}
    panels: dict[str, CalibrationPanel] = {}
    if "sine" in args.experiments:
        results["sine"], panels[f"heteroscedastic sine (seed {args.seeds.split(',')[0]})"] = run_sine(
            args, figures_dir, laplace_on
        )
    if "diabetes" in args.experiments:
        diabetes = run_diabetes(args, laplace_on)
        if diabetes is not None:
            results["diabetes"], panels[f"diabetes ({args.splits} splits pooled)"] = diabetes
    if panels:
        save_figure(plot_calibration_curves(panels), figures_dir / "regression_calibration.png")
    results["seconds"] = time.perf_counter() - start
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    (out_dir / "results.md").write_text(results_markdown(results, args))
    print(results_markdown(results, args))
    return results


def _scales_line(scales: list[dict[str, float]], candidates: Sequence[float]) -> str:
    """The scales ``tune_scale`` chose, per method; a chosen edge of the candidates is pointed out."""
    edges = {min(candidates): "smallest", max(candidates): "largest"} if len(set(candidates)) > 1 else {}
    parts = []
    for name in scales[0]:
        chosen = [s[name] for s in scales]
        text = ", ".join(f"{v:g}" for v in chosen)
        at_edge = sorted({edges[v] for v in chosen if v in edges})
        if at_edge:
            text += f" ({' and '.join(at_edge)} candidate chosen: the optimum may lie beyond)"
        parts.append(f"{LABELS[name]} {text}")
    listed = ", ".join(f"{c:g}" for c in candidates)
    return f"Scales chosen from {listed} on the validation data: " + "; ".join(parts) + "."


def results_markdown(results: dict[str, Any], args: argparse.Namespace) -> str:
    """The results tables (mean ± standard error over seeds or splits) and goals, as Markdown."""
    parts = []
    if "sine" in results:
        sine = results["sine"]
        parts.append(
            f"### Heteroscedastic sine ({len(sine['seeds'])} seeds; test: 1,000 noisy points on [-5, 5])\n\n"
            + markdown_table(sine["table"], len(sine["seeds"]))
        )
        parts.append(_scales_line(sine["scales"], args.sine_scales))
        escaped = [region.replace("|", "\\|") for region in SINE_REGIONS]  # inside a Markdown table
        header = "| method | " + " | ".join(f"std {r} (epi / alea)" for r in escaped) + " |"
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
        parts.append(
            "Goals (sine):\n\n"
            + "\n".join(f"- {line}" for line in goal_lines(sine["table"], len(sine["seeds"])))
        )
    if "diabetes" in results:
        diabetes = results["diabetes"]
        runs = diabetes["runs_per_split"]
        ensemble = f"; deep ensemble and MultiSWAG: {runs} runs per split" if runs > 1 else ""
        parts.append(
            f"### Diabetes ({diabetes['splits']} random 90/10 splits, standardised targets{ensemble})\n\n"
            + markdown_table(diabetes["table"], diabetes["splits"])
        )
        parts.append(_scales_line(diabetes["scales"], args.diabetes_scales))
        parts.append(
            "Goals (diabetes):\n\n"
            + "\n".join(f"- {line}" for line in goal_lines(diabetes["table"], diabetes["splits"]))
        )
    if not results.get("laplace"):
        parts.append("(laplace-torch not installed: no LLLA rows.)")
    parts.append(
        f"{results['seconds']:.0f} s in all on {results['machine']}. SWAG: {args.num_samples} weight samples "
        f"per posterior; scales chosen by the predictive NLL on the {100 * args.val_fraction:g}% of the "
        "training data held out for validation (SWAGModule.tune_scale)."
    )
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point (``python examples/regression.py [options]``), without Lightning's banners."""
    with quiet_lightning(examples=True):
        run(parse_args(argv))


if __name__ == "__main__":
    main()
