"""The linearised predictive (lightning_swag.predictive.linearized) against closed forms computed here,
from the posterior's own mean, variance and deviations, and against finite differences and Monte Carlo."""

from __future__ import annotations

import copy
import math

import lightning as L
import numpy as np
import pytest
import torch
from conftest import QUIET
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_swag import SWAGModule, SWAGPosterior
from lightning_swag.posterior.noise import derive_seed
from lightning_swag.posterior.sharding import DDPSliceLayout
from lightning_swag.predictive import linearized as linearized_module

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\)"),  # Lightning on this torch
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),  # transformers
    pytest.mark.filterwarnings("ignore:There is a performance drop.*batching rule"),  # torch.func fallbacks
]


class Net(nn.Module):
    """An MLP body and a head (a linear layer unless given)."""

    def __init__(self, outputs: int = 3, head: nn.Module | None = None) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.Tanh())
        self.head = head if head is not None else nn.Linear(8, outputs)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


class OffsetNet(Net):
    """Takes a second argument that is not batched (an offset of the features)."""

    def forward(self, x: Tensor, offset: Tensor) -> Tensor:  # type: ignore[override]
        return self.head(self.body(x) + offset)


def walk_posterior(
    net: nn.Module, seed: int = 0, snapshots: int = 6, max_rank: int = 4, step: float = 0.3
) -> SWAGPosterior:
    """A posterior over ``head.*`` from a seeded random walk of the head's weights."""
    dtype = next(net.parameters()).dtype
    post = SWAGPosterior.from_model(net, max_rank=max_rank, include=["head.*"], deviation_dtype=dtype)
    walker = copy.deepcopy(net)
    g = torch.Generator().manual_seed(seed)
    for _ in range(snapshots):
        with torch.no_grad():
            for p in walker.head.parameters():
                p.add_(step * torch.randn(p.shape, generator=g, dtype=p.dtype))
        post.collect(walker)
    return post


def pieces(post: SWAGPosterior, flat: Tensor) -> dict[str, Tensor]:
    """``flat [..., P]`` cut by the posterior's parameter shapes, in order (independently of unflatten)."""
    out, start = {}, 0
    for name, shape in post.param_shapes.items():
        count = math.prod(shape)
        out[name.removeprefix("head.")] = flat[..., start : start + count].reshape(*flat.shape[:-1], *shape)
        start += count
    return out


def linear_head_gaussian(
    net: Net, post: SWAGPosterior, x: Tensor, scale: float, low_rank: bool = True
) -> tuple[Tensor, Tensor]:
    """The closed form for a linear head, in float64: mean and per-element variance of the outputs."""
    with torch.no_grad():
        phi = net.body(x).double()
    mean = pieces(post, post.mean.double())
    var = pieces(post, post.variance.double())
    mu = phi @ mean["weight"].T + mean["bias"]
    diag = phi.square() @ var["weight"].T + var["bias"]
    k = post.rank
    if low_rank and k >= 2:
        rows = pieces(post, post.deviations.double())
        columns = torch.einsum("bf,kcf->kbc", phi, rows["weight"]) + rows["bias"][:, None, :]
        diag = diag + columns.square().sum(dim=0) / (k - 1)
    return mu, scale * diag


def linearized(net: nn.Module, post, task: str, **kwargs) -> SWAGModule:
    return SWAGModule(net, post, task=task, predictive="linearized", seed=0, **kwargs)


