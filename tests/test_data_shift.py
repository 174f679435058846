"""The shift generators of the shift benchmark (``lightning_swag.experiments.data.shift``): a rotation
by 0° (or 360°) is the identity and by 90° the exact pixel permutation, every corruption's distance
from the clean images grows with its severity, and the same seed gives the same images."""

from __future__ import annotations

import pytest
import torch

from lightning_swag.experiments.data import shift


def digits(n: int = 8, seed: int = 0) -> torch.Tensor:
    """Images in [0, 1] with structure (a bright stroke on a dark field), [n, 1, 28, 28]."""
    g = torch.Generator().manual_seed(seed)
    images = 0.1 * torch.rand(n, 1, 28, 28, generator=g)
    images[:, :, 6:22, 12:16] = 0.9
    images[:, :, 6:10, 8:20] = 0.8
    return images


@pytest.mark.parametrize("degrees", [0.0, 360.0])
def test_a_full_or_no_turn_is_the_identity(degrees: float) -> None:
    images = digits()
    torch.testing.assert_close(shift.rotate(images, degrees), images, atol=1e-5, rtol=0)


def test_a_quarter_turn_is_the_pixel_permutation() -> None:
    """Counter-clockwise, as numpy's and torch's rot90 (an independent, exact permutation)."""
    images = digits()
    torch.testing.assert_close(
        shift.rotate(images, 90.0), torch.rot90(images, 1, dims=(2, 3)), atol=1e-5, rtol=0
    )


def test_rotations_move_the_images_more_as_the_angle_grows_to_ninety() -> None:
    images = digits()
    moved = [float((shift.rotate(images, a) - images).abs().mean()) for a in (15, 30, 45, 90)]
    assert moved == sorted(moved) and moved[0] > 0.01


@pytest.mark.parametrize("kind", sorted(shift.CORRUPTIONS))
def test_severities_are_monotone_and_seeded(kind: str) -> None:
    images = digits()
    before = images.clone()
    corrupted = [shift.corrupt(images, kind, s, seed=3) for s in shift.SEVERITIES]
    distance = [float((c - images).abs().mean()) for c in corrupted]
    assert distance == sorted(distance) and distance[0] > 0 and len(set(distance)) == len(distance)
    assert all(c.shape == images.shape and c.min() >= 0 and c.max() <= 1 for c in corrupted)
    assert torch.equal(images, before)  # the input is never modified
    assert torch.equal(shift.corrupt(images, kind, 2, seed=3), corrupted[1])  # same seed, same images


def test_the_noise_depends_on_the_seed_only() -> None:
    images = digits()
    a, b = shift.corrupt(images, "noise", 3, seed=1), shift.corrupt(images, "noise", 3, seed=2)
    assert not torch.equal(a, b)
    torch.manual_seed(123)  # the global RNG plays no part
    assert torch.equal(shift.corrupt(images, "noise", 3, seed=1), a)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="severity must be one of"):
        shift.corrupt(digits(), "blur", 6)
    with pytest.raises(ValueError, match="kind must be one of"):
        shift.corrupt(digits(), "fog", 1)
    with pytest.raises(ValueError, match=r"images must be a float tensor \[N, C, H, W\]"):
        shift.rotate(torch.zeros(28, 28), 15.0)
