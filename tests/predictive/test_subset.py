"""The split forward of subset posteriors (lightning_swag.predictive.subset): the rest of the network runs once per
batch, and the predictions equal those of the whole model run under every weight sample."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_swag import SWAGModule, SWAGPosterior
from lightning_swag.predictive.subset import find_split


class ConvNet(nn.Module):
    """A small conv body and a linear head."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten()
        )
        self.head = nn.Linear(24, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


class ScaledHead(nn.Module):
    """The head is not the last operation: ``forward`` returns ``head(φ) * 2``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.Tanh())
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x)) * 2


class SkipHead(ScaledHead):
    """``forward`` returns ``head(φ) + skip(x)``."""

    def __init__(self) -> None:
        super().__init__()
        self.skip = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x)) + self.skip(x)


class BatchNormNet(nn.Module):
    """BatchNorm in the head block (``bn_head``) or in the body (``bn_body``)."""

    def __init__(self, bn_head: bool, bn_body: bool) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8) if bn_body else nn.Identity(), nn.ReLU())
        self.head = nn.Sequential(
            nn.Linear(8, 8), nn.BatchNorm1d(8) if bn_head else nn.Identity(), nn.ReLU(), nn.Linear(8, 3)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def walk_posterior(net: nn.Module, include: list[str], seed: int = 0, snapshots: int = 6) -> SWAGPosterior:
    """A rank-4 posterior over ``include`` from a seeded random walk of the tracked weights."""
    post = SWAGPosterior.from_model(net, max_rank=4, include=include)
    walker = copy.deepcopy(net)
    tracked = {n for n in post.param_shapes}
    g = torch.Generator().manual_seed(seed)
    for _ in range(snapshots):
        with torch.no_grad():
            for name, p in walker.named_parameters():
                if name in tracked:
                    p.add_(0.3 * torch.randn(p.shape, generator=g))
        post.collect(walker)
    return post


def both_paths(
    net: nn.Module, post: SWAGPosterior, x: Tensor, **kwargs
) -> tuple[dict[str, Tensor], dict[str, Tensor], SWAGModule, SWAGModule]:
    options = {"task": "classification", "num_samples": 12, "seed": 3, **kwargs}
    split = SWAGModule(net, post, split_forward=True, **options)
    full = SWAGModule(net, post, split_forward=False, **options)
    return split(x), full(x), split, full


def assert_same(a: dict[str, Tensor], b: dict[str, Tensor], atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)


def manual_bma(net: nn.Module, module: SWAGModule, x: Tensor) -> Tensor:
    """The BMA probabilities the independent way: each weight sample loaded into a copy of the model."""
    copy_net = copy.deepcopy(net).eval()
    params = dict(copy_net.named_parameters())
    probs = []
    for chunk in module.iter_weight_samples():
        for i in range(next(iter(chunk.values())).shape[0]):
            with torch.no_grad():
                for name, value in chunk.items():
                    params[name].copy_(value[i])
                probs.append(copy_net(x).softmax(-1))
    return torch.stack(probs).mean(0)


@pytest.mark.parametrize("vectorize", ["vmap", "loop"])
def test_conv_net_head_split_equals_the_full_path(vectorize: str) -> None:
    torch.manual_seed(0)
    net = ConvNet()
    post = walk_posterior(net, ["head.*"])
    x = torch.randn(10, 3, 8, 8)
    split_out, full_out, split, full = both_paths(net, post, x, vectorize=vectorize, return_samples=True)
    assert split.execution_plan is not None and split.execution_plan.split == "head"
    assert split.execution_plan.split_refused is None
    assert full.execution_plan is not None and full.execution_plan.split is None
    assert_same(split_out, full_out)
    torch.testing.assert_close(split_out["mean"], manual_bma(net, split, x), atol=1e-6, rtol=0)


def test_mlp_last_layer_and_last_block_split() -> None:
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(7, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(9, 7)
    for include, prefix in ((["4.*"], "4"), (["2.*", "4.*"], None)):
        post = walk_posterior(net, include)
        split_out, full_out, split, _ = both_paths(net, post, x)
        assert split.execution_plan is not None and split.execution_plan.split == prefix
        assert_same(split_out, full_out)
    block = nn.Sequential(
        nn.Linear(7, 16), nn.ReLU(), nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
    )
    post = walk_posterior(block, ["2.0.*", "2.2.*"])
    split_out, full_out, split, _ = both_paths(block, post, x)
    assert split.execution_plan is not None and split.execution_plan.split == "2"  # the smallest owner
    assert_same(split_out, full_out)


@pytest.mark.parametrize("model_class", [ScaledHead, SkipHead])
def test_a_head_that_is_not_the_last_operation_falls_back(model_class: type[nn.Module]) -> None:
    torch.manual_seed(2)
    net = model_class()
    post = walk_posterior(net, ["head.*"])
    assert find_split(net, post.param_names) is not None  # proposed, then refused at the first batch
    x = torch.randn(8, 6)
    split_out, full_out, split, _ = both_paths(net, post, x)
    plan = split.execution_plan
    assert plan is not None and plan.split is None
    assert plan.split_refused is not None and "not the output of 'head'" in plan.split_refused
    assert_same(split_out, full_out, atol=0.0)
    torch.testing.assert_close(split_out["mean"], manual_bma(net, split, x), atol=1e-6, rtol=0)


def test_a_head_called_twice_or_tied_weights_are_not_split() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(4, 4)
            self.head = nn.Linear(4, 4)

        def forward(self, x: Tensor) -> Tensor:
            return self.head(self.head(self.body(x)))

    net = Twice()
    post = walk_posterior(net, ["head.*"])
    out, full_out, split, _ = both_paths(net, post, torch.randn(5, 4))
    assert split.execution_plan is not None and split.execution_plan.split is None
    assert "runs 2 times" in str(split.execution_plan.split_refused)
    assert_same(out, full_out, atol=0.0)

    tied = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    tied[0].weight = tied[2].weight
    assert find_split(tied, ["2.weight", "2.bias"]) is None  # the weight is used outside the submodule too
    tied_post = walk_posterior(tied, ["2.*"])
    assert tied_post.param_names == ["0.weight", "2.bias"]  # a tied tensor goes by its first name
    x = torch.randn(5, 4)
    for vectorize in ("vmap", "loop"):
        out, full_out, split, _ = both_paths(tied, tied_post, x, vectorize=vectorize)
        assert split.execution_plan is not None and split.execution_plan.split is None
        assert_same(out, full_out, atol=0.0)
        torch.testing.assert_close(out["mean"], manual_bma(tied, split, x), atol=1e-6, rtol=0)


def test_a_body_that_reads_the_head_weights_is_not_split() -> None:
    class Reader(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(4, 4)

        def forward(self, x: Tensor) -> Tensor:
            return self.head(x @ self.head.weight)  # the body depends on the sampled weights

    net = Reader()
    post = walk_posterior(net, ["head.*"])
    post.load_into(net)  # the model holds the SWA mean: only a perturbed check can tell
    out, full_out, split, _ = both_paths(net, post, torch.randn(5, 4))
    assert split.execution_plan is not None and split.execution_plan.split is None
    assert "depend" in str(split.execution_plan.split_refused)
    assert_same(out, full_out, atol=0.0)


def _bn_loader(seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(torch.randn(48, 6, generator=g)), batch_size=16)


def test_batchnorm_refresh_inside_the_split_head_equals_the_full_path() -> None:
    torch.manual_seed(3)
    net = BatchNormNet(bn_head=True, bn_body=False)
    post = walk_posterior(net, ["head.*"])
    x = torch.randn(7, 6)
    split_out, full_out, split, full = both_paths(net, post, x, bn_loader=_bn_loader())
    assert split.execution_plan is not None and split.execution_plan.split == "head"
    assert full.execution_plan is not None and full.execution_plan.split is None
    assert_same(split_out, full_out, atol=1e-5)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    split(x)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # buffers untouched


def test_batchnorm_outside_the_head() -> None:
    torch.manual_seed(4)
    net = BatchNormNet(bn_head=False, bn_body=True)
    with torch.no_grad():
        net.body[1].running_mean.add_(0.5)  # stale statistics, so that a refresh would show
    post = walk_posterior(net, ["head.*"])
    x = torch.randn(7, 6)
    # With bn_loader the body is refreshed too, so it runs under every sample: no split.
    split_out, full_out, split, _ = both_paths(net, post, x, bn_loader=_bn_loader())
    assert split.execution_plan is not None and split.execution_plan.split is None
    assert_same(split_out, full_out, atol=0.0)
    # Without it the body's BatchNorm never sees a sampled weight: split, and no stale-statistics warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        split = SWAGModule(net, post, task="classification", num_samples=12, seed=3)
    with pytest.warns(UserWarning, match="no bn_loader"):  # the full path samples the body's inputs
        full = SWAGModule(net, post, task="classification", num_samples=12, seed=3, split_forward=False)
    assert_same(split(x), full(x))
    assert split.execution_plan is not None and split.execution_plan.split == "head"


def test_split_capture_runs_once_per_batch() -> None:
    torch.manual_seed(5)
    net = ConvNet()
    calls = []
    net.body.register_forward_hook(lambda *_: calls.append(1))
    post = walk_posterior(net, ["head.*"])
    module = SWAGModule(net, post, task="classification", num_samples=20, seed=0, vectorize="loop")
    x = torch.randn(4, 3, 8, 8)
    module(x)  # the first batch also runs the checks
    calls.clear()
    module(x)
    module(x)
    assert len(calls) == 2


# ------------------------------------------------------------------ what can change from batch to batch
def swa_copy(net: nn.Module, post: SWAGPosterior) -> nn.Module:
    """The SWA model, independently: a copy of ``net`` holding the posterior's mean."""
    swa = copy.deepcopy(net).eval()
    post.load_into(swa)
    return swa


def signed_net() -> nn.Sequential:
    """``16 · tanh(x)`` from the head (index 2): positive for x > 0, negative for x < 0, then an in-place
    ReLU (index 3)."""
    net = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1), nn.ReLU(inplace=True))
    with torch.no_grad():
        net[0].weight.fill_(1.0)
        net[0].bias.zero_()
        net[2].weight.fill_(1.0)
        net[2].bias.zero_()
    return net


