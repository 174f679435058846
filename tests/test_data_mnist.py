"""MNISTDataModule, TensorBatchLoader and the Fashion-MNIST OOD loader.

The data root comes from the ``LIGHTNING_SWAG_DATA`` environment variable (a folder with
``MNIST/raw`` and ``FashionMNIST/raw``, e.g. ``/work/shared/data``); without it the tests write small
synthetic IDX files with :func:`write_synthetic_idx`, so the same torchvision loading code runs.
Nothing is ever downloaded.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torchvision
from conftest import DATA_ENV_VAR, real_data_dir
from synthetic_idx import write_synthetic_idx
from torch.utils.data import DataLoader

from lightning_swag.experiments.data.mnist import (
    MNIST_MEAN,
    MNIST_STD,
    MNISTDataModule,
    TensorBatchLoader,
    TensorRows,
    fashion_mnist_test_loader,
    load_normalized_tensors,
)
from lightning_swag.experiments.models import MNISTClassifier


@pytest.fixture(scope="module")
def data_root(mnist_root: Path) -> Path:
    return mnist_root


@pytest.fixture(scope="module")
def is_real_data(data_root: Path) -> bool:
    return real_data_dir() is not None


def make_datamodule(data_root: Path, **overrides: object) -> MNISTDataModule:
    """A small, never-downloading data module (real data: the first 3000 training images)."""
    settings: dict[str, object] = {"data_dir": str(data_root), "download": False, "val_size": 200}
    settings.update(overrides)
    return MNISTDataModule(**settings)  # type: ignore[arg-type]


def torchvision_raw(
    data_root: Path, dataset: str = "MNIST", train: bool = True
) -> torchvision.datasets.MNIST:
    cls = torchvision.datasets.MNIST if dataset == "MNIST" else torchvision.datasets.FashionMNIST
    return cls(root=str(data_root), train=train, download=False)


# ----------------------------------------------------------------------------- shapes and values
def test_shapes_and_dtypes(data_root: Path) -> None:
    dm = make_datamodule(data_root, subset=1000, test_subset=250)
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    for (images, labels), size in (
        (dm.train_tensors(), 800),
        (dm.val_tensors(), 200),
        (dm.test_tensors(), 250),
    ):
        assert images.shape == (size, 1, 28, 28)
        assert images.dtype == torch.float32
        assert labels.shape == (size,)
        assert labels.dtype == torch.int64
        assert int(labels.min()) >= 0 and int(labels.max()) <= 9


def test_images_are_normalized_with_mnist_statistics(data_root: Path) -> None:
    images, labels = load_normalized_tensors(data_root, "MNIST", train=False, subset=100)
    raw = torchvision_raw(data_root, train=False)
    expected = (raw.data[:100].float() / 255.0 - MNIST_MEAN) / MNIST_STD
    torch.testing.assert_close(images[:, 0], expected)
    assert torch.equal(labels, raw.targets[:100])


def test_real_training_set_has_zero_mean_unit_std(data_root: Path, is_real_data: bool) -> None:
    if not is_real_data:
        pytest.skip(f"needs the real MNIST ({DATA_ENV_VAR})")
    images, labels = load_normalized_tensors(data_root, "MNIST", train=True)
    assert images.shape == (60000, 1, 28, 28)
    assert images.mean().item() == pytest.approx(0.0, abs=1e-3)
    assert images.std().item() == pytest.approx(1.0, abs=1e-3)
    assert torch.bincount(labels).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


# -------------------------------------------------------------------------------- split and subset
def test_seeded_split_is_reproducible_and_disjoint(data_root: Path) -> None:
    first = make_datamodule(data_root, subset=1000, seed=3)
    second = make_datamodule(data_root, subset=1000, seed=3)
    other = make_datamodule(data_root, subset=1000, seed=4)
    for dm in (first, second, other):
        dm.setup("fit")
    assert first.train_indices is not None and first.val_indices is not None
    assert torch.equal(first.train_indices, second.train_indices)
    assert torch.equal(first.val_indices, second.val_indices)
    assert not torch.equal(first.val_indices, other.val_indices)
    train_set, val_set = set(first.train_indices.tolist()), set(first.val_indices.tolist())
    assert not train_set & val_set
    assert train_set | val_set == set(range(1000))
    assert torch.equal(first.val_tensors()[0], second.val_tensors()[0])


def test_split_does_not_touch_global_random_state(data_root: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    dm = make_datamodule(data_root, subset=500)
    dm.setup("fit")
    next(iter(dm.train_dataloader()))
    assert torch.equal(torch.rand(3), expected)


def test_subset_uses_the_first_images_of_the_file(data_root: Path) -> None:
    dm = make_datamodule(data_root, subset=600, val_size=100, test_subset=50)
    raw = torchvision_raw(data_root)
    assert dm.train_indices is None
    images, labels = dm.train_tensors()
    assert dm.train_indices is not None
    assert images.shape[0] == 500 and int(dm.train_indices.max()) < 600
    assert torch.equal(labels, raw.targets[dm.train_indices])
    assert dm.test_tensors()[0].shape[0] == 50


def test_no_validation_split(data_root: Path) -> None:
    dm = make_datamodule(data_root, subset=300, val_size=0)
    assert dm.train_tensors()[0].shape[0] == 300
    assert dm.val_tensors()[0].shape[0] == 0
    assert dm.val_dataloader() == []


@pytest.mark.parametrize(
    ("argument", "value"),
    [("batch_size", 0), ("eval_batch_size", 0), ("val_size", -1), ("subset", 0), ("test_subset", 0)],
)
def test_invalid_arguments_name_the_argument(argument: str, value: int) -> None:
    with pytest.raises(ValueError, match=argument):
        MNISTDataModule(download=False, **{argument: value})  # type: ignore[arg-type]


def test_val_size_must_leave_training_images() -> None:
    with pytest.raises(ValueError, match=r"val_size \(500\).*subset \(500\)"):
        MNISTDataModule(download=False, subset=500, val_size=500)


# ------------------------------------------------------------------------------- missing files
def test_missing_files_error_says_where_and_how(tmp_path: Path) -> None:
    dm = MNISTDataModule(data_dir=str(tmp_path / "empty"), download=False)
    expected_folder = str((tmp_path / "empty" / "MNIST" / "raw").resolve())
    for load in (dm.prepare_data, lambda: dm.setup("fit"), dm.test_tensors):
        with pytest.raises(FileNotFoundError) as info:
            load()
        message = str(info.value)
        assert expected_folder in message
        assert "download=True" in message and "data_dir" in message and "-idx" in message


def test_missing_fashion_mnist_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="FashionMNIST"):
        fashion_mnist_test_loader(tmp_path)


# ---------------------------------------------------------------------------------------- loader
def test_training_loader_batches_cover_each_sample_once_per_epoch(data_root: Path) -> None:
    dm = make_datamodule(data_root, subset=1000, batch_size=128)
    images, labels = dm.train_tensors()
    loader = dm.train_dataloader()
    assert len(loader) == 7  # 800 / 128, last batch partial
    epochs = []
    for _ in range(2):
        batches = list(loader)
        assert len(batches) == len(loader)
        assert [x.shape[0] for x, _ in batches] == [128] * 6 + [32]
        epoch_images = torch.cat([x for x, _ in batches])
        epoch_labels = torch.cat([y for _, y in batches])
        # same multiset of samples: sort both by a per-image fingerprint
        fingerprint = (epoch_images.flatten(1) * torch.arange(784)).sum(1)
        order = fingerprint.argsort()
        reference_order = (images.flatten(1) * torch.arange(784)).sum(1).argsort()
        torch.testing.assert_close(epoch_images[order], images[reference_order])
        assert torch.equal(epoch_labels[order], labels[reference_order])
        epochs.append(epoch_labels)
    assert not torch.equal(epochs[0], epochs[1]), "each epoch must draw a new permutation"
    again = make_datamodule(data_root, subset=1000, batch_size=128).train_dataloader()
    assert torch.equal(torch.cat([y for _, y in again]), epochs[0]), "the shuffle must be seeded"


def test_evaluation_loaders_keep_the_order(data_root: Path) -> None:
    dm = make_datamodule(data_root, subset=1000, eval_batch_size=64, test_subset=200)
    for loader, (images, labels) in (
        (dm.val_dataloader(), dm.val_tensors()),
        (dm.test_dataloader(), dm.test_tensors()),
        (dm.predict_dataloader(), dm.test_tensors()),
    ):
        assert isinstance(loader, DataLoader) and isinstance(loader.dataset, TensorRows)
        batches = list(loader)
        assert len(batches) == len(loader) == -(-images.shape[0] // 64)
        assert torch.equal(torch.cat([x for x, _ in batches]), images)
        assert torch.equal(torch.cat([y for _, y in batches]), labels)


def test_tensor_batch_loader_options() -> None:
    values = torch.arange(10)
    assert [b.tolist() for (b,) in TensorBatchLoader(values, batch_size=4, drop_last=True)] == [
        [0, 1, 2, 3],
        [4, 5, 6, 7],
    ]
    shards = [TensorBatchLoader(values, batch_size=3, num_replicas=3, rank=r, shuffle=True) for r in range(3)]
    assert {len(shard) for shard in shards} == {2}
    seen = [torch.cat([b for (b,) in shard]) for shard in shards]
    assert {s.numel() for s in seen} == {4}  # 10 samples padded to 12
    assert set(torch.cat(seen).tolist()) == set(range(10))
    with pytest.raises(ValueError, match="first dimension"):
        TensorBatchLoader(torch.zeros(3), torch.zeros(4), batch_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        TensorBatchLoader(values, batch_size=0)


def test_pin_to_device_moves_tensors_to_the_trainer_device(data_root: Path) -> None:
    dm = make_datamodule(data_root, subset=300, test_subset=20, pin_to_device=True)
    # A stand-in trainer whose device is "meta": tensors land there without needing a GPU.
    dm.train_tensors()  # decoded before a trainer is attached: stays on the CPU for now
    meta_trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("meta")))
    dm.trainer = meta_trainer  # type: ignore[assignment]
    dm.setup("fit")
    dm.setup("test")
    assert dm.train_tensors()[0].device.type == "meta"
    assert dm.test_tensors()[1].device.type == "meta"
    unpinned = make_datamodule(data_root, subset=300)
    assert unpinned.train_tensors()[0].device.type == "cpu"


# ------------------------------------------------------------------------------------- Trainer
def test_one_epoch_fit_and_test_with_the_trainer(data_root: Path) -> None:
    dm = make_datamodule(data_root, subset=1200, val_size=200, batch_size=64, test_subset=300)
    seen: list[tuple[str, int]] = []

    class RecordingClassifier(MNISTClassifier):
        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
            seen.append((batch[0].device.type, batch[0].shape[0]))
            return super().training_step(batch, batch_idx)

    torch.manual_seed(0)
    model = RecordingClassifier(lr=3e-3)
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(model, datamodule=dm)
    assert len(seen) == len(dm.train_dataloader()) == 16
    assert sum(size for _, size in seen) == 1000
    assert {device for device, _ in seen} == {trainer.strategy.root_device.type}
    assert torch.isfinite(trainer.callback_metrics["train_loss"])
    assert trainer.callback_metrics["val_acc"].item() > 0.5  # learnable: chance is 0.1
    (results,) = trainer.test(model, datamodule=dm, verbose=False)
    assert results["test_acc"] > 0.5


# ------------------------------------------------------------------------------------------- OOD
def test_ood_loader_serves_fashion_mnist_test_with_mnist_normalization(data_root: Path) -> None:
    raw = torchvision_raw(data_root, "FashionMNIST", train=False)
    loader = fashion_mnist_test_loader(data_root, batch_size=100, subset=300)
    images = torch.cat([x for x, _ in loader])
    labels = torch.cat([y for _, y in loader])
    expected = (raw.data[:300].float() / 255.0 - MNIST_MEAN) / MNIST_STD
    torch.testing.assert_close(images[:, 0], expected)
    assert torch.equal(labels, raw.targets[:300])

    dm = make_datamodule(data_root, subset=300, test_subset=300, eval_batch_size=100)
    ood_images, _ = dm.ood_tensors()
    torch.testing.assert_close(ood_images, images)
    assert len(dm.ood_dataloader()) == 3


def test_ood_dir_defaults_to_data_dir_and_can_differ(data_root: Path, tmp_path: Path) -> None:
    write_synthetic_idx(tmp_path, "FashionMNIST", num_train=10, num_test=40, seed=9)
    dm = make_datamodule(data_root, ood_dir=str(tmp_path))
    assert dm.ood_tensors()[0].shape == (40, 1, 28, 28)


# ------------------------------------------------------------------------------------------- CLI
def test_arguments_are_readable_by_jsonargparse() -> None:
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser()
    parser.add_class_arguments(MNISTDataModule, "data")
    config = parser.parse_args(["--data.subset=2000", "--data.pin_to_device=true", "--data.ood_dir=/x"])
    assert config.data.subset == 2000 and config.data.pin_to_device is True and config.data.ood_dir == "/x"
    assert config.data.val_size == 5000 and config.data.test_subset is None
