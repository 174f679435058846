"""Vectorise or loop: both paths give the same predictions, and the choice can be forced."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import random_walk_posterior
from torch import nn

import lightning_swag.predictive.vectorize as vectorize
from lightning_swag import SWAGModule, SWAGPosterior
from lightning_swag.predictive.runner import channels_last_in_place


def _posterior(net: nn.Module, snapshots: int = 6) -> SWAGPosterior:
    return random_walk_posterior(net, snapshots, step=0.05)


def _architectures() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    conv = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 7 * 7, 3)
    )
    layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True)
    encoder = nn.Sequential(
        nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False),
        nn.Flatten(),
        nn.Linear(8 * 5, 3),
    )
    return {
        "mlp": (nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)), torch.randn(9, 6)),
        "conv": (conv, torch.randn(5, 1, 14, 14)),
        "transformer": (encoder, torch.randn(4, 5, 8)),
    }


@pytest.mark.parametrize("name", ["mlp", "conv", "transformer"])
def test_vmap_and_loop_give_the_same_predictions(name: str) -> None:
    net, x = _architectures()[name]
    post = _posterior(net)
    out = {
        mode: SWAGModule(
            net, post, num_samples=5, seed=3, task="classification", vectorize=mode, return_samples=True
        )(x)
        for mode in ("vmap", "loop", "auto")
    }
    for mode in ("loop", "auto"):
        torch.testing.assert_close(out[mode]["samples"], out["vmap"]["samples"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out[mode]["mean"], out["vmap"]["mean"], rtol=1e-4, atol=1e-6)


class _Spy:
    """Counts calls of torch.func.vmap made by lightning_swag.predictive.vectorize."""

    def __init__(self, real) -> None:
        self.real, self.calls = real, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.real(*args, **kwargs)


@pytest.mark.parametrize("forced, uses_vmap", [("vmap", True), (True, True), ("loop", False), (False, False)])
def test_the_choice_can_be_forced(monkeypatch: pytest.MonkeyPatch, forced, uses_vmap: bool) -> None:
    net, x = _architectures()["mlp"]
    post = _posterior(net)
    spy = _Spy(vectorize.vmap)
    monkeypatch.setattr(vectorize, "vmap", spy)
    # whatever the timing rule would say
    monkeypatch.setattr(vectorize, "FAST_CALL_SECONDS", float("inf") if not uses_vmap else 0.0)
    bma = SWAGModule(net, post, num_samples=4, seed=0, vectorize=forced)
    bma(x)
    assert (spy.calls > 0) == uses_vmap
    assert bma.execution_plan.vectorize == ("vmap" if uses_vmap else "loop")


@pytest.mark.parametrize("threshold, chosen", [(float("inf"), "vmap"), (0.0, "loop")])
def test_auto_times_the_first_samples_on_a_cpu(
    monkeypatch: pytest.MonkeyPatch, threshold: float, chosen: str
) -> None:
    net, x = _architectures()["mlp"]
    post = _posterior(net)
    monkeypatch.setattr(vectorize, "FAST_CALL_SECONDS", threshold)
    bma = SWAGModule(net, post, num_samples=6, seed=0, return_samples=True)
    out = bma(x)
    assert bma.execution_plan.vectorize == chosen
    forced = SWAGModule(net, post, num_samples=6, seed=0, return_samples=True, vectorize=chosen)(x)
    # every sample of the run came from the chosen path: bit for bit what that path gives
    torch.testing.assert_close(out["samples"], forced["samples"], rtol=0, atol=0)


def test_auto_on_an_accelerator_is_vmap() -> None:
    assert vectorize.choose_vectorization("auto", "cuda") == "vmap"
    assert vectorize.choose_vectorization("auto", "cpu") == "auto"
    with pytest.raises(ValueError, match="vectorize"):
        vectorize.choose_vectorization("sometimes", "cpu")  # type: ignore[arg-type]


# ---------------------------------------------------------------------- memory format of conv nets


class _ViewAfterConv(nn.Module):
    """Flattens with .view, which needs contiguous activations: channels-last would break it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4 * 14 * 14, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        return self.head(h.view(h.shape[0], -1))


