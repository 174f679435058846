"""The experiments' baselines (``lightning_swag.experiments.baselines``) against explicit computations."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

from lightning_swag.experiments import baselines


def nets(count: int) -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Linear(5, 3) for _ in range(count)]


def test_softmax_divides_the_logits_by_the_temperature() -> None:
    (net,) = nets(1)
    x = torch.randn(8, 5)
    with torch.no_grad():
        logits = net(x)
        torch.testing.assert_close(baselines.softmax(net)(x), torch.softmax(logits, dim=-1))
        scaled = baselines.softmax(net, temperature=2.0)(x)
        expected = torch.exp(logits / 2) / torch.exp(logits / 2).sum(dim=-1, keepdim=True)
        torch.testing.assert_close(scaled, expected)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        baselines.softmax(net, temperature=0.0)


def test_an_ensemble_averages_its_members_probabilities() -> None:
    members = nets(3)
    x = torch.randn(8, 5)
    with torch.no_grad():
        expected = sum(torch.softmax(m(x), dim=-1) for m in members) / 3
        torch.testing.assert_close(baselines.ensemble(members)(x), expected)
    with pytest.raises(ValueError, match="at least one member"):
        baselines.ensemble([])


@pytest.mark.skipif(
    importlib.util.find_spec("laplace") is None, reason="needs laplace-torch (the examples extra)"
)
def test_last_layer_laplace_is_less_confident_than_the_map_network() -> None:
    """The GLM probit predictive shrinks the MAP logits by ``1 / sqrt(1 + pi/8 var)``: probabilities,
    different from the MAP network's, less confident on average."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    predict = baselines.laplace_last_layer(model, (x, y))
    assert predict is not None
    probs = predict(x[:10])
    torch.testing.assert_close(probs.sum(dim=-1), torch.ones(10))
    with torch.no_grad():
        map_probs = torch.softmax(model(x[:10]), dim=-1)
    assert not torch.allclose(probs, map_probs)
    assert float(probs.max(dim=-1).values.mean()) < float(map_probs.max(dim=-1).values.mean())
