"""Behaviour users must be able to trust, one group of tests per case of the "trust" issue (1-14).

Every expected value is computed here, independently of the package: BMA results are compared with
explicit averages over weight samples drawn with ``posterior.sample(n, scale, seed=...)`` and run
with ``torch.func.functional_call``; snapshot statistics with weights recorded during training.
"""

from __future__ import annotations

import functools
import http.server
import math
import os
import pickle
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import TinyRegressor, flat_params, random_walk_posterior, tiny_loader
from lightning.pytorch.callbacks import BackboneFinetuning, ModelCheckpoint
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_swag import SWAGCallback, SWAGModule, SWAGPosterior
from lightning_swag.posterior.noise import derive_seed

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),
    pytest.mark.filterwarnings("ignore:.*val_dataloader.*"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*callbacks used to create the checkpoint.*"),
    pytest.mark.filterwarnings("ignore:.*ended before the epoch ended.*"),
    pytest.mark.filterwarnings("ignore:.*Checkpoint directory.*exists.*"),
    pytest.mark.filterwarnings("ignore:.*at the edge of the candidates.*"),
]


def make_trainer(**kwargs) -> L.Trainer:
    options = {
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "accelerator": "cpu",
        "devices": 1,
    }
    return L.Trainer(**{**options, **kwargs})


def sample_outputs(model, post, args, n, scale, seed, kwargs=None, dtype=torch.float32) -> torch.Tensor:
    """``[n, ...]`` outputs of ``model`` in eval mode under weight samples drawn here (sample ``i`` of
    posterior 0 of a SWAGModule run with ``seed`` is sample ``i`` of ``derive_seed(seed, 0)``)."""
    flat = post.sample(n, scale, seed=derive_seed(seed, 0), dtype=dtype)
    own = dict(model.named_parameters())
    outs = []
    training = model.training
    model.eval()
    with torch.no_grad():
        for row in flat:
            params = {k: v.to(own[k].dtype) for k, v in post.unflatten(row).items()}
            outs.append(functional_call(model, params, tuple(args), kwargs or {}))
    model.train(training)
    return torch.stack(outs)


def swa_model_output(model: nn.Module, post: SWAGPosterior, x: torch.Tensor) -> torch.Tensor:
    """The output of a copy of ``model`` holding the SWA mean (written by hand, not load_into)."""
    import copy

    clone = copy.deepcopy(model).eval()
    own = dict(clone.named_parameters())
    with torch.no_grad():
        for name, value in post.unflatten(post.mean).items():
            own[name].copy_(value)
        return clone(x)


def close(actual, expected, tol=1e-5) -> None:
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=tol, atol=tol)