def test_conv_nets_run_channels_last_on_a_cpu_with_the_same_predictions() -> None:
    net, x = _architectures()["conv"]
    post = _posterior(net)
    auto = SWAGModule(net, post, num_samples=5, seed=3, task="classification", return_samples=True)
    preserve = SWAGModule(
        net, post, num_samples=5, seed=3, task="classification", return_samples=True, memory_format="preserve"
    )
    a, p = auto(x), preserve(x)
    assert auto.execution_plan.channels_last is True and preserve.execution_plan.channels_last is False
    torch.testing.assert_close(a["samples"], p["samples"], rtol=1e-4, atol=1e-5)
    # the model itself is untouched: its weights keep their layout
    assert all(w.is_contiguous() for w in net.parameters())


@pytest.mark.parametrize("chunk_size", [1, 3])
def test_channels_last_samples_equal_the_plain_ones_for_any_kernel(chunk_size: int) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),  # one input channel: already channels-last as it comes
        nn.ReLU(),
        nn.Conv2d(4, 4, 1),  # 1×1: already channels-last as it comes
        nn.Conv2d(4, 3, (1, 3)),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    post, x = _posterior(net), torch.randn(4, 1, 8, 8)
    layouts: list[bool] = []
    for conv in (net[0], net[2], net[3]):
        conv.register_forward_pre_hook(  # the canonical channels-last strides, which pick the kernel
            lambda m, _: layouts.append(
                m.weight.stride() == torch.empty(m.weight.shape, memory_format=torch.channels_last).stride()
            )
        )
    common = dict(num_samples=5, seed=3, task="classification", return_samples=True, vectorize="loop")
    cl = SWAGModule(net, post, chunk_size=chunk_size, memory_format="channels_last", **common)(x)
    assert layouts and all(layouts)  # every sampled conv weight reached the forward channels-last
    plain = SWAGModule(net, post, chunk_size=chunk_size, memory_format="preserve", **common)(x)
    torch.testing.assert_close(cl["samples"], plain["samples"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(4, 2, 3, 5), (4, 1, 3, 3), (4, 2, 1, 1)])
def test_sampled_conv_weights_are_rewritten_channels_last_in_their_own_storage(
    shape: tuple[int, ...],
) -> None:
    numel = math.prod(shape)
    flat = torch.randn(3, 100 + numel)  # a chunk of samples: other weights, then one conv weight
    weights = flat[:, 100:].reshape(3, *shape)
    want = [w.clone() for w in weights]
    out = channels_last_in_place(weights)
    assert out.data_ptr() == weights.data_ptr()  # no second copy of the chunk
    canonical = torch.empty(shape, memory_format=torch.channels_last).stride()
    for sample, expected in zip(out, want, strict=True):
        assert sample.stride() == canonical
        torch.testing.assert_close(sample, expected, rtol=0, atol=0)


def test_a_model_that_needs_contiguous_activations_keeps_its_layout() -> None:
    torch.manual_seed(0)
    net = _ViewAfterConv()
    post = _posterior(net)
    x = torch.randn(6, 3, 14, 14)
    channels_last_conv = {
        "conv.weight": net.conv.weight.detach().contiguous(memory_format=torch.channels_last)
    }
    with pytest.raises(RuntimeError, match="view"):  # why the trial forward says no
        torch.func.functional_call(net, channels_last_conv, (x,))
    bma = SWAGModule(net, post, num_samples=3, seed=0, task="classification")
    out = bma(x)
    assert bma.execution_plan.channels_last is False and out["mean"].shape == (6, 3)


def test_forcing_channels_last_needs_a_conv_net() -> None:
    net, x = _architectures()["mlp"]
    with pytest.raises(ValueError, match="Conv2d"):
        SWAGModule(net, _posterior(net), memory_format="channels_last")(x)
    with pytest.raises(ValueError, match="memory_format"):
        SWAGModule(net, _posterior(net), memory_format="nhwc")  # type: ignore[arg-type]
