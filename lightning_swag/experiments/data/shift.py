"""Distribution shift generated on the fly from clean images (no download): rotations and seeded
corruptions at five severities, as in Ovadia et al. (2019), for the shift benchmark (issue #30).

Every function takes images ``[N, C, H, W]`` with pixel values in ``[0, 1]`` (before any
normalisation) and returns new images of the same shape and dtype in ``[0, 1]``; the input is never
modified. Random corruptions take a ``torch.Generator`` (the global RNG is never used).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "CORRUPTIONS",
    "SEVERITIES",
    "corrupt",
    "gaussian_blur",
    "gaussian_noise",
    "lower_contrast",
    "rotate",
]

SEVERITIES = (1, 2, 3, 4, 5)
_NOISE_STD = (0.08, 0.16, 0.24, 0.32, 0.40)
_BLUR_SIGMA = (0.5, 0.8, 1.1, 1.4, 1.7)
_CONTRAST = (0.6, 0.45, 0.3, 0.2, 0.1)


def _check(images: Tensor) -> None:
    if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point():
        raise ValueError(
            f"images must be a float tensor [N, C, H, W], got {getattr(images, 'shape', images)!r}"
        )


def _level(severity: int, table: tuple[float, ...]) -> float:
    if isinstance(severity, bool) or severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, got {severity!r}")
    return table[severity - 1]


def rotate(images: Tensor, degrees: float) -> Tensor:
    """``images`` rotated counter-clockwise by ``degrees`` about their centre (bilinear, zero fill)."""
    _check(images)
    angle = math.radians(degrees)
    cos, sin = math.cos(angle), math.sin(angle)
    theta = images.new_tensor([[cos, -sin, 0.0], [sin, cos, 0.0]]).expand(images.shape[0], 2, 3)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False).clamp(0, 1)


def gaussian_noise(images: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    """Additive Gaussian pixel noise, clipped to ``[0, 1]``."""
    _check(images)
    std = _level(severity, _NOISE_STD)
    noise = torch.randn(images.shape, generator=generator, dtype=images.dtype, device=images.device)
    return (images + std * noise).clamp(0, 1)


def gaussian_blur(images: Tensor, severity: int, generator: torch.Generator | None = None) -> Tensor:
    """A Gaussian blur (separable kernel, reflected borders); deterministic, ``generator`` unused."""
    _check(images)
    sigma = _level(severity, _BLUR_SIGMA)
    radius = math.ceil(3 * sigma)
    x = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    channels = images.shape[1]
    out = F.pad(images, (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    out = F.conv2d(out, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)
    return out.clamp(0, 1)


def lower_contrast(images: Tensor, severity: int, generator: torch.Generator | None = None) -> Tensor:
    """Each image pulled towards its own mean intensity; deterministic, ``generator`` unused."""
    _check(images)
    factor = _level(severity, _CONTRAST)
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    return ((images - mean) * factor + mean).clamp(0, 1)


CORRUPTIONS: dict[str, Callable[[Tensor, int, torch.Generator], Tensor]] = {
    "noise": gaussian_noise,
    "blur": gaussian_blur,
    "contrast": lower_contrast,
}
"""The corruption kinds by name: ``fn(images, severity, generator)``."""


def corrupt(images: Tensor, kind: str, severity: int, seed: int = 0) -> Tensor:
    """``CORRUPTIONS[kind]`` at ``severity``, its randomness fixed by ``seed``."""
    if kind not in CORRUPTIONS:
        raise ValueError(f"kind must be one of {sorted(CORRUPTIONS)}, got {kind!r}")
    generator = torch.Generator(device=images.device).manual_seed(seed)
    return CORRUPTIONS[kind](images, severity, generator)