# ============================================================================ 1. progressive unfreezing
class BackboneHead(L.LightningModule):
    def __init__(self, unfreeze_at: int | None = None) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
        self.head = nn.Linear(8, 1)
        self.unfreeze_at = unfreeze_at
        if unfreeze_at is not None:
            self.backbone.requires_grad_(False)

    def forward(self, x):
        return self.head(self.backbone(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def on_train_epoch_start(self) -> None:
        if self.unfreeze_at is not None and self.current_epoch == self.unfreeze_at:
            self.backbone.requires_grad_(True)

    def configure_optimizers(self):
        if self.unfreeze_at is not None:  # frozen parameters get no gradient: SGD skips them
            return torch.optim.SGD(self.parameters(), lr=0.05)
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.05)


class EpochEndWeights(L.Callback):
    def __init__(self) -> None:
        self.by_epoch: dict[int, torch.Tensor] = {}

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        vector = nn.utils.parameters_to_vector(pl_module.parameters())
        self.by_epoch[trainer.current_epoch] = vector.detach().double().clone()


def test_backbone_finetuning_backbone_is_tracked_and_swa_forward_matches() -> None:
    torch.manual_seed(0)
    model = BackboneHead()
    swag = SWAGCallback(start_epoch=3, max_rank=2)
    record = EpochEndWeights()
    unfreeze = BackboneFinetuning(unfreeze_backbone_at_epoch=1)
    make_trainer(max_epochs=5, callbacks=[unfreeze, swag, record]).fit(model, tiny_loader(n=32))
    post = swag.posterior
    assert set(post.param_names) == {n for n, _ in model.named_parameters()}
    assert post.num_snapshots == 2
    close(post.mean, (record.by_epoch[3] + record.by_epoch[4]) / 2, tol=1e-9)
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    bma = SWAGModule(model, post, num_samples=1, scale=0.0, task="regression", seed=0)
    close(bma(x)["mean"], swa_model_output(model, post, x), tol=1e-6)


def test_parameter_unfrozen_after_first_snapshot_warns_naming_it() -> None:
    torch.manual_seed(0)
    model = BackboneHead(unfreeze_at=3)
    swag = SWAGCallback(start_epoch=1, max_rank=2)
    with pytest.warns(UserWarning, match=r"backbone\.0\.weight"):
        make_trainer(max_epochs=5, callbacks=[swag]).fit(model, tiny_loader(n=32))
    assert swag.posterior.param_names == ["head.weight", "head.bias"]


# ============================================================================ 2. classification layouts
def _x(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_segmentation_class_dim_1_averages_softmax_over_dim_1() -> None:
    torch.manual_seed(0)
    model = nn.Conv2d(3, 4, kernel_size=1)
    post = random_walk_posterior(model, snapshots=5, max_rank=3)
    x = _x(2, 3, 5, 5)
    out = SWAGModule(model, post, num_samples=6, seed=3, task="classification", class_dim=1)(x)
    assert out["mean"].shape == (2, 4, 5, 5)
    close(out["mean"].sum(dim=1), torch.ones(2, 5, 5))
    expected = sample_outputs(model, post, (x,), 6, 0.5, 3).softmax(dim=2).mean(dim=0)
    close(out["mean"], expected)
    assert out["entropy"].shape == (2, 5, 5)


def test_dense_output_without_class_dim_is_an_error_naming_class_dim() -> None:
    torch.manual_seed(0)
    model = nn.Conv2d(3, 4, kernel_size=1)
    bma = SWAGModule(model, random_walk_posterior(model), num_samples=2, seed=0, task="classification")
    with pytest.raises(ValueError, match="class_dim"):
        bma(_x(2, 3, 5, 5))


def test_binary_task_averages_sigmoids() -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    post = random_walk_posterior(model, snapshots=5, max_rank=3)
    x = _x(8, 4)
    out = SWAGModule(model, post, num_samples=6, seed=4, task="binary")(x)
    expected = torch.sigmoid(sample_outputs(model, post, (x,), 6, 0.5, 4)).mean(dim=0)
    assert out["mean"].shape == (8, 1)
    close(out["mean"], expected)
    assert not torch.allclose(out["mean"], torch.ones_like(out["mean"]))
    assert bool((out["entropy"] > 0).all())


def test_multilabel_task_gives_one_sigmoid_per_label() -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    post = random_walk_posterior(model, snapshots=5, max_rank=3)
    x = _x(8, 4)
    out = SWAGModule(model, post, num_samples=6, seed=5, task="multilabel")(x)
    expected = torch.sigmoid(sample_outputs(model, post, (x,), 6, 0.5, 5)).mean(dim=0)
    close(out["mean"], expected)
    assert float((out["mean"].sum(dim=1) - 1).abs().max()) > 1e-2  # not a softmax


def test_model_ending_in_softmax_warns_that_logits_are_expected() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Softmax(dim=-1))
    bma = SWAGModule(model, random_walk_posterior(model), num_samples=2, seed=0, task="classification")
    with pytest.warns(UserWarning, match="logits"):
        bma(_x(5, 4))


def test_token_classification_skips_padding_in_trainer_test() -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    post = random_walk_posterior(model, snapshots=5, max_rank=3)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8, 6, 4, generator=g)
    y = torch.randint(0, 3, (8, 6), generator=g)
    y[::2, 4:] = -100  # padding
    bma = SWAGModule(model, post, num_samples=5, seed=6, task="classification", class_dim=-1)
    (result,) = make_trainer().test(bma, DataLoader(TensorDataset(x, y), batch_size=4), verbose=False)
    probs = sample_outputs(model, post, (x,), 5, 0.5, 6).softmax(dim=-1).mean(dim=0)
    keep = y != -100
    accuracy = (probs.argmax(dim=-1)[keep] == y[keep]).double().mean()
    nll = -probs[keep].gather(1, y[keep].unsqueeze(1)).log().mean()
    assert result["test_accuracy"] == pytest.approx(float(accuracy), abs=1e-6)
    assert result["test_nll"] == pytest.approx(float(nll), abs=1e-4)


