"""Shared fixtures: tiny deterministic models and data, and quiet Trainer settings."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from synthetic_idx import write_synthetic_idx
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_swag import SWAGPosterior

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*no `val_dataloader`.*")
os.environ.setdefault("PYTHONHASHSEED", "0")
# The suite's models are tiny: one intra-op thread avoids oversubscription on small CI machines.
torch.set_num_threads(1)

QUIET = {
    "accelerator": "cpu",
    "devices": 1,
    "logger": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "enable_checkpointing": False,
}


def random_walk_posterior(
    net: nn.Module, snapshots: int = 6, max_rank: int = 4, seed: int = 0, step: float = 0.2
) -> SWAGPosterior:
    """A posterior of ``snapshots`` points of a seeded random walk from ``net``'s weights."""
    post = SWAGPosterior.from_model(net, max_rank=max_rank)
    g = torch.Generator().manual_seed(seed)
    walker = copy.deepcopy(net)
    for _ in range(snapshots):
        with torch.no_grad():
            for p in walker.parameters():
                p.add_(step * torch.randn(p.shape, generator=g))
        post.collect(walker)
    return post


_DIST_ENV = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "GLOBAL_RANK", "MASTER_ADDR", "MASTER_PORT", "RANK")


def script_env() -> dict[str, str]:
    """This process's environment without distributed settings, for a script that starts its own
    processes; one intra-op thread each, warnings off."""
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV and not k.startswith("PL_")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return env


def run_two_process_script(args: list[str], what: str, timeout: int) -> None:
    """Run a test script that starts its own processes, inheriting no distributed settings from pytest's."""
    proc = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=script_env(), timeout=timeout
    )
    assert proc.returncode == 0, f"{what} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


class TinyRegressor(L.LightningModule):
    """A 2-layer MLP on 4 inputs, plain SGD (deterministic on CPU)."""

    def __init__(self, lr: float = 0.05, hidden: int = 8) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def tiny_loader(n: int = 64, batch_size: int = 16, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = x.sum(dim=1, keepdim=True).sin() + 0.1 * torch.randn(n, 1, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def flat_params(module: nn.Module) -> torch.Tensor:
    """The trainable weights in parameters() order, the independent way."""
    return torch.nn.utils.parameters_to_vector([p for p in module.parameters() if p.requires_grad]).detach()


class WeightRecorder(L.Callback):
    """Records the weights after every optimizer step and at every epoch end, independently of SWAG."""

    def __init__(self) -> None:
        self.by_epoch: dict[int, torch.Tensor] = {}
        self.by_step: dict[int, torch.Tensor] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        # the weights now are those after step global_step (several steps in one batch: manual optimization)
        if trainer.global_step > 0:
            self.by_step[trainer.global_step] = flat_params(pl_module).double().clone()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.by_step[trainer.global_step] = flat_params(pl_module).double().clone()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.by_epoch[trainer.current_epoch] = flat_params(pl_module).double().clone()


def expected_moments(snapshots: list[torch.Tensor], max_rank: int):
    """Mean, population variance and the last ``max_rank`` deviation rows θ_i − mean(θ_1..θ_i)."""
    stack = torch.stack(snapshots).double()
    mean = stack.mean(0)
    var = stack.var(0, correction=0)
    devs = [stack[i] - stack[: i + 1].mean(0) for i in range(len(snapshots))]
    rows = torch.stack(devs[-max_rank:]) if max_rank else stack.new_zeros(0, stack.shape[1])
    return mean, var, rows


@pytest.fixture
def tiny_model() -> TinyRegressor:
    torch.manual_seed(0)
    return TinyRegressor()


DATA_ENV_VAR = "LIGHTNING_SWAG_DATA"
SYNTHETIC_TRAIN, SYNTHETIC_TEST = 1200, 300


def real_data_dir() -> Path | None:
    """The real MNIST root named by ``LIGHTNING_SWAG_DATA``, or None when it is unset."""
    configured = os.environ.get(DATA_ENV_VAR)
    if not configured:
        return None
    root = Path(configured)
    assert (root / "MNIST" / "raw").is_dir(), f"{DATA_ENV_VAR}={configured} has no MNIST/raw folder"
    return root


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The data root every MNIST test reads: the real data when ``LIGHTNING_SWAG_DATA`` is set, else
    small synthetic IDX files in torchvision's layout (so the real loading code still runs)."""
    real = real_data_dir()
    if real is not None:
        return real
    root = tmp_path_factory.mktemp("synthetic_mnist")
    write_synthetic_idx(root, "MNIST", num_train=SYNTHETIC_TRAIN, num_test=SYNTHETIC_TEST, seed=0)
    write_synthetic_idx(root, "FashionMNIST", num_train=SYNTHETIC_TRAIN, num_test=SYNTHETIC_TEST, seed=1)
    return root
