"""Sharded SWAG over LoRA adapters under DDP: ``SWAGCallback(include="lora", shard=True)`` on 2 CPU
processes (gloo) gives the posterior one process builds from the same snapshots.

The DDP run is ``ddp_lora_script.py`` (see its docstring for what each file holds), launched once as
a subprocess with ``strategy="ddp"``. The reference is built as in ``test_distributed.py``: the
adapter tensors each process recorded itself at every collected epoch, collected by one
``SWAGPosterior`` in this process. The DDP run's posterior is the one file ``posterior.save`` writes
when called on every process (the sharded posterior gathered to rank 0).
"""

from __future__ import annotations

from pathlib import Path

import ddp_lora_script as script
import pytest
import torch
from conftest import run_two_process_script

from lightning_swag import BMA, SWAGPosterior

SCRIPT = Path(__file__).with_name("ddp_lora_script.py")
FLOAT32 = {"rtol": 1e-5, "atol": 1e-6}  # the weights are float32; the moments float64


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp_lora")
    run_two_process_script([str(SCRIPT), str(out)], "DDP LoRA run", timeout=240)
    return out


def _load(path: Path):
    return torch.load(path, weights_only=False)


def _expected_names() -> list[str]:
    """The adapter tensors by name, in the model's order: ``lora_A``/``lora_B`` of ``query`` and
    ``value`` in every layer, then the classifier's trained copy (``modules_to_save``)."""
    prefix = "model.base_model.model."
    names = [
        f"{prefix}bert.encoder.layer.{layer}.attention.self.{target}.lora_{ab}.default.weight"
        for layer in range(2)  # tiny_lora.base_bert has 2 layers
        for target in ("query", "value")
        for ab in ("A", "B")
    ]
    return names + [f"{prefix}classifier.modules_to_save.default.{p}" for p in ("weight", "bias")]


@pytest.mark.slow
def test_sharded_lora_posterior_under_ddp_equals_the_single_process_posterior(lora_run: Path) -> None:
    fits = [_load(lora_run / f"fit_rank{r}.pt") for r in (0, 1)]
    whole = SWAGPosterior.load(lora_run / "posterior.pt")
    assert fits[0]["world_size"] == 2

    # the processes trained on different halves of the data, and recorded the same adapter weights
    for epoch in range(script.MAX_EPOCHS):
        seen = [set(f["seen"][epoch]) for f in fits]
        assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == set(range(script.TRAIN_ROWS))
    expected_snapshots = script.MAX_EPOCHS - script.START_EPOCH
    assert len(fits[0]["snapshots"]) == len(fits[1]["snapshots"]) == expected_snapshots
    for a, b in zip(fits[0]["snapshots"], fits[1]["snapshots"], strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(fits[0]["snapshots"][0], fits[0]["snapshots"][-1])  # training moved them

    # the tracked tensors are exactly the adapters: lora_A/lora_B and the modules_to_save copy
    names = _expected_names()
    for fit in fits:
        assert fit["names"] == names and fit["tracked"] == names
    assert list(whole.param_shapes) == names
    assert not whole.is_sharded and whole.num_snapshots == expected_snapshots
    assert whole.rank == script.MAX_RANK
    trained = fits[0]["state_dict"]
    for name, shape in whole.param_shapes.items():
        assert tuple(trained[name].shape) == tuple(shape)

    # the one file equals the posterior one process builds from the same snapshots
    single = SWAGPosterior(whole.param_shapes, script.MAX_RANK)
    for theta in fits[0]["snapshots"]:
        single.collect_flat(theta)
    for stat in ("mean", "variance", "deviations"):
        torch.testing.assert_close(getattr(whole, stat), getattr(single, stat), **FLOAT32)
    assert float(whole.variance.max()) > 0 and float(whole.deviations.abs().max()) > 0

    # each process kept its half of the flat vector (a torch.chunk slice), and those halves are the file's
    flat = torch.arange(whole.num_params)
    for rank, (fit, part) in enumerate(zip(fits, flat.chunk(2), strict=True)):
        assert fit["is_sharded"]
        assert [i for a, b in fit["ranges"] for i in range(a, b)] == part.tolist()
        columns = slice(int(part[0]), int(part[-1]) + 1)
        assert torch.equal(fit["mean"], whole.mean[columns]), rank
        assert torch.equal(fit["variance"], whole.variance[columns]), rank
        assert torch.equal(fit["deviations"], whole.deviations[:, columns]), rank
    assert fits[0]["nbytes"] + fits[1]["nbytes"] == single.nbytes


@pytest.mark.slow
def test_a_seeded_bma_predicts_the_same_from_the_ddp_and_the_single_process_posteriors(
    lora_run: Path,
) -> None:
    fits = [_load(lora_run / f"fit_rank{r}.pt") for r in (0, 1)]
    whole = SWAGPosterior.load(lora_run / "posterior.pt")
    single = SWAGPosterior(whole.param_shapes, script.MAX_RANK)
    for theta in fits[0]["snapshots"]:
        single.collect_flat(theta)
    module = script.LoraClassifier()
    module.load_state_dict(fits[0]["state_dict"])
    x = script.predict_inputs()
    options = {"num_samples": script.NUM_SAMPLES, "task": "classification", "seed": script.SEED}
    from_file = BMA(module, whole, **options)(x)
    from_single = BMA(module, single, **options)(x)
    for key in ("mean", "std", "entropy", "mutual_information"):
        torch.testing.assert_close(from_file[key], from_single[key], **FLOAT32)
    # under DDP, with the sharded posterior itself, every process predicted the same
    for rank in (0, 1):
        ddp_mean = _load(lora_run / f"bma_rank{rank}.pt")["mean"]
        torch.testing.assert_close(ddp_mean, from_single["mean"], **FLOAT32)
    # and the samples matter: another seed gives other predictions
    other = BMA(module, single, **{**options, "seed": script.SEED + 1})(x)
    assert not torch.allclose(other["mean"], from_single["mean"], atol=1e-4)