# ============================================================================ 3. stale samples
def test_changed_scale_and_num_samples_take_effect_outside_a_trainer() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    post = random_walk_posterior(model, snapshots=6, max_rank=4)
    x = _x(10, 4)
    bma = SWAGModule(model, post, num_samples=4, seed=0, task="regression")
    results = {}
    for scale in (0.0, 0.5, 2.0):
        bma.scale = scale
        results[scale] = bma(x)
        close(results[scale]["mean"], sample_outputs(model, post, (x,), 4, scale, 0).mean(dim=0))
    assert float(results[0.0]["std"].abs().max()) == 0.0
    assert float(results[2.0]["std"].mean()) > 1.5 * float(results[0.5]["std"].mean())
    bma.return_samples = True
    bma.num_samples = 2
    out = bma(x)
    assert out["samples"].shape[0] == 2
    close(out["samples"], sample_outputs(model, post, (x,), 2, 2.0, 0))


# ============================================================================ 4. manual optimization
class ManualNet(L.LightningModule):
    """Manual optimization: one optimizer, or two (one per layer), each stepped once per batch."""

    def __init__(self, two: bool = False, lr: float = 0.1) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        self.two, self.lr = two, lr
        self.after_step: dict[int, torch.Tensor] = {}
        self.epoch_lr: dict[int, float] = {}

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        if batch_idx == 0:
            self.epoch_lr[self.current_epoch] = optimizers[0].param_groups[0]["lr"]
        for opt in optimizers:
            opt.zero_grad()
            self.manual_backward(nn.functional.mse_loss(self(x), y))
            opt.step()
            self.after_step[self.trainer.global_step] = flat_params(self).double().clone()

    def configure_optimizers(self):
        if self.two:
            return [torch.optim.SGD(self.net[i].parameters(), lr=self.lr) for i in (0, 2)]
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def test_swa_lr_anneals_under_manual_optimization() -> None:
    torch.manual_seed(0)
    model = ManualNet()
    swag = SWAGCallback(start_epoch=1, swa_lr=0.01, annealing_epochs=2, max_rank=2)
    trainer = make_trainer(max_epochs=4, callbacks=[swag])
    trainer.fit(model, tiny_loader(n=32))
    lrs = model.epoch_lr
    assert lrs[0] == pytest.approx(0.1)
    assert 0.01 < lrs[2] < 0.1  # annealing (cos: half way after one of two epochs)
    assert lrs[3] == pytest.approx(0.01)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.01)


def test_two_optimizer_steps_per_batch_every_n_steps_counts_optimizer_steps() -> None:
    torch.manual_seed(0)
    model = ManualNet(two=True, lr=0.05)
    swag = SWAGCallback(every_n_steps=3, max_rank=3)
    make_trainer(max_epochs=1, callbacks=[swag]).fit(model, tiny_loader(n=128, batch_size=16))
    assert sorted(model.after_step) == list(range(1, 17))  # 8 batches x 2 optimizers
    due = [step for step in range(1, 17) if step % 3 == 0]  # 3, 6, 9, 12, 15
    assert swag.posterior.num_snapshots == len(due) == 5
    expected = torch.stack([model.after_step[s] for s in due]).mean(dim=0)
    close(swag.posterior.mean, expected, tol=1e-9)


# ============================================================================ 5. crafted statistics
def _crafted(field: str) -> tuple[dict, SWAGPosterior, str]:
    torch.manual_seed(0)
    post = random_walk_posterior(nn.Linear(3, 2), snapshots=4, max_rank=3)
    state = post.state_dict()
    state = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
    p = post.num_params
    if field == "short mean":
        state["mean"], name = torch.zeros(1, dtype=torch.float64), "mean"
    elif field == "long mean":
        state["mean"], name = torch.zeros(p + 5, dtype=torch.float64), "mean"
    elif field == "negative count":
        state["num_snapshots"], name = -3, "num_snapshots"
    elif field == "nan sum_sq_dev":
        state["sum_sq_dev"][0], name = float("nan"), "sum_sq_dev"
    elif field == "negative sum_sq_dev":
        state["sum_sq_dev"][1], name = -1.0, "sum_sq_dev"
    else:  # max_rank disagrees with the deviation rows
        state["max_rank"], name = 2, "(max_rank|deviations)"
    return state, post, name


CRAFTED = ["short mean", "long mean", "negative count", "nan sum_sq_dev", "negative sum_sq_dev", "max_rank"]


