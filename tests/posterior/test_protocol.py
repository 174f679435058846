"""The ``Posterior`` protocol: user posteriors defined here (a deep ensemble, an isotropic Gaussian)
work through ``SWAGModule`` without editing the package; ``SWAGPosterior`` and its SWAG-Diagonal
view implement it; no class of ``lightning_swag.posterior`` inherits a concrete class of the package."""

from __future__ import annotations

import copy
import importlib
import inspect
import math
import pkgutil
from collections.abc import Mapping, Sequence
from typing import Protocol

import lightning as L
import pytest
import torch
from conftest import QUIET, random_walk_posterior
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_swag.posterior
from lightning_swag import SWAGModule, SWAGPosterior, SWAGPredictionWriter, load_predictions, metrics
from lightning_swag.posterior.noise import derive_seed
from lightning_swag.posterior.parameters import named_tracked
from lightning_swag.posterior.protocol import Posterior, check_posterior, diagonal_of, gaussian_of


# ---------------------------------------------------------------------------- user posteriors
class DeepEnsemble:
    """A deep ensemble: sample ``i`` of any seed is member ``i mod M`` (no covariance, ``scale`` ignored)."""

    def __init__(self, members: Sequence[Mapping[str, Tensor]]) -> None:
        self.members = [{n: t.detach().clone() for n, t in m.items()} for m in members]
        self.param_shapes = {n: t.shape for n, t in self.members[0].items()}

    def sample_weights(
        self, num_samples, *, seed, first_sample=0, scale=0.5, dtype=None, device=None
    ) -> dict[str, Tensor]:
        picks = [self.members[(first_sample + i) % len(self.members)] for i in range(num_samples)]
        return {
            n: torch.stack([m[n] for m in picks]).to(device=device, dtype=dtype) for n in self.param_shapes
        }


class IsotropicGaussian:
    """``N(θ₀, σ² I)`` around given weights; sample ``i`` of a seed uses its own generator."""

    def __init__(self, center: Mapping[str, Tensor], sigma: float) -> None:
        self.center = {n: t.detach().clone() for n, t in center.items()}
        self.param_shapes = {n: t.shape for n, t in self.center.items()}
        self.sigma = sigma

    def sample_weights(
        self, num_samples, *, seed, first_sample=0, scale=0.5, dtype=None, device=None
    ) -> dict[str, Tensor]:
        out: dict[str, list[Tensor]] = {n: [] for n in self.center}
        for i in range(first_sample, first_sample + num_samples):
            g = torch.Generator().manual_seed(derive_seed(seed, i))
            for n, t in self.center.items():
                noise = torch.randn(t.shape, generator=g, dtype=torch.float64)
                out[n].append(t.double() + math.sqrt(scale) * self.sigma * noise)
        return {n: torch.stack(v).to(device=device, dtype=dtype) for n, v in out.items()}

    # what predictive="linearized" needs (GaussianPosterior): flat vectors in param_shapes order
    @property
    def mean(self) -> Tensor:
        return torch.cat([t.reshape(-1) for t in self.center.values()])

    def covariance_factors(self) -> tuple[Tensor, None]:
        return torch.full_like(self.mean, self.sigma**2), None


def _body_head() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))


def _perturbed(net: nn.Module, names: Sequence[str], seed: int) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    named = named_tracked(net)
    return {n: named[n].detach() + 0.3 * torch.randn(named[n].shape, generator=g) for n in names}


def _posteriors(net: nn.Module, names: Sequence[str]) -> dict[str, Posterior]:
    named = named_tracked(net)
    return {
        "ensemble": DeepEnsemble([_perturbed(net, names, s) for s in range(3)]),
        "isotropic": IsotropicGaussian({n: named[n] for n in names}, sigma=0.2),
    }


