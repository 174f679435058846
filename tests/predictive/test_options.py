"""The option checks and the ``Option`` descriptor: values checked when set, the owner told."""

from __future__ import annotations

import pytest
import torch

from lightning_swag.predictive.options import Option, check_option


class Owner:
    """A stand-in for ``SWAGModule``: records what it was told."""

    scale = Option("scale")
    noise = Option("noise")
    return_samples = Option("return_samples", resets=False)

    def __init__(self) -> None:
        self.told: list[bool] = []

    def options_changed(self, resets: bool) -> None:
        self.told.append(resets)


def test_values_are_normalised() -> None:
    assert check_option("noise", 1) == 1.0 and isinstance(check_option("noise", 1), float)
    assert check_option("noise", "heteroscedastic") == "heteroscedastic"
    assert check_option("noise", None) is None
    assert check_option("scale", 2) == 2.0 and isinstance(check_option("scale", 2), float)
    for name, value in [
        ("num_samples", 30),
        ("chunk_size", None),
        ("chunk_size", 4),
        ("covariance", "diagonal"),
        ("vectorize", True),
        ("vectorize", "loop"),
        ("bn_num_batches", 0.5),
        ("class_dim", -1),
        ("ignore_index", -100),
        ("seed", 0),
        ("link_approx", "mc"),
        ("memory_format", "preserve"),
        ("task", "multilabel"),
        ("predictive", "linearized"),
        ("output_transform", torch.log),
    ]:
        assert check_option(name, value) is value


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("num_samples", 0, "num_samples must be an int >= 1"),
        ("scale", -1.0, "scale must be a finite number >= 0"),
        ("noise", 0.0, "noise must be None, a noise standard deviation"),
        ("noise", "homoscedastic", "noise must be None, a noise standard deviation"),
        ("chunk_size", 0, "chunk_size must be an int >= 1 or None"),
        ("covariance", "full", "covariance must be one of"),
        ("vectorize", "fast", "vectorize must be one of"),
        ("bn_num_batches", 0, "bn_num_batches must be an int >= 1, a float in"),
        ("class_dim", 0, "class_dim must be None or a non-zero int"),
        ("class_dim", True, "class_dim must be None or a non-zero int"),
        ("ignore_index", 1.0, "ignore_index must be an int"),
        ("return_samples", 1, "return_samples must be True or False"),
        ("split_forward", None, "split_forward must be True or False"),
        ("seed", -1, "seed must be an int"),
        ("link_approx", "laplace", "link_approx must be one of"),
        ("task", "segmentation", "task must be one of"),
        ("predictive", "ensemble", "predictive must be one of"),
    ],
)
def test_bad_values_are_refused_with_the_option_named(name, value, message) -> None:
    with pytest.raises(ValueError, match=message):
        check_option(name, value)


def test_output_transform_must_be_callable() -> None:
    with pytest.raises(TypeError, match="output_transform must be callable or None, got int"):
        check_option("output_transform", 3)


def test_setting_an_option_checks_it_and_tells_the_owner() -> None:
    owner = Owner()
    owner.scale = 1
    owner.noise = 2
    owner.return_samples = True
    assert (owner.scale, owner.noise, owner.return_samples) == (1.0, 2.0, True)
    assert isinstance(owner.noise, float)
    assert owner.told == [True, True, False]  # return_samples does not rebuild the predictive
    with pytest.raises(ValueError, match="scale must be a finite number >= 0"):
        owner.scale = float("inf")
    assert owner.scale == 1.0 and owner.told == [True, True, False]  # refused: nothing changed
    assert isinstance(Owner.scale, Option) and Owner.scale.name == "scale"


def test_an_option_without_a_check_is_a_programming_error() -> None:
    with pytest.raises(KeyError, match="no check for option 'temperature'"):
        Option("temperature")
