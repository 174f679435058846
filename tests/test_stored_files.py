"""Files written by an earlier version keep loading and predicting the same: a posterior file and a
Lightning checkpoint written with SWAGCallback (``tests/make_fixtures.py`` wrote them, with
the predictions of that version; ``expected.pt`` names its commit)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import QUIET, TinyRegressor
from torch.utils.data import DataLoader, TensorDataset

from lightning_swag import SWAGCallback, SWAGModule, SWAGPosterior

STORED = Path(__file__).parent / "fixtures" / "v0_1"


@pytest.fixture(scope="module")
def expected() -> dict:
    return torch.load(STORED / "expected.pt", weights_only=True)


def trained_model(expected: dict) -> TinyRegressor:
    model = TinyRegressor()
    model.load_state_dict(expected["model_state"])
    return model


def assert_prediction(prediction: dict, expected: dict) -> None:
    assert prediction.keys() == expected["prediction"].keys()
    for key, value in expected["prediction"].items():
        torch.testing.assert_close(prediction[key], value, rtol=1e-6, atol=1e-7, msg=key)


def test_a_stored_posterior_file_loads_with_its_moments_and_predictions(expected: dict) -> None:
    post = SWAGPosterior.load(STORED / "posterior.pt")
    assert post.num_snapshots == expected["num_snapshots"]
    torch.testing.assert_close(post.mean, expected["mean"], rtol=0, atol=0)
    torch.testing.assert_close(post.variance, expected["variance"], rtol=0, atol=0)
    torch.testing.assert_close(post.deviations, expected["deviations"], rtol=0, atol=0)
    with torch.no_grad():
        prediction = SWAGModule(trained_model(expected), post, **expected["options"])(expected["inputs"])
    assert_prediction(prediction, expected)


def test_a_stored_checkpoint_restores_the_posterior_for_predict(expected: dict) -> None:
    bma = SWAGModule(trained_model(expected), **expected["options"])
    loader = DataLoader(TensorDataset(expected["inputs"]), batch_size=len(expected["inputs"]))
    out = L.Trainer(**QUIET).predict(bma, loader, ckpt_path=STORED / "callback.ckpt")
    assert_prediction(out[0], expected)


def test_a_stored_checkpoint_resumes_collection(expected: dict, tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=g)
    loader = DataLoader(TensorDataset(x, x.sum(1, keepdim=True).sin()), batch_size=8)
    swag = SWAGCallback(start_epoch=1, max_rank=3)
    trainer = L.Trainer(max_epochs=6, callbacks=[swag], default_root_dir=tmp_path, **QUIET)
    trainer.fit(TinyRegressor(), loader, ckpt_path=STORED / "callback.ckpt")
    assert swag.posterior.num_snapshots == expected["num_snapshots"] + 1  # one more epoch collected
