"""The model runner: outputs under a chunk of weight samples equal the model run with each sample loaded."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lightning_swag.predictive.runner import (
    ModelRunner,
    PreparedInputs,
    channels_last_in_place,
    extract_output,
)
from lightning_swag.predictive.vectorize import OutputTypeError


def _runner(model: nn.Module, vectorize: str = "loop", **options) -> ModelRunner:
    settings = {
        "output_transform": None,
        "accepts_pairs": False,
        "memory_format": "preserve",
        "split_forward": False,
        "in_place": False,
    }
    settings.update(options)
    tracked = [name for name, _ in model.named_parameters()]
    return ModelRunner(model, tracked, vectorize=vectorize, **settings)


def _chunk(model: nn.Module, num: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        name: p.detach() + 0.1 * torch.randn((num, *p.shape), generator=g)
        for name, p in model.named_parameters()
    }


def _loaded(model: nn.Module, chunk: dict[str, torch.Tensor], index: int) -> nn.Module:
    """A copy of ``model`` with sample ``index`` of ``chunk`` written into its parameters."""
    copied = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in copied.named_parameters():
            p.copy_(chunk[name][index])
    return copied


@pytest.mark.parametrize("vectorize", ["loop", "vmap"])
def test_outputs_are_those_of_the_model_with_each_sample_loaded(vectorize) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    chunk, x = _chunk(model, 4, seed=1), torch.randn(6, 3)
    runner = _runner(model, vectorize)
    outputs = runner.run(chunk, runner.prepare_inputs(x), {})
    assert outputs.shape == (4, 6, 2)
    for s in range(4):
        torch.testing.assert_close(outputs[s], _loaded(model, chunk, s)(x))
    for key, value in model.state_dict().items():  # the model itself is never modified
        assert torch.equal(value, before[key])
    assert runner.plan.vectorize == vectorize


class Tied(nn.Module):
    """An embedding tied to the output layer (as language models are)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 4)
        self.head = nn.Linear(4, 7, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(tokens)))


def test_a_sample_of_tied_weights_replaces_every_name_of_them() -> None:
    torch.manual_seed(1)
    model = Tied()
    chunk, tokens = _chunk(model, 3, seed=2), torch.tensor([[0, 3, 6], [1, 2, 5]])
    assert list(chunk) == ["embed.weight"]
    runner = _runner(model)
    outputs = runner.run(chunk, PreparedInputs(tokens, None), {})
    for s in range(3):
        weight = chunk["embed.weight"][s]
        torch.testing.assert_close(outputs[s], torch.tanh(weight[tokens]) @ weight.T)


def test_buffers_given_per_sample_replace_the_models() -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).eval()
    chunk, x = _chunk(model, 2, seed=3), torch.randn(5, 3)
    means = torch.randn(2, 4, generator=torch.Generator().manual_seed(4))
    outputs = _runner(model).run(chunk, PreparedInputs(x, None), {"1.running_mean": means})
    for s in range(2):
        loaded = _loaded(model, chunk, s)
        loaded[1].running_mean.copy_(means[s])
        torch.testing.assert_close(outputs[s], loaded(x))


def test_extract_output_picks_the_tensor_to_average() -> None:
    logits = torch.randn(2, 3)
    assert extract_output(logits, None, False, "Net") is logits
    assert extract_output({"logits": logits, "loss": 0}, None, False, "Net") is logits
    assert extract_output(SimpleNamespace(logits=logits), None, False, "Net") is logits
    assert extract_output((logits, 1), lambda out: out[0], False, "Net") is logits
    pair = (logits, logits.exp())
    assert extract_output(pair, None, True, "Net") is pair
    with pytest.raises(OutputTypeError, match="Net.forward returned a tuple"):
        extract_output(pair, None, False, "Net")
    with pytest.raises(OutputTypeError, match="output_transform returned a dict"):
        extract_output(logits, lambda out: {"x": out}, False, "Net")


@pytest.mark.parametrize("shape", [(3, 4, 2, 3, 3), (2, 5, 1, 1, 1), (2, 3, 4, 1, 1)])
def test_channels_last_in_place_keeps_the_values_and_lays_each_sample_out_channels_last(shape) -> None:
    weights = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    expected = weights.clone()
    out = channels_last_in_place(weights)
    assert torch.equal(out, expected)
    for s in range(shape[0]):
        assert out[s].is_contiguous(memory_format=torch.channels_last)
    strided = torch.randn(shape[1], shape[0], *shape[2:]).transpose(0, 1)  # slices not contiguous
    assert torch.equal(channels_last_in_place(strided), strided)


class Flattens(nn.Module):
    """A conv net whose ``.view`` needs contiguous (not channels-last) activations."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.head = nn.Linear(3 * 4 * 4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).view(x.shape[0], -1))


def test_auto_memory_format_runs_channels_last_only_where_the_model_accepts_it() -> None:
    torch.manual_seed(3)
    x = torch.randn(4, 2, 4, 4)
    conv_net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(48, 2))
    for model, accepts in ((conv_net, True), (Flattens(), False)):
        runner = _runner(model, memory_format="auto")
        runner.decide(x, {})
        assert runner.plan.channels_last is accepts
        chunk = runner.prepare_chunk(_chunk(model, 2, seed=6))
        outputs = runner.run(chunk, runner.prepare_inputs(x), {})
        for s in range(2):
            torch.testing.assert_close(outputs[s], _loaded(model, chunk, s)(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="memory_format='channels_last' needs a model with Conv2d layers"):
        _runner(nn.Linear(3, 2), memory_format="channels_last").decide(torch.randn(2, 3), {})
