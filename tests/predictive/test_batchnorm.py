"""refresh_batchnorm: update_bn semantics, functional (the model is untouched), and that refreshed
statistics really help SWA / SWAG weights of a BatchNorm CNN."""

from __future__ import annotations

import copy
import math

import lightning as L
import pytest
import torch
from conftest import QUIET
from torch import Tensor, nn
from torch.func import functional_call
from torch.optim.swa_utils import update_bn
from torch.utils.data import DataLoader, TensorDataset

from lightning_swag import SWAGCallback, SWAGModule
from lightning_swag.posterior.noise import derive_seed
from lightning_swag.predictive.batchnorm import (
    batchnorm_buffer_names,
    has_batchnorm,
    refresh_batchnorm,
    refresh_batchnorm_batched,
)

NUM_CLASSES, SIZE = 4, 12


def _images(n: int, seed: int, patterns: Tensor) -> tuple[Tensor, Tensor]:
    """Noisy images: a class-dependent pattern with a random amplitude plus unit Gaussian noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    amplitude = 0.5 + torch.rand(n, 1, 1, 1, generator=g)
    x = amplitude * patterns[y] + torch.randn(n, 1, SIZE, SIZE, generator=g)
    return x, y


def _patterns() -> Tensor:
    return torch.randn(NUM_CLASSES, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1234))


class BNConvNet(L.LightningModule):
    """conv-BN-ReLU-pool-conv-BN-ReLU-GAP-linear; SGD with momentum and a high learning rate."""

    def __init__(self, lr: float = 0.2) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(16, NUM_CLASSES),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-4)


def _small_bn_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.BatchNorm2d(1),  # on the raw input: sees unbatched activations under vmap
        nn.Conv2d(1, 4, 3),
        nn.BatchNorm2d(4, momentum=0.3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 5),
        nn.BatchNorm1d(5, momentum=None),
        nn.Dropout(0.0),
    )
    # non-trivial stored statistics, so that "unchanged" means something
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(8, 1, 8, 8) * 3 + 1)
    net.eval()
    return net


def _loader(n_batches: int = 5, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 1, 8, 8, generator=g) * 2 - 1, torch.zeros(8)) for _ in range(n_batches)]


def _state_snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_bitwise_equal(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ---------------------------------------------------------------------- semantics


def test_matches_update_bn_bitwise_and_leaves_the_model_alone() -> None:
    net = _small_bn_net()
    before = _state_snapshot(net)
    momenta = [m.momentum for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    modes = [m.training for m in net.modules()]

    reference = copy.deepcopy(net)
    update_bn(_loader(), reference)
    buffers = refresh_batchnorm(net, None, _loader())

    assert list(buffers) == batchnorm_buffer_names(net)
    ref_buffers = dict(reference.named_buffers())
    for name, value in buffers.items():
        assert torch.equal(value, ref_buffers[name]), name
    assert int(buffers["2.num_batches_tracked"]) == 5
    # the model's own buffers, weights, momenta and modes are untouched
    _assert_bitwise_equal(_state_snapshot(net), before)
    assert [m.momentum for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] == momenta
    assert [m.training for m in net.modules()] == modes


def test_uses_the_given_weights_not_the_models() -> None:
    net = _small_bn_net()
    before = _state_snapshot(net)
    g = torch.Generator().manual_seed(1)
    params = {n: p.detach() + 0.5 * torch.randn(p.shape, generator=g) for n, p in net.named_parameters()}

    reference = copy.deepcopy(net)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            p.copy_(params[name])
    update_bn(_loader(), reference)

    buffers = refresh_batchnorm(net, params, _loader())
    ref_buffers = dict(reference.named_buffers())
    for name, value in buffers.items():
        torch.testing.assert_close(value, ref_buffers[name], rtol=0, atol=0)
    _assert_bitwise_equal(_state_snapshot(net), before)


def test_partial_parameters_and_num_batches() -> None:
    net = _small_bn_net()
    head = {"5.weight": torch.zeros(5, 144), "5.bias": torch.arange(5.0)}
    buffers = refresh_batchnorm(net, head, _loader(), num_batches=2)
    # the head's output is the bias alone: its batch mean is the bias, its batch variance 0
    torch.testing.assert_close(buffers["6.running_mean"], torch.arange(5.0))
    torch.testing.assert_close(buffers["6.running_var"], torch.zeros(5))
    assert int(buffers["6.num_batches_tracked"]) == 2

    first_two = refresh_batchnorm(net, None, _loader()[:2])
    fraction = refresh_batchnorm(net, None, _loader(), num_batches=0.4)  # ceil(0.4 * 5) = 2
    for name in first_two:
        assert torch.equal(first_two[name], fraction[name]), name


def test_batched_equals_per_sample_vmap_and_loop() -> None:
    net = _small_bn_net()
    before = _state_snapshot(net)
    g = torch.Generator().manual_seed(2)
    chunk = {
        n: torch.stack([p.detach() + 0.3 * i * torch.randn(p.shape, generator=g) for i in range(3)])
        for n, p in net.named_parameters()
    }
    batched = refresh_batchnorm_batched(net, chunk, _loader(), vectorize="vmap")
    looped = refresh_batchnorm_batched(net, chunk, _loader(), vectorize="loop")
    for i in range(3):
        single = refresh_batchnorm(net, {k: v[i] for k, v in chunk.items()}, _loader())
        for name, value in single.items():
            torch.testing.assert_close(batched[name][i], value, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(looped[name][i], value, rtol=0, atol=0)
    _assert_bitwise_equal(_state_snapshot(net), before)


class ItemInForward(nn.Module):
    """``.item()`` after the BatchNorm: vmap fails *after* the running stats were updated in place."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.bn(self.lin(x))
        if h.abs().sum().item() > 1e12:  # data-dependent Python control flow
            h = h * 0
        return h


