"""lightning-swag side by side with the peer SWAG packages, each run from its own installed code.

Peers (install them with the ``[peers]`` extra, see the README): swa-gaussian 0.1.9 (``swag``),
torch-uncertainty 0.13.0 (``torch_uncertainty``) and lightning-uq-box 0.4.0 (``lightning_uq_box``).
A peer that is not importable gets "–" in every row, with the reason printed below the table, so
the script also runs in the project's own venv.

Two tables, in one run, after a line describing the machine:

**Correctness.** The same recorded snapshots (a small MLP; 30 snapshots into a rank-20 buffer, so
the ring wraps, and 8 snapshots, so it is not yet full) are fed to all four packages through
their own collection code. Each package's SWA mean, the diagonal variance its sampler uses, its
``DᵀD``, its low-rank covariance term as its sampler scales it, and the empirical covariance of
``--corr-samples`` (default 100,000) of its own samples are compared with the paper's formula,
computed here from the raw snapshots: mean ``θ̄``, population variance, deviations
``θ_i − θ̄_i`` (``θ̄_i`` the running mean after adding ``θ_i``) of the last ``k = min(n, K)``
snapshots, ``Cov = scale · (diag(var) + DᵀD / (k − 1))`` at ``scale = 0.5`` (lightning-uq-box's
only scale). Errors are relative Frobenius norms ``‖X − X_ref‖ / ‖X_ref‖``; the mean is also
given as an RMS shift in units of the reference posterior standard deviation. lightning-swag's
sample-covariance error is the Monte-Carlo noise floor of the column.

**Speed.** For each case (MNIST MLP, ResNet-18 with and without the BatchNorm refresh, an
``nn.TransformerEncoder`` classifier, a LeNet-style conv net) every package gets the same posterior
(the same perturbed snapshots fed through its own collection code) and runs its own documented
prediction path, from a collected posterior to BMA class probabilities (sampling included):

* lightning-swag: ``SWAGModule(model, posterior, ...)``; one batch is ``module(x)``, many
  batches ``trainer.predict``.
* swa-gaussian: per sample ``SWAG.sample(scale, cov=True)``, ``utils.bn_update`` (BatchNorm
  rows) and ``utils.predict`` over the loader, averaged (its ``experiments/uncertainty`` loop).
* torch-uncertainty: ``SWAG.load_state_dict`` (restoring a posterior draws its
  ``num_estimators`` models), ``SWAG.bn_update`` (BatchNorm rows), then the eval-mode forward
  (one batch) or ``trainer.predict`` on its ``ClassificationRoutine``; outputs ``[(S·B), C]``
  are averaged after a softmax as its ``test_step`` does.
* lightning-uq-box: ``SWAGClassification.predict_step(x)`` (one batch) or ``trainer.predict``; it
  redraws its samples for every batch and has no BatchNorm refresh ("–").

* plain loop: not a package, the baseline a user writes by hand: ``posterior.sample`` of float32
  weight vectors from lightning-swag's posterior, then per sample ``vector_to_parameters``,
  ``torch.optim.swa_utils.update_bn`` (BatchNorm rows) and the eval-mode forward over the batches,
  softmax-averaged; no vmap, no channels-last, no Trainer.

Plus the extra ``fit`` time of collecting 30 ResNet-18 snapshots: each package's fit with its SWAG
machinery minus the same fit without it (see :func:`collection_seconds`), per 30 snapshots.
Repetitions are interleaved (package order rotated each repetition) and medians are reported;
the last two columns are the fastest peer's time and the plain loop's over lightning-swag's (above
1: lightning-swag faster).

Usage::

    python benchmarks/peers.py [--quick] [--threads 1,2] [--repeats 3] [--only correctness|speed]
                               [--cases mlp,resnet18,resnet18_bn,transformer,convnet,collect]
                               [--corr-samples 100000] [--json results.json]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import importlib
import io
import json
import logging
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler, TensorDataset

from lightning_swag import SWAGCallback, SWAGModule, SWAGPosterior
from lightning_swag.experiments.machine import machine_description

OURS = "lightning-swag"
SWA_GAUSSIAN = "swa-gaussian"
TORCH_UNCERTAINTY = "torch-uncertainty"
UQ_BOX = "lightning-uq-box"
PEERS = (SWA_GAUSSIAN, TORCH_UNCERTAINTY, UQ_BOX)
PACKAGES = (OURS, *PEERS)
# Not a package: the loop a user writes by hand around lightning-swag's posterior (speed table only).
PLAIN = "plain loop"
SPEED_COLUMNS = (*PACKAGES, PLAIN)
# The module each peer is imported from (the distribution name differs).
_PEER_MODULES = {
    SWA_GAUSSIAN: ("swag", "swa-gaussian"),
    TORCH_UNCERTAINTY: ("torch_uncertainty", "torch-uncertainty"),
    UQ_BOX: ("lightning_uq_box", "lightning-uq-box"),
}
SCALE = 0.5  # lightning-uq-box hard-codes the paper's 1/√2, i.e. scale 0.5: every package runs at it
QUIET_TRAINER: dict[str, Any] = {
    "accelerator": "cpu",
    "devices": 1,
    "logger": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "enable_checkpointing": False,
}
DASH = "–"


# ====================================================================== peers
def peer_versions() -> tuple[dict[str, str | None], dict[str, str]]:
    """``({peer: version or None}, {peer: why it cannot run})`` for the three peers."""
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {}
    problems: dict[str, str] = {}
    for peer, (module, dist) in _PEER_MODULES.items():
        found[peer] = None
        try:
            found[peer] = version(dist)
            with _quiet():
                importlib.import_module(module)
        except PackageNotFoundError:
            problems[peer] = "not installed (install the [peers] extra, see the README)"
        except Exception as err:  # noqa: BLE001 - any import failure makes the peer unusable
            problems[peer] = f"installed but `import {module}` fails: {type(err).__name__}: {err}"
    return found, problems


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence warnings and stdout chatter from the packages under test."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


_CHATTY_LOGGERS = ("lightning", "lightning.pytorch", "pytorch_lightning", "swag", "lightning_uq_box")


@contextlib.contextmanager
def _quiet_loggers() -> Iterator[None]:
    """Lightning's and the peers' INFO lines (GPU available, ...) off for the run, then restored."""
    loggers = [logging.getLogger(name) for name in _CHATTY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


# ====================================================================== the paper's formula
@dataclass
class Reference:
    """The SWAG posterior of a snapshot matrix, computed straight from the paper's definitions."""

    mean: Tensor  # [P] θ̄
    variance: Tensor  # [P] population variance of the snapshots
    deviations: Tensor  # [k, P] θ_i − θ̄_i of the last k snapshots
    rank: int  # k = min(n, K)

    @property
    def dtd(self) -> Tensor:
        return self.deviations.T @ self.deviations

    @property
    def low_rank(self) -> Tensor:
        """``DᵀD / (k − 1)`` (zero when ``k < 2``)."""
        if self.rank < 2:
            return torch.zeros_like(self.dtd)
        return self.dtd / (self.rank - 1)

    def covariance(self, scale: float = SCALE) -> Tensor:
        """``scale · (diag(var) + DᵀD / (k − 1))``."""
        return scale * (torch.diag(self.variance) + self.low_rank)


