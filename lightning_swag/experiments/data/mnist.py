"""MNIST (and Fashion-MNIST as out-of-distribution input) served from in-memory tensors.

The reference notebook fed MNIST through ``transforms.ToTensor()`` and a ``DataLoader``: every sample
goes through PIL and a Python call per image, every epoch. The 60,000 training images take 188 MB as
float32, so here they are decoded **once** (through ``torchvision.datasets.MNIST``, which reads the
IDX files) into a single normalized ``float32`` tensor, and batches are cut from it by indexing
(:class:`TensorBatchLoader` for training, a ``DataLoader`` over :class:`TensorRows`, one index
per batch, for evaluation). With ``pin_to_device=True`` the tensors live on the training device, so
a GPU never waits on a host copy.

The data root uses torchvision's layout: ``<data_dir>/MNIST/raw/train-images-idx3-ubyte`` etc.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import lightning as L
import torch
import torchvision
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

MNIST_MEAN = 0.1307
"""Mean pixel value of the MNIST training images (pixels scaled to [0, 1])."""
MNIST_STD = 0.3081
"""Standard deviation of the MNIST training pixels (pixels scaled to [0, 1])."""

DatasetName = Literal["MNIST", "FashionMNIST"]
IDX_FILE_NAMES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_TORCHVISION_DATASETS = {
    "MNIST": torchvision.datasets.MNIST,
    "FashionMNIST": torchvision.datasets.FashionMNIST,
}


def raw_folder(data_dir: str | Path, dataset: DatasetName = "MNIST") -> Path:
    """Where torchvision looks for the IDX files of ``dataset`` under ``data_dir``."""
    return Path(data_dir) / dataset / "raw"


def _missing_files_error(data_dir: str | Path, dataset: DatasetName) -> FileNotFoundError:
    raw = raw_folder(data_dir, dataset)
    missing = [name for name in IDX_FILE_NAMES if not (raw / name).is_file()]
    return FileNotFoundError(
        f"{dataset} not found: looked in {raw.resolve()} for {', '.join(IDX_FILE_NAMES)}"
        f" (missing: {', '.join(missing) or 'none, but torchvision could not read them'}). "
        f"Point {'ood_dir (or data_dir)' if dataset == 'FashionMNIST' else 'data_dir'} at a folder "
        f"that contains {dataset}/raw/*-idx*-ubyte files "
        f"(torchvision's layout), or set download=True to fetch them."
    )


def _open_torchvision_dataset(
    data_dir: str | Path, dataset: DatasetName, train: bool, download: bool
) -> torchvision.datasets.MNIST:
    """Open a torchvision (Fashion-)MNIST split, turning its errors into actionable ones."""
    if dataset not in _TORCHVISION_DATASETS:
        raise ValueError(f"dataset must be 'MNIST' or 'FashionMNIST', got {dataset!r}.")
    try:
        return _TORCHVISION_DATASETS[dataset](root=str(data_dir), train=train, download=download)
    except RuntimeError as error:
        if "Dataset not found" in str(error):
            raise _missing_files_error(data_dir, dataset) from error
        if download and "Error downloading" in str(error):
            raise RuntimeError(
                f"Could not download {dataset} into {raw_folder(data_dir, dataset).resolve()}. If this "
                f"machine is offline, copy the uncompressed IDX files ({', '.join(IDX_FILE_NAMES)}) "
                f"there and set download=False."
            ) from error
        raise


def ensure_downloaded(data_dir: str | Path, dataset: DatasetName = "MNIST", download: bool = True) -> None:
    """Download ``dataset`` into ``data_dir`` if asked, else check that its IDX files are there.

    Raises:
        FileNotFoundError: ``download=False`` and the files are missing (says where it looked).
    """
    if all((raw_folder(data_dir, dataset) / name).is_file() for name in IDX_FILE_NAMES):
        return
    if not download:
        raise _missing_files_error(data_dir, dataset)
    _open_torchvision_dataset(data_dir, dataset, train=True, download=True)


def load_normalized_tensors(
    data_dir: str | Path,
    dataset: DatasetName = "MNIST",
    train: bool = True,
    download: bool = False,
    subset: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Decode a (Fashion-)MNIST split into ``(images, labels)`` tensors, normalized with MNIST stats.

    Both data sets use the **MNIST** mean and standard deviation: Fashion-MNIST is meant as
    out-of-distribution input to an MNIST model, so it must be preprocessed exactly like MNIST.

    Args:
        data_dir: root folder in torchvision's layout (``<data_dir>/<dataset>/raw/``).
        dataset: ``"MNIST"`` or ``"FashionMNIST"``.
        train: the training split if true, else the test (``t10k``) split.
        download: let torchvision download missing files.
        subset: keep only the first ``subset`` images of the split (``None``: all).

    Returns:
        ``images`` of shape ``[N, 1, 28, 28]`` (float32) and ``labels`` of shape ``[N]`` (int64).
    """
    if subset is not None and subset < 1:
        raise ValueError(f"subset must be >= 1 or None, got {subset}.")
    source = _open_torchvision_dataset(data_dir, dataset, train=train, download=download)
    pixels, labels = source.data, source.targets
    if subset is not None:
        pixels, labels = pixels[:subset], labels[:subset]
    images = pixels.unsqueeze(1).to(torch.float32).div_(255.0).sub_(MNIST_MEAN).div_(MNIST_STD)
    return images, labels.to(torch.int64).clone()