def _explicit_probs(net: nn.Module, post: Posterior, x: Tensor, num_samples: int, seed: int) -> Tensor:
    """The reference BMA: full forward passes of model copies holding each sample (softmax, averaged)."""
    weights = post.sample_weights(num_samples, seed=derive_seed(seed, 0), first_sample=0, scale=0.5)
    probs = []
    for i in range(num_samples):
        model = copy.deepcopy(net).eval()
        named = named_tracked(model)
        with torch.no_grad():
            for name, value in weights.items():
                named[name].copy_(value[i])
            probs.append(model(x).softmax(-1))
    return torch.stack(probs).mean(0)


def _data() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(10, 4, generator=g), torch.randint(0, 3, (10,), generator=g)


# ---------------------------------------------------------------------------- through SWAGModule
@pytest.mark.parametrize("kind", ["ensemble", "isotropic"])
@pytest.mark.parametrize("names", [("0.weight", "0.bias", "2.weight", "2.bias"), ("2.weight", "2.bias")])
def test_a_user_posterior_predicts_the_average_of_its_samples(kind: str, names, tmp_path) -> None:
    net = _body_head()
    post = _posteriors(net, names)[kind]
    x, y = _data()
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    reference = _explicit_probs(net, post, x, 6, seed=3)
    options = {"num_samples": 6, "seed": 3, "task": "classification"}

    bma = SWAGModule(net, post, **options)
    writer = SWAGPredictionWriter(output_dir=str(tmp_path), filename="p.pt")
    batches = L.Trainer(**QUIET, callbacks=[writer]).predict(bma, loader)
    torch.testing.assert_close(torch.cat([b["mean"] for b in batches]), reference, rtol=1e-5, atol=1e-6)
    head_only = names == ("2.weight", "2.bias")
    assert bma.execution_plan is not None and bma.execution_plan.split == ("2" if head_only else None)
    written = load_predictions(tmp_path / "p.pt")
    torch.testing.assert_close(written["mean"], reference, rtol=1e-5, atol=1e-6)
    assert written["meta"]["num_rows"] == 10

    logged = L.Trainer(**QUIET).test(SWAGModule(net, post, **options), loader)[0]
    expected = metrics.classification_metrics(reference, y)
    for key in ("accuracy", "nll", "brier"):
        assert logged[f"test_{key}"] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), key


def test_a_head_only_user_posterior_runs_the_body_once_per_batch() -> None:
    net = nn.Sequential(
        nn.Linear(4, 16), nn.Tanh(), nn.Sequential(nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3))
    )
    names = ("2.0.weight", "2.0.bias", "2.2.weight", "2.2.bias")
    post = _posteriors(net, names)["ensemble"]
    x, _ = _data()
    bma = SWAGModule(net, post, num_samples=3, seed=0, task="classification")
    out = L.Trainer(**QUIET).predict(bma, DataLoader(x, batch_size=5))
    assert bma.execution_plan is not None and bma.execution_plan.split == "2"
    reference = _explicit_probs(net, post, x, 3, seed=0)
    torch.testing.assert_close(torch.cat([b["mean"] for b in out]), reference, rtol=1e-5, atol=1e-6)


def test_the_samples_of_a_user_posterior_do_not_depend_on_the_chunking() -> None:
    net = _body_head()
    post = _posteriors(net, ("2.weight", "2.bias"))["isotropic"]
    x, _ = _data()
    whole = SWAGModule(net, post, num_samples=5, seed=2, task="classification", return_samples=True)(x)
    chunked = SWAGModule(
        net, post, num_samples=5, seed=2, task="classification", return_samples=True, chunk_size=2
    )
    torch.testing.assert_close(chunked(x)["samples"], whole["samples"], rtol=0, atol=0)