def reference_posterior(snapshots: Tensor, max_rank: int) -> Reference:
    """The paper's SWAG moments of ``snapshots`` ``[n, P]`` (computed in float64, no running updates)."""
    snaps = snapshots.double()
    n = snaps.shape[0]
    mean = snaps.mean(dim=0)
    variance = (snaps - mean).square().mean(dim=0)
    counts = torch.arange(1, n + 1, dtype=torch.float64).unsqueeze(1)
    running_means = snaps.cumsum(dim=0) / counts  # θ̄_i after adding θ_i
    k = min(n, max_rank)
    deviations = (snaps - running_means)[n - k :]
    return Reference(mean=mean, variance=variance, deviations=deviations, rank=k)


# ====================================================================== correctness
class TinyMLP(nn.Sequential):
    """5 → 8 → 3 MLP: 75 weights in four tensors, so cross-tensor covariance is measurable."""

    def __init__(self) -> None:
        super().__init__(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


def flat_params(model: nn.Module) -> Tensor:
    """The parameters of ``model`` as one flat float64 vector, in ``model.parameters()`` order."""
    return torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])


def load_flat(model: nn.Module, flat: Tensor) -> None:
    """Write a flat vector into the parameters of ``model`` (in ``model.parameters()`` order)."""
    torch.nn.utils.vector_to_parameters(flat.to(torch.float32), list(model.parameters()))


def tensor_ids(model: nn.Module) -> Tensor:
    """For each flat weight, the index of the parameter tensor it belongs to."""
    return torch.cat([torch.full((p.numel(),), i) for i, p in enumerate(model.parameters())])


def make_snapshots(model: nn.Module, n: int, seed: int, step: float = 0.02) -> Tensor:
    """``n`` SGD-like snapshots ``[n, P]`` around ``model``'s weights, exactly representable in float32.

    A correlated random walk in a 3-dimensional subspace (the low-rank structure SWAG is meant to
    catch) plus small independent noise, so both covariance terms matter.
    """
    gen = torch.Generator().manual_seed(seed)
    theta0 = flat_params(model)
    p = theta0.numel()
    basis = torch.randn(p, 3, generator=gen, dtype=torch.float64)
    z = torch.zeros(3, dtype=torch.float64)
    rows = []
    for _ in range(n):
        z = 0.8 * z + torch.randn(3, generator=gen, dtype=torch.float64)
        noise = 0.3 * torch.randn(p, generator=gen, dtype=torch.float64)
        rows.append(theta0 + step * (basis @ z + noise))
    return torch.stack(rows).float().double()  # rounded to float32, as every package stores them


@dataclass
class PackageStats:
    """What one package holds after the snapshots, flattened in ``model.parameters()`` order."""

    mean: Tensor
    variance: Tensor  # the variance its sampler uses (after its clamp)
    deviations: Tensor  # [rows, P] as stored
    low_rank: Tensor  # [P, P] the low-rank covariance term as its sampler scales it (at scale 1)
    samples: Tensor  # [N, P] drawn at scale 0.5
    at_floor: float = 0.0  # fraction of weights whose E[θ²] − E[θ]² is at or below the sampler's clamp
    note: str = ""


def stats_lightning_swag(
    template: nn.Module, snapshots: Tensor, max_rank: int, num_samples: int, seed: int
) -> PackageStats:
    """Feed the snapshots with ``SWAGPosterior.collect`` (the callback's path) and draw samples."""
    model = copy.deepcopy(template)
    post = SWAGPosterior.from_model(model, max_rank=max_rank)
    for theta in snapshots:
        load_flat(model, theta)
        post.collect(model)
    deviations = post.deviations.double()
    k = post.rank
    if hasattr(post, "covariance_factors"):
        _, factor = post.covariance_factors()
        low_rank = (
            factor.double().T @ factor.double()
            if factor is not None
            else torch.zeros(post.num_params, post.num_params, dtype=torch.float64)
        )
    else:  # pragma: no cover - older API
        low_rank = deviations.T @ deviations / max(k - 1, 1)
    gen = torch.Generator(device=post.device).manual_seed(seed)
    samples = post.sample(num_samples, scale=SCALE, generator=gen, dtype=torch.float64)
    at_floor = float((post.variance <= 0).double().mean())  # lightning-swag clamps at 0
    return PackageStats(post.mean.double(), post.variance.double(), deviations, low_rank, samples, at_floor)


def stats_swa_gaussian(
    template: nn.Module, snapshots: Tensor, max_rank: int, num_samples: int, seed: int
) -> PackageStats:
    """``swag.posteriors.SWAG(base, no_cov_mat=False, max_num_models=K)`` fed by ``collect_model``.

    Its sampler (``sample_fullrank``) clamps the variance at ``var_clamp`` (1e-30) and divides the
    low-rank term by ``max_num_models − 1`` whether or not the buffer is full.
    """
    from swag.posteriors import SWAG

    source = copy.deepcopy(template)
    swag_model = SWAG(lambda: copy.deepcopy(template), no_cov_mat=False, max_num_models=max_rank)
    for theta in snapshots:
        load_flat(source, theta)
        swag_model.collect_model(source)
    names = [n for n, _ in template.named_parameters()]
    base = swag_model.base
    mean = torch.cat([base.get_buffer(f"{n}_mean").reshape(-1).double() for n in names])
    sq_mean = torch.cat([base.get_buffer(f"{n}_sq_mean").reshape(-1).double() for n in names])
    raw = sq_mean - mean.square()
    variance = raw.clamp(min=swag_model.var_clamp)
    deviations = torch.cat([base.get_buffer(f"{n}_cov_mat_sqrt").double() for n in names], dim=1)
    low_rank = deviations.T @ deviations / (swag_model.max_num_models - 1)
    torch.manual_seed(seed)  # swa-gaussian samples from the global RNG
    samples = torch.empty(num_samples, mean.numel(), dtype=torch.float64)
    for i in range(num_samples):
        swag_model.sample(scale=SCALE, cov=True)
        samples[i] = torch.cat([base.get_buffer(n).reshape(-1).double() for n in names])
    at_floor = float((raw <= swag_model.var_clamp).double().mean())
    return PackageStats(mean, variance, deviations, low_rank, samples, at_floor)