class TensorBatchLoader:
    """Yields ``(x, y)`` batches cut from in-memory tensors; a fast stand-in for a ``DataLoader``.

    Lightning's ``Trainer`` accepts any iterable with ``__len__`` as a dataloader and moves each
    batch to the device itself (a no-op when the tensors already live there).

    Shuffling draws a new permutation every epoch from a ``torch.Generator`` seeded with
    ``seed + epoch``, so runs are reproducible without touching global random state. The epoch
    advances at each ``iter()``; :meth:`set_epoch` sets it (e.g. when resuming).

    For multi-process training pass ``num_replicas``/``rank``: every process draws the same
    permutation and takes every ``num_replicas``-th index, padded by wrapping around so all ranks
    get the same number of samples (the behaviour of ``DistributedSampler``).

    Args:
        tensors: tensors sharing their first dimension (e.g. images and labels), on any device.
        batch_size: samples per batch.
        shuffle: draw a fresh permutation every epoch (training) or keep the order (evaluation).
        seed: base seed of the per-epoch permutation.
        drop_last: drop the last incomplete batch.
        num_replicas: number of processes sharing the data.
        rank: index of this process among ``num_replicas``.
        start_epoch: epoch number of the first ``iter()``.
    """

    def __init__(
        self,
        *tensors: Tensor,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        num_replicas: int = 1,
        rank: int = 0,
        start_epoch: int = 0,
    ) -> None:
        if not tensors:
            raise ValueError("TensorBatchLoader needs at least one tensor.")
        sizes = [t.shape[0] for t in tensors]
        if len(set(sizes)) != 1:
            raise ValueError(f"All tensors must have the same first dimension; got sizes {sizes}.")
        if sizes[0] == 0:
            raise ValueError("TensorBatchLoader got empty tensors (0 samples).")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(
                f"Need num_replicas >= 1 and 0 <= rank < num_replicas; got {num_replicas}, {rank}."
            )
        self.tensors = tensors
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = start_epoch

    @property
    def num_samples(self) -> int:
        """Samples this process sees per epoch (all of them when ``num_replicas == 1``)."""
        total = self.tensors[0].shape[0]
        return -(-total // self.num_replicas)

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return -(-self.num_samples // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose permutation the next ``iter()`` uses."""
        self.epoch = epoch

    def _epoch_indices(self) -> Tensor | None:
        """This rank's sample indices for the current epoch, or ``None`` for "all, in order"."""
        total = self.tensors[0].shape[0]
        if not self.shuffle and self.num_replicas == 1:
            return None
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(total, generator=generator)
        else:
            order = torch.arange(total)
        padded_total = self.num_samples * self.num_replicas
        if padded_total > total:
            order = torch.cat([order, order[: padded_total - total]])
        return order[self.rank :: self.num_replicas].to(self.tensors[0].device)

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        indices = self._epoch_indices()
        self.epoch += 1
        for batch in range(len(self)):
            start, stop = batch * self.batch_size, (batch + 1) * self.batch_size
            if indices is None:  # contiguous slices are views: no copy at all
                yield tuple(t[start:stop] for t in self.tensors)
            else:
                batch_indices = indices[start:stop]
                yield tuple(t.index_select(0, batch_indices.to(t.device)) for t in self.tensors)


class TensorRows(Dataset):
    """Rows of in-memory tensors as a map-style dataset that is indexed a whole batch at a time.

    A ``torch.utils.data.DataLoader`` over it calls :meth:`__getitems__` once per batch (one tensor
    index, no per-sample Python work) and :func:`batch_as_is` passes the result through. Being a
    real ``DataLoader``, it is sharded by Lightning under DDP (a ``DistributedSampler`` is put in),
    and it reports the dataset index of every row, which ``SWAGPredictionWriter`` stores so that
    ``merge_predictions`` can rebuild the dataset order.
    """

    def __init__(self, *tensors: Tensor) -> None:
        if not tensors or len({t.shape[0] for t in tensors}) != 1:
            raise ValueError("TensorRows needs one or more tensors sharing their first dimension.")
        self.tensors = tensors

    def __len__(self) -> int:
        return self.tensors[0].shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, ...]:
        return tuple(t[index] for t in self.tensors)

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, ...]:
        index = torch.as_tensor(indices, dtype=torch.long, device=self.tensors[0].device)
        return tuple(t.index_select(0, index) for t in self.tensors)