@pytest.mark.parametrize("covariance", ["low_rank", "diagonal"])
@pytest.mark.parametrize("scale", [0.5, 2.0])
def test_regression_with_a_linear_head_is_the_closed_form(
    covariance: str, scale: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    if scale == 2.0:  # one deviation row of columns at a time
        monkeypatch.setattr(linearized_module, "COLUMN_BYTES", 1)
    torch.manual_seed(0)
    net = Net()
    post = walk_posterior(net)
    x = torch.randn(11, 6)
    mu, var = linear_head_gaussian(net, post, x, scale, low_rank=covariance == "low_rank")
    bma = linearized(net, post, "regression", scale=scale, covariance=covariance)
    out = bma(x)
    assert bma.execution_plan is not None and bma.execution_plan.split == "head"
    torch.testing.assert_close(out["mean"].double(), mu, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["std"].double(), var.sqrt(), atol=1e-5, rtol=1e-4)
    full = linearized(net, post, "regression", scale=scale, covariance=covariance, split_forward=False)(x)
    torch.testing.assert_close(full["std"].double(), var.sqrt(), atol=1e-5, rtol=1e-4)  # jacrev + jvp


def test_the_linear_head_closed_form_matches_monte_carlo_over_weight_samples() -> None:
    torch.manual_seed(19)
    net = Net(outputs=3)
    post = walk_posterior(net)
    x = torch.randn(8, 6)
    mu, var = linear_head_gaussian(net, post, x, 0.5)
    with torch.no_grad():
        phi = net.body(x).double()
    samples = pieces(post, post.sample(20_000, 0.5, seed=3, dtype=torch.float64))
    outputs = torch.einsum("bf,scf->sbc", phi, samples["weight"]) + samples["bias"][:, None, :]
    # within 6 standard errors of 20,000 draws: sqrt(2/S) relative for the variance, sqrt(var/S) for the mean
    assert ((outputs.var(0) / var - 1).abs() < 6 * math.sqrt(2 / 20_000)).all()
    assert ((outputs.mean(0) - mu).abs() < 6 * (var / 20_000).sqrt()).all()
    out = linearized(net, post, "regression")(x)
    torch.testing.assert_close(out["std"].double(), var.sqrt(), atol=1e-5, rtol=1e-4)


def test_regression_noise_models_add_their_variance() -> None:
    torch.manual_seed(1)
    net = Net(outputs=1)
    post = walk_posterior(net)
    x = torch.randn(9, 6)
    mu, var = linear_head_gaussian(net, post, x, 0.5)
    out = linearized(net, post, "regression", noise=0.3)(x)
    torch.testing.assert_close(out["mean"].double(), mu, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["epistemic_std"].double(), var.sqrt(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out["std"].double(), (var + 0.09).sqrt(), atol=1e-5, rtol=1e-4)
    assert out["samples"].shape == (1, 9, 1) and out["sample_variances"].shape == (1, 9, 1)

    hetero = Net(outputs=2)  # (mean, log-variance)
    post = walk_posterior(hetero)
    mu, var = linear_head_gaussian(hetero, post, x, 0.5)
    out = linearized(hetero, post, "regression", noise="heteroscedastic")(x)
    torch.testing.assert_close(out["mean"].double(), mu[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["epistemic_std"].double(), var[:, 0].sqrt(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out["aleatoric_std"].double(), mu[:, 1].exp().sqrt(), atol=1e-5, rtol=1e-4)


def test_classification_probit_is_the_closed_form() -> None:
    torch.manual_seed(2)
    net = Net(outputs=4)
    post = walk_posterior(net)
    x = torch.randn(10, 6)
    mu, var = linear_head_gaussian(net, post, x, 0.5)
    out = linearized(net, post, "classification")(x)
    expected = torch.softmax(mu / (1 + math.pi / 8 * var).sqrt(), dim=-1)
    torch.testing.assert_close(out["mean"].double(), expected, atol=1e-6, rtol=1e-5)
    entropy = -(expected * expected.log()).sum(-1)
    torch.testing.assert_close(out["entropy"].double(), entropy, atol=1e-5, rtol=1e-5)

    binary = Net(outputs=1)
    post = walk_posterior(binary)
    mu, var = linear_head_gaussian(binary, post, x, 0.5)
    out = linearized(binary, post, "binary")(x)
    torch.testing.assert_close(
        out["mean"].double(), torch.sigmoid(mu / (1 + math.pi / 8 * var).sqrt()), atol=1e-6, rtol=1e-5
    )


def fd_jacobian(net: nn.Module, post: SWAGPosterior, call, h: float = 1e-6) -> tuple[Tensor, Tensor]:
    """``f(θ̄)`` ``[B, O]`` and the central-difference Jacobian ``[B, O, P]`` of ``call(model)`` with respect
    to the posterior's weights (in the posterior's order, float64), on a copy of ``net``."""
    model = copy.deepcopy(net).eval()
    theta = post.mean.double()

    def outputs(flat: Tensor) -> Tensor:
        with torch.no_grad():
            start = 0
            for name, shape in post.param_shapes.items():
                count = math.prod(shape)
                model.get_parameter(name).copy_(flat[start : start + count].reshape(shape))
                start += count
            out = call(model).double()
            return out.reshape(out.shape[0], -1)

    columns = []
    for p in range(theta.numel()):
        step = torch.zeros_like(theta)
        step[p] = h
        columns.append((outputs(theta + step) - outputs(theta - step)) / (2 * h))
    return outputs(theta), torch.stack(columns, dim=-1)


def jacobian_variance(post: SWAGPosterior, jac: Tensor, scale: float) -> Tensor:
    """The linearised variance ``scale · (J diag(var) Jᵀ + (J D̂ᵀ)² / (k − 1))`` per output element."""
    var = (jac.square() * post.variance.double()).sum(-1)
    return scale * (var + (jac @ post.deviations.double().T).square().sum(-1) / (post.rank - 1))


def finite_difference_gaussian(net: Net, post: SWAGPosterior, inputs: tuple, scale: float, h: float = 1e-6):
    """Mean and variance of the linearised outputs from a central-difference Jacobian of the whole model
    with respect to the tracked weights (float64)."""
    mean, jac = fd_jacobian(net, post, lambda m: m(*inputs), h)
    return mean, jacobian_variance(post, jac, scale)


def _mlp_head() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, 3))


@pytest.mark.parametrize("split_forward", [True, False])
@pytest.mark.parametrize("tiny_chunks", [False, True])
def test_nonlinear_head_matches_finite_differences(
    split_forward: bool, tiny_chunks: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if tiny_chunks:  # one example's Jacobian at a time
        monkeypatch.setattr(linearized_module, "JACOBIAN_BYTES", 1)
    torch.manual_seed(4)
    net = Net(head=_mlp_head()).double()
    post = walk_posterior(net)
    x = torch.randn(7, 6, dtype=torch.float64)
    mu, var = finite_difference_gaussian(net, post, (x,), 0.5)
    bma = linearized(net, post, "regression", split_forward=split_forward)
    out = bma(x)
    assert bma.execution_plan is not None
    assert bma.execution_plan.split == ("head" if split_forward else None)
    torch.testing.assert_close(out["mean"], mu, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(out["std"], var.sqrt(), atol=1e-7, rtol=1e-6)
    probs = linearized(net, post, "classification", split_forward=split_forward)(x)["mean"]
    torch.testing.assert_close(
        probs, torch.softmax(mu / (1 + math.pi / 8 * var).sqrt(), -1), atol=1e-7, rtol=1e-6
    )


def test_nonlinear_head_with_an_unbatched_argument() -> None:
    torch.manual_seed(5)
    net = OffsetNet(head=_mlp_head()).double()
    post = walk_posterior(net)
    x, offset = torch.randn(7, 6, dtype=torch.float64), torch.randn(8, dtype=torch.float64)  # not [B, ...]
    mu, var = finite_difference_gaussian(net, post, (x, offset), 0.5)
    for split_forward in (True, False):
        out = linearized(net, post, "regression", split_forward=split_forward)((x, offset))
        torch.testing.assert_close(out["mean"], mu, atol=1e-9, rtol=1e-9)
        torch.testing.assert_close(out["std"], var.sqrt(), atol=1e-7, rtol=1e-6)


def test_nonlinear_head_small_scale_matches_monte_carlo() -> None:
    torch.manual_seed(6)
    net = Net(head=_mlp_head())
    post = walk_posterior(net)
    x = torch.randn(5, 6)
    scale = 1e-4  # where the linearisation is accurate
    lin = linearized(net, post, "regression", scale=scale)(x)
    mc = SWAGModule(net, post, task="regression", scale=scale, num_samples=4000, seed=0)(x)
    torch.testing.assert_close(lin["mean"], mc["mean"], atol=2e-3, rtol=0)
    ratio = lin["std"] / mc["std"]
    assert ((ratio - 1).abs() < 0.1).all(), ratio  # 4000 samples: the std is within a few % of exact


def test_multiswag_is_a_mixture_of_the_gaussians() -> None:
    torch.manual_seed(7)
    net = Net(outputs=4)
    posts = [walk_posterior(net, seed=s) for s in (0, 1)]
    x = torch.randn(6, 6)
    gaussians = [linear_head_gaussian(net, p, x, 0.5) for p in posts]
    out = linearized(net, posts, "classification")(x)
    probs = torch.stack([torch.softmax(m / (1 + math.pi / 8 * v).sqrt(), -1) for m, v in gaussians])
    torch.testing.assert_close(out["mean"].double(), probs.mean(0), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out["std"].double(), probs.std(0, correction=0), atol=1e-6, rtol=1e-5)
    assert (out["mutual_information"] >= 0).all()

    reg = Net(outputs=1)
    posts = [walk_posterior(reg, seed=s) for s in (0, 1)]
    gaussians = [linear_head_gaussian(reg, p, x, 0.5) for p in posts]
    means = torch.stack([m for m, _ in gaussians])
    variances = torch.stack([v for _, v in gaussians])
    out = linearized(reg, posts, "regression", noise=0.2)(x)
    total = variances.mean(0) + means.var(0, correction=0) + 0.04
    torch.testing.assert_close(out["mean"].double(), means.mean(0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["std"].double(), total.sqrt(), atol=1e-5, rtol=1e-4)
    assert out["samples"].shape == (2, 6, 1)


def test_sharded_posteriors_are_refused() -> None:
    net = Net()
    shapes = {n: p.shape for n, p in net.head.named_parameters(prefix="head")}
    post = SWAGPosterior(shapes, max_rank=2, layout=DDPSliceLayout.build(shapes, world_size=2, rank=0))
    for _ in range(3):
        post.collect(net)
    bma = linearized(net, post, "classification")
    with pytest.raises(ValueError, match="needs whole posteriors.*gather"):
        bma(torch.randn(2, 6))


def test_an_expensive_jacobian_is_refused() -> None:
    net = Net(head=nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 200)))
    post = walk_posterior(net)
    with pytest.raises(ValueError, match="exact Jacobian"):
        linearized(net, post, "classification")(torch.randn(3, 6))
    linear = Net(outputs=200)  # a linear head of any width is exact and cheap
    assert linearized(linear, walk_posterior(linear), "classification")(torch.randn(3, 6))["mean"].shape == (
        3,
        200,
    )


@pytest.mark.filterwarnings("ignore:.*at the edge of the candidates")
def test_tune_scale_and_return_samples() -> None:
    torch.manual_seed(8)
    net = Net(outputs=3)
    post = walk_posterior(net)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=g)
    y = torch.randint(0, 3, (40,), generator=g)
    bma = linearized(net, post, "classification", return_samples=True)
    scores = bma.tune_scale(DataLoader(TensorDataset(x, y), batch_size=20), scales=(0.1, 1.0, 10.0))
    assert len(set(scores.values())) == 3 and bma.scale == min(scores, key=scores.get)
    out = bma(x[:5])
    assert out["samples"].shape == (1, 5, 3)  # the logits' mean, one per posterior


def test_a_linear_head_on_token_features() -> None:
    torch.manual_seed(9)
    net = Net(outputs=3)
    post = walk_posterior(net)
    x = torch.randn(4, 5, 6)  # [B, T, F]: the head runs on every token
    mu, var = linear_head_gaussian(net, post, x.reshape(-1, 6), 0.5)
    out = linearized(net, post, "regression")(x)
    torch.testing.assert_close(out["mean"].double(), mu.reshape(4, 5, 3), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["std"].double(), var.sqrt().reshape(4, 5, 3), atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------- link_approx="mc" (#25, cases 5 and 6)
def linear_head_covariance(net: Net, post: SWAGPosterior, x: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Mean ``[B, C]`` and the full output covariance ``[B, C, C]`` of a linear head (float64)."""
    with torch.no_grad():
        phi = net.body(x).double()
    mean, var = pieces(post, post.mean.double()), pieces(post, post.variance.double())
    rows = pieces(post, post.deviations.double())
    mu = phi @ mean["weight"].T + mean["bias"]
    diag = phi.square() @ var["weight"].T + var["bias"]
    columns = torch.einsum("bf,kcf->kbc", phi, rows["weight"]) + rows["bias"][:, None, :]  # [k, B, C]
    low = torch.einsum("kbc,kbd->bcd", columns, columns) / (post.rank - 1)
    return mu, scale * (torch.diag_embed(diag) + low)


def test_mc_on_a_linear_head_is_the_sampled_predictive() -> None:
    torch.manual_seed(10)
    net = Net(outputs=4)
    post = [walk_posterior(net, seed=s) for s in (0, 1)]  # MultiSWAG too
    x = torch.randn(9, 6)
    for task in ("classification", "regression"):
        lin = linearized(net, post, task, link_approx="mc", num_samples=64)(x)
        sampled = SWAGModule(net, post, task=task, num_samples=64, seed=0)(x)
        assert lin.keys() == sampled.keys()
        for key in lin:
            torch.testing.assert_close(lin[key], sampled[key], atol=1e-6, rtol=1e-5)


def test_mc_converges_to_the_exact_bma_with_the_cross_class_covariance() -> None:
    torch.manual_seed(3)
    net = Net(outputs=4)
    post = walk_posterior(net)
    x = torch.randn(6, 6)
    mu, cov = linear_head_covariance(net, post, x, 0.5)
    # The exact BMA E[softmax(z)], z ~ N(mu, cov) with the full covariance, by Monte Carlo in float64
    # (400,000 draws: standard error below 1e-3).
    g = torch.Generator().manual_seed(123)
    chol = torch.linalg.cholesky(cov + 1e-12 * torch.eye(4, dtype=torch.float64))
    noise = torch.randn((400_000, *mu.shape), generator=g, dtype=torch.float64)
    exact = torch.softmax(mu + torch.einsum("bcd,sbd->sbc", chol, noise), dim=-1).mean(0)
    out = linearized(net, post, "classification", link_approx="mc", num_samples=20_000)(x)
    torch.testing.assert_close(out["mean"].double(), exact, atol=5e-3, rtol=0)

    binary = Net(outputs=1)  # one logit: E[sigmoid(z)] by Gauss-Hermite quadrature, exact to ~1e-12
    post = walk_posterior(binary)
    mu, var = linear_head_gaussian(binary, post, x, 0.5)
    nodes, weights = (torch.from_numpy(a) for a in np.polynomial.hermite_e.hermegauss(80))
    exact = (torch.sigmoid(mu[..., None] + var.sqrt()[..., None] * nodes) * weights).sum(-1) / math.sqrt(
        2 * math.pi
    )
    out = linearized(binary, post, "binary", link_approx="mc", num_samples=20_000)(x)
    torch.testing.assert_close(out["mean"].double(), exact, atol=5e-3, rtol=0)
    assert {"std", "mutual_information"} <= out.keys()
    probit = linearized(binary, post, "binary")(x)["mean"].double()
    assert (probit - exact).abs().max() < 0.02  # the probit approximation is close, not exact


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_mc_draws_do_not_depend_on_the_batching(head: str) -> None:
    torch.manual_seed(11)
    net = Net(outputs=3) if head == "linear" else Net(head=_mlp_head())
    post = walk_posterior(net)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(40, 6, generator=g), torch.randint(0, 3, (40,), generator=g)
    bma = linearized(net, post, "classification", link_approx="mc", num_samples=16)
    whole = bma(x)["mean"]
    loader = DataLoader(TensorDataset(x, y), batch_size=7)
    parts = L.Trainer(**QUIET).predict(
        linearized(net, post, "classification", link_approx="mc", num_samples=16), loader
    )
    torch.testing.assert_close(torch.cat([p["mean"] for p in parts]), whole, atol=1e-6, rtol=1e-5)
    one_by_one = torch.cat([bma(x[i : i + 1])["mean"] for i in range(0, 40, 13)])
    torch.testing.assert_close(one_by_one, whole[::13], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("tiny_chunks", [False, True])
def test_mc_on_a_nonlinear_head_is_the_linearised_model_under_the_weight_samples(
    tiny_chunks: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if tiny_chunks:  # one example's Jacobian at a time
        monkeypatch.setattr(linearized_module, "JACOBIAN_BYTES", 1)
    torch.manual_seed(12)
    net = Net(head=_mlp_head()).double()
    posts = [walk_posterior(net, seed=s) for s in (0, 1)]  # MultiSWAG: 12 samples of each
    x = torch.randn(5, 6, dtype=torch.float64)
    expected = []
    for index, post in enumerate(posts):
        mean, jac = fd_jacobian(net, post, lambda m: m(x))
        # the run's samples (seed 0): sample i of posterior j is sample i of derive_seed(0, j)
        theta = post.sample(12, 0.5, seed=derive_seed(0, index), dtype=torch.float64)
        expected.append(mean + torch.einsum("bop,sp->sbo", jac, theta - post.mean.double()))
    draws = torch.cat(expected)
    for split_forward in (True, False):
        out = linearized(
            net,
            posts,
            "regression",
            link_approx="mc",
            num_samples=12,
            return_samples=True,
            split_forward=split_forward,
        )(x)
        torch.testing.assert_close(out["samples"], draws, atol=1e-8, rtol=1e-7)
        torch.testing.assert_close(out["mean"], draws.mean(0), atol=1e-8, rtol=1e-7)
        torch.testing.assert_close(out["std"], draws.std(0, correction=0), atol=1e-8, rtol=1e-7)


# ---------------------------------------------------------------------- BatchNorm refresh (#25, case 4)
class BNNet(nn.Module):
    """A body and a head with BatchNorm in one of them; the model's running statistics are stale."""

    def __init__(self, bn_in_head: bool) -> None:
        super().__init__()
        norm = nn.BatchNorm1d(8)
        self.body = (
            nn.Sequential(nn.Linear(6, 8), nn.Tanh()) if bn_in_head else nn.Sequential(nn.Linear(6, 8), norm)
        )
        inner = [nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Tanh()] if bn_in_head else [nn.Tanh()]
        self.head = nn.Sequential(*inner, nn.Linear(8, 3))
        for module in self.modules():
            if isinstance(module, nn.BatchNorm1d):
                module.running_mean.fill_(2.0)
                module.running_var.fill_(0.3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def walk(net: nn.Module, include: list[str] | None, seed: int = 0, step: float = 0.2) -> SWAGPosterior:
    """A float64-moment posterior of a seeded random walk of the ``include``d parameters."""
    dtype = next(net.parameters()).dtype
    post = SWAGPosterior.from_model(net, max_rank=4, include=include, deviation_dtype=dtype)
    walker = copy.deepcopy(net)
    g = torch.Generator().manual_seed(seed)
    for _ in range(6):
        with torch.no_grad():
            for name in post.param_shapes:
                p = walker.get_parameter(name)
                p.add_(step * torch.randn(p.shape, generator=g, dtype=p.dtype))
        post.collect(walker)
    return post


def swa_model(net: nn.Module, post: SWAGPosterior, bn_loader: DataLoader | None = None) -> nn.Module:
    """A deep copy of ``net`` with the SWA mean loaded and (``bn_loader``) its BatchNorm statistics
    recomputed by torch."""
    model = copy.deepcopy(net)
    start = 0
    with torch.no_grad():
        for name, shape in post.param_shapes.items():
            count = math.prod(shape)
            model.get_parameter(name).copy_(post.mean[start : start + count].reshape(shape))
            start += count
    if bn_loader is not None:
        torch.optim.swa_utils.update_bn(bn_loader, model)
    return model.eval()


@pytest.mark.parametrize(("bn_in_head", "include"), [(False, None), (True, ["head.*"])])
def test_the_linearisation_point_has_refreshed_batchnorm_statistics(bn_in_head: bool, include) -> None:
    torch.manual_seed(13)
    net = BNNet(bn_in_head).eval()
    post = walk(net, include)
    g = torch.Generator().manual_seed(0)
    train = TensorDataset(torch.randn(64, 6, generator=g) + 1.0, torch.zeros(64))
    loader = DataLoader(train, batch_size=16)
    x = torch.randn(5, 6, generator=g)
    with torch.no_grad():
        expected = swa_model(net, post, loader)(x)
        stale = swa_model(net, post)(x)
    assert (expected - stale).abs().max() > 0.1  # the refresh matters here
    bma = linearized(net, post, "regression", scale=0.0, bn_loader=loader)
    out = bma(x)
    assert bma.execution_plan is not None and bma.execution_plan.split == ("head" if include else None)
    torch.testing.assert_close(out["mean"], expected, atol=1e-5, rtol=1e-5)
    # the variance is that of the model with the refreshed statistics, held fixed (finite differences)
    refreshed = swa_model(net, post, loader).double()
    _, jac = fd_jacobian(refreshed, post, lambda m: m(x.double()), h=1e-5)
    out = linearized(net, post, "regression", scale=0.5, bn_loader=loader)(x)
    torch.testing.assert_close(
        out["std"].double(), jacobian_variance(post, jac, 0.5).sqrt(), atol=1e-4, rtol=1e-3
    )


# ---------------------------------------------------------------------- noise σ with the linearised variance (#25, 7, 13)
def brute_force_nll(mu: Tensor, var: Tensor, y: Tensor) -> tuple[float, float]:
    """``(min over σ of the mean NLL of N(mu, var + σ²), its σ)`` on a fine grid of σ (float64)."""
    sigmas = torch.logspace(-3, 1, 40_001, dtype=torch.float64)
    total = var.reshape(1, -1) + sigmas.reshape(-1, 1).square()
    residual = (y.reshape(1, -1) - mu.reshape(1, -1)).square()
    nll = 0.5 * (torch.log(2 * math.pi * total) + residual / total).mean(dim=1)
    best = int(nll.argmin())
    return float(nll[best]), float(sigmas[best])


def heteroscedastic_data(net: Net, post: SWAGPosterior, n: int, scale: float) -> tuple[Tensor, Tensor]:
    """Inputs and targets drawn from the linearised predictive at ``scale`` with noise 0.2."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, 6, generator=g)
    mu, var = linear_head_gaussian(net, post, x, scale)
    y = mu + (var + 0.04).sqrt() * torch.randn(mu.shape, generator=g, dtype=torch.float64)
    return x, y.float()


def test_tune_scale_with_a_noise_model_scores_the_linearised_variance() -> None:
    torch.manual_seed(14)
    net = Net(outputs=1)
    post = walk_posterior(net)
    x, y = heteroscedastic_data(net, post, 80, scale=8.0)
    scales = (0.1, 0.5, 2.0, 8.0, 32.0)
    expected = {}
    for scale in scales:
        mu, var = linear_head_gaussian(net, post, x, scale)
        expected[scale] = brute_force_nll(mu, var, y.double())
    bma = linearized(net, post, "regression", noise=0.3)
    scores = bma.tune_scale(DataLoader(TensorDataset(x, y), batch_size=30), scales=scales)
    assert len(set(scores.values())) == len(scales)
    for scale in scales:
        assert scores[scale] == pytest.approx(expected[scale][0], abs=1e-5)
    best = min(expected, key=lambda s: expected[s][0])
    assert bma.scale == best
    assert bma.noise == pytest.approx(expected[best][1], rel=1e-3)


def test_fit_noise_with_the_linearised_predictive() -> None:
    torch.manual_seed(15)
    net = Net(outputs=1)
    post = walk_posterior(net)
    x, y = heteroscedastic_data(net, post, 60, scale=2.0)  # more spread than the model's at scale 0.1
    mu, var = linear_head_gaussian(net, post, x, 0.1)
    _, expected = brute_force_nll(mu, var, y.double())
    loader = DataLoader(TensorDataset(x, y), batch_size=25)
    bma = linearized(net, post, "regression", scale=0.1)
    sigma = bma.fit_noise(loader)
    assert sigma == pytest.approx(expected, rel=1e-3) and bma.noise == sigma
    assert sigma != pytest.approx(brute_force_nll(mu, torch.zeros_like(var), y.double())[1], rel=1e-2)
    draws = linearized(net, post, "regression", scale=0.1, link_approx="mc", num_samples=2000)
    assert draws.fit_noise(loader) == pytest.approx(expected, rel=0.02)  # the mixture over the draws


# ---------------------------------------------------------------------- a 1×1 convolution head (#25, case 10)
class SegNet(nn.Module):
    """A convolution body and a head with a kernel of ones (``dims`` spatial dimensions)."""

    def __init__(self, dims: int) -> None:
        super().__init__()
        conv = nn.Conv1d if dims == 1 else nn.Conv2d
        self.body = nn.Sequential(conv(3, 6, 3, padding=1), nn.Tanh())
        self.head = conv(6, 4, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


@pytest.mark.parametrize("dims", [1, 2])
def test_a_one_by_one_convolution_head_is_the_closed_form(dims: int) -> None:
    torch.manual_seed(16)
    net = SegNet(dims)
    post = walk(net, ["head.*"])
    x = torch.randn(2, 3, *([6] * dims))
    with torch.no_grad():
        phi = net.body(x).double().movedim(1, -1).reshape(-1, 6)  # [N positions, F]
    flat = {
        n: t for n, t in zip(("weight", "bias"), post.unflatten(post.mean.double()).values(), strict=True)
    }
    var = {
        n: t for n, t in zip(("weight", "bias"), post.unflatten(post.variance.double()).values(), strict=True)
    }
    rows = [post.unflatten(d) for d in post.deviations.double()]
    weight = flat["weight"].reshape(4, 6)
    mu = phi @ weight.T + flat["bias"]
    diag = phi.square() @ var["weight"].reshape(4, 6).T + var["bias"]
    columns = torch.stack([phi @ r["head.weight"].reshape(4, 6).T + r["head.bias"] for r in rows])
    variance = 0.5 * (diag + columns.square().sum(0) / (post.rank - 1))  # the explicit formula

    def as_output(values: Tensor) -> Tensor:  # [N, C] -> [B, C, *spatial]
        return values.reshape(2, *([6] * dims), 4).movedim(-1, 1)

    bma = linearized(net, post, "regression")
    out = bma(x)
    assert bma.execution_plan is not None and bma.execution_plan.split == "head"
    torch.testing.assert_close(out["mean"].double(), as_output(mu), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["std"].double(), as_output(variance.sqrt()), atol=1e-5, rtol=1e-4)
    probs = linearized(net, post, "classification", class_dim=1)(x)["mean"].double()
    torch.testing.assert_close(
        probs, as_output(torch.softmax(mu / (1 + math.pi / 8 * variance).sqrt(), -1)), atol=1e-6, rtol=1e-5
    )

    # Monte Carlo over 20,000 weight samples: the variance within 6 standard errors (sqrt(2/S) relative)
    samples = post.sample(20_000, 0.5, seed=1, dtype=torch.float64)
    w, b = samples[:, :24].reshape(-1, 4, 6), samples[:, 24:]
    outputs = torch.einsum("nf,scf->snc", phi, w) + b[:, None, :]
    assert ((outputs.var(0) / variance - 1).abs() < 6 * math.sqrt(2 / 20_000)).all()
    assert ((outputs.mean(0) - mu).abs() < 6 * (variance / 20_000).sqrt()).all()


# ---------------------------------------------------------------------- models forward-mode AD cannot take (#25, case 9)
def lora_bert(attention: str) -> nn.Module:
    """A tiny float64 BERT classifier (no download) with a LoRA adapter on the attention."""
    import peft  # the dev extra: no skip
    import transformers

    config = transformers.BertConfig(
        vocab_size=30,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=16,
        num_labels=3,
        attn_implementation=attention,
    )
    torch.manual_seed(17)
    bert = transformers.BertForSequenceClassification(config).double().eval()
    lora = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], lora_dropout=0.0)
    return peft.get_peft_model(bert, lora).eval()


def padded_batch() -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(3)
    mask = torch.ones(4, 7, dtype=torch.long)
    mask[1, 5:] = 0
    mask[3, 3:] = 0
    return {"input_ids": torch.randint(1, 30, (4, 7), generator=g), "attention_mask": mask}


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_a_lora_bert_with_an_attention_mask_matches_finite_differences(attention: str) -> None:
    model = lora_bert(attention)
    post = walk(model, None, step=0.1)  # the trainable parameters: the LoRA matrices
    assert post.param_shapes and all("lora_" in name for name in post.param_shapes)
    batch = padded_batch()
    mean, jac = fd_jacobian(model, post, lambda m: m(**batch).logits)
    variance = jacobian_variance(post, jac, 0.5)
    out = linearized(model, post, "regression")(batch)
    torch.testing.assert_close(out["mean"], mean, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(out["std"], variance.sqrt(), atol=1e-7, rtol=1e-6)
    loader = DataLoader([{k: v[i] for k, v in batch.items()} for i in range(4)], batch_size=3)
    parts = L.Trainer(**QUIET).predict(linearized(model, post, "classification"), loader)  # inference mode
    probs = torch.softmax(mean / (1 + math.pi / 8 * variance).sqrt(), dim=-1)
    torch.testing.assert_close(torch.cat([p["mean"] for p in parts]), probs, atol=1e-7, rtol=1e-6)


def test_a_weight_norm_head_matches_finite_differences() -> None:
    torch.manual_seed(18)
    net = Net(head=nn.utils.parametrizations.weight_norm(nn.Linear(8, 3))).double()
    post = walk(net, ["head.*"], step=0.1)
    x = torch.randn(5, 6, dtype=torch.float64)
    mean, jac = fd_jacobian(net, post, lambda m: m(x))
    variance = jacobian_variance(post, jac, 0.5)
    for split_forward in (True, False):
        out = linearized(net, post, "regression", split_forward=split_forward)(x)
        torch.testing.assert_close(out["mean"], mean, atol=1e-9, rtol=1e-9)
        torch.testing.assert_close(out["std"], variance.sqrt(), atol=1e-7, rtol=1e-6)
    loader = DataLoader(TensorDataset(x, torch.zeros(5)), batch_size=2)
    parts = L.Trainer(**QUIET).predict(linearized(net, post, "regression"), loader)
    torch.testing.assert_close(torch.cat([p["std"] for p in parts]), variance.sqrt(), atol=1e-7, rtol=1e-6)


class OldStyleFunction(torch.autograd.Function):
    """A custom autograd function in the old style (no ``setup_context``): torch.func cannot transform it."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # noqa: ANN001
        return x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: ANN001
        return grad


class OldStyleHead(nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        return OldStyleFunction.apply(super().forward(x))


def test_a_module_that_cannot_be_differentiated_is_refused_with_a_clear_error() -> None:
    net = Net(head=OldStyleHead(8, 3))
    post = walk(net, ["head.*"])
    with pytest.raises(ValueError, match="cannot differentiate Net.*predictive='sampled'") as caught:
        linearized(net, post, "regression")(torch.randn(3, 6))
    assert caught.value.__cause__ is not None
    assert SWAGModule(net, post, task="regression", seed=0)(torch.randn(3, 6))["std"].shape == (3, 3)


# ---------------------------------------------------------------------- the split decided per batch
class MicroBatchNet(Net):
    """Applies its head to at most four rows at a time: a batch of more cannot take the split."""

    def forward(self, x: Tensor) -> Tensor:
        features = self.body(x)
        if len(features) <= 4:
            return self.head(features)
        return torch.cat([self.head(part) for part in features.split(4)])


def test_a_batch_that_falls_back_to_the_whole_model_is_linearised_on_it() -> None:
    torch.manual_seed(20)
    net = MicroBatchNet(outputs=3)
    post = walk_posterior(net)
    bma = linearized(net, post, "regression")
    small, large = torch.randn(3, 6), torch.randn(10, 6)
    for x in (small, large):
        mu, var = linear_head_gaussian(net, post, x, 0.5)
        out = bma(x)
        torch.testing.assert_close(out["mean"].double(), mu, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out["std"].double(), var.sqrt(), atol=1e-5, rtol=1e-4)
    assert bma.execution_plan is not None and bma.execution_plan.split == "head"
    assert bma.execution_plan.split_fallbacks == 1
    # mc: the head run under the samples, or the whole model's Jacobian: both exact for this model
    draws = linearized(net, post, "regression", link_approx="mc", num_samples=20, return_samples=True)
    sampled = SWAGModule(net, post, task="regression", num_samples=20, seed=0, return_samples=True)
    for x in (small, large):
        torch.testing.assert_close(draws(x)["samples"], sampled(x)["samples"], atol=1e-5, rtol=1e-5)


def test_many_classes_summarised_in_blocks_are_the_explicit_average_of_full_forwards(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """300 classes, summaries reduced two samples at a time: the sampled predictive and ``mc`` (on a
    linear head the same weight samples) equal the average of softmaxes of whole-model forward passes
    of copies holding each weight sample; the probit's mean is the closed form's."""
    from lightning_swag.likelihoods import summaries

    monkeypatch.setattr(summaries, "BLOCK_ELEMENTS", 2 * 9 * 300)
    torch.manual_seed(12)
    net = Net(outputs=300)
    post = walk_posterior(net)
    x = torch.randn(9, 6)
    sampled = SWAGModule(net, post, task="classification", num_samples=10, seed=0)
    mc = linearized(net, post, "classification", link_approx="mc", num_samples=10)
    explicit = torch.zeros(9, 300)
    samples = [s for chunk in sampled.iter_weight_samples() for s in _split_samples(chunk)]
    assert len(samples) == 10
    for weights in samples:
        copy_ = copy.deepcopy(net)
        copy_.head.weight.data.copy_(weights["head.weight"])
        copy_.head.bias.data.copy_(weights["head.bias"])
        with torch.no_grad():
            explicit += torch.softmax(copy_(x), dim=-1) / len(samples)
    torch.testing.assert_close(sampled(x)["mean"], explicit, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(mc(x)["mean"], explicit, atol=1e-6, rtol=1e-5)
    mu, var = linear_head_gaussian(net, post, x, 1.0)
    probit = torch.softmax(mu / (1 + math.pi / 8 * var).sqrt(), dim=-1)
    torch.testing.assert_close(
        linearized(net, post, "classification", scale=1.0)(x)["mean"].double(), probit, atol=1e-6, rtol=1e-5
    )


def _split_samples(chunk: dict[str, Tensor]) -> list[dict[str, Tensor]]:
    """A chunk ``{name: [n, ...]}`` as ``n`` single samples."""
    count = next(iter(chunk.values())).shape[0]
    return [{name: value[i] for name, value in chunk.items()} for i in range(count)]
