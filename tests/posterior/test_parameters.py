"""Which parameters a posterior tracks: ``include`` checked when built and when fit starts, and a
posterior whose names differ from the model's by a prefix says which module to pass."""

from __future__ import annotations

import pytest
import torch
from conftest import random_walk_posterior
from torch import nn

from lightning_swag import SWAGCallback, SWAGModule
from lightning_swag.posterior.parameters import check_include


class Wrapper(nn.Module):
    """A module that holds the network as ``net`` (a LightningModule usually does)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


@pytest.mark.parametrize("include", [123, 1.5, {"head": 1}.values(), b"head"])
def test_include_of_the_wrong_type_says_what_is_accepted(include) -> None:
    with pytest.raises(ValueError, match=r"SWAGCallback: include must be a preset .* or None; got") as err:
        SWAGCallback(include=include)
    assert f"(a {type(include).__name__})" in str(err.value)


def test_include_is_kept_as_a_list_or_a_string() -> None:
    assert check_include(("head.*", "body.0")) == ["head.*", "body.0"]
    assert check_include("lora") == "lora" and check_include(None) is None


def test_include_matching_nothing_lists_the_names() -> None:
    from lightning_swag.posterior.parameters import check_include_matches

    with pytest.raises(ValueError, match=r"include=\['hed\.\*'\] matches no parameter of Sequential") as err:
        check_include_matches(_net(), ["hed.*"], "SWAGCallback")
    assert "0.weight" in str(err.value) and "2.bias" in str(err.value)
    frozen = _net().requires_grad_(False)  # frozen now, perhaps unfrozen before the first snapshot
    check_include_matches(frozen, ["2.*"])
    check_include_matches(frozen, None)


def test_posterior_of_a_wrapper_applied_to_its_inner_module_names_the_prefix() -> None:
    wrapper = Wrapper(_net())
    post = random_walk_posterior(wrapper)  # names net.0.weight, ...
    with pytest.raises(ValueError, match=r"with the prefix 'net\.'") as err:
        SWAGModule(wrapper.net, post, task="regression")
    assert "Pass that outer module as model" in str(err.value)
    SWAGModule(wrapper, post, task="regression")  # the fix the message gives


def test_posterior_of_an_inner_module_applied_to_its_wrapper_names_the_submodule() -> None:
    wrapper = Wrapper(_net())
    post = random_walk_posterior(wrapper.net)  # names 0.weight, ...
    with pytest.raises(ValueError, match=r"with the prefix 'net\.'") as err:
        SWAGModule(wrapper, post, task="regression")
    assert "Pass that submodule as model (model.net)" in str(err.value)
    SWAGModule(wrapper.net, post, task="regression")


def test_another_architecture_is_not_taken_for_a_prefix() -> None:
    post = random_walk_posterior(Wrapper(_net()))
    other = Wrapper(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)))  # another head shape
    with pytest.raises(ValueError, match="Use the posterior collected from this architecture") as err:
        SWAGModule(other.net, post, task="regression")
    assert "prefix" not in str(err.value)