def stats_torch_uncertainty(
    template: nn.Module, snapshots: Tensor, max_rank: int, num_samples: int, seed: int
) -> PackageStats:
    """``torch_uncertainty.methods.SWAG(core, cycle_start=0, cycle_length=1)`` fed by ``update_wrapper``.

    Its sampler (``_fullrank_sample``) clamps the variance at ``var_clamp`` (default 1e-6), divides
    the low-rank term by ``max_num_models − 1`` and draws the low-rank noise ``z₂`` afresh for every
    parameter tensor, so the low-rank term it samples is block-diagonal by tensor.
    """
    from torch_uncertainty.methods import SWAG

    core = copy.deepcopy(template)
    swag = SWAG(core, cycle_start=0, cycle_length=1, scale=SCALE, max_num_models=max_rank, num_estimators=1)
    for epoch, theta in enumerate(snapshots, start=1):  # updates at epoch > cycle_start
        load_flat(core, theta)
        swag.update_wrapper(epoch)
    names = [n for n, _ in template.named_parameters()]
    stats = swag.swag_stats
    mean = torch.cat([stats[f"{swag.prfx}{n}_mean"].reshape(-1).double() for n in names])
    sq_mean = torch.cat([stats[f"{swag.prfx}{n}_sq_mean"].reshape(-1).double() for n in names])
    raw = sq_mean - mean.square()
    variance = raw.clamp(min=swag.var_clamp)
    blocks = [stats[f"{swag.prfx}{n}_covariance_sqrt"].double() for n in names]
    deviations = torch.cat(blocks, dim=1)
    low_rank = torch.block_diag(*[b.T @ b for b in blocks]) / (swag.max_num_models - 1)
    torch.manual_seed(seed)
    samples = torch.empty(num_samples, mean.numel(), dtype=torch.float64)
    for i in range(num_samples):
        samples[i] = flat_params(swag.sample(SCALE))
    at_floor = float((raw <= swag.var_clamp).double().mean())
    return PackageStats(mean, variance, deviations, low_rank, samples, at_floor)


def stats_lightning_uq_box(
    template: nn.Module, snapshots: Tensor, max_rank: int, num_samples: int, seed: int
) -> PackageStats:
    """``SWAGClassification(model, max_swag_snapshots=K, ...)`` fed by ``update_uncertainty_buffers``.

    The wrapped model holds the weights before collection (``template``'s, from which the
    snapshots walk): lightning-uq-box starts its mean from them. Its sampler
    (``_sample_state_dict``, what ``predict_step`` loads into the model) uses ``0.5·var`` clamped at
    1e-30 and ``DᵀD / (2(K − 1))``, i.e. scale 0.5 with the low-rank term over ``K − 1``.
    """
    from lightning_uq_box.uq_methods import SWAGClassification

    model = copy.deepcopy(template)
    with _quiet():
        uq = SWAGClassification(
            model,
            max_swag_snapshots=max_rank,
            snapshot_freq=1,
            num_mc_samples=1,
            swag_lr=0.01,
            loss_fn=nn.CrossEntropyLoss(),
        )
    for theta in snapshots:
        load_flat(uq.model, theta)
        uq.update_uncertainty_buffers()
    names = [n for n, _ in template.named_parameters()]
    if set(names) != set(uq.model_w_and_b_module_names):
        untracked = sorted(set(names) - set(uq.model_w_and_b_module_names))
        note = f"does not track {', '.join(untracked)}"
    else:
        note = ""

    def buffer(name: str, kind: str) -> Tensor:
        if name not in uq.model_w_and_b_module_names:
            return torch.zeros(0)
        return uq._get_buffer_for_param(name, kind).double()

    mean = torch.cat([buffer(n, "mean").reshape(-1) for n in names])
    sq_mean = torch.cat([buffer(n, "squared_mean").reshape(-1) for n in names])
    raw = sq_mean - mean.square()
    variance = raw.clamp(min=1e-30)
    deviations = torch.cat([buffer(n, "D_block").reshape(max_rank, -1) for n in names], dim=1)
    low_rank = deviations.T @ deviations / (max_rank - 1)
    torch.manual_seed(seed)
    samples = torch.empty(num_samples, mean.numel(), dtype=torch.float64)
    for i in range(num_samples):
        sampled = uq._sample_state_dict()
        samples[i] = torch.cat([sampled[n].reshape(-1).double() for n in names])
    at_floor = float((raw <= 1e-30).double().mean())
    return PackageStats(mean, variance, deviations, low_rank, samples, at_floor, note)


CORRECTNESS_ADAPTERS: dict[str, Callable[..., PackageStats]] = {
    OURS: stats_lightning_swag,
    SWA_GAUSSIAN: stats_swa_gaussian,
    TORCH_UNCERTAINTY: stats_torch_uncertainty,
    UQ_BOX: stats_lightning_uq_box,
}


def _rel(value: Tensor, reference: Tensor) -> float:
    return float(torch.linalg.norm(value - reference) / torch.linalg.norm(reference))


def sample_covariance(samples: Tensor) -> Tensor:
    """Unbiased covariance ``[P, P]`` of the rows of ``samples`` (float64)."""
    centred = samples.double() - samples.double().mean(dim=0)
    return centred.T @ centred / (samples.shape[0] - 1)


def compare_to_reference(
    stats: PackageStats, ref: Reference, ids: Tensor, scale: float = SCALE
) -> dict[str, float]:
    """Relative errors of one package's posterior against the formula (see the module docstring)."""
    std = ref.variance.sqrt()
    cov = ref.covariance(scale)
    emp = sample_covariance(stats.samples)
    cross = ids.unsqueeze(0) != ids.unsqueeze(1)
    return {
        "mean": _rel(stats.mean, ref.mean),
        "mean_shift_std": float(((stats.mean - ref.mean) / std).square().mean().sqrt()),
        "variance": _rel(stats.variance, ref.variance),
        "at_floor": stats.at_floor,
        "dtd": _rel(stats.deviations.T @ stats.deviations, ref.dtd),
        "low_rank": _rel(stats.low_rank, ref.low_rank),
        "sample_cov": _rel(emp, cov),
        "sample_cov_cross": _rel(emp[cross], cov[cross]),
    }


@dataclass
class CorrectnessCase:
    name: str
    num_snapshots: int
    max_rank: int


CORRECTNESS_CASES = (
    CorrectnessCase("30 snapshots, K=20 (ring wrapped)", 30, 20),
    CorrectnessCase("8 snapshots, K=20 (buffer not full)", 8, 20),
)


def run_correctness(
    packages: Sequence[str],
    num_samples: int,
    seed: int = 0,
    cases: Sequence[CorrectnessCase] = CORRECTNESS_CASES,
) -> list[dict[str, Any]]:
    """One row per (case, package) with the errors of :func:`compare_to_reference`."""
    torch.manual_seed(seed)
    template = TinyMLP()
    ids = tensor_ids(template)
    rows = []
    for case in cases:
        snapshots = make_snapshots(template, case.num_snapshots, seed=seed + case.num_snapshots)
        ref = reference_posterior(snapshots, case.max_rank)
        for package in packages:
            with _quiet():
                stats = CORRECTNESS_ADAPTERS[package](template, snapshots, case.max_rank, num_samples, seed)
            row = {"case": case.name, "package": package, "samples": num_samples, "note": stats.note}
            row.update(compare_to_reference(stats, ref, ids))
            rows.append(row)
    return rows