def near_posterior(net: nn.Module, include: list[str], step: float = 0.02, seed: int = 0) -> SWAGPosterior:
    """A posterior from small seeded steps around ``net``'s own weights (signs of outputs kept)."""
    post = SWAGPosterior.from_model(net, max_rank=4, include=include)
    tracked = set(post.param_names)
    g = torch.Generator().manual_seed(seed)
    for _ in range(5):
        walker = copy.deepcopy(net)
        with torch.no_grad():
            for name, p in walker.named_parameters():
                if name in tracked:
                    p.add_(step * torch.randn(p.shape, generator=g))
        post.collect(walker)
    return post


class ClampAfterHead(nn.Module):
    """``forward`` clamps the head's output (``16 · tanh(x)`` per output) to [-3, 3] in place: the output
    object is the head's, its values not always."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(1, 16), nn.Tanh())
        self.head = nn.Linear(16, 3)
        with torch.no_grad():
            self.body[0].weight.fill_(1.0)
            self.body[0].bias.zero_()
            self.head.weight.fill_(1.0)
            self.head.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        out = self.head(self.body(x))
        out.clamp_(-3, 3)
        return out


def test_an_in_place_relu_after_the_head_is_applied_on_every_batch() -> None:
    net = signed_net()
    post = near_posterior(net, ["2.*"])
    positive, negative = torch.linspace(0.5, 2.0, 6).unsqueeze(1), torch.linspace(-2.0, -0.5, 6).unsqueeze(1)
    module = SWAGModule(net, post, task="regression", scale=0.0, num_samples=1, seed=0)
    first, second = module(positive)["mean"], module(negative)["mean"]
    swa = swa_copy(net, post)
    with torch.no_grad():
        torch.testing.assert_close(first, swa(positive), atol=1e-6, rtol=0)
        torch.testing.assert_close(second, swa(negative), atol=1e-6, rtol=0)
    assert bool((second == 0).all())  # a ReLU's output: never negative
    plan = module.execution_plan
    assert plan is not None and plan.split is None and "in place" in str(plan.split_refused)


def test_an_in_place_relu_after_the_head_under_trainer_predict() -> None:
    """The same under Lightning's inference mode (inference tensors have no version counter)."""
    import lightning as L

    net = signed_net()
    post = near_posterior(net, ["2.*"])
    x = torch.cat([torch.linspace(0.5, 2.0, 8), torch.linspace(-2.0, -0.5, 8)]).unsqueeze(1)
    module = SWAGModule(net, post, task="regression", scale=0.0, num_samples=1, seed=0)
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    out = trainer.predict(module, DataLoader(TensorDataset(x), batch_size=8))
    means = torch.cat([o["mean"] for o in out])
    with torch.no_grad():
        torch.testing.assert_close(means, swa_copy(net, post)(x), atol=1e-6, rtol=0)
    assert bool((means[8:] == 0).all())