def test_the_linearized_predictive_refuses_a_posterior_that_is_not_gaussian() -> None:
    net = _body_head()
    posteriors = _posteriors(net, ("2.weight", "2.bias"))
    x, _ = _data()
    with pytest.raises(
        ValueError, match="predictive='linearized' needs a Gaussian posterior.*predictive='sampled'"
    ):
        SWAGModule(net, posteriors["ensemble"], predictive="linearized", task="classification")(x)
    # a Gaussian user posterior has what it needs: on a linear head the probit BMA of its Gaussian
    out = SWAGModule(net, posteriors["isotropic"], predictive="linearized", task="classification")(x)
    assert out["mean"].shape == (10, 3) and torch.allclose(out["mean"].sum(-1), torch.ones(10))


def test_covariance_diagonal_refuses_a_posterior_without_diagonal() -> None:
    net = _body_head()
    post = _posteriors(net, ("2.weight", "2.bias"))["ensemble"]
    with pytest.raises(ValueError, match="covariance='diagonal' needs a posterior with a diagonal"):
        diagonal_of(post, "posterior 0")


def test_an_object_without_the_protocol_is_refused_saying_what_is_missing() -> None:
    with pytest.raises(TypeError, match="lacks sample_weights"):
        check_posterior(type("Weights", (), {"param_shapes": {}})(), "posterior 0")


# ---------------------------------------------------------------------------- SWAGPosterior and its diagonal
def test_swag_posterior_and_its_diagonal_implement_the_protocols() -> None:
    post = random_walk_posterior(nn.Linear(3, 2))
    for candidate in (post, post.diagonal()):
        assert isinstance(candidate, Posterior)
        assert gaussian_of(candidate) is candidate
    assert isinstance(SWAGPosterior.from_model(nn.Linear(3, 2)), Posterior)  # no snapshots: no error either
    chunk = post.sample_weights(4, seed=7, first_sample=2, scale=0.5)
    flat = post.sample(4, 0.5, seed=7, first_sample=2)
    assert list(chunk) == ["weight", "bias"]
    torch.testing.assert_close(
        torch.cat([chunk["weight"].flatten(1), chunk["bias"]], 1), flat, rtol=0, atol=0
    )


# ---------------------------------------------------------------------------- composition, not mixins
def _package_classes() -> list[type]:
    classes = []
    for info in pkgutil.iter_modules(lightning_swag.posterior.__path__, "lightning_swag.posterior."):
        module = importlib.import_module(info.name)
        classes += [
            c for _, c in inspect.getmembers(module, inspect.isclass) if c.__module__ == module.__name__
        ]
    return classes


def test_no_posterior_class_inherits_a_concrete_class_of_the_package() -> None:
    classes = _package_classes()
    assert SWAGPosterior in classes and len(classes) > 10
    for cls in classes:
        for base in cls.__mro__[1:]:
            if not base.__module__.startswith("lightning_swag"):
                continue
            is_protocol = Protocol in base.__bases__ or getattr(base, "_is_protocol", False)
            assert inspect.isabstract(base) or is_protocol, (
                f"{cls.__name__} inherits the concrete {base.__name__}"
            )
    assert SWAGPosterior.__mro__ == (SWAGPosterior, object)


def test_a_checkpoint_of_a_module_with_a_posterior_of_the_users_own_says_it_holds_none(tmp_path) -> None:
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_swag import SWAGModule

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    members = [{n: p + 0.1 * k for n, p in net.named_parameters()} for k in range(3)]
    module = SWAGModule(net, DeepEnsemble(members), task="classification", num_samples=3, seed=0)
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.predict(module, DataLoader(TensorDataset(torch.randn(4, 3)), batch_size=4))
    assert module.state_dict()  # the extra state skips a posterior it cannot store
    with pytest.warns(UserWarning, match="holds no posterior"):
        trainer.save_checkpoint(tmp_path / "user.ckpt")
    restored = SWAGModule(net, DeepEnsemble(members), task="classification", num_samples=3, seed=0)
    L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False).predict(
        restored, DataLoader(TensorDataset(torch.randn(4, 3)), batch_size=4), ckpt_path=tmp_path / "user.ckpt"
    )