@pytest.mark.parametrize("field", CRAFTED)
@pytest.mark.parametrize("entry", ["load_state_dict", "from_state_dict", "load"])
def test_crafted_statistics_are_refused_naming_the_field(field, entry, tmp_path) -> None:
    state, post, name = _crafted(field)
    target = SWAGPosterior.from_model(nn.Linear(3, 2), max_rank=3)
    path = tmp_path / "crafted_posterior.pt"
    torch.save(state, path)
    with pytest.raises(ValueError, match=name) as info:
        if entry == "load_state_dict":
            target.load_state_dict(state)
        elif entry == "from_state_dict":
            SWAGPosterior.from_state_dict(state)
        else:
            SWAGPosterior.load(path)
    if entry == "load":
        assert "crafted_posterior.pt" in str(info.value)


# ============================================================================ 6. chunked summaries
def _chunked(model, post, x, chunk_size, **options) -> dict:
    bma = SWAGModule(model, post, num_samples=25, seed=2, chunk_size=chunk_size, **options)
    return bma(x)


@pytest.mark.parametrize("task", ["regression", "classification"])
def test_summaries_do_not_depend_on_chunk_size(task) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1 if task == "regression" else 3))
    post = random_walk_posterior(model, snapshots=6, max_rank=4)
    x = _x(12, 4)
    whole = _chunked(model, post, x, None, task=task)
    keys = ["mean", "std"] + (["entropy", "mutual_information"] if task == "classification" else [])
    assert "samples" not in whole
    for size in (10, 7, 100):
        part = _chunked(model, post, x, size, task=task)
        for key in keys:
            close(part[key], whole[key], tol=1e-5)
    outputs = sample_outputs(model, post, (x,), 25, 0.5, 2)
    if task == "classification":
        outputs = outputs.softmax(dim=-1)
    close(whole["mean"], outputs.mean(dim=0))
    close(whole["std"], outputs.std(dim=0, correction=0), tol=1e-4)


def test_gaussian_noise_test_nll_does_not_depend_on_chunk_size() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    post = random_walk_posterior(model, snapshots=6, max_rank=4)
    loader = tiny_loader(n=48)
    results = {}
    for size in (10, None):
        bma = SWAGModule(model, post, num_samples=25, seed=2, chunk_size=size, task="regression", noise=0.3)
        (results[size],) = make_trainer().test(bma, loader, verbose=False)
    assert results[10]["test_nll"] == pytest.approx(results[None]["test_nll"], rel=1e-5)
    x, y = loader.dataset.tensors
    means = sample_outputs(model, post, (x,), 25, 0.5, 2).squeeze(-1).double()
    log_probs = torch.distributions.Normal(means, 0.3).log_prob(y.squeeze(-1).double())
    nll = -(torch.logsumexp(log_probs, dim=0) - math.log(25)).mean()
    assert results[None]["test_nll"] == pytest.approx(float(nll), rel=1e-4)


# ============================================================================ 7. untrusted checkpoints
class CreatesFile:
    """Unpickling this creates ``path``: a stand-in for code a malicious checkpoint would run."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def sine_checkpoint(tmp_path_factory) -> dict:
    """A real SineRegressor training checkpoint with a SWAG posterior (loaded as a dict)."""
    from lightning_swag.experiments.data import SineDataModule
    from lightning_swag.experiments.models import SineRegressor

    torch.manual_seed(0)
    trainer = make_trainer(max_epochs=2, callbacks=[SWAGCallback(start_epoch=0, max_rank=2)])
    trainer.fit(SineRegressor(), datamodule=SineDataModule(num_points=64, batch_size=32))
    path = tmp_path_factory.mktemp("sine_ckpt") / "good.ckpt"
    trainer.save_checkpoint(path)
    return torch.load(path, weights_only=True)


@pytest.fixture
def served(tmp_path, monkeypatch):
    """A folder served over HTTP on 127.0.0.1, and its address; torch's hub cache inside tmp_path."""
    folder = tmp_path / "served"
    folder.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(folder))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _evil(checkpoint: dict, folder: Path, marker: Path) -> Path:
    path = folder / "evil.ckpt"
    torch.save({**checkpoint, "payload": CreatesFile(marker)}, path)
    return path


def _predict_loader() -> DataLoader:
    return DataLoader(TensorDataset(torch.linspace(-1, 1, 8).unsqueeze(1)), batch_size=4)