def test_an_in_place_clamp_in_forward_is_not_skipped() -> None:
    net = ClampAfterHead()
    post = near_posterior(net, ["head.*"])
    inside, outside = torch.linspace(-0.05, 0.05, 5).unsqueeze(1), torch.linspace(1.0, 2.0, 5).unsqueeze(1)
    for task in ("regression", "classification"):
        options = {"task": task, "num_samples": 8, "seed": 3}
        split = SWAGModule(net, post, **options)
        full = SWAGModule(net, post, split_forward=False, **options)
        assert_same(split(inside), full(inside))  # the first batch is inside the clamp's range
        assert_same(split(outside), full(outside))
    module = SWAGModule(net, post, task="regression", scale=0.0, num_samples=1, seed=0)
    module(inside)
    with torch.no_grad():
        torch.testing.assert_close(module(outside)["mean"], swa_copy(net, post)(outside), atol=1e-6, rtol=0)
    assert bool((module(outside)["mean"] <= 3).all())
    plan = module.execution_plan
    assert plan is not None and plan.split is None and "in place" in str(plan.split_refused)


class MicroBatchedHead(nn.Module):
    """Applies its head in micro-batches of 32 rows when the batch is larger."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 12), nn.ReLU())
        self.head = nn.Linear(12, 4)

    def forward(self, x: Tensor) -> Tensor:
        features = self.body(x)
        if len(x) <= 32:
            return self.head(features)
        return torch.cat([self.head(part) for part in features.split(32)])


def test_a_head_run_in_micro_batches_is_checked_on_every_batch() -> None:
    import lightning as L

    torch.manual_seed(7)
    net = MicroBatchedHead()
    post = walk_posterior(net, ["head.*"])
    x = torch.randn(128, 5)
    module = SWAGModule(net, post, task="classification", num_samples=10, seed=4)
    small = module(x[:4])["mean"]  # the first batch: one head call, the split is kept
    assert module.execution_plan is not None and module.execution_plan.split == "head"
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    out = trainer.predict(module, DataLoader(TensorDataset(x), batch_size=64))
    probs = torch.cat([o["mean"] for o in out])
    assert probs.shape == (128, 4)
    full = SWAGModule(net, post, task="classification", num_samples=10, seed=4, split_forward=False)
    torch.testing.assert_close(probs, full(x)["mean"], atol=1e-6, rtol=0)
    torch.testing.assert_close(probs, manual_bma(net, full, x), atol=1e-6, rtol=0)
    torch.testing.assert_close(small, full(x[:4])["mean"], atol=1e-6, rtol=0)
    plan = module.execution_plan
    assert plan is not None and plan.split == "head" and plan.split_fallbacks >= 2
    assert "runs 2 times" in str(plan.split_refused)


def test_multiswag_over_different_tracked_sets_uses_every_posterior() -> None:
    torch.manual_seed(8)
    net = ConvNet()
    head_only = walk_posterior(net, ["head.*"], seed=1)
    everything = walk_posterior(net, ["body.*", "head.*"], seed=2)
    x = torch.randn(6, 3, 8, 8)
    split_out, full_out, split, _ = both_paths(net, [head_only, everything], x)
    assert_same(split_out, full_out, atol=1e-6)
    torch.testing.assert_close(split_out["mean"], manual_bma(net, split, x), atol=1e-6, rtol=0)
    assert split.execution_plan is not None and split.execution_plan.split is None
    # two head-only posteriors still split, and agree with the whole model
    other_head = walk_posterior(net, ["head.*"], seed=3)
    split_out, full_out, split, _ = both_paths(net, [head_only, other_head], x)
    assert split.execution_plan is not None and split.execution_plan.split == "head"
    assert_same(split_out, full_out, atol=1e-6)


def test_batchnorm_after_the_tracked_head_warns() -> None:
    torch.manual_seed(9)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4), nn.BatchNorm1d(4))
    post = walk_posterior(net, ["2.*"])
    x = torch.randn(7, 6)
    module = SWAGModule(net, post, task="regression", num_samples=4, seed=0)
    with pytest.warns(UserWarning, match=r"'3' after the sampled weights.*no bn_loader"):
        module(x)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module(x)  # once only
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    # BatchNorm before the head only: no warning at all
    body_bn = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4))
    body_post = walk_posterior(body_bn.eval(), ["3.*"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SWAGModule(body_bn, body_post, task="regression", num_samples=4, seed=0)(x)


class MicroBatchedBatchNormHead(MicroBatchedHead):
    """A head with BatchNorm, applied in micro-batches of 32 rows when the batch is larger."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Sequential(nn.Linear(12, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 4))