CORRECTNESS_COLUMNS = (
    ("mean", "SWA mean"),
    ("mean_shift_std", "mean shift (σ)"),
    ("variance", "variance"),
    ("at_floor", "variances at floor"),
    ("dtd", "DᵀD"),
    ("low_rank", "low-rank term"),
    ("sample_cov", "Cov of samples"),
    ("sample_cov_cross", "cross-tensor Cov"),
)


def format_correctness(rows: list[dict[str, Any]], missing: dict[str, str]) -> str:
    """Markdown table of the correctness rows (peers that are not installed get "–")."""
    header = "| case | package | " + " | ".join(title for _, title in CORRECTNESS_COLUMNS) + " |"
    lines = [header, "|" + "---|" * (2 + len(CORRECTNESS_COLUMNS))]
    cases = list(dict.fromkeys(r["case"] for r in rows))
    for case in cases:
        for package in PACKAGES:
            found = [r for r in rows if r["case"] == case and r["package"] == package]
            if found:
                cells = [f"{found[0][key]:.3g}" for key, _ in CORRECTNESS_COLUMNS]
            elif package in missing:
                cells = [DASH] * len(CORRECTNESS_COLUMNS)
            else:
                continue
            lines.append(f"| {case} | {package} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ====================================================================== speed: models and cases
class ConvNet(nn.Module):
    """LeNet-style conv net for 1×28×28 inputs (the small conv net of the speed table)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 32, 5), nn.ReLU(), nn.MaxPool2d(2)
        )
        self.fc = nn.Linear(32 * 4 * 4, 128)
        self.head = nn.Linear(128, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.fc(self.features(x).flatten(1))))


class TransformerClassifier(nn.Module):
    """``nn.TransformerEncoder`` (2 layers, d=64, 4 heads) over ``[B, T, 16]`` features, mean-pooled."""

    def __init__(self, in_features: int = 16, d_model: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Linear(in_features, d_model)
        layer = nn.TransformerEncoderLayer(
            d_model, nhead=4, dim_feedforward=128, dropout=0.0, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(self.embed(x)).mean(dim=1))


def mnist_mlp() -> nn.Module:
    """The MNIST example's 784-64-10 network as a plain module."""
    return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 64), nn.ReLU(), nn.Linear(64, 10))


def resnet18() -> nn.Module:
    import torchvision

    return torchvision.models.resnet18(num_classes=10)


@dataclass
class SpeedCase:
    """One model of the speed table; inputs are random (timings do not depend on the values)."""

    key: str
    title: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    num_samples: int
    batch_size: int  # the "one batch" row
    predict_batches: int  # the trainer.predict row: this many batches ...
    predict_batch_size: int  # ... of this size
    bn_refresh: bool = False
    bn_batches: int = 4
    bn_batch_size: int = 64
    num_snapshots: int = 30
    max_rank: int = 20


def speed_cases(quick: bool, image_size: int) -> dict[str, SpeedCase]:
    img = (3, image_size, image_size)
    if quick:
        return {
            "mlp": SpeedCase(
                "mlp",
                "MNIST MLP 784-64-10",
                mnist_mlp,
                (1, 28, 28),
                4,
                256,
                5,
                64,
                num_snapshots=4,
                max_rank=3,
            ),
            "resnet18": SpeedCase(
                "resnet18", "ResNet-18", resnet18, img, 2, 8, 5, 2, num_snapshots=3, max_rank=2
            ),
            "resnet18_bn": SpeedCase(
                "resnet18_bn",
                "ResNet-18 + BN refresh",
                resnet18,
                img,
                2,
                8,
                5,
                2,
                bn_refresh=True,
                bn_batches=2,
                bn_batch_size=4,
                num_snapshots=3,
                max_rank=2,
            ),
            "transformer": SpeedCase(
                "transformer",
                "TransformerEncoder",
                TransformerClassifier,
                (16, 16),
                4,
                32,
                5,
                8,
                num_snapshots=4,
                max_rank=3,
            ),
            "convnet": SpeedCase(
                "convnet",
                "LeNet-style conv net",
                ConvNet,
                (1, 28, 28),
                4,
                64,
                5,
                16,
                num_snapshots=4,
                max_rank=3,
            ),
        }
    return {
        "mlp": SpeedCase(
            "mlp", "MNIST MLP 784-64-10, 30 samples", mnist_mlp, (1, 28, 28), 30, 10_000, 5, 2_000
        ),
        "resnet18": SpeedCase(
            "resnet18", f"ResNet-18 ({image_size}×{image_size}), 10 samples", resnet18, img, 10, 256, 5, 64
        ),
        "resnet18_bn": SpeedCase(
            "resnet18_bn",
            f"ResNet-18 ({image_size}×{image_size}) + BN refresh (256 images), 10 samples",
            resnet18,
            img,
            10,
            256,
            5,
            64,
            bn_refresh=True,
        ),
        "transformer": SpeedCase(
            "transformer",
            "TransformerEncoder 2×64, T=32, 30 samples",
            TransformerClassifier,
            (32, 16),
            30,
            512,
            5,
            128,
        ),
        "convnet": SpeedCase(
            "convnet", "LeNet-style conv net, 30 samples", ConvNet, (1, 28, 28), 30, 2_000, 5, 500
        ),
    }


# ====================================================================== speed: runners
def _batched_loader(dataset: Any, batch_size: int) -> DataLoader:
    """A loader that hands out whole batches by indexing the in-memory data once per batch.

    Per-item collation of a 10,000-image batch costs more than a forward pass of the MLP, and
    swa-gaussian walks the loader once per sample: with cheap batches every package pays (almost)
    nothing for data loading, so the table compares the SWAG implementations.
    """
    sampler = BatchSampler(SequentialSampler(range(len(dataset))), batch_size, drop_last=False)
    return DataLoader(dataset, batch_size=None, sampler=sampler)


@dataclass
class CaseData:
    """Inputs shared by every package: one batch, the predict loaders and the BatchNorm loader."""

    x_one: Tensor
    predict_x: Tensor
    predict_batch_size: int
    bn_x: Tensor | None

    def tensor_loader(self) -> DataLoader:
        """Batches that are plain tensors (what ``predict_step(X)`` of the Lightning peers takes)."""
        return _batched_loader(self.predict_x, self.predict_batch_size)  # type: ignore[arg-type]

    def pair_loader(self, x: Tensor, batch_size: int) -> DataLoader:
        """``(input, target)`` batches (what swa-gaussian's ``utils.predict``/``bn_update`` unpack)."""
        return _batched_loader(TensorDataset(x, torch.zeros(len(x), dtype=torch.long)), batch_size)

    def bn_loader(self, batch_size: int) -> DataLoader | None:
        return None if self.bn_x is None else self.pair_loader(self.bn_x, batch_size)