@pytest.mark.parametrize("where", ["http", "local"])
def test_trainer_predict_refuses_a_checkpoint_that_runs_code(
    where, sine_checkpoint, served, tmp_path
) -> None:
    from lightning_swag.experiments.models import SineRegressor

    folder, address = served
    marker = tmp_path / "pwned.txt"
    path = _evil(sine_checkpoint, folder if where == "http" else tmp_path, marker)
    ckpt_path = f"{address}/evil.ckpt" if where == "http" else str(path)
    with pytest.raises(Exception, match="weights_only=False") as info:
        make_trainer().predict(SWAGModule(SineRegressor()), _predict_loader(), ckpt_path=ckpt_path)
    assert not marker.exists(), "unpickling the checkpoint ran its code"
    assert "evil.ckpt" in str(info.value)


@pytest.mark.parametrize("where", ["http", "local"])
def test_cli_predict_refuses_a_checkpoint_that_runs_code(
    where, sine_checkpoint, served, tmp_path, monkeypatch, capsys
) -> None:
    from lightning_swag.lightning.cli import cli_main

    folder, address = served
    marker = tmp_path / "pwned.txt"
    path = _evil(sine_checkpoint, folder if where == "http" else tmp_path, marker)
    monkeypatch.setattr(sys, "argv", ["lightning-swag"])
    monkeypatch.chdir(tmp_path)
    args = [
        "predict",
        "--model=lightning_swag.experiments.models.SineRegressor",
        "--data=lightning_swag.experiments.data.SineDataModule",
        "--data.predict_points=8",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path / 'run'}",
        f"--ckpt_path={address}/evil.ckpt" if where == "http" else f"--ckpt_path={path}",
    ]
    with pytest.raises((Exception, SystemExit)) as info:
        cli_main(args)
    assert not marker.exists(), "unpickling the checkpoint ran its code"
    message = capsys.readouterr().err if info.type is SystemExit else str(info.value)
    assert "weights_only=False" in message


