"""CUDA: posterior, callback, BMA and checkpoints with the model on a GPU.

These run only where ``torch.cuda.is_available()`` (the GPU machine, see
``benchmarks/device_mnist.sh``); CI machines have no GPU, so they are skipped there, by name.
"""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from conftest import QUIET, TinyRegressor, WeightRecorder, expected_moments, flat_params, tiny_loader
from torch.utils.data import DataLoader, TensorDataset

from lightning_swag import SWAGCallback, SWAGModule, SWAGPosterior

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GPU = {**QUIET, "accelerator": "gpu"}


def _fit_on_gpu(
    swag: SWAGCallback, tmp_path=None, max_epochs: int = 5
) -> tuple[L.Trainer, TinyRegressor, WeightRecorder]:
    torch.manual_seed(0)
    model = TinyRegressor()
    kwargs = dict(GPU)
    if tmp_path is not None:
        kwargs.update(enable_checkpointing=True, default_root_dir=str(tmp_path))
    recorder = WeightRecorder()
    trainer = L.Trainer(max_epochs=max_epochs, callbacks=[swag, recorder], **kwargs)
    trainer.fit(model, train_dataloaders=tiny_loader())
    return trainer, model, recorder


@pytest.mark.parametrize("device", [None, "cpu"])
def test_callback_collects_gpu_weights(device: str | None) -> None:
    swag = SWAGCallback(start_epoch=1, max_rank=3, device=device)
    _, _, recorder = _fit_on_gpu(swag)
    post = swag.posterior
    # Lightning hands the model back on the CPU after fit; the posterior stays where it was built.
    assert post.device.type == ("cpu" if device == "cpu" else "cuda")
    snapshots = [recorder.by_epoch[e].cpu() for e in (1, 2, 3, 4)]
    mean, var, rows = expected_moments(snapshots, 3)
    torch.testing.assert_close(post.mean.cpu(), mean, rtol=0, atol=1e-10)
    torch.testing.assert_close(post.variance.cpu(), var, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(post.deviations.double().cpu(), rows, rtol=1e-5, atol=1e-6)


def test_gpu_sampling_matches_covariance() -> None:
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2).cuda()
    post = SWAGPosterior.from_model(net, max_rank=3)
    g = torch.Generator(device="cuda").manual_seed(0)
    for _ in range(6):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.3 * torch.randn(p.shape, device="cuda", generator=g))
        post.collect(net)
    samples = post.sample(200_000, scale=0.5, generator=torch.Generator(device="cuda").manual_seed(1))
    assert samples.device.type == "cuda"
    deviations = post.deviations.double()
    expected = 0.5 * (torch.diag(post.variance) + deviations.T @ deviations / (post.rank - 1))
    centered = samples.double() - post.mean
    empirical = centered.T @ centered / samples.shape[0]
    torch.testing.assert_close(empirical, expected, rtol=0, atol=0.02 * expected.diag().max().item())
    torch.testing.assert_close(samples.double().mean(0), post.mean, rtol=0, atol=0.01)


def test_bma_on_gpu_equals_bma_on_cpu() -> None:
    swag = SWAGCallback(start_epoch=1, max_rank=3, device="cpu")
    _, model, _ = _fit_on_gpu(swag)
    x = torch.randn(40, 4, generator=torch.Generator().manual_seed(3))
    loader = DataLoader(TensorDataset(x), batch_size=16)

    def predict(accelerator: str) -> torch.Tensor:
        bma = SWAGModule(
            copy.deepcopy(model).cpu(), swag.posterior, num_samples=12, seed=4, return_samples=True
        )
        out = L.Trainer(**{**QUIET, "accelerator": accelerator}).predict(bma, loader)
        assert out is not None
        return torch.cat([o["samples"].cpu() for o in out], dim=1)

    on_gpu, on_cpu = predict("gpu"), predict("cpu")
    assert on_gpu.shape == (12, 40, 1)
    torch.testing.assert_close(on_gpu, on_cpu, rtol=1e-4, atol=1e-5)


def test_gpu_checkpoint_predicts_on_cpu(tmp_path) -> None:
    swag = SWAGCallback(start_epoch=1, max_rank=3)
    trainer, model, _ = _fit_on_gpu(swag, tmp_path=tmp_path)
    ckpt = tmp_path / "gpu.ckpt"
    trainer.save_checkpoint(ckpt)
    fresh = TinyRegressor()
    bma = SWAGModule(fresh, num_samples=5, seed=0)
    x = torch.randn(8, 4)
    L.Trainer(**QUIET).predict(bma, DataLoader(TensorDataset(x), batch_size=8), ckpt_path=str(ckpt))
    assert bma.posterior.device.type == "cpu"
    torch.testing.assert_close(bma.posterior.mean, swag.posterior.mean.cpu(), rtol=0, atol=0)
    torch.testing.assert_close(flat_params(fresh).double(), flat_params(model).double().cpu())


def test_gpu_resume_equals_uninterrupted(tmp_path) -> None:
    straight = SWAGCallback(start_epoch=1, max_rank=3)
    _fit_on_gpu(straight, max_epochs=5)

    first = SWAGCallback(start_epoch=1, max_rank=3)
    trainer, _, _ = _fit_on_gpu(first, max_epochs=3)
    ckpt = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(ckpt)
    torch.manual_seed(0)
    resumed = SWAGCallback(start_epoch=1, max_rank=3)
    L.Trainer(max_epochs=5, callbacks=[resumed], **GPU).fit(
        TinyRegressor(), train_dataloaders=tiny_loader(), ckpt_path=str(ckpt)
    )
    assert resumed.posterior.num_snapshots == straight.posterior.num_snapshots == 4
    assert resumed.posterior.device.type == "cuda"
    torch.testing.assert_close(resumed.posterior.mean, straight.posterior.mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(resumed.posterior.deviations, straight.posterior.deviations, rtol=0, atol=1e-5)