def make_case_data(case: SpeedCase, seed: int) -> CaseData:
    gen = torch.Generator().manual_seed(seed)
    x_one = torch.randn(case.batch_size, *case.input_shape, generator=gen)
    predict_x = torch.randn(case.predict_batches * case.predict_batch_size, *case.input_shape, generator=gen)
    bn_x = (
        torch.randn(case.bn_batches * case.bn_batch_size, *case.input_shape, generator=gen)
        if case.bn_refresh
        else None
    )
    return CaseData(x_one, predict_x, case.predict_batch_size, bn_x)


def snapshot_stream(model: nn.Module, n: int, seed: int, rel_step: float = 1e-3) -> Iterator[Tensor]:
    """``n`` flat snapshots: a random walk around ``model``'s weights, generated one at a time."""
    gen = torch.Generator().manual_seed(seed)
    theta = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    step = rel_step * theta.abs().mean()
    for _ in range(n):
        theta = theta + step * torch.randn(theta.shape, generator=gen)
        yield theta


class Runner:
    """One package's prediction path for one case. ``prepare_*`` returns the callable that is timed."""

    package: str

    def feed(self, theta: Tensor) -> None:
        """Add one flat snapshot through the package's own collection code."""
        raise NotImplementedError

    def finish_feeding(self) -> None:
        """Called once after the last snapshot."""

    def prepare_one_batch(self, data: CaseData, seed: int) -> Callable[[], Tensor] | None:
        raise NotImplementedError

    def prepare_predict(self, data: CaseData, seed: int) -> Callable[[], list[Tensor]] | None:
        raise NotImplementedError


def _bma_probs(logits: Tensor, num_samples: int) -> Tensor:
    """Mean softmax of stacked ``[(S·B), C]`` logits (torch-uncertainty's ensemble layout)."""
    return logits.reshape(num_samples, -1, logits.shape[-1]).softmax(dim=-1).mean(dim=0)


class LightningSwagRunner(Runner):
    package = OURS

    def __init__(self, model: nn.Module, case: SpeedCase, module_kwargs: dict[str, Any]) -> None:
        self.model = copy.deepcopy(model).eval()
        self.case = case
        self.kwargs = module_kwargs
        self.posterior = SWAGPosterior.from_model(self.model, max_rank=case.max_rank)
        self.scratch = copy.deepcopy(model)

    def feed(self, theta: Tensor) -> None:
        load_flat(self.scratch, theta)
        self.posterior.collect(self.scratch)

    def _module(self, data: CaseData, seed: int) -> SWAGModule:
        bn_loader = data.bn_loader(self.case.bn_batch_size) if self.case.bn_refresh else None
        with _quiet():  # the no-refresh ResNet row warns about stale BatchNorm statistics
            return SWAGModule(
                self.model,
                self.posterior,
                num_samples=self.case.num_samples,
                scale=SCALE,
                task="classification",
                seed=seed,
                bn_loader=bn_loader,
                **self.kwargs,
            )

    def prepare_one_batch(self, data: CaseData, seed: int) -> Callable[[], Tensor]:
        module = self._module(data, seed)
        return lambda: module(data.x_one)["mean"]

    def prepare_predict(self, data: CaseData, seed: int) -> Callable[[], list[Tensor]]:
        module = self._module(data, seed)
        trainer = L.Trainer(**QUIET_TRAINER)
        loader = data.tensor_loader()
        return lambda: [b["mean"] for b in trainer.predict(module, dataloaders=loader)]


class SwaGaussianRunner(Runner):
    package = SWA_GAUSSIAN

    def __init__(self, model: nn.Module, case: SpeedCase) -> None:
        from swag.posteriors import SWAG

        self.case = case
        self.swag = SWAG(lambda: copy.deepcopy(model), no_cov_mat=False, max_num_models=case.max_rank)
        self.scratch = copy.deepcopy(model)

    def feed(self, theta: Tensor) -> None:
        load_flat(self.scratch, theta)
        self.swag.collect_model(self.scratch)

    def _predict(self, loader: DataLoader, bn_loader: DataLoader | None) -> Tensor:
        from swag import utils

        total: Tensor | None = None
        for _ in range(self.case.num_samples):
            self.swag.sample(scale=SCALE, cov=True)
            if bn_loader is not None:
                utils.bn_update(bn_loader, self.swag, device="cpu")
            probs = torch.from_numpy(utils.predict(loader, self.swag, device="cpu")["predictions"])
            total = probs if total is None else total + probs
        assert total is not None
        return total / self.case.num_samples

    def _bn(self, data: CaseData) -> DataLoader | None:
        return data.bn_loader(self.case.bn_batch_size) if self.case.bn_refresh else None

    def prepare_one_batch(self, data: CaseData, seed: int) -> Callable[[], Tensor]:
        loader = data.pair_loader(data.x_one, len(data.x_one))
        bn = self._bn(data)
        return lambda: self._predict(loader, bn)

    def prepare_predict(self, data: CaseData, seed: int) -> Callable[[], list[Tensor]]:
        loader = data.pair_loader(data.predict_x, data.predict_batch_size)
        bn = self._bn(data)
        return lambda: [self._predict(loader, bn)]


class TorchUncertaintyRunner(Runner):
    package = TORCH_UNCERTAINTY

    def __init__(self, model: nn.Module, case: SpeedCase) -> None:
        from torch_uncertainty.methods import SWAG
        from torch_uncertainty.routines import ClassificationRoutine

        self.case = case
        core = copy.deepcopy(model).eval()
        # Every update draws num_estimators models; none while the snapshots are fed (set after).
        self.swag = SWAG(
            core, cycle_start=0, cycle_length=1, scale=SCALE, max_num_models=case.max_rank, num_estimators=0
        )
        self.epoch = 0
        with _quiet():
            self.routine = ClassificationRoutine(
                model=self.swag, num_classes=10, loss=nn.CrossEntropyLoss(), is_ensemble=True
            )

    def feed(self, theta: Tensor) -> None:
        load_flat(self.swag.core_model, theta)
        self.epoch += 1
        self.swag.update_wrapper(self.epoch)

    def finish_feeding(self) -> None:
        self.swag.num_estimators = self.case.num_samples

    def _draw(self, data: CaseData) -> None:
        """Restore the posterior (draws ``num_estimators`` models), then refresh BatchNorm if asked."""
        self.swag.load_state_dict(self.swag.state_dict())
        if self.case.bn_refresh:
            self.swag.bn_update(data.bn_loader(self.case.bn_batch_size), device="cpu")

    def prepare_one_batch(self, data: CaseData, seed: int) -> Callable[[], Tensor]:
        def run() -> Tensor:
            self._draw(data)
            self.swag.eval()
            with torch.no_grad():
                return _bma_probs(self.swag(data.x_one), self.case.num_samples)

        return run

    def prepare_predict(self, data: CaseData, seed: int) -> Callable[[], list[Tensor]]:
        trainer = L.Trainer(**QUIET_TRAINER)
        loader = data.tensor_loader()

        def run() -> list[Tensor]:
            self._draw(data)
            outputs = trainer.predict(self.routine, dataloaders=loader)
            return [_bma_probs(logits, self.case.num_samples) for logits in outputs]

        return run


