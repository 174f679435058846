"""Small synthetic MNIST-shaped data sets written as real IDX files.

Tests (and anyone without the real data) use these so the *same* loading code runs as on the
real MNIST: :func:`write_synthetic_idx` writes the four uncompressed IDX files in torchvision's
layout, ``<root>/<dataset>/raw/``, which ``torchvision.datasets.MNIST(root, download=False)``
(or ``FashionMNIST``) then loads as it would the originals.

Every class gets its own bright square at a fixed place on a 28x28 canvas, jittered by a pixel or
two and overlaid with noise, so a small classifier learns them within an epoch; the
``FashionMNIST`` flavour draws horizontal bars instead, so it looks different from the ``MNIST`` one
(useful as out-of-distribution input).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

SyntheticDatasetName = Literal["MNIST", "FashionMNIST"]

IMAGE_SIDE = 28
NUM_CLASSES = 10
_IDX_UBYTE_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
_IDX_UBYTE_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension
_BLOB_SIDE = 6
# Top-left corner of each class's blob on a 4x3 grid of the 28x28 canvas (MNIST flavour).
_BLOB_CORNERS = [(2 + 8 * (k // 4), 2 + 6 * (k % 4)) for k in range(NUM_CLASSES)]


def _write_idx(path: Path, data: Tensor, magic: int) -> None:
    """Write a uint8 tensor as an IDX file: big-endian magic, one int32 per dimension, raw bytes."""
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", size) for size in data.shape)
    path.write_bytes(header + data.contiguous().numpy().tobytes())


def synthetic_images(
    num_images: int, dataset: SyntheticDatasetName = "MNIST", seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Class-dependent 28x28 uint8 images and their int64 labels (balanced over the 10 classes).

    Args:
        num_images: how many images to make.
        dataset: ``"MNIST"`` draws a square per class, ``"FashionMNIST"`` a horizontal bar per class.
        seed: seeds a local ``torch.Generator`` (global random state is left alone).

    Returns:
        ``(images [num_images, 28, 28] uint8, labels [num_images] int64)``.
    """
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}.")
    if dataset not in ("MNIST", "FashionMNIST"):
        raise ValueError(f"dataset must be 'MNIST' or 'FashionMNIST', got {dataset!r}.")
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_images) % NUM_CLASSES
    labels = labels[torch.randperm(num_images, generator=generator)]
    images = torch.rand(num_images, IMAGE_SIDE, IMAGE_SIDE, generator=generator) * 60.0
    jitter = torch.randint(-1, 2, (num_images, 2), generator=generator)
    brightness = 170.0 + 85.0 * torch.rand(num_images, generator=generator)
    for index in range(num_images):
        label = int(labels[index])
        dy, dx = int(jitter[index, 0]), int(jitter[index, 1])
        if dataset == "MNIST":
            top, left = _BLOB_CORNERS[label]
            top, left = max(top + dy, 0), max(left + dx, 0)
            images[index, top : top + _BLOB_SIDE, left : left + _BLOB_SIDE] = brightness[index]
        else:
            row = max(1 + 2 * label + dy, 0)
            images[index, row : row + 2, 4 + dx : 24 + dx] = brightness[index]
    return images.round().clamp_(0, 255).to(torch.uint8), labels.to(torch.int64)


def write_synthetic_idx(
    root: str | Path,
    dataset: SyntheticDatasetName = "MNIST",
    num_train: int = 600,
    num_test: int = 200,
    seed: int = 0,
) -> Path:
    """Write a small learnable MNIST-like data set as uncompressed IDX files torchvision can load.

    Writes ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and
    ``t10k-labels-idx1-ubyte`` into ``<root>/<dataset>/raw/`` (existing files are overwritten).

    Args:
        root: the data root, i.e. what you pass as ``data_dir`` / torchvision's ``root``.
        dataset: ``"MNIST"`` or ``"FashionMNIST"`` (the folder name and the image style).
        num_train: number of training images.
        num_test: number of test images.
        seed: seed for the images; train and test use different streams derived from it.

    Returns:
        The ``raw`` folder the files were written to.
    """
    raw_dir = Path(root) / dataset / "raw"
    raw_dir.mkdir(parents=True, exist_ok=True)
    # 2 * seed and 2 * seed + 1 keep the train and test streams apart for every seed.
    for prefix, count, split_seed in (("train", num_train, 2 * seed), ("t10k", num_test, 2 * seed + 1)):
        images, labels = synthetic_images(count, dataset=dataset, seed=split_seed)
        _write_idx(raw_dir / f"{prefix}-images-idx3-ubyte", images, _IDX_UBYTE_IMAGES_MAGIC)
        _write_idx(raw_dir / f"{prefix}-labels-idx1-ubyte", labels.to(torch.uint8), _IDX_UBYTE_LABELS_MAGIC)
    return raw_dir


def example_data(tmp_path: Path, num_train: int, num_test: int) -> tuple[str, list[str]]:
    """The data root of an example's end-to-end test and the options it needs: ``LIGHTNING_SWAG_DATA``
    as is, else synthetic MNIST and Fashion-MNIST written under ``tmp_path`` with ``--subset`` and
    ``--test-subset`` set to their sizes."""
    data_dir = os.environ.get("LIGHTNING_SWAG_DATA")
    if data_dir:
        return data_dir, []
    data_dir = str(tmp_path / "data")
    for dataset in ("MNIST", "FashionMNIST"):
        write_synthetic_idx(data_dir, dataset, num_train=num_train, num_test=num_test)
    return data_dir, ["--subset", str(num_train), "--test-subset", str(num_test)]