def batch_as_is(batch: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """The ``collate_fn`` for :class:`TensorRows`: its batches are already stacked."""
    return batch


def evaluation_loader(*tensors: Tensor, batch_size: int) -> DataLoader:
    """A ``DataLoader`` over the rows of ``tensors`` in order, a batch per ``__getitems__`` call."""
    return DataLoader(TensorRows(*tensors), batch_size=batch_size, shuffle=False, collate_fn=batch_as_is)


def fashion_mnist_test_loader(
    data_dir: str | Path,
    batch_size: int = 1000,
    download: bool = False,
    subset: int | None = None,
    device: torch.device | str | None = None,
) -> DataLoader:
    """Fashion-MNIST *test* images, normalized with MNIST statistics: OOD input for an MNIST model.

    Args:
        data_dir: root folder containing ``FashionMNIST/raw/``.
        batch_size: samples per batch.
        download: let torchvision download missing files.
        subset: keep only the first ``subset`` test images.
        device: where to keep the tensors (default: CPU).

    Returns:
        A ``DataLoader`` of ``(images, labels)`` in file order (see :func:`evaluation_loader`).
    """
    images, labels = load_normalized_tensors(
        data_dir, dataset="FashionMNIST", train=False, download=download, subset=subset
    )
    if device is not None:
        images, labels = images.to(device), labels.to(device)
    return evaluation_loader(images, labels, batch_size=batch_size)


def _check_optional_positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{name} must be >= 1 or None, got {value}.")


class MNISTDataModule(L.LightningDataModule):
    """MNIST decoded once into tensors, with a seeded train/validation split and an OOD set.

    The training pool is the first ``subset`` images of the MNIST training file (all 60,000 by
    default); ``val_size`` of them, drawn with a ``torch.Generator`` seeded by ``seed``, form the
    validation set. The test set is the MNIST ``t10k`` split; :meth:`ood_dataloader` serves the
    Fashion-MNIST ``t10k`` split, normalized with the MNIST statistics, as out-of-distribution input.

    Args:
        data_dir: root folder in torchvision's layout, containing ``MNIST/raw/*-idx*-ubyte``.
        download: download MNIST into ``data_dir`` if missing (needs internet).
        batch_size: training batch size.
        eval_batch_size: batch size for validation, test, predict and OOD.
        val_size: number of training images held out for validation (0: no validation set).
        subset: use only the first ``subset`` training images (fast runs); ``None`` uses all.
        test_subset: use only the first ``test_subset`` test images (also applied to the OOD set).
        seed: seed of the train/validation split and of the per-epoch shuffling.
        pin_to_device: keep the decoded tensors on the training device (GPU-resident batches).
        shuffle: shuffle the training set every epoch.
        ood_dir: root folder containing ``FashionMNIST/raw/``; defaults to ``data_dir``.
        predict_ood: make :meth:`predict_dataloader` serve two loaders, the MNIST test set (index 0)
            and the Fashion-MNIST OOD set (index 1), so one ``predict`` run writes both.
    """

    num_classes: int = 10
    dims: tuple[int, int, int] = (1, 28, 28)

    def __init__(
        self,
        data_dir: str = "./data",
        download: bool = True,
        batch_size: int = 128,
        eval_batch_size: int = 1000,
        val_size: int = 5000,
        subset: int | None = None,
        test_subset: int | None = None,
        seed: int = 0,
        pin_to_device: bool = False,
        shuffle: bool = True,
        ood_dir: str | None = None,
        predict_ood: bool = False,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        if eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be >= 1, got {eval_batch_size}.")
        if val_size < 0:
            raise ValueError(f"val_size must be >= 0, got {val_size}.")
        _check_optional_positive("subset", subset)
        _check_optional_positive("test_subset", test_subset)
        if subset is not None and val_size >= subset:
            raise ValueError(
                f"val_size ({val_size}) must be smaller than subset ({subset}) so that training images "
                f"remain; lower val_size (0 disables validation)."
            )
        self.save_hyperparameters()
        self.data_dir = data_dir
        self.download = download
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.val_size = val_size
        self.subset = subset
        self.test_subset = test_subset
        self.seed = seed
        self.pin_to_device = pin_to_device
        self.shuffle = shuffle
        self.ood_dir = ood_dir
        self.predict_ood = predict_ood
        self.train_indices: Tensor | None = None
        """Indices (into the MNIST training file) of the training images, once set up."""
        self.val_indices: Tensor | None = None
        """Indices (into the MNIST training file) of the validation images, once set up."""
        self._train: tuple[Tensor, Tensor] | None = None
        self._val: tuple[Tensor, Tensor] | None = None
        self._test: tuple[Tensor, Tensor] | None = None
        self._ood: tuple[Tensor, Tensor] | None = None

    # ----------------------------------------------------------------------------- Lightning hooks
    @override
    def prepare_data(self) -> None:
        """Download MNIST when ``download=True``; otherwise fail early if its files are missing."""
        ensure_downloaded(self.data_dir, "MNIST", download=self.download)

    @override
    def setup(self, stage: str | None = None) -> None:
        """Decode the splits ``stage`` needs (all of them for ``None``) onto the target device."""
        if stage in (None, "fit", "validate"):
            self._setup_train_and_val()
        if stage in (None, "test", "predict"):
            self._setup_test()
        self._move_loaded_tensors_to_target_device()

    @override
    def train_dataloader(self) -> TensorBatchLoader:
        """Shuffled (if ``shuffle``) training batches of ``batch_size``."""
        images, labels = self.train_tensors()
        return TensorBatchLoader(
            images,
            labels,
            batch_size=self.batch_size,
            shuffle=self.shuffle,
            seed=self.seed,
            start_epoch=self.trainer.current_epoch if self.trainer is not None else 0,
            **self._replica_kwargs(),
        )

    @override
    def val_dataloader(self) -> DataLoader | list:
        """Validation batches in order; an empty list (Lightning skips validation) when ``val_size=0``."""
        if self.val_size == 0:
            return []
        return self._eval_loader(self.val_tensors())

    @override
    def test_dataloader(self) -> DataLoader:
        """MNIST test (``t10k``) batches in order."""
        return self._eval_loader(self.test_tensors())

    @override
    def predict_dataloader(self) -> DataLoader | list[DataLoader]:
        """Same as :meth:`test_dataloader`; with ``predict_ood`` also the OOD set (a list of two)."""
        if self.predict_ood:
            return [self.test_dataloader(), self.ood_dataloader()]
        return self.test_dataloader()

    def ood_dataloader(self) -> DataLoader:
        """Fashion-MNIST test batches, normalized like MNIST: out-of-distribution input."""
        return self._eval_loader(self.ood_tensors())

    # ------------------------------------------------------------------------------ tensor access
    def train_tensors(self) -> tuple[Tensor, Tensor]:
        """The training ``(images [N,1,28,28], labels [N])`` after the validation split."""
        if self._train is None:
            self._setup_train_and_val()
        assert self._train is not None
        return self._train

    def val_tensors(self) -> tuple[Tensor, Tensor]:
        """The validation ``(images, labels)``; empty tensors when ``val_size=0``."""
        if self._val is None:
            self._setup_train_and_val()
        assert self._val is not None
        return self._val

    def test_tensors(self) -> tuple[Tensor, Tensor]:
        """The whole MNIST test set (or its ``test_subset``) as ``(images, labels)``, e.g. for BMA."""
        if self._test is None:
            self._setup_test()
        assert self._test is not None
        return self._test

    def ood_tensors(self) -> tuple[Tensor, Tensor]:
        """The Fashion-MNIST test set (or its ``test_subset``), normalized with MNIST statistics."""
        if self._ood is None:
            images, labels = load_normalized_tensors(
                self.ood_dir or self.data_dir,
                dataset="FashionMNIST",
                train=False,
                download=self.download,
                subset=self.test_subset,
            )
            self._ood = self._to_target_device(images, labels)
        return self._ood

    # ---------------------------------------------------------------------------------- internals
    def _setup_train_and_val(self) -> None:
        if self._train is not None:
            return
        images, labels = load_normalized_tensors(
            self.data_dir, "MNIST", train=True, download=self.download, subset=self.subset
        )
        pool_size = images.shape[0]
        if self.val_size >= pool_size:
            raise ValueError(
                f"val_size ({self.val_size}) must be smaller than the {pool_size} training images found "
                f"in {raw_folder(self.data_dir).resolve()}."
            )
        generator = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(pool_size, generator=generator)
        self.val_indices = order[: self.val_size].sort().values
        self.train_indices = order[self.val_size :].sort().values
        self._train = self._to_target_device(images[self.train_indices], labels[self.train_indices])
        self._val = self._to_target_device(images[self.val_indices], labels[self.val_indices])

    def _setup_test(self) -> None:
        if self._test is not None:
            return
        images, labels = load_normalized_tensors(
            self.data_dir, "MNIST", train=False, download=self.download, subset=self.test_subset
        )
        self._test = self._to_target_device(images, labels)

    def _target_device(self) -> torch.device:
        """The trainer's device when ``pin_to_device`` (CUDA if available without a trainer), else CPU."""
        if not self.pin_to_device:
            return torch.device("cpu")
        if self.trainer is not None:
            return self.trainer.strategy.root_device
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def _to_target_device(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        device = self._target_device()
        return images.to(device), labels.to(device)

    def _move_loaded_tensors_to_target_device(self) -> None:
        """Tensors decoded before a trainer was attached follow it to its device."""
        if not self.pin_to_device:
            return
        for name in ("_train", "_val", "_test", "_ood"):
            tensors = getattr(self, name)
            if tensors is not None:
                setattr(self, name, self._to_target_device(*tensors))

    def _replica_kwargs(self) -> dict[str, int]:
        """Shard the training data across processes when the trainer runs several."""
        if self.trainer is None or self.trainer.world_size == 1:
            return {}
        return {"num_replicas": self.trainer.world_size, "rank": self.trainer.global_rank}

    def _eval_loader(self, tensors: tuple[Tensor, Tensor]) -> DataLoader:
        # A real DataLoader: under DDP Lightning shards it across processes and the prediction
        # writer learns the dataset index of every row.
        return evaluation_loader(*tensors, batch_size=self.eval_batch_size)