# ============================================================================ 8. mixed dtypes
class MixedDtypeNet(L.LightningModule):
    """A frozen bf16 backbone and an fp32 head."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Linear(4, 8).to(torch.bfloat16).requires_grad_(False)
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        return self.head(torch.tanh(self.backbone(x.to(torch.bfloat16))).float())

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.head.parameters(), lr=0.05)


def test_bf16_backbone_fp32_head_last_layer_swag_predicts() -> None:
    torch.manual_seed(0)
    model = MixedDtypeNet()
    swag = SWAGCallback(start_epoch=0, include=["head.*"], max_rank=2)
    trainer = make_trainer(max_epochs=3, callbacks=[swag])
    trainer.fit(model, tiny_loader(n=32))
    post = swag.posterior
    assert post.param_names == ["head.weight", "head.bias"]
    x = _x(8, 4)
    bma = SWAGModule(model, post, num_samples=4, seed=0, task="regression")
    batches = trainer.predict(bma, DataLoader(TensorDataset(x), batch_size=4))
    mean = torch.cat([b["mean"] for b in batches])
    assert mean.dtype == torch.float32
    close(mean, sample_outputs(model, post, (x,), 4, 0.5, 0).mean(dim=0), tol=1e-4)


class WithDoubleGain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 1)
        self.gain = nn.Parameter(torch.tensor([1.5], dtype=torch.float64))

    def forward(self, x):
        return (self.lin(x).double() * self.gain).float()


def test_a_float64_parameter_among_float32_ones_works() -> None:
    torch.manual_seed(0)
    model = WithDoubleGain()
    post = random_walk_posterior(model, snapshots=5, max_rank=3)
    x = _x(6, 4)
    out = SWAGModule(model, post, num_samples=4, seed=1, task="regression")(x)
    expected = sample_outputs(model, post, (x,), 4, 0.5, 1, dtype=torch.float64).mean(dim=0)
    close(out["mean"], expected, tol=1e-5)


def test_float64_classifier_returns_float64_probabilities() -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    post = random_walk_posterior(model, snapshots=5, max_rank=3)
    x = _x(6, 4).double()
    out = SWAGModule(model, post, num_samples=4, seed=1, task="classification")(x)
    assert out["mean"].dtype == torch.float64
    torch.testing.assert_close(out["mean"].sum(dim=1), torch.ones(6, dtype=torch.float64), rtol=0, atol=1e-12)
    expected = sample_outputs(model, post, (x,), 4, 0.5, 1, dtype=torch.float64).softmax(-1).mean(0)
    torch.testing.assert_close(out["mean"], expected, rtol=1e-10, atol=1e-12)


# ============================================================================ 9. several forward arguments
class MaskedBag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(12, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, input_ids, attention_mask):
        h = self.embed(input_ids) * attention_mask.unsqueeze(-1)
        return self.out(h.sum(1) / attention_mask.sum(1, keepdim=True).clamp_min(1))


class DictRows(Dataset):
    def __init__(self, ids, mask, labels) -> None:
        self.ids, self.mask, self.labels = ids, mask, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


class TupleInputs(SWAGModule):
    """The documented way to read another batch layout: override batch_inputs / batch_targets."""

    def batch_inputs(self, batch):
        return (batch[0], batch[1])

    def batch_targets(self, batch):
        return batch[2]


@pytest.mark.parametrize("layout", ["dict", "tuple"])
def test_forward_with_several_arguments_in_predict_test_and_tune_scale(layout) -> None:
    torch.manual_seed(0)
    model = MaskedBag()
    post = random_walk_posterior(model, snapshots=5, max_rank=3)
    g = torch.Generator().manual_seed(3)
    ids, y = torch.randint(0, 12, (12, 5), generator=g), torch.randint(0, 3, (12,), generator=g)
    mask = (torch.rand(12, 5, generator=g) > 0.3).float()
    rows = DictRows(ids, mask, y) if layout == "dict" else TensorDataset(ids, mask, y)
    loader = DataLoader(rows, batch_size=4)
    kwargs = {"input_ids": ids, "attention_mask": mask}
    expected = {}
    for scale in (0.25, 1.0):
        outputs = sample_outputs(model, post, (), 4, scale, 7, kwargs=kwargs)
        expected[scale] = outputs.softmax(dim=-1).mean(dim=0)
    bma = SWAGModule(model, post, num_samples=4, seed=7, scale=0.25, task="classification")
    if layout == "tuple":  # set on the instance: the test of subclassing is the one below
        bma.batch_inputs = lambda batch: (batch[0], batch[1])
        bma.batch_targets = lambda batch: batch[2]
    predicted = torch.cat([b["mean"] for b in make_trainer().predict(bma, loader)])
    close(predicted, expected[0.25])
    (result,) = make_trainer().test(bma, loader, verbose=False)
    accuracy = (expected[0.25].argmax(dim=-1) == y).double().mean()
    assert result["test_accuracy"] == pytest.approx(float(accuracy), abs=1e-6)
    scores = bma.tune_scale(loader, scales=(0.25, 1.0))
    for scale, probs in expected.items():
        nll = -probs.gather(1, y.unsqueeze(1)).log().mean()
        assert scores[scale] == pytest.approx(float(nll), rel=1e-4)


def test_a_subclass_overriding_the_batch_layout_works() -> None:
    torch.manual_seed(0)
    model = MaskedBag()
    post = random_walk_posterior(model, snapshots=5, max_rank=3)
    g = torch.Generator().manual_seed(3)
    ids, y = torch.randint(0, 12, (8, 5), generator=g), torch.randint(0, 3, (8,), generator=g)
    mask = torch.ones(8, 5)
    bma = TupleInputs(model, post, num_samples=3, seed=1, task="classification")
    loader = DataLoader(TensorDataset(ids, mask, y), batch_size=4)
    predicted = torch.cat([b["mean"] for b in make_trainer().predict(bma, loader)])
    outputs = sample_outputs(model, post, (ids, mask), 3, 0.5, 1)
    close(predicted, outputs.softmax(dim=-1).mean(dim=0))


# ============================================================================ 10. resume with user schedulers
class StepData(L.LightningModule):
    """Batches generated from ``global_step`` (a plain loader is replayed from the epoch start on a
    mid-epoch resume), SGD + momentum and a user LR scheduler stepped every epoch."""

    def __init__(self, scheduler: str) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        self.scheduler = scheduler

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        g = torch.Generator().manual_seed(10_000 + self.global_step)
        x = torch.randn(16, 4, generator=g)
        return nn.functional.mse_loss(self(x), x.sum(dim=1, keepdim=True).sin())

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        sched = torch.optim.lr_scheduler
        if self.scheduler == "LambdaLR":
            scheduler = sched.LambdaLR(opt, lambda epoch: 0.9**epoch)
        elif self.scheduler == "MultiplicativeLR":
            scheduler = sched.MultiplicativeLR(opt, lambda epoch: 0.95)
        else:
            warmup = sched.LinearLR(opt, start_factor=0.5, total_iters=2)
            scheduler = sched.SequentialLR(opt, [warmup, sched.ExponentialLR(opt, 0.9)], milestones=[2])
        return {"optimizer": opt, "lr_scheduler": scheduler}


def _step_run(scheduler: str, folder: Path | None, resume: Path | None = None):
    torch.manual_seed(0)
    model = StepData(scheduler)
    swag = SWAGCallback(start_epoch=2, max_rank=3, swa_lr=0.02, annealing_epochs=2)
    callbacks: list[L.Callback] = [swag]
    if folder is not None:
        callbacks.append(
            ModelCheckpoint(dirpath=folder, filename="{step}", every_n_train_steps=10, save_top_k=-1)
        )
    trainer = make_trainer(max_epochs=6, callbacks=callbacks, enable_checkpointing=folder is not None)
    loader = DataLoader(torch.arange(3), batch_size=1)
    trainer.fit(model, loader, ckpt_path=resume)
    return model, swag.posterior, [g["lr"] for g in trainer.optimizers[0].param_groups]


@pytest.mark.parametrize("scheduler", ["LambdaLR", "MultiplicativeLR", "SequentialLR"])
def test_resume_mid_collection_with_user_scheduler_matches_uninterrupted_run(scheduler, tmp_path) -> None:
    ref_model, ref_post, ref_lrs = _step_run(scheduler, tmp_path)
    checkpoint = tmp_path / "step=10.ckpt"  # epoch 3, batch 0: after the first snapshot (epoch 2)
    assert checkpoint.is_file()
    model, post, lrs = _step_run(scheduler, None, resume=checkpoint)
    assert post.num_snapshots == ref_post.num_snapshots == 4
    for got, want in ((post.mean, ref_post.mean), (post.variance, ref_post.variance)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(post.deviations, ref_post.deviations, rtol=0, atol=0)
    torch.testing.assert_close(flat_params(model), flat_params(ref_model), rtol=0, atol=0)
    assert lrs == ref_lrs == pytest.approx([0.02])


# ============================================================================ 11. pickling
def test_callback_pickles_after_fit_and_the_copy_fits_again() -> None:
    torch.manual_seed(0)
    swag = SWAGCallback(start_epoch=1, max_rank=2, swa_lr=0.01)
    make_trainer(max_epochs=3, callbacks=[swag]).fit(TinyRegressor(), tiny_loader(n=32))
    copy = pickle.loads(pickle.dumps(swag))
    assert copy.posterior.num_snapshots == swag.posterior.num_snapshots == 2
    torch.testing.assert_close(copy.posterior.mean, swag.posterior.mean, rtol=0, atol=0)
    make_trainer(max_epochs=4, callbacks=[copy]).fit(TinyRegressor(), tiny_loader(n=32))
    assert copy.posterior.num_snapshots == 3  # a new Trainer: a fresh posterior, epochs 1-3


# ============================================================================ 12. messages
def test_weights_only_checkpoints_warn_at_fit_and_cannot_restore_a_posterior(tmp_path) -> None:
    torch.manual_seed(0)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_weights_only=True, save_last=True)
    trainer = make_trainer(
        max_epochs=2, callbacks=[SWAGCallback(start_epoch=0), ckpt], enable_checkpointing=True
    )
    with pytest.warns(UserWarning, match="save_weights_only"):
        trainer.fit(TinyRegressor(), tiny_loader(n=32))
    with pytest.raises(Exception, match=r"weights[- ]only"):
        make_trainer().predict(
            SWAGModule(TinyRegressor()), _predict_loader4(), ckpt_path=tmp_path / "last.ckpt"
        )


def _predict_loader4() -> DataLoader:
    return DataLoader(TensorDataset(_x(8, 4)), batch_size=4)


class WithPathHparam(TinyRegressor):
    def __init__(self, data_dir: Path = Path("data")) -> None:
        super().__init__()
        self.save_hyperparameters()


def test_checkpoint_with_a_path_hyperparameter_names_the_type_it_needs(tmp_path) -> None:
    torch.manual_seed(0)
    trainer = make_trainer(max_epochs=2, callbacks=[SWAGCallback(start_epoch=0)])
    trainer.fit(WithPathHparam(tmp_path), tiny_loader(n=32))
    trainer.save_checkpoint(tmp_path / "hparams.ckpt")
    with pytest.raises(Exception) as info:
        make_trainer().predict(
            SWAGModule(WithPathHparam()), _predict_loader4(), ckpt_path=tmp_path / "hparams.ckpt"
        )
    message = str(info.value)
    assert "unpickling" in message and "PosixPath" in message
    assert "truncated" not in message
    assert "Weights only load failed" in message  # torch's own explanation is kept


# ============================================================================ 13. smaller cases
class TiedLM(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.embed(ids)))

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        logits = self(ids[:, :-1])
        return nn.functional.cross_entropy(logits.reshape(-1, 10), ids[:, 1:].reshape(-1))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def test_last_layer_swag_on_a_tied_head_tracks_the_tied_weight() -> None:
    torch.manual_seed(0)
    model = TiedLM()
    ids = torch.randint(0, 10, (16, 6), generator=torch.Generator().manual_seed(0))
    swag = SWAGCallback(start_epoch=0, include=["head.*"], max_rank=2)
    make_trainer(max_epochs=3, callbacks=[swag]).fit(model, DataLoader(TensorDataset(ids), batch_size=8))
    post = swag.posterior
    assert post.num_params == 10 * 4 + 10  # the tied weight and the head's bias
    weight = next(n for n in post.param_names if n.endswith("weight"))
    assert float(post.unflatten(post.variance)[weight].max()) > 0
    bma = SWAGModule(model, post, num_samples=1, scale=0.0, seed=0, task="classification", class_dim=-1)
    expected = swa_model_output(model, post, ids).softmax(dim=-1)
    close(bma(ids)["mean"], expected)


def test_a_one_snapshot_posterior_warns_in_swag_module() -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    post = random_walk_posterior(model, snapshots=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        SWAGModule(model, post, task="regression")
    assert any("snapshot" in str(w.message) for w in caught), [str(w.message) for w in caught]


def test_load_into_a_meta_model_is_not_silent() -> None:
    torch.manual_seed(0)
    post = random_walk_posterior(nn.Linear(4, 2))
    with torch.device("meta"):
        meta = nn.Linear(4, 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            post.load_into(meta)
        except (ValueError, RuntimeError) as err:
            assert "meta" in str(err)
            return
    assert any("meta" in str(w.message) for w in caught), "load_into(meta model) was silent"


class Outer(L.LightningModule):
    def __init__(self, inner: SWAGModule) -> None:
        super().__init__()
        self.bma = inner

    def predict_step(self, batch, batch_idx):
        return self.bma(batch[0])


def _holds(obj, tensor: torch.Tensor) -> bool:
    if isinstance(obj, torch.Tensor):
        return obj.shape == tensor.shape and bool(torch.equal(obj.to(tensor.dtype), tensor))
    if isinstance(obj, dict):
        return any(_holds(v, tensor) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_holds(v, tensor) for v in obj)
    return False


def test_nested_swag_module_posterior_is_in_the_outer_checkpoint(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    post = random_walk_posterior(model, snapshots=4)
    trainer = make_trainer()
    trainer.predict(
        Outer(SWAGModule(model, post, num_samples=2, seed=0, task="regression")), _predict_loader4()
    )
    trainer.save_checkpoint(tmp_path / "outer.ckpt")
    checkpoint = torch.load(tmp_path / "outer.ckpt", weights_only=True)
    assert _holds(checkpoint, post.mean), "the nested SWAGModule's posterior is not in the outer checkpoint"


def test_dropout_is_off_during_bma() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.5), nn.Linear(16, 1))
    post = random_walk_posterior(model, snapshots=4)
    model.train()
    x = _x(8, 4)
    bma = SWAGModule(model, post, num_samples=3, seed=0, task="regression")
    first, second = bma(x), bma(x)
    torch.testing.assert_close(first["mean"], second["mean"], rtol=0, atol=0)
    close(first["mean"], sample_outputs(model, post, (x,), 3, 0.5, 0).mean(dim=0))
    assert model.training and model[1].training  # modes restored


# ============================================================================ 14. the example's output
def test_sine_example_fast_prints_no_lightning_noise(tmp_path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONWARNINGS", None)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "sine.py"), "--fast", "--output-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=tmp_path,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    for noise in ("validation_step", "GPU available", "TPU available", "💡", "litmodels", "Tip:"):
        assert noise not in output, f"{noise!r} in the output:\n{output[-3000:]}"