def rows_into(layer: nn.Module) -> list[int]:
    """A list that records how many examples each call of ``layer`` gets."""
    rows: list[int] = []
    layer.register_forward_hook(lambda _m, args, _out: rows.append(args[0].shape[0]))
    return rows


def test_a_split_the_structure_refuses_costs_two_examples_not_a_batch() -> None:
    """The model's output is not the head's (a tanh after it): the first batch finds that on its first
    two examples, and then runs the whole model once per sample, with no wasted pass of the batch."""
    torch.manual_seed(12)
    net = nn.Sequential(nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, 3), nn.Tanh())
    rows = rows_into(net[0])
    post = walk_posterior(net, ["2.*"])
    module = SWAGModule(net, post, task="regression", num_samples=7, seed=0, vectorize="loop")
    x = torch.randn(6, 5)
    out = module(x)
    plan = module.execution_plan
    assert plan is not None and plan.split is None and "not the output of '2'" in plan.split_refused
    assert rows == [2] + [6] * 7
    assert_same(out, SWAGModule(net, post, task="regression", num_samples=7, seed=0, split_forward=False)(x))


def test_the_batchnorm_refresh_checks_every_training_batch() -> None:
    torch.manual_seed(10)
    net = MicroBatchedBatchNormHead()
    post = walk_posterior(net, ["head.*"])
    g = torch.Generator().manual_seed(1)
    loader = DataLoader(TensorDataset(torch.randn(128, 5, generator=g)), batch_size=64)  # two head calls each
    x = torch.randn(6, 5)
    split_out, full_out, split, _ = both_paths(net, post, x, bn_loader=loader)
    assert split.execution_plan is not None and split.execution_plan.split == "head"
    assert_same(split_out, full_out, atol=1e-5)


