"""The reference notebook's sine-regression algorithms, kept as the notebook wrote them.

Used only by the benchmarks to compare against: its SWAG-Diagonal and low-rank collection loops,
its one-sample-at-a-time sampler and BMA loop — including its departures from the paper (the
low-rank term divided by √(K−1) with K the buffer size even when fewer columns are filled, the
column shift that overwrites the wrong column after wrapping, and the 1/√2 applied to the
diagonal term only). tqdm progress bars are left out so that timings measure the maths.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset


class NotebookModel(torch.nn.Module):
    """The notebook's regression net with its flat-vector helpers."""

    def __init__(self) -> None:
        super().__init__()
        self.dense1 = torch.nn.Linear(1, 10)
        self.dense2 = torch.nn.Linear(10, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense2(torch.nn.functional.relu(self.dense1(x)))

    def load_flattened_weights(self, flattened_weights: torch.Tensor) -> None:
        idx = 0
        with torch.no_grad():
            for param in self.parameters():
                num_w = param.numel()
                param.copy_(flattened_weights[idx : idx + num_w].view_as(param))
                idx += num_w

    def get_weight_vector(self) -> torch.Tensor:
        return torch.cat([p.view(-1) for p in self.parameters()])


def pretrain(train_set: TensorDataset, epochs: int = 100, lr: float = 0.001) -> NotebookModel:
    model = NotebookModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    criterion = torch.nn.MSELoss()
    loader = DataLoader(train_set, batch_size=16, shuffle=True)
    for _ in range(epochs):
        model.train()
        for inputs, targets in loader:
            optimizer.zero_grad()
            criterion(model(inputs), targets).backward()
            optimizer.step()
    return model


def swag_low_rank(pretrained_weights, train_set, lr, steps, update_freq, K):  # noqa: N803 - notebook's name
    """The notebook's ``swag_low_rank``: returns ``w_swa, var, D`` with D of shape [P, K]."""
    model = NotebookModel()
    model.load_state_dict(pretrained_weights)
    w = model.get_weight_vector()
    w_swa = w.clone().to(torch.double)
    w_swa_2 = torch.pow(w, 2).clone().to(torch.double)
    D = torch.zeros((w_swa.size(0), K), dtype=torch.double)  # noqa: N806
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    criterion = torch.nn.MSELoss()
    loader = DataLoader(train_set, batch_size=16, shuffle=True)
    for i in range(steps):
        model.train()
        for inputs, targets in loader:
            optimizer.zero_grad()
            criterion(model(inputs), targets).backward()
            optimizer.step()
        if i % update_freq == 0:
            n_models = i // update_freq
            w = model.get_weight_vector().detach()
            w_swa = (w_swa * n_models + w) / (n_models + 1)
            w_swa_2 = (w_swa_2 * n_models + torch.pow(w, 2)) / (n_models + 1)
            col_idx = n_models % K
            if n_models % K == 0 and n_models > 0:
                D[:, :-1] = D[:, 1:]
                D[:, -1] = 0
            D[:, col_idx] = w - w_swa
    var = torch.nn.functional.relu(w_swa_2 - torch.pow(w_swa, 2))
    return w_swa, var, D


def sample_swag_diag(w_swa: torch.Tensor, sqrt_var_vec: torch.Tensor) -> torch.Tensor:
    z_1 = torch.randn(sqrt_var_vec.size(0), dtype=torch.double)
    return w_swa + (1 / np.sqrt(2)) * sqrt_var_vec * z_1


def sample_swag(w_swa: torch.Tensor, sqrt_var_vec: torch.Tensor, D: torch.Tensor) -> torch.Tensor:  # noqa: N803
    z_1 = torch.randn(sqrt_var_vec.size(0), dtype=torch.double)
    noise_diag = (1 / np.sqrt(2)) * sqrt_var_vec * z_1
    K = D.size(dim=1)  # noqa: N806
    z_2 = torch.randn(K, dtype=torch.double)
    noise_low_rank = (1 / np.sqrt(K - 1)) * D @ z_2
    return w_swa + noise_diag + noise_low_rank


def bma(X, w_swa, var_vec, D=None, n_samples=100):  # noqa: N803
    """The notebook's BMA loop: one sampled weight vector loaded into the model per forward pass."""
    preds = None
    model = NotebookModel()
    sqrt_var_vec = var_vec.sqrt()
    for i in range(n_samples):
        sampled = (
            sample_swag(w_swa, sqrt_var_vec, D) if D is not None else sample_swag_diag(w_swa, sqrt_var_vec)
        )
        model.load_flattened_weights(sampled)
        with torch.no_grad():
            model.eval()
            y_pred = model(X)
        if preds is None:
            preds = torch.zeros((n_samples, y_pred.size(0), y_pred.size(1)), dtype=y_pred.dtype)
        preds[i] = y_pred.detach()
    std_pred, mean_pred = torch.std_mean(preds, dim=0)
    return mean_pred, std_pred, preds