def test_batched_falls_back_to_the_loop_when_vmap_fails() -> None:
    torch.manual_seed(0)
    net = ItemInForward().eval()
    g = torch.Generator().manual_seed(3)
    loader = [torch.randn(6, 3, generator=g) for _ in range(3)]  # plain tensors as batches
    chunk = {
        n: torch.stack([p.detach() * (1 + 0.5 * i) for i in range(2)]) for n, p in net.named_parameters()
    }
    with pytest.warns(UserWarning, match="falling back to one forward pass per sample"):
        batched = refresh_batchnorm_batched(net, chunk, loader, vectorize="vmap")
    for i in range(2):
        single = refresh_batchnorm(net, {k: v[i] for k, v in chunk.items()}, loader)
        for name, value in single.items():
            # the partial in-place update of the failed vmap call was undone
            torch.testing.assert_close(batched[name][i], value, rtol=0, atol=0)


def test_no_batchnorm_returns_empty_without_touching_the_loader() -> None:
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))

    def exploding_loader():
        raise AssertionError("the loader must not be iterated")
        yield  # pragma: no cover

    assert not has_batchnorm(net)
    assert not has_batchnorm(nn.Sequential(nn.BatchNorm1d(3, track_running_stats=False)))
    assert has_batchnorm(_small_bn_net())
    assert refresh_batchnorm(net, None, exploding_loader()) == {}


@pytest.mark.parametrize("num_batches", [0, -1, 1.5, 0.0, True])
def test_bad_num_batches_raise(num_batches) -> None:
    with pytest.raises(ValueError, match="num_batches"):
        refresh_batchnorm(_small_bn_net(), None, _loader(), num_batches=num_batches)


def test_empty_loader_raises_and_restores_the_model() -> None:
    net = _small_bn_net()
    before = _state_snapshot(net)
    with pytest.raises(ValueError, match="no batch"):
        refresh_batchnorm(net, None, [])
    _assert_bitwise_equal(_state_snapshot(net), before)
    assert not net.training


# ---------------------------------------------------------------------- does it help?


def _nll_acc(log_probs: Tensor, y: Tensor) -> tuple[float, float]:
    nll = nn.functional.nll_loss(log_probs, y).item()
    acc = (log_probs.argmax(-1) == y).float().mean().item()
    return nll, acc