class UQBoxRunner(Runner):
    package = UQ_BOX

    def __init__(self, model: nn.Module, case: SpeedCase) -> None:
        from lightning_uq_box.uq_methods import SWAGClassification

        self.case = case
        with _quiet():
            self.uq = SWAGClassification(
                copy.deepcopy(model),
                max_swag_snapshots=case.max_rank,
                snapshot_freq=1,
                num_mc_samples=case.num_samples,
                swag_lr=0.01,
                loss_fn=nn.CrossEntropyLoss(),
            )

    def feed(self, theta: Tensor) -> None:
        load_flat(self.uq.model, theta)
        self.uq.update_uncertainty_buffers()

    def finish_feeding(self) -> None:
        self.uq.swag_fitted = True  # what its on_train_end sets after fit
        self.uq.eval()

    def prepare_one_batch(self, data: CaseData, seed: int) -> Callable[[], Tensor] | None:
        if self.case.bn_refresh:
            return None

        def run() -> Tensor:
            with torch.no_grad():
                return self.uq.predict_step(data.x_one)["pred"]

        return run

    def prepare_predict(self, data: CaseData, seed: int) -> Callable[[], list[Tensor]] | None:
        if self.case.bn_refresh:
            return None
        trainer = L.Trainer(**QUIET_TRAINER)
        loader = data.tensor_loader()
        return lambda: [b["pred"] for b in trainer.predict(self.uq, dataloaders=loader)]


class PlainLoopRunner(Runner):
    """The hand-written baseline: sample, load, forward, one weight sample at a time."""

    package = PLAIN

    def __init__(self, model: nn.Module, case: SpeedCase) -> None:
        self.model = copy.deepcopy(model).eval()
        self.case = case
        self.posterior = SWAGPosterior.from_model(self.model, max_rank=case.max_rank)

    def feed(self, theta: Tensor) -> None:
        load_flat(self.model, theta)
        self.posterior.collect(self.model)

    def _bma(self, data: CaseData, batches: Sequence[Tensor], seed: int) -> list[Tensor]:
        samples = self.posterior.sample(self.case.num_samples, scale=SCALE, seed=seed, dtype=torch.float32)
        totals: list[Tensor] = []
        with torch.no_grad():
            for theta in samples:
                load_flat(self.model, theta)
                if self.case.bn_refresh:
                    torch.optim.swa_utils.update_bn(data.bn_loader(self.case.bn_batch_size), self.model)
                self.model.eval()
                probs = [self.model(x).softmax(dim=-1) for x in batches]
                totals = probs if not totals else [t + p for t, p in zip(totals, probs, strict=True)]
        return [t / len(samples) for t in totals]

    def prepare_one_batch(self, data: CaseData, seed: int) -> Callable[[], Tensor]:
        return lambda: self._bma(data, [data.x_one], seed)[0]

    def prepare_predict(self, data: CaseData, seed: int) -> Callable[[], list[Tensor]]:
        return lambda: self._bma(data, list(data.tensor_loader()), seed)


NO_EQUIVALENT = {
    (UQ_BOX, "bn"): "lightning-uq-box's SWAG has no BatchNorm refresh",
}


def make_runners(
    model: nn.Module, case: SpeedCase, packages: Sequence[str], module_kwargs: dict[str, Any]
) -> dict[str, Runner]:
    """Build every package's runner and feed all of them the same snapshots."""
    runners: dict[str, Runner] = {}
    with _quiet():
        for package in packages:
            if package == OURS:
                runners[package] = LightningSwagRunner(model, case, module_kwargs)
            elif package == SWA_GAUSSIAN:
                runners[package] = SwaGaussianRunner(model, case)
            elif package == TORCH_UNCERTAINTY:
                runners[package] = TorchUncertaintyRunner(model, case)
            elif package == UQ_BOX:
                runners[package] = UQBoxRunner(model, case)
            elif package == PLAIN:
                runners[package] = PlainLoopRunner(model, case)
        for theta in snapshot_stream(model, case.num_snapshots, seed=1):
            for runner in runners.values():
                runner.feed(theta)
        for runner in runners.values():
            runner.finish_feeding()
    return runners


def _time(fn: Callable[[], Any]) -> tuple[float, Any]:
    gc.collect()
    start = time.perf_counter()
    with _quiet():
        out = fn()
    return time.perf_counter() - start, out


def _check_probs(out: Tensor | list[Tensor], package: str, case: str) -> None:
    tensors = out if isinstance(out, list) else [out]
    for t in tensors:
        sums = torch.as_tensor(t).double().sum(dim=-1)
        if not torch.allclose(sums, torch.ones_like(sums), atol=1e-3):
            raise AssertionError(f"{package} on {case}: BMA probabilities do not sum to 1.")


# ====================================================================== collection during fit
class _LitClassifier(L.LightningModule):
    """A plain LightningModule around ``net`` (cross-entropy, SGD), for lightning-swag's fit."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


class _DictData(torch.utils.data.Dataset):
    """``{"input", "target"}`` items, lightning-uq-box's batch layout."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"input": self.x[i], "target": self.y[i]}