def test_the_first_batch_runs_the_whole_batch_once_and_the_check_on_two_examples() -> None:
    """The first-batch check runs the batch's first two examples with the model's own weights, the
    whole batch once (the per-batch checks, and the head inputs the batch then uses), and the two
    examples under perturbed weights."""
    torch.manual_seed(11)
    net = nn.Sequential(nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, 3))
    rows = rows_into(net[0])
    post = walk_posterior(net, ["2.*"])
    module = SWAGModule(net, post, task="classification", num_samples=7, seed=0, vectorize="loop")
    x = torch.randn(6, 5)
    first = module(x)
    assert module.execution_plan is not None and module.execution_plan.split == "2"
    assert rows == [2, 6, 2]
    full = SWAGModule(net, post, task="classification", num_samples=7, seed=0, split_forward=False)
    assert_same(first, full(x))
    rows.clear()
    module(x)
    assert rows == [6]


class FixedBatchBody(nn.Module):
    """A body that only runs on batches of 6 (a reshape with the batch size written in), so the
    check on two examples fails to run: the whole batch is checked instead."""

    def __init__(self, reads_head: bool) -> None:
        super().__init__()
        self.body = nn.Linear(5, 12)
        self.head = nn.Linear(12, 3)
        self.reads_head = reads_head

    def forward(self, x: Tensor) -> Tensor:
        h = self.body(x).reshape(6, 12)
        if self.reads_head:
            h = h + self.head.bias.sum()
        return self.head(h)


@pytest.mark.parametrize("reads_head", [False, True])
def test_a_model_that_cannot_run_on_two_examples_is_checked_whole(reads_head: bool) -> None:
    torch.manual_seed(12)
    net = FixedBatchBody(reads_head)
    post = walk_posterior(net, ["head.*"])
    module = SWAGModule(net, post, task="regression", num_samples=5, seed=0)
    x = torch.randn(6, 5)
    out = module(x)
    plan = module.execution_plan
    assert plan is not None
    if reads_head:
        assert plan.split is None and "depend on the tracked weights" in str(plan.split_refused)
    else:
        assert plan.split == "head"
    full = SWAGModule(net, post, task="regression", num_samples=5, seed=0, split_forward=False)
    assert_same(out, full(x))