@pytest.mark.slow
def test_refreshed_statistics_beat_the_stale_ones_for_swa_and_swag() -> None:
    patterns = _patterns()
    x_train, y_train = _images(768, seed=1, patterns=patterns)
    x_test, y_test = _images(1024, seed=2, patterns=patterns)
    train_loader = DataLoader(
        TensorDataset(x_train, y_train),
        batch_size=64,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
    )
    torch.manual_seed(0)
    model = BNConvNet(lr=0.2)
    swag = SWAGCallback(start_epoch=3, max_rank=10)
    L.Trainer(max_epochs=8, callbacks=[swag], **QUIET).fit(model, train_loader)
    model.eval()
    post = swag.posterior
    assert post.num_snapshots == 5
    stale = {k: v.clone() for k, v in model.named_buffers()}

    def log_probs(params: dict[str, Tensor], buffers: dict[str, Tensor]) -> Tensor:
        with torch.no_grad():
            return functional_call(model, {**params, **buffers}, (x_test,)).log_softmax(-1)

    results: dict[str, tuple[float, float]] = {"SGD (final iterate)": _nll_acc(log_probs({}, {}), y_test)}

    swa = post.unflatten(post.mean.float())
    results["SWA, stale BN"] = _nll_acc(log_probs(swa, stale), y_test)
    results["SWA, refreshed BN"] = _nll_acc(
        log_probs(swa, refresh_batchnorm(model, swa, train_loader)), y_test
    )

    num_samples = 8
    flat = post.sample(num_samples, seed=derive_seed(0, 0)).float()  # SWAGModule's samples for seed=0
    samples = post.unflatten(flat)
    fresh = refresh_batchnorm_batched(model, samples, train_loader)

    def bma(buffers_of) -> Tensor:
        per_sample = torch.stack(
            [log_probs({k: v[i] for k, v in samples.items()}, buffers_of(i)) for i in range(num_samples)]
        )
        return torch.logsumexp(per_sample, dim=0) - math.log(num_samples)

    results["SWAG BMA (8), stale BN"] = _nll_acc(bma(lambda i: stale), y_test)
    results["SWAG BMA (8), refreshed BN"] = _nll_acc(
        bma(lambda i: {k: v[i] for k, v in fresh.items()}), y_test
    )

    # The same through SWAGModule: given the training data it refreshes BN for every sample. A fixed
    # list of batches makes the statistics comparable bit for bit (batch composition matters).
    fixed_batches = list(train_loader)
    refreshed_module = SWAGModule(
        model, post, num_samples=num_samples, seed=0, task="classification", bn_loader=fixed_batches
    )
    with pytest.warns(UserWarning, match="BatchNorm layers but no bn_loader"):
        stale_module = SWAGModule(model, post, num_samples=num_samples, seed=0, task="classification")
    probs_refreshed = refreshed_module(x_test)["mean"]
    probs_stale = stale_module(x_test)["mean"]
    fresh_fixed = refresh_batchnorm_batched(model, samples, fixed_batches)
    explicit = bma(lambda i: {k: v[i] for k, v in fresh_fixed.items()}).exp()
    torch.testing.assert_close(probs_refreshed, explicit, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(probs_stale, bma(lambda i: stale).exp(), rtol=1e-4, atol=1e-5)
    results["SWAGModule(bn_loader=...)"] = _nll_acc(probs_refreshed.clamp_min(1e-12).log(), y_test)
    results["SWAGModule, no bn_loader"] = _nll_acc(probs_stale.clamp_min(1e-12).log(), y_test)

    table = "\n".join(f"{name:28s} NLL {nll:.4f}  acc {acc:.4f}" for name, (nll, acc) in results.items())
    print("\n" + table)
    # the model's own (stale) statistics survive all of this bit for bit
    for name, value in model.named_buffers():
        assert torch.equal(value, stale[name]), name
    assert results["SWAGModule(bn_loader=...)"][0] < 0.8 * results["SWAGModule, no bn_loader"][0], table
    for kind in ("SWA", "SWAG BMA (8)"):
        (nll_stale, acc_stale), (nll_fresh, acc_fresh) = (
            results[f"{kind}, stale BN"],
            results[f"{kind}, refreshed BN"],
        )
        assert nll_fresh < 0.8 * nll_stale, f"{kind}: refreshed BN is not clearly better\n{table}"
        assert acc_fresh >= acc_stale, f"{kind}: refreshed BN lost accuracy\n{table}"