def fit_seconds(
    package: str,
    build: Callable[[], nn.Module],
    x: Tensor,
    y: Tensor,
    epochs: int,
    collect: bool,
    max_rank: int,
    num_samples: int,
) -> tuple[float, int]:
    """Wall time of one fit (``epochs`` epochs of one batch), with or without the SWAG machinery,
    and the number of snapshots collected.

    * lightning-swag: a plain LightningModule, ``SWAGCallback(start_epoch=0)`` or no callback.
    * swa-gaussian: its ``utils.train_epoch`` loop, with ``SWAG.collect_model`` after every epoch
      or without.
    * torch-uncertainty: ``ClassificationRoutine`` around its ``SWAG`` wrapper (which updates in
      ``on_validation_start`` from epoch 1 on, draws ``num_estimators`` models at every update
      and refreshes their BatchNorm statistics), or around the bare model; both validate on one
      image per epoch.
    * lightning-uq-box: ``SWAGClassification`` with ``snapshot_freq=1`` (a snapshot every step),
      or ``snapshot_freq`` past the last step (only its step-0 snapshot).
    """
    torch.manual_seed(0)
    net = build()
    loader = DataLoader(TensorDataset(x, y), batch_size=len(x))
    val_loader = DataLoader(TensorDataset(x[:1], y[:1]), batch_size=1)
    trainer_kwargs = {**QUIET_TRAINER, "max_epochs": epochs, "num_sanity_val_steps": 0}
    start = time.perf_counter()
    with _quiet():
        if package == OURS:
            callbacks = [SWAGCallback(start_epoch=0, every_n_epochs=1, max_rank=max_rank)] if collect else []
            trainer = L.Trainer(**trainer_kwargs, callbacks=callbacks)
            trainer.fit(_LitClassifier(net), train_dataloaders=loader)
            snapshots = callbacks[0].posterior.num_snapshots if collect else 0
        elif package == SWA_GAUSSIAN:
            from swag import losses, utils
            from swag.posteriors import SWAG

            swag_model = (
                SWAG(lambda: copy.deepcopy(net), no_cov_mat=False, max_num_models=max_rank)
                if collect
                else None
            )
            optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
            for _ in range(epochs):
                utils.train_epoch(loader, net, losses.cross_entropy, optimizer, device="cpu")
                if swag_model is not None:
                    swag_model.collect_model(net)
            snapshots = int(swag_model.n_models.item()) if swag_model is not None else 0
        elif package == TORCH_UNCERTAINTY:
            from torch_uncertainty.methods import SWAG
            from torch_uncertainty.routines import ClassificationRoutine

            model: nn.Module = net
            if collect:
                model = SWAG(
                    net,
                    cycle_start=0,
                    cycle_length=1,
                    scale=SCALE,
                    max_num_models=max_rank,
                    num_estimators=num_samples,
                )
            routine = ClassificationRoutine(
                model=model,
                num_classes=10,
                loss=nn.CrossEntropyLoss(),
                is_ensemble=collect,
                optim_recipe=torch.optim.SGD(model.parameters(), lr=0.01),
            )
            trainer = L.Trainer(**trainer_kwargs)
            trainer.fit(routine, train_dataloaders=loader, val_dataloaders=val_loader)
            snapshots = int(model.num_avgd_models) if collect else 0
        elif package == UQ_BOX:
            from lightning_uq_box.uq_methods import SWAGClassification

            uq = SWAGClassification(
                net,
                max_swag_snapshots=max_rank,
                snapshot_freq=1 if collect else 10**9,
                num_mc_samples=num_samples,
                swag_lr=0.01,
                loss_fn=nn.CrossEntropyLoss(),
            )
            dict_loader = DataLoader(_DictData(x, y), batch_size=len(x))
            trainer = L.Trainer(**trainer_kwargs)
            trainer.fit(uq, train_dataloaders=dict_loader)
            snapshots = uq.num_tracked
        else:
            raise ValueError(f"unknown package {package!r}")
    return time.perf_counter() - start, snapshots


def collection_seconds(
    package: str,
    build: Callable[[], nn.Module],
    x: Tensor,
    y: Tensor,
    epochs: int,
    max_rank: int,
    num_samples: int,
    per: int = 30,
) -> float:
    """Extra fit time of the SWAG machinery, per ``per`` snapshots: ``(t_with − t_without) / Δn · per``."""
    t_with, n_with = fit_seconds(package, build, x, y, epochs, True, max_rank, num_samples)
    t_without, n_without = fit_seconds(package, build, x, y, epochs, False, max_rank, num_samples)
    extra = n_with - n_without
    if extra <= 0:
        raise RuntimeError(f"{package}: the fit with SWAG collected no snapshots ({n_with} vs {n_without}).")
    return (t_with - t_without) / extra * per


# ====================================================================== speed: driver
@dataclass
class SpeedResult:
    case: str
    mode: str
    threads: int
    times: dict[str, list[float]] = field(default_factory=dict)


def _rotated(items: Sequence[str], shift: int) -> list[str]:
    shift %= max(len(items), 1)
    return list(items[shift:]) + list(items[:shift])


def run_speed(
    packages: Sequence[str],
    cases: Sequence[str],
    threads: Sequence[int],
    repeats: int,
    quick: bool,
    image_size: int,
    module_kwargs: dict[str, Any],
    warmup: int = 1,
    log: Callable[[str], None] = print,
) -> list[SpeedResult]:
    """Interleaved timings: for every case, ``repeats`` rounds over thread counts, rows and packages."""
    all_cases = speed_cases(quick, image_size)
    results: list[SpeedResult] = []
    for key in cases:
        if key == "collect":
            results.extend(_run_collection(packages, threads, repeats, quick, image_size, log))
            continue
        case = all_cases[key]
        torch.manual_seed(0)
        model = case.build().eval()
        data = make_case_data(case, seed=0)
        log(f"  {case.title}: feeding {case.num_snapshots} snapshots to {len(packages)} packages ...")
        runners = make_runners(model, case, packages, module_kwargs)
        table = {(mode, t): SpeedResult(case.title, mode, t) for mode in ("one", "predict") for t in threads}
        torch.set_num_threads(threads[0])
        for _ in range(warmup):  # untimed: first calls pay for lazy initialisation
            for runner in runners.values():
                with _quiet():
                    fn = runner.prepare_one_batch(data, seed=0)
                if fn is not None:
                    _time(fn)
        for rep in range(repeats):
            for t in threads:
                torch.set_num_threads(t)
                for mode in ("one", "predict"):
                    for package in _rotated(list(runners), rep):
                        runner = runners[package]
                        prepare = runner.prepare_one_batch if mode == "one" else runner.prepare_predict
                        with _quiet():
                            fn = prepare(data, seed=rep)
                        if fn is None:
                            continue
                        seconds, out = _time(fn)
                        _check_probs(out, package, case.title)
                        table[(mode, t)].times.setdefault(package, []).append(seconds)
            log(f"    repetition {rep + 1}/{repeats} done")
        results.extend(table.values())
        del runners
        gc.collect()
    return results


def _run_collection(
    packages: Sequence[str],
    threads: Sequence[int],
    repeats: int,
    quick: bool,
    image_size: int,
    log: Callable[[str], None],
) -> list[SpeedResult]:
    epochs, batch, max_rank, num_samples = (4, 4, 2, 2) if quick else (31, 4, 20, 10)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, image_size, image_size, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    title = f"collecting 30 ResNet-18 snapshots during fit (per 30; {epochs} epochs of {batch} images)"
    table = {t: SpeedResult(title, "collect", t) for t in threads}
    log(f"  {title} ...")
    for rep in range(repeats):
        for t in threads:
            torch.set_num_threads(t)
            for package in _rotated([p for p in packages if p != PLAIN], rep):  # nothing to collect
                seconds = collection_seconds(package, resnet18, x, y, epochs, max_rank, num_samples)
                table[t].times.setdefault(package, []).append(seconds)
        log(f"    repetition {rep + 1}/{repeats} done")
    return list(table.values())


MODE_TITLES = {"one": "one batch", "predict": "trainer.predict", "collect": "fit"}


