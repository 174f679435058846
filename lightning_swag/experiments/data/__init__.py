"""DataModules of the reference experiments."""

from lightning_swag.experiments.data.mnist import (
    MNISTDataModule,
    TensorBatchLoader,
    fashion_mnist_test_loader,
)
from lightning_swag.experiments.data.sine import SineDataModule, sine_function

__all__ = [
    "MNISTDataModule",
    "SineDataModule",
    "TensorBatchLoader",
    "TensorRows",
    "evaluation_loader",
    "fashion_mnist_test_loader",
    "sine_function",
]