def format_speed(results: list[SpeedResult], missing: dict[str, str]) -> str:
    """Markdown table: median seconds per package, then the fastest peer's and the plain loop's time
    over lightning-swag's."""
    lines = [
        "| case | path | threads | "
        + " | ".join(SPEED_COLUMNS)
        + " | fastest peer / lightning-swag | plain loop / lightning-swag |",
        "|" + "---|" * (5 + len(SPEED_COLUMNS)),
    ]
    for r in results:
        medians = {p: statistics.median(ts) for p, ts in r.times.items() if ts}
        cells = []
        for p in SPEED_COLUMNS:
            if p in medians:
                cells.append(f"{medians[p]:.3g} s")
            else:
                cells.append(DASH)
        ours = medians.get(OURS, 0.0)
        peers = [medians[p] for p in PEERS if p in medians]
        ratios = [
            f"{theirs / ours:.2f}×" if theirs is not None and ours > 0 else DASH
            for theirs in (min(peers) if peers else None, medians.get(PLAIN))
        ]
        lines.append(
            f"| {r.case} | {MODE_TITLES[r.mode]} | {r.threads} | " + " | ".join(cells + ratios) + " |"
        )
    return "\n".join(lines)


SPEED_NOTES = (
    "one batch: each package's direct call on it (lightning-swag `module(x)`, torch-uncertainty"
    " `load_state_dict` + eval forward, lightning-uq-box `predict_step`, swa-gaussian its"
    " sample/`utils.predict` loop), sampling included.",
    "trainer.predict: over the predict batches (swa-gaussian has no Trainer: `utils.predict` per"
    " sample over the same batches); lightning-uq-box redraws its samples for every batch.",
    "plain loop: not a package; float32 samples of lightning-swag's posterior, each loaded with"
    " `vector_to_parameters` (+ `update_bn` in the BatchNorm rows) and run over the batches in eval mode.",
    "fit: extra wall time of fit with the package's SWAG machinery over the same fit without it,"
    " per 30 snapshots; torch-uncertainty's includes drawing its ensemble (and refreshing its"
    " BatchNorm statistics) at every update, which it does during fit.",
)


# ====================================================================== main
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts (default 1,2)")
    parser.add_argument(
        "--repeats", type=int, default=3, help="interleaved repetitions per row (medians reported)"
    )
    parser.add_argument(
        "--warmup", type=int, default=1, help="untimed one-batch rounds per case before timing"
    )
    parser.add_argument("--only", choices=("correctness", "speed"), help="run one of the two tables")
    parser.add_argument(
        "--cases",
        default="mlp,resnet18,resnet18_bn,transformer,convnet,collect",
        help="speed rows to run (default: all): mlp,resnet18,resnet18_bn,transformer,convnet,collect",
    )
    parser.add_argument(
        "--packages",
        default=",".join(SPEED_COLUMNS),
        help="packages to run (default: all installed, and the plain loop in the speed table)",
    )
    parser.add_argument(
        "--corr-samples",
        type=int,
        help="samples for the covariance check (default 100000; 20000 with --quick)",
    )
    parser.add_argument(
        "--image-size", type=int, default=32, help="ResNet-18 input size (default 32: 3×32×32 images)"
    )
    parser.add_argument(
        "--vectorize",
        default="default",
        help="SWAGModule's vectorize argument: true/false, or a mode name such as vmap/loop/auto "
        "(default: leave SWAGModule's own choice)",
    )
    parser.add_argument("--json", help="also write every measurement to this JSON file")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    try:
        args.thread_list = [int(t) for t in args.threads.split(",") if t.strip()]
    except ValueError:
        parser.error(f"--threads must be comma-separated integers, got {args.threads!r}")
    if not args.thread_list or min(args.thread_list) < 1:
        parser.error("--threads needs at least one count >= 1")
    args.case_list = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = set(args.case_list) - {"mlp", "resnet18", "resnet18_bn", "transformer", "convnet", "collect"}
    if unknown:
        parser.error(f"unknown --cases {sorted(unknown)}")
    args.package_list = [p.strip() for p in args.packages.split(",") if p.strip()]
    if set(args.package_list) - set(SPEED_COLUMNS):
        parser.error(
            f"unknown --packages {sorted(set(args.package_list) - set(SPEED_COLUMNS))}; "
            f"choose from {SPEED_COLUMNS}"
        )
    if args.corr_samples is None:
        args.corr_samples = 20_000 if args.quick else 100_000
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the tables asked for, print them (Markdown) and return every measurement."""
    args = parse_args(argv)
    threads_before = torch.get_num_threads()
    with _quiet_loggers():
        try:
            return _run(args, argv)
        finally:
            torch.set_num_threads(threads_before)


def _run(args: argparse.Namespace, argv: Sequence[str] | None) -> dict[str, Any]:
    versions, missing = peer_versions()
    packages = [p for p in args.package_list if p not in missing]
    module_kwargs: dict[str, Any] = {}
    if args.vectorize != "default":
        choice = args.vectorize.lower()
        module_kwargs["vectorize"] = {"true": True, "false": False}.get(choice, choice)

    machine = machine_description()
    print(f"machine: {machine}")
    print("peers: " + ", ".join(f"{p} {v or '(not installed)'}" for p, v in versions.items()))
    shown = list(argv) if argv is not None else sys.argv[1:]
    print(f"command: python benchmarks/peers.py {' '.join(shown)}".rstrip())
    report: dict[str, Any] = {
        "machine": machine,
        "versions": versions,
        "missing": missing,
        "args": vars(args),
    }

    if args.only in (None, "correctness"):
        print(
            f"\n## Correctness against the formula (scale {SCALE}, {args.corr_samples} samples per package)\n"
        )
        rows = run_correctness([p for p in packages if p != PLAIN], args.corr_samples)
        print(format_correctness(rows, missing))
        print()
        for package, note in {r["package"]: r["note"] for r in rows if r["note"]}.items():
            print(f"* {package}: {note}")
        report["correctness"] = rows

    if args.only in (None, "speed"):
        print(f"\n## Speed (median of {args.repeats}, seconds; threads {args.threads})\n")
        results = run_speed(
            packages,
            args.case_list,
            args.thread_list,
            args.repeats,
            args.quick,
            args.image_size,
            module_kwargs,
            args.warmup,
        )
        print()
        print(format_speed(results, missing))
        print()
        for note in SPEED_NOTES:
            print(f"* {note}")
        for (package, _), reason in NO_EQUIVALENT.items():
            if package in packages:
                print(f"* {DASH} for {package} in the BatchNorm-refresh rows: {reason}.")
        report["speed"] = [
            {"case": r.case, "mode": r.mode, "threads": r.threads, "times": r.times} for r in results
        ]

    for package, reason in missing.items():
        print(f"* {DASH} for {package}: {reason}.")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)
        print(f"\nwrote {args.json}")
    return report


if __name__ == "__main__":
    main()
